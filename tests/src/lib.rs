//! `TestCluster`: the real Chorus binaries on ephemeral loopback ports, for end-to-end tests.
//!
//! It starts `chorus-coordinator` and any number of `chorus-worker` processes from the
//! workspace's target directory, runs the `chorus` CLI against them, and injects faults on
//! demand: SIGKILL, SIGSTOP and SIGCONT of any of them, a restart under the same id, a worker
//! cut off from the coordinator ([`proxy::FaultProxy`] between them), a full disk under any of
//! them ([`Tmpfs`]). A local S3 server (`s3s-fs`) can be started beside them. Nothing
//! here talks to anything but 127.0.0.1.

pub mod docker;
pub mod fault;
pub mod proxy;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use fault::{MarkedProcess, marked_processes};
pub use proxy::{FaultProxy, ProxyMode};

/// Directory holding the workspace's binaries: the test executable lives in `target/<profile>/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The JSON a `chorus ARGS` run printed, or an error naming the command and what it said.
pub fn cli_json(args: &[&str], out: Output) -> Result<serde_json::Value> {
    if !out.status.success() {
        bail!(
            "chorus {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "chorus {args:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Polls `cond` on `subject` every `every` until it holds or `timeout` passes; the timeout's
/// error names `what`, the condition's last error and what `context` tells (the logs' tails).
pub fn poll_until<S>(
    subject: &S,
    every: Duration,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut(&S) -> Result<bool>,
    context: impl FnOnce(&S) -> String,
) -> Result<()> {
    let start = Instant::now();
    let mut last_err = None;
    while start.elapsed() < timeout {
        match cond(subject) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(every);
    }
    bail!(
        "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})\n{}",
        context(subject)
    )
}

/// A two-rank data-parallel builtin trial (the text model, one epoch) on the dataset at `data`.
pub fn data_parallel_spec(name: &str, data: &str) -> String {
    format!(
        r#"
name: {name}
metric: {{name: val_accuracy, goal: maximize}}
parameters: {{}}
searcher: {{name: grid}}
max_restarts: 0
resources: {{workers: 2, cpus: 1}}
trial:
  builtin:
    model: {{kind: multimodal, modalities: [text]}}
    data: {data}
    epochs: 1
    batch_size: 16
    log_every: 2
"#
    )
}

/// Path of a workspace binary, or a clear failure if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests",
        p.display()
    );
    p
}

/// Tokens a cluster is started with.
#[derive(Debug, Clone)]
pub struct Auth {
    pub user: String,
    pub worker: String,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub workers: usize,
    pub slots: u32,
    pub lease_ttl: Duration,
    pub auth: Option<Auth>,
    /// Default storage URI; the coordinator's file storage when `None`.
    pub storage: Option<String>,
    /// Extra environment for every process (e.g. S3 credentials).
    pub env: Vec<(String, String)>,
    /// Serve the coordinator's Prometheus metrics on a free port.
    pub metrics: bool,
    /// Create the cluster's directory in this directory instead of the system's temporary one,
    /// and run the coordinator and workers with their working directory in `ROOT/cwd` and
    /// `TMPDIR=ROOT/tmp`, so everything they write lands under `ROOT` where a test can see it.
    pub root: Option<PathBuf>,
    /// Connect each worker to the coordinator through its own [`FaultProxy`], so a test can
    /// cut or stall one worker's link ([`TestCluster::worker_proxy`]).
    pub worker_proxies: bool,
    /// More coordinator flags, e.g. `--allowed-storage`.
    pub coordinator_args: Vec<String>,
    /// The coordinator's data directory; `coordinator/` in the cluster's directory when `None`.
    pub coordinator_dir: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            workers: 2,
            slots: 2,
            lease_ttl: Duration::from_secs(3),
            auth: None,
            storage: None,
            env: Vec::new(),
            metrics: false,
            root: None,
            worker_proxies: false,
            coordinator_args: Vec::new(),
            coordinator_dir: None,
        }
    }
}

struct Proc {
    child: Child,
}

