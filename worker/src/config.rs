//! The worker's settings: its command line, and the values it resolves from the host when a flag
//! is left out (worker id, CPU slots, GPUs, data directory, advertise address, instance), plus
//! the TLS files it reads, checked before anything connects. Empty values count as unset, as
//! an environment variable a template leaves blank should.

use crate::error::WorkerError;
use crate::runner::containment::ContainmentMode;
use chorus_core::storage::StorageOptions;
use clap::{Parser, ValueEnum};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::codegen::http::Uri;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Runs the trials a Chorus coordinator assigns to this host.
#[derive(Debug, Parser)]
#[command(name = "chorus-worker", version, about)]
pub struct Args {
    /// Coordinator address.
    #[arg(long, env = "CHORUS_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    pub coordinator: String,
    /// Worker token, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "CHORUS_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Name of this worker process [default: <hostname>-<pid>-<4 random hex digits>].
    #[arg(long, env = "CHORUS_WORKER_ID")]
    pub worker_id: Option<String>,
    /// CPU slots offered to trials [default: number of CPUs].
    #[arg(long, env = "CHORUS_WORKER_SLOTS", value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: Option<u32>,
    /// GPUs offered to trials [default: the GPUs CUDA_VISIBLE_DEVICES names if set, else every
    /// GPU the CUDA driver lists, else 0].
    #[arg(long, env = "CHORUS_WORKER_GPUS")]
    pub gpus: Option<u32>,
    /// A label the coordinator can match placements on, as key=value; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", env = "CHORUS_WORKER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Directory for the local checkpoint directories of running attempts
    /// [default: ./.chorus/worker-<id>].
    // Strings, not paths, here and below: clap refuses an empty path, and an empty value is
    // meant to count as unset.
    #[arg(long, env = "CHORUS_WORKER_DATA_DIR", value_name = "PATH")]
    pub data_dir: Option<String>,
    /// S3-compatible endpoint for `s3://` storage, e.g. http://127.0.0.1:9000.
    #[arg(long, env = "CHORUS_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Format of the worker's own log on stderr.
    #[arg(long, env = "CHORUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The address other workers reach this one at for data-parallel collectives (and, for
    /// rank 0 of a command trial, MASTER_ADDR). In a Kubernetes pod: the pod IP
    /// [default: this host's address on the interface that routes to the coordinator].
    #[arg(long, env = "CHORUS_ADVERTISE_ADDRESS", value_name = "IP")]
    pub advertise_address: Option<String>,
    /// Which process lineage this is. A worker restarted with the same instance takes its worker
    /// id over at once; another instance with the same id waits until the registered one's lease
    /// lapses. In a Kubernetes pod: the pod UID [default: a random id kept in DATA_DIR/instance].
    #[arg(long, env = "CHORUS_WORKER_INSTANCE")]
    pub instance: Option<String>,
    /// PEM bundle of the certificate authorities trusted for an `https://` coordinator
    /// [default: the system's roots].
    #[arg(long, env = "CHORUS_CA", value_name = "PATH")]
    pub ca: Option<String>,
    /// PEM certificate (chain) presented to the coordinator as this worker's identity (mutual
    /// TLS); needs --tls-key.
    #[arg(long, env = "CHORUS_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<String>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CHORUS_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<String>,
    /// Serve grpc.health.v1 on this address (e.g. `0.0.0.0:7071`): SERVING while registered with
    /// the coordinator, NOT_SERVING while disconnected or draining [default: off].
    #[arg(long, env = "CHORUS_HEALTH_LISTEN", value_name = "ADDR")]
    pub health_listen: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. `0.0.0.0:9464`): slots and GPUs
    /// offered and in use, attempts running, and each GPU's utilisation and memory [default: off].
    #[arg(long, env = "CHORUS_WORKER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// How often the GPUs of a running attempt are read for its trial's `gpu_util` and
    /// `gpu_mem_mb` metrics; `0s` turns them off.
    #[arg(long, env = "CHORUS_WORKER_GPU_METRICS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub gpu_metrics_interval: Duration,
    /// Resolve the settings, print them (secrets redacted) and exit: 0 when they are usable, 2
    /// when not. Connects to nothing and leaves the data directory alone.
    #[arg(long)]
    pub check_config: bool,
    /// How long a collective (all-reduce, broadcast, barrier) waits on a peer before the
    /// attempt fails, e.g. `60s`.
    #[arg(long, env = "CHORUS_COLLECTIVE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub collective_timeout: Duration,
    /// How trial processes are kept within their attempt: `cgroup` (a cgroup v2 per attempt),
    /// `process` (subreaper and process tracking), or `auto` (cgroup where the host allows).
    #[arg(long, env = "CHORUS_WORKER_CONTAINMENT", value_enum, default_value_t = ContainmentMode::Auto)]
    pub containment: ContainmentMode,
    /// A variable of the worker's environment that trials may inherit beyond the default
    /// allow-list, by name or as `PREFIX*`; repeatable.
    #[arg(
        long = "trial-env",
        value_name = "NAME",
        env = "CHORUS_WORKER_TRIAL_ENV",
        value_delimiter = ','
    )]
    pub trial_env: Vec<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The address a listening flag names, if it is set; `example` goes into the error.
