//! One attempt of a builtin trial: a model from [`crate::models`] trained on a sharded dataset by
//! the trainer thread, inside the same attempt lifecycle as a command trial.
//!
//! The trainer's events are turned into log lines and typed metric reports, fed to the same
//! [`Output`] and recorder as a command trial's output: a report is stored, reported and logged as
//! the `chorus:metric` line a command trial printing it would be, without being printed and parsed
//! back. A trainer checkpoint is copied into the attempt's checkpoint directory and committed
//! under its step like any other, so restore, retention and the coordinator's view need nothing
//! builtin-specific.

use super::rendezvous::Missed;
use super::{Events, Output, Prepared, Stop, exited, kill_message};
use crate::collective::Collective;
use crate::collective::nccl::NcclCollective;
use crate::collective::ring::{RingCollective, RingConfig, RingListener};
use crate::data::BatchSource;
use crate::data::shards::{MAX_LOADER_THREADS, ShardSource, ShardSourceConfig};
use crate::trainer::DataParallel;
use crate::trainer::checkpoint::read_counters;
use crate::trainer::{self, DeviceChoice, Outcome, TrainConfig, TrainerEvent, TrainerJob};
use chorus_core::metric::MetricReport;
use chorus_core::shards::DataPosition;
use chorus_dataset::Split;
use chorus_proto::pb;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

/// Tokens per utterance and log-mel frames per clip fed to the models.
const TEXT_LEN: i64 = 32;
const AUDIO_FRAMES: i64 = 64;
/// Local copies of dataset shards kept per worker.
const SHARD_CACHE_BYTES: u64 = 2 << 30;

/// Settings of a builtin trial as the worker runs them.
#[derive(Debug)]
struct Settings {
    data: String,
    config: TrainConfig,
    /// Threads that load and featurise the dataset's shards.
    data_threads: usize,
    /// Keep featurised shards in the shard cache.
    feature_cache: bool,
}

/// Reads the assignment's builtin settings (core's `BuiltinSpec` as JSON) into the trainer's
/// configuration. The worker decides threads and device: the attempt's CPUs, and the CUDA
/// ordinals of the GPUs allotted to it (`allotted`, ids from the worker's list `worker_gpus`).
/// The ordinals go to the trainer itself; nothing process-wide changes, because two attempts
/// train in this one process at once, each on its own GPU.
fn settings(a: &pb::Assignment, allotted: &[String], worker_gpus: &[String]) -> Result<Settings, String> {
    let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(&a.builtin_json) else {
        return Err("the builtin trial's settings are not a JSON object".into());
    };
    let data = match m.remove("data") {
        Some(Value::String(s)) => s,
        _ => return Err("builtin.data must be the URI of a dataset".into()),
    };
    let asked_threads = match m.remove("data_threads") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| (1..=MAX_LOADER_THREADS as u64).contains(n))
                .ok_or_else(|| format!("builtin.data_threads must be 1 to {MAX_LOADER_THREADS}, not {v}"))?
                as usize,
        ),
    };
    let feature_cache = match m.remove("feature_cache") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(v) => return Err(format!("builtin.feature_cache must be true or false, not {v}")),
    };
    let cpus = a.resources.map_or(1, |r| r.cpus.max(1)) as usize;
    let devices = allotted
        .iter()
        .map(|id| {
            crate::gpu::ordinal_of(worker_gpus, id).ok_or_else(|| {
                format!("GPU {id} was allotted to this attempt but is not one of the worker's ({worker_gpus:?})")
            })
        })
        .collect::<Result<Vec<usize>, String>>()?;
    m.insert("threads".into(), json!(cpus));
    m.insert("device".into(), json!(if devices.is_empty() { "cpu" } else { "cuda" }));
    m.insert("cuda_devices".into(), json!(devices));
    let config: TrainConfig = serde_json::from_value(Value::Object(m)).map_err(|e| format!("builtin settings: {e}"))?;
    config.validate().map_err(|e| format!("builtin settings: {e}"))?;
    // A GPU trainer needs one CPU to feed the GPU; the slot's other CPUs are spare and
    // featurise. A CPU trainer uses every CPU of its slot for its own threads.
    let data_threads = asked_threads.unwrap_or(if devices.is_empty() { 1 } else { (cpus - 1).max(1) });
    Ok(Settings {
        data,
        config,
        data_threads: data_threads.min(MAX_LOADER_THREADS),
        feature_cache,
    })
}

