//! The data path on synthetic shards: the share of the training thread's time spent waiting for
//! data (the target: at most 5 %).
//!
//! Synthesises a dataset (`chorus_dataset::synth`) into a `file://` store in a temporary
//! directory, opens a [`ShardSource`] over it (a local shard cache in the same directory), and
//! trains the default multimodal model through the built-in [`Trainer`] on it. The source is
//! wrapped in [`Timed`], which clocks every call the trainer makes into it: the time spent inside
//! `begin_epoch` and `next_train` is the training thread waiting for data. A training pass runs
//! from `begin_epoch` to the `next_train` that ends it (validation and the epoch's checkpoint are
//! outside it). The first epoch starts with an empty shard cache (each shard is fetched from the
//! store, checked, cached, then decoded); the second reads the cache and decodes again.
//!
//! The anchor is the same training on the same batches held in memory, where waiting is nil: a
//! fresh trainer with the same seed, fed epoch 1's batches from a `Vec`. The ratio of throughputs
//! is the whole cost of the data path, including the producer thread's competition for the CPU,
//! which the wait share alone does not show.
//!
//! The source alone is also timed with nobody training, for each loader thread count of
//! `--source-threads`, on the warm cache, in interleaved rounds: the speed-up of featurising on
//! several threads, side by side with one thread in the same run.
//!
//! cargo run --release -p chorus-worker --example data_path -- --epochs 2
//! cargo run --release -p chorus-worker --example data_path -- --source-only --source-threads 1,2

use chorus_core::shards::{ShardSize, ShardSpan};
use chorus_core::storage::{self, StorageOptions, StorageUri};
use chorus_dataset::Split;
use chorus_dataset::{SynthOptions, synth};
use chorus_worker::WorkerError;
use chorus_worker::data::shards::{ShardSource, ShardSourceConfig};
use chorus_worker::data::{Batch, BatchSource, DataCursor};
use chorus_worker::models::ModelConfig;
use chorus_worker::models::multimodal::MultimodalConfig;
use chorus_worker::trainer::{Control, DeviceChoice, TrainConfig, Trainer, TrainerEvent};
use clap::Parser;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the worker's runner gives a builtin trial's source (`worker/src/runner/builtin.rs`).
const TEXT_LEN: i64 = 32;
const AUDIO_FRAMES: i64 = 64;
const CACHE_BYTES: u64 = 2 << 30;
/// A call into the source that takes longer than this found no batch ready.
const STALL: Duration = Duration::from_millis(1);

#[derive(Parser)]
struct Args {
    /// Samples in the synthetic dataset (80 % of them train).
    #[arg(long, default_value_t = 4000)]
    samples: u64,
    #[arg(long, default_value_t = 16)]
    shards: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    batch: i64,
    /// Batches the source decodes ahead of the trainer.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    /// Intra-op threads of the trainer.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Epochs over the shards: the first with a cold shard cache, the others warm.
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Skip the anchor (the same training on batches held in memory).
    #[arg(long)]
    no_anchor: bool,
    /// Loader threads of the source the trainer reads.
    #[arg(long, default_value_t = 1)]
    data_threads: usize,
    /// Loader thread counts to time the source alone with (warm cache, nobody training).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    source_threads: Vec<usize>,
    /// Rounds of the source-alone timing; each round times every thread count once.
    #[arg(long, default_value_t = 3)]
    source_rounds: usize,
    /// Do not pass the trainer's next-epoch hint to the source: every epoch starts its producer
    /// cold, as before the hint existed.
    #[arg(long)]
    no_prefetch_hint: bool,
    /// Keep featurised shards in the shard cache (later epochs skip parsing and log-mel).
    #[arg(long)]
    feature_cache: bool,
    /// Only time the source alone (after one pass that fills the cache); no training.
    #[arg(long)]
    source_only: bool,
}

/// One training pass as the training thread saw it.
#[derive(Debug, Clone, Default)]
struct PassTiming {
    /// From `begin_epoch` to the `next_train` that ended the pass.
    wall: Duration,
    /// Inside `begin_epoch` and `next_train`.
    wait: Duration,
    /// Until the first batch arrived (the pipeline filling).
    first_wait: Duration,
    batches: u64,
    samples: u64,
    /// Calls that found no batch ready (waited over [`STALL`]).
    stalls: u64,
}

