//! NCCL on one GPU at world size 1: checks that a communicator forms and that all-reduce, broadcast
//! and barrier leave the data as they should, then times all-reduce calls on a float32 buffer.
//! With one rank NCCL moves no data, so the time is what a call costs the trainer (launch, the
//! wait for completion, the polling that bounds it), not link bandwidth.
//!
//! cargo run --release -p chorus-worker --example nccl_check -- --mib 64 --iters 50
//! (needs libtorch_cuda.so and libnccl.so.2 on LD_LIBRARY_PATH)

use anyhow::{Context, ensure};
use chorus_worker::collective::nccl::NcclCollective;
use chorus_worker::collective::{Collective, ReduceOp};
use clap::Parser;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
struct Args {
    /// Size of the all-reduced buffer.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Timed calls.
    #[arg(long, default_value_t = 50)]
    iters: u32,
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Which GPU (index among the visible ones).
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Per-call timeout, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.iters > 0, "--iters must be at least 1");
    chorus_worker::torch::prepare(1);
    if let Err(e) = chorus_worker::torch::load_cuda() {
        anyhow::bail!("cannot load libtorch_cuda.so: {e}");
    }
    ensure!(tch::Cuda::is_available(), "libtorch finds no GPU");
    NcclCollective::available().map_err(anyhow::Error::msg)?;
    println!("{}", NcclCollective::versions().map_err(anyhow::Error::msg)?);

    let device = Device::Cuda(args.device);
    let id = NcclCollective::unique_id()?;
    let start = Instant::now();
    let mut nccl = NcclCollective::new(0, 1, &id, args.device, Duration::from_secs(args.timeout))
        .context("forming a communicator of one")?;
    println!(
        "communicator of one formed in {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );

    let elements = (args.mib << 20) / 4;
    let mut t = Tensor::ones([elements as i64], (Kind::Float, device)) * 2.0;
    nccl.all_reduce(&mut t, ReduceOp::Average)?;
    let mean = t.mean(Kind::Float).double_value(&[]);
    ensure!(mean == 2.0, "average over one rank changed the values: mean {mean}");
    let mut ids = Tensor::arange(4096, (Kind::Int64, device));
    nccl.broadcast(&mut ids, 0)?;
    ensure!(
        ids.to_device(Device::Cpu)
            .equal(&Tensor::arange(4096, (Kind::Int64, Device::Cpu))),
        "broadcast from the only rank changed the values"
    );
    nccl.barrier()?;

    for _ in 0..args.warmup {
        nccl.all_reduce(&mut t, ReduceOp::Sum)?;
    }
    let mut times = Vec::with_capacity(args.iters as usize);
    for _ in 0..args.iters {
        let call = Instant::now();
        nccl.all_reduce(&mut t, ReduceOp::Sum)?;
        times.push(call.elapsed().as_secs_f64() * 1e6);
    }
    let sum = t.sum(Kind::Double).double_value(&[]);
    ensure!(
        sum == 2.0 * elements as f64,
        "sum over one rank changed the values: {sum}"
    );
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "nccl all_reduce world=1 {} MiB float32: median {median:.1} us/call (min {:.1}, max {:.1}, {} calls)",
        args.mib,
        times[0],
        times[times.len() - 1],
        times.len()
    );
    println!("nccl_all_reduce_us={median:.1}");
    Ok(())
}
