#!/usr/bin/env python3
"""Learning curves that cross, for the search benchmark (bench/search_curves.py).

Two families of problems:

- **Real curves** (`digits`, `breast_cancer`, `wine`, `diabetes`, `classification`, `moons`):
  multi-layer perceptrons really trained, epoch by epoch, on data sets that ship inside
  scikit-learn (the first four are the UCI sets it bundles; the last two come from its seeded
  generators `make_classification` and `make_moons`). Each configuration of an LCBench-like space
  (batch size, learning rate, momentum, weight decay, depth, width, dropout; Zimmer et al.,
  "Auto-PyTorch Tabular", 2021) is trained with SGD and a cosine-annealed learning rate for
  `EPOCHS` epochs and its validation loss recorded after every epoch. `generate` trains
  `CONFIGS` random configurations per data set once and caches the table outside the
  repository; the benchmark then reads curves from a surrogate over that table (inverse-distance
  weighting of the nearest configurations in the unit-scaled space), as surrogate benchmarks of
  real runs (LCBench through YAHPO Gym) do, so a searcher may ask for any point of the space.
- **Misleading curves** (`slow_starters`): a synthetic family whose early ranking is
  deliberately wrong: the better a configuration's final value, the slower its curve falls, so
  at the first epochs the eventual best look worst.

`crossings` states, per problem, the fraction of configuration pairs whose order at an early
epoch differs from their order at the end.

Usage: python bench/curves.py generate [--out DIR]   (what bench/search_curves.sh runs first)
       python bench/curves.py crossings [--out DIR]
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import random
import sys

# Small matrices: one BLAS thread each is fastest, and the generator runs a process per core.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

EPOCHS = 50
CONFIGS = 256

# The space every searcher sees: LCBench's, with widths scaled to these small data sets.
SPACE = {
    "batch_size": {"min": 16, "max": 512, "distribution": "log_int_uniform"},
    "learning_rate": {"min": 1e-4, "max": 0.3, "distribution": "log_uniform"},
    "momentum": {"min": 0.1, "max": 0.99},
    "weight_decay": {"min": 1e-5, "max": 0.1, "distribution": "log_uniform"},
    "num_layers": {"min": 1, "max": 4},
    "max_units": {"min": 8, "max": 256, "distribution": "log_int_uniform"},
    "max_dropout": {"min": 0.0, "max": 0.9},
}

REAL = ["digits", "breast_cancer", "wine", "diabetes", "classification", "moons"]
PROBLEMS = REAL + ["slow_starters"]


def unit(name, v):
    """A parameter value's place in [0, 1] on its own scale (log where the space is log)."""
    d = SPACE[name]
    lo, hi = d["min"], d["max"]
    if d.get("distribution", "").startswith("log"):
        v, lo, hi = math.log(v), math.log(lo), math.log(hi)
    return min(1.0, max(0.0, (v - lo) / (hi - lo)))


def sample(rng):
    p = {}
    for name, d in SPACE.items():
        u = rng.random()
        lo, hi = d["min"], d["max"]
        if d.get("distribution", "").startswith("log"):
            v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        else:
            v = lo + u * (hi - lo)
        p[name] = int(round(v)) if isinstance(lo, int) and isinstance(hi, int) else v
    return p


# ---- real training -----------------------------------------------------------------------

def dataset(name):
    """(x_train, y_train, x_val, y_val, classes); classes 0 for regression. Deterministic."""
    import numpy as np
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if name == "classification":
        x, y = datasets.make_classification(n_samples=1500, n_features=20, n_informative=8, n_redundant=4,
                                            n_classes=4, flip_y=0.08, class_sep=0.9, random_state=0)
    elif name == "moons":
        x, y = datasets.make_moons(n_samples=1000, noise=0.35, random_state=0)
    else:
        x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    classes = 0 if name == "diabetes" else int(y.max()) + 1
    xt, xv, yt, yv = train_test_split(x, y, test_size=1 / 3, random_state=0,
                                      stratify=y if classes else None)
    mu, sd = xt.mean(0), xt.std(0)
    sd[sd < 1e-6] = 1.0  # digits has pixels that never vary in the training split
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    if not classes:
        ym, ys = yt.mean(), yt.std()
        yt, yv = (yt - ym) / ys, (yv - ym) / ys
    f = np.float32
    return xt.astype(f), yt, xv.astype(f), yv, classes


