//! Prometheus metrics of the coordinator, served on `/metrics` when `--metrics-listen` is set.
//! Names start with `chorus_` and use base units (seconds, counts).

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
    workers_registered: Gauge,
    ranks_waiting: Gauge,
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
    /// Changes written by one commit (group commit).
    pub store_group_batches: Histogram,
}

/// What the gauges show, read from the state when they are rendered.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Experiments by state name.
    pub experiments: Vec<(&'static str, u64)>,
    /// Trials by state name.
    pub trials: Vec<(&'static str, u64)>,
    pub workers: u64,
    /// Ranks of trials that want to run and have no placement: the demand an autoscaler adds
    /// workers for.
    pub ranks_waiting: u64,
    pub cpu_capacity: u64,
    pub cpu_busy: u64,
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
        let workers_registered = Gauge::default();
        registry.register(
            "workers_registered",
            "Workers registered with this coordinator and holding a lease (the same count as chorus_workers)",
            workers_registered.clone(),
        );
        let ranks_waiting = Gauge::default();
        registry.register(
            "ranks_waiting",
            "Ranks of pending trials of active experiments that have no placement yet: pending demand, for autoscaling",
            ranks_waiting.clone(),
        );
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
        let store_group_batches = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register(
            "store_group_batches",
            "Changes made durable together by one store commit",
            store_group_batches.clone(),
        );
        Telemetry {
            registry,
            store_group_batches,
            experiments,
            trials,
            workers,
            workers_registered,
            ranks_waiting,
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
    /// Sets the gauges and renders the OpenMetrics text.
    pub fn render(&self, g: &Gauges) -> String {
        for (state, n) in &g.experiments {
            self.experiments
                .get_or_create(&vec![("state", state.to_string())])
                .set(*n as i64);
        }
        for (state, n) in &g.trials {
            self.trials
                .get_or_create(&vec![("state", state.to_string())])
                .set(*n as i64);
        }
        self.workers.set(g.workers as i64);
        self.workers_registered.set(g.workers as i64);
        self.ranks_waiting.set(g.ranks_waiting as i64);
        self.slots
            .get_or_create(&vec![("use", "capacity".to_string())])
            .set(g.cpu_capacity as i64);
        self.slots
            .get_or_create(&vec![("use", "busy".to_string())])
            .set(g.cpu_busy as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
