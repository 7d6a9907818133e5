//! `chorus-coordinator`: parses flags and runs [`chorus_coordinator::run`]; `--check-config`
//! validates the configuration without starting, and `backup DEST` copies the live store.

use anyhow::Context;
use chorus_coordinator::{Options, Timing, TlsOptions, Tokens, run};
use chorus_core::limits::BudgetLimits;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "chorus-coordinator",
    version,
    about = "The Chorus coordinator: sweeps, scheduling and records"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Validate flags and environment, print the resolved configuration (secrets redacted) and
    /// exit: 0 when it would start, 2 with the reason when it would not. Takes no lock and
    /// opens no store.
    #[arg(long)]
    check_config: bool,
    /// Address to serve gRPC on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "CHORUS_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// Directory for the coordinator's store (and the default file storage).
    #[arg(long, env = "CHORUS_DATA_DIR", default_value = ".chorus/coordinator", global = true)]
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
    /// Token workers must present (or a client certificate, with --tls-client-ca).
    #[arg(long, env = "CHORUS_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// Serve gRPC over TLS with this PEM certificate chain (leaf first); re-read when the file
    /// changes, so a rotated certificate needs no restart.
    #[arg(long, env = "CHORUS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "CHORUS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle for worker client certificates (mutual TLS): a worker presenting one that
    /// chains to it needs no token and may act only as a worker id among its SAN DNS names.
    #[arg(long, env = "CHORUS_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve without TLS on a non-loopback address (a private network, or a mesh that
    /// encrypts). Tokens are still required there.
    #[arg(long, env = "CHORUS_INSECURE")]
    insecure: bool,
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy the store of --data-dir to DEST while a coordinator serves on it (SQLite's online
    /// backup; the copy is checked, then renamed into place). Restore by copying DEST to
    /// NEW_DATA_DIR/chorus.db.
    Backup {
        /// The file to write.
        dest: PathBuf,
    },
}

