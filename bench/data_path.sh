#!/usr/bin/env bash
# The data path on synthetic shards: the share of the training thread's time spent waiting for
# data, for a first epoch with a cold shard cache and a second with a warm one, and the same
# training on batches held in memory as the anchor. Builds worker/examples/data_path.rs in release,
# runs it RUNS times (default 5), and prints median, min and max of each figure.
#
# Usage: bench/data_path.sh [RUNS] [-- EXAMPLE ARGS...]   e.g. bench/data_path.sh 5 -- --device cuda
# DATA_PATH_BIN=path runs a binary built elsewhere instead of building here (LD_LIBRARY_PATH must
# then reach libtorch, e.g. a PyTorch 2.11 install's torch/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
shift || true
[ "${1:-}" = "--" ] && shift

if [ -z "${DATA_PATH_BIN:-}" ]; then
  eval "$(scripts/libtorch.sh)"
  cargo build --release --quiet -p chorus-worker --example data_path
fi
bin="${DATA_PATH_BIN:-target/release/examples/data_path}"

out=""
for i in $(seq 1 "$runs"); do
  echo "run $i of $runs" >&2
  # Not `tee /dev/stderr`: where stderr is a file, reopening it truncates what earlier runs wrote.
  run="$("$bin" "$@")"
  printf '%s\n' "$run" >&2
  out+="$(grep -E '^[a-z_]+=' <<<"$run")"$'\n'
done

python3 - "$runs" <<PY
import statistics, sys
runs = sys.argv[1]
figures = {}
for line in """$out""".split():
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
]
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
