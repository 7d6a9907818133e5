#!/usr/bin/env bash
# Search quality at equal compute against Optuna: see bench/search_regret.py. Builds the binaries,
# makes sure the bench venv has optuna==5.0.0, and runs SEEDS seeds (default 10) per objective with
# a budget of BUDGET epochs (default 400) and PARALLEL trials in flight (default 4) for both.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-10}"
budget="${2:-400}"
parallel="${3:-4}"
eval "$(scripts/libtorch.sh)"
. bench/venv.sh
bench_optuna
cargo build --quiet --workspace --bins
"$venv/bin/python" bench/search_regret.py --seeds "$seeds" --budget "$budget" --parallel "$parallel" --bin target/debug
