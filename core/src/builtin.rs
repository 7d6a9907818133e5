//! The `builtin` trial kind: a model from the worker's model zoo, trained in-process on a
//! sharded dataset. The experiment file gives the trainer's settings here; the model's own
//! configuration (`model`) is a free-form object that the worker validates against its models.
//!
//! Every field may be swept: a string that is exactly `${params.NAME}` takes the parameter's
//! value with its type (`lr: ${params.lr}` becomes a number), and other strings have their
//! references replaced as text ([`crate::template::substitute_tree`]).

use crate::space::{self, Params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Trainer settings of a builtin trial, after parameter substitution. The fields mirror the
/// worker's trainer configuration, so a typo is caught at submission; the worker sets the
/// threads (the trial's cpus) and the device (CUDA when the trial has GPUs) itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltinSpec {
    /// The model and the modalities it uses, e.g. `{kind: multimodal, fusion: {kind: concat}}`.
    #[serde(default = "empty_object")]
    pub model: Value,
    /// URI of a dataset directory (its `manifest.json` and shards).
    pub data: String,
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    /// Stop after this many optimiser steps, whatever the epochs.
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default)]
    pub optimizer: Optimizer,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Momentum for `sgd`.
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    #[serde(default)]
    pub warmup_steps: u64,
    /// For `step`: multiply the rate by `lr_gamma` every `lr_step_epochs` epochs.
    #[serde(default = "default_step_epochs")]
    pub lr_step_epochs: u64,
    #[serde(default = "default_gamma")]
    pub lr_gamma: f64,
    /// Floor of the cosine schedule.
    #[serde(default)]
    pub lr_min: f64,
    /// Seeds initialisation, shuffling and dropout; a restarted trial reuses it.
    #[serde(default)]
    pub seed: u64,
    /// Report the training loss every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Also checkpoint every this many steps (always at each epoch's end).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Relative class frequencies for GAN augmentation; from the dataset when absent.
    #[serde(default)]
    pub class_counts: Option<Vec<f64>>,
    /// Data-parallel trials: bytes of gradients fused into one all-reduce.
    #[serde(default = "default_bucket_bytes")]
    pub bucket_bytes: u64,
    /// Arithmetic of the forward pass: `fp32`, or mixed precision (`bf16`, `fp16` with loss
    /// scaling) with the weights and the optimiser kept in fp32.
    #[serde(default)]
    pub precision: Precision,
    /// Threads that load and featurise the dataset (1 to 32); by default the slot's spare CPUs:
    /// all but one on a GPU trial, one on a CPU trial.
    #[serde(default)]
    pub data_threads: Option<u32>,
    /// Keep each shard's features (log-mel, tokens, pixels) in the worker's shard cache too, so
    /// epochs after the first skip parsing and featurising; about doubles the cache's use.
    #[serde(default)]
    pub feature_cache: bool,
}

/// The arithmetic of a builtin trial's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in 32-bit floats.
    #[default]
    Fp32,
    /// Autocast to bfloat16: fp32's range, so no loss scaling.
    Bf16,
    /// Autocast to float16 with dynamic loss scaling (fp16's range is small).
    Fp16,
}

/// The most data loader threads a builtin trial may ask for.
pub const MAX_DATA_THREADS: u32 = 32;

/// 25 MiB, the size PyTorch DDP fuses by default: big enough to amortise a collective's latency.
pub const DEFAULT_BUCKET_BYTES: u64 = 25 * 1024 * 1024;

fn default_bucket_bytes() -> u64 {
    DEFAULT_BUCKET_BYTES
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn default_epochs() -> u64 {
    10
}

fn default_batch_size() -> u32 {
    64
}

fn default_lr() -> f64 {
    1e-3
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}

fn default_eps() -> f64 {
    1e-8
}

fn default_step_epochs() -> u64 {
    10
}

fn default_gamma() -> f64 {
    0.1
}

fn default_log_every() -> u64 {
    10
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    #[default]
    Adam,
    Adamw,
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    None,
    Cosine,
    Step,
}

impl BuiltinSpec {
    /// Checks values serde cannot: returns `(field, message)` pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.epochs == 0 {
            out.push(("epochs", "must be at least 1".to_string()));
        }
        if self.batch_size == 0 {
            out.push(("batch_size", "must be at least 1".to_string()));
        }
        if self.bucket_bytes < 1024 {
            out.push((
                "bucket_bytes",
                format!("must be at least 1024, got {}", self.bucket_bytes),
            ));
        }
        if self.log_every == 0 || self.checkpoint_every == Some(0) {
            out.push((
                "log_every",
                "log_every and checkpoint_every must be at least 1".to_string(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            out.push(("lr", format!("must be a positive number, got {}", self.lr)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            out.push((
                "weight_decay",
                format!("must be zero or positive, got {}", self.weight_decay),
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            out.push(("momentum", format!("must be in [0, 1), got {}", self.momentum)));
        }
        if let Some(n) = self.data_threads
            && !(1..=MAX_DATA_THREADS).contains(&n)
        {
            out.push(("data_threads", format!("must be 1 to {MAX_DATA_THREADS}, got {n}")));
        }
        if !self.model.is_object() {
            out.push(("model", "must be a mapping describing the model".to_string()));
        }
        if let Err(e) = crate::storage::StorageUri::parse(&self.data) {
            out.push(("data", e.to_string()));
        }
        out
    }
}

/// A representative value of every parameter, to type-check a builtin spec before any trial
/// exists: the first grid value, or the middle of a continuous range.
pub fn representative(space: &space::Space) -> Params {
    space
        .iter()
        .map(|(k, p)| {
            let v = match p {
                space::Param::Uniform { min, max } | space::Param::QUniform { min, max, .. } => {
                    serde_json::json!((min + max) / 2.0)
                }
                space::Param::LogUniform { min, max } => serde_json::json!((min * max).sqrt()),
                // The geometric middle, as an integer: a builtin field typed as one must see one.
                space::Param::LogIntUniform { min, max } => {
                    let mid = ((*min as f64).ln() + (*max as f64).ln()) / 2.0;
                    Value::from(space::log_int_draw(mid, *min, *max))
                }
                other => other.grid_value(0).unwrap_or(Value::Null),
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn problems_are_named() {
        let spec: BuiltinSpec =
            serde_json::from_value(json!({"model": {}, "data": "memory://d", "epochs": 0, "lr": -1.0})).unwrap();
        let fields: Vec<&str> = spec.problems().iter().map(|p| p.0).collect();
        assert_eq!(fields, vec!["epochs", "lr"]);
    }
}
