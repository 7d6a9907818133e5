#!/usr/bin/env python3
"""Search quality at equal compute: Chorus (through a real coordinator and workers; ASHA with its
defaults, or `CHORUS_REGRET_SEARCH=asha-stop-once|asha-random|hyperband|tpe-median`, with
searcher settings such as `CHORUS_REGRET_SETTINGS='{"grace_period": 1}'` merged in) against
Optuna (multivariate TPE with a Hyperband pruner), on multi-fidelity synthetic objectives with
known optima, counted in epochs consumed, with the same number of trials in flight for both.

Each objective is a noisy learning curve: the value at epoch e falls towards the configuration's
final value f(x) (Branin, Hartmann-6, or a mixed log/categorical/integer bowl), with noise that
shrinks as 1/sqrt(e). Regret is the noise-free curve value of the best report so far minus the
known optimum, read at every epoch consumed. Both searchers see only the noisy values.

Usage: bench/search_regret.sh [SEEDS] [BUDGET] [PARALLEL]  (sets up libtorch's paths)
       python bench/search_regret.py [--seeds 10] [--budget 400] [--parallel 4] [--bin target/debug]
       python bench/search_regret.py trial OBJECTIVE LOG   (what each Chorus trial runs)
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import Cluster  # noqa: E402

MAX_EPOCHS = 27
# A Chorus trial takes this long per epoch, so that stopping decisions can arrive while a trial
# still runs, as with real training; Optuna's loop is in-process and sequential, and compute is
# counted in epochs for both.
EPOCH_SECONDS = 0.02


# ---- objectives --------------------------------------------------------------------------

def branin(p):
    x1, x2 = p["x1"], p["x2"]
    a, b, c, r, s, t = 1, 5.1 / (4 * math.pi ** 2), 5 / math.pi, 6, 10, 1 / (8 * math.pi)
    return a * (x2 - b * x1 ** 2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


HARTMANN_A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
HARTMANN_P = [[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886], [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
              [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650], [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381]]
HARTMANN_ALPHA = [1.0, 1.2, 3.0, 3.2]


def hartmann6(p):
    x = [p[f"x{i}"] for i in range(6)]
    return -sum(HARTMANN_ALPHA[i] * math.exp(-sum(HARTMANN_A[i][j] * (x[j] - HARTMANN_P[i][j]) ** 2 for j in range(6)))
                for i in range(4))


def mixed(p):
    return (((math.log10(p["lr"]) + 3) / 2.5) ** 2 + ((p["depth"] - 5) / 4) ** 2 + (p["dropout"] - 0.2) ** 2
            + {32: 0.3, 64: 0.1, 128: 0.0, 256: 0.15}[p["width"]])


# name: (function, optimum, scale of the curve's start above the final value, Chorus space, Optuna space)
OBJECTIVES = {
    "branin": (branin, 0.397887, 20.0, {"x1": {"min": -5, "max": 10.0}, "x2": {"min": 0, "max": 15.0}}),
    "hartmann6": (hartmann6, -3.32237, 2.0, {f"x{i}": {"min": 0.0, "max": 1.0} for i in range(6)}),
    "mixed": (mixed, 0.0, 1.5, {"lr": {"min": 1e-5, "max": 1.0, "distribution": "log_uniform"},
                                "width": {"values": [32, 64, 128, 256]}, "depth": {"min": 1, "max": 8},
                                "dropout": {"min": 0.0, "max": 0.5}}),
}


def curve(name, p, epoch):
    """(noise-free value, noisy value) at `epoch` of a configuration."""
    f, _, scale, _ = OBJECTIVES[name]
    final = f(p)
    clean = final + scale * math.exp(-0.15 * epoch)
    # A stable hash: Python's own `hash` of a string changes with every process.
    seed = zlib.crc32(f"{name} {json.dumps(p, sort_keys=True)} {epoch}".encode())
    noise = random.Random(seed).gauss(0, 0.05 * scale / math.sqrt(epoch))
    return clean, clean + noise


# ---- a Chorus trial ----------------------------------------------------------------------

def trial(name, log):
    p = json.loads(os.environ["CHORUS_PARAMS"])
    # A trial paused at a rung and promoted later resumes from its checkpoint: the last epoch.
    ckpt = os.path.join(os.environ["CHORUS_CHECKPOINT_DIR"], "epoch")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    for e in range(start + 1, MAX_EPOCHS + 1):
        clean, noisy = curve(name, p, e)
        with open(log, "a") as f:
            f.write(f"{time.time_ns()} {os.environ['CHORUS_TRIAL_ID']} {e} {clean}\n")
        time.sleep(EPOCH_SECONDS)
        with open(ckpt + ".tmp", "w") as f:
            f.write(str(e))
        os.replace(ckpt + ".tmp", ckpt)
        print("chorus:metric " + json.dumps({"step": e, "epoch": e, "loss": noisy}), flush=True)


# ---- runs --------------------------------------------------------------------------------

def regret_curve(events, optimum, budget):
    """Best-so-far regret after each of `budget` epochs, from (clean value) events in order."""
    out, best = [], math.inf
    for clean in events[:budget]:
        best = min(best, clean)
        out.append(best - optimum)
    while len(out) < budget:
        out.append(out[-1] if out else math.inf)
    return out


def run_optuna(name, seed, budget, parallel):
    """Optuna's ask-and-tell loop with `parallel` trials in flight, each advancing one epoch per
    round in turn: what `n_jobs` or several workers sharing a study do, made deterministic."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = OBJECTIVES[name][3]
    study = optuna.create_study(
        study_name=f"regret-{name}-{seed}",  # Hyperband assigns brackets by a hash of it
        sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True),
        pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=MAX_EPOCHS, reduction_factor=3),
    )

    def ask():
        t = study.ask()
        p = {}
        for k, d in space.items():
            if "values" in d:
                p[k] = t.suggest_categorical(k, d["values"])
            elif isinstance(d["min"], int) and isinstance(d["max"], int):
                p[k] = t.suggest_int(k, d["min"], d["max"])
            else:
                p[k] = t.suggest_float(k, d["min"], d["max"], log=d.get("distribution") == "log_uniform")
        return [t, p, 0, None]

    events = []
    running = [ask() for _ in range(parallel)]
    while len(events) < budget:
        for i, r in enumerate(running):
            t, p, e, _ = r
            e += 1
            clean, noisy = curve(name, p, e)
            events.append(clean)
            r[2], r[3] = e, noisy
            t.report(noisy, e)
            if t.should_prune():
                study.tell(t, state=optuna.trial.TrialState.PRUNED)
                running[i] = ask()
            elif e >= MAX_EPOCHS:
                study.tell(t, noisy)
                running[i] = ask()
            if len(events) >= budget:
                break
    return events


