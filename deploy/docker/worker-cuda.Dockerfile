# chorus/worker-cuda: chorus/worker plus what a GPU worker loads: libtorch's CUDA half and the
# CUDA 13 runtime, cuBLAS, cuDNN, NCCL, ... from the PyPI wheels PyTorch 2.11 pins.
# `scripts/images.sh --cuda` downloads the wheels once and stages their libraries under lib/.
# The driver (libcuda.so) is not here: the NVIDIA container runtime / device plugin mounts the
# host's, which is what NVIDIA_* below asks for.
ARG BASE_IMAGE=chorus/base:bookworm
ARG WORKER_IMAGE=chorus/worker:0.1.0

FROM ${BASE_IMAGE} AS assemble
# Names this stage's image, which the classic builder keeps untagged as the next build's cache,
# so that images.sh can remove the ones older binaries left behind.
ARG IMAGE=chorus/worker-cuda
LABEL dev.chorus.assemble="${IMAGE}"
COPY lib/ /rootfs/opt/chorus/lib/
RUN chmod 0644 /rootfs/opt/chorus/lib/*

FROM ${WORKER_IMAGE}
COPY --from=assemble /rootfs/ /
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

ARG WORKER_IMAGE
ARG VERSION=0.0.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="chorus-worker-cuda" \
      org.opencontainers.image.description="Chorus worker (CUDA 13): builtin trainer on libtorch CUDA, NCCL collectives" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${WORKER_IMAGE}" \
      org.opencontainers.image.revision="${REVISION}"
