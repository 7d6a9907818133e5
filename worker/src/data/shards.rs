//! Batches from a sharded dataset in object storage (the `chorus-dataset` format).
//!
//! The source reads only the shards it is given, keeps a bounded copy of them on local disk,
//! and decodes, featurises and batches them ahead of the trainer, so the training thread waits
//! on storage only when the cache is cold. The order of an epoch is a function of (seed, epoch)
//! alone: the shards are shuffled, then the samples inside each shard, so a cursor (epoch,
//! batch) names a position that seeking can reach again without decoding the shards before it.
//!
//! A fast GPU eats batches faster than one thread can make them, so the work is split:
//! - **Loaders** (`threads` of them) each take one shard at a time (read from the cache or the
//!   store, checked, parsed, shuffled, featurised). With one thread the producer loads inline,
//!   as a single thread always did.
//! - **The producer** takes the loaders' results back in the order they were handed out (a
//!   bounded window of `threads + 1` shards), cuts them into batches and queues `prefetch`
//!   batches for the trainer. The batches are therefore identical for any thread count.
//! - **Passes run back to back.** When the trainer names the pass after the current one
//!   ([`BatchSource::prefetch_epoch`], [`BatchSource::prefetch_spans`]), the producer goes on
//!   into it as soon as the current pass's shards are handed out, so the next epoch's first
//!   batches are ready when it begins instead of waiting for a whole shard to decode.

use super::{Batch, BatchSource, DataCursor};
use crate::error::WorkerError;
use chorus_core::shards::{ShardSize, ShardSpan};
use chorus_core::storage::Storage;
use chorus_dataset::{IMAGE_PIXELS, LogMel, Manifest, Sample, ShardInfo, Split, fetch_shard, parse_shard};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use tch::{Kind, Tensor};

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
    /// Threads that load and featurise shards, 1 to [`MAX_LOADER_THREADS`]. The batches do not
    /// depend on it.
    pub threads: usize,
    /// Keeps each shard's features (log-mel frames, tokens, scaled pixels) in the shard cache
    /// too, so later epochs skip parsing and featurising. Same batches; more disk (about as much
    /// again as the shards), within the same `cache_bytes`.
    pub feature_cache: bool,
}

/// Loader threads a source may run: beyond this the producer's batching, not featurisation,
/// limits the pace, and every loader holds a shard's samples in memory.
pub const MAX_LOADER_THREADS: usize = chorus_core::builtin::MAX_DATA_THREADS as usize;

/// One sample, decoded and featurised, ready to be stacked into a batch.
struct Prepared {
    key: String,
    image: Option<Vec<f32>>,
    tokens: Option<Vec<i64>>,
    mel: Option<Vec<[f32; 64]>>,
    label: i64,
}

/// What the producer and the loaders share with the source.
struct Shared {
    storage: Storage,
    manifest: Manifest,
    config: ShardSourceConfig,
    runtime: tokio::runtime::Handle,
    log_mel: LogMel,
    /// The worker's cache of this directory, shared by every source reading through it.
    cache: Arc<Mutex<ShardCache>>,
    /// A hash of everything featurisation depends on, naming and checking cached features.
    feature_params: u64,
}

pub struct ShardSource {
    shared: Arc<Shared>,
    /// The training shards this source reads, in manifest order.
    train: Vec<ShardInfo>,
    train_samples: u64,
    validation: Vec<Batch>,
    cursor: DataCursor,
    producer: Option<Producer>,
    /// Why the last pass failed, until another begins: every later `next_train` says it again.
    failed: Option<String>,
    last_keys: Vec<String>,
    /// Producers started: a pass taken over from a running producer starts none.
    starts: u64,
}

/// A batch and the keys of its samples.
type Keyed = (Batch, Vec<String>);

/// What the producer sends the trainer's side.
enum Msg {
    Batch(Keyed),
    /// The pass of this epoch is over; the producer goes on with the next pass it was given.
    End(u64),
    Failed(WorkerError),
}

/// Some samples of one shard, shuffled as their pass draws them: the loaders' unit of work.
#[derive(Debug, Clone)]
struct Job {
    shard: ShardInfo,
    /// The shuffle of the shard's samples: a ChaCha8 seed and stream.
    seed: u64,
    stream: u64,
    /// The samples taken after the shuffle: `start..end` (`None`: to the shard's end).
    start: u64,
    end: Option<u64>,
}

/// Which pass a producer was given, to tell whether a later `begin_*` can take it over.
#[derive(Debug, Clone, PartialEq)]
enum PassKey {
    /// A whole epoch from its first batch (single-rank).
    Epoch(u64),
    /// A data-parallel rank's spans of an epoch.
    Spans(u64, Vec<ShardSpan>),
    /// An epoch from a batch other than the first (a seek): never taken over.
    Resumed(u64, u64),
}

impl PassKey {
    fn epoch(&self) -> u64 {
        match self {
            PassKey::Epoch(e) | PassKey::Spans(e, _) | PassKey::Resumed(e, _) => *e,
        }
    }
}

/// The training pass of one epoch: its shards' jobs in order.
struct Pass {
    epoch: u64,
    jobs: Vec<Job>,
}