/// A configuration that cannot start: reported with this exit code by `--check-config`.
const BAD_CONFIG: i32 = 2;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.check_config {
        return match check_config(&args) {
            Ok(text) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chorus-coordinator: invalid configuration: {e:#}");
                std::process::ExitCode::from(BAD_CONFIG as u8)
            }
        };
    }
    if let Some(Command::Backup { dest }) = &args.command {
        return match chorus_coordinator::backup(&args.data_dir, dest) {
            Ok(r) => {
                println!(
                    "backed up {} to {} ({} bytes, {} experiments, {} trials, integrity ok)",
                    r.source.display(),
                    r.dest.display(),
                    r.bytes,
                    r.experiments,
                    r.trials
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chorus-coordinator: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chorus-coordinator: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// An empty (or all-whitespace) token is no token; a set one loses the newline a secret file
/// often ends with.
fn token(t: &Option<String>) -> Option<String> {
    t.as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// The options the flags and environment say, before anything is checked against the machine.
fn options(args: &Args) -> Options {
    let mut opts = Options::new(args.data_dir.clone());
    opts.default_storage = args.storage.clone();
    opts.storage.s3_endpoint = args.s3_endpoint.clone();
    opts.metrics_listener = args.metrics_listen;
    opts.budgets = BudgetLimits {
        max_trials: args.max_trials_per_experiment,
        max_parallel_trials: args.max_parallel_trials,
        max_restarts: args.max_restarts,
    };
    opts.allowed_storage = args.allowed_storage.clone();
    opts.allow_memory_storage = args.allow_memory_storage;
    opts.tokens = Tokens {
        user: token(&args.token).into_iter().collect(),
        worker: token(&args.worker_token).into_iter().collect(),
    };
    opts.timing = Timing {
        lease_ttl: args.lease_ttl,
        heartbeat_interval: args.heartbeat_interval,
        ..Timing::default()
    };
    opts.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsOptions {
            client_ca: args.tls_client_ca.clone(),
            ..TlsOptions::new(cert.clone(), key.clone())
        }),
        _ => None,
    };
    opts.insecure = args.insecure;
    opts
}

/// Checks everything a start would check short of binding, locking and opening the store, and
/// returns the resolved configuration as text.
fn check_config(args: &Args) -> anyhow::Result<String> {
    use std::net::ToSocketAddrs;
    let opts = options(args);
    let addrs: Vec<std::net::SocketAddr> = args
        .listen
        .to_socket_addrs()
        .with_context(|| {
            format!(
                "--listen / CHORUS_LISTEN {:?} is not an address (HOST:PORT)",
                args.listen
            )
        })?
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "--listen {:?} names no address", args.listen);
    for a in &addrs {
        opts.check_exposure(*a).map_err(anyhow::Error::msg)?;
    }
    if let Some(t) = &opts.tls {
        chorus_coordinator::tls::load_key_pair(&t.cert, &t.key)?;
        if let Some(ca) = &t.client_ca {
            chorus_coordinator::tls::load_certs(ca)?;
        }
    }
    anyhow::ensure!(
        args.log_format == "text" || args.log_format == "json",
        "--log-format {:?}: must be text or json",
        args.log_format
    );
    anyhow::ensure!(
        !args.lease_ttl.is_zero() && args.heartbeat_interval < args.lease_ttl,
        "--heartbeat-interval ({}) must be shorter than --lease-ttl ({})",
        humantime::format_duration(args.heartbeat_interval),
        humantime::format_duration(args.lease_ttl)
    );
    data_dir_creatable(&args.data_dir)?;
    let shown = |t: &Option<String>| match token(t) {
        Some(_) => "(set, redacted)",
        None => "(unset)",
    };
    let path = |p: &Option<PathBuf>| p.as_ref().map_or("(unset)".to_string(), |p| p.display().to_string());
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k}: {v}\n"));
    line("listen", format!("{} -> {addrs:?}", args.listen));
    line("data_dir", args.data_dir.display().to_string());
    line(
        "storage",
        args.storage
            .clone()
            .unwrap_or_else(|| format!("file://{}/storage", args.data_dir.display())),
    );
    line(
        "s3_endpoint",
        args.s3_endpoint.clone().unwrap_or_else(|| "(unset)".into()),
    );
    line("allowed_storage", format!("{:?}", args.allowed_storage));
    line("token", shown(&args.token).into());
    line("worker_token", shown(&args.worker_token).into());
    line("tls_cert", path(&args.tls_cert));
    line("tls_key", path(&args.tls_key));
    line("tls_client_ca", path(&args.tls_client_ca));
    line(
        "tls",
        match &opts.tls {
            None => "off",
            Some(t) if t.client_ca.is_some() => "on (mutual: worker client certificates accepted)",
            Some(_) => "on",
        }
        .into(),
    );
    line("insecure", args.insecure.to_string());
    line(
        "metrics_listen",
        args.metrics_listen.map_or("(off)".to_string(), |a| a.to_string()),
    );
    line("lease_ttl", humantime::format_duration(args.lease_ttl).to_string());
    line(
        "heartbeat_interval",
        humantime::format_duration(args.heartbeat_interval).to_string(),
    );
    line("max_trials_per_experiment", args.max_trials_per_experiment.to_string());
    line("max_parallel_trials", args.max_parallel_trials.to_string());
    line("max_restarts", args.max_restarts.to_string());
    line("log_format", args.log_format.clone());
    Ok(out)
}

/// The data directory exists as a writable directory, or could be created: its nearest
/// existing ancestor is a writable directory. Nothing is created.
fn data_dir_creatable(dir: &Path) -> anyhow::Result<()> {
    let writable = |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK);
    let mut p = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(dir)
    };
    let start = p.clone();
    loop {
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => {
                return writable(&p).with_context(|| {
                    if p == start {
                        format!("data directory {} is not writable", dir.display())
                    } else {
                        format!(
                            "data directory {} cannot be created: {} is not writable",
                            dir.display(),
                            p.display()
                        )
                    }
                });
            }
            Ok(_) => anyhow::bail!(
                "data directory {} cannot be created: {} is not a directory",
                dir.display(),
                p.display()
            ),
            // A missing directory, or one under a file (ENOTDIR): its parent says which.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match p.parent() {
                    Some(parent) => p = parent.to_path_buf(),
                    None => anyhow::bail!("data directory {}: no existing ancestor", dir.display()),
                }
            }
            Err(e) => anyhow::bail!("data directory {}: {e}", dir.display()),
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
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
    let opts = options(&args);
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