/// Runs the attempt; returns what its `Exited` event says.
pub(super) async fn run(
    ctx: &super::RunnerContext,
    a: &pb::Assignment,
    gpu_ids: &[String],
    events: &Events,
    stop: &mut watch::Receiver<Option<Stop>>,
    p: Prepared,
) -> pb::Exited {
    let Settings {
        data,
        mut config,
        data_threads,
        feature_cache,
    } = match settings(a, gpu_ids, &ctx.gpus) {
        Ok(s) => s,
        Err(message) => return exited(pb::ExitKind::Failed, None, message),
    };
    let storage = match ctx.stores.open(&data) {
        Ok(s) => s,
        Err(e) => return exited(pb::ExitKind::Failed, None, format!("cannot open dataset {data}: {e}")),
    };
    let manifest = match chorus_dataset::read_manifest(&storage).await {
        Ok(m) => m,
        Err(e) => return exited(pb::ExitKind::Failed, None, format!("dataset {data}: {e}")),
    };
    // The model is sized to the dataset: its vocabulary and its classes.
    if let crate::models::ModelConfig::Multimodal(m) = &mut config.model {
        m.text.vocab_size = manifest.vocabulary.len() as i64;
        m.classifier.num_classes = manifest.classes.len() as i64;
    }
    if config.class_counts.is_none() {
        config.class_counts = Some(manifest.class_counts(Split::Train).iter().map(|&c| c as f64).collect());
    }
    let classes = manifest.classes.clone();
    let source_config = ShardSourceConfig {
        batch_size: config.batch_size as i64,
        seed: config.seed,
        text_len: TEXT_LEN,
        audio_frames: AUDIO_FRAMES,
        prefetch: 4,
        cache_dir: ctx.data_dir.join("shard-cache"),
        cache_bytes: SHARD_CACHE_BYTES,
        threads: data_threads,
        feature_cache,
    };
    let runtime = tokio::runtime::Handle::current();
    let opened =
        tokio::task::spawn_blocking(move || ShardSource::open(storage, manifest, None, source_config, runtime)).await;
    let source = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return exited(pb::ExitKind::Failed, None, format!("dataset {data}: {e}")),
        Err(e) => return exited(pb::ExitKind::Failed, None, format!("dataset loader: {e}")),
    };
    let trainer_root = p.checkpoint_dir.with_file_name("trainer");
    let parallel = if a.world_size > 1 || a.data_parallel {
        let shards = source.shard_sizes();
        match join_group(ctx, a, shards, &config, &p, stop).await {
            Ok(dp) => Some(dp),
            Err(super::rendezvous::Missed::Stopped(s)) => return super::stopped_before_start(s),
            Err(super::rendezvous::Missed::Failed(m)) => return exited(pb::ExitKind::Failed, None, m),
        }
    } else {
        None
    };
    let job = TrainerJob {
        config,
        source: Box::new(source),
        checkpoint_root: trainer_root,
        // Rank 0 restores; the other ranks take its state over the collective.
        resume_from: p
            .restored_step()
            .filter(|_| a.rank == 0)
            .map(|_| p.checkpoint_dir.clone()),
        parallel,
    };
    let mut trainer = match trainer::spawn(job) {
        Ok(t) => t,
        Err(e) => return exited(pb::ExitKind::Failed, None, e.to_string()),
    };
    let checkpoint_dir = p.checkpoint_dir.clone();
    let (mut lines, recorder) = super::start_recording(a, events, p, ctx.store_retry);

    let control = trainer.control();
    let timeout = (a.timeout_ms > 0).then(|| Duration::from_millis(a.timeout_ms));
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut ending: Option<super::Ending> = None;
    let mut failure: Option<String> = None;
    let mut outcome: Option<Outcome> = None;
    loop {
        tokio::select! {
            // Not taken while the backlog is full: the trainer then waits on its event channel.
            ev = trainer.events.recv(), if lines.has_room() => match ev {
                Some(TrainerEvent::Finished(o)) => outcome = Some(o),
                Some(TrainerEvent::Failed { error }) => {
                    lines.handle(format!("training failed: {error}"));
                    failure = Some(error);
                }
                Some(ev) => handle_event(ev, &classes, &checkpoint_dir, &mut lines).await,
                None => break,
            },
            _ = lines.room(), if !lines.has_room() => {}
            _ = super::sleep_until(deadline), if ending.is_none() => {
                info!(trial = a.trial_id, attempt = a.attempt, "builtin trial timed out; stopping its trainer");
                ending = Some(super::Ending::TimedOut(timeout.unwrap_or_default()));
                control.kill();
            }
            changed = stop.changed(), if ending.is_none() => {
                if changed.is_err() {
                    ending = Some(super::Ending::Shutdown);
                    control.pause();
                    continue;
                }
                let Some(s) = stop.borrow_and_update().clone() else { continue };
                ending = Some(match s {
                    Stop::Kill(reason) => {
                        control.kill();
                        super::Ending::Killed(reason)
                    }
                    // Shutting down keeps the progress: the trainer checkpoints, then stops.
                    Stop::Shutdown => {
                        control.pause();
                        super::Ending::Shutdown
                    }
                });
            }
        }
    }
    let joined = tokio::task::spawn_blocking(move || trainer.join()).await;
    drop(lines);
    let unstored = recorder.await.unwrap_or_else(|e| {
        tracing::warn!(trial = a.trial_id, attempt = a.attempt, error = %e, "the trial's recorder failed");
        super::records::Unstored {
            error: Some(format!("the recorder failed: {e}")),
            ..Default::default()
        }
    });
    if let Ok(Err(e)) = joined
        && failure.is_none()
    {
        failure = Some(e.to_string());
    }
    let mut result = match (ending, failure, outcome) {
        (_, Some(error), _) => exited(pb::ExitKind::Failed, None, error),
        (Some(super::Ending::TimedOut(t)), ..) => {
            exited(pb::ExitKind::TimedOut, None, format!("timed out after {t:?}"))
        }
        (Some(super::Ending::Killed(reason)), ..) => exited(pb::ExitKind::Killed, None, kill_message(reason)),
        (Some(super::Ending::Shutdown), ..) => exited(
            pb::ExitKind::Interrupted,
            None,
            "stopped because the worker shut down".into(),
        ),
        (None, None, Some(Outcome::Completed { .. })) => exited(pb::ExitKind::Succeeded, Some(0), String::new()),
        // Ranks pause together: another rank's worker is shutting down, and this rank stopped at
        // the same step after rank 0's checkpoint. Not the trial's fault either.
        (None, None, Some(Outcome::Paused { .. })) => exited(
            pb::ExitKind::Interrupted,
            None,
            "paused with the other ranks: a worker of this trial shut down".into(),
        ),
        (None, None, _) => exited(
            pb::ExitKind::Failed,
            None,
            "the trainer stopped without finishing".into(),
        ),
    };
    unstored.amend(&mut result);
    result
}

