//! `DockerCluster`: the Chorus container images on a private Docker network, for end-to-end
//! tests of what loopback cannot show (real addresses, partitions, node loss).
//!
//! It drives the `docker` CLI (no client library, no mocks): a bridge network of its own with a
//! random name and subnet, where every container has a fixed address (so the address a worker
//! advertises is known before it starts); a named volume mounted at `/shared` in every container,
//! whose `/shared/storage` is the experiments' file storage; a named volume for the coordinator's
//! store, so a coordinator container replaced by a fresh one finds its records; the coordinator
//! and N worker containers, with tokens on. Faults are Docker's own: `docker network disconnect`
//! (a partition that leaves the processes running), `docker kill` (node loss: SIGKILL to the
//! container's init, which takes every process with it) and `docker stop` (SIGTERM, then SIGKILL
//! after a grace period).
//!
//! The images (`chorus/coordinator:test`, `chorus/worker:test`) come from `scripts/images.sh`,
//! run once per test process under a lock in `target/`; docker's layer cache keeps it quick when
//! the binaries did not change. Where `docker info` fails the cluster is not started and the test
//! is skipped with the reason; where docker works but the images cannot be built, that is an
//! error. Dropping the cluster removes every container, the network and the volumes, and a
//! cluster dropped by a failing test first prints the tail of every container's log.

use crate::{Auth, bin_dir, binary, output_within};
use anyhow::{Context, Result, bail};
use rand::Rng;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Tag of the images the harness builds and runs, unless `CHORUS_TEST_IMAGE_TAG` names another
/// (two checkouts on one docker daemon each need their own, or they rebuild over each other's).
pub const IMAGE_TAG: &str = "test";
/// Port the coordinator serves on inside its container (the image's `CHORUS_LISTEN`).
pub const COORDINATOR_PORT: u16 = 7070;
/// Where the shared volume is mounted in every container.
pub const SHARED: &str = "/shared";
/// The experiments' default storage, on the shared volume.
pub const STORAGE_URI: &str = "file:///shared/storage";
/// The user the images run as; files on the shared volume must be its.
const CHORUS_UID: &str = "10001:10001";
/// Labels on everything the harness creates, so leftovers of a killed test process can be found.
const LABEL: &str = "dev.chorus.e2e";
const LABEL_PID: &str = "dev.chorus.e2e.pid";
/// How long one docker command may take before the harness gives up on it.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the TLS files are mounted in the containers.
const TLS_DIR: &str = "/tls";

#[derive(Debug, Clone)]
pub struct DockerConfig {
    pub workers: usize,
    /// CPU slots of each worker.
    pub slots: u32,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Serve gRPC over TLS: a CA and a server certificate for the coordinator's address are
    /// made for the cluster, and workers and the CLI trust that CA (`CHORUS_CA`) and use
    /// `https://`. Without it the coordinator is told it may serve plaintext off loopback
    /// (`--insecure`).
    pub tls: bool,
    /// More environment for every worker (e.g. `CHORUS_COLLECTIVE_TIMEOUT`).
    pub worker_env: Vec<(String, String)>,
    /// More coordinator flags.
    pub coordinator_args: Vec<String>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            workers: 2,
            slots: 1,
            // Longer than the loopback tests' 3 s: containers on a small, busy machine can be
            // starved of CPU for a while, and a test that is not about leases should not see one
            // lapse.
            lease_ttl: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            tls: false,
            worker_env: Vec::new(),
            coordinator_args: Vec::new(),
        }
    }
}

/// The CA and the coordinator's certificate, in a host directory mounted into the containers.
struct Tls {
    dir: tempfile::TempDir,
}

impl Tls {
    /// A CA, and a server certificate it signs for the coordinator's address and name.
    fn generate(ip: Ipv4Addr, names: &[&str]) -> Result<Tls> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "chorus e2e CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        sans.push(ip.to_string());
        let mut server = CertificateParams::new(sans)?;
        server.distinguished_name.push(DnType::CommonName, "chorus-coordinator");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;

