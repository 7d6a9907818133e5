#!/usr/bin/env bash
# Checks the worker on a host with NVIDIA GPUs and PyTorch 2.11 installed system-wide, in a few
# minutes and without a Rust toolchain there, and prints every figure it measures:
#   (a) emotion-bench training throughput on CUDA (samples/s) in fp32, bf16 and fp16, and the
#       mixed-precision speed-ups,
#   (b) the NCCL tests that need a GPU (world size 1, and a peer that never joins timing out),
#   (c) the time of one NCCL all-reduce of 64 MiB at world size 1,
#   (d) the worker's CUDA tests: learning and resuming on CUDA, bf16 and fp16 learning on the
#       last GPU by ordinal, an fp16 run resuming exactly (its loss scale in the checkpoint), GPU
#       discovery through the driver and NVML telemetry on the real devices,
#   (e) the data path on CUDA: the trainer's wait share with one loader thread and with the
#       host's spare CPUs, and the source alone with 1 and N loader threads,
#   (f) a real coordinator and worker: GPU telemetry (the worker's Prometheus gauges, the trials'
#       `gpu_util` and `gpu_mem_mb`) and, on a machine with 2 GPUs or more, two builtin trials
#       run at once on one worker, each asserted (nvidia-smi's process list) to be on its own GPU.
#
# Prepare on the build machine (the binaries link libtorch 2.11 by soname, so the GPU host's own
# PyTorch 2.11 serves them):
#   eval "$(scripts/libtorch.sh)"
#   cargo build --release -p chorus-worker --examples   # target/release/examples/{emotion_bench,nccl_check,data_path}
#   cargo test --release -p chorus-worker --no-run      # target/release/deps/chorus_worker-<hash>
#   cargo build --release -p chorus-coordinator -p chorus-worker -p chorus-cli   # for (f)
# The binaries hold line tables (about 140 MB each; 2 to 15 MB after `strip`): strip copies of them
# where the transfer is limited. Carry the repository with those files (or just this script and
# them, in the same layout) to the GPU host and run:
#   scripts/gpu_check.sh [BIN_DIR]
# BIN_DIR (or CHORUS_BIN_DIR) holds examples/ and deps/ as cargo laid them out; the default is
# target/release. CHORUS_TEST_BIN names the test binary if it is elsewhere; PYTHON names the
# interpreter whose PyTorch to use (default python3). Where the binaries are missing and cargo
# exists, they are built here against that PyTorch.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="${1:-${CHORUS_BIN_DIR:-$root/target/release}}"
python="${PYTHON:-python3}"
failures=()

say() { printf '\n== %s\n' "$*"; }

# The PyTorch install provides libtorch (torch/lib) and, in its NVIDIA wheels under
# site-packages/nvidia/*/lib, the CUDA runtime (nvidia/cu13/lib for 2.11) and libnccl.so.2
# (nvidia/nccl/lib). The binaries find all of them through LD_LIBRARY_PATH.
torch_dir="$("$python" -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null)" || {
  echo "gpu_check: $python cannot import torch; install PyTorch 2.11 first" >&2
  exit 2
}
torch_version="$("$python" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null)"
case "$torch_version" in
  2.11.*) ;;
  *) echo "gpu_check: warning: PyTorch $torch_version found; the binaries expect 2.11" >&2 ;;
esac
lib_dirs=("$torch_dir/lib")
while IFS= read -r site; do
  for d in "$site"/nvidia/*/lib; do
    [ -d "$d" ] && lib_dirs+=("$d")
  done
done < <("$python" - "$torch_dir" <<'PY'
import os, site, sys
dirs = [os.path.dirname(sys.argv[1])] + site.getsitepackages() + [site.getusersitepackages()]
seen = set()
for d in dirs:
    d = os.path.realpath(d)
    if d not in seen:
        seen.add(d)
        print(d)
PY
)
LD_LIBRARY_PATH="$(IFS=:; echo "${lib_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

say "host"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "nvidia-smi not found"
echo "PyTorch $torch_version at $torch_dir"
for lib in libtorch_cuda.so libcudart.so.13 libnccl.so.2; do
  found=""
  for d in "${lib_dirs[@]}"; do
    if [ -e "$d/$lib" ]; then found="$d/$lib"; break; fi
  done
  echo "$lib: ${found:-NOT FOUND under torch/lib or site-packages/nvidia/*/lib}"
done

find_test_bin() {
  if [ -n "${CHORUS_TEST_BIN:-}" ]; then
    echo "$CHORUS_TEST_BIN"
    return
  fi
  # The library's and the binary's unit tests share the name chorus_worker-<hash>, and old builds
  # linger: take the newest that holds the NCCL tests.
  local f
  while IFS= read -r f; do
    case "$(basename "$f")" in *.*) continue ;; esac
    [ -f "$f" ] && [ -x "$f" ] || continue
    if "$f" --list 2>/dev/null | grep -q '^collective::nccl::tests::a_world_of_one_reduces_broadcasts_and_meets_on_a_gpu: test'; then
      echo "$f"
      return
    fi
  done < <(ls -t "$bin_dir"/deps/chorus_worker-* 2>/dev/null)
}

