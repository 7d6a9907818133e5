#!/usr/bin/env bash
# Installs what building and testing Chorus needs beyond the Rust toolchain, once per machine.
# Every install is pinned; a tool already present at the pinned version is left alone.
set -euo pipefail

S3S_FS_VERSION=0.14.1
NEXTEST_VERSION=0.9.143
CARGO_FUZZ_VERSION=0.13.2
# debootstrap makes the containers' base image (scripts/images.sh); bookworm's own release.
DEBOOTSTRAP_VERSION=1.0.128+nmu2+deb12u2

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$cargo_bin:$PATH"

# The real S3 server the object-storage tests run against, on loopback.
if ! s3s-fs --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
  echo "setup: installing s3s-fs $S3S_FS_VERSION" >&2
  cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest $NEXTEST_VERSION" >&2
  cargo install cargo-nextest --version "$NEXTEST_VERSION" --locked
fi

# The fuzz targets under fuzz/ (scripts/fuzz.sh); libFuzzer itself comes with the fuzz crate.
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "setup: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# Only where Docker runs: scripts/images.sh builds the base image of the containers with it.
if command -v docker >/dev/null 2>&1 && ! command -v debootstrap >/dev/null 2>&1; then
  echo "setup: installing debootstrap $DEBOOTSTRAP_VERSION" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "debootstrap=$DEBOOTSTRAP_VERSION" debian-archive-keyring >&2
fi