        let dir = tempfile::Builder::new().prefix("chorus-e2e-tls-").tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem())?;
        std::fs::write(dir.path().join("server.pem"), server_cert.pem())?;
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem())?;
        // The containers run as another user than the test: it must be able to read them. A
        // throwaway key of a throwaway cluster.
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o644))?;
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(Tls { dir })
    }
}

pub struct DockerCluster {
    pub config: DockerConfig,
    /// Prefix of every name this cluster gives docker (network, volumes, containers).
    pub name: String,
    /// The first three octets of the network's /24.
    subnet: [u8; 3],
    auth: Auth,
    tls: Option<Tls>,
    /// Scratch files on the host (specs).
    pub dir: tempfile::TempDir,
    /// The container that holds the shared volume for reading and copying its files.
    files: String,
}

/// Why docker cannot be used here, if it cannot.
pub fn docker_unavailable() -> Option<String> {
    match output_within(
        {
            let mut c = Command::new("docker");
            c.args(["info", "--format", "{{.ServerVersion}}"]).stdin(Stdio::null());
            c
        },
        Duration::from_secs(30),
    ) {
        Err(e) => Some(format!("cannot run docker: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "docker info failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// Runs `docker ARGS` to its end (killed after [`DOCKER_TIMEOUT`]).
pub fn docker(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("docker");
    cmd.args(args).stdin(Stdio::null());
    output_within(cmd, DOCKER_TIMEOUT).with_context(|| format!("run docker {args:?}"))
}

/// Runs `docker ARGS` and returns its stdout, failing with its stderr on a non-zero exit.
pub fn docker_ok(args: &[&str]) -> Result<String> {
    let out = docker(args)?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The tag of the images: `CHORUS_TEST_IMAGE_TAG`, else [`IMAGE_TAG`].
pub fn image_tag() -> String {
    std::env::var("CHORUS_TEST_IMAGE_TAG")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| IMAGE_TAG.to_string())
}

pub fn coordinator_image() -> String {
    format!("chorus/coordinator:{}", image_tag())
}

pub fn worker_image() -> String {
    format!("chorus/worker:{}", image_tag())
}

/// The workspace's root (the images script builds from it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Builds (or finds up to date) the images, once per process. Several test processes at once
/// take turns on a lock in `target/`; docker's cache makes every run after the first quick.
pub fn ensure_images() -> Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_images().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_images() -> Result<()> {
    let bins = bin_dir();
    // target/<profile>: the binaries the images are made of are the ones these tests were
    // built with.
    let profile = match bins.file_name().and_then(|n| n.to_str()) {
        Some("release") => "release",
        _ => "debug",
    };
    let target = bins.parent().context("target directory")?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join("chorus-e2e-images.lock"))
        .context("open the images lock")?;
    lock.lock().context("lock the images lock")?;
    let script = workspace_root().join("scripts/images.sh");
    if !script.exists() {
        bail!(
            "{} is missing: it builds the images the container tests run",
            script.display()
        );
    }
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    let tag = image_tag();
    cmd.arg(&script)
        .args(["--profile", profile, "--tag", &tag])
        .current_dir(workspace_root())
        .stdin(Stdio::null());
    // A first build (base image, libtorch libraries) takes minutes on a small machine.
    let out = output_within(cmd, Duration::from_secs(1800)).context("run scripts/images.sh")?;
    drop(lock);
    if !out.status.success() {
        bail!(
            "scripts/images.sh --profile {profile} --tag {tag} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &coordinator_image(),
        &worker_image(),
    ])
    .context("the images script ran but the images are not there")?;
    eprintln!("container images ready in {:.1?}", started.elapsed());
    Ok(())
}

/// Removes what clusters of test processes that no longer run left behind (a test process
/// killed before its clusters were dropped).
fn remove_leftovers() {
    let alive = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists())
    };
    let label = format!("label={LABEL}");
    // `key` is what names one in its listing: volumes have no ID.
    let dead = |kind: &[&str], key: &str| -> Vec<String> {
        let format = format!("{{{{.{key}}}}} {{{{.Label \"{LABEL_PID}\"}}}}");
        let mut args = kind.to_vec();
        args.extend(["--filter", &label, "--format", &format]);
        docker_ok(&args)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, pid)| !alive(pid))
            .map(|(id, _)| id.to_string())
            .collect()
    };
    let containers = dead(&["ps", "-a"], "ID");
    if !containers.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(containers.iter().map(String::as_str));
        let _ = docker(&args);
    }
    for id in dead(&["network", "ls"], "ID") {
        let _ = docker(&["network", "rm", &id]);
    }
    for id in dead(&["volume", "ls"], "Name") {
        let _ = docker(&["volume", "rm", "-f", &id]);
    }
}

