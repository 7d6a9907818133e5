//! The GPUs of a running attempt, reported as metrics of its trial: every
//! [`GpuSampling::every`], `gpu_util` (mean utilisation of the attempt's GPUs, in percent) and
//! `gpu_mem_mb` (memory used on them, summed, in MiB), recorded as a metric line the trial
//! printed would be: stored in its history, then reported.
//!
//! The lines carry no step: they describe the moment of the reading, not a training step, and a
//! step would also ask the recorder to commit the checkpoint directory, which the trial may be
//! writing at that moment. The figures are the devices', not the attempt's processes': a GPU two
//! attempts share (an overcommitted worker) shows both. Only rank 0 of a multi-rank attempt
//! reports, as it does every metric; a host without NVML reports nothing.

use super::Backlog;
use super::records::Job;
use crate::gpu::telemetry::{GpuSample, GpuSampler};
use chorus_core::metric::{GPU_MEM_MB, GPU_UTIL, MetricReport};
use chorus_proto::pb;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

/// How the attempts of this worker read their GPUs.
#[derive(Clone)]
pub struct GpuSampling {
    pub sampler: Arc<dyn GpuSampler>,
    /// Between two readings of an attempt's GPUs.
    pub every: Duration,
}

/// The GPUs one attempt reports on.
pub(super) struct AttemptGpus {
    sampling: GpuSampling,
    ids: Vec<String>,
}

impl AttemptGpus {
    /// `None` when nothing is to be reported: no sampler (no NVML), no GPU allotted, or a rank
    /// other than 0.
    pub fn of(sampling: Option<&GpuSampling>, a: &pb::Assignment, gpu_ids: &[String]) -> Option<Self> {
        let sampling = sampling?;
        (a.rank == 0 && !gpu_ids.is_empty() && !sampling.every.is_zero()).then(|| AttemptGpus {
            sampling: sampling.clone(),
            ids: gpu_ids.to_vec(),
        })
    }
}

/// One report from one reading of each of an attempt's GPUs; `None` when none of them answered.
/// Utilisation is averaged over the GPUs that report one (MIG instances do not).
pub(super) fn report(samples: &[GpuSample]) -> Option<MetricReport> {
    let mut values = std::collections::BTreeMap::new();
    let utilizations: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.utilization_percent)
        .map(f64::from)
        .collect();
    if !utilizations.is_empty() {
        values.insert(
            GPU_UTIL.to_string(),
            utilizations.iter().sum::<f64>() / utilizations.len() as f64,
        );
    }
    let used: Vec<u64> = samples.iter().filter_map(|s| s.memory_used_bytes).collect();
    if !used.is_empty() {
        let mib = used.iter().sum::<u64>() as f64 / (1024.0 * 1024.0);
        values.insert(GPU_MEM_MB.to_string(), mib.round());
    }
    (!values.is_empty()).then_some(MetricReport { step: None, values })
}

/// Reads an attempt's GPUs until dropped; its output (the recorder's job sender) going away
/// ends it too.
pub(super) struct Reporter(tokio::task::JoinHandle<()>);

impl Drop for Reporter {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Reporter {
    /// Holds the job sender weakly: the recorder finishes once the attempt's output is dropped,
    /// whatever this task is doing.
    pub fn start(gpus: AttemptGpus, jobs: mpsc::WeakUnboundedSender<Job>, backlog: Arc<Backlog>) -> Self {
        let AttemptGpus { sampling, ids } = gpus;
        let ids: Arc<[String]> = ids.into();
        Reporter(tokio::spawn(async move {
            // The first reading one period in: at the start the GPUs are idle by construction.
            let start = tokio::time::Instant::now() + sampling.every;
            let mut tick = tokio::time::interval_at(start, sampling.every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Bounded like the trial's own output: while storage lags, readings are skipped.
                if !backlog.has_room() {
                    continue;
                }
                let (sampler, read) = (sampling.sampler.clone(), ids.clone());
                let Ok(samples) = tokio::task::spawn_blocking(move || {
                    read.iter().filter_map(|id| sampler.sample(id)).collect::<Vec<_>>()
                })
                .await
                else {
                    return;
                };
                let Some(report) = report(&samples) else { continue };
                let Some(jobs) = jobs.upgrade() else { return };
                // The line's weight, as a line the trial printed would weigh.
                let weight = report.to_line().len() + 1;
                // Counted before it is sent, so the recorder's release can never come first.
                backlog.add(weight);
                if jobs.send(Job::Metric(report, weight)).is_err() {
                    backlog.release(weight);
                    return;
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(util: Option<u32>, used_mib: Option<u64>) -> GpuSample {
        GpuSample {
            utilization_percent: util,
            memory_used_bytes: used_mib.map(|m| m << 20),
            memory_total_bytes: Some(80 << 30),
        }
    }

    #[test]
    fn a_report_averages_utilisation_and_sums_memory() {
        let r = report(&[sample(Some(90), Some(1000)), sample(Some(40), Some(24))]).unwrap();
        assert_eq!(r.step, None);
        assert_eq!(r.values.get(GPU_UTIL), Some(&65.0));
        assert_eq!(r.values.get(GPU_MEM_MB), Some(&1024.0));
        r.check().unwrap();
        // A device without a utilisation figure does not drag the mean down.
        let r = report(&[sample(None, Some(10)), sample(Some(30), None)]).unwrap();
        assert_eq!(r.values.get(GPU_UTIL), Some(&30.0));
        assert_eq!(r.values.get(GPU_MEM_MB), Some(&10.0));
        let r = report(&[sample(None, Some(3))]).unwrap();
        assert_eq!(r.values.get(GPU_UTIL), None);
        assert!(report(&[]).is_none());
        assert!(report(&[sample(None, None)]).is_none());
    }

    #[test]
    fn only_rank_0_of_an_attempt_with_gpus_reports() {
        struct Nothing;
        impl GpuSampler for Nothing {
            fn gpus(&self) -> Vec<crate::gpu::telemetry::SampledGpu> {
                Vec::new()
            }
            fn sample(&self, _: &str) -> Option<GpuSample> {
                None
            }
        }
        let sampling = GpuSampling {
            sampler: Arc::new(Nothing),
            every: Duration::from_secs(10),
        };
        let gpus = ["1".to_string()];
        let rank = |rank| pb::Assignment {
            rank,
            ..Default::default()
        };
        assert!(AttemptGpus::of(Some(&sampling), &rank(0), &gpus).is_some());
        assert!(AttemptGpus::of(Some(&sampling), &rank(1), &gpus).is_none());
        assert!(AttemptGpus::of(Some(&sampling), &rank(0), &[]).is_none());
        assert!(AttemptGpus::of(None, &rank(0), &gpus).is_none());
        let off = GpuSampling {
            every: Duration::ZERO,
            ..sampling
        };
        assert!(AttemptGpus::of(Some(&off), &rank(0), &gpus).is_none());
    }
}
