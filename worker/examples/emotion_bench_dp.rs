//! Data-parallel training throughput of emotion-bench: `--world N` ranks, each a separate
//! process with its own batch of 64 and one intra-op thread, gradients summed by the ring
//! all-reduce over loopback TCP in 25 MiB buckets, exactly as a data-parallel builtin trial
//! steps. `bench/ddp_emotion.py` is the same with PyTorch DDP (gloo).
//!
//! Prints `samples_per_second=` for all ranks together (N x batch per step over rank 0's time).
//!
//! cargo run --release -p chorus-worker --example emotion_bench_dp -- --world 2 --steps 20

use anyhow::Context;
use chorus_worker::collective::buckets::DEFAULT_BUCKET_BYTES;
use chorus_worker::collective::ring::{RingCollective, RingConfig, RingListener};
use chorus_worker::data::synthetic::{SyntheticConfig, SyntheticSource};
use chorus_worker::models::ModelConfig;
use chorus_worker::models::emotion_bench::EmotionBenchConfig;
use chorus_worker::trainer::{DeviceChoice, OptimizerKind, TrainConfig, Trainer};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Ranks (processes).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Samples per rank per step.
    #[arg(long, default_value_t = 64)]
    batch: i64,
    /// Intra-op threads per rank.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Set on the rank processes the launcher starts.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// Where ranks leave their addresses for each other.
    #[arg(long, hide = true)]
    meet: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match (args.rank, &args.meet) {
        (Some(rank), Some(meet)) => run_rank(&args, rank, meet),
        _ => launch(&args),
    }
}

/// Starts one process per rank and prints rank 0's figure.
fn launch(args: &Args) -> anyhow::Result<()> {
    let meet = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..args.world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["--world", &args.world.to_string(), "--steps", &args.steps.to_string()])
                .args(["--warmup", &args.warmup.to_string(), "--batch", &args.batch.to_string()])
                .args(["--threads", &args.threads.to_string(), "--rank", &r.to_string()])
                .arg("--meet")
                .arg(meet.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("start a rank")
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for c in children {
        let o = c.wait_with_output()?;
        anyhow::ensure!(o.status.success(), "a rank failed: {}", o.status);
        out.push(String::from_utf8_lossy(&o.stdout).into_owned());
    }
    print!("{}", out[0]);
    Ok(())
}

/// Each rank publishes its listener's address as a file and waits for the others'.
fn peers(meet: &Path, rank: usize, world: usize, listener: &RingListener) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let tmp = meet.join(format!(".rank-{rank}"));
    std::fs::write(&tmp, listener.local_addr().to_string())?;
    std::fs::rename(&tmp, meet.join(format!("rank-{rank}")))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::with_capacity(world);
    for r in 0..world {
        loop {
            if let Ok(s) = std::fs::read_to_string(meet.join(format!("rank-{r}"))) {
                out.push(s.trim().parse()?);
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "rank {r} never announced itself");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(out)
}

fn run_rank(args: &Args, rank: usize, meet: &Path) -> anyhow::Result<()> {
    chorus_worker::torch::prepare(args.threads);
    let listener = RingListener::bind(std::net::Ipv4Addr::LOCALHOST.into())?;
    let addrs = peers(meet, rank, args.world, &listener)?;
    let mut ring = RingCollective::connect(listener, rank, &addrs, 1, RingConfig::default())?;
    let mut trainer = Trainer::new(TrainConfig {
        model: ModelConfig::EmotionBench(EmotionBenchConfig::default()),
        optimizer: OptimizerKind::Adam,
        lr: 1e-3,
        batch_size: args.batch as usize,
        threads: args.threads,
        device: DeviceChoice::Cpu,
        ..Default::default()
    })?;
    trainer.sync_from_rank0(&mut ring)?;
    let mut buckets = trainer.gradient_buckets(DEFAULT_BUCKET_BYTES);
    // Noise batches, different per rank, reused: the data path is timed on its own.
    let source = SyntheticSource::new(SyntheticConfig {
        batch_size: args.batch,
        signal: 0.0,
        seed: rank as u64,
        ..Default::default()
    })?;
    let batch = source.make_batch(1, 0, 0);
    let mut step = || trainer.parallel_step(Some(&batch), 1, false, &mut buckets, &mut ring);
    // The steps themselves keep the ranks in lockstep, so the timers start together.
    for _ in 0..args.warmup {
        step()?;
    }
    let start = Instant::now();
    let mut last = 0.0;
    for _ in 0..args.steps {
        last = step()?.0.map_or(0.0, |r| r.loss);
    }
    let seconds = start.elapsed().as_secs_f64();
    let samples = args.steps as f64 * args.batch as f64 * args.world as f64;
    println!(
        "chorus emotion-bench data-parallel: {:.1} samples/s over {} ranks ({:.1} ms/step, batch {} per rank, \
         {} thread(s) each, last loss {last:.4})",
        samples / seconds,
        args.world,
        1000.0 * seconds / args.steps as f64,
        args.batch,
        args.threads
    );
    println!("samples_per_second={:.3}", samples / seconds);
    Ok(())
}
