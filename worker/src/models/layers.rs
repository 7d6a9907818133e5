//! Layers with PyTorch's default initialisation, and the per-forward context (train or eval,
//! where dropout draws its masks).
//!
//! tch's own defaults differ from PyTorch's (Kaiming with a ReLU gain, zero biases, BatchNorm
//! weights drawn uniformly, LSTM weights Kaiming): the constructors here restore PyTorch's, so a
//! model here starts from the same distribution as its PyTorch twin.

use crate::torch::Draws;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// How one forward pass runs.
pub struct Ctx<'a> {
    pub train: bool,
    draws: Option<&'a Draws>,
}

impl<'a> Ctx<'a> {
    /// Training: dropout is on and draws its masks from `draws`.
    pub fn train(draws: &'a Draws) -> Self {
        Ctx {
            train: true,
            draws: Some(draws),
        }
    }

    /// Evaluation: dropout is off and nothing random happens.
    pub fn eval() -> Ctx<'static> {
        Ctx {
            train: false,
            draws: None,
        }
    }

    /// Inverted dropout with probability `p`, only while training.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Tensor {
        match self.draws {
            Some(d) if self.train && p > 0.0 => x * d.dropout_mask(&x.size(), p).to_device(x.device()),
            _ => x.shallow_clone(),
        }
    }

    /// Standard normal noise of `shape` on `device`; zeros in evaluation, which draws nothing.
    pub fn normal(&self, shape: &[i64], device: tch::Device) -> Tensor {
        match self.draws {
            Some(d) => d.normal(shape).to_device(device),
            None => Tensor::zeros(shape, (Kind::Float, device)),
        }
    }

    pub fn draws(&self) -> Option<&'a Draws> {
        self.draws
    }
}

fn uniform(bound: f64) -> Init {
    Init::Uniform { lo: -bound, up: bound }
}

/// `nn.Linear`: weight and bias uniform in ±1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)).
pub fn linear<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, i: i64, o: i64) -> nn::Linear {
    let b = 1.0 / (i as f64).sqrt();
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: uniform(b),
            bs_init: Some(uniform(b)),
            bias: true,
        },
    )
}

/// `nn.Conv2d(i, o, k, padding=k/2)`: weight and bias uniform in ±1/sqrt(i*k*k). The weight is
/// kept channels-last (see [`channels_last`]).
pub fn conv2d<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, i: i64, o: i64, k: i64) -> nn::Conv2D {
    let b = 1.0 / ((i * k * k) as f64).sqrt();
    let mut conv = nn::conv2d(
        p,
        i,
        o,
        k,
        nn::ConvConfig {
            padding: k / 2,
            ws_init: uniform(b),
            bs_init: uniform(b),
            ..Default::default()
        },
    );
    tch::no_grad(|| {
        let nhwc = channels_last(&conv.ws);
        conv.ws.set_data(&nhwc);
    });
    conv
}

/// The same 4-D tensor (`[N, C, H, W]`) stored channels-last (NHWC), as PyTorch's
/// `memory_format=torch.channels_last`. oneDNN's convolutions, and the batch norms, ReLUs and
/// max-pools after them, run about a quarter faster on the CPU in this layout than in NCHW, whose
/// max-pool kernel in particular is slow; the values are the same.
pub fn channels_last(x: &Tensor) -> Tensor {
    let (n, c, h, w) = x.size4().expect("a [N, C, H, W] tensor");
    // Explicit strides: a permute-and-copy would keep NCHW strides where C is 1 (libtorch sees
    // nothing to move), and the layout would not be recognised.
    let strides = [h * w * c, 1, w * c, c];
    if x.stride() == strides {
        return x.shallow_clone();
    }
    let mut out = Tensor::empty_strided([n, c, h, w], strides, (x.kind(), x.device()));
    out.copy_(x);
    out
}

/// `nn.Conv1d(i, o, k, padding=k/2)`: weight and bias uniform in ±1/sqrt(i*k).
pub fn conv1d<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, i: i64, o: i64, k: i64) -> nn::Conv1D {
    let b = 1.0 / ((i * k) as f64).sqrt();
    nn::conv1d(
        p,
        i,
        o,
        k,
        nn::ConvConfig {
            padding: k / 2,
            ws_init: uniform(b),
            bs_init: uniform(b),
            ..Default::default()
        },
    )
}

