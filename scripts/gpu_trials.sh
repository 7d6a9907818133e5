#!/usr/bin/env bash
# Builtin trials on a worker's GPUs, through a real coordinator, worker and CLI (part (f) of
# scripts/gpu_check.sh): one worker offered min(GPUS, 2) GPUs runs that many trials at once, one
# GPU each. Checks, and prints:
#   - on 2 GPUs, that the two trials ran at the same time on two different GPUs: each trial's
#     log names the CUDA device its trainer ran on, and they differ; nvidia-smi's list of
#     compute processes, where it shows the worker's (not inside every container), agrees;
#   - the worker's Prometheus gauges of its GPUs (utilisation, memory);
#   - every trial's `gpu_util` and `gpu_mem_mb` reports, and its validation accuracy.
#
# Usage: scripts/gpu_trials.sh BIN_DIR [GPUS]
#   BIN_DIR holds chorus-coordinator, chorus-worker and chorus (release builds); LD_LIBRARY_PATH
#   must reach libtorch and the CUDA libraries (scripts/gpu_check.sh sets it).
set -uo pipefail

bin_dir="${1:?usage: scripts/gpu_trials.sh BIN_DIR [GPUS]}"
# The GPUs this process can use (CUDA_VISIBLE_DEVICES included), as the worker will count them.
gpus="${2:-$("${PYTHON:-python3}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"
# Stay within the caller's limit (scripts/gpu_check.sh gives 300 s).
deadline=$(( $(date +%s) + ${GPU_TRIALS_SECONDS:-240} ))
[ "$gpus" -ge 1 ] || { echo "gpu_trials: no GPU here" >&2; exit 2; }
trials=$(( gpus >= 2 ? 2 : 1 ))

work="$(mktemp -d "${TMPDIR:-/tmp}/chorus-gpu-trials.XXXXXX")"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 1' INT TERM
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$bin_dir/chorus-coordinator" --listen 127.0.0.1:0 --data-dir "$work/coordinator" \
  > "$work/coordinator.out" 2> "$work/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do
  grep -q "listening on" "$work/coordinator.out" 2>/dev/null && break
  sleep 0.1
done
addr="$(sed -n 's/.*listening on //p' "$work/coordinator.out")"
[ -n "$addr" ] || { echo "gpu_trials: the coordinator did not start; see $work/coordinator.log" >&2; exit 1; }
export CHORUS_COORDINATOR="http://$addr"

"$bin_dir/chorus" dataset synth --out "file://$work/data" --samples 6000 --shards 24 --seed 1 > /dev/null || exit 1

metrics_port="$(free_port)"
cpus="$(nproc)"
"$bin_dir/chorus-worker" --coordinator "$CHORUS_COORDINATOR" --worker-id gpu-worker --slots "$cpus" \
  --gpus "$trials" --data-dir "$work/worker" --metrics-listen "127.0.0.1:$metrics_port" \
  --gpu-metrics-interval 1s \
  2> "$work/worker.log" &
worker_pid=$!
pids+=("$worker_pid")

per_trial_cpus=$(( cpus / trials ))
cat > "$work/spec.yaml" <<EOF
name: gpu-trials
metric: {name: val_accuracy, goal: maximize}
parameters:
  precision: {values: [bf16, fp32]}
searcher: {name: grid}
max_trials: $trials
parallel_trials: $trials
resources: {cpus: $per_trial_cpus, gpus: 1}
trial:
  builtin:
    model: {kind: multimodal, augment: gan}
    data: file://$work/data
    epochs: 6
    batch_size: 128
    precision: \${params.precision}
    lr: 0.003
    seed: 1
EOF
exp="$("$bin_dir/chorus" experiment submit "$work/spec.yaml")" || exit 1
echo "experiment $exp: $trials trial(s), one GPU each, on one worker offered $trials GPU(s)"

# While it runs: which GPUs the worker's process computes on, and its gauges.
most=0
gauges=""
state=""
while [ "$(date +%s)" -lt "$deadline" ]; do
  if ! kill -0 "$worker_pid" 2>/dev/null; then
    echo "FAILED: the worker exited; see $work/worker.log" >&2
    exit 1
  fi
  state="$("$bin_dir/chorus" experiment describe "$exp" --output json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["experiment"]["state"])' 2>/dev/null)"
  on="$(nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader 2>/dev/null |
    awk -F', ' -v p="$worker_pid" '$1 == p {print $2}' | sort -u | wc -l)"
  [ "$on" -gt "$most" ] && most="$on"
  if [ -z "$gauges" ]; then
    gauges="$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics', timeout=5).read().decode())" 2>/dev/null |
      grep '^chorus_worker_gpu_' | grep -v '^#')"
  fi
  case "$state" in *COMPLETED*|*completed*|*FAILED*|*failed*|*KILLED*|*killed*) break ;; esac
  sleep 0.5
done

status=0
case "$state" in
  *completed*|*COMPLETED*) ;;
  *) echo "FAILED: the experiment ended $state (or not in time); see $work" >&2; status=1 ;;
esac
echo "nvidia-smi saw the worker's process on $most GPU(s) at once"
if [ -n "$gauges" ]; then
  echo "worker gauges:"
  echo "$gauges" | sed 's/^/  /'
else
  echo "FAILED: the worker's /metrics had no GPU gauges" >&2
  status=1
fi

"$bin_dir/chorus" trial list "$exp" --output json > "$work/trials.json" || exit 1
ids="$(python3 -c 'import json, sys; [print(t["id"]) for t in json.load(open(sys.argv[1]))["trials"]]' "$work/trials.json")"
if [ "$(echo "$ids" | grep -c .)" -ne "$trials" ]; then
  echo "FAILED: $trials trial(s) expected, the experiment has: $ids" >&2
  status=1
fi
devices=""
for trial in $ids; do
  device="$("$bin_dir/chorus" trial logs "$trial" | sed -n 's/.*training on \(Cuda([0-9]*)\).*/\1/p' | head -1)"
  echo "trial $trial trained on ${device:-an unknown device}"
  devices+="${device:-none}"$'\n'
done
if [ "$trials" -eq 2 ] && [ "$(echo "$devices" | grep -v '^none$' | grep . | sort -u | wc -l)" -ne 2 ]; then
  echo "FAILED: two trials with a GPU each did not train on two GPUs" >&2
  status=1
fi
for trial in $ids; do
  line="$("$bin_dir/chorus" trial metrics "$trial" --metric gpu_util --metric gpu_mem_mb --metric val_accuracy --output json |
    python3 -c '
import json, sys
points = json.load(sys.stdin)["points"]
def values(name):
    return [p["values"][name] for p in points if name in p["values"]]
util, mem, acc = values("gpu_util"), values("gpu_mem_mb"), values("val_accuracy")
if not util or not mem:
    print("MISSING gpu_util/gpu_mem_mb"); sys.exit(1)
last = acc[-1] if acc else float("nan")
print(f"gpu_util mean {sum(util) / len(util):.1f} % over {len(util)} reports, gpu_mem_mb max {max(mem):.0f}, "
      f"val_accuracy {last:.3f}")
')" || status=1
  echo "trial $trial: $line"
done
[ "$status" -eq 0 ] || { echo "logs in $work" >&2; trap - EXIT; cleanup; }
exit "$status"
