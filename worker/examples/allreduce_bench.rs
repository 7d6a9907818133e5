//! All-reduce bandwidth of the CPU ring (`collective::ring`) between two ranks on loopback, each
//! rank its own OS process, as `bench/allreduce_gloo.py` runs gloo. Also measures what one TCP
//! stream carries over loopback with the ring's socket settings, the ceiling the ring is held to.
//!
//! Figures follow nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n, in GB/s (10^9
//! bytes), from the median time of the timed iterations, each preceded by a barrier.
//!
//! cargo run --release -p chorus-worker --example allreduce_bench -- --mode all
//!
//! Prints `size_mib=64 busbw_gbps=... algbw_gbps=... ms=...` per size, then `loopback_gbps=...`,
//! `loopback_duplex_gbps=...` and `loopback_cached_gbps=...`.

use anyhow::{Context, bail};
use chorus_worker::collective::ReduceOp;
use chorus_worker::collective::ring::{RingCollective, RingConfig, RingListener, configure_socket};
use clap::{Parser, ValueEnum};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Barrier;
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
    /// MiB one loopback measurement sends, from one buffer of that size into another.
    #[arg(long, default_value_t = 256)]
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

/// What TCP over 127.0.0.1 carries with the ring's socket settings, on threads of this process:
/// one stream alone (`loopback_gbps`), and two at once in opposite directions, as the two ranks'
/// links run during an all-reduce (`loopback_duplex_gbps`, per direction). Each stream sends a
/// `--loopback-mib` buffer into another, both touched beforehand, as the ring moves a tensor; the
/// median of three transfers. `loopback_cached_gbps` moves as much through a small buffer.
fn loopback(args: &Args) -> anyhow::Result<()> {
    let bytes = args.loopback_mib * MIB;
    println!("loopback_gbps={:.3}", stream_rate(1, bytes, 1)?);
    println!("loopback_duplex_gbps={:.3}", stream_rate(2, bytes, 1)?);
    // The same bytes from and into a 4 MiB buffer that stays in cache: what the figures lose to
    // memory traffic.
    let cached = 4 * MIB;
    println!(
        "loopback_cached_gbps={:.3}",
        stream_rate(1, cached, (bytes / cached).max(1))?
    );
    Ok(())
}

/// GB/s of each of `streams` concurrent connections, each moving a buffer of `bytes` into another
/// `reps` times.
fn stream_rate(streams: usize, bytes: usize, reps: usize) -> anyhow::Result<f64> {
    let timeout = RingConfig::default().timeout;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut links = Vec::new();
    for _ in 0..streams {
        let tx = TcpStream::connect(listener.local_addr()?)?;
        let (rx, _) = listener.accept()?;
        configure_socket(&tx, timeout)?;
        configure_socket(&rx, timeout)?;
        links.push((tx, rx, vec![1u8; bytes], vec![2u8; bytes]));
    }
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Barrier::new(2 * streams + 1);
        let seconds = std::thread::scope(|s| -> anyhow::Result<f64> {
            let mut threads = Vec::new();
            for (tx, rx, src, dst) in &mut links {
                let start = &start;
                threads.push(s.spawn(move || -> std::io::Result<()> {
                    start.wait();
                    for _ in 0..reps {
                        let mut sent = 0;
                        while sent < src.len() {
                            match (&*tx).write(&src[sent..]) {
                                Ok(n) => sent += n,
                                // The ring's sockets wake blocked writers now and then; keep waiting.
                                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    Ok(())
                }));
                threads.push(s.spawn(move || -> std::io::Result<()> {
                    start.wait();
                    for _ in 0..reps {
                        (&*rx).read_exact(dst)?;
                    }
                    Ok(())
                }));
            }
            start.wait();
            let begun = Instant::now();
            for t in threads {
                t.join().expect("a loopback thread panicked")?;
            }
            Ok(begun.elapsed().as_secs_f64())
        })?;
        rates.push((bytes * reps) as f64 / seconds / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[1])
}
