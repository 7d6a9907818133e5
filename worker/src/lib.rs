//! The Chorus worker: it registers with a coordinator, runs the trial attempts assigned to it on
//! this host (command trials as contained child processes, none of which outlives its attempt
//! or the worker, see `runner::containment`; builtin trials on a
//! dedicated trainer thread with libtorch), stores their logs, metrics and checkpoints in object
//! storage, and reports their events back in order. It finds its GPUs through the CUDA driver
//! and watches them through NVML (`gpu`), both loaded at run time, and serves its own health
//! and Prometheus metrics on ports of their own.
//!
//! It owns nothing durable: the coordinator decides what runs where and keeps the durable state;
//! this crate never places work itself, never retries a failed trial on its own, and never
//! sends checkpoints or tensors over the control plane (only object-store keys). Only `agent`
//! talks to the coordinator; `runner` knows nothing of gRPC. A worker that loses the coordinator
//! keeps its trials running and buffers their reports until it is back.

pub mod agent;
mod attempts;
pub mod collective;
pub mod config;
pub mod data;
pub mod error;
pub mod gpu;
pub mod health;
pub mod metrics;
pub mod models;
pub mod runner;
pub mod torch;
pub mod trainer;

pub use config::{Args, LogFormat, WorkerConfig};
pub use error::WorkerError;
pub use runner::containment::{DataDirLock, guardian};
use std::sync::Arc;

/// Runs the worker until `shutdown` completes (then stops its trials and flushes their reports)
/// or until the coordinator refuses it for good, or until a newer registration of its worker id
/// replaces it ([`WorkerError::Fenced`]: its trials are killed, unreported). Takes the shutdown signal as a future so tests
/// can run a worker in-process and stop it at will. Takes the data directory's lock first.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    let dir = config.data_dir.clone();
    let lock = tokio::task::spawn_blocking(move || DataDirLock::acquire(&dir, guardian::LOCK_WAIT))
        .await
        .map_err(|e| WorkerError::Task(e.to_string()))??;
    run_locked(config, lock, shutdown).await
}

/// As [`run`], with the data directory's lock already taken (the binary takes it, and forks
/// the guardian that inherits it, before its runtime starts).
pub async fn run_locked(
    mut config: WorkerConfig,
    lock: DataDirLock,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    tokio::pin!(shutdown);
    let health = match config.health_listen {
        Some(addr) => Some(health::HealthEndpoint::serve(addr).await?),
        None => None,
    };
    let metrics = match config.metrics_listen {
        Some(addr) => Some(metrics::MetricsListener::bind(addr).await?),
        None => None,
    };
    if config.advertise_address.is_none() {
        tokio::select! {
            ip = advertise_address(&config.coordinator) => config.advertise_address = Some(ip),
            _ = &mut shutdown => return Ok(()),
        }
    }
    let gpu_sampler = open_gpu_telemetry(&config.gpu_ids).await;
    let agent = agent::Agent::new(
        config,
        lock,
        health.as_ref().map(health::HealthEndpoint::reporter),
        gpu_sampler.clone(),
    )?;
    // Weak: a scrape must not keep the agent, and with it the data directory's lock, alive
    // after the worker stopped.
    let weak = Arc::downgrade(&agent);
    let metrics = metrics.map(|m| {
        m.serve(
            move || weak.upgrade().map(|a| a.gauges()).unwrap_or_default(),
            gpu_sampler,
        )
    });
    let result = agent.run(shutdown).await;
    drop(metrics);
    drop(health);
    result
}

/// NVML for the worker's GPUs, if it opens. Its first start takes up to a second, so it runs off
/// the runtime's threads; a driver that hangs instead costs the worker its GPU telemetry, not its
/// start.
async fn open_gpu_telemetry(gpu_ids: &[String]) -> Option<Arc<dyn gpu::telemetry::GpuSampler>> {
    const OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
    let gpu_ids = gpu_ids.to_vec();
    let open = tokio::task::spawn_blocking(move || gpu::telemetry::GpuTelemetry::open(&gpu_ids));
    match tokio::time::timeout(OPEN_WAIT, open).await {
        Ok(Ok(telemetry)) => telemetry.map(|t| Arc::new(t) as Arc<dyn gpu::telemetry::GpuSampler>),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "no GPU telemetry: opening NVML failed");
            None
        }
        Err(_) => {
            tracing::warn!(after = ?OPEN_WAIT, "no GPU telemetry: NVML did not open in time");
            None
        }
    }
}

/// The address of the interface that routes to the coordinator, retried while the coordinator's
/// name does not resolve (in a cluster its DNS record may come up after this pod).
async fn advertise_address(coordinator: &str) -> std::net::IpAddr {
    let mut delay = std::time::Duration::from_millis(200);
    let mut tries = 0u32;
    loop {
        let url = coordinator.to_string();
        let found = tokio::task::spawn_blocking(move || config::default_advertise_address(&url))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match found {
            Ok(ip) => {
                tracing::info!(
                    advertise_address = %ip,
                    "advertising the address of the interface that routes to the coordinator (set --advertise-address to choose another)"
                );
                return ip;
            }
            Err(e) => {
                tries += 1;
                if tries == 1 || tries.is_multiple_of(20) {
                    tracing::warn!(error = %e, "cannot find the address to advertise yet; retrying");
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; in a log file they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Already initialised (a test harness did it) is fine.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Completes on ctrl-c or SIGTERM, the signals that ask for a graceful stop.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops the worker gracefully");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested");
}
