# chorus/coordinator: chorus-coordinator and the chorus CLI on chorus/base (scripts/images.sh
# builds it from host-built binaries staged in the build context: bin/).
ARG BASE_IMAGE=chorus/base:bookworm

# Lays out everything the final image adds, as one tree under /rootfs.
FROM ${BASE_IMAGE} AS assemble
# Names this stage's image, which the classic builder keeps untagged as the next build's cache,
# so that images.sh can remove the ones older binaries left behind.
ARG IMAGE=chorus/coordinator
LABEL dev.chorus.assemble="${IMAGE}"
COPY bin/ /rootfs/opt/chorus/bin/
RUN set -eu; \
    groupadd --gid 10001 chorus; \
    useradd --uid 10001 --gid 10001 --home-dir /var/lib/chorus --no-create-home \
        --shell /usr/sbin/nologin chorus; \
    mkdir -p /rootfs/etc /rootfs/usr/local/bin /rootfs/etc/chorus/tls /rootfs/var/lib/chorus; \
    cp /etc/passwd /etc/group /etc/shadow /etc/gshadow /rootfs/etc/; \
    chmod 0755 /rootfs/opt/chorus/bin/*; \
    ln -s /opt/chorus/bin/chorus /opt/chorus/bin/chorus-coordinator /rootfs/usr/local/bin/; \
    chown 10001:10001 /rootfs/var/lib/chorus; \
    chmod 0750 /rootfs/var/lib/chorus

FROM ${BASE_IMAGE}
COPY --from=assemble /rootfs/ /

# Mount a volume on the data dir (a PersistentVolumeClaim on Kubernetes, a named volume on
# Docker): the store lives there, and the coordinator locks it so two never share one. No VOLUME
# instruction: it would leave an anonymous volume behind every `docker run` that forgets one.
ENV CHORUS_LISTEN=0.0.0.0:7070 \
    CHORUS_DATA_DIR=/var/lib/chorus \
    HOME=/var/lib/chorus
WORKDIR /var/lib/chorus
USER 10001:10001
EXPOSE 7070 9090

# grpc.health.v1 on the serving port: SERVING once the store is loaded.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/chorus/bin/chorus", "health", "--coordinator", "http://127.0.0.1:7070"]

# tini is PID 1: it forwards SIGTERM (the coordinator drains on it) and reaps orphans.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/chorus/bin/chorus-coordinator"]

# Last, so that a new commit with the same binaries only changes metadata: every filesystem
# layer above is a cache hit keyed on the binaries' contents, which these labels also name.
ARG BASE_IMAGE
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG COORDINATOR_SHA256=unknown
ARG CLI_SHA256=unknown
LABEL org.opencontainers.image.title="chorus-coordinator" \
      org.opencontainers.image.description="Chorus coordinator: sweeps, scheduling and records" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/chorus" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      dev.chorus.binary.chorus-coordinator.sha256="${COORDINATOR_SHA256}" \
      dev.chorus.binary.chorus.sha256="${CLI_SHA256}" \
      org.opencontainers.image.revision="${REVISION}"
