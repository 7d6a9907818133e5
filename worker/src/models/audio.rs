//! Speech encoder over log-mel frames: an LSTM (final hidden state at each clip's last real
//! frame) or a small 1-D CNN over time (conv-BN-ReLU blocks, then the mean over real frames).

use super::layers::{self, Ctx};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioEncoder {
    Lstm,
    Cnn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudioConfig {
    pub encoder: AudioEncoder,
    /// Mel bands per frame (the data loader computes 64).
    pub n_mels: i64,
    /// LSTM: hidden size.
    pub hidden: i64,
    /// LSTM: stacked layers.
    pub layers: i64,
    /// LSTM: add a backward direction.
    pub bidirectional: bool,
    /// CNN: output channels of each block; the last is the embedding size.
    pub channels: Vec<i64>,
    /// CNN: kernel width in frames (odd keeps the length).
    pub kernel: i64,
    pub dropout: f64,
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            encoder: AudioEncoder::Lstm,
            n_mels: 64,
            hidden: 128,
            layers: 1,
            bidirectional: false,
            channels: vec![64, 128],
            kernel: 5,
            dropout: 0.0,
        }
    }
}

#[derive(Debug)]
enum Body {
    Lstm(Box<layers::FinalStateLstm>),
    Cnn(Vec<(nn::Conv1D, nn::BatchNorm)>),
}

#[derive(Debug)]
pub struct AudioNet {
    body: Body,
    dropout: f64,
    out_dim: i64,
}

impl AudioNet {
    pub fn new(p: &nn::Path, c: &AudioConfig) -> Result<Self, String> {
        if c.n_mels < 1 {
            return Err("audio.n_mels must be positive".into());
        }
        let (body, out_dim) = match c.encoder {
            AudioEncoder::Lstm => {
                if c.hidden < 1 || c.layers < 1 {
                    return Err("audio: the LSTM needs positive hidden and layers".into());
                }
                let lstm = layers::FinalStateLstm::new(p, c.n_mels, c.hidden, c.layers, c.bidirectional);
                let out = lstm.out_dim();
                (Body::Lstm(Box::new(lstm)), out)
            }
            AudioEncoder::Cnn => {
                if c.channels.is_empty() || c.channels.iter().any(|&ch| ch < 1) || c.kernel < 1 {
                    return Err("audio: the CNN needs at least one positive channel count and a kernel".into());
                }
                let mut blocks = Vec::new();
                let mut i = c.n_mels;
                for (n, &o) in c.channels.iter().enumerate() {
                    let block = p / format!("block{n}");
                    blocks.push((
                        layers::conv1d(&block / "conv", i, o, c.kernel),
                        layers::batch_norm1d(&block / "bn", o),
                    ));
                    i = o;
                }
                (Body::Cnn(blocks), i)
            }
        };
        Ok(AudioNet {
            body,
            dropout: c.dropout,
            out_dim,
        })
    }

    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    /// `frames` `[B, F, M]`, `lengths` `[B]` (`None`: all `F` real) -> `[B, D]`.
    pub fn forward(&self, frames: &Tensor, lengths: Option<&Tensor>, ctx: &Ctx) -> Tensor {
        let h = match &self.body {
            Body::Lstm(lstm) => lstm.forward(frames, lengths), // [B, H * directions]
            Body::Cnn(blocks) => {
                let (b, f, _m) = frames.size3().expect("[B, F, M] frames");
                let mut x = frames.transpose(1, 2); // [B, M, F]
                for (conv, bn) in blocks {
                    x = bn.forward_t(&x.apply(conv), ctx.train).relu(); // [B, C_n, F]
                }
                let lengths = match lengths {
                    Some(l) => l.shallow_clone(),
                    None => Tensor::full([b], f, (Kind::Int64, frames.device())),
                };
                layers::masked_mean(&x.transpose(1, 2), &lengths) // [B, C_last]
            }
        };
        ctx.dropout(&h, self.dropout) // [B, D]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn frames() -> Tensor {
        Tensor::randn([2, 7, 6], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn lstm_and_cnn_encode_to_their_sizes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let base = AudioConfig {
            n_mels: 6,
            hidden: 5,
            channels: vec![4, 3],
            kernel: 3,
            ..Default::default()
        };
        let lstm = AudioNet::new(&(vs.root() / "a"), &base).unwrap();
        assert_eq!(lstm.forward(&frames(), None, &Ctx::eval()).size(), [2, 5]);
        let cnn = AudioNet::new(
            &(vs.root() / "b"),
            &AudioConfig {
                encoder: AudioEncoder::Cnn,
                ..base
            },
        )
        .unwrap();
        assert_eq!(cnn.out_dim(), 3);
        assert_eq!(cnn.forward(&frames(), None, &Ctx::eval()).size(), [2, 3]);
    }

    #[test]
    fn cnn_ignores_frames_past_each_length() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cnn = AudioNet::new(
            &vs.root(),
            &AudioConfig {
                encoder: AudioEncoder::Cnn,
                n_mels: 6,
                channels: vec![4],
                kernel: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let x = frames();
        let lengths = Tensor::from_slice(&[4i64, 7]);
        let a = cnn.forward(&x, Some(&lengths), &Ctx::eval());
        let changed = x.copy();
        let _ = changed.narrow(1, 5, 2).fill_(100.0);
        let b = cnn.forward(&changed, Some(&lengths), &Ctx::eval());
        assert!(
            a.get(0).allclose(&b.get(0), 1e-6, 1e-6, false),
            "sample 0 ends at frame 4"
        );
        assert!(!a.get(1).allclose(&b.get(1), 1e-6, 1e-6, false));
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let err = serde_json::from_str::<AudioConfig>(r#"{"encoder": "cnn", "kernal": 3}"#).unwrap_err();
        assert!(err.to_string().contains("kernal"), "{err}");
        let c: AudioConfig = serde_json::from_str(r#"{"encoder": "cnn"}"#).unwrap();
        assert_eq!(c.n_mels, 64);
    }
}
