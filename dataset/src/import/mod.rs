//! From a corpus on disk to a committed dataset: what `pack` and the corpus importers share.
//!
//! A producer first reads its corpus's metadata into entries (key, label, split, text, and
//! where the image and audio are), checking every label, split and name before anything is
//! written, so a bad row fails fast and commits nothing. `write` then assigns splits to entries
//! without one, builds the vocabulary from the train texts, plans the shards, and loads each
//! entry's media only when its shard is being filled: memory holds the metadata of the corpus and
//! the open shards, never the decoded images and audio of all of it.
//!
//! The importers ([`import_fer2013`], [`import_ravdess`], [`import_meld`]) read the published
//! formats of three emotion corpora and map their labels onto [`EMOTIONS`]; each returns what it
//! left out, and why, beside the manifest.

mod fer2013;
mod meld;
mod ravdess;

pub use fer2013::{FER2013_CLASSES, Fer2013Options, import_fer2013};
pub use meld::{MELD_CLASSES, MeldOptions, MeldPart, import_meld};
pub use ravdess::{RAVDESS_CLASSES, RAVDESS_STATEMENTS, RavdessOptions, import_ravdess};

use crate::error::{DatasetError, Result};
pub(crate) use crate::manifest::emotion_classes;
use crate::manifest::{EMOTIONS, Manifest, Split, SplitCounts};
use crate::sample::Sample;
use crate::store::{DatasetHeader, DatasetWriter, ShardPlan};
use crate::synth::{split_counts, split_of};
use crate::vocab::Vocabulary;
use chorus_core::storage::Storage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;

/// Shards a producer makes unless told otherwise: enough for a few data-parallel ranks.
pub const DEFAULT_SHARDS: usize = 8;

/// What every producer from files takes, named as the CLI's flags are.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Recorded in the manifest.
    pub name: String,
    /// Shards in total; `None` makes [`DEFAULT_SHARDS`], fewer when the corpus has fewer
    /// samples and more when there are more non-empty splits.
    pub shards: Option<usize>,
    /// Seed of the split of entries that have none, and of the order of entries in shards.
    pub seed: u64,
    /// Share of the entries without a split that go to val, and to test.
    pub val_fraction: f64,
    pub test_fraction: f64,
    /// Most tokens kept in the vocabulary, the two reserved ones included.
    pub max_vocabulary: usize,
}

impl ImportOptions {
    /// Options that cannot make any dataset, refused before a file is read.
    pub(crate) fn check(&self) -> Result<()> {
        split_counts(0, self.val_fraction, self.test_fraction)?;
        if self.shards == Some(0) {
            return Err(DatasetError::InvalidArgument("--shards must be at least 1".into()));
        }
        Ok(())
    }
}

/// A dataset made from a corpus, and what of the corpus did not go into it as it was.
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    pub manifest: Manifest,
    /// Inputs that were not made into samples, counted by reason (files of another modality,
    /// songs left out on request, files that are not WAVs).
    pub skipped: BTreeMap<String, u64>,
    /// Samples written without a modality the corpus normally has, counted by reason (a MELD row
    /// whose clip is not in the audio directory).
    pub incomplete: BTreeMap<String, u64>,
}

/// One future sample, known by its metadata; `S` says where its image or audio is.
#[derive(Debug, Clone)]
pub(crate) struct Entry<S> {
    /// The sample's key in its shard: names the row or file it comes from.
    pub key: String,
    pub label: u8,
    /// `None`: drawn by the fractions.
    pub split: Option<Split>,
    pub text: Option<String>,
    pub source: S,
}

/// An entry's image and audio, loaded when its shard is filled.
#[derive(Debug, Default)]
pub(crate) struct Media {
    pub image: Option<Vec<u8>>,
    pub audio: Option<Vec<f32>>,
}

/// The index of a Chorus class by name, for the importers' label tables.
pub(crate) fn emotion(name: &str) -> u8 {
    EMOTIONS
        .iter()
        .position(|e| *e == name)
        .unwrap_or_else(|| panic!("{name} is not one of EMOTIONS")) as u8
}