impl Proc {
    fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    fn sigkill(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The exit status of a process that ended by itself, taking it out of `slot`.
fn reap(slot: &mut Option<Proc>) -> Option<ExitStatus> {
    let status = slot.as_mut()?.child.try_wait().ok()??;
    *slot = None;
    Some(status)
}

/// How long a CLI call may take before the harness kills it (a stopped coordinator would
/// otherwise hang a test).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: ClusterConfig,
    coordinator: Option<Proc>,
    pub addr: Option<SocketAddr>,
    /// Where the coordinator serves `/metrics`, when `config.metrics` is set.
    pub metrics_addr: Option<SocketAddr>,
    workers: Vec<Option<Proc>>,
    worker_proxies: Vec<Option<FaultProxy>>,
    /// File systems mounted under `dir`, unmounted (after every process is gone) on drop.
    mounts: Vec<Tmpfs>,
}

impl TestCluster {
    /// Starts a coordinator and `config.workers` workers, and waits until all are registered.
    pub fn start(config: ClusterConfig) -> Result<TestCluster> {
        let mut c = TestCluster::create(config)?;
        c.launch()?;
        Ok(c)
    }

    /// Makes the cluster's directory but starts nothing, so a test can prepare it (mount a
    /// small file system on a data directory, say) before [`TestCluster::launch`].
    pub fn create(config: ClusterConfig) -> Result<TestCluster> {
        let mut b = tempfile::Builder::new();
        b.prefix("chorus-e2e-");
        let dir = match &config.root {
            Some(root) => {
                for d in ["cwd", "tmp"] {
                    std::fs::create_dir_all(root.join(d))?;
                }
                b.tempdir_in(root)?
            }
            None => b.tempdir()?,
        };
        Ok(TestCluster {
            dir,
            config,
            coordinator: None,
            addr: None,
            metrics_addr: None,
            workers: Vec::new(),
            worker_proxies: Vec::new(),
            mounts: Vec::new(),
        })
    }

    /// Starts the coordinator and `config.workers` workers, and waits until all are registered.
    pub fn launch(&mut self) -> Result<()> {
        self.start_coordinator()?;
        for _ in 0..self.config.workers {
            self.start_worker()?;
        }
        let n = self.config.workers;
        self.wait_until(Duration::from_secs(30), "workers registered", |c| {
            Ok(c.alive_workers()? >= n)
        })
    }