def CHORUS_SEARCH(seed):
    """The Chorus searcher: `asha` (promotion, TPE sampler: the defaults), `asha-stop-once`,
    `asha-random`, `hyperband` (defaults), or TPE with the median rule."""
    mode = os.environ.get("CHORUS_REGRET_SEARCH", "asha")
    asha = {"seed": seed, "reduction_factor": 3, "max_resource": MAX_EPOCHS, "resource": "epoch"}
    asha.update(json.loads(os.environ.get("CHORUS_REGRET_SETTINGS", "{}")))
    if mode == "hyperband":
        return {"searcher": {"name": "hyperband", **asha}}
    if mode == "asha":
        return {"searcher": {"name": "asha", **asha}}
    if mode == "asha-stop-once":
        return {"searcher": {"name": "asha", "grace_period": 1, "stop_once": True, **asha}}
    if mode == "asha-random":
        return {"searcher": {"name": "asha", "grace_period": 1, "sampler": "random", **asha}}
    return {"searcher": {"name": "tpe", "seed": seed, "n_startup_trials": 10},
            "scheduler": {"name": "median", "grace_period": 3, "min_trials": 3, "resource": "epoch"}}


def run_chorus(name, seed, budget, parallel, cluster, workdir):
    stem = os.path.join(workdir, f"{name}-{seed}")
    spec = {
        "name": f"regret-{name}-{seed}",
        "metric": {"name": "loss", "goal": "minimize"},
        "parameters": OBJECTIVES[name][3],
        **CHORUS_SEARCH(seed),
        "max_trials": 500,
        "parallel_trials": parallel,
        "trial": {"command": [sys.executable, os.path.abspath(__file__), "trial", name, stem + ".log"]},
    }
    return [float(r[3]) for r in cluster.run(spec, stem + ".yaml", stem + ".log", budget, poll=0.2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--bin", default="target/debug")
    ap.add_argument("--parallel", type=int, default=4, help="trials in flight, for both")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="chorus-regret-")
    cluster = Cluster(args.bin, workdir)
    try:
        print(f"best-so-far regret at {args.budget} epochs, median (min-max) over {args.seeds} seeds; "
              f"epochs to reach the target, median")
        print(f"| objective | Chorus {os.environ.get('CHORUS_REGRET_SEARCH', 'asha')} | Optuna TPE + Hyperband | target | Chorus epochs | Optuna epochs |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in args.objectives.split(","):
            optimum = OBJECTIVES[name][1]
            rc, ro, tc, to = [], [], [], []
            finals = {}
            for seed in range(args.seeds):
                c = regret_curve(run_chorus(name, seed, args.budget, args.parallel, cluster, workdir), optimum, args.budget)
                o = regret_curve(run_optuna(name, seed, args.budget, args.parallel), optimum, args.budget)
                rc.append(c[-1])
                ro.append(o[-1])
                finals[seed] = (c, o)
            # The target: the median regret Optuna reaches at half the budget.
            target = statistics.median(o[args.budget // 2 - 1] for _, o in finals.values())
            first = lambda xs: next((i + 1 for i, x in enumerate(xs) if x <= target), math.inf)
            tc = [first(c) for c, _ in finals.values()]
            to = [first(o) for _, o in finals.values()]
            fmt = lambda xs: f"{statistics.median(xs):.4f} ({min(xs):.4f}-{max(xs):.4f})"
            print(f"| {name} | {fmt(rc)} | {fmt(ro)} | {target:.4f} | {statistics.median(tc)} | "
                  f"{statistics.median(to)} |", flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "trial":
        trial(sys.argv[2], sys.argv[3])
    else:
        main()
