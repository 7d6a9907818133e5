//! The coordinator as it runs in a pod, over real sockets and real processes: TLS and mutual
//! TLS, registration epochs over gRPC, the data directory's lock, health through start and
//! shutdown, `--check-config`, and online backup.

mod epochs;
mod lifecycle;
mod support;
mod tls;