fn batch_norm_config() -> nn::BatchNormConfig {
    nn::BatchNormConfig {
        ws_init: Init::Const(1.0),
        bs_init: Init::Const(0.0),
        ..Default::default()
    }
}

/// `nn.BatchNorm2d(c)`: weight 1, bias 0, momentum 0.1, eps 1e-5.
pub fn batch_norm2d<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, batch_norm_config())
}

/// `nn.BatchNorm1d(c)`.
pub fn batch_norm1d<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, c: i64) -> nn::BatchNorm {
    nn::batch_norm1d(p, c, batch_norm_config())
}

/// `nn.LSTM(i, h, num_layers, batch_first=True)`: every weight and bias uniform in ±1/sqrt(h).
pub fn lstm<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, i: i64, h: i64, layers: i64) -> nn::LSTM {
    let b = 1.0 / (h as f64).sqrt();
    nn::lstm(
        p,
        i,
        h,
        nn::RNNConfig {
            num_layers: layers,
            batch_first: true,
            w_ih_init: uniform(b),
            w_hh_init: uniform(b),
            b_ih_init: Some(uniform(b)),
            b_hh_init: Some(uniform(b)),
            ..Default::default()
        },
    )
}

/// An LSTM over padded sequences, optionally bidirectional, whose result is the final hidden
/// state of each direction at each sample's own end. The backward direction is a second LSTM run
/// over each sequence reversed within its length, so padding never reaches a final state.
#[derive(Debug)]
pub struct FinalStateLstm {
    forward: nn::LSTM,
    backward: Option<nn::LSTM>,
    out_dim: i64,
}

impl FinalStateLstm {
    pub fn new(p: &nn::Path, input: i64, hidden: i64, layers: i64, bidirectional: bool) -> Self {
        FinalStateLstm {
            forward: lstm(p / "lstm", input, hidden, layers),
            backward: bidirectional.then(|| lstm(p / "lstm_reverse", input, hidden, layers)),
            out_dim: hidden * if bidirectional { 2 } else { 1 },
        }
    }

    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    /// `x` `[B, T, E]`, `lengths` `[B]` (`None`: all `T` real) -> `[B, H * directions]`.
    pub fn forward(&self, x: &Tensor, lengths: Option<&Tensor>) -> Tensor {
        use tch::nn::RNN;
        let (b, t, _e) = x.size3().expect("a [B, T, E] sequence");
        let (out, _) = self.forward.seq(x); // [B, T, H]
        let lengths = match lengths {
            Some(l) => l.shallow_clone(),
            None if self.backward.is_none() => return out.select(1, t - 1), // [B, H]
            None => Tensor::full([b], t, (Kind::Int64, x.device())),
        }; // [B]
        let h = last_step(&out, &lengths); // [B, H]
        match &self.backward {
            None => h,
            Some(backward) => {
                let (out, _) = backward.seq(&reverse_within_lengths(x, &lengths)); // [B, T, H]
                Tensor::cat(&[h, last_step(&out, &lengths)], 1) // [B, 2H]
            }
        }
    }
}

/// `nn.Embedding(n, d)`: weight standard normal (tch's default already).
pub fn embedding<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, n: i64, d: i64) -> nn::Embedding {
    nn::embedding(p, n, d, Default::default())
}

/// The output of a batch-first sequence model at each sample's last real step:
/// `output` `[B, T, H]`, `lengths` `[B]` (clamped to at least 1) -> `[B, H]`.
pub fn last_step(output: &Tensor, lengths: &Tensor) -> Tensor {
    let (b, _t, h) = output.size3().expect("a [B, T, H] sequence output");
    let index = (lengths.clamp_min(1) - 1).view([b, 1, 1]).expand([b, 1, h], false); // [B, 1, H]
    output.gather(1, &index, false).view([b, h]) // [B, H]
}

/// Reverses each sample's first `lengths[i]` steps in place of the rest staying put, so a
/// forward pass over the result reads every sequence backwards from its own end:
/// `x` `[B, T, E]`, `lengths` `[B]` -> `[B, T, E]`.
pub fn reverse_within_lengths(x: &Tensor, lengths: &Tensor) -> Tensor {
    let (b, t, e) = x.size3().expect("a [B, T, E] sequence");
    let steps = Tensor::arange(t, (Kind::Int64, x.device())).view([1, t]); // [1, T]
    let len = lengths.clamp_min(1).view([b, 1]); // [B, 1]
    let reversed = &len - 1 - &steps; // [B, T]
    let index = reversed.where_self(&steps.lt_tensor(&len), &steps.expand([b, t], false)); // [B, T]
    x.gather(1, &index.unsqueeze(2).expand([b, t, e], false), false) // [B, T, E]
}