fn listen_address(flag: &str, value: Option<String>, example: &str) -> Result<Option<SocketAddr>, WorkerError> {
    set(value)
        .map(|a| {
            a.trim()
                .parse::<SocketAddr>()
                .map_err(|e| WorkerError::Config(format!("{flag} {a:?} is not an address like {example}: {e}")))
        })
        .transpose()
}

/// A value set to the empty string (or only whitespace), as an environment variable often is
/// when a template leaves it blank, counts as not set.
fn set(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn set_path(value: Option<String>) -> Option<PathBuf> {
    set(value).map(PathBuf::from)
}

impl Args {
    /// Fills in what the flags left out by looking at the host. Reads the TLS files and resolves
    /// the coordinator's name (for the advertise address) but connects to nothing and leaves the
    /// data directory alone: `--check-config` runs exactly this.
    pub fn into_config(self) -> Result<WorkerConfig, WorkerError> {
        let requested = self.gpus;
        let mut config = self.into_config_without_gpus()?;
        config.gpu_ids = crate::gpu::worker_gpus(requested);
        Ok(config)
    }

    /// [`Args::into_config`] without the GPUs: `gpu_ids` is left empty for
    /// [`crate::gpu::worker_gpus`] (given `--gpus`) to fill. Finding the GPUs starts the CUDA
    /// driver, which may start threads of its own, and the binary must fork its guardian while
    /// the process has one thread: it finds them after.
    pub fn into_config_without_gpus(self) -> Result<WorkerConfig, WorkerError> {
        let worker_id = match self.worker_id {
            Some(id) if id.trim().is_empty() => {
                return Err(WorkerError::Config("--worker-id must not be empty".into()));
            }
            Some(id) => id,
            None => default_worker_id(),
        };
        let coordinator = coordinator_url(&self.coordinator)?;
        let slots = self
            .slots
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        let data_dir =
            set_path(self.data_dir).unwrap_or_else(|| PathBuf::from(".chorus").join(format!("worker-{worker_id}")));
        for pattern in &self.trial_env {
            crate::runner::environment::check_pattern(pattern).map_err(WorkerError::Config)?;
        }
        // Trials get checkpoint paths through their environment and may chdir: hand them absolute ones.
        let data_dir = std::path::absolute(&data_dir).map_err(WorkerError::io(&data_dir))?;
        let advertise_address = set(self.advertise_address)
            .map(|a| {
                a.trim()
                    .parse::<IpAddr>()
                    .map_err(|e| WorkerError::Config(format!("--advertise-address {a:?} is not an IP address: {e}")))
            })
            .transpose()?;
        let instance = set(self.instance).map(|i| i.trim().to_string());
        if let Some(i) = &instance {
            check_instance(i).map_err(|e| WorkerError::Config(format!("--instance {i:?}: {e}")))?;
        }
        let health_listen = listen_address("--health-listen", self.health_listen, "0.0.0.0:7071")?;
        let metrics_listen = listen_address("--metrics-listen", self.metrics_listen, "0.0.0.0:9464")?;
        let tls = ClientTls::load(set_path(self.ca), set_path(self.tls_cert), set_path(self.tls_key))?;
        if tls.is_set() && !coordinator.starts_with("https://") {
            return Err(WorkerError::Config(format!(
                "--ca, --tls-cert and --tls-key are for an https:// coordinator; {coordinator} is plain http"
            )));
        }
        Ok(WorkerConfig {
            coordinator,
            token: set(self.token).map(|t| t.trim().to_string()),
            worker_id,
            instance,
            slots,
            gpu_ids: Vec::new(),
            labels: self.labels.into_iter().collect(),
            data_dir,
            storage: StorageOptions {
                s3_endpoint: set(self.s3_endpoint),
            },
            advertise_address,
            tls,
            health_listen,
            metrics_listen,
            timings: Timings {
                collective_timeout: self.collective_timeout,
                gpu_sample_every: self.gpu_metrics_interval,
                ..Timings::default()
            },
            containment: self.containment,
            trial_env: self.trial_env,
        })
    }
}

/// The coordinator's URL with its scheme (`http://` when none is given); only http and https.
pub fn coordinator_url(raw: &str) -> Result<String, WorkerError> {
    let raw = raw.trim();
    let url = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(WorkerError::Config(format!(
            "--coordinator {raw:?} must be an http:// or https:// URL"
        )));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e| WorkerError::Config(format!("--coordinator {raw:?} is not a valid URL: {e}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(WorkerError::Config(format!("--coordinator {raw:?} names no host")));
    }
    Ok(url)
}

/// The coordinator's socket addresses, resolved now (a name lookup, no connection).
pub fn resolve_coordinator(url: &str) -> Result<Vec<SocketAddr>, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url:?} names no host"))?;
    // `[::1]` in a URL is `::1` to the resolver.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    Ok(addrs)
}