impl DockerCluster {
    /// Starts the cluster: network, volumes, the coordinator and `config.workers` workers, and
    /// waits until every worker is registered. `Ok(None)`, after printing the reason, where
    /// docker is not usable here (the caller skips); an error where docker works but the images
    /// cannot be built or the cluster cannot start.
    pub fn start(config: DockerConfig) -> Result<Option<DockerCluster>> {
        if let Some(why) = docker_unavailable() {
            eprintln!("skipped: docker is not usable here: {why}");
            return Ok(None);
        }
        ensure_images()?;
        // Not while clusters are being kept for a look: earlier kept ones are there on purpose.
        static SWEPT: OnceLock<()> = OnceLock::new();
        if std::env::var_os("CHORUS_KEEP_TEST_DIRS").is_none() {
            SWEPT.get_or_init(remove_leftovers);
        }

        let mut rng = rand::rng();
        let name = format!("chorus-e2e-{:08x}", rng.random::<u32>());
        let mut c = DockerCluster {
            config,
            subnet: [0; 3],
            auth: Auth {
                user: format!("user-{:016x}", rng.random::<u64>()),
                worker: format!("worker-{:016x}", rng.random::<u64>()),
            },
            tls: None,
            dir: tempfile::Builder::new().prefix("chorus-e2e-docker-").tempdir()?,
            files: format!("{name}-files"),
            name,
        };
        c.create_network()?;
        for v in [c.shared_volume(), c.coordinator_volume()] {
            docker_ok(&["volume", "create", "--label", LABEL, "--label", &c.pid_label(), &v])?;
        }
        // Fresh volumes are root's; the images run as 10001.
        docker_ok(&[
            "run",
            "--rm",
            "--label",
            LABEL,
            "--label",
            &c.pid_label(),
            "--user",
            "0",
            "--network",
            "none",
            "--entrypoint",
            "chown",
            "-v",
            &format!("{}:{SHARED}", c.shared_volume()),
            "-v",
            &format!("{}:/var/lib/chorus", c.coordinator_volume()),
            &coordinator_image(),
            CHORUS_UID,
            SHARED,
            "/var/lib/chorus",
        ])
        .context("give the volumes to the images' user")?;
        // A container that only holds the shared volume, to read and copy its files while the
        // others come and go.
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &c.files,
            "--label",
            LABEL,
            "--label",
            &c.pid_label(),
            "--label",
            &c.cluster_label(),
            "--network",
            "none",
            "--no-healthcheck",
            "--entrypoint",
            "sleep",
            "-v",
            &format!("{}:{SHARED}", c.shared_volume()),
            &coordinator_image(),
            "infinity",
        ])?;
        docker_ok(&["exec", &c.files, "mkdir", "-p", &format!("{SHARED}/storage")])?;
        if c.config.tls {
            c.tls = Some(Tls::generate(c.coordinator_ip(), &["coordinator"])?);
        }
        c.run_coordinator()?;
        for i in 0..c.config.workers {
            c.run_worker(i)?;
        }
        let n = c.config.workers;
        c.wait_until(Duration::from_secs(90), "every worker registered", |c| {
            Ok(c.alive_workers()? >= n)
        })?;
        Ok(Some(c))
    }

    fn pid_label(&self) -> String {
        format!("{LABEL_PID}={}", std::process::id())
    }

    fn cluster_label(&self) -> String {
        format!("{LABEL}.cluster={}", self.name)
    }

    /// The network's name.
    pub fn network(&self) -> &str {
        &self.name
    }

    pub fn shared_volume(&self) -> String {
        format!("{}-shared", self.name)
    }

    pub fn coordinator_volume(&self) -> String {
        format!("{}-coordinator", self.name)
    }

    fn create_network(&mut self) -> Result<()> {
        let mut rng = rand::rng();
        let mut last = None;
        // A /24 in 10.200.0.0-10.254.255.0: far from docker's default pools; drawn again when
        // it overlaps a network that exists.
        for _ in 0..10 {
            let subnet = [10, rng.random_range(200..=254), rng.random::<u8>()];
            let out = docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--label",
                LABEL,
                "--label",
                &self.pid_label(),
                "--subnet",
                &format!("{}.{}.{}.0/24", subnet[0], subnet[1], subnet[2]),
                "--gateway",
                &format!("{}.{}.{}.1", subnet[0], subnet[1], subnet[2]),
                &self.name,
            ])?;
            if out.status.success() {
                self.subnet = subnet;
                return Ok(());
            }
            last = Some(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        bail!("cannot create a docker network: {last:?}")
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host)
    }

    pub fn coordinator_ip(&self) -> Ipv4Addr {
        self.ip(10)
    }

    /// The address of worker `i` (`w{i}`), which it advertises.
    pub fn worker_ip(&self, i: usize) -> Ipv4Addr {
        self.ip(20 + u8::try_from(i).expect("fewer than 200 workers"))
    }

    /// The id of worker `i`, also its container's short name.
    pub fn worker_id(i: usize) -> String {
        format!("w{i}")
    }

    /// The docker name of a container of this cluster: `coordinator` or a worker id (`w0`).
    pub fn container(&self, short: &str) -> String {
        format!("{}-{short}", self.name)
    }

    /// The address of a container of this cluster by its short name.
    pub fn ip_of(&self, short: &str) -> Ipv4Addr {
        if short == "coordinator" {
            return self.coordinator_ip();
        }
        let i: usize = short
            .strip_prefix('w')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no container {short} in the cluster"));
        self.worker_ip(i)
    }

    /// The coordinator's URL, from the host or any container on the network.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{COORDINATOR_PORT}", self.coordinator_ip())
    }

    /// `docker run` arguments every container of the cluster shares, long-running or one-off:
    /// its network, labels (for the clean-up), the shared volume and the TLS files.
    fn attached(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "--network",
            &self.name,
            "--label",
            LABEL,
            "--label",
            &self.pid_label(),
            "--label",
            &self.cluster_label(),
            // Not used by the tests, and a probe every 10 s is load a small machine can do without.
            "--no-healthcheck",
            "-v",
            &format!("{}:{SHARED}", self.shared_volume()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(t) = &self.tls {
            a.extend(["-v".into(), format!("{}:{TLS_DIR}:ro", t.dir.path().display())]);
        }
        a
    }

    /// `docker run` arguments of one of the cluster's long-running containers.
    fn run_args(&self, short: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "-d",
            "--name",
            &self.container(short),
            "--hostname",
            short,
            "--ip",
            &self.ip_of(short).to_string(),
            "-e",
            "RUST_LOG=info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(self.attached());
        a
    }

    fn run_coordinator(&self) -> Result<()> {
        let mut a = self.run_args("coordinator");
        a.extend([
            "--network-alias".into(),
            "coordinator".into(),
            "-v".into(),
            format!("{}:/var/lib/chorus", self.coordinator_volume()),
            "-e".into(),
            format!("CHORUS_TOKEN={}", self.auth.user),
            "-e".into(),
            format!("CHORUS_WORKER_TOKEN={}", self.auth.worker),
            coordinator_image(),
            "--listen".into(),
            format!("0.0.0.0:{COORDINATOR_PORT}"),
            "--storage".into(),
            STORAGE_URI.into(),
            "--lease-ttl".into(),
            format!("{}ms", self.config.lease_ttl.as_millis()),
            "--heartbeat-interval".into(),
            format!("{}ms", self.config.heartbeat_interval.as_millis()),
        ]);
        if self.tls.is_some() {
            a.extend([
                "--tls-cert".into(),
                format!("{TLS_DIR}/server.pem"),
                "--tls-key".into(),
                format!("{TLS_DIR}/server.key"),
            ]);
        } else {
            a.push("--insecure".into());
        }
        a.extend(self.config.coordinator_args.iter().cloned());
        docker_ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).context("start the coordinator container")?;
        self.wait_until(Duration::from_secs(60), "the coordinator to serve", |c| {
            if !c.running("coordinator")? {
                bail!("the coordinator container exited:\n{}", c.logs("coordinator"));
            }
            Ok(c.chorus_json(&["worker", "list", "--output", "json"]).is_ok())
        })
    }

    fn run_worker(&self, i: usize) -> Result<()> {
        let id = Self::worker_id(i);
        let mut a = self.run_args(&id);
        a.extend(["-e".into(), format!("CHORUS_WORKER_TOKEN={}", self.auth.worker)]);
        if self.tls.is_some() {
            a.extend(["-e".into(), format!("CHORUS_CA={TLS_DIR}/ca.pem")]);
        }
        for (k, v) in &self.config.worker_env {
            a.extend(["-e".into(), format!("{k}={v}")]);
        }
        a.extend([
            worker_image(),
            "--coordinator".into(),
            self.url(),
            "--worker-id".into(),
            id.clone(),
            "--advertise-address".into(),
            self.worker_ip(i).to_string(),
            "--slots".into(),
            self.config.slots.to_string(),
            "--gpus".into(),
            "0".into(),
        ]);
        docker_ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .with_context(|| format!("start worker container {id}"))?;
        Ok(())
    }

    /// Replaces the coordinator: SIGKILL to its container, which is removed, and a fresh
    /// container on the same store volume and address; returns once it serves.
    pub fn restart_coordinator(&self) -> Result<()> {
        self.kill("coordinator")?;
        docker_ok(&["rm", "-f", "-v", &self.container("coordinator")])?;
        self.run_coordinator()
    }

    /// `docker kill`: SIGKILL to the container's init, and so to every process in it.
    pub fn kill(&self, short: &str) -> Result<()> {
        docker_ok(&["kill", &self.container(short)]).map(drop)
    }

    /// `docker stop -t GRACE`: SIGTERM, then SIGKILL once `grace` has passed. Returns the
    /// container's exit code (137 if it had to be killed).
    pub fn stop(&self, short: &str, grace: Duration) -> Result<i64> {
        docker_ok(&["stop", "-t", &grace.as_secs().to_string(), &self.container(short)])?;
        let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.container(short)])?;
        code.trim().parse().context("exit code")
    }

    /// `docker start`: a killed or stopped container runs again, with its own files, name and
    /// address.
    pub fn start_container(&self, short: &str) -> Result<()> {
        docker_ok(&["start", &self.container(short)]).map(drop)
    }

    /// Whether a container of the cluster is running.
    pub fn running(&self, short: &str) -> Result<bool> {
        let s = docker_ok(&["inspect", "--format", "{{.State.Running}}", &self.container(short)])?;
        Ok(s.trim() == "true")
    }

    /// Cuts a container off the cluster's network (its processes go on running).
    pub fn disconnect(&self, short: &str) -> Result<()> {
        docker_ok(&["network", "disconnect", &self.name, &self.container(short)]).map(drop)
    }

    /// Puts a container back on the network, at its address.
    pub fn connect(&self, short: &str) -> Result<()> {
        docker_ok(&[
            "network",
            "connect",
            "--ip",
            &self.ip_of(short).to_string(),
            &self.name,
            &self.container(short),
        ])
        .map(drop)
    }

    /// A container's output (stdout and stderr), or why it cannot be had.
    pub fn logs(&self, short: &str) -> String {
        match docker(&["logs", &self.container(short)]) {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(no logs: {e:#})"),
        }
    }

    /// `docker exec` of a command in a running container.
    pub fn exec(&self, short: &str, cmd: &[&str]) -> Result<Output> {
        let c = self.container(short);
        let mut args = vec!["exec", c.as_str()];
        args.extend_from_slice(cmd);
        docker(&args)
    }

    /// Runs the CLI on the host against this cluster, with the user token.
    pub fn chorus(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("chorus"));
        cmd.env_remove("CHORUS_TOKEN")
            .env_remove("CHORUS_CA")
            .env("CHORUS_COORDINATOR", self.url())
            .env("CHORUS_TOKEN", &self.auth.user)
            .args(args)
            .stdin(Stdio::null());
        if let Some(t) = &self.tls {
            cmd.env("CHORUS_CA", t.dir.path().join("ca.pem"));
        }
        output_within(cmd, crate::CLI_TIMEOUT).expect("run chorus")
    }

    /// Runs the CLI on the host and parses its stdout as JSON, failing on a non-zero exit.
    pub fn chorus_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        crate::cli_json(args, self.chorus(args))
    }

    /// Runs the CLI in a one-off container on the cluster's network (the coordinator image),
    /// with the shared volume mounted at [`SHARED`].
    pub fn chorus_in_container(&self, args: &[&str]) -> Result<Output> {
        let mut a: Vec<String> = vec!["run".into(), "--rm".into()];
        a.extend(self.attached());
        a.extend([
            "-e".into(),
            format!("CHORUS_COORDINATOR={}", self.url()),
            "-e".into(),
            format!("CHORUS_TOKEN={}", self.auth.user),
        ]);
        if self.tls.is_some() {
            a.extend(["-e".into(), format!("CHORUS_CA={TLS_DIR}/ca.pem")]);
        }
        a.extend(["--entrypoint".into(), "chorus".into(), coordinator_image()]);
        a.extend(args.iter().map(|s| s.to_string()));
        docker(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// [`DockerCluster::chorus_in_container`], its stdout parsed as JSON.
    pub fn chorus_json_in_container(&self, args: &[&str]) -> Result<serde_json::Value> {
        crate::cli_json(args, self.chorus_in_container(args)?)
    }

    /// Writes a file into the host scratch directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write test file");
        p
    }

    /// A file of the shared volume (`path` relative to [`SHARED`]); `None` if it does not exist.
    pub fn read_shared(&self, path: &str) -> Result<Option<String>> {
        let full = format!("{SHARED}/{path}");
        // Exit 3: there is no such file (a failure of `cat` itself exits 1).
        let out = docker(&[
            "exec",
            &self.files,
            "sh",
            "-c",
            r#"[ -e "$1" ] || exit 3; cat "$1""#,
            "sh",
            &full,
        ])?;
        match out.status.code() {
            Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
            Some(3) => Ok(None),
            _ => bail!(
                "read {full} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }

    /// Copies the shared volume's `path` (a file or a directory) to `dest` on the host.
    pub fn copy_shared(&self, path: &str, dest: &Path) -> Result<()> {
        docker_ok(&[
            "cp",
            &format!("{}:{SHARED}/{path}", self.files),
            &dest.display().to_string(),
        ])
        .map(drop)
    }

    /// A copy, taken now, of the experiments' storage: a host directory that opens as the same
    /// storage the containers use ([`StorageCopy::open`]).
    pub fn storage_copy(&self) -> Result<StorageCopy> {
        let dir = tempfile::Builder::new().prefix("chorus-e2e-storage-").tempdir()?;
        let dest = dir.path().join("storage");
        self.copy_shared("storage", &dest)?;
        Ok(StorageCopy { dir })
    }

    pub fn alive_workers(&self) -> Result<usize> {
        let v = self.chorus_json(&["worker", "list", "--output", "json"])?;
        Ok(v.as_array().map_or(0, |a| {
            a.iter().filter(|w| w["alive"].as_bool().unwrap_or(false)).count()
        }))
    }

    /// Polls `cond` every 250 ms until it holds or `timeout` passes; the error carries the last
    /// lines of every container's log.
    pub fn wait_until(&self, timeout: Duration, what: &str, cond: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
        crate::poll_until(self, Duration::from_millis(250), timeout, what, cond, |c| {
            c.logs_tail(40)
        })
    }

    /// Short names of the cluster's coordinator and worker containers.
    pub fn containers(&self) -> Vec<String> {
        let mut v = vec!["coordinator".to_string()];
        v.extend((0..self.config.workers).map(Self::worker_id));
        v
    }

    /// The last `n` lines of every container's log.
    pub fn logs_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for short in self.containers() {
            let text = self.logs(&short);
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- {short} ---\n{}\n",
                lines[lines.len().saturating_sub(n)..].join("\n")
            ));
        }
        out
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("container logs of {}:\n{}", self.name, self.logs_tail(80));
        }
        if std::env::var_os("CHORUS_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping the containers, network and volumes of {}", self.name);
            return;
        }
        let label = format!("label={}", self.cluster_label());
        let mut ids: Vec<String> = docker_ok(&["ps", "-aq", "--filter", &label])
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        // By name too: a container whose `docker run` failed half-way may lack nothing but
        // still hold the network.
        ids.extend(self.containers().iter().map(|s| self.container(s)));
        ids.push(self.files.clone());
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids.iter().map(String::as_str));
        let _ = docker(&args);
        let _ = docker(&["network", "rm", &self.name]);
        let _ = docker(&["volume", "rm", "-f", &self.shared_volume(), &self.coordinator_volume()]);
    }
}