    /// Where worker `i` keeps its data (it need not have started yet).
    pub fn worker_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("worker-{i}"))
    }

    /// Mounts a tmpfs of `bytes` on `dir` (inside the cluster's directory), unmounted when the
    /// cluster is dropped. Fails, with the reason, where mounting is not permitted.
    pub fn mount_tmpfs(&mut self, dir: &Path, bytes: u64) -> Result<()> {
        let t = Tmpfs::mount_at(dir, &bytes.to_string())?;
        self.mounts.push(t);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr.expect("coordinator started"))
    }

    /// The coordinator's data directory.
    pub fn coordinator_dir(&self) -> PathBuf {
        self.config
            .coordinator_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("coordinator"))
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File> {
        let path = self.dir.path().join("logs").join(format!("{name}.log"));
        std::fs::create_dir_all(path.parent().unwrap())?;
        Ok(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
    }

    fn base_command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(binary(bin));
        cmd.env_remove("CHORUS_TOKEN")
            .env_remove("CHORUS_WORKER_TOKEN")
            .env("RUST_LOG", "info");
        if let Some(root) = &self.config.root {
            cmd.current_dir(root.join("cwd")).env("TMPDIR", root.join("tmp"));
        }
        for (k, v) in &self.config.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts (or restarts, on the same port and data directory) the coordinator.
    pub fn start_coordinator(&mut self) -> Result<()> {
        let listen = self.addr.map_or("127.0.0.1:0".to_string(), |a| a.to_string());
        let mut cmd = self.base_command("chorus-coordinator");
        cmd.arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(self.coordinator_dir())
            .args(&self.config.coordinator_args)
            .arg("--lease-ttl")
            .arg(format!("{}ms", self.config.lease_ttl.as_millis()))
            .arg("--heartbeat-interval")
            .arg(format!("{}ms", (self.config.lease_ttl.as_millis() / 4).max(50)));
        if let Some(s) = &self.config.storage {
            cmd.arg("--storage").arg(s);
        }
        if self.config.metrics {
            let addr = *self
                .metrics_addr
                .get_or_insert_with(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
            cmd.arg("--metrics-listen").arg(addr.to_string());
        }
        if let Some(a) = &self.config.auth {
            cmd.env("CHORUS_TOKEN", &a.user).env("CHORUS_WORKER_TOKEN", &a.worker);
        }
        cmd.stdout(Stdio::piped()).stderr(self.log_file("coordinator")?);
        let mut child = cmd.spawn().context("spawn chorus-coordinator")?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr: SocketAddr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| {
                format!(
                    "coordinator did not print its address (got {line:?}):\n{}",
                    self.logs_tail()
                )
            })?;
        self.addr = Some(addr);
        self.coordinator = Some(Proc { child });
        wait_for_port(addr, Duration::from_secs(10))?;
        Ok(())
    }

    /// Asks the coordinator to shut down (SIGTERM) and waits for it to exit, killing it after
    /// `timeout`; returns whether it exited by itself.
    pub fn stop_coordinator(&mut self, timeout: Duration) -> bool {
        let Some(mut p) = self.coordinator.take() else {
            return true;
        };
        let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = p.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        p.sigkill();
        false
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(mut p) = self.coordinator.take() {
            p.sigkill();
        }
    }

    /// Freezes the coordinator (SIGSTOP), as a long pause or a hung host would.
    pub fn pause_coordinator(&self) {
        if let Some(p) = &self.coordinator {
            p.signal(Signal::SIGSTOP);
        }
    }

    /// Lets a frozen coordinator go on (SIGCONT).
    pub fn resume_coordinator(&self) {
        if let Some(p) = &self.coordinator {
            p.signal(Signal::SIGCONT);
        }
    }

    /// Whether a coordinator process is held (started and not killed or reaped).
    pub fn coordinator_running(&self) -> bool {
        self.coordinator.is_some()
    }

    /// The coordinator's exit status, if it has exited by itself (it then counts as stopped, so
    /// [`TestCluster::start_coordinator`] may start it again).
    pub fn coordinator_exited(&mut self) -> Option<ExitStatus> {
        reap(&mut self.coordinator)
    }

    /// Starts one more worker; returns its index.
    pub fn start_worker(&mut self) -> Result<usize> {
        let i = self.workers.len();
        self.workers.push(None);
        self.spawn_worker(i)?;
        Ok(i)
    }

    /// Starts worker `i` again (after a kill, a stop or an exit), with the same id and data
    /// directory.
    pub fn restart_worker(&mut self, i: usize) -> Result<()> {
        assert!(
            self.workers.get(i).is_some_and(Option::is_none),
            "worker {i} is not stopped"
        );
        self.spawn_worker(i)
    }

    fn spawn_worker(&mut self, i: usize) -> Result<()> {
        let name = format!("worker-{i}");
        let coordinator = if self.config.worker_proxies {
            if self.worker_proxies.len() <= i {
                self.worker_proxies.resize_with(i + 1, || None);
            }
            let upstream = self.addr.expect("coordinator started");
            let proxy = match self.worker_proxies[i].take() {
                Some(p) => p,
                None => FaultProxy::start(upstream)?,
            };
            let url = format!("http://{}", proxy.addr());
            self.worker_proxies[i] = Some(proxy);
            url
        } else {
            self.url()
        };
        let mut cmd = self.base_command("chorus-worker");
        cmd.arg("--coordinator")
            .arg(coordinator)
            .arg("--worker-id")
            .arg(&name)
            .arg("--slots")
            .arg(self.config.slots.to_string())
            .arg("--gpus")
            .arg("0")
            .arg("--data-dir")
            .arg(self.dir.path().join(&name));
        if let Some(a) = &self.config.auth {
            cmd.env("CHORUS_WORKER_TOKEN", &a.worker);
        }
        cmd.stdout(self.log_file(&name)?).stderr(self.log_file(&name)?);
        let child = cmd.spawn().context("spawn chorus-worker")?;
        self.workers[i] = Some(Proc { child });
        Ok(())
    }

    /// The pid of worker `i`, while it runs.
    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i)?.as_ref().map(|p| p.child.id())
    }

    /// The proxy between worker `i` and the coordinator, with `config.worker_proxies`.
    pub fn worker_proxy(&self, i: usize) -> Option<&FaultProxy> {
        self.worker_proxies.get(i).and_then(Option::as_ref)
    }

    /// Freezes worker `i` (SIGSTOP); its trials go on running but it neither renews its lease
    /// nor reports, as in a long pause or a partition.
    pub fn pause_worker(&self, i: usize) {
        if let Some(p) = self.workers.get(i).and_then(Option::as_ref) {
            p.signal(Signal::SIGSTOP);
        }
    }

    pub fn resume_worker(&self, i: usize) {
        if let Some(p) = self.workers.get(i).and_then(Option::as_ref) {
            p.signal(Signal::SIGCONT);
        }
    }

    /// If worker `i` exited by itself, its exit status.
    pub fn worker_exited(&mut self, i: usize) -> Option<ExitStatus> {
        reap(self.workers.get_mut(i)?)
    }

    /// Whether worker `i`'s process is held (started and not killed or reaped).
    pub fn worker_running(&self, i: usize) -> bool {
        self.workers.get(i).is_some_and(Option::is_some)
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Asks a worker to shut down (SIGTERM) and waits for it to exit.
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(mut p) = self.workers.get_mut(i).and_then(Option::take) {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
            let _ = p.child.wait();
        }
    }

    /// Sends `signal` to worker `i` (SIGSTOP freezes it as a long pause or a partition would).
    pub fn signal_worker(&self, i: usize, signal: Signal) {
        if let Some(p) = self.workers.get(i).and_then(Option::as_ref) {
            let _ = kill(Pid::from_raw(p.child.id() as i32), signal);
        }
    }

    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut p) = self.workers.get_mut(i).and_then(Option::take) {
            p.sigkill();
        }
    }

    /// Runs the CLI with this cluster's address and user token.
    pub fn chorus(&self, args: &[&str]) -> Output {
        self.chorus_with_token(args, self.config.auth.as_ref().map(|a| a.user.as_str()))
    }

    pub fn chorus_with_token(&self, args: &[&str], token: Option<&str>) -> Output {
        let mut cmd = self.base_command("chorus");
        cmd.env("CHORUS_COORDINATOR", self.url())
            .args(args)
            .stdin(Stdio::null());
        if let Some(t) = token {
            cmd.env("CHORUS_TOKEN", t);
        }
        output_within(cmd, CLI_TIMEOUT).expect("run chorus")
    }

    /// Runs the CLI and parses its stdout as JSON, failing on a non-zero exit.
    pub fn chorus_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        cli_json(args, self.chorus(args))
    }

    /// Writes a file into the cluster's directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write test file");
        p
    }

    pub fn alive_workers(&self) -> Result<usize> {
        let v = self.chorus_json(&["worker", "list", "--output", "json"])?;
        Ok(v.as_array().map_or(0, |a| {
            a.iter().filter(|w| w["alive"].as_bool().unwrap_or(false)).count()
        }))
    }

    /// Polls `cond` every 100 ms until it holds or `timeout` passes.
    pub fn wait_until(&self, timeout: Duration, what: &str, cond: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
        poll_until(self, Duration::from_millis(100), timeout, what, cond, Self::logs_tail)
    }

    /// The last lines of every process log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let dir = self.dir.path().join("logs");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(15)..];
                out.push_str(&format!(
                    "--- {} ---\n{}\n",
                    e.file_name().to_string_lossy(),
                    tail.join("\n")
                ));
            }
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for p in self.workers.iter_mut().flatten() {
            p.sigkill();
        }
        // A killed worker's guardian kills what its trials left, from records in the worker's
        // data directory, and holds the directory's lock until it is done: the directory must
        // not go before that.
        for i in 0..self.workers.len() {
            wait_unlocked(
                &self.dir.path().join(format!("worker-{i}/worker.lock")),
                Duration::from_secs(15),
            );
        }
        self.kill_coordinator();
        self.worker_proxies.clear();
        if std::env::var_os("CHORUS_KEEP_TEST_DIRS").is_some() {
            let path = self.dir.path().to_path_buf();
            eprintln!("keeping {}", path.display());
            std::mem::forget(std::mem::take(&mut self.mounts));
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")));
        }
        // Unmounted before the directory that holds the mount points is removed.
        self.mounts.clear();
    }
}

