//! Face encoder: blocks of 3x3 convolution, batch norm and ReLU, a 2x2 max-pool after every block
//! but the last, then global average pooling to one vector per image.

use super::layers::{self, Ctx};
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::{self, ModuleT};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageCnnConfig {
    /// Output channels of each block; the last is the embedding size.
    pub channels: Vec<i64>,
    pub in_channels: i64,
    /// Dropout on the pooled embedding.
    pub dropout: f64,
}

impl Default for ImageCnnConfig {
    fn default() -> Self {
        ImageCnnConfig {
            channels: vec![32, 64, 128],
            in_channels: 1,
            dropout: 0.0,
        }
    }
}

#[derive(Debug)]
pub struct ImageCnn {
    blocks: Vec<(nn::Conv2D, nn::BatchNorm)>,
    dropout: f64,
    out_dim: i64,
}

impl ImageCnn {
    pub fn new(p: &nn::Path, c: &ImageCnnConfig) -> Result<Self, String> {
        if c.channels.is_empty() || c.channels.iter().any(|&ch| ch < 1) || c.in_channels < 1 {
            return Err("image.channels needs at least one positive channel count".into());
        }
        let mut blocks = Vec::new();
        let mut i = c.in_channels;
        for (n, &o) in c.channels.iter().enumerate() {
            let block = p / format!("block{n}");
            blocks.push((
                layers::conv2d(&block / "conv", i, o, 3),
                layers::batch_norm2d(&block / "bn", o),
            ));
            i = o;
        }
        Ok(ImageCnn {
            blocks,
            dropout: c.dropout,
            out_dim: i,
        })
    }

    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    /// `x` `[B, C_in, H, W]` -> `[B, C_last]`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Tensor {
        let last = self.blocks.len() - 1;
        let mut x = layers::channels_last(x); // [B, C_in, H, W]
        for (n, (conv, bn)) in self.blocks.iter().enumerate() {
            x = bn.forward_t(&x.apply(conv), ctx.train).relu(); // [B, C_n, H_n, W_n]
            if n < last {
                x = x.max_pool2d_default(2); // [B, C_n, H_n/2, W_n/2]
            }
        }
        let x = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1); // [B, C_last]
        ctx.dropout(&x, self.dropout) // [B, C_last]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn encodes_images_to_the_last_channel_count() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cnn = ImageCnn::new(
            &vs.root(),
            &ImageCnnConfig {
                channels: vec![4, 6],
                ..Default::default()
            },
        )
        .unwrap();
        let y = cnn.forward(&Tensor::randn([3, 1, 16, 16], (Kind::Float, Device::Cpu)), &Ctx::eval());
        assert_eq!(y.size(), [3, 6]);
        assert_eq!(cnn.out_dim(), 6);
        // conv 1->4 (36+4) + bn (8) + conv 4->6 (216+6) + bn (12)
        assert_eq!(layers::parameter_count(&vs), 40 + 8 + 222 + 12);
    }

    #[test]
    fn refuses_no_blocks() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = ImageCnnConfig {
            channels: vec![],
            ..Default::default()
        };
        assert!(ImageCnn::new(&vs.root(), &c).is_err());
    }
}
