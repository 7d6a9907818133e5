#!/usr/bin/env bash
# The data path on synthetic shards: the share of the training thread's time spent waiting for
# data, for a first epoch with a cold shard cache and a second with a warm one, and the same
# training on batches held in memory as the anchor; then the source alone (nobody training) with
# 1 and 2 loader threads side by side in the same run (`--source-threads` to change the counts).
# Builds worker/examples/data_path.rs in release, runs it RUNS times (default 5), and prints
# median, min and max of each figure.
#
# Usage: bench/data_path.sh [RUNS] [-- EXAMPLE ARGS...]   e.g. bench/data_path.sh 5 -- --device cuda
#        bench/data_path.sh 5 -- --source-only --source-threads 1,2,4
# DATA_PATH_BASELINE=REV also builds the example at git revision REV (in a worktree under
# target/) and, in each run, trains it one epoch on its default dataset and times its source
# alone the way this run's `source_samples_per_second` is timed (one pass of the trained source
# over the warm cache): the path as it was, side by side. Keep the dataset and batch flags at
# their defaults for that comparison.
# DATA_PATH_BIN=path runs a binary built elsewhere instead of building here (LD_LIBRARY_PATH must
# then reach libtorch, e.g. a PyTorch 2.11 install's torch/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
shift || true
[ "${1:-}" = "--" ] && shift

if [ -z "${DATA_PATH_BIN:-}" ] || [ -n "${DATA_PATH_BASELINE:-}" ]; then
  eval "$(scripts/libtorch.sh)"
fi
if [ -z "${DATA_PATH_BIN:-}" ]; then
  cargo build --release --quiet -p chorus-worker --example data_path
fi
bin="${DATA_PATH_BIN:-target/release/examples/data_path}"

baseline=""
if [ -n "${DATA_PATH_BASELINE:-}" ]; then
  rev="$(git rev-parse --short "$DATA_PATH_BASELINE")"
  baseline="target/bench-baseline/data_path-$rev"
  if [ ! -x "$baseline" ]; then
    tree="target/bench-baseline/tree-$rev"
    [ -d "$tree" ] || git worktree add --detach "$tree" "$rev" >&2
    # The same target directory: dependencies are built once; the baseline's own crates are
    # told apart by their paths. Built before the current example, which it would overwrite.
    (cd "$tree" && CARGO_TARGET_DIR="$PWD/../.." cargo build --release --quiet -p chorus-worker --example data_path)
    cp target/release/examples/data_path "$baseline"
    cargo build --release --quiet -p chorus-worker --example data_path
  fi
fi

out=""
for i in $(seq 1 "$runs"); do
  echo "run $i of $runs" >&2
  # Not `tee /dev/stderr`: where stderr is a file, reopening it truncates what earlier runs wrote.
  run="$("$bin" "$@")"
  printf '%s\n' "$run" >&2
  out+="$(grep -E '^[a-z0-9_]+=' <<<"$run")"$'\n'
  if [ -n "$baseline" ]; then
    echo "run $i of $runs: baseline $rev, source alone" >&2
    base="$("$baseline" --epochs 1 --no-anchor)"
    printf '%s\n' "$base" >&2
    out+="$(grep -E '^source_samples_per_second=' <<<"$base" | sed 's/^/baseline_/')"$'\n'
  fi
done

python3 - "$runs" <<PY
import statistics, sys
runs = sys.argv[1]
figures = {}
for line in """$out""".split():
    if "=" not in line:
        continue
    k, v = line.split("=")
    figures.setdefault(k, []).append(float(v))
rows = [
    ("wait share, epoch 1 (cold shard cache), %", "cold_wait_share", 2),
    ("wait share, epoch 2 (warm shard cache), %", "warm_wait_share", 2),
    ("samples/s, epoch 1, shards", "cold_samples_per_second", 1),
    ("samples/s, epoch 2, shards", "warm_samples_per_second", 1),
    ("samples/s, epoch 1, in-memory anchor", "anchor_cold_samples_per_second", 1),
    ("samples/s, epoch 2, in-memory anchor", "anchor_warm_samples_per_second", 1),
    ("throughput shards / anchor, epoch 1", "cold_vs_anchor", 3),
    ("throughput shards / anchor, epoch 2", "warm_vs_anchor", 3),
    ("samples/s, source alone (warm cache, no training)", "source_samples_per_second", 0),
    ("samples/s, source alone, baseline revision", "baseline_source_samples_per_second", 0),
]
threads = sorted({int(k[len("source_t"):].split("_")[0]) for k in figures if k.startswith("source_t")})
for t in threads:
    rows.append((f"samples/s, source alone, {t} loader thread(s)", f"source_t{t}_samples_per_second", 0))
for t in threads[1:]:
    rows.append((f"speed-up of {t} loader threads over {threads[0]}", f"source_t{t}_speedup", 2))
if "baseline_source_samples_per_second" in figures and "source_samples_per_second" in figures:
    # Measured the same way in both: one pass of the trained source over the warm cache.
    figures["vs_baseline"] = [
        a / b for a, b in zip(figures["source_samples_per_second"], figures["baseline_source_samples_per_second"])
    ]
    rows.append(("source alone / baseline revision's, measured alike", "vs_baseline", 2))
print()
print(f"data path, {runs} runs: median (min–max)")
print("| figure | median | min | max |")
print("| --- | --- | --- | --- |")
for name, key, digits in rows:
    xs = figures.get(key)
    if xs:
        f = lambda x: f"{x:.{digits}f}"
        print(f"| {name} | {f(statistics.median(xs))} | {f(min(xs))} | {f(max(xs))} |")
PY
