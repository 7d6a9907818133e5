//! grpc.health.v1 on a port of its own, for Kubernetes probes and `chorus health`: the overall
//! service (`""`) is SERVING while the worker is registered with the coordinator and NOT_SERVING
//! while it is disconnected, draining or replaced. Its own port because the worker serves
//! nothing else, and a probe must not need the coordinator's credentials.

use crate::error::WorkerError;
use std::net::SocketAddr;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

/// The running health server; dropping it stops the server.
pub struct HealthEndpoint {
    reporter: HealthReporter,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl HealthEndpoint {
    /// Binds `addr` (a taken port is a setting to fix, reported at once) and serves, NOT_SERVING
    /// until the agent says otherwise.
    pub async fn serve(addr: SocketAddr) -> Result<Self, WorkerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| WorkerError::Config(format!("--health-listen {addr}: cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| WorkerError::Config(format!("--health-listen {addr}: {e}")))?;
        let (reporter, service) = tonic_health::server::health_reporter();
        // tonic-health starts the overall service SERVING; not before the first registration.
        reporter.set_service_status("", ServingStatus::NotServing).await;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                warn!(error = %e, "the health endpoint stopped");
            }
        });
        info!(address = %addr, "serving grpc.health.v1");
        Ok(HealthEndpoint {
            reporter,
            addr,
            _stop: stop,
        })
    }

    pub fn reporter(&self) -> HealthReporter {
        self.reporter.clone()
    }

    /// The bound address (the port is the system's choice when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Sets the overall status.
pub async fn report(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
}
