//! The built-in emotion-recognition models, one file each, each built from a serde config whose
//! fields all have defaults and whose unknown fields are refused.
//!
//! A model maps a [`Batch`] to a fused embedding (`embed`) and that to class logits (`classify`);
//! the split lets the trainer feed the GAN and its synthetic embeddings in between. Models hold
//! no training state of their own: parameters and BatchNorm statistics live in the `VarStore`
//! they were built in, which is what checkpoints save.

pub mod audio;
pub mod classifier;
pub mod emotion_bench;
pub mod fusion;
pub mod gan;
pub mod image_cnn;
pub mod layers;
pub mod multimodal;
pub mod text_lstm;

use crate::data::Batch;
use crate::error::WorkerError;
use emotion_bench::{EmotionBench, EmotionBenchConfig};
use layers::Ctx;
use multimodal::{Multimodal, MultimodalConfig};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

/// Which model a builtin trial trains: `kind: emotion_bench` (fixed) or `kind: multimodal` with
/// its modalities, encoders, fusion, head and augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// Built once per trial; boxing the large variant would only add noise to every match.
#[allow(clippy::large_enum_variant)]
pub enum ModelConfig {
    EmotionBench(EmotionBenchConfig),
    Multimodal(MultimodalConfig),
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig::Multimodal(MultimodalConfig::default())
    }
}

pub trait EmotionModel {
    /// The fused embedding of each sample: `[B, D]`.
    fn embed(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor, WorkerError>;
    /// Class logits from fused embeddings: `[N, D]` -> `[N, K]`.
    fn classify(&self, fused: &Tensor, ctx: &Ctx) -> Tensor;
    fn num_classes(&self) -> i64;
    /// The conditional GAN over fused embeddings, where the model has one.
    fn gan(&self) -> Option<&gan::ConditionalGan> {
        None
    }
    /// Whether the GAN's samples join the classifier's batches.
    fn augments_with_gan(&self) -> bool {
        false
    }
}

/// Builds the model under the root of `vs` (on the store's device).
pub fn build(config: &ModelConfig, vs: &nn::VarStore) -> Result<Box<dyn EmotionModel>, WorkerError> {
    Ok(match config {
        ModelConfig::EmotionBench(c) => Box::new(EmotionBench::new(&vs.root(), c.clone())),
        ModelConfig::Multimodal(c) => Box::new(Multimodal::new(&vs.root(), c)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Modality;
    use crate::models::fusion::FusionKind;

    #[test]
    fn configs_read_from_yaml_shaped_json_with_defaults() {
        let c: ModelConfig = serde_json::from_str(
            r#"{"kind": "multimodal", "modalities": ["image", "audio"],
                "fusion": {"kind": "gated_attention"}, "audio": {"encoder": "cnn"}, "augment": "gan"}"#,
        )
        .unwrap();
        let ModelConfig::Multimodal(m) = c else {
            panic!("multimodal expected")
        };
        assert_eq!(m.modalities, [Modality::Image, Modality::Audio]);
        assert_eq!(m.fusion.kind, FusionKind::GatedAttention);
        assert_eq!(m.fusion.dim, 128);
        assert_eq!(m.augment, multimodal::Augment::Gan);
        assert_eq!(m.classifier.num_classes, 7);
        let bench: ModelConfig = serde_json::from_str(r#"{"kind": "emotion_bench"}"#).unwrap();
        assert_eq!(bench, ModelConfig::EmotionBench(EmotionBenchConfig::default()));
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused_at_every_level() {
        for bad in [
            r#"{"kind": "multimodal", "fusoin": {}}"#,
            r#"{"kind": "multimodal", "fusion": {"kind": "concat", "size": 3}}"#,
            r#"{"kind": "multimodal", "image": {"chanels": [3]}}"#,
            r#"{"kind": "multimodal", "gan": {"noise": 3}}"#,
            r#"{"kind": "emotion_bench", "hidden": 3}"#,
            r#"{"kind": "transformer"}"#,
            r#"{"modalities": ["image"]}"#,
        ] {
            assert!(serde_json::from_str::<ModelConfig>(bad).is_err(), "accepted {bad}");
        }
    }
}
