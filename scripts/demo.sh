#!/usr/bin/env bash
# The main job on embedded defaults: a local coordinator and two workers on file storage run a
# random-search sweep of a small command trial, then print the comparison of its trials.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# libtorch for the worker's built-in trainer, from the PyPI wheels, cached outside the repo.
eval "$(scripts/libtorch.sh)"
cargo build --workspace --bins
bin=target/debug

spec="${1:-configs/examples/random-sweep.yaml}"
data=$(mktemp -d "${TMPDIR:-/tmp}/chorus-demo.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$bin/chorus-coordinator" --listen 127.0.0.1:0 --data-dir "$data/coordinator" \
  > "$data/coordinator.out" 2> "$data/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q "listening on" "$data/coordinator.out" 2>/dev/null && break
  sleep 0.1
done
addr=$(sed -n 's/.*listening on //p' "$data/coordinator.out")
[ -n "$addr" ] || { echo "coordinator did not start; see $data/coordinator.log" >&2; exit 1; }
export CHORUS_COORDINATOR="http://$addr"
echo "coordinator on $CHORUS_COORDINATOR, records in $data"

for i in 1 2; do
  "$bin/chorus-worker" --coordinator "$CHORUS_COORDINATOR" --worker-id "demo-worker-$i" --slots 2 \
    --data-dir "$data/worker-$i" 2> "$data/worker-$i.log" &
  pids+=($!)
done

exp=$("$bin/chorus" experiment submit "$spec")
"$bin/chorus" experiment watch "$exp"
echo
"$bin/chorus" compare "$exp"

# CHORUS_DEMO_PICTURES=DIR also draws the sweep's pictures there (scripts/pictures.sh uses it for
# the README's).
if [ -n "${CHORUS_DEMO_PICTURES:-}" ]; then
  mkdir -p "$CHORUS_DEMO_PICTURES"
  metric=$("$bin/chorus" experiment describe "$exp" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["experiment"]["metric"])')
  "$bin/chorus" plot curves "$exp" --metric "$metric" --out "$CHORUS_DEMO_PICTURES/curves.png"
  "$bin/chorus" plot parallel "$exp" --out "$CHORUS_DEMO_PICTURES/parallel.png"
  "$bin/chorus" plot importance "$exp" --out "$CHORUS_DEMO_PICTURES/importance.png"
fi