/// Meets the other ranks: announces this rank's collective listener (rank 0 also what the data
/// plan is made from: the shards and where its checkpoint stands), then connects the ring.
async fn join_group(
    ctx: &super::RunnerContext,
    a: &pb::Assignment,
    shards: Result<Vec<chorus_core::shards::ShardSize>, crate::error::WorkerError>,
    config: &TrainConfig,
    p: &Prepared,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Result<DataParallel, Missed> {
    let failed = |m: String| Missed::Failed(m);
    // On GPUs the gradients are reduced by NCCL; rank 0 makes the communicator's id and the
    // rendezvous hands it to the others. The ring's listener is still announced (and unused).
    let gpu = config.device == DeviceChoice::Cuda;
    let nccl_id = if gpu && a.rank == 0 {
        NcclCollective::unique_id().map_err(|e| failed(e.to_string()))?
    } else {
        Vec::new()
    };
    let listener = RingListener::bind(ctx.advertise_address).map_err(|e| failed(e.to_string()))?;
    let data = if a.rank == 0 {
        let shards = shards.map_err(|e| failed(e.to_string()))?;
        let counters = match p.restored_step() {
            Some(_) => Some(read_counters(&p.checkpoint_dir).map_err(|e| failed(e.to_string()))?),
            None => None,
        };
        let position_json = counters
            .as_ref()
            .and_then(|c| c.cursor.as_ref())
            .filter(|c| !c.detail.is_null())
            .map(|c| c.detail.to_string())
            .unwrap_or_default();
        Some(pb::DataPlanRequest {
            shards: shards
                .into_iter()
                .map(|s| pb::ShardSize {
                    key: s.key,
                    samples: s.samples,
                })
                .collect(),
            seed: config.seed,
            batch_size: config.batch_size as u64,
            position_json,
            epoch: counters.map_or(0, |c| c.epoch),
        })
    } else {
        None
    };
    let request = pb::RendezvousRequest {
        worker_id: ctx.worker_id.clone(),
        trial_id: a.trial_id,
        attempt: a.attempt,
        rank: a.rank,
        address: listener.local_addr().to_string(),
        nccl_id,
        data,
        // The agent stamps the epoch of the registration it calls under.
        epoch: 0,
    };
    let met = super::rendezvous::meet(ctx.rendezvous.as_ref(), request, ctx.rendezvous_timeout, stop).await?;
    let position: DataPosition = serde_json::from_str(&met.position_json)
        .map_err(|e| failed(format!("rendezvous gave no usable data position: {e}")))?;
    let peers = met
        .addresses
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<std::net::SocketAddr>, _>>()
        .map_err(|e| {
            failed(format!(
                "rendezvous gave a bad peer address in {:?}: {e}",
                met.addresses
            ))
        })?;
    let ring_config = RingConfig {
        timeout: ctx.collective_timeout,
        ..RingConfig::default()
    };
    let (rank, session, world) = (a.rank as usize, met.session, met.world_size as usize);
    // The communicator and its stream live on the trainer's own GPU.
    let ordinal = config.cuda_device();
    let timeout = ctx.collective_timeout;
    let collective: Box<dyn Collective> =
        tokio::task::spawn_blocking(move || -> Result<Box<dyn Collective>, String> {
            if gpu {
                crate::torch::load_cuda().map_err(|e| format!("cannot load libtorch_cuda.so: {e}"))?;
                let nccl =
                    NcclCollective::new(rank, world, &met.nccl_id, ordinal, timeout).map_err(|e| e.to_string())?;
                Ok(Box::new(nccl))
            } else {
                let ring =
                    RingCollective::connect(listener, rank, &peers, session, ring_config).map_err(|e| e.to_string())?;
                Ok(Box::new(ring))
            }
        })
        .await
        .map_err(|e| failed(format!("joining the collective: {e}")))?
        .map_err(failed)?;
    let sample_trace = std::env::var_os(SAMPLE_TRACE_ENV).map(|dir| {
        std::path::PathBuf::from(dir)
            .join(format!("trial-{}", a.trial_id))
            .join(format!("attempt-{}", a.attempt))
    });
    Ok(DataParallel {
        collective,
        position,
        bucket_bytes: config.bucket_bytes,
        sample_trace,
    })
}

/// Set on a worker, every rank of a data-parallel builtin trial appends the keys of the samples
/// it trained on, per step, under this directory: a lineage to audit exactly-once reading.
pub const SAMPLE_TRACE_ENV: &str = "CHORUS_SAMPLE_TRACE_DIR";

/// A report of the trainer at `step`.
fn report<'a>(step: u64, values: impl IntoIterator<Item = (&'a str, f64)>) -> MetricReport {
    MetricReport {
        step: Some(step as i64),
        values: values.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

/// Turns one trainer event into log lines and metric reports, and a checkpoint into a commit.
async fn handle_event(ev: TrainerEvent, classes: &[String], checkpoint_dir: &Path, lines: &mut Output) {
    match ev {
        TrainerEvent::Started {
            device,
            parameters,
            threads,
            resumed_at_step,
        } => {
            let resumed = resumed_at_step.map_or(String::new(), |s| format!(", resumed at step {s}"));
            lines.handle(format!(
                "training on {device} with {threads} thread(s), {parameters} parameters{resumed}"
            ));
        }
        TrainerEvent::TrainLoss { epoch, step, loss, lr } => {
            lines.report(report(
                step,
                [("epoch", epoch as f64), ("train_loss", loss), ("lr", lr)],
            ));
        }
        TrainerEvent::GanLoss {
            epoch,
            step,
            generator,
            discriminator,
        } => {
            lines.report(report(
                step,
                [
                    ("epoch", epoch as f64),
                    ("generator_loss", generator),
                    ("discriminator_loss", discriminator),
                ],
            ));
        }
        TrainerEvent::Epoch(r) => {
            let v = &r.validation;
            let name = |i: usize| classes.get(i).cloned().unwrap_or_else(|| i.to_string());
            let mut summary = report(
                r.step,
                [
                    ("epoch", r.epoch as f64),
                    ("train_loss", r.train_loss),
                    ("val_loss", v.loss),
                    ("val_accuracy", v.accuracy),
                    ("macro_f1", v.macro_f1),
                ],
            );
            for (i, f1) in v.per_class_f1.iter().enumerate() {
                summary.values.insert(format!("f1_{}", name(i)), *f1);
            }
            if let Some(g) = r.generator_loss {
                summary.values.insert("generator_loss".into(), g);
            }
            if let Some(d) = r.discriminator_loss {
                summary.values.insert("discriminator_loss".into(), d);
            }
            lines.handle(format!(
                "epoch {}: validation on {} samples; confusion matrix (rows: true class, columns: predicted) {}",
                r.epoch,
                v.samples,
                json!(v.confusion)
            ));
            // The confusion matrix as counts `confusion.<true>.<predicted>`, in its own report
            // before the epoch's summary, so the summary stays the trial's latest report.
            let mut confusion = report(r.step, []);
            for (t, row) in v.confusion.iter().enumerate() {
                for (p, count) in row.iter().enumerate() {
                    confusion
                        .values
                        .insert(format!("confusion.{}.{}", name(t), name(p)), *count as f64);
                }
            }
            lines.report(confusion);
            lines.report(summary);
        }
        TrainerEvent::Checkpoint {
            step,
            dir,
            data_position,
            ..
        } => {
            let target = checkpoint_dir.to_path_buf();
            let copied = tokio::task::spawn_blocking(move || replace_dir(&dir, &target)).await;
            match copied {
                Ok(Ok(())) => lines.checkpoint(step, data_position.unwrap_or_default()),
                Ok(Err(e)) => lines.handle(format!("cannot stage the checkpoint of step {step}: {e}")),
                Err(e) => lines.handle(format!("cannot stage the checkpoint of step {step}: {e}")),
            }
        }
        TrainerEvent::Finished(_) | TrainerEvent::Failed { .. } => {}
    }
}

/// Makes `target` hold exactly the files of `source` (flat), then removes `source`.
fn replace_dir(source: &Path, target: &Path) -> std::io::Result<()> {
    if target.exists() {
        std::fs::remove_dir_all(target)?;
    }
    std::fs::create_dir_all(target)?;
    for entry in std::fs::read_dir(source)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), target.join(entry.file_name()))?;
        }
    }
    std::fs::remove_dir_all(source)
}

#[cfg(test)]
mod tests;