/// A host copy of the experiments' storage (see [`DockerCluster::storage_copy`]).
pub struct StorageCopy {
    dir: tempfile::TempDir,
}

impl StorageCopy {
    /// The copy's root: what `/shared/storage` held.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The directory of the copy that holds what the containers know as `uri` (a `file://` URI
    /// under [`STORAGE_URI`]).
    pub fn dir_of(&self, uri: &str) -> Result<PathBuf> {
        let rest = uri
            .strip_prefix(STORAGE_URI)
            .with_context(|| format!("{uri} is not under {STORAGE_URI}"))?;
        Ok(self.path().join(rest.trim_start_matches('/')))
    }

    /// Opens, in the copy, the storage the containers know as `uri` (a `file://` URI under
    /// [`STORAGE_URI`], e.g. an experiment's `storage`): the same keys as theirs.
    pub fn open(&self, uri: &str) -> Result<chorus_core::storage::Storage> {
        let uri = chorus_core::storage::StorageUri::from_dir(&self.dir_of(uri)?)?;
        Ok(chorus_core::storage::open(
            &uri,
            &chorus_core::storage::StorageOptions::default(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CA signs a server certificate valid for the coordinator's address and name (checked
    /// by `openssl verify` where it is installed), and the containers' user can read the files.
    #[test]
    fn the_tls_files_chain_to_their_ca_for_the_coordinators_address() {
        let ip = Ipv4Addr::new(10, 200, 1, 10);
        let tls = Tls::generate(ip, &["coordinator"]).unwrap();
        let dir = tls.dir.path();
        for f in ["ca.pem", "server.pem"] {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{f}: {text}");
        }
        let key = std::fs::read_to_string(dir.join("server.key")).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("server.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o004, 0o004, "readable by the containers' user: {mode:o}");
        let verify = |extra: &[&str]| {
            Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(dir.join("ca.pem"))
                .args(["-purpose", "sslserver"])
                .args(extra)
                .arg(dir.join("server.pem"))
                .output()
        };
        let Ok(ok) = verify(&["-verify_ip", "10.200.1.10"]) else {
            eprintln!("openssl is not installed: the chain was not verified");
            return;
        };
        assert!(ok.status.success(), "{ok:?}");
        let name = verify(&["-verify_hostname", "coordinator"]).unwrap();
        assert!(name.status.success(), "{name:?}");
        let wrong = verify(&["-verify_ip", "10.200.1.11"]).unwrap();
        assert!(!wrong.status.success(), "another address must not verify: {wrong:?}");
    }
}
