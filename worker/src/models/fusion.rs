//! Fusion of the per-modality embeddings into one vector per sample, honouring masks: a missing
//! modality's embedding is zeroed, and gated attention leaves it out of the softmax.
//!
//! Gated attention (Ilse et al., 2018) projects each embedding to a common size `h_m`, scores it
//! with `w . (tanh(V h_m) * sigmoid(U h_m))`, and returns the softmax-weighted sum of the `h_m`
//! over the modalities present. A sample with none present fuses to zeros.

use super::layers;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FusionKind {
    Concat,
    GatedAttention,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FusionConfig {
    pub kind: FusionKind,
    /// Gated attention: the common size each embedding is projected to (the fused size).
    pub dim: i64,
    /// Gated attention: the width of the scoring layers.
    pub attention_dim: i64,
}

impl Default for FusionConfig {
    fn default() -> Self {
        FusionConfig {
            kind: FusionKind::Concat,
            dim: 128,
            attention_dim: 64,
        }
    }
}

#[derive(Debug)]
struct Gated {
    projections: Vec<nn::Linear>,
    v: nn::Linear,
    u: nn::Linear,
    w: nn::Linear,
}

#[derive(Debug)]
pub struct Fusion {
    gated: Option<Gated>,
    out_dim: i64,
}

impl Fusion {
    /// `input_dims`: the embedding size of each modality, in the order `forward` receives them.
    pub fn new(p: &nn::Path, input_dims: &[i64], c: &FusionConfig) -> Result<Self, String> {
        if input_dims.is_empty() {
            return Err("fusion needs at least one modality".into());
        }
        match c.kind {
            FusionKind::Concat => Ok(Fusion {
                gated: None,
                out_dim: input_dims.iter().sum(),
            }),
            FusionKind::GatedAttention => {
                if c.dim < 1 || c.attention_dim < 1 {
                    return Err("fusion: gated attention needs positive dim and attention_dim".into());
                }
                let projections = input_dims
                    .iter()
                    .enumerate()
                    .map(|(m, &d)| layers::linear(p / format!("project{m}"), d, c.dim))
                    .collect();
                Ok(Fusion {
                    gated: Some(Gated {
                        projections,
                        v: layers::linear(p / "v", c.dim, c.attention_dim),
                        u: layers::linear(p / "u", c.dim, c.attention_dim),
                        w: layers::linear(p / "w", c.attention_dim, 1),
                    }),
                    out_dim: c.dim,
                })
            }
        }
    }

    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    /// `embeddings` `M` x `[B, D_m]`, `mask` `[B, M]` (1 present, 0 missing) -> `[B, out_dim]`.
    pub fn forward(&self, embeddings: &[Tensor], mask: &Tensor) -> Tensor {
        let masked: Vec<Tensor> = embeddings
            .iter()
            .enumerate()
            .map(|(m, e)| e * mask.narrow(1, m as i64, 1)) // [B, D_m]
            .collect();
        let Some(g) = &self.gated else {
            return Tensor::cat(&masked, 1); // [B, sum D_m]
        };
        let h = Tensor::stack(
            &masked
                .iter()
                .zip(&g.projections)
                .map(|(e, p)| p.forward(e).tanh()) // [B, D]
                .collect::<Vec<_>>(),
            1,
        ); // [B, M, D]
        let gate = h.apply(&g.v).tanh() * h.apply(&g.u).sigmoid(); // [B, M, A]
        let scores = gate.apply(&g.w).squeeze_dim(2); // [B, M]
        let weights = attention_weights(&scores, mask); // [B, M]
        (h * weights.unsqueeze(2)).sum_dim_intlist([1i64].as_slice(), false, Kind::Float) // [B, D]
    }
}

/// Softmax of `scores` `[B, M]` over the modalities present in `mask` `[B, M]`; rows with none
/// present get all zeros.
pub fn attention_weights(scores: &Tensor, mask: &Tensor) -> Tensor {
    let present = mask.gt(0.5); // [B, M]
    // A large negative score instead of -inf keeps an all-missing row finite (a uniform softmax,
    // zeroed by the mask below) and its gradient free of NaN.
    let masked = scores.masked_fill(&present.logical_not(), -1e9); // [B, M]
    masked.softmax(1, Kind::Float) * present.to_kind(Kind::Float) // [B, M]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(v: &[f32], shape: [i64; 2]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn attention_weights_skip_missing_modalities() {
        let scores = t(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0], [3, 3]);
        let mask = t(&[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0], [3, 3]);
        let w = attention_weights(&scores, &mask);
        let w: Vec<f32> = Vec::try_from(w.view([9])).unwrap();
        let e = (1f32.exp(), 3f32.exp());
        assert!((w[0] - e.0 / (e.0 + e.1)).abs() < 1e-6);
        assert_eq!(w[1], 0.0, "a missing modality gets no weight");
        assert!((w[2] - e.1 / (e.0 + e.1)).abs() < 1e-6);
        assert_eq!(&w[3..6], &[0.0, 0.0, 0.0], "nothing present fuses to zeros");
        for x in &w[6..] {
            assert!((x - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn concat_zeroes_missing_embeddings() {
        let vs = nn::VarStore::new(Device::Cpu);
        let f = Fusion::new(&vs.root(), &[2, 1], &FusionConfig::default()).unwrap();
        let out = f.forward(
            &[t(&[1.0, 2.0, 3.0, 4.0], [2, 2]), t(&[5.0, 6.0], [2, 1])],
            &t(&[1.0, 0.0, 0.0, 1.0], [2, 2]),
        );
        assert_eq!(f.out_dim(), 3);
        assert_eq!(
            Vec::<f32>::try_from(out.view([6])).unwrap(),
            [1.0, 2.0, 0.0, 0.0, 0.0, 6.0]
        );
    }

    #[test]
    fn gated_attention_ignores_what_a_missing_modality_holds() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = FusionConfig {
            kind: FusionKind::GatedAttention,
            dim: 4,
            attention_dim: 3,
        };
        let f = Fusion::new(&vs.root(), &[2, 3], &c).unwrap();
        let image = t(&[0.5, -1.0], [1, 2]);
        let mask = t(&[1.0, 0.0], [1, 2]);
        let a = f.forward(&[image.shallow_clone(), t(&[1.0, 2.0, 3.0], [1, 3])], &mask);
        let b = f.forward(&[image, t(&[-7.0, 0.0, 9.0], [1, 3])], &mask);
        assert_eq!(a.size(), [1, 4]);
        assert!(a.equal(&b));
        let none = f.forward(
            &[t(&[0.5, -1.0], [1, 2]), t(&[1.0, 2.0, 3.0], [1, 3])],
            &t(&[0.0, 0.0], [1, 2]),
        );
        assert_eq!(none.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
