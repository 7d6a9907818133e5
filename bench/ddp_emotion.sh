#!/usr/bin/env bash
# Data-parallel emotion-bench training throughput: Chorus (ring all-reduce over loopback TCP,
# one process per rank) against PyTorch DDP with gloo (one process per rank), both with batch 64
# per rank and 1 intra-op thread per rank, at 1 and 2 ranks, on this machine in the same run.
# Runs interleaved RUNS times (default 5) and prints medians (min-max), the ratio Chorus / DDP at
# 2 ranks, and each one's scaling efficiency: (2-rank samples/s) / (2 x 1-rank samples/s).
#
# Usage: bench/ddp_emotion.sh [RUNS] [STEPS]
# PyTorch comes from the bench-only venv that bench/emotion_bench.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
steps="${2:-20}"

eval "$(scripts/libtorch.sh)"
. bench/venv.sh
bench_torch

cargo build --release --quiet -p chorus-worker --example emotion_bench_dp
rust_bin=target/release/examples/emotion_bench_dp

figure() { sed -n 's/^samples_per_second=//p'; }
declare -A got
for i in $(seq 1 "$runs"); do
  for w in 1 2; do
    got[chorus$w]+=" $("$rust_bin" --world "$w" --steps "$steps" | tee -a /dev/stderr | figure)"
    got[ddp$w]+=" $(PYTHONWARNINGS=ignore "$venv/bin/python" bench/ddp_emotion.py --world "$w" --steps "$steps" \
      | tee -a /dev/stderr | figure)"
  done
done

python3 - "$steps" "${got[chorus1]}" "${got[chorus2]}" "${got[ddp1]}" "${got[ddp2]}" <<'PY'
import statistics, sys
steps = sys.argv[1]
c1, c2, d1, d2 = ([float(x) for x in a.split()] for a in sys.argv[2:6])
med = statistics.median
print()
print(f"emotion-bench data-parallel, batch 64 per rank, 1 thread per rank, {steps} timed steps, {len(c1)} runs each")
print("| | ranks | median samples/s | min | max |")
print("| --- | --- | --- | --- | --- |")
for name, w, xs in [("Chorus ring", 1, c1), ("Chorus ring", 2, c2), ("PyTorch DDP gloo", 1, d1), ("PyTorch DDP gloo", 2, d2)]:
    print(f"| {name} | {w} | {med(xs):.1f} | {min(xs):.1f} | {max(xs):.1f} |")
print(f"ratio Chorus / DDP at 2 ranks (medians): {med(c2) / med(d2):.3f}")
print(f"scaling efficiency Chorus: {med(c2) / (2 * med(c1)):.3f}, DDP: {med(d2) / (2 * med(d1)):.3f}")
PY