/// The local address of the interface that routes to `coordinator`: peers on the coordinator's
/// network reach this worker there. Connecting a UDP socket only asks the kernel for a route;
/// no packet is sent. Loopback comes out only when the coordinator itself is on this host.
pub fn route_to(coordinator: SocketAddr) -> Result<IpAddr, String> {
    let any: SocketAddr = if coordinator.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    socket
        .connect(coordinator)
        .map_err(|e| format!("no route to the coordinator at {coordinator}: {e}"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("cannot read the local address routing to {coordinator}: {e}"))?
        .ip();
    if local.is_unspecified() {
        return Err(format!("no local address routes to {coordinator}"));
    }
    Ok(local)
}

/// The advertise address when none was given: the one routing to the coordinator, whose name
/// is resolved now.
pub fn default_advertise_address(coordinator_url: &str) -> Result<IpAddr, String> {
    let addrs = resolve_coordinator(coordinator_url)?;
    let mut last = String::new();
    for a in addrs {
        match route_to(a) {
            Ok(ip) => return Ok(ip),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// An instance names a process lineage in logs and in the coordinator's records: keep it short
/// and printable.
fn check_instance(i: &str) -> Result<(), String> {
    if i.len() > 128 {
        return Err("longer than 128 characters".into());
    }
    if let Some(c) = i.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("contains {c:?}"));
    }
    Ok(())
}

/// Where the instance id lives in the data directory.
pub const INSTANCE_FILE: &str = "instance";

/// The instance id kept in the data directory, if there is a usable one.
pub fn stored_instance(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(INSTANCE_FILE)).ok()?;
    let id = text.trim();
    (!id.is_empty() && check_instance(id).is_ok()).then(|| id.to_string())
}

/// The data directory's instance id, created (random, 128 bits) on first use. Call with the
/// directory's lock held: a second process on the same directory must not race the creation.
pub fn load_or_create_instance(data_dir: &Path) -> Result<String, WorkerError> {
    if let Some(id) = stored_instance(data_dir) {
        return Ok(id);
    }
    let id = format!("{:032x}", rand::random::<u128>());
    let path = data_dir.join(INSTANCE_FILE);
    // Written aside and renamed, so a crash never leaves a half-written id that a restart reads
    // as a different instance.
    let tmp = data_dir.join(format!("{INSTANCE_FILE}.tmp"));
    std::fs::write(&tmp, format!("{id}\n")).map_err(WorkerError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(WorkerError::io(&path))?;
    Ok(id)
}

/// A PEM file read at start, so a missing or malformed one is reported before connecting.
#[derive(Clone)]
pub struct PemFile {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl std::fmt::Debug for PemFile {
    // The contents may be a private key; the path says enough.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

/// The TLS material of the connection to the coordinator.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trusted instead of the system's roots.
    pub ca: Option<PemFile>,
    /// Certificate chain and key presented for mutual TLS.
    pub identity: Option<(PemFile, PemFile)>,
}

impl ClientTls {
    pub fn load(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Self, WorkerError> {
        let ca = ca.map(|p| read_certificates("--ca", p)).transpose()?;
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(_), None) => return Err(WorkerError::Config("--tls-cert needs --tls-key".into())),
            (None, Some(_)) => return Err(WorkerError::Config("--tls-key needs --tls-cert".into())),
            (Some(c), Some(k)) => Some((read_certificates("--tls-cert", c)?, read_key(k)?)),
        };
        Ok(ClientTls { ca, identity })
    }

    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }
}

fn read_pem(flag: &str, path: PathBuf) -> Result<PemFile, WorkerError> {
    let pem = std::fs::read(&path)
        .map_err(|e| WorkerError::Config(format!("{flag} {}: cannot read it: {e}", path.display())))?;
    Ok(PemFile { path, pem })
}

fn read_certificates(flag: &str, path: PathBuf) -> Result<PemFile, WorkerError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let file = read_pem(flag, path)?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&file.pem) {
        cert.map_err(|e| {
            WorkerError::Config(format!(
                "{flag} {}: not a valid PEM certificate: {e}",
                file.path.display()
            ))
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(WorkerError::Config(format!(
            "{flag} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            file.path.display()
        )));
    }
    Ok(file)
}

fn read_key(path: PathBuf) -> Result<PemFile, WorkerError> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    let file = read_pem("--tls-key", path)?;
    PrivateKeyDer::from_pem_slice(&file.pem).map_err(|e| {
        WorkerError::Config(format!(
            "--tls-key {}: no usable PEM private key in it: {e}",
            file.path.display()
        ))
    })?;
    Ok(file)
}

