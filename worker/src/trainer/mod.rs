//! The built-in trainer: trains a model from [`crate::models`] on batches from a
//! [`BatchSource`], on a dedicated OS thread, never on the async runtime.
//!
//! It talks only through channels and a flag: [`spawn`] takes the config and the source, and
//! returns a [`TrainerHandle`] whose events (losses, epoch metrics, checkpoints, the outcome)
//! arrive in order on an unbounded channel, and whose [`Control`] asks for a pause (checkpoint,
//! then stop) or a kill (stop now); either takes effect at the next step boundary.
//!
//! On the CPU a run is deterministic given its seed: initialisation uses libtorch's generator
//! seeded under a process-wide lock, and every draw during training derives from
//! (seed, epoch, step). A run resumed from a checkpoint therefore takes exactly the steps the
//! uninterrupted run took (bit for bit with one intra-op thread).

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod precision;
mod training;

pub use config::{DeviceChoice, LrSchedule, TrainConfig};
pub use optim::OptimizerKind;
pub use precision::Precision;
pub use training::{DataParallel, StepResult, Trainer};

use crate::data::BatchSource;
use crate::error::WorkerError;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use tokio::sync::mpsc;

/// What the trainer reports, in order. Epochs are numbered from 1 (the epoch in progress, or
/// for `Epoch` the one just finished); `step` counts optimiser steps taken in all.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainerEvent {
    Started {
        device: String,
        parameters: i64,
        threads: usize,
        /// The step the run continues from, when it was resumed.
        resumed_at_step: Option<u64>,
    },
    /// Mean training loss over the steps since the last report.
    TrainLoss {
        epoch: u64,
        step: u64,
        loss: f64,
        lr: f64,
    },
    /// Mean GAN losses over the same steps, for models with a GAN.
    GanLoss {
        epoch: u64,
        step: u64,
        generator: f64,
        discriminator: f64,
    },
    Epoch(EpochReport),
    /// A complete checkpoint now lies in `dir`; `epoch` is the one a resume from it continues in.
    Checkpoint {
        epoch: u64,
        step: u64,
        dir: PathBuf,
        /// For a data-parallel run: where its data stands in it (core's `DataPosition`, JSON).
        #[serde(skip_serializing_if = "Option::is_none")]
        data_position: Option<String>,
    },
    /// The last event of a run that ended normally.
    Finished(Outcome),
    /// The last event of a run that failed; the message names the cause.
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochReport {
    pub epoch: u64,
    pub step: u64,
    /// Mean over the epoch's steps.
    pub train_loss: f64,
    pub generator_loss: Option<f64>,
    pub discriminator_loss: Option<f64>,
    pub validation: Validation,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Validation {
    pub samples: u64,
    /// Mean cross-entropy per sample.
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class_f1: Vec<f64>,
    /// Rows are true classes, columns predicted ones.
    pub confusion: Vec<Vec<u64>>,
}

impl Validation {
    /// The figures of a confusion matrix and the summed loss over its samples.
    pub fn from_confusion(confusion: &metrics::Confusion, loss_sum: f64) -> Self {
        let samples = confusion.total();
        Validation {
            samples,
            loss: if samples == 0 { 0.0 } else { loss_sum / samples as f64 },
            accuracy: confusion.accuracy(),
            macro_f1: confusion.macro_f1(),
            per_class_f1: confusion.per_class_f1(),
            confusion: confusion.rows(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// All epochs (or `max_steps`) done; `epoch` counts the epochs completed.
    Completed { epoch: u64, step: u64 },
    /// Stopped on request after saving the state in `checkpoint`.
    Paused { step: u64, checkpoint: PathBuf },
    /// Stopped on request without saving.
    Killed { step: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    Pause,
    Kill,
}

/// Asks a running trainer to stop at its next step boundary. Kill wins over pause.
#[derive(Debug, Clone, Default)]
pub struct Control(Arc<AtomicU8>);

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const KILL: u8 = 2;

impl Control {
    pub fn new() -> Self {
        Control::default()
    }

    /// Checkpoint, then stop.
    pub fn pause(&self) {
        let _ = self.0.compare_exchange(RUN, PAUSE, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Stop without a checkpoint.
    pub fn kill(&self) {
        self.0.store(KILL, Ordering::SeqCst);
    }

    pub fn requested(&self) -> Option<StopRequest> {
        match self.0.load(Ordering::SeqCst) {
            PAUSE => Some(StopRequest::Pause),
            KILL => Some(StopRequest::Kill),
            _ => None,
        }
    }
}

/// One run of the trainer.
pub struct TrainerJob {
    pub config: TrainConfig,
    pub source: Box<dyn BatchSource>,
    /// Checkpoints are written to `checkpoint_root/step-NNNNNNNNNNNN/`.
    pub checkpoint_root: PathBuf,
    /// A checkpoint directory to continue from.
    pub resume_from: Option<PathBuf>,
    /// For one rank of a data-parallel run: its collective and starting data position. Rank 0
    /// resumes from `resume_from`; every rank then takes rank 0's state.
    pub parallel: Option<DataParallel>,
}

pub struct TrainerHandle {
    pub events: mpsc::UnboundedReceiver<TrainerEvent>,
    control: Control,
    thread: std::thread::JoinHandle<Result<Outcome, WorkerError>>,
}

impl TrainerHandle {
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Waits for the thread (blocking: from async code, call it once `events` has closed, or
    /// through `spawn_blocking`).
    pub fn join(self) -> Result<Outcome, WorkerError> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(WorkerError::Task("the trainer thread panicked".into())))
    }
}

/// Starts a trainer on its own OS thread. Its last event is `Finished` or `Failed`, after which
/// the channel closes.
pub fn spawn(job: TrainerJob) -> Result<TrainerHandle, WorkerError> {
    let (tx, events) = mpsc::unbounded_channel();
    let control = Control::new();
    let thread_control = control.clone();
    let thread = std::thread::Builder::new()
        .name("chorus-trainer".into())
        .spawn(move || {
            let mut emit = |e: TrainerEvent| {
                // A receiver that went away wants no more reports; training still ends properly.
                let _ = tx.send(e);
            };
            let result = run_job(job, &thread_control, &mut emit);
            emit(match &result {
                Ok(outcome) => TrainerEvent::Finished(outcome.clone()),
                Err(e) => TrainerEvent::Failed { error: e.to_string() },
            });
            result
        })
        .map_err(|e| WorkerError::Task(format!("cannot start the trainer thread: {e}")))?;
    Ok(TrainerHandle {
        events,
        control,
        thread,
    })
}

fn run_job(job: TrainerJob, control: &Control, emit: &mut dyn FnMut(TrainerEvent)) -> Result<Outcome, WorkerError> {
    let TrainerJob {
        config,
        mut source,
        checkpoint_root,
        resume_from,
        parallel,
    } = job;
    crate::torch::prepare(config.threads);
    let threads = config.threads.max(1);
    let mut trainer = match &resume_from {
        Some(dir) => Trainer::resume(config, dir)?,
        None => Trainer::new(config)?,
    };
    let Some(mut dp) = parallel else {
        emit(TrainerEvent::Started {
            device: format!("{:?}", trainer.device()),
            parameters: trainer.parameters(),
            threads,
            resumed_at_step: resume_from.is_some().then(|| trainer.step()),
        });
        return trainer.run(source.as_mut(), control, &checkpoint_root, emit);
    };
    trainer.sync_from_rank0(dp.collective.as_mut())?;
    if dp.collective.rank() == 0 {
        emit(TrainerEvent::Started {
            device: format!("{:?} (rank 0 of {})", trainer.device(), dp.collective.world_size()),
            parameters: trainer.parameters(),
            threads,
            resumed_at_step: resume_from.is_some().then(|| trainer.step()),
        });
    }
    trainer.run_parallel(source.as_mut(), control, &checkpoint_root, dp, emit)
}

#[cfg(test)]
mod tests;
