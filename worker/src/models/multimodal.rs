//! The configurable emotion model: an encoder per chosen modality, a fusion of their embeddings
//! under the batch's masks, a classifier head, and optionally a conditional GAN over the fused
//! embeddings.

use super::EmotionModel;
use super::audio::{AudioConfig, AudioNet};
use super::classifier::{Classifier, ClassifierConfig};
use super::fusion::{Fusion, FusionConfig};
use super::gan::{ConditionalGan, GanConfig};
use super::image_cnn::{ImageCnn, ImageCnnConfig};
use super::layers::Ctx;
use super::text_lstm::{TextLstm, TextLstmConfig};
use crate::data::{Batch, Modality};
use crate::error::WorkerError;
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

/// How the classifier's batches are augmented.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    #[default]
    None,
    /// Train the conditional GAN and add its samples of the rarer classes to each batch.
    Gan,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultimodalConfig {
    /// The modalities the model reads, in any order; each needs its encoder below.
    pub modalities: Vec<Modality>,
    pub image: ImageCnnConfig,
    pub text: TextLstmConfig,
    pub audio: AudioConfig,
    pub fusion: FusionConfig,
    pub classifier: ClassifierConfig,
    pub augment: Augment,
    /// Also trains the GAN without `augment: gan` when true (its losses are reported either way).
    pub train_gan: bool,
    pub gan: GanConfig,
}

impl Default for MultimodalConfig {
    fn default() -> Self {
        MultimodalConfig {
            modalities: Modality::ALL.to_vec(),
            image: ImageCnnConfig::default(),
            text: TextLstmConfig::default(),
            audio: AudioConfig::default(),
            fusion: FusionConfig::default(),
            classifier: ClassifierConfig::default(),
            augment: Augment::None,
            train_gan: false,
            gan: GanConfig::default(),
        }
    }
}

#[derive(Debug)]
pub struct Multimodal {
    modalities: Vec<Modality>,
    image: Option<ImageCnn>,
    text: Option<TextLstm>,
    audio: Option<AudioNet>,
    fusion: Fusion,
    classifier: Classifier,
    gan: Option<ConditionalGan>,
    augment: bool,
    num_classes: i64,
}

impl Multimodal {
    pub fn new(root: &nn::Path, c: &MultimodalConfig) -> Result<Self, WorkerError> {
        let invalid = WorkerError::Train;
        let mut modalities = c.modalities.clone();
        modalities.sort();
        modalities.dedup();
        if modalities.is_empty() {
            return Err(invalid(
                "model.modalities needs at least one of image, text, audio".into(),
            ));
        }
        let has = |m| modalities.contains(&m);
        let image = has(Modality::Image)
            .then(|| ImageCnn::new(&(root / "image"), &c.image))
            .transpose()
            .map_err(invalid)?;
        let text = has(Modality::Text)
            .then(|| TextLstm::new(&(root / "text"), &c.text))
            .transpose()
            .map_err(invalid)?;
        let audio = has(Modality::Audio)
            .then(|| AudioNet::new(&(root / "audio"), &c.audio))
            .transpose()
            .map_err(invalid)?;
        let dims: Vec<i64> = [
            image.as_ref().map(ImageCnn::out_dim),
            text.as_ref().map(TextLstm::out_dim),
            audio.as_ref().map(AudioNet::out_dim),
        ]
        .into_iter()
        .flatten()
        .collect();
        let fusion = Fusion::new(&(root / "fusion"), &dims, &c.fusion).map_err(invalid)?;
        let classifier = Classifier::new(&(root / "classifier"), fusion.out_dim(), &c.classifier).map_err(invalid)?;
        let augment = c.augment == Augment::Gan;
        let gan = (augment || c.train_gan)
            .then(|| ConditionalGan::new(&(root / "gan"), fusion.out_dim(), c.classifier.num_classes, &c.gan))
            .transpose()
            .map_err(invalid)?;
        Ok(Multimodal {
            modalities,
            image,
            text,
            audio,
            fusion,
            classifier,
            gan,
            augment,
            num_classes: c.classifier.num_classes,
        })
    }
}

/// A modality the model reads but the batch lacks entirely: zeros of the encoder's width.
fn absent(batch: &Batch, dim: i64) -> Tensor {
    Tensor::zeros([batch.len(), dim], (Kind::Float, batch.labels.device()))
}

