//! All-reduce bandwidth of the CPU ring (`collective::ring`) between two ranks on loopback, each
//! rank its own OS process, as `bench/allreduce_gloo.py` runs gloo. Also measures what one TCP
//! stream carries over loopback with the ring's socket settings, the ceiling the ring is held to.
//!
//! Figures follow nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n, in GB/s (10^9
//! bytes), from the median time of the timed iterations, each preceded by a barrier.
//!
//! cargo run --release -p chorus-worker --example allreduce_bench -- --mode all
//!
//! Prints `size_mib=64 busbw_gbps=... algbw_gbps=... ms=...` per size and `loopback_gbps=...`.

use anyhow::{Context, bail};
use chorus_worker::collective::ReduceOp;
use chorus_worker::collective::ring::{RingCollective, RingConfig, RingListener, configure_socket};
use clap::{Parser, ValueEnum};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ring,
    Loopback,
    All,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// Message sizes in MiB of float32.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64, 256])]
    sizes: Vec<usize>,
    /// Timed iterations per size; by default about 1 GiB's worth, between 5 and 50.
    #[arg(long)]
    iters: Option<usize>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// The ring's chunk size, in KiB; by default the ring's own.
    #[arg(long)]
    chunk_kib: Option<usize>,
    /// MiB one loopback measurement sends.
    #[arg(long, default_value_t = 1024)]
    loopback_mib: usize,
    /// Set on the second rank, which the first starts: the first rank's listener.
    #[arg(long, hide = true)]
    peer0: Option<SocketAddr>,
}

const MIB: usize = 1024 * 1024;
const SESSION: u64 = 0xbe9c;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(peer0) = args.peer0 {
        return second_rank(&args, peer0);
    }
    if args.mode != Mode::Loopback {
        first_rank(&args)?;
    }
    if args.mode != Mode::Ring {
        loopback(&args)?;
    }
    Ok(())
}

fn config(args: &Args) -> RingConfig {
    let default = RingConfig::default();
    RingConfig {
        chunk_bytes: args.chunk_kib.map_or(default.chunk_bytes, |k| k * 1024),
        ..default
    }
}

/// Rank 0: starts rank 1 as a child process, learns its listener from the child's first line of
/// output, and reports.
fn first_rank(args: &Args) -> anyhow::Result<()> {
    let listener = RingListener::bind(Ipv4Addr::LOCALHOST.into())?;
    let own = listener.local_addr();
    let mut child_args: Vec<String> = std::env::args().skip(1).collect();
    child_args.extend(["--peer0".into(), own.to_string()]);
    let mut child = Command::new(std::env::current_exe()?)
        .args(&child_args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting rank 1")?;
    let mut lines = BufReader::new(child.stdout.take().context("rank 1 has no stdout")?).lines();
    let line = lines.next().context("rank 1 exited before it listened")??;
    let peer1: SocketAddr = line
        .strip_prefix("addr=")
        .with_context(|| format!("rank 1 said {line:?}"))?
        .parse()?;
    let mut ring = RingCollective::connect(listener, 0, &[own, peer1], SESSION, config(args))?;
    let result = run(args, &mut ring, 0);
    drop(ring);
    let status = child.wait()?;
    result?;
    if !status.success() {
        bail!("rank 1 failed: {status}");
    }
    Ok(())
}

fn second_rank(args: &Args, peer0: SocketAddr) -> anyhow::Result<()> {
    let listener = RingListener::bind(Ipv4Addr::LOCALHOST.into())?;
    let own = listener.local_addr();
    println!("addr={own}");
    std::io::stdout().flush()?;
    let mut ring = RingCollective::connect(listener, 1, &[peer0, own], SESSION, config(args))?;
    run(args, &mut ring, 1)
}

fn run(args: &Args, ring: &mut RingCollective, rank: usize) -> anyhow::Result<()> {
    let world = 2usize;
    for &mib in &args.sizes {
        let len = mib * MIB / 4;
        let mut data = vec![rank as f32 + 1.0; len];
        ring.all_reduce_f32(&mut data, ReduceOp::Sum)?;
        let want = (world * (world + 1) / 2) as f32;
        if let Some(i) = data.iter().position(|&x| x != want) {
            bail!("{mib} MiB: element {i} is {} after the sum, not {want}", data[i]);
        }
        // Zeros stay finite however often they are summed; the arithmetic costs the same.
        data.fill(0.0);
        let iters = args.iters.unwrap_or((1024 / mib.max(1)).clamp(5, 50));
        for _ in 0..args.warmup {
            ring.all_reduce_f32(&mut data, ReduceOp::Sum)?;
        }
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            ring.barrier()?;
            let start = Instant::now();
            ring.all_reduce_f32(&mut data, ReduceOp::Sum)?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let bytes = (len * 4) as f64;
        let algbw = bytes / median / 1e9;
        let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
        if rank == 0 {
            println!(
                "size_mib={mib} busbw_gbps={busbw:.3} algbw_gbps={algbw:.3} ms={:.3} min_ms={:.3} max_ms={:.3} iters={iters}",
                median * 1e3,
                times[0] * 1e3,
                times[times.len() - 1] * 1e3
            );
        }
    }
    Ok(())
}

/// One stream over 127.0.0.1 with the ring's socket settings, writer and reader on two threads:
/// the median of three transfers of `--loopback-mib`.
fn loopback(args: &Args) -> anyhow::Result<()> {
    let timeout = RingConfig::default().timeout;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let total = args.loopback_mib * MIB;
    let piece = 4 * MIB;
    let writer = std::thread::spawn(move || -> anyhow::Result<()> {
        let stream = TcpStream::connect(addr)?;
        configure_socket(&stream, timeout)?;
        let buf = vec![1u8; piece];
        for _ in 0..3 {
            let mut left = total;
            while left > 0 {
                let n = left.min(piece);
                match (&stream).write(&buf[..n]) {
                    Ok(w) => left -= w,
                    // The ring's sockets wake blocked writers periodically; keep waiting.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    });
    let (stream, _) = listener.accept()?;
    configure_socket(&stream, timeout)?;
    let mut buf = vec![0u8; piece];
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let mut left = total;
        while left > 0 {
            let n = (&stream).read(&mut buf[..left.min(piece)])?;
            if n == 0 {
                bail!("the loopback writer closed early");
            }
            left -= n;
        }
        rates.push(total as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    writer.join().expect("loopback writer panicked")?;
    rates.sort_by(f64::total_cmp);
    println!("loopback_gbps={:.3}", rates[1]);
    Ok(())
}
