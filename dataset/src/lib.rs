//! The dataset format of Chorus's built-in emotion trainer: what a dataset in object storage
//! looks like, how it is written (`chorus dataset synth`, `chorus dataset pack`, `chorus dataset
//! import fer2013 | ravdess | meld`) and how it is read, checked and turned into model inputs.
//! It owns the manifest, the tar shards, PNG and WAV decoding, resampling, log-mel features and
//! tokenisation, and the corpus importers; it must not link tch (the CLI links it),
//! and it decides nothing about training: which shards a rank reads, caching and batching
//! belong to the worker.
//!
//! # Layout
//!
//! A dataset is a directory in object storage (`file:///data/emo`, `s3://bucket/datasets/emo`)
//! holding `shard-00000.tar`, `shard-00001.tar`, ... and `manifest.json`. Each shard is a
//! WebDataset-style tar: a sample is the files that share a key, `KEY.cls` (decimal class index,
//! required), `KEY.png` (48x48 8-bit gray), `KEY.wav` (16 kHz mono 16-bit PCM) and `KEY.txt`
//! (UTF-8), any of the last three possibly missing. Each shard holds one split. The manifest is
//! written last, so a dataset exists exactly when its manifest does; it lists every shard with
//! its split, sample count, size, CRC-32C, samples per class and modalities present.
//!
//! # Reading (the worker's data loader)
//!
//! ```no_run
//! # async fn load(storage: chorus_core::storage::Storage) -> Result<(), chorus_dataset::DatasetError> {
//! use chorus_dataset::{LogMel, Split, fetch_shard, parse_shard, read_manifest};
//! let manifest = read_manifest(&storage).await?;           // validated against itself
//! let log_mel = LogMel::new(manifest.sample_rate);         // once per loader thread
//! for shard in manifest.shards_in(Split::Train) {
//!     let bytes = fetch_shard(&storage, shard).await?;     // size and crc32c checked
//!     for sample in parse_shard(&shard.key, &bytes, &manifest)? {  // counts checked
//!         let _image = sample.image;                       // Option<Vec<u8>>, 48*48 pixels
//!         let _mel = sample.audio.as_deref().map(|a| log_mel.compute(a)); // frames x 64
//!         let _ids = sample.text.as_deref().map(|t| manifest.vocabulary.encode(t, 32));
//!         let _label = sample.label;                       // < manifest.classes.len()
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Every error is a [`DatasetError`] naming the object: the manifest, or the shard and the
//! sample key, with the reason (corrupt tar, checksum mismatch, PNG not 48x48, WAV not 16 kHz
//! mono, label not a class index, sample without `.cls`, counts that disagree with the
//! manifest). The functions that touch storage are async (object_store is); the decoding ones
//! are plain CPU work for background threads. A loader that caches shards locally re-checks a
//! cached copy with [`ShardInfo::verify`].
//!
//! # Writing
//!
//! [`ShardWriter`] builds one tar in memory; [`DatasetWriter`] cuts samples into shards by a
//! [`ShardPlan`], uploads each shard as it fills, and puts the manifest last. [`synth()`] (see
//! [`mod@synth`] for the generator), [`pack()`] (see [`mod@pack`] for the CSV) and the corpus
//! importers [`import_fer2013`], [`import_ravdess`] and [`import_meld`] (see [`mod@import`]) are
//! the producers; the last four share one writing path, and convert media through
//! [`load_image`], [`load_audio`] and the band-limited [`resample`].

mod convert;
mod error;
mod features;
pub mod import;
mod manifest;
pub mod pack;
mod sample;
mod shard;
mod store;
pub mod synth;
mod vocab;

pub use convert::{load_audio, load_image, resample};
pub use error::{DatasetError, Result};
pub use features::{LogMel, MEL_BANDS, log_mel};
pub use import::{
    Fer2013Options, ImportOptions, Imported, MeldOptions, MeldPart, RavdessOptions, import_fer2013, import_meld,
    import_ravdess,
};
pub use manifest::{
    EMOTIONS, FORMAT_VERSION, IMAGE_PIXELS, IMAGE_SIZE, MANIFEST, MAX_CLASSES, Manifest, ModalityCounts, SAMPLE_RATE,
    ShardInfo, Split, SplitCounts, shard_key,
};
pub use pack::{PackOptions, pack};
pub use sample::{Sample, decode_png, decode_wav, encode_png, encode_wav};
pub use shard::{ShardWriter, parse_shard};
pub use store::{DatasetHeader, DatasetWriter, PlannedShard, ShardPlan, fetch_shard, read_manifest, verify};
pub use synth::{SynthOptions, synth};
pub use vocab::{PAD, UNK, Vocabulary, tokenize};
