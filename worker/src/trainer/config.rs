//! What a builtin trial asks of the trainer: the model, the optimiser and its schedule, the
//! length of training, the seed, and where it runs. Every field has a default; unknown fields
//! are refused, so a typo in a sweep fails the trial instead of being ignored.

use super::optim::{OptimizerKind, OptimizerSettings};
use crate::error::WorkerError;
use crate::models::ModelConfig;
use serde::{Deserialize, Serialize};

/// `none`, `cosine` (from `lr` down to `lr_min` along a half cosine over all steps of all
/// epochs) or `step` (`lr` times `lr_gamma` every `lr_step_epochs` epochs): the spec's type, so
/// the experiment file and the trainer cannot disagree on the names.
pub use chorus_core::builtin::LrSchedule;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA where libtorch finds a GPU, else the CPU.
    #[default]
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub epochs: u64,
    /// Stops after this many optimiser steps in all, even mid-epoch (tests and benchmarks).
    pub max_steps: Option<u64>,
    /// Samples per training batch. The batch source makes the batches; this is for it.
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    /// L2 for adam and sgd, decoupled decay for adamw.
    pub weight_decay: f64,
    /// sgd only.
    pub momentum: f64,
    /// sgd only.
    pub nesterov: bool,
    /// adam and adamw.
    pub betas: [f64; 2],
    pub eps: f64,
    pub lr_schedule: LrSchedule,
    /// Linear warm-up from lr/warmup_steps to the scheduled rate over the first steps.
    pub warmup_steps: u64,
    pub lr_step_epochs: u64,
    pub lr_gamma: f64,
    pub lr_min: f64,
    /// Everything random derives from it: initialisation, dropout, GAN noise.
    pub seed: u64,
    /// Intra-op CPU threads: the worker sets it to its slot's CPU count.
    pub threads: usize,
    pub device: DeviceChoice,
    /// CUDA device ordinals, in this process, of the GPUs the trainer was given; it trains on
    /// the first (ordinal 0 when empty). The worker fills it from the attempt's allotment.
    pub cuda_devices: Vec<usize>,
    /// A `TrainLoss` event (mean over the steps since the last one) every this many steps.
    pub log_every: u64,
    /// A checkpoint every this many steps, besides each epoch's end and the run's.
    pub checkpoint_every: Option<u64>,
    /// Class frequencies of the training set (any unit) for GAN augmentation; without them each
    /// batch's own label counts are used.
    pub class_counts: Option<Vec<f64>>,
    /// Data-parallel runs: bytes of gradients fused into one all-reduce.
    pub bucket_bytes: usize,
    /// The forward pass in fp32, or under autocast to bf16 or fp16 (see [`super::precision`]).
    pub precision: super::Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelConfig::default(),
            epochs: 10,
            max_steps: None,
            batch_size: 64,
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            weight_decay: 0.0,
            momentum: 0.0,
            nesterov: false,
            betas: [0.9, 0.999],
            eps: 1e-8,
            lr_schedule: LrSchedule::None,
            warmup_steps: 0,
            lr_step_epochs: 10,
            lr_gamma: 0.1,
            lr_min: 0.0,
            seed: 0,
            threads: 1,
            device: DeviceChoice::Auto,
            cuda_devices: Vec::new(),
            log_every: 10,
            checkpoint_every: None,
            class_counts: None,
            bucket_bytes: chorus_core::builtin::DEFAULT_BUCKET_BYTES as usize,
            precision: super::Precision::Fp32,
        }
    }
}

impl TrainConfig {
    pub fn optimizer_settings(&self) -> OptimizerSettings {
        OptimizerSettings {
            kind: self.optimizer,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            nesterov: self.nesterov,
            beta1: self.betas[0],
            beta2: self.betas[1],
            eps: self.eps,
        }
    }

