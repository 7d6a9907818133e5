//! Utterance encoder: token embedding and an LSTM, optionally bidirectional; the embedding is the
//! final hidden state at each sample's own last token (and, backwards, at its first).
//!
//! Padding never reaches a final state (see [`layers::FinalStateLstm`]).

use super::layers::{self, Ctx};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{self, Module};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextLstmConfig {
    pub vocab_size: i64,
    pub embedding_dim: i64,
    pub hidden: i64,
    pub layers: i64,
    pub bidirectional: bool,
    pub dropout: f64,
}

impl Default for TextLstmConfig {
    fn default() -> Self {
        TextLstmConfig {
            vocab_size: 8000,
            embedding_dim: 128,
            hidden: 128,
            layers: 1,
            bidirectional: false,
            dropout: 0.0,
        }
    }
}

#[derive(Debug)]
pub struct TextLstm {
    embedding: nn::Embedding,
    lstm: layers::FinalStateLstm,
    dropout: f64,
}

impl TextLstm {
    pub fn new(p: &nn::Path, c: &TextLstmConfig) -> Result<Self, String> {
        if c.vocab_size < 2 || c.embedding_dim < 1 || c.hidden < 1 || c.layers < 1 {
            return Err("text: vocab_size >= 2 and positive embedding_dim, hidden and layers are needed".into());
        }
        // Token 0 is padding: as with PyTorch's padding_idx, its row starts at zero and gets no
        // gradient.
        let embedding = nn::embedding(
            p / "embedding",
            c.vocab_size,
            c.embedding_dim,
            nn::EmbeddingConfig {
                padding_idx: 0,
                ..Default::default()
            },
        );
        tch::no_grad(|| {
            let _ = embedding.ws.get(0).zero_();
        });
        Ok(TextLstm {
            embedding,
            lstm: layers::FinalStateLstm::new(p, c.embedding_dim, c.hidden, c.layers, c.bidirectional),
            dropout: c.dropout,
        })
    }

    pub fn out_dim(&self) -> i64 {
        self.lstm.out_dim()
    }

    /// `tokens` `[B, T]` int64, `lengths` `[B]` (`None`: all `T` real) -> `[B, H * directions]`.
    pub fn forward(&self, tokens: &Tensor, lengths: Option<&Tensor>, ctx: &Ctx) -> Tensor {
        let x = self.embedding.forward(tokens); // [B, T, E]
        let h = self.lstm.forward(&x, lengths); // [B, H * directions]
        ctx.dropout(&h, self.dropout) // [B, H * directions]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tiny(bidirectional: bool) -> (nn::VarStore, TextLstm) {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = TextLstm::new(
            &vs.root(),
            &TextLstmConfig {
                vocab_size: 20,
                embedding_dim: 4,
                hidden: 5,
                bidirectional,
                ..Default::default()
            },
        )
        .unwrap();
        (vs, m)
    }

    #[test]
    fn output_size_follows_directions() {
        let tokens = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([2, 3]);
        let (_vs, uni) = tiny(false);
        assert_eq!(uni.forward(&tokens, None, &Ctx::eval()).size(), [2, 5]);
        let (_vs, bi) = tiny(true);
        assert_eq!(bi.out_dim(), 10);
        assert_eq!(bi.forward(&tokens, None, &Ctx::eval()).size(), [2, 10]);
    }

    #[test]
    fn padding_does_not_change_the_encoding() {
        let (_vs, m) = tiny(true);
        let short = Tensor::from_slice(&[3i64, 7, 9]).view([1, 3]);
        let padded = Tensor::from_slice(&[3i64, 7, 9, 0, 0]).view([1, 5]);
        let a = m.forward(&short, None, &Ctx::eval());
        let b = m.forward(&padded, Some(&Tensor::from_slice(&[3i64])), &Ctx::eval());
        assert!(a.allclose(&b, 1e-6, 1e-6, false), "{a} vs {b}");
        // Without lengths the padding is read as tokens and changes the result.
        let c = m.forward(&padded, None, &Ctx::eval());
        assert!(!a.allclose(&c, 1e-6, 1e-6, false));
    }

    #[test]
    fn the_padding_row_starts_at_zero() {
        let (_vs, m) = tiny(false);
        assert_eq!(m.embedding.ws.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