/// Runs `cmd` to its end like [`Command::output`], but kills it after `timeout`; the output
/// then holds what it printed, and its status says it was killed.
pub fn output_within(mut cmd: Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn wait_unlocked(lock: &Path, timeout: Duration) {
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(lock) else {
        return;
    };
    let start = Instant::now();
    while matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)) && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr} after {timeout:?}")
}

/// Fetches `http://addr{path}` with a plain HTTP/1.0 request and returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}

/// A free loopback port (racy by nature, fine for a server we start right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A size-limited tmpfs: a disk that fills up. Unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
    /// The fresh directory it is mounted on, removed after the unmount; `None` when mounted
    /// on a directory of the caller's.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"24m"`) on a fresh directory; the error says why when
    /// this process may not mount one (it must run as root, or with CAP_SYS_ADMIN).
    pub fn mount(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::Builder::new().prefix("chorus-tmpfs-").tempdir()?;
        let mut t = Tmpfs::mount_at(dir.path(), size)?;
        t._dir = Some(dir);
        Ok(t)
    }

    /// Mounts a tmpfs of `size` on `path` (created if missing).
    pub fn mount_at(path: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .context("run mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount a tmpfs on {} ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
            _dir: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes still free on the filesystem.
    pub fn free_bytes(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
        s.blocks_available() as u64 * s.fragment_size() as u64
    }

    /// Fills the filesystem to its last byte with a file `name`, and returns the file's path:
    /// remove it to give the space back.
    pub fn fill(&self, name: &str) -> Result<PathBuf> {
        fill_disk(self.path(), name)
    }
}

/// Fills the filesystem that holds `dir` to its last byte with a file `name` there, and returns
/// the file's path: remove it to give the space back.
pub fn fill_disk(dir: &Path, name: &str) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut size = chunk.len();
    loop {
        match f.write(&chunk[..size]) {
            Ok(n) if n > 0 => {}
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                if size == 1 {
                    break;
                }
                size /= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(path)
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a process still holding a file there must not keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A real S3 server (`s3s-fs`) on loopback, serving a temporary directory.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub dir: tempfile::TempDir,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Server {
    /// Starts `s3s-fs` with one bucket, serving a new directory in the system's temporary one.
    pub fn start(bucket: &str) -> Result<S3Server> {
        S3Server::start_in(bucket, &std::env::temp_dir())
    }

    /// Starts `s3s-fs` with one bucket, serving a new directory inside `parent`.
    pub fn start_in(bucket: &str, parent: &Path) -> Result<S3Server> {
        let bin = which_s3s_fs().context("s3s-fs is not installed: run scripts/setup.sh")?;
        let dir = tempfile::Builder::new().prefix("chorus-s3-").tempdir_in(parent)?;
        std::fs::create_dir_all(dir.path().join(bucket))?;
        let port = free_port();
        let (access_key, secret_key) = ("chorus-test".to_string(), "chorus-test-secret".to_string());
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn s3s-fs")?;
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_for_port(format!("127.0.0.1:{port}").parse()?, Duration::from_secs(10))?;
        Ok(S3Server {
            child,
            endpoint,
            dir,
            access_key,
            secret_key,
        })
    }

    /// Environment a Chorus process needs to use this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("CHORUS_S3_ENDPOINT".into(), self.endpoint.clone()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which_s3s_fs() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join("s3s-fs")).find(|p| p.exists())
}
