//! `chorus-coordinator`: parses flags and runs [`chorus_coordinator::run`].

use anyhow::Context;
use chorus_coordinator::{Options, Timing, Tokens, run};
use chorus_core::limits::BudgetLimits;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "chorus-coordinator",
    version,
    about = "The Chorus coordinator: sweeps, scheduling and records"
)]
struct Args {
    /// Address to serve gRPC on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "CHORUS_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// Directory for the coordinator's store (and the default file storage).
    #[arg(long, env = "CHORUS_DATA_DIR", default_value = ".chorus/coordinator")]
    data_dir: PathBuf,
    /// Object storage for experiments whose spec names none [default: file://DATA_DIR/storage].
    #[arg(long, env = "CHORUS_STORAGE")]
    storage: Option<String>,
    /// S3-compatible endpoint for s3:// storage (credentials come from AWS_* variables).
    #[arg(long, env = "CHORUS_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Token the CLI must present. Required, with --worker-token, off loopback.
    #[arg(long, env = "CHORUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Token workers must present.
    #[arg(long, env = "CHORUS_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// A worker that has not renewed its lease for this long is gone and its trials move.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// How often workers renew their lease.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Serve Prometheus metrics on http://ADDR/metrics (off unless set).
    #[arg(long, env = "CHORUS_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// A storage prefix experiments may use (repeatable, or comma-separated); the default
    /// storage is always allowed. Specs naming storage elsewhere are refused.
    #[arg(
        long = "allowed-storage",
        env = "CHORUS_ALLOWED_STORAGE",
        value_name = "PREFIX",
        value_delimiter = ','
    )]
    allowed_storage: Vec<String>,
    /// For tests only: accept memory:// storage, which each process keeps to itself.
    #[arg(long, hide = true)]
    allow_memory_storage: bool,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Most trials one experiment may create (its max_trials, or its grid's size).
    #[arg(long, env = "CHORUS_MAX_TRIALS_PER_EXPERIMENT", default_value_t = BudgetLimits::default().max_trials)]
    max_trials_per_experiment: u64,
    /// Most trials of one experiment running at once (its parallel_trials).
    #[arg(long, env = "CHORUS_MAX_PARALLEL_TRIALS", default_value_t = BudgetLimits::default().max_parallel_trials)]
    max_parallel_trials: u32,
    /// Most restarts of one trial (an experiment's max_restarts).
    #[arg(long, env = "CHORUS_MAX_RESTARTS", default_value_t = BudgetLimits::default().max_restarts)]
    max_restarts: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let listener = listen(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut opts = Options::new(args.data_dir);
    opts.default_storage = args.storage;
    opts.storage.s3_endpoint = args.s3_endpoint;
    opts.metrics_listener = args.metrics_listen;
    opts.budgets = BudgetLimits {
        max_trials: args.max_trials_per_experiment,
        max_parallel_trials: args.max_parallel_trials,
        max_restarts: args.max_restarts,
    };
    opts.allowed_storage = args.allowed_storage;
    opts.allow_memory_storage = args.allow_memory_storage;
    // An empty token is no token.
    let set = |t: Option<String>| t.filter(|t| !t.trim().is_empty());
    opts.tokens = Tokens {
        user: set(args.token).into_iter().collect(),
        worker: set(args.worker_token).into_iter().collect(),
    };
    opts.timing = Timing {
        lease_ttl: args.lease_ttl,
        heartbeat_interval: args.heartbeat_interval,
        ..Timing::default()
    };
    // Printed only once the coordinator serves: a supervisor reading stdout may trust it.
    let ready = |addr| println!("chorus-coordinator listening on {addr}");
    run(listener, opts, ready, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Connections the kernel queues before they are accepted. A fleet of thousands of workers
/// connects at once (a coordinator restart, a cluster coming up); with the default of 1,024 the
/// queue overflows and every refused worker waits out a one-second SYN retry.
const ACCEPT_BACKLOG: u32 = 8192;

/// Listens on the first address `addr` resolves to that can be bound, with a deep accept queue
/// (the kernel caps it at `net.core.somaxconn`).
async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As the standard library's listener does: a restarted coordinator can bind its port
        // while the old connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(ACCEPT_BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr} names no address"))))
}