impl EmotionModel for Multimodal {
    fn embed(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor, WorkerError> {
        let mut embeddings = Vec::new();
        let mut columns = Vec::new();
        for &m in &self.modalities {
            let e = match m {
                Modality::Image => {
                    let enc = self.image.as_ref().expect("built for its modality");
                    match &batch.image {
                        Some(x) => enc.forward(x, ctx), // [B, D_image]
                        None => absent(batch, enc.out_dim()),
                    }
                }
                Modality::Text => {
                    let enc = self.text.as_ref().expect("built for its modality");
                    match &batch.text {
                        Some(t) => enc.forward(t, batch.text_lengths.as_ref(), ctx), // [B, D_text]
                        None => absent(batch, enc.out_dim()),
                    }
                }
                Modality::Audio => {
                    let enc = self.audio.as_ref().expect("built for its modality");
                    match &batch.audio {
                        Some(a) => enc.forward(a, batch.audio_lengths.as_ref(), ctx), // [B, D_audio]
                        None => absent(batch, enc.out_dim()),
                    }
                }
            };
            let present = match m {
                Modality::Image => batch.image.is_some(),
                Modality::Text => batch.text.is_some(),
                Modality::Audio => batch.audio.is_some(),
            };
            embeddings.push(e);
            columns.push(if present {
                batch.modality_mask(m) // [B, 1]
            } else {
                Tensor::zeros([batch.len(), 1], (Kind::Float, batch.labels.device()))
            });
        }
        let mask = Tensor::cat(&columns, 1); // [B, M]
        Ok(self.fusion.forward(&embeddings, &mask)) // [B, D_fused]
    }

    fn classify(&self, fused: &Tensor, ctx: &Ctx) -> Tensor {
        self.classifier.forward(fused, ctx) // [B, K]
    }

    fn num_classes(&self) -> i64 {
        self.num_classes
    }

    fn gan(&self) -> Option<&ConditionalGan> {
        self.gan.as_ref()
    }

    fn augments_with_gan(&self) -> bool {
        self.augment
    }
}

/// A model small enough for debug-build tests, over the shapes of [`tiny_data`].
#[cfg(test)]
pub(crate) fn tiny_config() -> MultimodalConfig {
    MultimodalConfig {
        image: ImageCnnConfig {
            channels: vec![4, 8],
            ..Default::default()
        },
        text: TextLstmConfig {
            vocab_size: 100,
            embedding_dim: 8,
            hidden: 8,
            ..Default::default()
        },
        audio: AudioConfig {
            n_mels: 5,
            hidden: 8,
            ..Default::default()
        },
        classifier: ClassifierConfig {
            hidden: 16,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Synthetic data in the shapes [`tiny_config`] reads.
#[cfg(test)]
pub(crate) fn tiny_data() -> crate::data::synthetic::SyntheticConfig {
    crate::data::synthetic::SyntheticConfig {
        batch_size: 5,
        image_size: 8,
        text_len: 6,
        vocab_size: 100,
        audio_frames: 7,
        audio_bands: 5,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{SyntheticConfig, SyntheticSource};
    use crate::models::fusion::FusionKind;
    use tch::Device;

    fn batch(modalities: Vec<Modality>, missing: f64) -> Batch {
        SyntheticSource::new(SyntheticConfig {
            modalities,
            missing,
            ..tiny_data()
        })
        .unwrap()
        .make_batch(1, 0, 0)
    }

    #[test]
    fn embeds_with_any_subset_of_modalities_present() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Multimodal::new(&vs.root(), &tiny_config()).unwrap();
        let ctx = Ctx::eval();
        for present in [
            vec![Modality::Image],
            vec![Modality::Text, Modality::Audio],
            Modality::ALL.to_vec(),
        ] {
            let fused = model.embed(&batch(present, 0.3), &ctx).unwrap();
            assert_eq!(fused.size(), [5, 8 + 8 + 8]);
            assert_eq!(model.classify(&fused, &ctx).size(), [5, 7]);
        }
    }

    #[test]
    fn gated_attention_with_one_modality_and_a_gan() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = MultimodalConfig {
            modalities: vec![Modality::Audio],
            fusion: FusionConfig {
                kind: FusionKind::GatedAttention,
                dim: 6,
                attention_dim: 4,
            },
            augment: Augment::Gan,
            ..tiny_config()
        };
        let model = Multimodal::new(&vs.root(), &c).unwrap();
        assert!(model.image.is_none() && model.text.is_none());
        assert!(model.gan().is_some() && model.augments_with_gan());
        let fused = model.embed(&batch(Modality::ALL.to_vec(), 0.0), &Ctx::eval()).unwrap();
        assert_eq!(fused.size(), [5, 6]);
    }

    #[test]
    fn refuses_no_modalities() {
        let vs = nn::VarStore::new(Device::Cpu);
        let c = MultimodalConfig {
            modalities: vec![],
            ..tiny_config()
        };
        assert!(matches!(Multimodal::new(&vs.root(), &c), Err(WorkerError::Train(_))));
    }
}
