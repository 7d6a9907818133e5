//! Prometheus metrics of the worker, served on `http://ADDR/metrics` when `--metrics-listen` is
//! set: what it offers and what is in use (slots, GPUs, attempts), whether it is registered, and
//! how busy each of its GPUs is (read through NVML, see [`crate::gpu::telemetry`]; a host without
//! NVML has no GPU series). Names start with `chorus_worker_` and use base units (bytes, ratios).
//!
//! Everything is read when scraped: the figures are cheap and a worker nobody scrapes does no
//! work for it. Scrapes are served one at a time and one that arrives within [`FRESH`] of the
//! last reading gets that reading, so no number of scrapers can keep the driver busy. Its own
//! port, like the health endpoint's, so a scraper needs no credentials of the coordinator's.

use crate::error::WorkerError;
use crate::gpu::telemetry::{GpuSample, GpuSampler, SampledGpu};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{info, warn};

/// A reading younger than this answers a scrape; Prometheus scrapes every 15 s or more.
pub const FRESH: Duration = Duration::from_secs(1);

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The worker's own figures, from its agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerGauges {
    /// Registered with the coordinator now.
    pub registered: bool,
    pub slots: u32,
    pub slots_busy: u32,
    pub gpus: u32,
    /// GPUs allotted to at least one attempt.
    pub gpus_busy: u32,
    /// Attempts whose program runs.
    pub attempts_running: u32,
    /// Attempts held: running, or ended with reports still to deliver.
    pub attempts_held: u32,
}

