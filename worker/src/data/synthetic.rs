//! An endless source of random batches in the shapes of real ones, with an optional learnable
//! class signal, for tests and benchmarks until shards are read.
//!
//! Every batch is a pure function of (seed, split, epoch, batch index): each class has a fixed
//! random image pattern and audio band profile added to unit noise (scaled by `signal`), and its
//! own few "class words" that replace a share of the random tokens. With `signal: 0` the inputs
//! are pure noise, as the throughput benchmark wants.

use super::{Batch, BatchSource, DataCursor, Modality};
use crate::error::WorkerError;
use crate::torch::{Draws, mix};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Token ids each class owns as its "class words".
const CLASS_WORDS: i64 = 8;
const TRAIN: u64 = 1;
const VALIDATION: u64 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    pub seed: u64,
    pub batch_size: i64,
    pub train_batches: u64,
    pub val_batches: u64,
    pub num_classes: i64,
    pub image_size: i64,
    pub text_len: i64,
    pub vocab_size: i64,
    pub audio_frames: i64,
    pub audio_bands: i64,
    /// The modalities batches carry; the others are `None`.
    pub modalities: Vec<Modality>,
    /// Strength of the class signal against unit noise; 0 makes labels unlearnable.
    pub signal: f64,
    /// Probability that a sample lacks a modality, drawn per sample and modality.
    pub missing: f64,
    /// Relative class frequencies (`None`: balanced).
    pub class_weights: Option<Vec<f64>>,
    /// Draw text and audio lengths between half and all of `text_len` / `audio_frames`.
    pub variable_lengths: bool,
}

impl Default for SyntheticConfig {
    /// The emotion-bench shapes.
    fn default() -> Self {
        SyntheticConfig {
            seed: 0,
            batch_size: 64,
            train_batches: 100,
            val_batches: 10,
            num_classes: 7,
            image_size: 48,
            text_len: 32,
            vocab_size: 8000,
            audio_frames: 64,
            audio_bands: 40,
            modalities: Modality::ALL.to_vec(),
            signal: 1.0,
            missing: 0.0,
            class_weights: None,
            variable_lengths: false,
        }
    }
}

pub struct SyntheticSource {
    config: SyntheticConfig,
    /// `[K, 1, S, S]`: each class's image pattern.
    image_patterns: Tensor,
    /// `[K, 1, M]`: each class's audio band profile, the same in every frame.
    audio_patterns: Tensor,
    /// Cumulative class probabilities.
    class_cdf: Vec<f64>,
    cursor: DataCursor,
}

