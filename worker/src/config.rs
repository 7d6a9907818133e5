//! The worker's settings: its command line, and the values it resolves from the host when a flag
//! is left out (worker id, CPU slots, GPUs, data directory).

use crate::error::WorkerError;
use crate::runner::containment::ContainmentMode;
use chorus_core::storage::StorageOptions;
use clap::{Parser, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

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
    /// GPUs offered to trials [default: CUDA_VISIBLE_DEVICES if set, else the GPUs `nvidia-smi -L`
    /// lists, else 0].
    #[arg(long, env = "CHORUS_WORKER_GPUS")]
    pub gpus: Option<u32>,
    /// A label the coordinator can match placements on, as key=value; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", env = "CHORUS_WORKER_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Directory for the local checkpoint directories of running attempts
    /// [default: ./.chorus/worker-<id>].
    #[arg(long, env = "CHORUS_WORKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// S3-compatible endpoint for `s3://` storage, e.g. http://127.0.0.1:9000.
    #[arg(long, env = "CHORUS_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Format of the worker's own log on stderr.
    #[arg(long, env = "CHORUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The address other workers reach this one at for data-parallel collectives (and, for
    /// rank 0 of a command trial, MASTER_ADDR). In a Kubernetes pod: the pod IP.
    #[arg(long, env = "CHORUS_ADVERTISE_ADDRESS", default_value = "127.0.0.1")]
    pub advertise_address: std::net::IpAddr,
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

impl Args {
    /// Fills in what the flags left out by looking at the host.
    pub fn into_config(self) -> Result<WorkerConfig, WorkerError> {
        let worker_id = match self.worker_id {
            Some(id) if id.trim().is_empty() => {
                return Err(WorkerError::Config("--worker-id must not be empty".into()));
            }
            Some(id) => id,
            None => default_worker_id(),
        };
        let slots = self
            .slots
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        let discovered = discover_gpus();
        let gpu_ids = match self.gpus {
            None => discovered,
            Some(n) => choose_gpus(&discovered, n),
        };
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| PathBuf::from(".chorus").join(format!("worker-{worker_id}")));
        for pattern in &self.trial_env {
            crate::runner::environment::check_pattern(pattern).map_err(WorkerError::Config)?;
        }
        // Trials get checkpoint paths through their environment and may chdir: hand them absolute ones.
        let data_dir = std::path::absolute(&data_dir).map_err(WorkerError::io(&data_dir))?;
        Ok(WorkerConfig {
            coordinator: self.coordinator,
            token: self.token.filter(|t| !t.is_empty()),
            worker_id,
            slots,
            gpu_ids,
            labels: self.labels.into_iter().collect(),
            data_dir,
            storage: StorageOptions {
                s3_endpoint: self.s3_endpoint.filter(|s| !s.is_empty()),
            },
            advertise_address: self.advertise_address,
            timings: Timings {
                collective_timeout: self.collective_timeout,
                ..Timings::default()
            },
            containment: self.containment,
            trial_env: self.trial_env,
        })
    }
}

/// Everything [`crate::run`] needs; tests build it directly.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub token: Option<String>,
    pub worker_id: String,
    /// CPU slots offered to trials.
    pub slots: u32,
    /// The devices trials may use, as `CUDA_VISIBLE_DEVICES` names them (indices or UUIDs).
    pub gpu_ids: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub storage: StorageOptions,
    /// Where peers reach this worker's collectives.
    pub advertise_address: std::net::IpAddr,
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
            slots: 1,
            gpu_ids: Vec::new(),
            labels: BTreeMap::new(),
            data_dir: data_dir.into(),
            storage: StorageOptions::default(),
            advertise_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            timings: Timings::default(),
            containment: ContainmentMode::Auto,
            trial_env: Vec::new(),
        }
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
    /// How long one collective call waits on a peer.
    pub collective_timeout: Duration,
    /// How long a rank of a multi-rank attempt waits for the others at rendezvous.
    pub rendezvous_timeout: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            kill_grace: Duration::from_secs(5),
            output_grace: Duration::from_secs(2),
            shutdown_flush: Duration::from_secs(10),
            collective_timeout: Duration::from_secs(60),
            rendezvous_timeout: Duration::from_secs(300),
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

/// The GPUs this host offers, as names `CUDA_VISIBLE_DEVICES` accepts.
pub fn discover_gpus() -> Vec<String> {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return parse_visible_devices(&v);
    }
    let out = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => (0..count_nvidia_smi_gpus(&String::from_utf8_lossy(&o.stdout)))
            .map(|i| i.to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// CUDA stops enumerating at the first invalid entry (`-1` is the usual way to hide all GPUs).
fn parse_visible_devices(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .take_while(|d| !d.is_empty() && !d.starts_with('-') && *d != "NoDevFiles")
        .map(str::to_string)
        .collect()
}

/// `nvidia-smi -L` prints one `GPU n: ...` line per device, with MIG instances indented below.
fn count_nvidia_smi_gpus(listing: &str) -> usize {
    listing.lines().filter(|l| l.starts_with("GPU ")).count()
}

/// `--gpus N` names how many; the discovered names are used when there are enough of them.
fn choose_gpus(discovered: &[String], n: u32) -> Vec<String> {
    let n = n as usize;
    if discovered.len() >= n {
        discovered[..n].to_vec()
    } else {
        (0..n).map(|i| i.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_devices_follow_cuda_rules() {
        assert_eq!(parse_visible_devices("0,2"), vec!["0", "2"]);
        assert_eq!(parse_visible_devices(" 3 , GPU-abc"), vec!["3", "GPU-abc"]);
        assert!(parse_visible_devices("").is_empty());
        assert!(parse_visible_devices("-1").is_empty());
        assert_eq!(parse_visible_devices("1,-1,2"), vec!["1"]);
    }

    #[test]
    fn nvidia_smi_listing_counts_gpus_not_mig_instances() {
        let listing = "GPU 0: NVIDIA H100 (UUID: GPU-1)\n  MIG 1g.10gb Device 0: (UUID: MIG-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n";
        assert_eq!(count_nvidia_smi_gpus(listing), 2);
        assert_eq!(count_nvidia_smi_gpus(""), 0);
    }

    #[test]
    fn gpu_flag_takes_discovered_names_when_it_can() {
        let found = vec!["4".to_string(), "5".to_string()];
        assert_eq!(choose_gpus(&found, 1), vec!["4"]);
        assert_eq!(choose_gpus(&found, 3), vec!["0", "1", "2"]);
        assert!(choose_gpus(&found, 0).is_empty());
    }

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
        ])
        .unwrap();
        assert_eq!(args.log_format, LogFormat::Json);
        let c = args.into_config().unwrap();
        assert_eq!(c.coordinator, "http://coord:7070");
        assert_eq!(c.worker_id, "w1");
        assert_eq!(c.slots, 4);
        assert!(c.gpu_ids.is_empty());
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(c.labels.get("pool").map(String::as_str), Some("gpu"));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/chorus-w1"));

        assert!(Args::try_parse_from(["chorus-worker", "--label", "novalue"]).is_err());
        assert!(Args::try_parse_from(["chorus-worker", "--slots", "0"]).is_err());
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
