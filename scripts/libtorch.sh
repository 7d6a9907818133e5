#!/usr/bin/env bash
# Fetches libtorch 2.11.0 from the PyPI wheels (the only place it may come from), unpacks it once
# into a versioned cache outside the repository, and prints the environment that builds and
# runs against it. Use: eval "$(scripts/libtorch.sh)"
#
# The torch wheel holds libtorch's shared libraries and headers; libtorch_cpu.so also needs two
# small CUDA runtime libraries even on CPU, which come from their own NVIDIA wheels.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_RUNTIME_VERSION=13.0.96
CUDA_CUPTI_VERSION=13.0.85

cache="${CHORUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus}"
dest="$cache/libtorch-$TORCH_VERSION"

if [ ! -f "$dest/.complete" ]; then
  wheels="$cache/wheels"
  mkdir -p "$wheels"
  echo "libtorch: fetching torch==$TORCH_VERSION wheels into $wheels" >&2
  python3 -m pip download --quiet --no-deps -d "$wheels" \
    "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDA_RUNTIME_VERSION" "nvidia-cuda-cupti==$CUDA_CUPTI_VERSION" >&2
  tmp="$dest.partial.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/lib"
  python3 - "$wheels" "$tmp" "$TORCH_VERSION" "$CUDA_RUNTIME_VERSION" "$CUDA_CUPTI_VERSION" >&2 <<'PY'
import glob, os, shutil, sys, zipfile
wheels, out, tv, rv, cv = sys.argv[1:]
def one(pattern):
    found = sorted(glob.glob(os.path.join(wheels, pattern)))
    if not found:
        sys.exit(f"libtorch: no wheel matches {pattern} in {wheels}")
    return found[-1]
with zipfile.ZipFile(one(f"torch-{tv}-*.whl")) as z:
    for name in z.namelist():
        if name.startswith(("torch/lib/", "torch/include/")) and not name.endswith("/"):
            target = os.path.join(out, name[len("torch/"):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
for pattern in (f"nvidia_cuda_runtime-{rv}-*.whl", f"nvidia_cuda_cupti-{cv}-*.whl"):
    with zipfile.ZipFile(one(pattern)) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if "/lib/" in name and base.startswith(("libcudart.so", "libcupti.so")):
                with z.open(name) as src, open(os.path.join(out, "lib", base), "wb") as dst:
                    shutil.copyfileobj(src, dst)
PY
  touch "$tmp/.complete"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  echo "libtorch: unpacked into $dest" >&2
fi

echo "export LIBTORCH='$dest'"
echo "export LD_LIBRARY_PATH='$dest/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
