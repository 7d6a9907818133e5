//! Batches from a sharded dataset in object storage (the `chorus-dataset` format).
//!
//! The source reads only the shards it is given, keeps a bounded copy of them on local disk,
//! and decodes, featurises and batches on a background thread a few batches ahead, so the
//! training thread waits on storage only when the cache is cold. The order of an epoch is a
//! function of (seed, epoch) alone: the shards are shuffled, then the samples inside each shard,
//! so a cursor (epoch, batch) names a position that seeking can reach again without decoding
//! the shards before it.

use super::{Batch, BatchSource, DataCursor};
use crate::error::WorkerError;
use chorus_core::shards::{ShardSize, ShardSpan};
use chorus_core::storage::Storage;
use chorus_dataset::{IMAGE_PIXELS, LogMel, Manifest, Sample, ShardInfo, Split, fetch_shard, parse_shard};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tch::Tensor;

/// How a [`ShardSource`] shapes its batches and where it caches.
#[derive(Debug, Clone)]
pub struct ShardSourceConfig {
    pub batch_size: i64,
    pub seed: u64,
    /// Tokens per text, padded or truncated.
    pub text_len: i64,
    /// Log-mel frames per clip, padded or truncated.
    pub audio_frames: i64,
    /// Batches decoded ahead of the trainer.
    pub prefetch: usize,
    pub cache_dir: PathBuf,
    /// Bytes of shards kept on local disk; the least recently used go first.
    pub cache_bytes: u64,
}

/// One sample, decoded and featurised, ready to be stacked into a batch.
struct Prepared {
    key: String,
    image: Option<Vec<f32>>,
    tokens: Option<Vec<i64>>,
    mel: Option<Vec<[f32; 64]>>,
    label: i64,
}

/// What the producer thread shares with the source.
struct Shared {
    storage: Storage,
    manifest: Manifest,
    config: ShardSourceConfig,
    runtime: tokio::runtime::Handle,
    log_mel: LogMel,
    cache: Mutex<ShardCache>,
}

pub struct ShardSource {
    shared: Arc<Shared>,
    /// The training shards this source reads, in manifest order.
    train: Vec<ShardInfo>,
    train_samples: u64,
    validation: Vec<Batch>,
    cursor: DataCursor,
    producer: Option<Producer>,
    last_keys: Vec<String>,
}

/// A batch and the keys of its samples.
type Keyed = (Batch, Vec<String>);

