//! The scenarios, and what they share: starting the coordinator and the fleet, measurement
//! windows, experiment files, and the record of a run.

pub mod growth;
pub mod idle;
pub mod queries;
pub mod reports;

use crate::coordinator::{Coordinator, ProcSample, Usage};
use crate::fleet::{Behaviour, Encoding, Fleet, Shared};
use crate::stats::{Counts, Summary};
use anyhow::{Context, bail};
use chorus_proto::pb;
use chorus_proto::pb::experiment_service_client::ExperimentServiceClient;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Settings every scenario takes.
#[derive(Debug, Clone)]
pub struct Common {
    pub coordinator: PathBuf,
    pub coordinator_args: Vec<String>,
    pub encoding: Encoding,
    pub window: Duration,
    pub warmup: Duration,
    pub connect_concurrency: usize,
}

/// What a run has found so far. Filled as the run goes, so a run stopped by its time limit
/// still reports what it measured and the phase it was in.
#[derive(Clone, Default)]
pub struct Record(Arc<Mutex<RecordInner>>);

#[derive(Default)]
struct RecordInner {
    fields: Map<String, Value>,
    phase: String,
}

impl Record {
    pub fn set(&self, key: &str, value: impl serde::Serialize) {
        let v = serde_json::to_value(value).expect("results serialise");
        self.0.lock().expect("record lock").fields.insert(key.into(), v);
    }

    pub fn phase(&self, phase: &str) {
        eprintln!("  .. {phase}");
        self.0.lock().expect("record lock").phase = phase.into();
    }

    pub fn current_phase(&self) -> String {
        self.0.lock().expect("record lock").phase.clone()
    }

    pub fn fields(&self) -> Map<String, Value> {
        self.0.lock().expect("record lock").fields.clone()
    }
}

/// A coordinator with a fleet of simulated workers attached.
pub struct Bench {
    pub coord: Coordinator,
    pub shared: Arc<Shared>,
    pub fleet: Option<Fleet>,
}

impl Bench {
    /// Starts the coordinator (with `extra` flags) and `workers` simulated workers.
    pub async fn start(
        common: &Common,
        record: &Record,
        extra: &[String],
        workers: usize,
        behaviour: Behaviour,
        report_budget: Option<u64>,
    ) -> anyhow::Result<Bench> {
        record.phase("starting the coordinator");
        let mut args = extra.to_vec();
        args.extend(common.coordinator_args.iter().cloned());
        let coord = Coordinator::start(&common.coordinator, &args).await?;
        let shared = Shared::new(coord.url.clone(), common.encoding, behaviour, report_budget);
        let mut bench = Bench {
            coord,
            shared,
            fleet: None,
        };
        record.phase(&format!("connecting and registering {workers} workers"));
        let fleet = Fleet::start(&bench.shared, "sim", workers, common.connect_concurrency).await?;
        let secs = fleet.connect_and_register.as_secs_f64();
        let register = bench.shared.stats.register.take();
        eprintln!(
            "  {workers} workers connected and registered in {secs:.2} s; Register {}",
            register.brief()
        );
        record.set("workers", workers);
        record.set(
            "registration",
            json!({
                "seconds": secs,
                "per_s": workers as f64 / secs.max(1e-9),
                "latency": register,
            }),
        );
        bench.fleet = Some(fleet);
        Ok(bench)
    }

    pub async fn experiments(&self) -> anyhow::Result<ExperimentServiceClient<Channel>> {
        let channel = Channel::from_shared(self.coord.url.clone())?.connect().await?;
        // Large enough for an unpaged listing of every trial; the coordinator's own limit is
        // what a listing runs into, and that is a result.
        Ok(ExperimentServiceClient::new(channel).max_decoding_message_size(1 << 30))
    }

    pub async fn submit(&self, yaml: String) -> anyhow::Result<u64> {
        let resp = self
            .experiments()
            .await?
            .submit_experiment(pb::SubmitExperimentRequest {
                spec_yaml: yaml,
                overrides: vec![],
            })
            .await
            .context("SubmitExperiment")?
            .into_inner();
        Ok(resp.experiment.context("SubmitExperiment answered no experiment")?.id)
    }