impl SyntheticSource {
    pub fn new(config: SyntheticConfig) -> Result<Self, WorkerError> {
        let k = config.num_classes;
        if k < 1 || config.batch_size < 1 {
            return Err(WorkerError::Data(
                "synthetic: num_classes and batch_size must be positive".into(),
            ));
        }
        if config.vocab_size <= 1 + k * CLASS_WORDS {
            return Err(WorkerError::Data(format!(
                "synthetic: vocab_size must exceed {} for {k} classes",
                1 + k * CLASS_WORDS
            )));
        }
        let weights = config.class_weights.clone().unwrap_or_else(|| vec![1.0; k as usize]);
        if weights.len() != k as usize
            || weights.iter().any(|w| w.is_nan() || *w < 0.0)
            || weights.iter().sum::<f64>() <= 0.0
        {
            return Err(WorkerError::Data(format!(
                "synthetic: class_weights needs {k} non-negative weights, not all zero"
            )));
        }
        let total: f64 = weights.iter().sum();
        let class_cdf = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w / total;
                Some(*acc)
            })
            .collect();
        let patterns = Draws::new(mix(&[config.seed, 0x7061_7474]));
        let s = config.image_size;
        Ok(SyntheticSource {
            image_patterns: patterns.normal(&[k, 1, s, s]),
            audio_patterns: patterns.normal(&[k, 1, config.audio_bands]),
            class_cdf,
            cursor: DataCursor::default(),
            config,
        })
    }

    fn has(&self, m: Modality) -> bool {
        self.config.modalities.contains(&m)
    }

    /// Batch `index` of `split` in `epoch`.
    pub fn make_batch(&self, split: u64, epoch: u64, index: u64) -> Batch {
        let c = &self.config;
        let b = c.batch_size;
        let draws = Draws::new(mix(&[c.seed, split, epoch, index]));
        let labels: Vec<i64> = draws
            .uniform(b as usize)
            .into_iter()
            .map(|u| {
                self.class_cdf
                    .iter()
                    .position(|&p| u < p)
                    .unwrap_or(self.class_cdf.len() - 1) as i64
            })
            .collect();
        let labels = Tensor::from_slice(&labels);

        let presence = draws.uniform((b * 3) as usize);
        let mut mask = vec![0f32; (b * 3) as usize];
        for m in Modality::ALL {
            if !self.has(m) {
                continue;
            }
            for i in 0..b as usize {
                let at = i * 3 + m.column() as usize;
                mask[at] = if presence[at] < c.missing { 0.0 } else { 1.0 };
            }
        }
        let mask = Tensor::from_slice(&mask).view([b, 3]);
        let present = |m: Modality| mask.narrow(1, m.column(), 1).view([b]);

        let image = self.has(Modality::Image).then(|| {
            let s = c.image_size;
            let x = draws.normal(&[b, 1, s, s]) + self.image_patterns.index_select(0, &labels) * c.signal;
            x * present(Modality::Image).view([b, 1, 1, 1])
        });

        let lengths = |max: i64| -> Option<Tensor> {
            c.variable_lengths.then(|| {
                let lo = (max / 2).max(1) as u64;
                let l: Vec<i64> = draws
                    .below(b as usize, max as u64 - lo + 1)
                    .into_iter()
                    .map(|x| (x + lo) as i64)
                    .collect();
                Tensor::from_slice(&l)
            })
        };
        let within = |lengths: &Option<Tensor>, max: i64| -> Tensor {
            match lengths {
                Some(l) => Tensor::arange(max, (Kind::Int64, tch::Device::Cpu))
                    .view([1, max])
                    .lt_tensor(&l.view([b, 1])),
                None => Tensor::ones([b, max], (Kind::Bool, tch::Device::Cpu)),
            }
        };

        let (text, text_lengths) = if self.has(Modality::Text) {
            let t = c.text_len;
            let n = (b * t) as usize;
            let random: Vec<i64> = draws
                .below(n, (c.vocab_size - 1) as u64)
                .into_iter()
                .map(|x| x as i64 + 1)
                .collect();
            let word: Vec<i64> = draws
                .below(n, CLASS_WORDS as u64)
                .into_iter()
                .map(|x| x as i64)
                .collect();
            let share = c.signal / (c.signal + 3.0);
            let pick = draws.uniform(n);
            let labels_v: Vec<i64> = Vec::try_from(&labels).unwrap_or_default();
            let tokens: Vec<i64> = (0..n)
                .map(|j| {
                    if pick[j] < share {
                        1 + labels_v[j / t as usize] * CLASS_WORDS + word[j]
                    } else {
                        random[j]
                    }
                })
                .collect();
            let lengths = lengths(t);
            let keep = within(&lengths, t).logical_and(&present(Modality::Text).view([b, 1]).gt(0.5));
            let tokens = Tensor::from_slice(&tokens).view([b, t]) * keep.to_kind(Kind::Int64);
            (Some(tokens), lengths)
        } else {
            (None, None)
        };

        let (audio, audio_lengths) = if self.has(Modality::Audio) {
            let (f, m) = (c.audio_frames, c.audio_bands);
            let x = draws.normal(&[b, f, m]) + self.audio_patterns.index_select(0, &labels) * c.signal;
            let lengths = lengths(f);
            let keep = within(&lengths, f).to_kind(Kind::Float) * present(Modality::Audio).view([b, 1]);
            (Some(x * keep.view([b, f, 1])), lengths)
        } else {
            (None, None)
        };

        Batch {
            image,
            text,
            text_lengths,
            audio,
            audio_lengths,
            mask,
            labels,
        }
    }
}

impl BatchSource for SyntheticSource {
    fn steps_per_epoch(&self) -> u64 {
        self.config.train_batches
    }

    fn begin_epoch(&mut self, epoch: u64) -> Result<(), WorkerError> {
        self.cursor = DataCursor {
            epoch,
            batch: 0,
            detail: serde_json::Value::Null,
        };
        Ok(())
    }

    fn next_train(&mut self) -> Result<Option<Batch>, WorkerError> {
        if self.cursor.batch >= self.config.train_batches {
            return Ok(None);
        }
        let batch = self.make_batch(TRAIN, self.cursor.epoch, self.cursor.batch);
        self.cursor.batch += 1;
        Ok(Some(batch))
    }

    fn cursor(&self) -> DataCursor {
        self.cursor.clone()
    }

    fn seek(&mut self, cursor: &DataCursor) -> Result<(), WorkerError> {
        if cursor.batch > self.config.train_batches {
            return Err(WorkerError::Data(format!(
                "synthetic: cannot seek to batch {} of an epoch of {}",
                cursor.batch, self.config.train_batches
            )));
        }
        self.cursor = cursor.clone();
        Ok(())
    }

    fn validation(&mut self) -> Box<dyn Iterator<Item = Result<Batch, WorkerError>> + '_> {
        Box::new((0..self.config.val_batches).map(move |i| Ok(self.make_batch(VALIDATION, 0, i))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            batch_size: 6,
            train_batches: 3,
            val_batches: 2,
            image_size: 8,
            text_len: 10,
            vocab_size: 100,
            audio_frames: 12,
            audio_bands: 5,
            ..SyntheticConfig::default()
        }
    }

