#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests with the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# libtorch for the worker's built-in trainer, from the PyPI wheels, cached outside the repo.
eval "$(scripts/libtorch.sh)"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# The fuzz targets, a short run each (CHORUS_FUZZ_SECONDS per target, default 60; 0 replays the
# committed seeds and regressions only). A crash fails the test command, but only after the test
# suite has run, so one run reports both.
fuzz_status=0
scripts/fuzz.sh || fuzz_status=$?

# End-to-end tests start the built binaries, so build them first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
if [ "$fuzz_status" -ne 0 ]; then
  echo "test: the fuzz targets failed (see 'fuzz:' above for the reproducers)" >&2
  exit "$fuzz_status"
fi
