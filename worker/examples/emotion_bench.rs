//! Training throughput of emotion-bench through the built-in trainer (`shared/emotion-bench.md`):
//! batch 64 of random inputs in the bench shapes, Adam at 1e-3, 3 warm-up steps, then timed steps.
//! Each step is what a builtin trial does: forward, cross-entropy, backward, the optimiser update
//! and reading the loss back. `bench/emotion_bench.py` is the same in PyTorch eager.
//!
//! cargo run --release -p chorus-worker --example emotion_bench -- --steps 20

use chorus_worker::data::synthetic::{SyntheticConfig, SyntheticSource};
use chorus_worker::models::ModelConfig;
use chorus_worker::models::emotion_bench::EmotionBenchConfig;
use chorus_worker::trainer::{DeviceChoice, OptimizerKind, Precision, TrainConfig, Trainer};
use clap::Parser;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    #[arg(long, default_value_t = 64)]
    batch: i64,
    /// Intra-op threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CUDA ordinal of the GPU to train on.
    #[arg(long, default_value_t = 0)]
    cuda_device: usize,
    /// fp32, bf16 or fp16 (fp16 needs a GPU).
    #[arg(long, default_value = "fp32")]
    precision: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    chorus_worker::torch::prepare(args.threads);
    let device = match args.device.as_str() {
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda,
        other => anyhow::bail!("unknown device {other}"),
    };
    let precision: Precision = serde_json::from_value(serde_json::json!(args.precision))
        .map_err(|_| anyhow::anyhow!("unknown precision {}: fp32, bf16 or fp16", args.precision))?;
    let mut trainer = Trainer::new(TrainConfig {
        model: ModelConfig::EmotionBench(EmotionBenchConfig::default()),
        optimizer: OptimizerKind::Adam,
        lr: 1e-3,
        seed: args.seed,
        threads: args.threads,
        device,
        cuda_devices: vec![args.cuda_device],
        precision,
        ..Default::default()
    })?;
    // One batch of pure noise, reused: the data path is timed on its own.
    let source = SyntheticSource::new(SyntheticConfig {
        batch_size: args.batch,
        signal: 0.0,
        seed: args.seed,
        ..Default::default()
    })?;
    let batch = source.make_batch(1, 0, 0).to_device(trainer.device());

    for _ in 0..args.warmup {
        trainer.train_step(&batch, 1)?;
    }
    let start = Instant::now();
    let mut last = 0.0;
    for _ in 0..args.steps {
        last = trainer.train_step(&batch, 1)?.loss;
    }
    let seconds = start.elapsed().as_secs_f64();
    let samples_per_second = (args.steps as f64 * args.batch as f64) / seconds;
    println!(
        "chorus emotion-bench: {samples_per_second:.1} samples/s ({:.1} ms/step, {} steps of {}, {} thread(s), {:?}, \
         {precision:?}, {} parameters, last loss {last:.4})",
        1000.0 * seconds / args.steps as f64,
        args.steps,
        args.batch,
        args.threads,
        trainer.device(),
        trainer.parameters(),
    );
    println!("samples_per_second={samples_per_second:.3}");
    Ok(())
}
