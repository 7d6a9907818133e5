#!/usr/bin/env bash
# Search quality at equal compute against Optuna: see bench/search_regret.py. Builds the binaries,
# makes sure the bench venv has optuna==5.0.0, and runs SEEDS seeds (default 10) per objective with
# a budget of BUDGET epochs (default 400).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-10}"
budget="${2:-400}"
eval "$(scripts/libtorch.sh)"
cache="${CHORUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus}"
venv="${CHORUS_BENCH_VENV:-$cache/bench-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c 'import optuna, sys; sys.exit(optuna.__version__ != "5.0.0")' 2>/dev/null; then
  "$venv/bin/pip" install --quiet optuna==5.0.0
fi
cargo build --quiet --workspace --bins
"$venv/bin/python" bench/search_regret.py --seeds "$seeds" --budget "$budget" --bin target/debug