/// Writes `entries` as a dataset under `storage`, manifest last; `load` reads one entry's media.
///
/// Entries without a split are shuffled and cut by the fractions; then the entries of each split
/// are shuffled (with `seed`) so that shards mix classes even when a corpus is sorted by class or
/// speaker. The vocabulary comes from the train split's texts only, so val and test see unknown
/// words as a deployed model would.
pub(crate) async fn write<S>(
    storage: Storage,
    opts: &ImportOptions,
    source: String,
    classes: Vec<String>,
    mut entries: Vec<Entry<S>>,
    replace: bool,
    mut load: impl FnMut(&Entry<S>) -> Result<Media>,
) -> Result<Manifest> {
    opts.check()?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut free: Vec<usize> = (0..entries.len()).filter(|i| entries[*i].split.is_none()).collect();
    free.shuffle(&mut rng);
    let free_counts = split_counts(free.len() as u64, opts.val_fraction, opts.test_fraction)?;
    for (n, i) in free.into_iter().enumerate() {
        entries[i].split = Some(split_of(n as u64, &free_counts));
    }
    let mut by_split: [Vec<Entry<S>>; 3] = Default::default();
    for e in entries {
        let split = e.split.expect("assigned above");
        by_split[split as usize].push(e);
    }
    let train_texts = by_split[Split::Train as usize].iter().filter_map(|e| e.text.as_deref());
    let vocabulary = Vocabulary::build(train_texts, opts.max_vocabulary);
    let mut counts = SplitCounts::default();
    for split in Split::ALL {
        *counts.get_mut(split) = by_split[split as usize].len() as u64;
    }
    let shards = opts.shards.unwrap_or_else(|| {
        let non_empty = Split::ALL.iter().filter(|s| counts.get(**s) > 0).count();
        DEFAULT_SHARDS.min(counts.total() as usize).max(non_empty)
    });
    let plan = ShardPlan::new(counts, shards)?;
    let header = DatasetHeader {
        name: opts.name.clone(),
        source: Some(source),
        classes,
        vocabulary,
    };
    let mut writer = DatasetWriter::create(storage, header, plan, replace).await?;
    for (split, entries) in Split::ALL.into_iter().zip(by_split.iter_mut()) {
        entries.shuffle(&mut rng);
        for entry in entries.iter() {
            let media = load(entry)?;
            let sample = Sample {
                key: entry.key.clone(),
                image: media.image,
                audio: media.audio,
                text: entry.text.clone(),
                label: entry.label,
            };
            writer.add(split, &sample).await?;
        }
    }
    writer.finish().await
}

/// Counts by reason, for [`Imported`].
#[derive(Debug, Default)]
pub(crate) struct Tally(BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, reason: impl Into<String>) {
        *self.0.entry(reason.into()).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn into_map(self) -> BTreeMap<String, u64> {
        self.0
    }
}

/// Opens a file of the corpus, naming it on failure.
pub(crate) fn open(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| DatasetError::Io {
        path: path.display().to_string(),
        source: e,
    })
}

/// Columns of a CSV header by name (case-insensitive, surrounding spaces ignored): `Some(index)`
/// for each of `wanted`, in order. `others_allowed`: other columns are ignored instead of refused.
pub(crate) fn columns<const N: usize>(
    headers: &csv::StringRecord,
    wanted: [&str; N],
    others_allowed: bool,
) -> Result<[Option<usize>; N], String> {
    let mut found = [None; N];
    for (i, h) in headers.iter().enumerate() {
        let name = h.trim().trim_start_matches('\u{feff}');
        match wanted.iter().position(|w| w.eq_ignore_ascii_case(name)) {
            Some(c) => {
                if found[c].replace(i).is_some() {
                    return Err(format!("column {h:?} appears twice"));
                }
            }
            None if others_allowed => {}
            None => {
                return Err(format!("unknown column {h:?} (columns: {})", wanted.join(", ")));
            }
        }
    }
    Ok(found)
}

/// The line a CSV error happened on, 0 when the reader does not know.
pub(crate) fn csv_error_line(e: &csv::Error) -> u64 {
    e.position().map_or(0, |p| p.line())
}