    /// Waits `d`, failing early if the coordinator dies.
    pub async fn sleep(&mut self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            tokio::time::sleep((end - Instant::now()).min(Duration::from_millis(250))).await;
            self.alive()?;
        }
        Ok(())
    }

    pub fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(how) = self.coord.exited() {
            bail!("the coordinator exited during the run: {how}");
        }
        Ok(())
    }

    /// Starts a measurement window: latency histograms are emptied and counters read.
    pub fn window(&self) -> anyhow::Result<WindowStart> {
        let stats = &self.shared.stats;
        stats.heartbeat.take();
        stats.report.take();
        Ok(WindowStart {
            coord: self.coord.sample()?,
            own: ProcSample::own()?,
            counts: stats.counts(),
        })
    }

    pub fn close(&self, start: &WindowStart) -> anyhow::Result<Window> {
        let stats = &self.shared.stats;
        let coord = self.coord.sample()?;
        let own = ProcSample::own()?;
        Ok(Window {
            coordinator: Usage::between(&start.coord, &coord),
            generator: Usage::between(&start.own, &own),
            counts: stats.counts().since(&start.counts),
            heartbeat: stats.heartbeat.take(),
            report: stats.report.take(),
        })
    }

    /// Stops the fleet and the coordinator, recording the size of its data directory and how
    /// it ended.
    pub async fn finish(mut self, record: &Record) {
        record.phase("stopping");
        if let Some(f) = self.fleet.take() {
            f.shutdown(&self.shared).await;
        }
        record.set("data_dir_bytes", self.coord.data_bytes());
        record.set("coordinator_exit", self.coord.stop().await);
    }
}

pub struct WindowStart {
    coord: ProcSample,
    own: ProcSample,
    counts: Counts,
}

/// What one measurement window saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    pub coordinator: Usage,
    pub generator: Usage,
    pub counts: Counts,
    pub heartbeat: Summary,
    pub report: Summary,
}

impl Window {
    pub fn per_s(&self, n: u64) -> f64 {
        n as f64 / self.coordinator.seconds.max(1e-9)
    }

    pub fn brief(&self) -> String {
        format!(
            "coordinator CPU {:.0} %, RSS {:.0} MiB (peak {:.0} MiB), wrote {:.1} MiB; generator CPU {:.0} %",
            self.coordinator.cpu_pct,
            self.coordinator.rss_mib,
            self.coordinator.peak_rss_mib,
            self.coordinator.write_bytes as f64 / (1024.0 * 1024.0),
            self.generator.cpu_pct
        )
    }
}

/// An experiment whose trials the simulated workers play: a random search over one parameter
/// (`scheduler: median` adds the median stopping rule), one CPU slot per trial, no restarts, so
/// a stopped or lost trial is replaced by a new one rather than retried.
pub fn experiment_yaml(name: &str, max_trials: u64, parallel: u32, median: bool) -> String {
    let scheduler = if median { "scheduler: {name: median}\n" } else { "" };
    format!(
        "name: {name}\n\
         metric: {{name: loss, goal: minimize}}\n\
         parameters:\n  lr: {{min: 0.0001, max: 0.5, distribution: log_uniform}}\n\
         searcher: {{name: random, seed: 7}}\n\
         {scheduler}\
         max_trials: {max_trials}\n\
         parallel_trials: {parallel}\n\
         max_restarts: 0\n\
         resources: {{cpus: 1}}\n\
         trial:\n  command: [simulated-trial, --lr, \"${{params.lr}}\"]\n"
    )
}

/// Waits until the fleet holds `n` attempts at once.
pub async fn wait_held(bench: &mut Bench, n: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while bench.shared.held.load(std::sync::atomic::Ordering::Relaxed) < n {
        bench.sleep(Duration::from_millis(100)).await?;
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_experiment_files_are_valid_specs() {
        for median in [false, true] {
            let yaml = super::experiment_yaml("scale", 100_000, 1000, median);
            let spec = chorus_core::spec::parse(&yaml, &[]).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            assert_eq!(spec.spec.parallel_trials, 1000);
            assert_eq!(spec.spec.max_trials, Some(100_000));
            assert_eq!(spec.spec.scheduler.is_some(), median);
        }
    }
}
