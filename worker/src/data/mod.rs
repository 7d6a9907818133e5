//! What the trainer eats: batches of tensors with per-sample modality masks, from a
//! [`BatchSource`] that can say where it is (a [`DataCursor`]) and go back there on resume.
//!
//! Sources own their I/O and decoding; the trainer never waits on storage itself:
//! [`shards::ShardSource`] reads the dataset format, [`synthetic::SyntheticSource`] makes data in
//! memory for tests and benchmarks.

pub mod shards;
pub mod synthetic;

use crate::error::WorkerError;
use chorus_core::shards::{ShardSize, ShardSpan};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// The modalities a sample can carry, in the column order of [`Batch::mask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Image,
    Text,
    Audio,
}

impl Modality {
    pub const ALL: [Modality; 3] = [Modality::Image, Modality::Text, Modality::Audio];

    /// The column of this modality in [`Batch::mask`].
    pub fn column(self) -> i64 {
        self as i64
    }
}

/// One batch of `B` samples, on the CPU as sources make it. A modality absent from the whole
/// batch may be `None`; one absent from some samples is zero-filled there and masked.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 1, H, W]` float, grey levels scaled to about unit range.
    pub image: Option<Tensor>,
    /// `[B, T]` int64 token ids, padded with 0 after each sample's length.
    pub text: Option<Tensor>,
    /// `[B]` int64, the number of real tokens per sample (`None`: all `T` are real).
    pub text_lengths: Option<Tensor>,
    /// `[B, F, M]` float, `F` frames of `M` log-mel bands, zero-padded after each sample's length.
    pub audio: Option<Tensor>,
    /// `[B]` int64, the number of real frames per sample (`None`: all `F` are real).
    pub audio_lengths: Option<Tensor>,
    /// `[B, 3]` float, 1 where the sample carries the modality of that column
    /// ([`Modality::column`]), 0 where it is missing.
    pub mask: Tensor,
    /// `[B]` int64 class indices.
    pub labels: Tensor,
}

impl Batch {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same batch on `device` (a no-op where it already is).
    pub fn to_device(&self, device: Device) -> Batch {
        let move_opt = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device));
        Batch {
            image: move_opt(&self.image),
            text: move_opt(&self.text),
            text_lengths: move_opt(&self.text_lengths),
            audio: move_opt(&self.audio),
            audio_lengths: move_opt(&self.audio_lengths),
            mask: self.mask.to_device(device),
            labels: self.labels.to_device(device),
        }
    }

    /// `[B, 1]` float mask of one modality, ready to multiply `[B, D]` embeddings.
    pub fn modality_mask(&self, m: Modality) -> Tensor {
        self.mask.narrow(1, m.column(), 1)
    }

    /// Samples `start..start + len` of the batch, sharing storage.
    pub fn narrow(&self, start: i64, len: i64) -> Batch {
        let n = |t: &Tensor| t.narrow(0, start, len);
        let n_opt = |t: &Option<Tensor>| t.as_ref().map(n);
        Batch {
            image: n_opt(&self.image),
            text: n_opt(&self.text),
            text_lengths: n_opt(&self.text_lengths),
            audio: n_opt(&self.audio),
            audio_lengths: n_opt(&self.audio_lengths),
            mask: n(&self.mask),
            labels: n(&self.labels),
        }
    }

    /// A shallow copy sharing the tensors' storage.
    pub fn shallow_clone(&self) -> Batch {
        let c = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
        Batch {
            image: c(&self.image),
            text: c(&self.text),
            text_lengths: c(&self.text_lengths),
            audio: c(&self.audio),
            audio_lengths: c(&self.audio_lengths),
            mask: self.mask.shallow_clone(),
            labels: self.labels.shallow_clone(),
        }
    }
}

/// Where a source stands in its training pass: the next batch `next_train` returns is batch
/// `batch` (0-based) of epoch `epoch`. `detail` is the source's own, opaque to the trainer, kept
/// in checkpoints as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DataCursor {
    pub epoch: u64,
    pub batch: u64,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// A source of training and validation batches. The order of an epoch may depend only on the
/// source's seed and the epoch number, so that seeking to a cursor replays exactly what followed
/// it. Implementations may prefetch on their own threads; calls come from the trainer thread.
pub trait BatchSource: Send {
    /// Training batches per epoch (the cosine schedule and progress reports need it).
    fn steps_per_epoch(&self) -> u64;

    /// Starts the training pass of `epoch` from its first batch.
    fn begin_epoch(&mut self, epoch: u64) -> Result<(), WorkerError>;

    /// Names the pass after the current one (the whole of `epoch`), so a source that prepares
    /// batches ahead may go on into it before the current pass ends. A hint: what the next
    /// `begin_epoch` or `seek` asks for is what counts.
    fn prefetch_epoch(&mut self, epoch: u64) {
        let _ = epoch;
    }

    /// The next training batch of the current pass, or `None` at its end.
    fn next_train(&mut self) -> Result<Option<Batch>, WorkerError>;

    /// Where the next `next_train` would read.
    fn cursor(&self) -> DataCursor;

    /// Goes back to a cursor from a checkpoint: the next `next_train` returns what followed it.
    fn seek(&mut self, cursor: &DataCursor) -> Result<(), WorkerError>;

    /// The validation set, the same batches every call.
    fn validation(&mut self) -> Box<dyn Iterator<Item = Result<Batch, WorkerError>> + '_>;

    /// The training shards and their sample counts, from which a data-parallel plan is made.
    fn shard_sizes(&self) -> Result<Vec<ShardSize>, WorkerError> {
        Err(WorkerError::Data(
            "this data source is not sharded, so it cannot be split between ranks".into(),
        ))
    }

    /// Starts a data-parallel pass over `spans`, this rank's part of epoch `epoch`'s plan: the
    /// next `next_train` returns their first samples, and `None` once they are all read.
    fn begin_spans(&mut self, epoch: u64, spans: &[ShardSpan]) -> Result<(), WorkerError> {
        let _ = (epoch, spans);
        Err(WorkerError::Data(
            "this data source is not sharded, so it cannot be split between ranks".into(),
        ))
    }

    /// [`BatchSource::prefetch_epoch`] for a data-parallel rank: its spans of the next epoch.
    fn prefetch_spans(&mut self, epoch: u64, spans: &[ShardSpan]) {
        let _ = (epoch, spans);
    }

    /// The sample keys of the batch `next_train` returned last, where the source knows them.
    fn last_keys(&self) -> Vec<String> {
        Vec::new()
    }
}
