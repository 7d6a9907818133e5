#!/usr/bin/env bash
# Builds the Chorus container images offline, from binaries built on this host:
#
#   chorus/base:bookworm        Debian bookworm (debootstrap minbase) + ca-certificates, tini,
#                               procps, python3; made once and cached outside the repository
#   chorus/coordinator:TAG      chorus-coordinator + the chorus CLI
#   chorus/worker:TAG           chorus-worker + the chorus CLI + the libtorch CPU libraries it loads
#   chorus/worker-cuda:TAG      chorus/worker + libtorch's CUDA half, the CUDA runtime, cuDNN and
#                               NCCL from their PyPI wheels (only with --cuda)
#
# Use: scripts/images.sh [--profile release|debug] [--tag TAG] [--cuda] [--base-only]
#   --profile    cargo profile of the binaries (default release, staged without line tables;
#                debug reuses target/debug as built)
#   --tag        image tag (default: the workspace version in Cargo.toml)
#   --cuda       also build chorus/worker-cuda:TAG (downloads about 2 GB of wheels once)
#   --base-only  make and import chorus/base only (no cargo build)
#
# No registry is needed or contacted: the base comes from a Debian mirror (CHORUS_DEBIAN_MIRROR,
# default http://deb.debian.org/debian; CHORUS_DEBIAN_SNAPSHOT=YYYYMMDDTHHMMSSZ pins it to
# snapshot.debian.org instead), the binaries from cargo, libtorch from scripts/libtorch.sh's cache.
# Runs are idempotent and quick when nothing changed (docker's layer cache), and safe to start
# concurrently: they take turns on a lock in the cache directory.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

profile=release
tag=""
cuda=false
base_only=false
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs release or debug}"; shift 2 ;;
    --profile=*) profile="${1#*=}"; shift ;;
    --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
    --tag=*) tag="${1#*=}"; shift ;;
    --cuda) cuda=true; shift ;;
    --base-only) base_only=true; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "images: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release | debug) ;;
  *) echo "images: --profile must be release or debug, not $profile" >&2; exit 2 ;;
esac
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
tag="${tag:-$version}"

started=$SECONDS
say() { printf 'images: %s\n' "$*" >&2; }

command -v docker >/dev/null || { say "docker is not installed"; exit 1; }
docker info >/dev/null 2>&1 || { say "the docker daemon does not answer (docker info)"; exit 1; }

cache="${CHORUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus}"
images_cache="$cache/images"
mkdir -p "$images_cache"
# One base and one set of image builds at a time per cache: tests may call this from several
# processes at once, and two debootstraps or two `docker build`s of the same tag would only race.
# The CUDA libraries for --cuda: the wheels PyTorch 2.11 (cu13) itself requires, at its pins (the
# CUDA 13 toolkit libraries, cuDNN, cuSPARSELt, NCCL, NVSHMEM), downloaded and unpacked once into
# the cache, under their own lock: a download of several GB must not hold up other image builds.
cuda_reqs=(
  "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2"
  "nvidia-cudnn-cu13==9.19.0.56" "nvidia-cusparselt-cu13==0.8.0"
  "nvidia-nccl-cu13==2.28.9" "nvidia-nvshmem-cu13==3.4.5"
)
cuda_libs="$cache/cuda-libs-$(printf '%s\n' "${cuda_reqs[@]}" | sha256sum | cut -c1-16)"
if $cuda && [ ! -f "$cuda_libs/.complete" ]; then
  exec 8>"$cache/cuda-libs.lock"
  flock 8
  if [ ! -f "$cuda_libs/.complete" ]; then
    wheels="$cache/wheels-cuda"
    mkdir -p "$wheels"
    say "pip download ${cuda_reqs[*]} (several GB, once)"
    # For this host's platform, which is the image's: Debian bookworm, x86_64.
    python3 -m pip download --quiet --only-binary=:all: -d "$wheels" "${cuda_reqs[@]}" >&2
    rm -rf "$cuda_libs.partial"
    mkdir -p "$cuda_libs.partial"
    python3 - "$wheels" "$cuda_libs.partial" >&2 <<'PY'
