//! `manifest.json`: what a dataset holds. Written last, so its presence is the commit.

use crate::vocab::Vocabulary;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The object that commits a dataset.
pub const MANIFEST: &str = "manifest.json";
/// The manifest format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Every `KEY.wav` is 16 kHz mono 16-bit PCM.
pub const SAMPLE_RATE: u32 = 16_000;
/// Every `KEY.png` is a square 8-bit grayscale image of this side.
pub const IMAGE_SIZE: u32 = 48;
/// Pixels in one decoded image (row-major, one byte each).
pub const IMAGE_PIXELS: usize = (IMAGE_SIZE * IMAGE_SIZE) as usize;
/// The classes of `chorus dataset synth`, and of `pack` unless `--classes` says otherwise.
pub const EMOTIONS: [&str; 7] = [
    "anger",
    "disgust",
    "fear",
    "happiness",
    "sadness",
    "surprise",
    "neutral",
];

/// [`EMOTIONS`] as the class list of a manifest (synth, and the importers' and pack's default).
pub(crate) fn emotion_classes() -> Vec<String> {
    EMOTIONS.iter().map(|c| c.to_string()).collect()
}

/// Labels are stored as one byte per sample in the loader.
pub const MAX_CLASSES: usize = 256;

/// 1 to [`MAX_CLASSES`] distinct, non-empty names.
pub(crate) fn check_classes(classes: &[String]) -> Result<(), String> {
    if classes.is_empty() || classes.len() > MAX_CLASSES {
        return Err(format!("needs 1 to {MAX_CLASSES} classes, has {}", classes.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for c in classes {
        if c.trim().is_empty() || !seen.insert(c.as_str()) {
            return Err(format!("class names must be non-empty and distinct, {c:?} is not"));
        }
    }
    Ok(())
}

/// The object name of the shard with this index: names sort in index order.
pub fn shard_key(index: usize) -> String {
    format!("shard-{index:05}.tar")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = String;

    /// Accepts the spellings corpora use (`validation`, `dev`) besides the canonical ones.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "val" | "valid" | "validation" | "dev" => Ok(Split::Val),
            "test" | "testing" => Ok(Split::Test),
            other => Err(format!("unknown split {other:?} (use train, val or test)")),
        }
    }
}

/// Samples per split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub train: u64,
    pub val: u64,
    pub test: u64,
}

impl SplitCounts {
    pub fn get(&self, split: Split) -> u64 {
        match split {
            Split::Train => self.train,
            Split::Val => self.val,
            Split::Test => self.test,
        }
    }

    pub fn get_mut(&mut self, split: Split) -> &mut u64 {
        match split {
            Split::Train => &mut self.train,
            Split::Val => &mut self.val,
            Split::Test => &mut self.test,
        }
    }

    pub fn total(&self) -> u64 {
        self.train + self.val + self.test
    }
}

/// How many samples carry each optional modality (every sample carries a label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModalityCounts {
    pub image: u64,
    pub audio: u64,
    pub text: u64,
}

impl ModalityCounts {
    pub fn add(&mut self, other: &ModalityCounts) {
        self.image += other.image;
        self.audio += other.audio;
        self.text += other.text;
    }
}

/// One shard as the manifest lists it. The counts let `inspect` answer without reading shards,
/// and let a reader prove that a shard is the one the manifest was written for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Object name relative to the dataset, e.g. `shard-00003.tar`.
    pub key: String,
    pub split: Split,
    pub samples: u64,
    /// Size of the tar in bytes.
    pub bytes: u64,
    /// CRC-32C (Castagnoli) of the whole tar.
    pub crc32c: u32,
    /// Samples per class, indexed like `Manifest::classes`.
    pub class_counts: Vec<u64>,
    pub modalities: ModalityCounts,
}