    #[test]
    fn batches_have_the_configured_shapes_and_kinds() {
        let src = SyntheticSource::new(small()).unwrap();
        let b = src.make_batch(TRAIN, 0, 0);
        assert_eq!(b.image.as_ref().unwrap().size(), [6, 1, 8, 8]);
        assert_eq!(b.text.as_ref().unwrap().size(), [6, 10]);
        assert_eq!(b.text.as_ref().unwrap().kind(), Kind::Int64);
        assert_eq!(b.audio.as_ref().unwrap().size(), [6, 12, 5]);
        assert_eq!(b.mask.size(), [6, 3]);
        assert_eq!(b.labels.size(), [6]);
        assert!(b.text_lengths.is_none());
        let max_token = b.text.as_ref().unwrap().max().int64_value(&[]);
        assert!(max_token < 100);
    }

    #[test]
    fn batches_are_a_function_of_their_coordinates() {
        let src = SyntheticSource::new(small()).unwrap();
        let again = SyntheticSource::new(small()).unwrap();
        let a = src.make_batch(TRAIN, 1, 2);
        let b = again.make_batch(TRAIN, 1, 2);
        assert!(a.image.as_ref().unwrap().equal(b.image.as_ref().unwrap()));
        assert!(a.text.as_ref().unwrap().equal(b.text.as_ref().unwrap()));
        assert!(a.labels.equal(&b.labels));
        let other = src.make_batch(TRAIN, 2, 2);
        assert!(!a.image.as_ref().unwrap().equal(other.image.as_ref().unwrap()));
    }

    #[test]
    fn seeking_replays_what_followed_the_cursor() {
        let mut src = SyntheticSource::new(small()).unwrap();
        src.begin_epoch(4).unwrap();
        src.next_train().unwrap().unwrap();
        let cursor = src.cursor();
        let expected = src.next_train().unwrap().unwrap();
        assert_eq!(src.next_train().unwrap().map(|_| ()), Some(()));
        assert!(
            src.next_train().unwrap().is_none(),
            "an epoch has train_batches batches"
        );

        let mut fresh = SyntheticSource::new(small()).unwrap();
        fresh.seek(&cursor).unwrap();
        let got = fresh.next_train().unwrap().unwrap();
        assert!(got.labels.equal(&expected.labels));
        assert!(got.audio.as_ref().unwrap().equal(expected.audio.as_ref().unwrap()));
    }

    #[test]
    fn missing_modalities_are_masked_and_zeroed() {
        let src = SyntheticSource::new(SyntheticConfig {
            missing: 0.5,
            batch_size: 64,
            ..small()
        })
        .unwrap();
        let b = src.make_batch(TRAIN, 0, 0);
        let image_mask = b.modality_mask(Modality::Image).view([64]);
        let missing = image_mask.eq(0.0);
        let n_missing = missing.sum(Kind::Int64).int64_value(&[]);
        assert!(n_missing > 10 && n_missing < 54, "{n_missing} of 64 missing");
        let image = b.image.unwrap();
        let abs_sum_missing = image.abs().sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float) * missing;
        assert_eq!(abs_sum_missing.sum(Kind::Float).double_value(&[]), 0.0);
        let text_of_missing = b.text.unwrap().sum_dim_intlist([1i64].as_slice(), false, Kind::Int64)
            * b.mask.narrow(1, Modality::Text.column(), 1).view([64]).eq(0.0);
        assert_eq!(text_of_missing.sum(Kind::Int64).int64_value(&[]), 0);
    }

    #[test]
    fn variable_lengths_pad_with_zeros() {
        let src = SyntheticSource::new(SyntheticConfig {
            variable_lengths: true,
            ..small()
        })
        .unwrap();
        let b = src.make_batch(VALIDATION, 0, 1);
        let lengths: Vec<i64> = Vec::try_from(b.text_lengths.as_ref().unwrap()).unwrap();
        let text = b.text.unwrap();
        for (i, &l) in lengths.iter().enumerate() {
            assert!((5..=10).contains(&l));
            let row: Vec<i64> = Vec::try_from(text.get(i as i64)).unwrap();
            assert!(row[..l as usize].iter().all(|&t| t > 0));
            assert!(row[l as usize..].iter().all(|&t| t == 0));
        }
    }

    #[test]
    fn class_weights_skew_the_labels() {
        let src = SyntheticSource::new(SyntheticConfig {
            batch_size: 400,
            num_classes: 2,
            class_weights: Some(vec![9.0, 1.0]),
            ..small()
        })
        .unwrap();
        let labels = src.make_batch(TRAIN, 0, 0).labels;
        let ones = labels.sum(Kind::Int64).int64_value(&[]);
        assert!((20..=70).contains(&ones), "{ones} of 400 in the rare class");
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(
            SyntheticSource::new(SyntheticConfig {
                vocab_size: 10,
                ..small()
            })
            .is_err()
        );
        assert!(
            SyntheticSource::new(SyntheticConfig {
                class_weights: Some(vec![1.0]),
                ..small()
            })
            .is_err()
        );
    }
}