impl PassTiming {
    fn wait_share(&self) -> f64 {
        self.wait.as_secs_f64() / self.wall.as_secs_f64()
    }

    fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.wall.as_secs_f64()
    }
}

/// A [`BatchSource`] that clocks the calls the trainer makes into `inner`.
struct Timed<S> {
    inner: S,
    /// Pass the trainer's next-epoch hints on (as the worker does); off, each epoch starts cold.
    hints: bool,
    started: Option<Instant>,
    current: PassTiming,
    passes: Vec<PassTiming>,
}

impl<S: BatchSource> Timed<S> {
    fn new(inner: S, hints: bool) -> Self {
        Timed {
            inner,
            hints,
            started: None,
            current: PassTiming::default(),
            passes: Vec::new(),
        }
    }

    fn begin(&mut self, start: impl FnOnce(&mut S) -> Result<(), WorkerError>) -> Result<(), WorkerError> {
        let t = Instant::now();
        self.started = Some(t);
        self.current = PassTiming::default();
        let r = start(&mut self.inner);
        self.current.wait += t.elapsed();
        r
    }
}

impl<S: BatchSource> BatchSource for Timed<S> {
    fn steps_per_epoch(&self) -> u64 {
        self.inner.steps_per_epoch()
    }

    fn begin_epoch(&mut self, epoch: u64) -> Result<(), WorkerError> {
        self.begin(|s| s.begin_epoch(epoch))
    }

    fn next_train(&mut self) -> Result<Option<Batch>, WorkerError> {
        let t = Instant::now();
        let r = self.inner.next_train();
        let waited = t.elapsed();
        let c = &mut self.current;
        c.wait += waited;
        if waited > STALL {
            c.stalls += 1;
        }
        match &r {
            Ok(Some(batch)) => {
                if c.batches == 0 {
                    c.first_wait = self.started.map_or(waited, |s| s.elapsed());
                }
                c.batches += 1;
                c.samples += batch.len() as u64;
            }
            Ok(None) => {
                if let Some(s) = self.started.take() {
                    c.wall = s.elapsed();
                    self.passes.push(std::mem::take(c));
                }
            }
            Err(_) => {}
        }
        r
    }

    fn cursor(&self) -> DataCursor {
        self.inner.cursor()
    }

    fn seek(&mut self, cursor: &DataCursor) -> Result<(), WorkerError> {
        self.begin(|s| s.seek(cursor))
    }

    fn validation(&mut self) -> Box<dyn Iterator<Item = Result<Batch, WorkerError>> + '_> {
        self.inner.validation()
    }

    // The rest is passed through unclocked, so the source runs exactly as under the worker
    // (the next epoch prepared ahead included).
    fn prefetch_epoch(&mut self, epoch: u64) {
        if self.hints {
            self.inner.prefetch_epoch(epoch)
        }
    }

    fn shard_sizes(&self) -> Result<Vec<ShardSize>, WorkerError> {
        self.inner.shard_sizes()
    }

    fn begin_spans(&mut self, epoch: u64, spans: &[ShardSpan]) -> Result<(), WorkerError> {
        self.begin(|s| s.begin_spans(epoch, spans))
    }

    fn prefetch_spans(&mut self, epoch: u64, spans: &[ShardSpan]) {
        if self.hints {
            self.inner.prefetch_spans(epoch, spans)
        }
    }

    fn last_keys(&self) -> Vec<String> {
        self.inner.last_keys()
    }
}

/// The anchor's source: the same batches every epoch, already in memory.
struct Preloaded {
    train: Vec<Batch>,
    validation: Vec<Batch>,
    next: usize,
    cursor: DataCursor,
}

impl BatchSource for Preloaded {
    fn steps_per_epoch(&self) -> u64 {
        self.train.len() as u64
    }

    fn begin_epoch(&mut self, epoch: u64) -> Result<(), WorkerError> {
        self.next = 0;
        self.cursor = DataCursor {
            epoch,
            ..Default::default()
        };
        Ok(())
    }

    fn next_train(&mut self) -> Result<Option<Batch>, WorkerError> {
        let b = self.train.get(self.next).map(Batch::shallow_clone);
        if b.is_some() {
            self.next += 1;
            self.cursor.batch += 1;
        }
        Ok(b)
    }

