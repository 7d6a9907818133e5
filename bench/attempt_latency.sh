#!/usr/bin/env bash
# Per-attempt latency of one worker slot: a coordinator and one 1-slot worker (release build)
# run 20 trials of `sleep 0.2` one at a time; prints the median time from the worker's
# "starting attempt" to its "attempt ended", and from one attempt's end to the next start.
#
# Usage: bench/attempt_latency.sh [BIN_DIR]   (default target/release)
#        CHORUS_WORKER_CONTAINMENT=process bench/attempt_latency.sh   (the fallback containment)
set -euo pipefail
BIN=${1:-"$(cd "$(dirname "$0")/.." && pwd)/target/release"}
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
RUST_LOG=info "$BIN/chorus-coordinator" --listen 127.0.0.1:0 --data-dir "$D/c" >"$D/c.out" 2>"$D/c.log" &
for _ in $(seq 100); do grep -q "listening on" "$D/c.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(grep -oP "listening on \K\S+" "$D/c.out")
RUST_LOG=info "$BIN/chorus-worker" --coordinator "http://$ADDR" --worker-id w0 --slots 1 --gpus 0 \
  --data-dir "$D/w" >"$D/w.log" 2>&1 &
sleep 1
cat >"$D/s.yaml" <<'Y'
name: latency
metric: {name: loss, goal: minimize}
parameters:
  x: {min: 0.0, max: 1.0}
searcher: {name: random, seed: 1}
max_trials: 20
parallel_trials: 1
trial:
  command: [sh, -c, 'sleep 0.2; echo "chorus:metric {\"loss\": 1}"']
Y
CHORUS_COORDINATOR="http://$ADDR" "$BIN/chorus" experiment submit "$D/s.yaml" --wait >/dev/null 2>&1
python3 - "$D/w.log" <<'P'
import datetime, re, statistics, sys
ts = lambda l: datetime.datetime.fromisoformat(l.split()[0].replace("Z", "+00:00")).timestamp()
starts, ends = [], []
for l in open(sys.argv[1]):
    l = re.sub(r"\x1b\[[0-9;]*m", "", l)
    if "starting attempt" in l:
        starts.append(ts(l))
    if "attempt ended" in l:
        ends.append(ts(l))
run = [(e - s) * 1000 for s, e in zip(starts, ends)]
gap = [(s - e) * 1000 for e, s in zip(ends, starts[1:])]
print("attempt ms median %.1f  between attempts ms median %.1f" % (statistics.median(run), statistics.median(gap)))
P
