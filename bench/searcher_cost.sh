#!/usr/bin/env bash
# Searcher cost per suggestion after 1,000 and 5,000 completed trials: Chorus's TPE
# (search/examples/searcher_cost.rs, release build) against Optuna's multivariate TPE sampler
# (bench/searcher_cost.py) on the same six-parameter space, on this machine in the same run.
# Each figure is the median over SUGGESTIONS timed suggestions; the whole is run RUNS times
# (default 5), interleaved, and the medians of the runs are printed with min and max.
#
# Usage: bench/searcher_cost.sh [RUNS] [SUGGESTIONS]
# Optuna comes from the bench-only venv that bench/emotion_bench.sh makes (optuna==5.0.0 is
# added to it on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
suggestions="${2:-20}"
. bench/venv.sh
bench_optuna
cargo build --release --quiet -p chorus-search --example searcher_cost
figure() { sed -n 's/^ms_per_suggestion=//p'; }
declare -A got
for i in $(seq 1 "$runs"); do
  for n in 1000 5000; do
    got[chorus$n]+=" $(target/release/examples/searcher_cost --history "$n" --suggestions "$suggestions" | figure)"
    got[optuna$n]+=" $("$venv/bin/python" bench/searcher_cost.py --history "$n" --suggestions "$suggestions" | figure)"
  done
done
python3 - "${got[chorus1000]}" "${got[optuna1000]}" "${got[chorus5000]}" "${got[optuna5000]}" <<'PY'
import statistics, sys
c1, o1, c5, o5 = ([float(x) for x in a.split()] for a in sys.argv[1:5])
med = statistics.median
print("| completed trials | Chorus TPE ms/suggestion | Optuna TPE ms/suggestion | Optuna / Chorus |")
print("| --- | --- | --- | --- |")
for n, c, o in [(1000, c1, o1), (5000, c5, o5)]:
    print(f"| {n} | {med(c):.3f} ({min(c):.3f}-{max(c):.3f}) | {med(o):.2f} ({min(o):.2f}-{max(o):.2f}) | {med(o) / med(c):.1f}x |")
PY
