#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests with the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# libtorch for the worker's built-in trainer, from the PyPI wheels, cached outside the repo.
eval "$(scripts/libtorch.sh)"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# End-to-end tests start the built binaries, so build them first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
