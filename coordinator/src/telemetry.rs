//! Prometheus metrics of the coordinator, served on `/metrics` when `--metrics-listen` is set.
//! Names start with `chorus_` and use base units (seconds, counts).

use crate::state::State;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

pub struct Telemetry {
    registry: Registry,
    experiments: Family<Labels, Gauge>,
    trials: Family<Labels, Gauge>,
    workers: Gauge,
    slots: Family<Labels, Gauge>,
    /// Attempts placed on workers.
    pub attempts_placed: Counter,
    /// Attempts lost with their worker or vanished from it.
    pub attempts_lost: Counter,
    /// Trial reports received from workers.
    pub reports: Counter,
    /// Durable commits of the store and how long each took.
    pub store_commit_seconds: Histogram,
    /// Commits that failed (a full disk, an I/O error): their changes were dropped.
    pub store_commit_failures: Counter,
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("chorus");
        let experiments = Family::<Labels, Gauge>::default();
        registry.register("experiments", "Experiments by state", experiments.clone());
        let trials = Family::<Labels, Gauge>::default();
        registry.register("trials", "Trials by state", trials.clone());
        let workers = Gauge::default();
        registry.register("workers", "Workers holding a lease", workers.clone());
        let slots = Family::<Labels, Gauge>::default();
        registry.register(
            "worker_cpu_slots",
            "CPU slots of registered workers, by use",
            slots.clone(),
        );
        let attempts_placed = Counter::default();
        registry.register(
            "attempts_placed",
            "Trial attempts placed on workers",
            attempts_placed.clone(),
        );
        let attempts_lost = Counter::default();
        registry.register(
            "attempts_lost",
            "Trial attempts lost with their worker",
            attempts_lost.clone(),
        );
        let reports = Counter::default();
        registry.register("trial_reports", "Trial reports received from workers", reports.clone());
        let store_commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "store_commit_seconds",
            "Time to durably commit one change to the store",
            store_commit_seconds.clone(),
        );
        let store_commit_failures = Counter::default();
        registry.register(
            "store_commit_failures",
            "Store commits that failed (full disk, I/O error); their changes were not made",
            store_commit_failures.clone(),
        );
        Telemetry {
            registry,
            experiments,
            trials,
            workers,
            slots,
            attempts_placed,
            attempts_lost,
            reports,
            store_commit_seconds,
            store_commit_failures,
        }
    }
}

impl Telemetry {
    /// Refreshes the gauges from `st` and renders the OpenMetrics text.
    pub fn render(&self, st: &State) -> String {
        use chorus_core::convert::ExperimentState as E;
        for s in [E::Active, E::Paused, E::Completed, E::Failed, E::Killed] {
            let n = st.experiments.values().filter(|e| e.state == s).count();
            self.experiments
                .get_or_create(&vec![("state", s.as_str().to_string())])
                .set(n as i64);
        }
        let mut totals = crate::state::Counts::default();
        for c in st.counts.values() {
            totals.pending += c.pending;
            totals.running += c.running;
            totals.completed += c.completed;
            totals.failed += c.failed;
            totals.killed += c.killed;
            totals.paused += c.paused;
        }
        for (name, n) in [
            ("pending", totals.pending),
            ("running", totals.running),
            ("completed", totals.completed),
            ("failed", totals.failed),
            ("killed", totals.killed),
            ("paused", totals.paused),
        ] {
            self.trials
                .get_or_create(&vec![("state", name.to_string())])
                .set(n as i64);
        }
        let registered: Vec<_> = st.registry.workers.values().filter(|w| w.registered).collect();
        self.workers.set(registered.len() as i64);
        let capacity: u64 = registered.iter().map(|w| w.capacity.cpus as u64).sum();
        self.slots
            .get_or_create(&vec![("use", "capacity".to_string())])
            .set(capacity as i64);
        self.slots
            .get_or_create(&vec![("use", "busy".to_string())])
            .set(st.busy_cpu_slots() as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