struct Producer {
    batches: Option<Receiver<Msg>>,
    /// Passes after the current one; dropping it lets the producer end once they are done.
    passes: Option<Sender<Pass>>,
    /// The passes handed to the producer whose end the trainer has not read yet, in order.
    given: VecDeque<PassKey>,
    /// The trainer read the end of a pass and has not begun the next.
    between: bool,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver fails a send the producer may be blocked in, and dropping the
        // pass sender ends its wait for the next pass.
        self.batches.take();
        self.passes.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Producer {
    /// Starts a producer on `first`; the loaders are its scoped threads, so they end with it.
    fn start(shared: Arc<Shared>, first: Pass, key: PassKey) -> Result<Producer, WorkerError> {
        let (tx, rx) = sync_channel(shared.config.prefetch.max(1));
        let (passes_tx, passes_rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let epoch = first.epoch;
        // The receiver is alive until the thread starts, so this cannot fail.
        let _ = passes_tx.send(first);
        let thread = std::thread::Builder::new()
            .name(format!("chorus-data-e{epoch}"))
            .spawn(move || produce(&shared, passes_rx, &tx, &stop_flag))
            .map_err(|e| WorkerError::Task(format!("cannot start the data thread: {e}")))?;
        Ok(Producer {
            batches: Some(rx),
            passes: Some(passes_tx),
            given: VecDeque::from([key]),
            between: false,
            stop,
            thread: Some(thread),
        })
    }

    /// Hands the producer the pass after those it has.
    fn then(&mut self, pass: Pass, key: PassKey) {
        if let Some(tx) = &self.passes
            && tx.send(pass).is_ok()
        {
            self.given.push_back(key);
        }
    }

    /// Takes the next pass over if it is `key` and the trainer has read the end of the one before.
    fn take_over(&mut self, key: &PassKey) -> bool {
        if self.between && self.given.front() == Some(key) {
            self.between = false;
            true
        } else {
            false
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
        if !(1..=MAX_LOADER_THREADS).contains(&config.threads) {
            return Err(WorkerError::Data(format!(
                "{} data loader threads asked for; 1 to {MAX_LOADER_THREADS} can run",
                config.threads
            )));
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
        let feature_params = feature_params(&manifest, &config);
        let shared = Arc::new(Shared {
            feature_params,
            log_mel: LogMel::new(manifest.sample_rate),
            cache: ShardCache::shared(&config.cache_dir, config.cache_bytes),
            storage,
            manifest,
            config,
            runtime,
        });
        let mut validation = Vec::new();
        let val: Vec<ShardInfo> = shared.manifest.shards_in(Split::Val).cloned().collect();
        let mut pending: Vec<Prepared> = Vec::new();
        for shard in &val {
            let samples = shared.decode(shard)?;
            pending.extend(samples.into_iter().map(|s| shared.prepare(s)));
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
            failed: None,
            last_keys: Vec::new(),
            starts: 0,
        })
    }

    /// Begins the pass `key` from its batch `batch`: takes it over from the running producer
    /// when that one has it next, else starts a producer on the pass `pass` makes.
    fn begin(
        &mut self,
        key: PassKey,
        epoch: u64,
        batch: u64,
        pass: impl FnOnce(&Self) -> Result<Pass, WorkerError>,
    ) -> Result<(), WorkerError> {
        self.failed = None;
        let taken = self.producer.as_mut().is_some_and(|p| p.take_over(&key));
        if !taken {
            let pass = pass(self)?;
            // The old producer (and its loaders) end before the new one starts.
            self.producer = None;
            self.producer = Some(Producer::start(self.shared.clone(), pass, key)?);
            self.starts += 1;
        }
        self.cursor = DataCursor {
            epoch,
            batch,
            detail: serde_json::Value::Null,
        };
        Ok(())
    }

    /// Ends the pass with `e`: the producer goes, and the pass keeps failing until another begins.
    fn fail(&mut self, e: WorkerError) -> Result<Option<Batch>, WorkerError> {
        self.producer = None;
        self.failed = Some(e.to_string());
        Err(e)
    }

    /// The single-rank pass of `epoch`, from batch `skip_batches` on.
    fn epoch_pass(&self, epoch: u64, skip_batches: u64) -> Pass {
        let mut skip = skip_batches.saturating_mul(self.shared.config.batch_size as u64);
        let mut jobs = Vec::new();
        for (i, shard) in epoch_order(&self.train, self.shared.config.seed, epoch)
            .into_iter()
            .enumerate()
        {
            // Whole shards before the cursor are skipped without being read.
            if skip >= shard.samples {
                skip -= shard.samples;
                continue;
            }
            jobs.push(Job {
                shard,
                seed: self.shared.config.seed ^ 0x0053_4841_5244_u64,
                stream: epoch.wrapping_mul(1_000_003).wrapping_add(i as u64),
                start: skip,
                end: None,
            });
            skip = 0;
        }
        Pass { epoch, jobs }
    }

    /// A data-parallel rank's pass: the samples of `spans` in order, a span's samples taken from
    /// its shard in the order drawn from (seed, epoch, shard key), which no plan around it changes.
    fn spans_pass(&self, epoch: u64, spans: &[ShardSpan]) -> Result<Pass, WorkerError> {
        let jobs = spans
            .iter()
            .map(|span| {
                let shard = self.shared.manifest.shard(&span.shard).cloned().ok_or_else(|| {
                    WorkerError::Data(format!(
                        "shard {} of the plan is not in the dataset's manifest",
                        span.shard
                    ))
                })?;
                Ok(Job {
                    shard,
                    seed: self.shared.config.seed ^ crc32c::crc32c(span.shard.as_bytes()) as u64,
                    stream: epoch,
                    start: span.start,
                    end: Some(span.end),
                })
            })
            .collect::<Result<_, WorkerError>>()?;
        Ok(Pass { epoch, jobs })
    }
}

/// What a shard's features depend on besides its bytes: the vocabulary, the text length, the
/// sample rate and the featurisation code's version (bump it when `prepare` changes).
fn feature_params(manifest: &Manifest, config: &ShardSourceConfig) -> u64 {
    const VERSION: u32 = 1;
    let mut h = crc32c::crc32c(&VERSION.to_le_bytes());
    for token in manifest.vocabulary.tokens() {
        h = crc32c::crc32c_append(h, token.as_bytes());
        h = crc32c::crc32c_append(h, &[0]);
    }
    let shape = [
        config.text_len as u64,
        u64::from(manifest.sample_rate),
        manifest.image_size as u64,
    ];
    let tail = shape
        .iter()
        .fold(0u32, |acc, v| crc32c::crc32c_append(acc, &v.to_le_bytes()));
    (u64::from(h) << 32) | u64::from(tail)
}

/// A job's range of a shard's items, after the job's shuffle.
fn take_range<T>(mut items: Vec<T>, job: &Job) -> Result<Vec<T>, WorkerError> {
    let len = items.len() as u64;
    let end = job.end.unwrap_or(len);
    if end > len || job.start > end {
        return Err(WorkerError::Data(format!(
            "shard {} holds {len} samples; the plan reads {}..{end}",
            job.shard.key, job.start
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(job.seed);
    rng.set_stream(job.stream);
    items.shuffle(&mut rng);
    Ok(items.drain(job.start as usize..end as usize).collect())
}

/// The shards of an epoch in their shuffled order.
fn epoch_order(train: &[ShardInfo], seed: u64, epoch: u64) -> Vec<ShardInfo> {
    let mut order = train.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    order.shuffle(&mut rng);
    order
}

/// What a loader sends back for one job.
type Loaded = Result<Vec<Prepared>, WorkerError>;

/// A job's result as the producer waits for it, in the order the jobs were handed out.
enum Slot {
    /// Loaded inline (one thread).
    Ready(Loaded),
    Loading(Receiver<Loaded>),
    /// The pass of this epoch has no more jobs.
    End(u64),
}

type Work = (Job, SyncSender<Loaded>);

/// The producer thread: runs the passes it is given, in order, until the source hangs up.
fn produce(shared: &Shared, passes: Receiver<Pass>, tx: &SyncSender<Msg>, stop: &AtomicBool) {
    // `open` bounded it to 1..=MAX_LOADER_THREADS.
    let threads = shared.config.threads;
    if threads == 1 {
        return drive(shared, &passes, tx, stop, None);
    }
    let (work_tx, work_rx) = channel::<Work>();
    let work_rx = Mutex::new(work_rx);
    std::thread::scope(|s| {
        for i in 0..threads {
            let work_rx = &work_rx;
            let spawned = std::thread::Builder::new()
                .name(format!("chorus-load-{i}"))
                .spawn_scoped(s, move || {
                    loop {
                        // Idle loaders queue on the lock; the one holding it waits in `recv`.
                        let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((job, reply)) = next else { return };
                        // Jobs queued before a stop are dropped unread: stopping a trial must
                        // not wait for shards nobody will train on.
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let _ = reply.send(shared.load(&job));
                    }
                });
            if let Err(e) = spawned {
                let _ = tx.send(Msg::Failed(WorkerError::Task(format!(
                    "cannot start a data loader thread: {e}"
                ))));
                // Dropping the work sender ends the loaders already started.
                return;
            }
        }
        // `drive` owns the work sender: when it returns, the loaders' `recv` fails and they end.
        drive(shared, &passes, tx, stop, Some(work_tx));
    });
}

/// Hands out jobs (to the loaders, or loads them inline without any), takes their results back
/// in order, and sends the batches they make and the end of each pass.
fn drive(
    shared: &Shared,
    passes: &Receiver<Pass>,
    tx: &SyncSender<Msg>,
    stop: &AtomicBool,
    work: Option<Sender<Work>>,
) {
    let b = shared.config.batch_size as usize;
    // Jobs handed out and not yet batched, at most: every loader busy and one result waiting.
    let window = work.as_ref().map_or(1, |_| shared.config.threads + 1);
    let mut slots: VecDeque<Slot> = VecDeque::new();
    let mut loading = 0usize;
    let mut jobs: VecDeque<Job> = VecDeque::new();
    // The epoch whose jobs are being handed out, until its end is queued.
    let mut open: Option<u64> = None;
    let mut pending: VecDeque<Prepared> = VecDeque::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        while loading < window {
            if let Some(job) = jobs.pop_front() {
                slots.push_back(match &work {
                    None => Slot::Ready(shared.load(&job)),
                    Some(work) => {
                        let (reply, result) = sync_channel(1);
                        if work.send((job, reply)).is_err() {
                            return;
                        }
                        Slot::Loading(result)
                    }
                });
                loading += 1;
                continue;
            }
            if let Some(epoch) = open.take() {
                slots.push_back(Slot::End(epoch));
            }
            // Block for the next pass only with nothing else to do; a hang-up ends the thread.
            let next = if slots.is_empty() {
                passes.recv().ok()
            } else {
                passes.try_recv().ok()
            };
            match next {
                Some(pass) => {
                    jobs = pass.jobs.into();
                    open = Some(pass.epoch);
                }
                None if slots.is_empty() => return,
                None => break,
            }
        }
        let Some(slot) = slots.pop_front() else { continue };
        let loaded = match slot {
            Slot::End(epoch) => {
                if !pending.is_empty() {
                    let batch = shared.keyed_batch(pending.drain(..).collect());
                    if tx.send(Msg::Batch(batch)).is_err() {
                        return;
                    }
                }
                if tx.send(Msg::End(epoch)).is_err() {
                    return;
                }
                continue;
            }
            Slot::Ready(r) => r,
            Slot::Loading(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(WorkerError::Task("a data loader thread stopped".into()))),
        };
        loading -= 1;
        match loaded {
            Ok(samples) => pending.extend(samples),
            Err(e) => {
                let _ = tx.send(Msg::Failed(e));
                return;
            }
        }
        while pending.len() >= b {
            let batch = shared.keyed_batch(pending.drain(..b).collect());
            if tx.send(Msg::Batch(batch)).is_err() {
                return;
            }
        }
    }
}

impl Shared {
    /// A shard's bytes, from the local cache when it holds a good copy, else from the store
    /// (checked, then cached).
    fn bytes(&self, shard: &ShardInfo) -> Result<Vec<u8>, WorkerError> {
        if let Some(b) = cache_get(&self.cache, &ShardCache::name(shard), |b| {
            shard.verify(&b).is_ok().then_some(b)
        }) {
            return Ok(b);
        }
        let b = self
            .runtime
            .block_on(fetch_shard(&self.storage, shard))
            .map_err(|e| WorkerError::Data(e.to_string()))?;
        cache_put(&self.cache, &ShardCache::name(shard), &b);
        Ok(b.to_vec())
    }

    /// A shard's samples, decoded, in the shard's order.
    fn decode(&self, shard: &ShardInfo) -> Result<Vec<Sample>, WorkerError> {
        let bytes = self.bytes(shard)?;
        parse_shard(&shard.key, &bytes, &self.manifest).map_err(|e| WorkerError::Data(e.to_string()))
    }

    /// A job's samples: its shard decoded and shuffled, the job's range featurised. Only the
    /// range is featurised (a resumed pass skips the samples before its cursor), unless
    /// features are cached: then the whole shard's are, once, and read back after. The
    /// shuffle depends on the shard's length alone, so both ways give the same samples.
    fn load(&self, job: &Job) -> Loaded {
        if self.config.feature_cache {
            let all = self.features(&job.shard)?;
            return take_range(all, job);
        }
        let samples = self.decode(&job.shard)?;
        let picked = take_range(samples, job)?;
        Ok(picked.into_iter().map(|s| self.prepare(s)).collect())
    }

    /// A whole shard featurised, in the shard's order: from the feature cache, or made and kept.
    fn features(&self, shard: &ShardInfo) -> Result<Vec<Prepared>, WorkerError> {
        let name = format!("{}.features-{:016x}", ShardCache::name(shard), self.feature_params);
        let shape = features::Shape {
            samples: shard.samples,
            pixels: IMAGE_PIXELS,
            tokens: self.config.text_len as usize,
        };
        let cached = cache_get(&self.cache, &name, |b| {
            features::decode(&b, self.feature_params, &shape)
        });
        if let Some(all) = cached {
            return Ok(all);
        }
        let all: Vec<Prepared> = self.decode(shard)?.into_iter().map(|s| self.prepare(s)).collect();
        cache_put(&self.cache, &name, &features::encode(&all, self.feature_params));
        Ok(all)
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
        let side = self.manifest.image_size as i64;
        // The producer is the one thread every batch passes through: the two large tensors are
        // written in place rather than staged in a Vec and copied.
        let image = filled::<f32>(&[n, 1, side, side], Kind::Float, |image| {
            for (i, s) in samples.iter().enumerate() {
                if let Some(px) = &s.image {
                    image[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS].copy_from_slice(px);
                }
            }
        });
        let audio = filled::<f32>(&[n, f, 64], Kind::Float, |audio| {
            for (i, s) in samples.iter().enumerate() {
                if let Some(mel) = &s.mel {
                    let row = &mut audio[(i * (f as usize) * 64)..];
                    for (j, frame) in mel.iter().take(f as usize).enumerate() {
                        row[j * 64..(j + 1) * 64].copy_from_slice(frame);
                    }
                }
            }
        });
        let mut text = vec![0i64; (n * t) as usize];
        let mut text_lengths = vec![1i64; samples.len()];
        let mut audio_lengths = vec![1i64; samples.len()];
        let mut mask = vec![0f32; samples.len() * 3];
        let mut labels = Vec::with_capacity(samples.len());
        for (i, s) in samples.iter().enumerate() {
            if s.image.is_some() {
                mask[i * 3] = 1.0;
            }
            if let Some(tok) = &s.tokens {
                let row = &mut text[i * t as usize..(i + 1) * t as usize];
                row[..tok.len()].copy_from_slice(tok);
                text_lengths[i] = tok.iter().filter(|&&x| x != chorus_dataset::PAD).count().max(1) as i64;
                mask[i * 3 + 1] = 1.0;
            }
            if let Some(mel) = &s.mel {
                audio_lengths[i] = mel.len().min(f as usize).max(1) as i64;
                mask[i * 3 + 2] = 1.0;
            }
            labels.push(s.label);
        }
        Batch {
            image: Some(image),
            text: Some(Tensor::from_slice(&text).view([n, t])),
            text_lengths: Some(Tensor::from_slice(&text_lengths)),
            audio: Some(audio),
            audio_lengths: Some(Tensor::from_slice(&audio_lengths)),
            mask: Tensor::from_slice(&mask).view([n, 3]),
            labels: Tensor::from_slice(&labels),
        }
    }
}

/// A new zeroed CPU tensor of `shape`, written in place by `fill`.
fn filled<T: tch::kind::Element>(shape: &[i64], kind: Kind, fill: impl FnOnce(&mut [T])) -> Tensor {
    debug_assert_eq!(T::KIND, kind);
    let t = Tensor::zeros(shape, (kind, tch::Device::Cpu));
    let n = t.numel();
    // SAFETY: `t` was just allocated, contiguous on the CPU, with `n` elements of `T`'s kind, and
    // nothing else refers to it until it is returned.
    let data = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) };
    fill(data);
    t
}

impl BatchSource for ShardSource {
    fn steps_per_epoch(&self) -> u64 {
        self.train_samples.div_ceil(self.shared.config.batch_size as u64)
    }

    fn begin_epoch(&mut self, epoch: u64) -> Result<(), WorkerError> {
        self.begin(PassKey::Epoch(epoch), epoch, 0, |s| Ok(s.epoch_pass(epoch, 0)))
    }

    fn prefetch_epoch(&mut self, epoch: u64) {
        let pass = self.epoch_pass(epoch, 0);
        if let Some(p) = &mut self.producer {
            p.then(pass, PassKey::Epoch(epoch));
        }
    }

    fn next_train(&mut self) -> Result<Option<Batch>, WorkerError> {
        if let Some(why) = &self.failed {
            return Err(WorkerError::Data(why.clone()));
        }
        let Some(p) = self.producer.as_mut() else {
            return Ok(None);
        };
        if p.between {
            return Ok(None);
        }
        let Some(rx) = p.batches.as_ref() else {
            return Ok(None);
        };
        match rx.recv() {
            Ok(Msg::Batch((batch, keys))) => {
                self.cursor.batch += 1;
                self.last_keys = keys;
                Ok(Some(batch))
            }
            Ok(Msg::End(epoch)) => {
                let ended = p.given.pop_front();
                if ended.as_ref().map(PassKey::epoch) != Some(epoch) {
                    return self.fail(WorkerError::Data(format!(
                        "the data thread ended the pass of epoch {epoch}; {ended:?} was expected"
                    )));
                }
                p.between = true;
                Ok(None)
            }
            Ok(Msg::Failed(e)) => self.fail(e),
            Err(_) => self.fail(WorkerError::Data(
                "the data thread stopped before the end of the pass".into(),
            )),
        }
    }

    fn cursor(&self) -> DataCursor {
        self.cursor.clone()
    }

    fn seek(&mut self, cursor: &DataCursor) -> Result<(), WorkerError> {
        let (epoch, batch) = (cursor.epoch, cursor.batch);
        let key = if batch == 0 {
            PassKey::Epoch(epoch)
        } else {
            PassKey::Resumed(epoch, batch)
        };
        self.begin(key, epoch, batch, |s| Ok(s.epoch_pass(epoch, batch)))
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
        self.begin(PassKey::Spans(epoch, spans.to_vec()), epoch, 0, |s| {
            s.spans_pass(epoch, spans)
        })
    }

    fn prefetch_spans(&mut self, epoch: u64, spans: &[ShardSpan]) {
        // A plan naming a shard the manifest lacks fails when its pass begins, not here.
        let Ok(pass) = self.spans_pass(epoch, spans) else {
            return;
        };
        if let Some(p) = &mut self.producer {
            p.then(pass, PassKey::Spans(epoch, spans.to_vec()));
        }
    }

    fn last_keys(&self) -> Vec<String> {
        self.last_keys.clone()
    }
}

/// Shards (and, when asked, their features) on local disk, named by key and checksum, evicted
/// least recently used first. The loaders share it: copies are read and written outside the
/// lock, which covers the bookkeeping and the removal of evicted files.
struct ShardCache {
    dir: PathBuf,
    budget: u64,
    /// (file name, bytes), most recently used last.
    entries: Vec<(String, u64)>,
    /// Bytes of copies being written, counted against the budget until they are in `entries`.
    reserved: u64,
}

impl ShardCache {
    /// The cache of `dir` in this process: one index and one budget (the first caller's)
    /// however many sources read through it at once or one after another, so attempts on one
    /// worker reuse each other's copies and together stay within the budget.
    fn shared(dir: &Path, budget: u64) -> Arc<Mutex<ShardCache>> {
        static CACHES: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<ShardCache>>>>> = OnceLock::new();
        let mut caches = CACHES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        caches
            .entry(dir.to_path_buf())
            .or_insert_with(|| Arc::new(Mutex::new(ShardCache::open(dir.to_path_buf(), budget))))
            .clone()
    }

    /// A cache over the files `dir` already holds (an earlier worker's), oldest first as the
    /// least recently used, trimmed to `budget`; unfinished writes are removed.
    fn open(dir: PathBuf, budget: u64) -> Self {
        let mut found: Vec<(std::time::SystemTime, String, u64)> = Vec::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            found.push((modified, name, meta.len()));
        }
        found.sort();
        let mut cache = ShardCache {
            dir,
            budget,
            entries: found.into_iter().map(|(_, name, bytes)| (name, bytes)).collect(),
            reserved: 0,
        };
        while cache.entries.iter().map(|e| e.1).sum::<u64>() > cache.budget {
            let (old, _) = cache.entries.remove(0);
            let _ = std::fs::remove_file(cache.dir.join(old));
        }
        cache
    }

    /// The file of a shard's bytes.
    fn name(shard: &ShardInfo) -> String {
        format!("{:08x}-{}", shard.crc32c, shard.key)
    }

    /// Where the file `name` lies, marked as just used, if the cache has it.
    fn lookup(&mut self, name: &str) -> Option<PathBuf> {
        let pos = self.entries.iter().position(|(n, _)| n == name)?;
        let entry = self.entries.remove(pos);
        self.entries.push(entry);
        Some(self.dir.join(name))
    }

    /// Drops a file that turned out bad or vanished.
    fn forget(&mut self, name: &str) {
        self.entries.retain(|(n, _)| n != name);
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    /// Makes room for `bytes` and names the temporary and final paths of a new file, or `None`
    /// when it cannot fit.
    fn admit(&mut self, name: &str, bytes: u64) -> Option<(PathBuf, PathBuf)> {
        // Copies being written may already fill the budget: then this one is not kept, and no
        // listed copy is evicted for it.
        if self.reserved.saturating_add(bytes) > self.budget {
            return None;
        }
        while self.entries.iter().map(|e| e.1).sum::<u64>() + self.reserved + bytes > self.budget {
            if self.entries.is_empty() {
                // Copies being written fill the budget; this one is not kept.
                return None;
            }
            let (old, _) = self.entries.remove(0);
            let _ = std::fs::remove_file(self.dir.join(old));
        }
        self.reserved += bytes;
        // A temporary name per thread: two loaders may fetch the same shard at once.
        let tmp = format!(".{name}.{:?}.tmp", std::thread::current().id());
        Some((self.dir.join(tmp), self.dir.join(name)))
    }

    /// Ends an admission: the file is listed once it is in place, and only then.
    fn settle(&mut self, name: &str, bytes: u64, written: bool) {
        self.reserved -= bytes;
        self.entries.retain(|(n, _)| n != name);
        if written {
            self.entries.push((name.to_string(), bytes));
        }
    }
}

/// The file `name` from the cache, if it has one that `check` accepts; a rejected file goes.
fn cache_get<T>(cache: &Mutex<ShardCache>, name: &str, check: impl FnOnce(Vec<u8>) -> Option<T>) -> Option<T> {
    let path = cache.lock().unwrap_or_else(|p| p.into_inner()).lookup(name)?;
    let checked = std::fs::read(&path).ok().and_then(check);
    if checked.is_none() {
        cache.lock().unwrap_or_else(|p| p.into_inner()).forget(name);
    }
    checked
}

/// Keeps a file; a failed write only costs the next read the work again.
fn cache_put(cache: &Mutex<ShardCache>, name: &str, bytes: &[u8]) {
    let Some((tmp, path)) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(name, bytes.len() as u64)
    else {
        return;
    };
    let written = std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .is_ok();
    if !written {
        let _ = std::fs::remove_file(&tmp);
    }
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache.settle(name, bytes.len() as u64, written);
}

/// Featurised samples in a file of the shard cache: what `prepare` made of a whole shard, in
/// the shard's order, so a later epoch skips parsing and log-mel. Little-endian: a magic and
/// version, the hash of everything featurisation depends on, the sample count, the samples
/// (key, label, then each modality present with its length and values), and a crc32c of all
/// that. A file that fails any check is dropped and the shard featurised again.
mod features {
    use super::Prepared;

    const MAGIC: &[u8; 8] = b"CHFEAT01";

    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }

    fn u32_of(b: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
    }

    fn u64_of(b: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
    }

    pub(super) fn encode(samples: &[Prepared], params: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&params.to_le_bytes());
        out.extend_from_slice(&(samples.len() as u32).to_le_bytes());
        for s in samples {
            out.extend_from_slice(&(s.key.len() as u32).to_le_bytes());
            out.extend_from_slice(s.key.as_bytes());
            out.extend_from_slice(&s.label.to_le_bytes());
            let flags =
                u8::from(s.image.is_some()) | u8::from(s.tokens.is_some()) << 1 | u8::from(s.mel.is_some()) << 2;
            out.push(flags);
            if let Some(px) = &s.image {
                out.extend_from_slice(&(px.len() as u32).to_le_bytes());
                px.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            if let Some(t) = &s.tokens {
                out.extend_from_slice(&(t.len() as u32).to_le_bytes());
                t.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
            if let Some(m) = &s.mel {
                out.extend_from_slice(&(m.len() as u32).to_le_bytes());
                m.iter().flatten().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// What a shard's features must look like: its sample count, pixels per image and tokens
    /// per text. A file that disagrees is not used, even with a good checksum.
    pub(super) struct Shape {
        pub samples: u64,
        pub pixels: usize,
        pub tokens: usize,
    }

    /// The samples of a file written by [`encode`] with the same `params`, if it is intact and
    /// of the expected shape.
    pub(super) fn decode(bytes: &[u8], params: u64, shape: &Shape) -> Option<Vec<Prepared>> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut b = body;
        if take(&mut b, 8)? != MAGIC || u64_of(&mut b)? != params {
            return None;
        }
        let count = u32_of(&mut b)? as u64;
        if count != shape.samples {
            return None;
        }
        let floats = |b: &mut &[u8], n: usize| -> Option<Vec<f32>> {
            let raw = take(b, n.checked_mul(4)?)?;
            Some(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        };
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let key_len = u32_of(&mut b)? as usize;
            let key = String::from_utf8(take(&mut b, key_len)?.to_vec()).ok()?;
            let label = u64_of(&mut b)? as i64;
            let flags = *take(&mut b, 1)?.first()?;
            let image = if flags & 1 != 0 {
                let n = u32_of(&mut b)? as usize;
                if n != shape.pixels {
                    return None;
                }
                Some(floats(&mut b, n)?)
            } else {
                None
            };
            let tokens = if flags & 2 != 0 {
                let n = u32_of(&mut b)? as usize;
                if n != shape.tokens {
                    return None;
                }
                let raw = take(&mut b, n.checked_mul(8)?)?;
                Some(
                    raw.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                        .collect(),
                )
            } else {
                None
            };
            let mel = if flags & 4 != 0 {
                let frames = u32_of(&mut b)? as usize;
                let v = floats(&mut b, frames.checked_mul(64)?)?;
                Some(v.chunks_exact(64).map(|c| c.try_into().unwrap_or([0.0; 64])).collect())
            } else {
                None
            };
            out.push(Prepared {
                key,
                image,
                tokens,
                mel,
                label,
            });
        }
        b.is_empty().then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::shards::plan_epoch;
    use chorus_core::storage::{self, StorageOptions, StorageUri};
    use chorus_dataset::{SynthOptions, synth};

    /// A synthetic dataset of `samples` in 10 shards (8 train) in a store of its own.
    struct Fixture {
        rt: tokio::runtime::Runtime,
        storage: Storage,
        manifest: Manifest,
        dir: tempfile::TempDir,
    }

    fn fixture(name: &str, samples: u64) -> Fixture {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let storage = storage::open(
            &StorageUri::parse(&format!("memory://shards-{name}")).unwrap(),
            &StorageOptions::default(),
        )
        .unwrap();
        let opts = SynthOptions {
            name: name.into(),
            samples,
            shards: 10,
            seed: 3,
            ..Default::default()
        };
        let manifest = rt.block_on(synth(storage.clone(), &opts, false)).unwrap();
        Fixture {
            rt,
            storage,
            manifest,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    impl Fixture {
        fn source(&self, threads: usize, cache_bytes: u64) -> ShardSource {
            self.source_with(threads, cache_bytes, false)
        }

        fn source_with(&self, threads: usize, cache_bytes: u64, feature_cache: bool) -> ShardSource {
            let config = ShardSourceConfig {
                batch_size: 16,
                seed: 5,
                text_len: 8,
                audio_frames: 20,
                prefetch: 2,
                cache_dir: self
                    .dir
                    .path()
                    .join(format!("cache-{threads}-{cache_bytes}-{feature_cache}")),
                cache_bytes,
                threads,
                feature_cache,
            };
            ShardSource::open(
                self.storage.clone(),
                self.manifest.clone(),
                None,
                config,
                self.rt.handle().clone(),
            )
            .unwrap()
        }
    }

    /// What a batch holds, exactly: its keys and the bits of every tensor.
    fn fingerprint(source: &ShardSource, b: &Batch) -> (Vec<String>, Vec<u32>) {
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = Vec::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        let mut all = Vec::new();
        for t in [&b.image, &b.text, &b.audio].into_iter().flatten() {
            all.extend(bits(t));
        }
        all.extend(bits(&b.mask));
        all.extend(bits(&b.labels));
        (source.last_keys(), all)
    }

    fn pass(source: &mut ShardSource) -> Vec<(Vec<String>, Vec<u32>)> {
        let mut out = Vec::new();
        while let Some(b) = source.next_train().unwrap() {
            out.push(fingerprint(source, &b));
        }
        out
    }

    /// Two epochs as the trainer runs them: each begun, the next named ahead.
    fn two_epochs(source: &mut ShardSource) -> Vec<Vec<(Vec<String>, Vec<u32>)>> {
        (0..2)
            .map(|e| {
                source.begin_epoch(e).unwrap();
                if e == 0 {
                    source.prefetch_epoch(1);
                }
                pass(source)
            })
            .collect()
    }

    #[test]
    fn batches_are_identical_for_any_thread_count() {
        let f = fixture("threads", 400);
        let one = two_epochs(&mut f.source(1, 1 << 30));
        let steps = f.source(1, 1 << 30).steps_per_epoch() as usize;
        assert_eq!(one[0].len(), steps);
        assert_ne!(one[0], one[1], "each epoch has its own order");
        for threads in [2, 3, 8] {
            assert_eq!(two_epochs(&mut f.source(threads, 1 << 30)), one, "{threads} threads");
        }
        // A cache too small for one shard, and one that holds about two: loaders racing on
        // fetches and evictions still give the same batches.
        let shard = f.manifest.shards.iter().map(|s| s.bytes).max().unwrap();
        assert_eq!(two_epochs(&mut f.source(4, shard / 2)), one);
        assert_eq!(two_epochs(&mut f.source(4, shard * 2 + 1)), one);
    }

    #[test]
    fn cached_features_give_the_same_batches_and_a_bad_file_is_made_again() {
        let f = fixture("features", 300);
        let want = two_epochs(&mut f.source(1, 1 << 30));
        let mut s = f.source_with(2, 1 << 30, true);
        // Epoch 0 featurises and keeps the features; epoch 1 reads them back.
        assert_eq!(two_epochs(&mut s), want);
        let dir = f.dir.path().join(format!("cache-2-{}-true", 1u64 << 30));
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".features-"))
            .collect();
        assert_eq!(files.len(), s.train.len(), "one feature file per training shard");
        // A flipped byte, a truncated file, an empty one: each is dropped and made again.
        let mut bytes = std::fs::read(&files[0]).unwrap();
        bytes[40] ^= 0xff;
        std::fs::write(&files[0], &bytes).unwrap();
        std::fs::write(&files[1], &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(&files[2], b"").unwrap();
        s.begin_epoch(0).unwrap();
        assert_eq!(pass(&mut s), want[0]);
        s.begin_epoch(1).unwrap();
        assert_eq!(pass(&mut s), want[1]);
        // Features of another vocabulary or text length are never read as these.
        let other = ShardSourceConfig {
            text_len: 9,
            ..s.shared.config.clone()
        };
        assert_ne!(feature_params(&f.manifest, &other), s.shared.feature_params);
        let mut m = f.manifest.clone();
        m.vocabulary = chorus_dataset::Vocabulary::build(["a b c"].iter().copied(), 2);
        assert_ne!(feature_params(&m, &s.shared.config), s.shared.feature_params);
    }

    #[test]
    fn the_next_epoch_is_taken_over_and_matches_a_fresh_start() {
        let f = fixture("ahead", 300);
        let mut fresh = f.source(2, 1 << 30);
        fresh.begin_epoch(1).unwrap();
        let want = pass(&mut fresh);

        let mut s = f.source(2, 1 << 30);
        s.begin_epoch(0).unwrap();
        s.prefetch_epoch(1);
        pass(&mut s);
        assert_eq!(s.starts, 1);
        // The end of a pass stays the end until the next begins.
        assert!(s.next_train().unwrap().is_none());
        s.begin_epoch(1).unwrap();
        assert_eq!(s.starts, 1, "epoch 1 came from the running producer");
        assert_eq!(
            s.cursor(),
            DataCursor {
                epoch: 1,
                batch: 0,
                detail: serde_json::Value::Null
            }
        );
        assert_eq!(pass(&mut s), want);

        // Named but not asked for: the pass asked for wins.
        let mut s = f.source(2, 1 << 30);
        s.begin_epoch(0).unwrap();
        s.prefetch_epoch(1);
        pass(&mut s);
        s.begin_epoch(2).unwrap();
        assert_eq!(s.starts, 2);
        let mut fresh = f.source(1, 1 << 30);
        fresh.begin_epoch(2).unwrap();
        assert_eq!(pass(&mut s), pass(&mut fresh));
    }

    #[test]
    fn seeking_mid_epoch_replays_what_followed() {
        let f = fixture("seek", 300);
        let mut s = f.source(3, 1 << 30);
        s.begin_epoch(0).unwrap();
        let whole = pass(&mut s);
        for at in [1usize, 5, whole.len() - 1] {
            let mut s = f.source(3, 1 << 30);
            s.seek(&DataCursor {
                epoch: 0,
                batch: at as u64,
                detail: serde_json::Value::Null,
            })
            .unwrap();
            assert_eq!(pass(&mut s), whole[at..], "from batch {at}");
        }
    }

    #[test]
    fn a_rank_reads_its_next_spans_ahead() {
        let f = fixture("spans", 300);
        let shards = f.source(1, 1 << 30).shard_sizes().unwrap();
        let plan = |e| plan_epoch(&shards, 5, e, 2).ranks[1].clone();
        let mut fresh = f.source(1, 1 << 30);
        fresh.begin_spans(1, &plan(1)).unwrap();
        let want = pass(&mut fresh);
        assert!(!want.is_empty());

        let mut s = f.source(2, 1 << 30);
        s.begin_spans(0, &plan(0)).unwrap();
        s.prefetch_spans(1, &plan(1));
        pass(&mut s);
        s.begin_spans(1, &plan(1)).unwrap();
        assert_eq!(s.starts, 1);
        assert_eq!(pass(&mut s), want);

        let mut bad = plan(0);
        bad[0].shard = "no-such-shard".into();
        let e = s.begin_spans(0, &bad).unwrap_err().to_string();
        assert!(
            e.contains("no-such-shard") && e.contains("not in the dataset's manifest"),
            "{e}"
        );
        let mut beyond = plan(0);
        beyond[0].end = 10_000;
        s.begin_spans(0, &beyond).unwrap();
        let e = s.next_train().unwrap_err().to_string();
        assert!(e.contains("the plan reads"), "{e}");
    }

    #[test]
    fn a_corrupt_shard_fails_the_pass_with_its_name() {
        let f = fixture("corrupt", 200);
        let mut s = f.source(2, 1 << 30);
        let victim = s.train[0].key.clone();
        // Corrupt the bytes the source checks: its checksum in the manifest no longer matches.
        Arc::get_mut(&mut s.shared)
            .unwrap()
            .manifest
            .shards
            .iter_mut()
            .for_each(|x| {
                if x.key == victim {
                    x.crc32c ^= 1;
                }
            });
        s.train[0].crc32c ^= 1;
        s.begin_epoch(0).unwrap();
        let mut failed = None;
        loop {
            match s.next_train() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        let e = failed.expect("the pass fails");
        assert!(e.contains(&victim), "{e}");
    }

    #[test]
    fn the_cache_is_shared_and_indexes_what_an_earlier_worker_left() {
        let f = fixture("reuse", 200);
        let dir = f.dir.path().join("reuse-cache");
        let mut s = f.source_with(2, 1 << 30, false);
        let cache = s.shared.cache.clone();
        assert!(Arc::ptr_eq(
            &cache,
            &ShardCache::shared(&s.shared.config.cache_dir, 1 << 30)
        ));
        s.begin_epoch(0).unwrap();
        pass(&mut s);
        let listed = cache.lock().unwrap().entries.len();
        // The training shards and the validation split's.
        let val = f.manifest.shards_in(Split::Val).count();
        assert_eq!(listed, s.train.len() + val);
        // A worker starting again over the same directory lists those copies, drops unfinished
        // writes, and trims to its budget, oldest first.
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&s.shared.config.cache_dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::fs::write(dir.join(".x.ThreadId(3).tmp"), b"half").unwrap();
        let all = ShardCache::open(dir.clone(), 1 << 30);
        assert_eq!(all.entries.len(), listed);
        assert!(!dir.join(".x.ThreadId(3).tmp").exists());
        let sizes: Vec<u64> = all.entries.iter().map(|e| e.1).collect();
        let budget = sizes.iter().sum::<u64>() - sizes[0];
        let trimmed = ShardCache::open(dir.clone(), budget);
        assert_eq!(trimmed.entries.len(), listed - 1);
        assert!(!dir.join(&all.entries[0].0).exists(), "the oldest copy went");
    }

    #[test]
    fn loader_threads_are_bounded() {
        let f = fixture("bounds", 100);
        for threads in [0, MAX_LOADER_THREADS + 1] {
            let config = ShardSourceConfig {
                batch_size: 8,
                seed: 0,
                text_len: 8,
                audio_frames: 8,
                prefetch: 1,
                cache_dir: f.dir.path().join("c"),
                cache_bytes: 1 << 20,
                threads,
                feature_cache: false,
            };
            let e = ShardSource::open(
                f.storage.clone(),
                f.manifest.clone(),
                None,
                config,
                f.rt.handle().clone(),
            );
            assert!(e.err().unwrap().to_string().contains("loader threads"));
        }
    }
}
