#!/usr/bin/env bash
# Checks the worker on a host with one NVIDIA GPU and PyTorch 2.11 installed system-wide, in a few
# minutes and without a Rust toolchain there:
#   (a) emotion-bench training throughput on CUDA (samples/s),
#   (b) the NCCL tests that need a GPU (world size 1, and a peer that never joins timing out),
#   (c) the time of one NCCL all-reduce of 64 MiB at world size 1.
#
# Prepare on the build machine (the binaries link libtorch 2.11 by soname, so the GPU host's own
# PyTorch 2.11 serves them):
#   eval "$(scripts/libtorch.sh)"
#   cargo build --release -p chorus-worker --examples   # target/release/examples/{emotion_bench,nccl_check}
#   cargo test --release -p chorus-worker --no-run      # target/release/deps/chorus_worker-<hash>
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

# Each step has its own limit so that a hang cannot eat the whole budget.
say "(a) emotion-bench training on CUDA"
if out="$(timeout 120 "$emotion_bench" --device cuda --steps 100 --warmup 10 2>&1)"; then
  echo "$out" | grep -v '^samples_per_second='
  echo "emotion-bench CUDA: $(echo "$out" | sed -n 's/^samples_per_second=//p') samples/s"
else
  echo "$out" | tail -20
  failures+=("emotion-bench")
fi

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

say "summary"
if [ ${#failures[@]} -eq 0 ]; then
  echo "all GPU checks passed"
else
  echo "FAILED: ${failures[*]}"
  exit 1
fi
