//! The coordinator under test: started from a binary path on loopback with a fresh data
//! directory, and watched through `/proc` (CPU time, peak memory, bytes written).

use anyhow::{Context, bail};
use serde::Serialize;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running coordinator; killed when dropped.
pub struct Coordinator {
    child: Child,
    pid: u32,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Its store and log; removed when dropped.
    dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts `bin` on 127.0.0.1 with an ephemeral port and waits until it says it serves.
    /// `extra` goes on its command line after the benchmark's own flags.
    pub async fn start(bin: &Path, extra: &[String]) -> anyhow::Result<Coordinator> {
        let dir = tempfile::Builder::new()
            .prefix("chorus-scale-")
            .tempdir()
            .context("cannot create the coordinator's data directory")?;
        let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            // Per-registration info lines would make the benchmark measure log formatting.
            .env(
                "RUST_LOG",
                std::env::var("CHORUS_SCALE_COORDINATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches only the child's own attributes.
        // Without it a benchmark killed by its time limit would leave the coordinator running.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().context("the coordinator exited at once")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("chorus-coordinator listening on ") {
                    return Ok::<_, std::io::Error>(Some(addr.trim().to_string()));
                }
            }
            Ok(None)
        })
        .await;
        let log_tail = || tail(&dir.path().join("coordinator.log"));
        let addr = match ready {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => bail!("{} exited before serving:\n{}", bin.display(), log_tail()),
            Ok(Err(e)) => bail!("reading {}'s output: {e}", bin.display()),
            Err(_) => bail!("{} did not serve within 60 s:\n{}", bin.display(), log_tail()),
        };
        // Keep draining stdout so a chatty build can never block on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Coordinator {
            child,
            pid,
            url: format!("http://{addr}"),
            dir,
        })
    }

    /// Where the coordinator's own resource counters stand now.
    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        ProcSample::read(self.pid)
    }

    /// Stops the coordinator (SIGTERM, then SIGKILL after 10 s) and says how it ended.
    pub async fn stop(mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited: {status}; log tail:\n{}", self.log_tail());
        }
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(status)) => format!("stopped: {status}"),
            _ => {
                let _ = self.child.kill().await;
                "did not stop within 10 s of SIGTERM; killed".into()
            }
        }
    }

    /// Whether the process is still alive (a crash under load is a result to report).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{status}; log tail:\n{}", self.log_tail())),
            _ => None,
        }
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("coordinator.log"))
    }

    /// Bytes the coordinator's data directory holds now (its store and default storage).
    pub fn data_bytes(&self) -> u64 {
        fn size(p: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(p) else { return 0 };
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        size(&self.dir.path().join("data"))
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One reading of a process's counters from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    /// utime + stime, in seconds.
    pub cpu_s: f64,
    /// Bytes the process caused to be written to storage (`write_bytes` of `/proc/PID/io`).
    pub write_bytes: u64,
    /// Peak resident set size so far (`VmHWM`), and the current one (`VmRSS`), in bytes.
    pub peak_rss: u64,
    pub rss: u64,
}

impl ProcSample {
    pub fn read(pid: u32) -> anyhow::Result<ProcSample> {
        let at = Instant::now();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name is in parentheses and may hold spaces: count fields after it.
        let rest = stat.rsplit_once(')').context("unexpected /proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat(5) (utime, stime) are the 12th and 13th after the name.
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        let write_bytes = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok(ProcSample {
            at,
            cpu_s: ticks as f64 / clock_ticks(),
            write_bytes,
            peak_rss: kib("VmHWM:"),
            rss: kib("VmRSS:"),
        })
    }

    /// This process (the load generator), for how much of the machine it took.
    pub fn own() -> anyhow::Result<ProcSample> {
        ProcSample::read(std::process::id())
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// What a process did between two samples.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub seconds: f64,
    /// CPU time over wall time, in percent of one core (200 is two cores busy).
    pub cpu_pct: f64,
    pub write_bytes: u64,
    pub write_mib: f64,
    pub peak_rss_mib: f64,
    pub rss_mib: f64,
}

impl Usage {
    pub fn between(a: &ProcSample, b: &ProcSample) -> Usage {
        let seconds = b.at.duration_since(a.at).as_secs_f64();
        let write_bytes = b.write_bytes.saturating_sub(a.write_bytes);
        Usage {
            seconds,
            cpu_pct: if seconds > 0.0 {
                100.0 * (b.cpu_s - a.cpu_s) / seconds
            } else {
                0.0
            },
            write_bytes,
            write_mib: write_bytes as f64 / (1024.0 * 1024.0),
            peak_rss_mib: b.peak_rss as f64 / (1024.0 * 1024.0),
            rss_mib: b.rss as f64 / (1024.0 * 1024.0),
        }
    }
}

/// Lifts this process's open-file limit to its hard limit (higher when allowed): every
/// simulated worker holds its own connection, and the coordinator, started from here,
/// inherits the limit for its side of them. Returns the limit now in force.
pub fn raise_nofile_limit() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // As root the hard limit itself may rise up to fs.nr_open.
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .min(1 << 20);
        if nr_open > lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: nr_open,
                rlim_max: nr_open,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return Ok(nr_open);
            }
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(lim.rlim_cur)
}
