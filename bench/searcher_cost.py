#!/usr/bin/env python3
"""Optuna's TPE sampler (multivariate, as Chorus's TPE) cost per suggestion after N completed
trials: the anchor of search/examples/searcher_cost.rs. The same six-parameter space; N
trials with random parameters are added to the study, then each timed suggestion is an ask with
every parameter sampled, told its value from a simple bowl.

Usage: python bench/searcher_cost.py --history 1000 --suggestions 20
"""
import argparse
import math
import random
import statistics
import time

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

SPACE = {
    "lr": FloatDistribution(1e-5, 0.1, log=True),
    "dropout": FloatDistribution(0.0, 0.5),
    "layers": IntDistribution(1, 8),
    "width": CategoricalDistribution([64, 128, 256, 512]),
    "momentum": FloatDistribution(0.5, 0.99),
    "optimizer": CategoricalDistribution(["sgd", "adam", "adamw"]),
}


def objective(p):
    u = [
        (math.log(p["lr"]) - math.log(1e-5)) / (math.log(0.1) - math.log(1e-5)),
        p["dropout"] / 0.5,
        (p["layers"] - 1) / 7,
        [64, 128, 256, 512].index(p["width"]) / 3,
        (p["momentum"] - 0.5) / 0.49,
        ["sgd", "adam", "adamw"].index(p["optimizer"]) / 2,
    ]
    return sum((x - 0.3) ** 2 for x in u) / len(u)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--history", type=int, default=1000)
    ap.add_argument("--suggestions", type=int, default=20)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(multivariate=True, seed=1))
    rng = random.Random(0)
    trials = []
    for _ in range(args.history):
        p = {
            "lr": math.exp(rng.uniform(math.log(1e-5), math.log(0.1))),
            "dropout": rng.uniform(0, 0.5),
            "layers": rng.randint(1, 8),
            "width": rng.choice([64, 128, 256, 512]),
            "momentum": rng.uniform(0.5, 0.99),
            "optimizer": rng.choice(["sgd", "adam", "adamw"]),
        }
        trials.append(optuna.trial.create_trial(params=p, distributions=SPACE, value=objective(p)))
    study.add_trials(trials)
    times = []
    for _ in range(args.suggestions):
        start = time.perf_counter()
        t = study.ask(SPACE)
        times.append((time.perf_counter() - start) * 1000)
        study.tell(t, objective(t.params))
    print(f"ms_per_suggestion={statistics.median(times):.4f}")


if __name__ == "__main__":
    main()