impl ShardInfo {
    /// Checks bytes claimed to be this shard against its size and checksum, e.g. a copy from a
    /// local cache.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), crate::DatasetError> {
        if bytes.len() as u64 != self.bytes {
            return Err(crate::DatasetError::shard(
                &self.key,
                format!("size {} differs from the manifest's {}", bytes.len(), self.bytes),
            ));
        }
        let crc = crc32c::crc32c(bytes);
        if crc != self.crc32c {
            return Err(crate::DatasetError::shard(
                &self.key,
                format!(
                    "checksum mismatch: crc32c {crc:08x} differs from the manifest's {:08x}",
                    self.crc32c
                ),
            ));
        }
        Ok(())
    }
}

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer; a reader refuses newer versions.
    pub version: u32,
    pub name: String,
    /// How the dataset was made, e.g. `chorus dataset synth --seed 7`; informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Class names; a label is an index into this list.
    pub classes: Vec<String>,
    pub sample_rate: u32,
    pub image_size: u32,
    pub splits: SplitCounts,
    /// Train shards first, then val, then test.
    pub shards: Vec<ShardInfo>,
    /// Token ids for `KEY.txt`: id = index; 0 is `<pad>`, 1 is `<unk>`.
    pub vocabulary: Vocabulary,
}

impl Manifest {
    pub fn shard(&self, key: &str) -> Option<&ShardInfo> {
        self.shards.iter().find(|s| s.key == key)
    }

    pub fn shards_in(&self, split: Split) -> impl Iterator<Item = &ShardInfo> {
        self.shards.iter().filter(move |s| s.split == split)
    }

    pub fn samples(&self) -> u64 {
        self.splits.total()
    }

    /// Bytes of all shards (the manifest itself not counted).
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    pub fn modalities(&self) -> ModalityCounts {
        let mut m = ModalityCounts::default();
        for s in &self.shards {
            m.add(&s.modalities);
        }
        m
    }

    /// Samples per class and split, indexed like `classes`.
    pub fn class_counts(&self, split: Split) -> Vec<u64> {
        let mut out = vec![0; self.classes.len()];
        for s in self.shards_in(split) {
            for (o, c) in out.iter_mut().zip(&s.class_counts) {
                *o += c;
            }
        }
        out
    }

