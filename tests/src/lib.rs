//! `TestCluster`: the real Chorus binaries on ephemeral loopback ports, for end-to-end tests.
//!
//! It starts `chorus-coordinator` and any number of `chorus-worker` processes from the
//! workspace's target directory, runs the `chorus` CLI against them, and kills any of them
//! with SIGKILL on demand. A local S3 server (`s3s-fs`) can be started beside them. Nothing
//! here talks to anything but 127.0.0.1.

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's binaries: the test executable lives in `target/<profile>/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
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
            coordinator_args: Vec::new(),
            coordinator_dir: None,
        }
    }
}

struct Proc {
    child: Child,
}

impl Proc {
    fn sigkill(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub config: ClusterConfig,
    coordinator: Option<Proc>,
    pub addr: Option<SocketAddr>,
    /// Where the coordinator serves `/metrics`, when `config.metrics` is set.
    pub metrics_addr: Option<SocketAddr>,
    workers: Vec<Option<Proc>>,
}

impl TestCluster {
    /// Starts a coordinator and `config.workers` workers, and waits until all are registered.
    pub fn start(config: ClusterConfig) -> Result<TestCluster> {
        let mut c = TestCluster {
            dir: tempfile::Builder::new().prefix("chorus-e2e-").tempdir()?,
            config,
            coordinator: None,
            addr: None,
            metrics_addr: None,
            workers: Vec::new(),
        };
        c.start_coordinator()?;
        for _ in 0..c.config.workers {
            c.start_worker()?;
        }
        let n = c.config.workers;
        c.wait_until(Duration::from_secs(30), "workers registered", |c| {
            Ok(c.alive_workers()? >= n)
        })?;
        Ok(c)
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

    /// The coordinator's exit status, if it has exited.
    pub fn coordinator_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.coordinator
            .as_mut()
            .and_then(|p| p.child.try_wait().ok().flatten())
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

    /// Starts one more worker; returns its index.
    pub fn start_worker(&mut self) -> Result<usize> {
        let i = self.workers.len();
        let child = self.spawn_worker(i)?;
        self.workers.push(Some(Proc { child }));
        Ok(i)
    }

    /// Starts worker `i` again (after a kill or stop), with the same id and data directory.
    pub fn restart_worker(&mut self, i: usize) -> Result<()> {
        assert!(
            self.workers.get(i).is_some_and(Option::is_none),
            "worker {i} is not stopped"
        );
        let child = self.spawn_worker(i)?;
        self.workers[i] = Some(Proc { child });
        Ok(())
    }

    /// The pid of worker `i`, while it runs.
    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i)?.as_ref().map(|p| p.child.id())
    }

    fn spawn_worker(&self, i: usize) -> Result<Child> {
        let name = format!("worker-{i}");
        let mut cmd = self.base_command("chorus-worker");
        cmd.arg("--coordinator")
            .arg(self.url())
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
        cmd.spawn().context("spawn chorus-worker")
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
        cmd.output().expect("run chorus")
    }

    /// Runs the CLI and parses its stdout as JSON, failing on a non-zero exit.
    pub fn chorus_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.chorus(args);
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
    pub fn wait_until(&self, timeout: Duration, what: &str, mut cond: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
        let start = Instant::now();
        let mut last_err = None;
        while start.elapsed() < timeout {
            match cond(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})\n{}",
            self.logs_tail()
        )
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
        if std::env::var_os("CHORUS_KEEP_TEST_DIRS").is_some() {
            let path = self.dir.path().to_path_buf();
            eprintln!("keeping {}", path.display());
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")));
        }
    }
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

/// A size-limited tmpfs on a fresh directory: a disk that fills up. Unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"24m"`); the error says why when this process may not
    /// mount one (it must run as root, or with CAP_SYS_ADMIN).
    pub fn mount(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::Builder::new().prefix("chorus-tmpfs-").tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .context("run mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount a tmpfs ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes still free on the filesystem.
    pub fn free_bytes(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
        s.blocks_available() as u64 * s.fragment_size() as u64
    }

    /// Fills the filesystem to its last byte with a file `name`, and returns the file's path:
    /// remove it to give the space back.
    pub fn fill(&self, name: &str) -> Result<PathBuf> {
        use std::io::Write;
        let path = self.path().join(name);
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
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a process still holding a file there must not keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
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
    /// Starts `s3s-fs` with one bucket; `None` if the binary is not installed.
    pub fn start(bucket: &str) -> Result<S3Server> {
        let bin = which_s3s_fs().context("s3s-fs is not installed: run scripts/setup.sh")?;
        let dir = tempfile::Builder::new().prefix("chorus-s3-").tempdir()?;
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
