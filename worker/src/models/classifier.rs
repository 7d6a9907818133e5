//! The emotion head: fused embedding to class logits, through one hidden layer (ReLU, dropout)
//! or, with `hidden: 0`, a single linear layer.

use super::layers::{self, Ctx};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{self, Module};

/// anger, disgust, fear, happiness, sadness, surprise, neutral.
pub const EMOTION_CLASSES: i64 = 7;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    pub hidden: i64,
    pub dropout: f64,
    pub num_classes: i64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            hidden: 256,
            dropout: 0.2,
            num_classes: EMOTION_CLASSES,
        }
    }
}

#[derive(Debug)]
pub struct Classifier {
    hidden: Option<nn::Linear>,
    out: nn::Linear,
    dropout: f64,
}

impl Classifier {
    pub fn new(p: &nn::Path, input: i64, c: &ClassifierConfig) -> Result<Self, String> {
        if c.num_classes < 2 || c.hidden < 0 || !(0.0..1.0).contains(&c.dropout) {
            return Err("classifier: num_classes >= 2, hidden >= 0 and dropout in [0, 1) are needed".into());
        }
        let (hidden, width) = if c.hidden > 0 {
            (Some(layers::linear(p / "hidden", input, c.hidden)), c.hidden)
        } else {
            (None, input)
        };
        Ok(Classifier {
            hidden,
            out: layers::linear(p / "out", width, c.num_classes),
            dropout: c.dropout,
        })
    }

    /// `x` `[B, D]` -> logits `[B, K]`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Tensor {
        let x = match &self.hidden {
            Some(h) => ctx.dropout(&h.forward(x).relu(), self.dropout), // [B, hidden]
            None => ctx.dropout(x, self.dropout),                       // [B, D]
        };
        self.out.forward(&x) // [B, K]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn maps_embeddings_to_seven_logits() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = Classifier::new(&vs.root(), 10, &ClassifierConfig::default()).unwrap();
        let y = c.forward(&Tensor::randn([4, 10], (Kind::Float, Device::Cpu)), &Ctx::eval());
        assert_eq!(y.size(), [4, 7]);
        assert_eq!(layers::parameter_count(&vs), 10 * 256 + 256 + 256 * 7 + 7);
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = ClassifierConfig {
            hidden: 0,
            ..Default::default()
        };
        Classifier::new(&vs.root(), 10, &linear).unwrap();
        assert_eq!(layers::parameter_count(&vs), 10 * 7 + 7);
    }

    #[test]
    fn refuses_a_dropout_of_one() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = ClassifierConfig {
            dropout: 1.0,
            ..Default::default()
        };
        assert!(Classifier::new(&vs.root(), 10, &c).is_err());
    }
}
