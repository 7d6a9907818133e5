//! emotion-bench, the fixed reference model of the throughput benchmarks, layer for layer as in
//! `shared/emotion-bench.md` and `bench/emotion_bench.py` (1,436,615 parameters):
//! three conv3x3-BN-ReLU blocks (1->32->64->128, max-pool after the first two, global average
//! pool), Embedding(8000, 128) + LSTM(128, 128) over 32 tokens, LSTM(40, 128) over 64 frames,
//! and Linear(384, 256)-ReLU-Dropout(0.2)-Linear(256, 7). It takes every modality, unmasked.

use super::layers::{self, Ctx};
use super::{EmotionModel, classifier::EMOTION_CLASSES};
use crate::data::Batch;
use crate::error::WorkerError;
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{self, Module, ModuleT, RNN};

pub const VOCAB: i64 = 8000;
pub const TEXT_LEN: i64 = 32;
pub const AUDIO_FRAMES: i64 = 64;
pub const AUDIO_BANDS: i64 = 40;
pub const IMAGE_SIZE: i64 = 48;
pub const PARAMETERS: i64 = 1_436_615;

/// The layers are fixed so figures compare across runs. Two switches exist for comparing runs
/// that split a batch differently (data-parallel against single-rank): without batch
/// statistics and dropout a sample's output no longer depends on its batch or its rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmotionBenchConfig {
    /// false: batch-norm layers use their running statistics in training too.
    pub batch_stats: bool,
    /// Dropout before the last layer.
    pub dropout: f64,
}

impl Default for EmotionBenchConfig {
    fn default() -> Self {
        EmotionBenchConfig {
            batch_stats: true,
            dropout: 0.2,
        }
    }
}

#[derive(Debug)]
pub struct EmotionBench {
    blocks: Vec<(nn::Conv2D, nn::BatchNorm)>,
    embedding: nn::Embedding,
    text_lstm: nn::LSTM,
    audio_lstm: nn::LSTM,
    fc1: nn::Linear,
    fc2: nn::Linear,
    config: EmotionBenchConfig,
}

impl EmotionBench {
    pub fn new(p: &nn::Path, config: EmotionBenchConfig) -> Self {
        let image = p / "image";
        let blocks = [(1, 32), (32, 64), (64, 128)]
            .iter()
            .enumerate()
            .map(|(n, &(i, o))| {
                (
                    layers::conv2d(&image / format!("conv{n}"), i, o, 3),
                    layers::batch_norm2d(&image / format!("bn{n}"), o),
                )
            })
            .collect();
        EmotionBench {
            blocks,
            embedding: layers::embedding(p / "text" / "embedding", VOCAB, 128),
            text_lstm: layers::lstm(p / "text" / "lstm", 128, 128, 1),
            audio_lstm: layers::lstm(p / "audio" / "lstm", AUDIO_BANDS, 128, 1),
            fc1: layers::linear(p / "head" / "fc1", 384, 256),
            fc2: layers::linear(p / "head" / "fc2", 256, EMOTION_CLASSES),
            config,
        }
    }

    fn image(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = layers::channels_last(x); // [B, 1, 48, 48]
        for (n, (conv, bn)) in self.blocks.iter().enumerate() {
            x = bn.forward_t(&x.apply(conv), train && self.config.batch_stats).relu(); // [B, 32|64|128, 48|24|12, 48|24|12]
            if n < 2 {
                x = x.max_pool2d_default(2); // [B, 32|64, 24|12, 24|12]
            }
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1) // [B, 128]
    }
}

fn required<'a>(t: &'a Option<Tensor>, what: &str) -> Result<&'a Tensor, WorkerError> {
    t.as_ref()
        .ok_or_else(|| WorkerError::Data(format!("emotion-bench needs {what} in every batch")))
}

impl EmotionModel for EmotionBench {
    fn embed(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor, WorkerError> {
        let image = self.image(required(&batch.image, "images")?, ctx.train); // [B, 128]
        let tokens = self.embedding.forward(required(&batch.text, "text")?); // [B, 32, 128]
        let (_, text_state) = self.text_lstm.seq(&tokens); // h: [1, B, 128]
        let (_, audio_state) = self.audio_lstm.seq(required(&batch.audio, "audio")?); // h: [1, B, 128]
        Ok(Tensor::cat(&[image, text_state.h().get(0), audio_state.h().get(0)], 1)) // [B, 384]
    }

    fn classify(&self, fused: &Tensor, ctx: &Ctx) -> Tensor {
        let x = self.fc1.forward(fused).relu(); // [B, 256]
        let x = ctx.dropout(&x, self.config.dropout); // [B, 256]
        self.fc2.forward(&x) // [B, 7]
    }

    fn num_classes(&self) -> i64 {
        EMOTION_CLASSES
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{SyntheticConfig, SyntheticSource};
    use tch::Device;

    #[test]
    fn has_exactly_the_reference_parameter_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = EmotionBench::new(&vs.root(), EmotionBenchConfig::default());
        assert_eq!(layers::parameter_count(&vs), PARAMETERS);
        // BatchNorm running statistics exist but are buffers, not parameters.
        assert_eq!(vs.variables().len(), vs.trainable_variables().len() + 6);
    }

    #[test]
    fn maps_bench_shaped_inputs_to_seven_logits() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = EmotionBench::new(&vs.root(), EmotionBenchConfig::default());
        let src = SyntheticSource::new(SyntheticConfig {
            batch_size: 2,
            ..Default::default()
        })
        .unwrap();
        let batch = src.make_batch(1, 0, 0);
        let ctx = Ctx::eval();
        let fused = model.embed(&batch, &ctx).unwrap();
        assert_eq!(fused.size(), [2, 384]);
        assert_eq!(model.classify(&fused, &ctx).size(), [2, 7]);
    }
}