struct Producer {
    batches: Option<Receiver<Result<Keyed, WorkerError>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver fails a send the producer may be blocked in.
        self.batches.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl ShardSource {
    /// Opens a source over `train` (keys of training shards; all of them when `None`), and
    /// loads the validation split. Blocks on storage through `runtime`, so it must be called
    /// from a plain thread, not from inside the async runtime.
    pub fn open(
        storage: Storage,
        manifest: Manifest,
        train: Option<&[String]>,
        config: ShardSourceConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<ShardSource, WorkerError> {
        if config.batch_size < 1 || config.text_len < 1 || config.audio_frames < 1 {
            return Err(WorkerError::Data(
                "batch_size, text_len and audio_frames must be positive".into(),
            ));
        }
        let train: Vec<ShardInfo> = match train {
            None => manifest.shards_in(Split::Train).cloned().collect(),
            Some(keys) => keys
                .iter()
                .map(|k| {
                    manifest
                        .shard(k)
                        .cloned()
                        .ok_or_else(|| WorkerError::Data(format!("shard {k} is not in the dataset's manifest")))
                })
                .collect::<Result<_, _>>()?,
        };
        if train.is_empty() {
            return Err(WorkerError::Data(format!(
                "dataset {} has no training shards",
                manifest.name
            )));
        }
        std::fs::create_dir_all(&config.cache_dir)
            .map_err(|e| WorkerError::Data(format!("cannot create {}: {e}", config.cache_dir.display())))?;
        let shared = Arc::new(Shared {
            log_mel: LogMel::new(manifest.sample_rate),
            cache: Mutex::new(ShardCache::new(config.cache_dir.clone(), config.cache_bytes)),
            storage,
            manifest,
            config,
            runtime,
        });
        let mut validation = Vec::new();
        let val: Vec<ShardInfo> = shared.manifest.shards_in(Split::Val).cloned().collect();
        let mut pending: Vec<Prepared> = Vec::new();
        for shard in &val {
            pending.extend(shared.load(shard)?);
            while pending.len() as i64 >= shared.config.batch_size {
                let rest = pending.split_off(shared.config.batch_size as usize);
                validation.push(shared.batch(std::mem::replace(&mut pending, rest)));
            }
        }
        if !pending.is_empty() {
            validation.push(shared.batch(pending));
        }
        let train_samples = train.iter().map(|s| s.samples).sum();
        Ok(ShardSource {
            shared,
            train,
            train_samples,
            validation,
            cursor: DataCursor::default(),
            producer: None,
            last_keys: Vec::new(),
        })
    }

    /// Starts producing `epoch` from batch `skip_batches` on.
    fn start(&mut self, epoch: u64, skip_batches: u64) {
        self.producer = None;
        let (tx, rx) = sync_channel(self.shared.config.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let order = epoch_order(&self.train, self.shared.config.seed, epoch);
        let shared = self.shared.clone();
        let stop_flag = stop.clone();
        let skip_samples = skip_batches * shared.config.batch_size as u64;
        let thread = std::thread::Builder::new()
            .name(format!("chorus-data-e{epoch}"))
            .spawn(move || produce(shared, order, epoch, skip_samples, tx, stop_flag))
            .expect("spawn data thread");
        self.install(rx, stop, thread);
        self.cursor = DataCursor {
            epoch,
            batch: skip_batches,
            detail: serde_json::Value::Null,
        };
    }

    fn install(&mut self, rx: Receiver<Result<Keyed, WorkerError>>, stop: Arc<AtomicBool>, thread: JoinHandle<()>) {
        self.producer = Some(Producer {
            batches: Some(rx),
            stop,
            thread: Some(thread),
        });
    }
}

/// The shards of an epoch in their shuffled order.
fn epoch_order(train: &[ShardInfo], seed: u64, epoch: u64) -> Vec<ShardInfo> {
    let mut order = train.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    order.shuffle(&mut rng);
    order
}

/// A data-parallel rank's pass: the samples of `spans` in order, a span's samples taken from its
/// shard in the order drawn from (seed, epoch, shard key), which no plan around it changes.
fn produce_spans(
    shared: Arc<Shared>,
    spans: Vec<ShardSpan>,
    epoch: u64,
    tx: SyncSender<Result<Keyed, WorkerError>>,
    stop: Arc<AtomicBool>,
) {
    let b = shared.config.batch_size as usize;
    let mut pending: VecDeque<Prepared> = VecDeque::new();
    for span in &spans {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let shard = match shared.manifest.shard(&span.shard) {
            Some(s) => s.clone(),
            None => {
                let _ = tx.send(Err(WorkerError::Data(format!(
                    "shard {} of the plan is not in the dataset's manifest",
                    span.shard
                ))));
                return;
            }
        };
        let mut samples = match shared.load(&shard) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        if span.end > samples.len() as u64 {
            let _ = tx.send(Err(WorkerError::Data(format!(
                "shard {} holds {} samples; the plan reads up to {}",
                span.shard,
                samples.len(),
                span.end
            ))));
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(shared.config.seed ^ crc32c::crc32c(span.shard.as_bytes()) as u64);
        rng.set_stream(epoch);
        samples.shuffle(&mut rng);
        pending.extend(samples.drain(span.start as usize..span.end as usize));
        while pending.len() >= b {
            let batch: Vec<Prepared> = pending.drain(..b).collect();
            if tx.send(Ok(shared.keyed_batch(batch))).is_err() {
                return;
            }
        }
    }
    if !pending.is_empty() {
        let _ = tx.send(Ok(shared.keyed_batch(pending.into_iter().collect())));
    }
}

fn produce(
    shared: Arc<Shared>,
    order: Vec<ShardInfo>,
    epoch: u64,
    mut skip: u64,
    tx: SyncSender<Result<Keyed, WorkerError>>,
    stop: Arc<AtomicBool>,
) {
    let b = shared.config.batch_size as usize;
    let mut pending: VecDeque<Prepared> = VecDeque::new();
    for (i, shard) in order.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Whole shards before the cursor are skipped without being read.
        if skip >= shard.samples {
            skip -= shard.samples;
            continue;
        }
        let mut samples = match shared.load(shard) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let mut rng = ChaCha8Rng::seed_from_u64(shared.config.seed ^ 0x0053_4841_5244_u64);
        rng.set_stream(epoch.wrapping_mul(1_000_003).wrapping_add(i as u64));
        samples.shuffle(&mut rng);
        pending.extend(samples.into_iter().skip(skip as usize));
        skip = 0;
        while pending.len() >= b {
            let batch: Vec<Prepared> = pending.drain(..b).collect();
            if tx.send(Ok(shared.keyed_batch(batch))).is_err() {
                return;
            }
        }
    }
    if !pending.is_empty() {
        let _ = tx.send(Ok(shared.keyed_batch(pending.into_iter().collect())));
    }
}

impl Shared {
    /// A shard's samples, decoded and featurised; from the local cache when it holds a good copy.
    fn load(&self, shard: &ShardInfo) -> Result<Vec<Prepared>, WorkerError> {
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(shard);
        let bytes = match cached {
            Some(b) => b,
            None => {
                let b = self
                    .runtime
                    .block_on(fetch_shard(&self.storage, shard))
                    .map_err(|e| WorkerError::Data(e.to_string()))?;
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(shard, &b);
                b.to_vec()
            }
        };
        let samples = parse_shard(&shard.key, &bytes, &self.manifest).map_err(|e| WorkerError::Data(e.to_string()))?;
        Ok(samples.into_iter().map(|s| self.prepare(s)).collect())
    }

    fn prepare(&self, s: Sample) -> Prepared {
        let t = self.config.text_len as usize;
        Prepared {
            key: s.key,
            image: s.image.map(|px| px.iter().map(|&p| p as f32 / 255.0).collect()),
            tokens: s.text.map(|text| self.manifest.vocabulary.encode(&text, t)),
            mel: s.audio.map(|a| self.log_mel.compute(&a)),
            label: s.label as i64,
        }
    }

    fn keyed_batch(&self, samples: Vec<Prepared>) -> Keyed {
        let keys = samples.iter().map(|s| s.key.clone()).collect();
        (self.batch(samples), keys)
    }

    /// Stacks samples into a batch; missing modalities are zero-filled and masked.
    fn batch(&self, samples: Vec<Prepared>) -> Batch {
        let n = samples.len() as i64;
        let (t, f) = (self.config.text_len, self.config.audio_frames);
        let mut image = vec![0f32; samples.len() * IMAGE_PIXELS];
        let mut text = vec![0i64; (n * t) as usize];
        let mut text_lengths = vec![1i64; samples.len()];
        let mut audio = vec![0f32; (n * f * 64) as usize];
        let mut audio_lengths = vec![1i64; samples.len()];
        let mut mask = vec![0f32; samples.len() * 3];
        let mut labels = Vec::with_capacity(samples.len());
        for (i, s) in samples.iter().enumerate() {
            if let Some(px) = &s.image {
                image[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS].copy_from_slice(px);
                mask[i * 3] = 1.0;
            }
            if let Some(tok) = &s.tokens {
                let row = &mut text[i * t as usize..(i + 1) * t as usize];
                row[..tok.len()].copy_from_slice(tok);
                text_lengths[i] = tok.iter().filter(|&&x| x != chorus_dataset::PAD).count().max(1) as i64;
                mask[i * 3 + 1] = 1.0;
            }
            if let Some(mel) = &s.mel {
                let frames = mel.len().min(f as usize);
                let row = &mut audio[(i * (f as usize) * 64)..];
                for (j, frame) in mel.iter().take(frames).enumerate() {
                    row[j * 64..(j + 1) * 64].copy_from_slice(frame);
                }
                audio_lengths[i] = frames.max(1) as i64;
                mask[i * 3 + 2] = 1.0;
            }
            labels.push(s.label);
        }
        let side = self.manifest.image_size as i64;
        Batch {
            image: Some(Tensor::from_slice(&image).view([n, 1, side, side])),
            text: Some(Tensor::from_slice(&text).view([n, t])),
            text_lengths: Some(Tensor::from_slice(&text_lengths)),
            audio: Some(Tensor::from_slice(&audio).view([n, f, 64])),
            audio_lengths: Some(Tensor::from_slice(&audio_lengths)),
            mask: Tensor::from_slice(&mask).view([n, 3]),
            labels: Tensor::from_slice(&labels),
        }
    }
}

impl BatchSource for ShardSource {
    fn steps_per_epoch(&self) -> u64 {
        self.train_samples.div_ceil(self.shared.config.batch_size as u64)
    }

    fn begin_epoch(&mut self, epoch: u64) -> Result<(), WorkerError> {
        self.start(epoch, 0);
        Ok(())
    }

    fn next_train(&mut self) -> Result<Option<Batch>, WorkerError> {
        let Some(rx) = self.producer.as_ref().and_then(|p| p.batches.as_ref()) else {
            return Ok(None);
        };
        match rx.recv() {
            Ok(Ok((batch, keys))) => {
                self.cursor.batch += 1;
                self.last_keys = keys;
                Ok(Some(batch))
            }
            Ok(Err(e)) => Err(e),
            // The producer hung up: the epoch is over.
            Err(_) => Ok(None),
        }
    }

    fn cursor(&self) -> DataCursor {
        self.cursor.clone()
    }

    fn seek(&mut self, cursor: &DataCursor) -> Result<(), WorkerError> {
        self.start(cursor.epoch, cursor.batch);
        Ok(())
    }

    fn validation(&mut self) -> Box<dyn Iterator<Item = Result<Batch, WorkerError>> + '_> {
        Box::new(self.validation.iter().map(|b| Ok(b.shallow_clone())))
    }

    fn shard_sizes(&self) -> Result<Vec<ShardSize>, WorkerError> {
        Ok(self
            .train
            .iter()
            .map(|s| ShardSize {
                key: s.key.clone(),
                samples: s.samples,
            })
            .collect())
    }

    fn begin_spans(&mut self, epoch: u64, spans: &[ShardSpan]) -> Result<(), WorkerError> {
        self.producer = None;
        let (tx, rx) = sync_channel(self.shared.config.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, stop_flag, spans) = (self.shared.clone(), stop.clone(), spans.to_vec());
        let thread = std::thread::Builder::new()
            .name(format!("chorus-data-e{epoch}"))
            .spawn(move || produce_spans(shared, spans, epoch, tx, stop_flag))
            .map_err(|e| WorkerError::Task(format!("cannot start the data thread: {e}")))?;
        self.install(rx, stop, thread);
        self.cursor = DataCursor {
            epoch,
            batch: 0,
            detail: serde_json::Value::Null,
        };
        Ok(())
    }

    fn last_keys(&self) -> Vec<String> {
        self.last_keys.clone()
    }
}

/// Shards on local disk, named by key and checksum, evicted least recently used first.
struct ShardCache {
    dir: PathBuf,
    budget: u64,
    /// (file name, bytes), most recently used last.
    entries: Vec<(String, u64)>,
}

impl ShardCache {
    fn new(dir: PathBuf, budget: u64) -> Self {
        ShardCache {
            dir,
            budget,
            entries: Vec::new(),
        }
    }

    fn name(shard: &ShardInfo) -> String {
        format!("{:08x}-{}", shard.crc32c, shard.key)
    }

    /// The cached bytes, if present and still matching the manifest.
    fn get(&mut self, shard: &ShardInfo) -> Option<Vec<u8>> {
        let name = Self::name(shard);
        let pos = self.entries.iter().position(|(n, _)| *n == name)?;
        let entry = self.entries.remove(pos);
        match std::fs::read(self.dir.join(&name)) {
            Ok(bytes) if shard.verify(&bytes).is_ok() => {
                self.entries.push(entry);
                Some(bytes)
            }
            _ => {
                let _ = std::fs::remove_file(self.dir.join(&name));
                None
            }
        }
    }

    fn put(&mut self, shard: &ShardInfo, bytes: &[u8]) {
        if bytes.len() as u64 > self.budget {
            return;
        }
        while self.entries.iter().map(|e| e.1).sum::<u64>() + bytes.len() as u64 > self.budget {
            let (old, _) = self.entries.remove(0);
            let _ = std::fs::remove_file(self.dir.join(old));
        }
        let name = Self::name(shard);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        if std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, self.dir.join(&name)))
            .is_ok()
        {
            self.entries.push((name, bytes.len() as u64));
        }
    }
}