def train(data, p, seed):
    """Validation loss after each of `EPOCHS` epochs of SGD on an MLP with configuration `p`."""
    import numpy as np

    xt, yt, xv, yv, classes = data
    rng = np.random.default_rng(seed)
    out = classes or 1
    layers = p["num_layers"]
    # A funnel: widths shrink from max_units towards the output, dropout grows to max_dropout.
    widths = [xt.shape[1]] + [max(out + 1, int(p["max_units"] * (1 - 0.5 * i / layers))) for i in range(layers)] + [out]
    drops = [p["max_dropout"] * (i + 1) / layers for i in range(layers)]
    w = [rng.normal(0, math.sqrt(2 / a), (a, b)).astype(np.float32) for a, b in zip(widths, widths[1:])]
    b = [np.zeros(n, np.float32) for n in widths[1:]]
    vw = [np.zeros_like(x) for x in w]
    vb = [np.zeros_like(x) for x in b]
    n = len(xt)
    bs = min(p["batch_size"], n)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * EPOCHS
    lr0, mom, wd = p["learning_rate"], p["momentum"], p["weight_decay"]
    onehot = np.eye(classes, dtype=np.float32)[yt] if classes else None
    # A diverged run reports this instead of inf/nan: a loss worse than predicting the prior.
    cap = 2 * math.log(classes) if classes else 2.0

    def forward(x, train_mode):
        hs, masks = [x], []
        h = x
        for i in range(len(w)):
            h = h @ w[i] + b[i]
            if i < len(w) - 1:
                h = np.maximum(h, 0)
                if train_mode and drops[i] > 0:
                    m = (rng.random(h.shape) >= drops[i]).astype(np.float32) / (1 - drops[i])
                    h = h * m
                    masks.append(m)
                else:
                    masks.append(None)
            hs.append(h)
        return hs, masks

    def val_loss():
        with np.errstate(all="ignore"):
            z = forward(xv, False)[0][-1]
            if classes:
                z = z - z.max(1, keepdims=True)
                lp = z - np.log(np.exp(z).sum(1, keepdims=True))
                v = float(-lp[np.arange(len(yv)), yv].mean())
            else:
                v = float(((z[:, 0] - yv) ** 2).mean())
        return v if math.isfinite(v) and v < cap else cap

    curve, step, dead = [], 0, False
    for _ in range(EPOCHS):
        if dead:
            curve.append(cap)
            continue
        order = rng.permutation(n)
        with np.errstate(all="ignore"):
            for s in range(steps_per_epoch):
                idx = order[s * bs:(s + 1) * bs]
                x = xt[idx]
                hs, masks = forward(x, True)
                z = hs[-1]
                if classes:
                    z = z - z.max(1, keepdims=True)
                    e = np.exp(z)
                    g = (e / e.sum(1, keepdims=True) - onehot[idx]) / len(idx)
                else:
                    g = (2 * (z - yt[idx, None]) / len(idx)).astype(np.float32)
                lr = lr0 * 0.5 * (1 + math.cos(math.pi * step / total))
                for i in range(len(w) - 1, -1, -1):
                    gw = hs[i].T @ g + wd * w[i]
                    gb = g.sum(0)
                    if i > 0:
                        g = g @ w[i].T
                        if masks[i - 1] is not None:
                            g = g * masks[i - 1]
                        g = g * (hs[i] > 0)
                    vw[i] = mom * vw[i] - lr * gw
                    vb[i] = mom * vb[i] - lr * gb
                    w[i] += vw[i]
                    b[i] += vb[i]
                step += 1
        v = val_loss()
        if not all(np.isfinite(x).all() for x in w):
            dead = True
        curve.append(v)
    return curve


def generator_key():
    """Changes whenever what makes a table does (the data, the training, the space), so a cached
    table never outlives the code that made it."""
    import inspect
    made_by = [inspect.getsource(f) for f in (dataset, train, sample)] + [repr(SPACE), EPOCHS, CONFIGS]
    return hashlib.sha256(repr(made_by).encode()).hexdigest()[:16]


def table_path(out, name):
    return os.path.join(out, f"{name}-{generator_key()}.json.gz")


def generate_one(args):
    out, name = args
    path = table_path(out, name)
    if os.path.exists(path):
        return path
    data = dataset(name)
    rng = random.Random(f"configs {name}")
    configs = [sample(rng) for _ in range(CONFIGS)]
    curves = [[round(v, 6) for v in train(data, p, seed=i)] for i, p in enumerate(configs)]
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt") as f:
        json.dump({"problem": name, "epochs": EPOCHS, "configs": configs, "curves": curves}, f)
    os.replace(tmp, path)
    return path


def default_out():
    cache = os.environ.get("CHORUS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chorus")
    return os.path.join(cache, "curves")


# ---- the benchmark's view ----------------------------------------------------------------

