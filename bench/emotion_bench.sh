#!/usr/bin/env bash
# emotion-bench training throughput: the built-in trainer (release build) against the same model in
# PyTorch eager, on this machine in the same run. Runs each RUNS times (default 5), interleaved so
# drift in the machine's speed hits all alike, and prints median, min and max samples/s of each and
# the ratios of the medians. Two PyTorch anchors: its default NCHW layout (plain eager, the anchor
# of docs/BENCHMARKS.md), and channels-last for the image branch, the layout the built-in trainer
# uses, so the ratio to it isolates what is left once the layouts agree.
#
# Usage: bench/emotion_bench.sh [RUNS] [STEPS]
# PyTorch comes from a bench-only venv outside the repo ($CHORUS_BENCH_VENV, default
# ~/.cache/chorus/bench-venv) with torch==2.11.0 from PyPI, made on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
steps="${2:-20}"
threads="${BENCH_THREADS:-1}"

eval "$(scripts/libtorch.sh)"
. bench/venv.sh
bench_torch

cargo build --release --quiet -p chorus-worker --example emotion_bench
rust_bin=target/release/examples/emotion_bench

figure() { sed -n 's/^samples_per_second=//p'; }
rust=()
torch=()
torch_cl=()
py() { PYTHONWARNINGS=ignore "$venv/bin/python" bench/emotion_bench.py --steps "$steps" --threads "$threads" "$@"; }
for i in $(seq 1 "$runs"); do
  rust+=("$("$rust_bin" --steps "$steps" --threads "$threads" | tee /dev/stderr | figure)")
  torch+=("$(py | tee /dev/stderr | figure)")
  torch_cl+=("$(py --channels-last | tee /dev/stderr | figure)")
done

python3 - "$threads" "$steps" "${rust[*]}" "${torch[*]}" "${torch_cl[*]}" <<'PY'
import statistics, sys
threads, steps = sys.argv[1], sys.argv[2]
rust, torch, torch_cl = ([float(x) for x in a.split()] for a in sys.argv[3:6])
med = statistics.median
print()
print(f"emotion-bench, batch 64, {threads} intra-op thread(s), {steps} timed steps after 3 warm-up, {len(rust)} runs each")
print("| | median samples/s | min | max |")
print("| --- | --- | --- | --- |")
for name, xs in [("Chorus (tch)", rust), ("PyTorch eager", torch), ("PyTorch eager, channels-last", torch_cl)]:
    print(f"| {name} | {med(xs):.1f} | {min(xs):.1f} | {max(xs):.1f} |")
print(f"ratio Chorus / PyTorch eager (medians): {med(rust) / med(torch):.3f}")
print(f"ratio Chorus / PyTorch eager channels-last (medians): {med(rust) / med(torch_cl):.3f}")
PY
