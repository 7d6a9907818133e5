#!/usr/bin/env python3
"""Search quality on learning curves that cross (bench/curves.py), at equal compute: Chorus's
`asha` on its defaults (through a real coordinator and workers) against Optuna 5.0.0
(multivariate TPE with a Hyperband pruner, and with a median pruner) and random search, with one
or several trials in flight.

Every method gets the same budget, counted in epochs as they are consumed (a full training is
`EPOCHS` epochs; a resumed trial that redoes epochs pays for them). A run's regret is the best
validation loss reported within the budget minus the best loss any configuration of the
problem's table reaches (for the synthetic family, its known optimum). Per problem the table
gives the mean and median regret over the seeds, and how many runs beat random search on the
same seed; overall, the mean of the per-problem means and medians, and the wins.

Usage: bench/search_curves.sh [SEEDS] [BUDGET] [PARALLEL]  (generates the curves first)
       python bench/search_curves.py [--seeds 5] [--budget 100] [--parallel 1] [--bin target/debug]
       python bench/search_curves.py trial PROBLEM LOG   (what each Chorus trial runs)
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import curves  # noqa: E402
from cluster import Cluster  # noqa: E402

# A Chorus trial takes this long per epoch, so that stopping decisions arrive while it runs, as
# with real training; Optuna's loop is in-process. Compute is counted in epochs for every method.
EPOCH_SECONDS = 0.02


# ---- a Chorus trial ----------------------------------------------------------------------

def trial(name, log):
    p = json.loads(os.environ["CHORUS_PARAMS"])
    values = curves.Problem(name).curve(p)
    # A trial paused at a rung and promoted later resumes from its checkpoint: the last epoch.
    ckpt = os.path.join(os.environ["CHORUS_CHECKPOINT_DIR"], "epoch")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    for e in range(start + 1, curves.EPOCHS + 1):
        with open(log, "a") as f:
            f.write(f"{time.time_ns()} {os.environ['CHORUS_TRIAL_ID']} {e} {values[e - 1]}\n")
        time.sleep(EPOCH_SECONDS)
        with open(ckpt + ".tmp", "w") as f:
            f.write(str(e))
        os.replace(ckpt + ".tmp", ckpt)
        print("chorus:metric " + json.dumps({"step": e, "epoch": e, "val_loss": values[e - 1]}), flush=True)


def run_chorus(prob, seed, budget, parallel, cluster, workdir):
    name = prob.name
    searcher = {"name": "asha", "seed": seed, "max_resource": curves.EPOCHS, "resource": "epoch"}
    searcher.update(json.loads(os.environ.get("CHORUS_CURVES_SEARCHER", "{}")))
    stem = os.path.join(workdir, f"{name}-{seed}-{parallel}")
    spec = {
        "name": f"curves-{name}-{seed}-{parallel}",
        "metric": {"name": "val_loss", "goal": "minimize"},
        "parameters": curves.SPACE,
        "searcher": searcher,
        "max_trials": 100000,
        "parallel_trials": parallel,
        "trial": {"command": [sys.executable, os.path.abspath(__file__), "trial", name, stem + ".log"]},
    }
    rows = cluster.run(spec, stem + ".yaml", stem + ".log", budget)
    return [float(r[3]) for r in rows[:budget]]


# ---- the anchors -------------------------------------------------------------------------

def run_random(prob, seed, budget):
    """Random search: every configuration trained in full (the order of events does not change
    the best value within the budget, so it needs no parallelism)."""
    rng = random.Random(f"random {prob.name} {seed}")
    events = []
    while len(events) < budget:
        events.extend(prob.curve(curves.sample(rng)))
    return events[:budget]


def run_optuna(prob, seed, budget, parallel, pruner):
    """Optuna's ask-and-tell loop with `parallel` trials in flight, each advancing one epoch per
    round in turn (what `n_jobs` or several workers sharing a study do, made deterministic)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if pruner == "hyperband":
        p = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=curves.EPOCHS, reduction_factor=3)
    else:
        p = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    study = optuna.create_study(study_name=f"curves-{prob.name}-{seed}", pruner=p,
                                sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True))

    def ask():
        t = study.ask()
        params = {}
        for k, d in curves.SPACE.items():
            log = d.get("distribution", "").startswith("log")
            if isinstance(d["min"], int) and isinstance(d["max"], int):
                params[k] = t.suggest_int(k, d["min"], d["max"], log=log)
            else:
                params[k] = t.suggest_float(k, d["min"], d["max"], log=log)
        return [t, prob.curve(params), 0]

    events = []
    running = [ask() for _ in range(parallel)]
    while len(events) < budget:
        for i, r in enumerate(running):
            t, values, e = r
            value = values[e]
            e += 1
            r[2] = e
            events.append(value)
            t.report(value, e)
            if t.should_prune():
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
                running[i] = ask()
            elif e >= curves.EPOCHS:
                study.tell(t, value)
                running[i] = ask()
            if len(events) >= budget:
                break
    return events