class Problem:
    """Curves for any configuration: the surrogate over a real table, or the synthetic family."""

    def __init__(self, name, out=None):
        self.name = name
        self.epochs = EPOCHS
        if name == "slow_starters":
            self.table = None
            # The optimum of `slow_final` (0 at the centre) is reached by its curve's end.
            self.optimum = 0.0
            return
        with gzip.open(table_path(out or default_out(), name), "rt") as f:
            self.table = json.load(f)
        self.points = [[unit(k, c[k]) for k in SPACE] for c in self.table["configs"]]
        self.optimum = min(min(c) for c in self.table["curves"])

    def curve(self, p):
        if self.table is None:
            return slow_curve(p, self.epochs)
        x = [unit(k, p[k]) for k in SPACE]
        near = sorted((sum((a - b) ** 2 for a, b in zip(x, q)), i) for i, q in enumerate(self.points))[:4]
        if near[0][0] < 1e-12:
            return list(self.table["curves"][near[0][1]])
        weights = [(1 / d, i) for d, i in near]
        total = sum(wt for wt, _ in weights)
        return [sum(wt * self.table["curves"][i][e] for wt, i in weights) / total for e in range(self.epochs)]


CENTRE = {"batch_size": 0.7, "learning_rate": 0.3, "momentum": 0.6, "weight_decay": 0.55, "num_layers": 0.4,
          "max_units": 0.65, "max_dropout": 0.7}


def slow_final(p):
    return sum((unit(k, p[k]) - c) ** 2 for k, c in CENTRE.items()) / len(CENTRE)


def slow_curve(p, epochs):
    """Falls from 1 + final towards final. Configurations with a small learning rate (the lower
    ~40 % of its log range, where the optimum lies) fall about ten times slower than the rest: the
    region that ends best looks worst for the first epochs."""
    final = slow_final(p)
    slow = 1 / (1 + math.exp((unit("learning_rate", p["learning_rate"]) - 0.4) / 0.03))
    tau = 1.5 + 13.5 * slow
    return [final + math.exp(-e / tau) for e in range(1, epochs + 1)]


def crossing_fraction(curves, early):
    """Share of pairs ranked one way at epoch `early` and the other by their best value at the end."""
    pairs = crossed = 0
    for i in range(len(curves)):
        for j in range(i + 1, len(curves)):
            a, b = curves[i], curves[j]
            e = (a[early - 1] - b[early - 1])
            f = (min(a) - min(b))
            if e == 0 or f == 0:
                continue
            pairs += 1
            crossed += (e > 0) != (f > 0)
    return crossed / pairs if pairs else 0.0


def dump(out, to):
    """Plain JSON tables for the simulator `cargo run -p chorus-search --example curve_search`;
    the misleading family as a table of 2,000 sampled configurations."""
    os.makedirs(to, exist_ok=True)
    scales = [[d["min"], d["max"], d.get("distribution", "").startswith("log")] for d in SPACE.values()]
    for name in PROBLEMS:
        prob = Problem(name, out)
        if prob.table is not None:
            configs, curves = prob.table["configs"], prob.table["curves"]
        else:
            rng = random.Random("slow starters")
            configs = [sample(rng) for _ in range(2000)]
            curves = [slow_curve(c, EPOCHS) for c in configs]
        points = [[unit(k, c[k]) for k in SPACE] for c in configs]
        with open(os.path.join(to, f"{name}.json"), "w") as f:
            json.dump({"problem": name, "epochs": EPOCHS, "space": SPACE, "names": list(SPACE), "points": points, "curves": curves,
                       "scales": scales}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["generate", "crossings", "dump"])
    ap.add_argument("--out", default=default_out())
    ap.add_argument("--to", help="dump: the folder for plain JSON tables")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.what == "generate":
        from multiprocessing import Pool
        with Pool(min(len(REAL), os.cpu_count() or 1)) as pool:
            for path in pool.imap_unordered(generate_one, [(args.out, n) for n in REAL]):
                print(f"curves: {path}", file=sys.stderr)
        return
    if args.what == "dump":
        dump(args.out, args.to)
        return
    print("| problem | pairs ranked the other way at epoch 1 | at epoch 6 | at epoch 18 |")
    print("| --- | --- | --- | --- |")
    for name in PROBLEMS:
        prob = Problem(name, args.out)
        if prob.table is not None:
            curves = prob.table["curves"]
        else:
            rng = random.Random("slow starters")
            curves = [slow_curve(sample(rng), EPOCHS) for _ in range(CONFIGS)]
        # Epochs 6 and 18 are asha's default rungs for these 50 epochs.
        row = [crossing_fraction(curves, e) for e in (1, 6, 18)]
        print(f"| {name} | " + " | ".join(f"{100 * r:.0f} %" for r in row) + " |")


if __name__ == "__main__":
    main()