/// Everything [`crate::run`] needs; tests build it directly.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub token: Option<String>,
    pub worker_id: String,
    /// `None`: the one kept in the data directory (created at the first start).
    pub instance: Option<String>,
    /// CPU slots offered to trials.
    pub slots: u32,
    /// The devices trials may use, as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs), in
    /// this process's CUDA ordinal order (see [`crate::gpu`]).
    pub gpu_ids: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub storage: StorageOptions,
    /// Where peers reach this worker's collectives; `None`: the address of the interface that
    /// routes to the coordinator, found at start.
    pub advertise_address: Option<IpAddr>,
    pub tls: ClientTls,
    /// Where grpc.health.v1 is served, if anywhere.
    pub health_listen: Option<SocketAddr>,
    /// Where Prometheus `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    pub timings: Timings,
    pub containment: ContainmentMode,
    /// Names (or `PREFIX*`) trials inherit beyond the default allow-list.
    pub trial_env: Vec<String>,
}

impl WorkerConfig {
    /// A config with the defaults a flag-less command line would give, minus host discovery.
    pub fn new(coordinator: impl Into<String>, worker_id: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        WorkerConfig {
            coordinator: coordinator.into(),
            token: None,
            worker_id: worker_id.into(),
            instance: None,
            slots: 1,
            gpu_ids: Vec::new(),
            labels: BTreeMap::new(),
            data_dir: data_dir.into(),
            storage: StorageOptions::default(),
            advertise_address: None,
            tls: ClientTls::default(),
            health_listen: None,
            metrics_listen: None,
            timings: Timings::default(),
            containment: ContainmentMode::Auto,
            trial_env: Vec::new(),
        }
    }
}