METHODS = ["chorus", "optuna-hyperband", "optuna-median", "random"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=int, default=100, help="full trainings")
    ap.add_argument("--parallel", type=int, default=1, help="trials in flight, for every method")
    ap.add_argument("--bin", default="target/debug")
    ap.add_argument("--problems", default=",".join(curves.PROBLEMS))
    ap.add_argument("--jobs", type=int, default=6, help="Chorus experiments run at once")
    args = ap.parse_args()
    budget = args.budget * curves.EPOCHS
    problems = [curves.Problem(n) for n in args.problems.split(",")]
    workdir = tempfile.mkdtemp(prefix="chorus-curves-")
    cluster = Cluster(args.bin, workdir, slots=max(2, args.jobs * args.parallel // 2 + 1))
    results = {}  # (problem, method, seed) -> regret
    lock = threading.Lock()

    def regret(prob, events):
        return min(events) - prob.optimum if events else math.inf

    def chorus_job(prob, seed):
        r = regret(prob, run_chorus(prob, seed, budget, args.parallel, cluster, workdir))
        with lock:
            results[(prob.name, "chorus", seed)] = r

    try:
        started = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(chorus_job, prob, seed) for prob in problems for seed in range(args.seeds)]
            # The anchors run in this process while the Chorus experiments run.
            for prob in problems:
                for seed in range(args.seeds):
                    for method, run in (("optuna-hyperband", lambda: run_optuna(prob, seed, budget, args.parallel, "hyperband")),
                                        ("optuna-median", lambda: run_optuna(prob, seed, budget, args.parallel, "median")),
                                        ("random", lambda: run_random(prob, seed, budget))):
                        results[(prob.name, method, seed)] = regret(prob, run())
            for f in futures:
                f.result()
        report(problems, results, args, time.time() - started)
    finally:
        cluster.stop()


def report(problems, results, args, seconds):
    searcher = os.environ.get("CHORUS_CURVES_SEARCHER", "asha defaults")
    print(f"budget {args.budget} full trainings of {curves.EPOCHS} epochs, {args.parallel} in flight, "
          f"{args.seeds} seeds; Chorus: {searcher}; {seconds:.0f} s")
    print("regret: mean / median over seeds (wins against random search on the same seed)")
    print("| problem | " + " | ".join(METHODS) + " |")
    print("| --- |" + " --- |" * len(METHODS))
    means = {m: [] for m in METHODS}
    medians = {m: [] for m in METHODS}
    wins = {m: 0 for m in METHODS}
    runs = 0
    for prob in problems:
        row = []
        for m in METHODS:
            rs = [results[(prob.name, m, s)] for s in range(args.seeds)]
            w = sum(results[(prob.name, m, s)] < results[(prob.name, "random", s)] for s in range(args.seeds))
            wins[m] += w
            means[m].append(statistics.mean(rs))
            medians[m].append(statistics.median(rs))
            row.append(f"{statistics.mean(rs):.4f} / {statistics.median(rs):.4f}"
                       + ("" if m == "random" else f" ({w})"))
        runs += args.seeds
        print(f"| {prob.name} | " + " | ".join(row) + " |")
    print("| **overall** | " + " | ".join(
        f"{statistics.mean(means[m]):.4f} / {statistics.mean(medians[m]):.4f}"
        + ("" if m == "random" else f" ({wins[m]} of {runs})") for m in METHODS) + " |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "trial":
        trial(sys.argv[2], sys.argv[3])
    else:
        main()