    /// Checks that the manifest agrees with itself and with what this build can read; a reader
    /// calls it before trusting any count.
    pub fn validate(&self) -> Result<(), String> {
        if self.version > FORMAT_VERSION {
            return Err(format!(
                "format version {} is newer than this build reads ({FORMAT_VERSION})",
                self.version
            ));
        }
        if self.version == 0 {
            return Err("format version 0 does not exist".into());
        }
        check_classes(&self.classes)?;
        if self.sample_rate != SAMPLE_RATE {
            return Err(format!(
                "sample_rate is {}, the format fixes {SAMPLE_RATE}",
                self.sample_rate
            ));
        }
        if self.image_size != IMAGE_SIZE {
            return Err(format!(
                "image_size is {}, the format fixes {IMAGE_SIZE}",
                self.image_size
            ));
        }
        self.vocabulary.validate()?;
        let mut keys = std::collections::HashSet::new();
        let mut sums = SplitCounts::default();
        let mut bytes = 0u64;
        for s in &self.shards {
            if s.key.is_empty() || s.key.contains('/') || !s.key.ends_with(".tar") {
                return Err(format!(
                    "shard key {:?} is not a .tar name in the dataset directory",
                    s.key
                ));
            }
            if !keys.insert(s.key.as_str()) {
                return Err(format!("shard {} is listed twice", s.key));
            }
            if s.class_counts.len() != self.classes.len() {
                return Err(format!(
                    "shard {} has {} class counts for {} classes",
                    s.key,
                    s.class_counts.len(),
                    self.classes.len()
                ));
            }
            // Counts are untrusted u64s: a sum that wraps could make absurd counts add up.
            let by_class = s
                .class_counts
                .iter()
                .try_fold(0u64, |sum, &c| sum.checked_add(c))
                .ok_or_else(|| format!("shard {} has class counts too large to add up", s.key))?;
            if by_class != s.samples {
                return Err(format!(
                    "shard {} lists {} samples but its class counts add up to {by_class}",
                    s.key, s.samples
                ));
            }
            let m = &s.modalities;
            if m.image.max(m.audio).max(m.text) > s.samples {
                return Err(format!("shard {} counts more modalities than samples", s.key));
            }
            let sum = sums.get_mut(s.split);
            *sum = sum
                .checked_add(s.samples)
                .ok_or_else(|| format!("the {} shards hold more samples than a count can", s.split))?;
            bytes = bytes
                .checked_add(s.bytes)
                .ok_or_else(|| "the shards' sizes are too large to add up".to_string())?;
        }
        // Then every total the accessors compute (samples, bytes, per class, per modality) fits.
        if sums
            .train
            .checked_add(sums.val)
            .and_then(|n| n.checked_add(sums.test))
            .is_none()
        {
            return Err("the splits hold more samples than a count can".into());
        }
        for split in Split::ALL {
            if sums.get(split) != self.splits.get(split) {
                return Err(format!(
                    "splits.{split} is {} but its shards hold {} samples",
                    self.splits.get(split),
                    sums.get(split)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: FORMAT_VERSION,
            name: "t".into(),
            source: None,
            classes: emotion_classes(),
            sample_rate: SAMPLE_RATE,
            image_size: IMAGE_SIZE,
            splits: SplitCounts {
                train: 3,
                val: 1,
                test: 0,
            },
            shards: vec![
                ShardInfo {
                    key: shard_key(0),
                    split: Split::Train,
                    samples: 3,
                    bytes: 10,
                    crc32c: 1,
                    class_counts: vec![1, 2, 0, 0, 0, 0, 0],
                    modalities: ModalityCounts {
                        image: 3,
                        audio: 2,
                        text: 0,
                    },
                },
                ShardInfo {
                    key: shard_key(1),
                    split: Split::Val,
                    samples: 1,
                    bytes: 10,
                    crc32c: 1,
                    class_counts: vec![0, 0, 0, 0, 0, 0, 1],
                    modalities: ModalityCounts::default(),
                },
            ],
            vocabulary: Vocabulary::new(["hello"]),
        }
    }

    #[test]
    fn a_consistent_manifest_validates_and_round_trips() {
        let m = manifest();
        m.validate().unwrap();
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.vocabulary.id("hello"), Some(2));
        assert_eq!(m.class_counts(Split::Train), [1, 2, 0, 0, 0, 0, 0]);
        assert_eq!(shard_key(12), "shard-00012.tar");
    }

    #[test]
    fn contradictions_are_named() {
        let mut m = manifest();
        m.splits.train = 4;
        assert_eq!(
            m.validate().unwrap_err(),
            "splits.train is 4 but its shards hold 3 samples"
        );
        let mut m = manifest();
        m.shards[0].class_counts[0] = 5;
        assert!(m.validate().unwrap_err().contains("class counts add up to 7"));
        let mut m = manifest();
        m.shards[1].key = shard_key(0);
        assert!(m.validate().unwrap_err().contains("listed twice"));
        let mut m = manifest();
        m.version = 2;
        assert!(m.validate().unwrap_err().contains("newer than this build"));
        let mut m = manifest();
        m.classes.pop();
        assert!(m.validate().unwrap_err().contains("7 class counts for 6 classes"));
    }

    /// Reproduced with the `dataset_manifest` fuzz target (fuzz/regressions/): sums of untrusted u64
    /// counts overflowed (a panic with overflow checks, wrapped counts that "add up" without).
    #[test]
    fn counts_too_large_to_add_up_are_refused() {
        let mut m = manifest();
        // u64::MAX + 2 wraps to 1, the shard's sample count.
        m.shards[1].class_counts = vec![u64::MAX, 0, 0, 0, 0, 2, 0];
        assert_eq!(
            m.validate().unwrap_err(),
            "shard shard-00001.tar has class counts too large to add up"
        );
        let mut m = manifest();
        m.shards[1].split = Split::Train;
        m.shards[1].samples = u64::MAX;
        m.shards[1].class_counts = vec![0, 0, 0, 0, 0, 0, u64::MAX];
        m.splits = SplitCounts {
            train: 2,
            val: 0,
            test: 0,
        };
        assert_eq!(
            m.validate().unwrap_err(),
            "the train shards hold more samples than a count can"
        );
        let mut m = manifest();
        m.shards[1].samples = u64::MAX;
        m.shards[1].class_counts = vec![0, 0, 0, 0, 0, 0, u64::MAX];
        m.splits.val = u64::MAX;
        assert_eq!(
            m.validate().unwrap_err(),
            "the splits hold more samples than a count can"
        );
        let mut m = manifest();
        m.shards[0].bytes = u64::MAX;
        assert_eq!(m.validate().unwrap_err(), "the shards' sizes are too large to add up");
    }

    #[test]
    fn splits_parse_common_spellings() {
        assert_eq!("Validation".parse::<Split>(), Ok(Split::Val));
        assert_eq!(" train ".parse::<Split>(), Ok(Split::Train));
        assert!("holdout".parse::<Split>().is_err());
    }
}