impl WorkerConfig {
    /// What `--check-config` prints: every resolved setting, one per line, secrets redacted.
    /// Resolves what the worker would resolve at start (the advertise address) without taking
    /// the data directory or connecting.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "{k:<20} {v}");
        };
        line("coordinator", self.coordinator.clone());
        line("worker id", self.worker_id.clone());
        line(
            "instance",
            match (&self.instance, stored_instance(&self.data_dir)) {
                (Some(i), _) => i.clone(),
                (None, Some(i)) => format!("{i} (kept in {})", self.data_dir.join(INSTANCE_FILE).display()),
                (None, None) => format!(
                    "new, created at start in {}",
                    self.data_dir.join(INSTANCE_FILE).display()
                ),
            },
        );
        line(
            "token",
            if self.token.is_some() {
                "set (redacted)"
            } else {
                "not set"
            }
            .into(),
        );
        line("slots", self.slots.to_string());
        line(
            "gpus",
            if self.gpu_ids.is_empty() {
                "none".into()
            } else {
                self.gpu_ids.join(",")
            },
        );
        line(
            "labels",
            if self.labels.is_empty() {
                "none".into()
            } else {
                self.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            },
        );
        line("data dir", self.data_dir.display().to_string());
        line(
            "s3 endpoint",
            self.storage.s3_endpoint.clone().unwrap_or_else(|| "default".into()),
        );
        line(
            "advertise address",
            match self.advertise_address {
                Some(ip) => ip.to_string(),
                None => match default_advertise_address(&self.coordinator) {
                    Ok(ip) => format!("{ip} (routes to the coordinator)"),
                    Err(e) => format!("not resolved now ({e}); resolved again at start"),
                },
            },
        );
        let https = self.coordinator.starts_with("https://");
        line(
            "tls ca",
            match (&self.tls.ca, https) {
                (Some(ca), _) => ca.path.display().to_string(),
                (None, true) => "system roots".into(),
                (None, false) => "none (plain http)".into(),
            },
        );
        line(
            "tls client cert",
            match &self.tls.identity {
                Some((cert, key)) => format!("{} (key {})", cert.path.display(), key.path.display()),
                None => "none".into(),
            },
        );
        line(
            "health listen",
            self.health_listen.map_or_else(|| "off".into(), |a| a.to_string()),
        );
        line(
            "metrics listen",
            self.metrics_listen
                .map_or_else(|| "off".into(), |a| format!("http://{a}/metrics")),
        );
        line(
            "gpu metrics",
            if self.timings.gpu_sample_every.is_zero() {
                "off".into()
            } else {
                format!(
                    "every {} per attempt with GPUs",
                    humantime::format_duration(self.timings.gpu_sample_every)
                )
            },
        );
        line("containment", format!("{:?}", self.containment).to_lowercase());
        line(
            "collective timeout",
            humantime::format_duration(self.timings.collective_timeout).to_string(),
        );
        line(
            "trial env",
            if self.trial_env.is_empty() {
                "default allow-list".into()
            } else {
                format!("default allow-list + {}", self.trial_env.join(","))
            },
        );
        out
    }
}

/// Deadlines and grace periods; fields so tests can shorten them.
#[derive(Debug, Clone)]
pub struct Timings {
    /// Deadline of every unary call to the coordinator.
    pub rpc_timeout: Duration,
    pub connect_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a trial is stopped.
    pub kill_grace: Duration,
    /// How long output is still read after a trial's processes were killed; one that could not
    /// be killed may hold the pipes open forever.
    pub output_grace: Duration,
    /// How long a shutting-down worker keeps trying to deliver its buffered reports.
    pub shutdown_flush: Duration,
    /// How long an ended attempt keeps retrying the records storage refuses (a full disk, an
    /// outage) before it gives them up; a trial whose metric lines could not be stored then
    /// fails instead of completing with a history that stops short.
    pub store_retry: Duration,
    /// How long one collective call waits on a peer.
    pub collective_timeout: Duration,
    /// How long a rank of a multi-rank attempt waits for the others at rendezvous.
    pub rendezvous_timeout: Duration,
    /// Between two readings of a running attempt's GPUs, reported as its trial's `gpu_util` and
    /// `gpu_mem_mb`; zero turns them off.
    pub gpu_sample_every: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            kill_grace: Duration::from_secs(5),
            output_grace: Duration::from_secs(2),
            shutdown_flush: Duration::from_secs(10),
            store_retry: Duration::from_secs(20),
            collective_timeout: Duration::from_secs(60),
            rendezvous_timeout: Duration::from_secs(300),
            gpu_sample_every: Duration::from_secs(10),
        }
    }
}