type Labels = Vec<(&'static str, String)>;

/// The registry, built once; the values are set at each scrape.
struct WorkerMetrics {
    registry: Registry,
    registered: Gauge,
    slots: Family<Labels, Gauge>,
    gpus: Family<Labels, Gauge>,
    attempts_running: Gauge,
    attempts_held: Gauge,
    gpu_utilization: Family<Labels, Gauge<f64, AtomicU64>>,
    gpu_memory_used: Family<Labels, Gauge>,
    gpu_memory_total: Family<Labels, Gauge>,
}

impl WorkerMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("chorus");
        let registered = Gauge::default();
        registry.register(
            "worker_registered",
            "1 while this worker is registered with the coordinator, else 0",
            registered.clone(),
        );
        let slots = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_slots",
            "CPU slots this worker offers (use=capacity) and has allotted to attempts (use=busy)",
            slots.clone(),
        );
        let gpus = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_gpus",
            "GPUs this worker offers (use=capacity) and has allotted to attempts (use=busy)",
            gpus.clone(),
        );
        let attempts_running = Gauge::default();
        registry.register(
            "worker_attempts_running",
            "Trial attempts whose program runs on this worker",
            attempts_running.clone(),
        );
        let attempts_held = Gauge::default();
        registry.register(
            "worker_attempts_held",
            "Trial attempts this worker holds: running, or ended with reports still to deliver",
            attempts_held.clone(),
        );
        let gpu_utilization = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "worker_gpu_utilization_ratio",
            "Share (0 to 1) of the driver's last sample period during which a kernel ran on the GPU",
            gpu_utilization.clone(),
        );
        let gpu_memory_used = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_gpu_memory_used_bytes",
            "GPU memory in use, by every process on the device",
            gpu_memory_used.clone(),
        );
        let gpu_memory_total = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_gpu_memory_total_bytes",
            "GPU memory installed",
            gpu_memory_total.clone(),
        );
        WorkerMetrics {
            registry,
            registered,
            slots,
            gpus,
            attempts_running,
            attempts_held,
            gpu_utilization,
            gpu_memory_used,
            gpu_memory_total,
        }
    }

    /// Sets the gauges and renders the OpenMetrics text.
    fn render(&self, w: &WorkerGauges, readings: &[(SampledGpu, GpuSample)]) -> String {
        self.registered.set(i64::from(w.registered));
        for (family, capacity, busy) in [(&self.slots, w.slots, w.slots_busy), (&self.gpus, w.gpus, w.gpus_busy)] {
            family
                .get_or_create(&vec![("use", "capacity".to_string())])
                .set(i64::from(capacity));
            family
                .get_or_create(&vec![("use", "busy".to_string())])
                .set(i64::from(busy));
        }
        self.attempts_running.set(i64::from(w.attempts_running));
        self.attempts_held.set(i64::from(w.attempts_held));
        // A GPU that did not answer this time shows no series rather than its last figure.
        self.gpu_utilization.clear();
        self.gpu_memory_used.clear();
        self.gpu_memory_total.clear();
        for (gpu, sample) in readings {
            let labels: Labels = vec![("gpu", gpu.id.clone()), ("name", gpu.name.clone())];
            if let Some(u) = sample.utilization_percent {
                self.gpu_utilization.get_or_create(&labels).set(f64::from(u) / 100.0);
            }
            if let Some(b) = sample.memory_used_bytes {
                self.gpu_memory_used.get_or_create(&labels).set(saturating_i64(b));
            }
            if let Some(b) = sample.memory_total_bytes {
                self.gpu_memory_total.get_or_create(&labels).set(saturating_i64(b));
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What a scrape reads: the agent's figures and, if any, the GPUs.
struct Scrape {
    gauges: Box<dyn Fn() -> WorkerGauges + Send + Sync>,
    gpus: Option<Arc<dyn GpuSampler>>,
    metrics: WorkerMetrics,
    /// The last reading and when it was made; the lock makes scrapes take turns.
    last: tokio::sync::Mutex<Option<(Instant, String)>>,
}

impl Scrape {
    async fn body(&self) -> String {
        let mut last = self.last.lock().await;
        if let Some((at, body)) = last.as_ref()
            && at.elapsed() < FRESH
        {
            return body.clone();
        }
        let readings = match &self.gpus {
            // NVML calls block for up to milliseconds each.
            Some(sampler) => {
                let sampler = sampler.clone();
                tokio::task::spawn_blocking(move || {
                    sampler
                        .gpus()
                        .into_iter()
                        .filter_map(|g| sampler.sample(&g.id).map(|s| (g, s)))
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default()
            }
            None => Vec::new(),
        };
        let body = self.metrics.render(&(self.gauges)(), &readings);
        *last = Some((Instant::now(), body.clone()));
        body
    }
}

/// The metrics port, bound but not yet served.
pub struct MetricsListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr` at once, so a taken port is reported before the worker does anything else.
    pub async fn bind(addr: SocketAddr) -> Result<Self, WorkerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| WorkerError::Config(format!("--metrics-listen {addr}: cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| WorkerError::Config(format!("--metrics-listen {addr}: {e}")))?;
        Ok(MetricsListener { listener, addr })
    }

    /// The bound address (the port is the system's choice when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `/metrics` with the figures `gauges` gives and the readings of `gpus`, until the
    /// returned endpoint is dropped. `gauges` runs on the async runtime: it must not block.
    pub fn serve(
        self,
        gauges: impl Fn() -> WorkerGauges + Send + Sync + 'static,
        gpus: Option<Arc<dyn GpuSampler>>,
    ) -> MetricsEndpoint {
        let scrape = Arc::new(Scrape {
            gauges: Box::new(gauges),
            gpus,
            metrics: WorkerMetrics::new(),
            last: tokio::sync::Mutex::new(None),
        });
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let scrape = scrape.clone();
                async move { ([("content-type", CONTENT_TYPE)], scrape.body().await) }
            }),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let addr = self.addr;
        tokio::spawn(async move {
            let served = axum::serve(self.listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                warn!(error = %e, "the metrics endpoint stopped");
            }
        });
        info!(address = %addr, "serving Prometheus metrics on /metrics");
        MetricsEndpoint { addr, _stop: stop }
    }
}

/// The running metrics server; dropping it stops the server.
pub struct MetricsEndpoint {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl MetricsEndpoint {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One plain HTTP/1.1 GET over a real socket; returns the status line and the body.
    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    #[tokio::test]
    async fn metrics_are_served_over_http_with_the_worker_gauges() {
        let listener = MetricsListener::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.addr();
        assert_ne!(addr.port(), 0);
        // The bound port is refused to a second worker at once, with the flag's name.
        let taken = MetricsListener::bind(addr).await.err().unwrap().to_string();
        assert!(taken.contains("--metrics-listen"), "{taken}");
        let scrapes = Arc::new(AtomicU32::new(0));
        let counted = scrapes.clone();
        let endpoint = listener.serve(
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                WorkerGauges {
                    registered: true,
                    slots: 8,
                    slots_busy: 3,
                    gpus: 0,
                    gpus_busy: 0,
                    attempts_running: 2,
                    attempts_held: 3,
                }
            },
            None,
        );
        assert_eq!(endpoint.addr(), addr);

        let (status, body) = get(addr, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        for line in [
            "chorus_worker_registered 1",
            "chorus_worker_slots{use=\"capacity\"} 8",
            "chorus_worker_slots{use=\"busy\"} 3",
            "chorus_worker_gpus{use=\"capacity\"} 0",
            "chorus_worker_attempts_running 2",
            "chorus_worker_attempts_held 3",
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
        }
        // No GPU here: no GPU series at all.
        assert!(!body.contains("chorus_worker_gpu_"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        // A second scrape at once shares the first reading.
        let (_, again) = get(addr, "/metrics").await;
        assert_eq!(again, body);
        assert_eq!(scrapes.load(Ordering::SeqCst), 1);
        let (status, _) = get(addr, "/other").await;
        assert!(status.contains("404"), "{status}");

        drop(endpoint);
        // Stopped: the port no longer answers (graceful shutdown closes the listener).
        let mut refused = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            refused,
            "the metrics endpoint still accepts connections after it was dropped"
        );
    }

    /// Readings as a GPU host's NVML would give them.
    struct TwoGpus;

    impl GpuSampler for TwoGpus {
        fn gpus(&self) -> Vec<SampledGpu> {
            ["0", "1"]
                .iter()
                .map(|id| SampledGpu {
                    id: id.to_string(),
                    name: "NVIDIA H100 80GB HBM3".into(),
                })
                .collect()
        }

        fn sample(&self, id: &str) -> Option<GpuSample> {
            // GPU 1 answers nothing this time (fallen off the bus, say).
            (id == "0").then_some(GpuSample {
                utilization_percent: Some(42),
                memory_used_bytes: Some(3 << 30),
                memory_total_bytes: Some(80 << 30),
            })
        }
    }

    #[test]
    fn gpu_readings_become_series_labelled_by_id_and_name() {
        let metrics = WorkerMetrics::new();
        let sampler = TwoGpus;
        let readings: Vec<_> = sampler
            .gpus()
            .into_iter()
            .filter_map(|g| sampler.sample(&g.id).map(|s| (g, s)))
            .collect();
        let body = metrics.render(&WorkerGauges::default(), &readings);
        let labels = "{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"}";
        for line in [
            format!("chorus_worker_gpu_utilization_ratio{labels} 0.42"),
            format!("chorus_worker_gpu_memory_used_bytes{labels} {}", 3u64 << 30),
            format!("chorus_worker_gpu_memory_total_bytes{labels} {}", 80u64 << 30),
        ] {
            assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
        }
        assert!(!body.contains("gpu=\"1\""), "{body}");
        // A GPU that stops answering loses its series instead of keeping its last figure.
        let body = metrics.render(&WorkerGauges::default(), &[]);
        assert!(!body.contains("gpu=\"0\""), "{body}");
    }
}
