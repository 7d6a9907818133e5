#!/usr/bin/env bash
# Search quality on learning curves that cross: see bench/search_curves.py and bench/curves.py.
# Makes sure the bench venv has optuna==5.0.0, numpy and scikit-learn, trains the curve tables
# once (cached in ~/.cache/chorus/curves, a few minutes), builds the binaries, and runs SEEDS
# seeds (default 5) per problem with a budget of BUDGET full trainings (default 100) and
# PARALLEL trials in flight (default 1) for every method.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-5}"
budget="${2:-100}"
parallel="${3:-1}"
eval "$(scripts/libtorch.sh)"
. bench/venv.sh
bench_optuna
bench_curves
"$venv/bin/python" bench/curves.py generate
cargo build --quiet --workspace --bins
"$venv/bin/python" bench/search_curves.py --seeds "$seeds" --budget "$budget" --parallel "$parallel" --bin target/debug