import glob, os, shutil, sys, zipfile
wheels, out = sys.argv[1:]
for whl in sorted(glob.glob(os.path.join(wheels, "nvidia_*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if "/lib/" in name and ".so" in base:
                with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                    shutil.copyfileobj(src, dst)
PY
    touch "$cuda_libs.partial/.complete"
    rm -rf "$cuda_libs"
    mv "$cuda_libs.partial" "$cuda_libs"
  fi
  flock -u 8
fi

exec 9>"$images_cache/lock"
lock() {
  if ! flock -n 9; then
    say "waiting for another images.sh run (lock $images_cache/lock)"
    flock 9
  fi
}
# Held while the base is made and while images are built, not during cargo's build (cargo locks
# its own target directory): a long release build must not hold up other worktrees' images.
lock

# The Docker Engine here has no BuildKit client (no buildx); the classic builder is what works on
# every engine this script meets, and its cache keys COPY layers on file contents.
export DOCKER_BUILDKIT=0

# --- base image ----------------------------------------------------------------------------------
base_release=bookworm
base_image="chorus/base:$base_release"
# tini reaps orphans as PID 1; python3 runs command trials; procps gives `ps` to whoever debugs.
# libgomp1 is not here: libtorch's own copy (from the torch wheel) ships with the worker.
base_packages="ca-certificates,tini,procps,python3"
mirror="${CHORUS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${CHORUS_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
if [ -n "${CHORUS_DEBIAN_SNAPSHOT:-}" ]; then
  mirror="http://snapshot.debian.org/archive/debian/$CHORUS_DEBIAN_SNAPSHOT"
  security_mirror="http://snapshot.debian.org/archive/debian-security/$CHORUS_DEBIAN_SNAPSHOT"
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
# The cache key names everything the tarball depends on; bump the recipe number when the steps
# below change.
base_key="$(printf '%s\n' "recipe 1" "$base_release" "$base_packages" "${CHORUS_DEBIAN_SNAPSHOT:-}" |
  sha256sum | cut -c1-16)"
base_tar="$images_cache/base-$base_release-$base_key.tar"

make_base_tarball() {
  command -v debootstrap >/dev/null || { say "debootstrap is missing (scripts/setup.sh installs it)"; exit 1; }
  [ -f "$keyring" ] || { say "$keyring is missing (package debian-archive-keyring)"; exit 1; }
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  local rootfs="$images_cache/rootfs.partial.$$"
  $sudo rm -rf "$rootfs"
  # shellcheck disable=SC2064 # expand now: the trap must name this rootfs
  trap "$sudo umount '$rootfs/proc' 2>/dev/null || true; $sudo rm -rf '$rootfs' '$base_tar.partial'" EXIT
  say "debootstrap $base_release ($mirror) with $base_packages"
  $sudo debootstrap --variant=minbase --keyring="$keyring" --include="$base_packages" \
    "$base_release" "$rootfs" "$mirror" >&2
  # Security and point-release fixes published since the release, from the same pinned suites.
  $sudo tee "$rootfs/etc/apt/sources.list" >/dev/null <<EOF
deb $mirror $base_release main
deb $mirror $base_release-updates main
deb $security_mirror $base_release-security main
EOF
  $sudo mount -t proc proc "$rootfs/proc"
  $sudo chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get -qq update >&2
  $sudo chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get -qq -y upgrade >&2
  # shellcheck disable=SC2016 # dpkg-query's own format, not the shell's
  $sudo chroot "$rootfs" dpkg-query -W -f '${Package} ${Version}\n' >"$base_tar.packages"
  $sudo chroot "$rootfs" apt-get clean
  $sudo umount "$rootfs/proc"
  # What a container never reads: package lists, caches, manuals, translations. The copyright
  # files stay (they are the packages' licences).
  $sudo rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/usr/share/man "$rootfs"/usr/share/info "$rootfs"/usr/share/locale \
    "$rootfs"/usr/share/lintian "$rootfs"/tmp/* "$rootfs"/root/.bash_history
  $sudo find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  $sudo find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  # The container runtime provides these per container.
  $sudo truncate -s 0 "$rootfs/etc/machine-id"
  $sudo rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"
  $sudo tar --numeric-owner --xattrs -C "$rootfs" -cf "$base_tar.partial" .
  $sudo chown "$(id -u):$(id -g)" "$base_tar.partial"
  mv "$base_tar.partial" "$base_tar"
  $sudo rm -rf "$rootfs"
  trap - EXIT
  say "base tarball: $base_tar ($(du -h "$base_tar" | cut -f1))"
}

if [ ! -f "$base_tar" ]; then
  make_base_tarball
fi
if [ "$(docker image inspect -f '{{ index .Config.Labels "dev.chorus.base.key" }}' "$base_image" 2>/dev/null)" != "$base_key" ]; then
  say "importing $base_tar as $base_image"
  docker import \
    --change "LABEL dev.chorus.base.key=$base_key" \
    --change "LABEL org.opencontainers.image.title=chorus-base" \
    --change "LABEL org.opencontainers.image.description=\"Debian $base_release minbase with $base_packages\"" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'CMD ["/bin/bash"]' \
    "$base_tar" "$base_image" >/dev/null
fi

if $base_only; then
  say "done in $((SECONDS - started))s"
  exit 0
fi
flock -u 9

# --- binaries --------------------------------------------------------------------------------------
eval "$(scripts/libtorch.sh)"
cargo_flags=(-p chorus-coordinator -p chorus-cli -p chorus-worker --bins)
[ "$profile" = release ] && cargo_flags+=(--release)
say "cargo build ${cargo_flags[*]}"
cargo build --quiet "${cargo_flags[@]}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin_dir="$target_dir/$profile"
lock

# The build contexts live under target/ (never the repository root, which would send gigabytes to
# the daemon) and are rebuilt from scratch each run; docker keys its cache on file contents, so
# fresh copies of unchanged files are still cache hits. Hard links keep the copies free.
contexts="$target_dir/images/$profile"
place() { # place SRC DEST: a link (or copy) of SRC at DEST
  mkdir -p "$(dirname "$2")"
  ln -f "$1" "$2" 2>/dev/null || cp -f "$1" "$2"
}
fresh_context() { # fresh_context NAME DOCKERFILE: an empty context holding the Dockerfile
  local dir="$contexts/$1"
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "deploy/docker/$2" "$dir/Dockerfile"
  printf '%s' "$dir"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
# stage_binary NAME DEST: the built binary NAME at DEST. Release images carry it without its line
# tables (objcopy --strip-debug keeps the symbols, so backtraces still name functions), a fraction
# of the size; debug images keep everything. Stripped copies are kept by content, so an unchanged
# binary gives the same file and a cache hit.
stage_binary() {
  local src="$bin_dir/$1"
  if [ "$profile" = release ] && command -v objcopy >/dev/null; then
    local stripped
    stripped="$contexts/stripped/$1-$(sha "$src")"
    if [ ! -f "$stripped" ]; then
      mkdir -p "$contexts/stripped"
      rm -f "$contexts/stripped/$1-"*
      objcopy --strip-debug "$src" "$stripped.partial"
      mv "$stripped.partial" "$stripped"
    fi
    place "$stripped" "$2"
  else
    place "$src" "$2"
  fi
}

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$revision" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
  revision="$revision-dirty"
fi
common_args=(
  --build-arg "BASE_IMAGE=$base_image"
  --build-arg "VERSION=$version"
  --build-arg "REVISION=$revision"
)

# build IMAGE CONTEXT [docker build args...]: builds, and smoke-tests an image that changed.
build() {
  local image="$1" dir="$2"
  shift 2
  local before after
  before="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
  say "docker build $image"
  # Quiet, and the classic builder's deprecation notice dropped: only a failure's output shows.
  local out
  if ! out="$(docker build --quiet "${common_args[@]}" --build-arg "IMAGE=$image" "$@" -t "$image" "$dir" 2>&1 >/dev/null)"; then
    printf '%s\n' "$out" >&2
    say "docker build of $image failed"
    exit 1
  fi
  after="$(docker image inspect -f '{{.Id}}' "$image")"
  if [ "$before" != "$after" ]; then
    # Every shared library the binaries need resolves inside the image, and they start.
    docker run --rm --entrypoint /bin/sh "$image" -c '
      set -e
      for b in /opt/chorus/bin/*; do
        if ldd "$b" | grep "not found"; then echo "$b: missing libraries" >&2; exit 1; fi
        "$b" --version >/dev/null
      done' >&2 || { say "$image does not run its binaries"; exit 1; }
    # What the tag named before, now untagged (kept while another tag or a container uses it).
    if [ -n "$before" ]; then docker image rm "$before" >/dev/null 2>&1 || true; fi
  fi
  # The classic builder keeps each assembling stage as an untagged image, the next build's cache:
  # keep this tag's newest and drop those older binaries left behind, or every rebuild of the
  # worker would leave hundreds of MB on the disk.
  docker images --quiet --filter dangling=true --filter "label=dev.chorus.assemble=$image" |
    tail -n +2 | xargs -r docker image rm >/dev/null 2>&1 || true
}

# --- coordinator -------------------------------------------------------------------------------------
ctx="$(fresh_context coordinator coordinator.Dockerfile)"
stage_binary chorus-coordinator "$ctx/bin/chorus-coordinator"
stage_binary chorus "$ctx/bin/chorus"
build "chorus/coordinator:$tag" "$ctx" \
  --build-arg "COORDINATOR_SHA256=$(sha "$ctx/bin/chorus-coordinator")" \
  --build-arg "CLI_SHA256=$(sha "$ctx/bin/chorus")"

# --- worker ------------------------------------------------------------------------------------------
ctx="$(fresh_context worker worker.Dockerfile)"
stage_binary chorus-worker "$ctx/bin/chorus-worker"
stage_binary chorus "$ctx/bin/chorus"
# Only the libtorch libraries the binary loads (ldd: the transitive closure), never the headers
# or the CUDA half; the system ones (libc, libstdc++) come from the base.
libs="$(ldd "$bin_dir/chorus-worker" | awk -v dir="$LIBTORCH/lib/" 'index($3, dir) == 1 { print $3 }')"
[ -n "$libs" ] || { say "ldd finds no libtorch library in chorus-worker (LIBTORCH=$LIBTORCH)"; exit 1; }
for lib in $libs; do
  place "$lib" "$ctx/lib/$(basename "$lib")"
done
build "chorus/worker:$tag" "$ctx" \
  --build-arg "WORKER_SHA256=$(sha "$ctx/bin/chorus-worker")" \
  --build-arg "CLI_SHA256=$(sha "$ctx/bin/chorus")" \
  --build-arg "TORCH_VERSION=$(basename "$LIBTORCH" | sed 's/^libtorch-//')"

# --- worker-cuda (opt-in) ------------------------------------------------------------------------------
built=("chorus/coordinator:$tag" "chorus/worker:$tag")
if $cuda; then
  ctx="$(fresh_context worker-cuda worker-cuda.Dockerfile)"
  for lib in "$cuda_libs"/*; do
    place "$lib" "$ctx/lib/$(basename "$lib")"
  done
  # libtorch's CUDA half, which the worker loads at start on a GPU, and what it needs beside.
  for lib in libtorch_cuda.so libc10_cuda.so libtorch_cuda_linalg.so libcaffe2_nvrtc.so libtorch_nvshmem.so; do
    if [ -f "$LIBTORCH/lib/$lib" ]; then place "$LIBTORCH/lib/$lib" "$ctx/lib/$lib"; fi
  done
  build "chorus/worker-cuda:$tag" "$ctx" --build-arg "WORKER_IMAGE=chorus/worker:$tag"
  # Everything libtorch_cuda.so needs resolves in the image, but the driver's libcuda.so.1,
  # which the NVIDIA runtime mounts from the host.
  docker run --rm --entrypoint /bin/sh "chorus/worker-cuda:$tag" -c '
    missing="$(ldd /opt/chorus/lib/libtorch_cuda.so | grep "not found" | grep -v "libcuda.so.1" || true)"
    if [ -n "$missing" ]; then echo "$missing" >&2; exit 1; fi' >&2 ||
    { say "chorus/worker-cuda:$tag lacks libraries libtorch_cuda.so needs"; exit 1; }
  built+=("chorus/worker-cuda:$tag")
fi

for image in "${built[@]}"; do
  size="$(docker image inspect -f '{{.Size}}' "$image")"
  printf 'images: %-32s %6d MB\n' "$image" "$((size / 1000000))" >&2
done
say "done in $((SECONDS - started))s"
