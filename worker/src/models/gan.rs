//! A conditional GAN over fused embeddings: the generator maps (noise, class) to an embedding, the
//! discriminator tells real fused embeddings from generated ones given the class. The trainer
//! updates them alternately (discriminator, then generator) after each classifier step, and with
//! `augment: gan` adds generated embeddings of the rarer classes to the classifier's batch.

use super::layers::{self, Ctx};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GanConfig {
    pub noise_dim: i64,
    pub hidden: i64,
    /// Adam learning rate of both networks.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// With `augment: gan`: generated samples added per real one, at most.
    pub synthetic_fraction: f64,
    /// Steps the GAN trains before its samples reach the classifier.
    pub warmup_steps: u64,
}

impl Default for GanConfig {
    fn default() -> Self {
        GanConfig {
            noise_dim: 32,
            hidden: 128,
            lr: 2e-4,
            beta1: 0.5,
            beta2: 0.999,
            synthetic_fraction: 0.25,
            warmup_steps: 50,
        }
    }
}

#[derive(Debug)]
struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    fn new(p: &nn::Path, sizes: &[i64]) -> Self {
        Mlp {
            layers: sizes
                .windows(2)
                .enumerate()
                .map(|(n, w)| layers::linear(p / format!("fc{n}"), w[0], w[1]))
                .collect(),
        }
    }

    /// LeakyReLU(0.2) between layers, nothing after the last.
    fn forward(&self, x: &Tensor) -> Tensor {
        let last = self.layers.len() - 1;
        let mut x = x.shallow_clone();
        for (n, l) in self.layers.iter().enumerate() {
            x = l.forward(&x);
            if n < last {
                x = x.maximum(&(&x * 0.2)); // LeakyReLU(0.2)
            }
        }
        x
    }
}

#[derive(Debug)]
pub struct ConditionalGan {
    generator: Mlp,
    discriminator: Mlp,
    noise_dim: i64,
    num_classes: i64,
}

/// Variable-name prefixes of the two networks, so the trainer can give each its own optimiser.
pub const GENERATOR_PREFIX: &str = "gan.generator.";
pub const DISCRIMINATOR_PREFIX: &str = "gan.discriminator.";

impl ConditionalGan {
    /// `p` must be the `gan` path under the model root (see the prefixes above).
    pub fn new(p: &nn::Path, embedding_dim: i64, num_classes: i64, c: &GanConfig) -> Result<Self, String> {
        if c.noise_dim < 1 || c.hidden < 1 {
            return Err("gan: noise_dim and hidden must be positive".into());
        }
        if !(0.0..=4.0).contains(&c.synthetic_fraction) {
            return Err("gan.synthetic_fraction must be between 0 and 4".into());
        }
        Ok(ConditionalGan {
            generator: Mlp::new(
                &(p / "generator"),
                &[c.noise_dim + num_classes, c.hidden, c.hidden, embedding_dim],
            ),
            discriminator: Mlp::new(
                &(p / "discriminator"),
                &[embedding_dim + num_classes, c.hidden, c.hidden, 1],
            ),
            noise_dim: c.noise_dim,
            num_classes,
        })
    }

    fn one_hot(&self, classes: &Tensor) -> Tensor {
        classes.one_hot(self.num_classes).to_kind(Kind::Float) // [B, K]
    }

    /// Generated embeddings for `classes` `[N]`, noise drawn from `ctx` -> `[N, D]`.
    pub fn generate(&self, classes: &Tensor, ctx: &Ctx) -> Tensor {
        let n = classes.size()[0];
        let noise = ctx.normal(&[n, self.noise_dim], classes.device()); // [N, Z]
        let input = Tensor::cat(&[noise, self.one_hot(classes)], 1); // [N, Z + K]
        self.generator.forward(&input) // [N, D]
    }

    /// Realness logits for `embeddings` `[N, D]` of `classes` `[N]` -> `[N]`.
    pub fn discriminate(&self, embeddings: &Tensor, classes: &Tensor) -> Tensor {
        let input = Tensor::cat(&[embeddings.shallow_clone(), self.one_hot(classes)], 1); // [N, D + K]
        self.discriminator.forward(&input).squeeze_dim(1) // [N]
    }
}

/// Classes of the generated samples to add to a batch: `round(fraction * batch)` samples at
/// most, shared among the classes in proportion to how far each falls short of the most frequent
/// one (`shares`: each class's frequency, in any unit). Balanced data gets none.
pub fn synthetic_classes(shares: &[f64], batch: usize, fraction: f64) -> Vec<i64> {
    let top = shares.iter().cloned().fold(0.0, f64::max);
    let total: f64 = shares.iter().sum();
    if top <= 0.0 || total <= 0.0 {
        return Vec::new();
    }
    // Deficits in samples per batch of this size.
    let deficits: Vec<f64> = shares.iter().map(|s| (top - s) / total * batch as f64).collect();
    let wanted: f64 = deficits.iter().sum();
    let budget = (fraction * batch as f64).round().min(wanted.floor());
    if budget < 1.0 {
        return Vec::new();
    }
    let budget = budget as usize;
    // Largest remainder: exact total, ties to the lower class index.
    let quotas: Vec<f64> = deficits.iter().map(|d| d / wanted * budget as f64).collect();
    let mut counts: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let missing = budget - counts.iter().sum::<usize>();
    for &c in order.iter().take(missing) {
        counts[c] += 1;
    }
    counts
        .iter()
        .enumerate()
        .flat_map(|(c, &n)| std::iter::repeat_n(c as i64, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torch::Draws;
    use tch::Device;

    #[test]
    fn balanced_data_gets_no_synthetic_samples() {
        assert!(synthetic_classes(&[5.0; 7], 64, 0.25).is_empty());
        assert!(synthetic_classes(&[0.0; 7], 64, 0.25).is_empty());
    }

    #[test]
    fn rare_classes_get_samples_in_proportion_to_their_deficit() {
        // Class 0 is 10x as frequent as classes 1 and 2, class 3 half as frequent as class 0.
        let got = synthetic_classes(&[10.0, 1.0, 1.0, 5.0], 64, 0.25);
        assert_eq!(got.len(), 16);
        let count = |c| got.iter().filter(|&&x| x == c).count();
        assert_eq!(count(0), 0);
        assert_eq!(count(1), count(2));
        assert!(count(1) > count(3) && count(3) > 0, "{got:?}");
    }

    #[test]
    fn never_adds_more_than_the_deficit() {
        // Class 1 falls short by 8/7 of a sample in a batch of 8: one synthetic sample, not the 2
        // that the fraction alone allows.
        assert_eq!(synthetic_classes(&[4.0, 3.0], 8, 0.25), vec![1]);
    }

    #[test]
    fn generator_and_discriminator_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let gan = ConditionalGan::new(&(vs.root() / "gan"), 12, 7, &GanConfig::default()).unwrap();
        let classes = Tensor::from_slice(&[0i64, 3, 6]);
        let draws = Draws::new(1);
        let fake = gan.generate(&classes, &Ctx::train(&draws));
        assert_eq!(fake.size(), [3, 12]);
        assert_eq!(gan.discriminate(&fake, &classes).size(), [3]);
        let names: Vec<String> = vs.variables().into_keys().collect();
        assert!(
            names
                .iter()
                .all(|n| n.starts_with(GENERATOR_PREFIX) || n.starts_with(DISCRIMINATOR_PREFIX))
        );
    }
}