    /// The ordinal of the GPU the trainer trains on, when it trains on one.
    pub fn cuda_device(&self) -> usize {
        self.cuda_devices.first().copied().unwrap_or(0)
    }

    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |m: &str| Err(WorkerError::Train(m.to_string()));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be a positive number");
        }
        if self.lr_schedule == LrSchedule::Step && (self.lr_step_epochs == 0 || self.lr_gamma <= 0.0) {
            return bad("the step schedule needs lr_step_epochs > 0 and lr_gamma > 0");
        }
        if self.lr_min < 0.0 || self.lr_min > self.lr {
            return bad("lr_min must lie between 0 and lr");
        }
        if self.log_every == 0 || self.checkpoint_every == Some(0) || self.batch_size == 0 {
            return bad("log_every, checkpoint_every and batch_size must be positive");
        }
        self.optimizer_settings().validate()
    }

    /// The learning rate of the step with 0-based index `step`, in 0-based `epoch`.
    pub fn learning_rate(&self, step: u64, epoch: u64, steps_per_epoch: u64) -> f64 {
        let scheduled = match self.lr_schedule {
            LrSchedule::None => self.lr,
            LrSchedule::Step => self.lr * self.lr_gamma.powi((epoch / self.lr_step_epochs.max(1)) as i32),
            LrSchedule::Cosine => {
                let mut total = self.epochs.saturating_mul(steps_per_epoch);
                if let Some(max) = self.max_steps {
                    total = total.min(max);
                }
                let progress = if total == 0 {
                    1.0
                } else {
                    (step as f64 / total as f64).min(1.0)
                };
                self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        };
        if step < self.warmup_steps {
            scheduled * (step + 1) as f64 / self.warmup_steps as f64
        } else {
            scheduled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_step_and_cosine_schedules() {
        let c = TrainConfig {
            lr: 0.1,
            epochs: 4,
            ..Default::default()
        };
        assert_eq!(c.learning_rate(123, 3, 10), 0.1);

        let step = TrainConfig {
            lr_schedule: LrSchedule::Step,
            lr_step_epochs: 2,
            lr_gamma: 0.5,
            ..c.clone()
        };
        assert_eq!(step.learning_rate(0, 0, 10), 0.1);
        assert_eq!(step.learning_rate(15, 1, 10), 0.1);
        assert_eq!(step.learning_rate(25, 2, 10), 0.05);
        assert!((step.learning_rate(39, 3, 10) - 0.05).abs() < 1e-15);

        let cosine = TrainConfig {
            lr_schedule: LrSchedule::Cosine,
            lr_min: 0.01,
            ..c
        };
        assert_eq!(cosine.learning_rate(0, 0, 10), 0.1);
        assert!(
            (cosine.learning_rate(20, 2, 10) - 0.055).abs() < 1e-12,
            "half-way is the mean"
        );
        assert!((cosine.learning_rate(40, 3, 10) - 0.01).abs() < 1e-12);
        assert!(cosine.learning_rate(10, 1, 10) > cosine.learning_rate(11, 1, 10));
    }

    #[test]
    fn warmup_ramps_linearly() {
        let c = TrainConfig {
            lr: 0.1,
            warmup_steps: 4,
            ..Default::default()
        };
        assert!((c.learning_rate(0, 0, 100) - 0.025).abs() < 1e-15);
        assert!((c.learning_rate(3, 0, 100) - 0.1).abs() < 1e-15);
        assert_eq!(c.learning_rate(4, 0, 100), 0.1);
    }

    #[test]
    fn reads_the_trial_fields_and_refuses_typos() {
        let c: TrainConfig = serde_json::from_str(
            r#"{"model": {"kind": "emotion_bench"}, "optimizer": "adamw", "lr": 0.01,
                "weight_decay": 0.05, "lr_schedule": "cosine", "epochs": 3, "device": "cpu"}"#,
        )
        .unwrap();
        assert_eq!(c.optimizer, OptimizerKind::AdamW);
        assert_eq!(c.lr_schedule, LrSchedule::Cosine);
        assert_eq!(c.device, DeviceChoice::Cpu);
        assert_eq!(c.batch_size, 64);
        c.validate().unwrap();
        assert!(serde_json::from_str::<TrainConfig>(r#"{"learning_rate": 0.1}"#).is_err());
        assert!(serde_json::from_str::<TrainConfig>(r#"{"optimizer": "rmsprop"}"#).is_err());
    }

    #[test]
    fn validation_catches_settings_that_cannot_train() {
        let ok = TrainConfig::default();
        ok.validate().unwrap();
        for bad in [
            TrainConfig { lr: 0.0, ..ok.clone() },
            TrainConfig {
                betas: [1.0, 0.999],
                ..ok.clone()
            },
            TrainConfig {
                optimizer: OptimizerKind::Sgd,
                nesterov: true,
                ..ok.clone()
            },
            TrainConfig {
                log_every: 0,
                ..ok.clone()
            },
            TrainConfig {
                lr_schedule: LrSchedule::Step,
                lr_step_epochs: 0,
                ..ok.clone()
            },
        ] {
            assert!(matches!(bad.validate(), Err(WorkerError::Train(_))), "{bad:?}");
        }
    }
}
