# chorus/worker: chorus-worker, the chorus CLI and the libtorch CPU libraries the worker loads,
# on chorus/base (python3 included, for command trials). scripts/images.sh stages bin/ and lib/
# (only the libraries `ldd` names, never the headers).
ARG BASE_IMAGE=chorus/base:bookworm

# Lays out everything the final image adds, as one tree under /rootfs.
FROM ${BASE_IMAGE} AS assemble
# Names this stage's image, which the classic builder keeps untagged as the next build's cache,
# so that images.sh can remove the ones older binaries left behind.
ARG IMAGE=chorus/worker
LABEL dev.chorus.assemble="${IMAGE}"
COPY lib/ /rootfs/opt/chorus/lib/
COPY bin/ /rootfs/opt/chorus/bin/
RUN set -eu; \
    groupadd --gid 10001 chorus; \
    useradd --uid 10001 --gid 10001 --home-dir /var/lib/chorus-worker --no-create-home \
        --shell /usr/sbin/nologin chorus; \
    mkdir -p /rootfs/etc /rootfs/usr/local/bin /rootfs/etc/chorus/tls /rootfs/var/lib/chorus-worker; \
    cp /etc/passwd /etc/group /etc/shadow /etc/gshadow /rootfs/etc/; \
    chmod 0755 /rootfs/opt/chorus/bin/*; \
    chmod 0644 /rootfs/opt/chorus/lib/*; \
    ln -s /opt/chorus/bin/chorus /opt/chorus/bin/chorus-worker /rootfs/usr/local/bin/; \
    chown 10001:10001 /rootfs/var/lib/chorus-worker; \
    chmod 0750 /rootfs/var/lib/chorus-worker

FROM ${BASE_IMAGE}
COPY --from=assemble /rootfs/ /

# The data dir holds attempts' checkpoints and logs until uploaded: an emptyDir on Kubernetes
# (with a read-only root filesystem, mount something writable there and on /tmp).
# The health port serves grpc.health.v1, SERVING while the worker is registered.
ENV CHORUS_WORKER_DATA_DIR=/var/lib/chorus-worker \
    CHORUS_HEALTH_LISTEN=0.0.0.0:7071 \
    LD_LIBRARY_PATH=/opt/chorus/lib \
    HOME=/var/lib/chorus-worker
WORKDIR /var/lib/chorus-worker
USER 10001:10001
EXPOSE 7071

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/chorus/bin/chorus", "health", "--coordinator", "http://127.0.0.1:7071"]

# tini is PID 1: it forwards SIGTERM (the worker drains on it: checkpoints, hands trials back)
# and reaps the orphans command trials leave.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/chorus/bin/chorus-worker"]

# Last, so that a new commit with the same binaries only changes metadata (see coordinator.Dockerfile).
ARG BASE_IMAGE
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG WORKER_SHA256=unknown
ARG CLI_SHA256=unknown
ARG TORCH_VERSION=unknown
LABEL org.opencontainers.image.title="chorus-worker" \
      org.opencontainers.image.description="Chorus worker (CPU): builtin trainer on libtorch and command trials" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/chorus" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      dev.chorus.libtorch.version="${TORCH_VERSION}" \
      dev.chorus.binary.chorus-worker.sha256="${WORKER_SHA256}" \
      dev.chorus.binary.chorus.sha256="${CLI_SHA256}" \
      org.opencontainers.image.revision="${REVISION}"