emotion_bench="$bin_dir/examples/emotion_bench"
nccl_check="$bin_dir/examples/nccl_check"
test_bin="$(find_test_bin)"
if [ ! -x "$emotion_bench" ] || [ ! -x "$nccl_check" ] || [ -z "$test_bin" ]; then
  if command -v cargo >/dev/null 2>&1; then
    say "building (no prebuilt binaries in $bin_dir)"
    # tch builds against the Python install's libtorch when LIBTORCH is not set.
    [ -n "${LIBTORCH:-}" ] || export LIBTORCH_USE_PYTORCH=1
    (cd "$root" && cargo build --release -p chorus-worker --examples &&
      cargo test --release -p chorus-worker --no-run) || {
      echo "gpu_check: build failed" >&2
      exit 2
    }
    bin_dir="$root/target/release"
    emotion_bench="$bin_dir/examples/emotion_bench"
    nccl_check="$bin_dir/examples/nccl_check"
    test_bin="$(find_test_bin)"
  else
    echo "gpu_check: missing binaries in $bin_dir (emotion_bench, nccl_check, deps/chorus_worker-*) and no cargo to build them; see the top of this script" >&2
    exit 2
  fi
fi

# The GPUs this process may use (CUDA_VISIBLE_DEVICES counts), not all the host has.
gpu_count="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
echo "GPUs: $gpu_count"

# Each step has its own limit so that a hang cannot eat the whole budget.
say "(a) emotion-bench training on CUDA, per precision"
declare -A rate
for precision in fp32 bf16 fp16; do
  if out="$(timeout 120 "$emotion_bench" --device cuda --precision "$precision" --steps 100 --warmup 10 2>&1)"; then
    echo "$out" | grep -v '^samples_per_second='
    rate[$precision]="$(echo "$out" | sed -n 's/^samples_per_second=//p')"
    echo "emotion-bench CUDA $precision: ${rate[$precision]} samples/s"
  else
    echo "$out" | tail -20
    failures+=("emotion-bench $precision")
  fi
done
for precision in bf16 fp16; do
  if [ -n "${rate[fp32]:-}" ] && [ -n "${rate[$precision]:-}" ]; then
    echo "emotion-bench CUDA $precision / fp32: $("$python" -c "print(f'{${rate[$precision]} / ${rate[fp32]}:.2f}')")"
  fi
done

say "(b) NCCL tests at world size 1 ($test_bin)"
if [ -z "$test_bin" ]; then
  echo "no test binary holds the NCCL tests"
  failures+=("nccl tests")
elif timeout 120 "$test_bin" --include-ignored --test-threads=1 --nocapture collective::nccl::tests:: 2>&1; then
  echo "NCCL tests: passed"
else
  echo "NCCL tests: FAILED (status $?)"
  failures+=("nccl tests")
fi

say "(c) NCCL all-reduce, world size 1, 64 MiB"
if ! timeout 60 "$nccl_check" --mib 64 --iters 50 2>&1; then
  failures+=("nccl all-reduce timing")
fi

say "(d) the trainer's CUDA tests"
if [ -n "$test_bin" ]; then
  out="$(timeout 300 "$test_bin" --include-ignored --test-threads=1 cuda gpu:: 2>&1)"
  status=$?
  echo "$out" | grep -E '^test |test result' | tail -15
  [ "$status" -eq 0 ] || failures+=("trainer CUDA tests")
else
  failures+=("trainer CUDA tests")
fi

say "(e) the data path on CUDA"
data_path="$bin_dir/examples/data_path"
spare=$(( $(nproc) - 1 ))
[ "$spare" -ge 1 ] || spare=1
if [ -x "$data_path" ]; then
  for threads in 1 "$spare"; do
    if out="$(timeout 240 "$data_path" --device cuda --samples 20000 --shards 80 --data-threads "$threads" \
      --source-threads "1,$spare" --source-rounds 2 --no-anchor 2>&1)"; then
      echo "$out" | grep -E '^(source alone|shards epoch|dataset)'
      echo "data path, $threads loader thread(s): wait share epoch 1 $(echo "$out" | sed -n 's/^cold_wait_share=//p') %, epoch 2 $(echo "$out" | sed -n 's/^warm_wait_share=//p') % (target <= 5 %)"
    else
      echo "$out" | tail -20
      failures+=("data path ($threads threads)")
    fi
  done
else
  echo "no data_path example in $bin_dir/examples"
  failures+=("data path")
fi

say "(f) trials on the worker's GPUs: placement and telemetry"
coordinator="$bin_dir/chorus-coordinator"
worker="$bin_dir/chorus-worker"
cli="$bin_dir/chorus"
if [ ! -x "$coordinator" ] || [ ! -x "$worker" ] || [ ! -x "$cli" ]; then
  echo "chorus-coordinator, chorus-worker or chorus missing in $bin_dir: skipped"
  failures+=("cluster check (binaries missing)")
else
  if ! PYTHON="$python" GPU_TRIALS_SECONDS=240 timeout --kill-after=10 300 "$root/scripts/gpu_trials.sh" "$bin_dir" "$gpu_count"; then
    failures+=("trials on GPUs")
  fi
fi

say "summary"
if [ ${#failures[@]} -eq 0 ]; then
  echo "all GPU checks passed"
else
  echo "FAILED: ${failures[*]}"
  exit 1
fi