fn default_worker_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_resolve() {
        let args = Args::try_parse_from([
            "chorus-worker",
            "--coordinator",
            "http://coord:7070",
            "--worker-id",
            "w1",
            "--slots",
            "4",
            "--gpus",
            "0",
            "--label",
            "zone=a",
            "--label",
            "pool=gpu",
            "--data-dir",
            "/tmp/chorus-w1",
            "--log-format",
            "json",
            "--metrics-listen",
            "127.0.0.1:9464",
            "--gpu-metrics-interval",
            "30s",
        ])
        .unwrap();
        assert_eq!(args.log_format, LogFormat::Json);
        let c = args.into_config().unwrap();
        assert_eq!(c.coordinator, "http://coord:7070");
        assert_eq!(c.worker_id, "w1");
        assert_eq!(c.slots, 4);
        assert!(c.gpu_ids.is_empty());
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.timings.gpu_sample_every, Duration::from_secs(30));
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.labels.get("pool").map(String::as_str), Some("gpu"));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/chorus-w1"));

        assert!(Args::try_parse_from(["chorus-worker", "--label", "novalue"]).is_err());
        assert!(Args::try_parse_from(["chorus-worker", "--slots", "0"]).is_err());
        assert!(Args::try_parse_from(["chorus-worker", "--gpu-metrics-interval", "often"]).is_err());
    }

    #[test]
    fn the_advertise_address_is_the_one_routing_to_the_coordinator() {
        assert_eq!(
            route_to("127.0.0.1:7070".parse().unwrap()).unwrap(),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            default_advertise_address("http://127.0.0.1:7070").unwrap(),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        // A documentation address (TEST-NET-1): routed like any remote host, never reached (a
        // UDP connect sends nothing).
        match route_to("192.0.2.1:7070".parse().unwrap()) {
            Ok(ip) => assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}"),
            Err(e) => eprintln!("skipped: this machine has no route off the host: {e}"),
        }
    }

    #[test]
    fn coordinator_urls_get_a_scheme_and_must_name_a_host() {
        assert_eq!(coordinator_url("coord:7070").unwrap(), "http://coord:7070");
        assert_eq!(coordinator_url(" https://coord:7070 ").unwrap(), "https://coord:7070");
        assert!(coordinator_url("ftp://coord:7070").is_err());
        assert!(coordinator_url("http://").is_err());
        assert_eq!(
            resolve_coordinator("https://127.0.0.1").unwrap(),
            vec!["127.0.0.1:443".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn the_instance_is_created_once_and_kept_in_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(stored_instance(dir.path()), None);
        let first = load_or_create_instance(dir.path()).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(load_or_create_instance(dir.path()).unwrap(), first);
        assert_eq!(stored_instance(dir.path()), Some(first.clone()));
        // An unusable file is replaced, not trusted.
        std::fs::write(dir.path().join(INSTANCE_FILE), " \n").unwrap();
        let second = load_or_create_instance(dir.path()).unwrap();
        assert_ne!(second, first);
        assert!(check_instance("pod uid").is_err());
        assert!(check_instance(&"x".repeat(129)).is_err());
    }

    fn parse(args: &[&str]) -> Result<WorkerConfig, WorkerError> {
        let mut all = vec!["chorus-worker", "--gpus", "0"];
        all.extend_from_slice(args);
        Args::try_parse_from(all).unwrap().into_config()
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = parse(&[
            "--token",
            "  ",
            "--ca",
            "",
            "--tls-cert",
            " ",
            "--tls-key",
            "",
            "--advertise-address",
            "",
            "--instance",
            " ",
            "--health-listen",
            "",
            "--metrics-listen",
            " ",
            "--s3-endpoint",
            "",
        ])
        .unwrap();
        assert_eq!(c.token, None);
        assert!(!c.tls.is_set());
        assert_eq!(c.advertise_address, None);
        assert_eq!(c.instance, None);
        assert_eq!(c.health_listen, None);
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.storage.s3_endpoint, None);
        // A token read from a file often ends in a newline.
        assert_eq!(
            parse(&["--token", "s3cret\n"]).unwrap().token.as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn settings_are_checked_with_precise_messages() {
        let err = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert!(err(&["--advertise-address", "pod"]).contains("--advertise-address \"pod\""));
        assert!(err(&["--health-listen", "7071"]).contains("--health-listen"));
        assert!(err(&["--metrics-listen", "9464"]).contains("--metrics-listen \"9464\""));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let https = ["--coordinator", "https://coord:7070"];
        let e = err(&[https[0], https[1], "--ca", missing]);
        assert!(e.contains("--ca") && e.contains("cannot read it"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = junk.to_str().unwrap();
        let e = err(&[https[0], https[1], "--ca", junk]);
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = err(&[https[0], https[1], "--tls-cert", junk]);
        assert!(e.contains("--tls-cert needs --tls-key"), "{e}");
        let e = err(&[https[0], https[1], "--tls-cert", junk, "--tls-key", junk]);
        assert!(e.contains("--tls-cert") && e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn default_id_and_data_dir_name_the_host_and_process() {
        let c = Args::try_parse_from(["chorus-worker", "--gpus", "0"])
            .unwrap()
            .into_config();
        // CHORUS_WORKER_ID may be set in the environment running the tests.
        let c = c.unwrap();
        if std::env::var_os("CHORUS_WORKER_ID").is_none() {
            assert!(
                c.worker_id.contains(&format!("-{}-", std::process::id())),
                "{}",
                c.worker_id
            );
            assert!(c.data_dir.is_absolute());
            assert!(c.data_dir.ends_with(format!(".chorus/worker-{}", c.worker_id)));
        }
    }
}