/// Mean over the real steps of each sample: `x` `[B, T, C]`, `lengths` `[B]` -> `[B, C]`.
pub fn masked_mean(x: &Tensor, lengths: &Tensor) -> Tensor {
    let (b, t, _c) = x.size3().expect("a [B, T, C] sequence");
    let len = lengths.clamp_min(1).view([b, 1]); // [B, 1]
    let valid = Tensor::arange(t, (Kind::Int64, x.device()))
        .view([1, t])
        .lt_tensor(&len); // [B, T]
    let summed = (x * valid.unsqueeze(2).to_kind(x.kind())).sum_dim_intlist([1i64].as_slice(), false, x.kind()); // [B, C]
    summed / len.to_kind(x.kind()) // [B, C]
}

/// Number of trainable values in a store (what PyTorch's `sum(p.numel() for p in parameters())`
/// counts: BatchNorm running statistics are buffers, not parameters).
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(Tensor::numel).sum::<usize>() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn linear_and_conv_use_pytorch_bounds() {
        let vs = nn::VarStore::new(Device::Cpu);
        let l = linear(vs.root() / "l", 400, 10);
        let bound = 1.0 / 20.0;
        assert!(l.ws.abs().max().double_value(&[]) <= bound);
        // Kaiming with a ReLU gain would reach sqrt(6/400) = 0.122; PyTorch's stays within 0.05.
        assert!(l.ws.abs().max().double_value(&[]) > 0.9 * bound);
        assert!(
            l.bs.as_ref().unwrap().abs().max().double_value(&[]) > 0.0,
            "bias is not zero"
        );
        let c = conv2d(vs.root() / "c", 4, 8, 3);
        let bound = 1.0 / 6.0;
        assert!(c.ws.abs().max().double_value(&[]) <= bound);
        assert!(c.bs.as_ref().unwrap().abs().max().double_value(&[]) > 0.0);
        let bn = batch_norm2d(vs.root() / "bn", 8);
        assert!(
            bn.ws
                .as_ref()
                .unwrap()
                .equal(&Tensor::ones([8], (Kind::Float, Device::Cpu)))
        );
    }

    #[test]
    fn last_step_picks_each_samples_final_real_step() {
        // [2, 3, 1]: values 0..6
        let out = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3, 1]);
        let picked = last_step(&out, &Tensor::from_slice(&[2i64, 3]));
        assert_eq!(Vec::<f32>::try_from(picked.view([2])).unwrap(), [1.0, 5.0]);
    }

    #[test]
    fn reversal_keeps_padding_in_place() {
        let x = Tensor::from_slice(&[1f32, 2., 3., 0., 4., 5., 6., 7.]).view([2, 4, 1]);
        let r = reverse_within_lengths(&x, &Tensor::from_slice(&[3i64, 4]));
        assert_eq!(
            Vec::<f32>::try_from(r.view([8])).unwrap(),
            [3., 2., 1., 0., 7., 6., 5., 4.]
        );
    }

    #[test]
    fn masked_mean_ignores_padding() {
        let x = Tensor::from_slice(&[1f32, 3., 100., 2., 4., 6.]).view([2, 3, 1]);
        let m = masked_mean(&x, &Tensor::from_slice(&[2i64, 3]));
        assert_eq!(Vec::<f32>::try_from(m.view([2])).unwrap(), [2.0, 4.0]);
    }

    #[test]
    fn dropout_is_identity_in_evaluation_and_random_in_training() {
        let x = Tensor::ones([100], (Kind::Float, Device::Cpu));
        assert!(Ctx::eval().dropout(&x, 0.5).equal(&x));
        let draws = Draws::new(1);
        let y = Ctx::train(&draws).dropout(&x, 0.5);
        let zeros = y.eq(0.0).sum(Kind::Int64).int64_value(&[]);
        assert!((25..75).contains(&zeros));
    }
}
