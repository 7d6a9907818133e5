#!/usr/bin/env bash
# All-reduce bandwidth between two ranks (two processes) on loopback: the Chorus CPU ring
# (worker/examples/allreduce_bench.rs, release build) against torch.distributed's gloo
# (bench/allreduce_gloo.py), with what TCP over loopback itself carries, measured on this machine
# in the same run. Runs each RUNS times (default 5), interleaved so drift in the machine's speed
# hits all alike, and prints per size the median busbw of each with min and max, the ratio of the
# medians Chorus / gloo, and Chorus's busbw over the loopback figures.
#
# busbw follows nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n, in GB/s (10^9 bytes).
# Loopback: one stream alone, and two streams at once in opposite directions (per direction),
# which is what the two ranks' links do during an all-reduce; each moves a 256 MiB buffer into
# another. For reference, also one stream through a 4 MiB buffer that stays in cache.
#
# Usage: bench/allreduce.sh [RUNS]
# PyTorch comes from a bench-only venv outside the repo ($CHORUS_BENCH_VENV, default
# ~/.cache/chorus/bench-venv) with torch==2.11.0 from PyPI, made on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"

eval "$(scripts/libtorch.sh)"
. bench/venv.sh
bench_torch

cargo build --release --quiet -p chorus-worker --example allreduce_bench
bin=target/release/examples/allreduce_bench

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for i in $(seq 1 "$runs"); do
  echo "run $i of $runs" >&2
  "$bin" --mode ring | tee -a "$out/chorus" >&2
  PYTHONWARNINGS=ignore "$venv/bin/python" bench/allreduce_gloo.py 2>/dev/null | tee -a "$out/gloo" >&2
  "$bin" --mode loopback | tee -a "$out/loopback" >&2
done

python3 - "$out" "$runs" <<'PY'
import collections, os, statistics, sys
out, runs = sys.argv[1], sys.argv[2]

def fields(path):
    for line in open(os.path.join(out, path)):
        yield dict(kv.split("=", 1) for kv in line.split() if "=" in kv)

def busbw(path):
    by_size = collections.defaultdict(list)
    for f in fields(path):
        if "size_mib" in f:
            by_size[int(f["size_mib"])].append(float(f["busbw_gbps"]))
    return by_size

chorus, gloo = busbw("chorus"), busbw("gloo")
single = [float(f["loopback_gbps"]) for f in fields("loopback") if "loopback_gbps" in f]
duplex = [float(f["loopback_duplex_gbps"]) for f in fields("loopback") if "loopback_duplex_gbps" in f]
cached = [float(f["loopback_cached_gbps"]) for f in fields("loopback") if "loopback_cached_gbps" in f]
med = statistics.median
span = lambda xs: f"{med(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"

print()
print(f"all-reduce, float32, 2 ranks (processes) on 127.0.0.1, busbw in GB/s: median (min-max) of {runs} runs")
print("| size MiB | Chorus ring | gloo | Chorus / gloo | Chorus / loopback | Chorus / duplex loopback |")
print("| --- | --- | --- | --- | --- | --- |")
for size in sorted(chorus):
    c, g = chorus[size], gloo.get(size, [float("nan")])
    print(f"| {size} | {span(c)} | {span(g)} | {med(c) / med(g):.2f} | {med(c) / med(single):.2f} | {med(c) / med(duplex):.2f} |")
print(f"loopback, one stream: {span(single)} GB/s")
print(f"loopback, two streams in opposite directions, per direction: {span(duplex)} GB/s")
print(f"loopback, one stream through a 4 MiB buffer that stays in cache: {span(cached)} GB/s")
PY