    fn cursor(&self) -> DataCursor {
        self.cursor.clone()
    }

    fn seek(&mut self, cursor: &DataCursor) -> Result<(), WorkerError> {
        self.next = cursor.batch as usize;
        self.cursor = cursor.clone();
        Ok(())
    }

    fn validation(&mut self) -> Box<dyn Iterator<Item = Result<Batch, WorkerError>> + '_> {
        Box::new(self.validation.iter().map(|b| Ok(b.shallow_clone())))
    }
}

/// Trains a fresh model for `config.epochs` epochs on `source`, clocked; prints and returns the passes.
fn train<S: BatchSource>(
    config: &TrainConfig,
    source: S,
    hints: bool,
    checkpoints: &Path,
    label: &str,
) -> anyhow::Result<Timed<S>> {
    let mut trainer = Trainer::new(config.clone())?;
    let mut timed = Timed::new(source, hints);
    let mut accuracy = Vec::new();
    trainer.run(&mut timed, &Control::new(), checkpoints, &mut |e| {
        if let TrainerEvent::Epoch(r) = e {
            accuracy.push(r.validation.accuracy);
        }
    })?;
    for (i, p) in timed.passes.iter().enumerate() {
        println!(
            "{label} epoch {}: {:.2} s training, {:.3} s waiting for data ({:.2} %; first batch {:.0} ms, \
             {} of {} calls waited > {} ms), {:.1} samples/s, validation accuracy {:.3}",
            i + 1,
            p.wall.as_secs_f64(),
            p.wait.as_secs_f64(),
            100.0 * p.wait_share(),
            1000.0 * p.first_wait.as_secs_f64(),
            p.stalls,
            p.batches + 1,
            STALL.as_millis(),
            p.samples_per_second(),
            accuracy.get(i).copied().unwrap_or(f64::NAN),
        );
    }
    Ok(timed)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    chorus_worker::torch::prepare(args.threads);
    let device = match args.device.as_str() {
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda,
        other => anyhow::bail!("unknown device {other}"),
    };
    let tmp = tempfile::tempdir()?;
    // One runtime thread is enough for a file store; the source blocks on it from its own
    // threads, never from inside it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let storage = storage::open(
        &StorageUri::from_dir(&tmp.path().join("store"))?,
        &StorageOptions::default(),
    )?;

    let t = Instant::now();
    let opts = SynthOptions {
        name: "data-path".into(),
        samples: args.samples,
        shards: args.shards,
        seed: args.seed,
        ..Default::default()
    };
    let manifest = rt.block_on(synth(storage.clone(), &opts, false))?;
    let train_shards = manifest.shards_in(Split::Train).count();
    println!(
        "dataset: {} samples in {} shards ({} train shards, {} train samples, {:.1} MiB), synthesised in {:.1} s",
        manifest.samples(),
        manifest.shards.len(),
        train_shards,
        manifest.shards_in(Split::Train).map(|s| s.samples).sum::<u64>(),
        manifest.bytes() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );

    let mut model = MultimodalConfig::default();
    model.text.vocab_size = manifest.vocabulary.len() as i64;
    model.classifier.num_classes = manifest.classes.len() as i64;
    let config = TrainConfig {
        model: ModelConfig::Multimodal(model),
        epochs: args.epochs,
        batch_size: args.batch as usize,
        seed: args.seed,
        threads: args.threads,
        device,
        class_counts: Some(manifest.class_counts(Split::Train).iter().map(|&c| c as f64).collect()),
        ..Default::default()
    };

    let open = |threads: usize| {
        ShardSource::open(
            storage.clone(),
            manifest.clone(),
            None,
            ShardSourceConfig {
                batch_size: args.batch,
                seed: args.seed,
                text_len: TEXT_LEN,
                audio_frames: AUDIO_FRAMES,
                prefetch: args.prefetch,
                cache_dir: tmp.path().join("shard-cache"),
                cache_bytes: CACHE_BYTES,
                threads,
                feature_cache: args.feature_cache,
            },
            rt.handle().clone(),
        )
    };
    if args.source_only {
        // One pass fills the cache; the timed passes read it, as epoch 2 does.
        let mut warm = open(1)?;
        warm.begin_epoch(0)?;
        while warm.next_train()?.is_some() {}
        drop(warm);
        time_source_alone(&args, &open)?;
        return Ok(());
    }

    let t = Instant::now();
    let source = open(args.data_threads)?;
    println!(
        "source: opened in {:.2} s (validation split decoded), batch {}, prefetch {}, {} loader thread(s); \
         trainer: {} intra-op thread(s), {}",
        t.elapsed().as_secs_f64(),
        args.batch,
        args.prefetch,
        args.data_threads,
        args.threads,
        args.device,
    );

    let mut timed = train(
        &config,
        source,
        !args.no_prefetch_hint,
        &tmp.path().join("checkpoints"),
        "shards",
    )?;
    let passes = timed.passes.clone();
    let (Some(cold), Some(warm)) = (passes.first(), passes.last()) else {
        anyhow::bail!("the trainer finished no training pass");
    };

    // The source's own pace with nobody training: one more pass over the (warm) cache, kept as
    // the anchor's batches.
    let t = Instant::now();
    let source = &mut timed.inner;
    source.begin_epoch(0)?;
    let mut batches = Vec::new();
    while let Some(b) = source.next_train()? {
        batches.push(b);
    }
    let alone = t.elapsed();
    let alone_samples: i64 = batches.iter().map(Batch::len).sum();
    let source_rate = alone_samples as f64 / alone.as_secs_f64();
    println!(
        "source alone (warm cache, no training): {} batches in {:.2} s, {source_rate:.1} samples/s",
        batches.len(),
        alone.as_secs_f64()
    );

    // Warm figures come from the last epoch, once there is more than one.
    let warm = (passes.len() > 1).then_some(warm);
    println!("cold_wait_share={:.4}", 100.0 * cold.wait_share());
    println!("cold_samples_per_second={:.3}", cold.samples_per_second());
    if let Some(warm) = warm {
        println!("warm_wait_share={:.4}", 100.0 * warm.wait_share());
        println!("warm_samples_per_second={:.3}", warm.samples_per_second());
    }
    println!("source_samples_per_second={source_rate:.3}");
    time_source_alone(&args, &open)?;

    if !args.no_anchor {
        let anchor = Preloaded {
            train: batches,
            validation: source.validation().collect::<Result<_, _>>()?,
            next: 0,
            cursor: DataCursor::default(),
        };
        drop(timed);
        let a = train(
            &config,
            anchor,
            true,
            &tmp.path().join("anchor-checkpoints"),
            "in-memory anchor",
        )?;
        let (Some(a_cold), Some(a_warm)) = (a.passes.first(), a.passes.last()) else {
            anyhow::bail!("the anchor finished no training pass");
        };
        println!("anchor_cold_samples_per_second={:.3}", a_cold.samples_per_second());
        println!(
            "cold_vs_anchor={:.4}",
            cold.samples_per_second() / a_cold.samples_per_second()
        );
        if let Some(warm) = warm {
            println!("anchor_warm_samples_per_second={:.3}", a_warm.samples_per_second());
            println!(
                "warm_vs_anchor={:.4}",
                warm.samples_per_second() / a_warm.samples_per_second()
            );
        }
    }
    Ok(())
}

/// Times whole passes of fresh sources over the warm cache, nobody training, for each thread
/// count of `--source-threads`, in interleaved rounds; prints each count's median rate and its
/// ratio to the first count's.
fn time_source_alone(args: &Args, open: &dyn Fn(usize) -> Result<ShardSource, WorkerError>) -> anyhow::Result<()> {
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); args.source_threads.len()];
    for round in 0..args.source_rounds {
        for (i, &threads) in args.source_threads.iter().enumerate() {
            let mut source = open(threads)?;
            let t = Instant::now();
            source.begin_epoch(round as u64)?;
            let mut samples = 0;
            while let Some(b) = source.next_train()? {
                samples += b.len();
            }
            rates[i].push(samples as f64 / t.elapsed().as_secs_f64());
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&rates[0]);
    for (threads, r) in args.source_threads.iter().zip(&rates) {
        let m = median(r);
        println!(
            "source alone, {threads} loader thread(s): {m:.1} samples/s (median of {} passes), {:.2}x {} thread(s)",
            r.len(),
            m / base,
            args.source_threads[0]
        );
        println!("source_t{threads}_samples_per_second={m:.3}");
        println!("source_t{threads}_speedup={:.4}", m / base);
    }
    Ok(())
}
