//! Containment of a command trial's processes: every process an attempt starts dies when the
//! attempt ends (exit, kill order, timeout, stale attempt) and when its worker dies, including
//! processes that left the trial's process group (`setsid`, double forks, daemons).
//!
//! One of two mechanisms, chosen when the worker starts (`--containment`, default `auto`: the
//! first when the host allows it):
//!
//! - **cgroup** (cgroup v2, where the worker may create a child of its own cgroup). Each
//!   attempt gets its own cgroup, `<worker's cgroup>/chorus-t<trial>-a<attempt>-r<rank>-<id>`.
//!   The trial's first process moves itself in before it executes the program, so nothing the
//!   program starts is ever outside it, and leaving a cgroup takes privileges a trial should
//!   not have. The attempt ends with `cgroup.kill` (kernels before 5.14: freeze the cgroup,
//!   then kill each member), and the worker waits until the cgroup is empty and removes it.
//! - **process tracking** (everywhere else). The worker becomes a child subreaper, so orphans
//!   of its trials are re-parented to it instead of to init. Every process of an attempt
//!   inherits `CHORUS_ATTEMPT_TOKEN`, which `/proc/PID/environ` shows; and while the attempt
//!   runs, its descendants are listed every [`TRACK_EVERY`] by ancestry, so a process stays
//!   known after it has left the session or scrubbed its environment. The attempt ends by
//!   stopping (SIGSTOP) every process that descends from a known one or carries the token,
//!   again until no new one appears (a stopped process cannot fork), and then killing them
//!   all. What this cannot attribute: a process that scrubs its environment at exec *and*
//!   is orphaned within one tracking interval. As the worker's adopted child it is still
//!   killed, once no attempt runs on the worker.
//!
//! In both modes the attempt's tokened processes are killed at the end as well, which also
//! catches a privileged trial that moved itself out of its cgroup.
//!
//! **When the worker dies.** The trial's first process gets a parent-death signal (SIGKILL),
//! so a SIGKILLed worker takes it along at once. The rest of the tree is found from the
//! attempt's *record*, written to `DATA_DIR/containment/` before the program starts and kept
//! up to date: its token, its cgroup, and its processes known so far, each as pid and start
//! time (together they survive pid reuse). A worker started on that data directory kills
//! everything the records name, and only then registers with the coordinator, so an attempt
//! it is given never runs beside a leftover of an earlier one. The data directory is locked
//! while a worker uses it, so a second worker on it cannot kill the first one's trials.
//!
//! Linux only (`/proc`, cgroup v2, `prctl`), like the rest of the worker.

use crate::error::WorkerError;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Marks every process of an attempt; descendants inherit it unless they scrub their environment.
pub const TOKEN_VAR: &str = "CHORUS_ATTEMPT_TOKEN";
/// How often a running attempt's descendants are listed in process-tracking mode.
pub const TRACK_EVERY: Duration = Duration::from_millis(250);
/// How long a kill waits for the attempt's processes to be gone before it reports failure (a
/// process in uninterruptible sleep, in a driver call, dies only when the call returns).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The stop phase of a process-tracking kill gives up waiting for every member to show as
/// stopped after this long, and kills what it has.
const STOP_WAIT: Duration = Duration::from_secs(2);
const RECORDS_DIR: &str = "containment";

/// How a worker contains its trials' processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ContainmentMode {
    /// A cgroup per attempt where the host allows it, else process tracking.
    #[default]
    Auto,
    /// A cgroup per attempt; the worker refuses to start without one.
    Cgroup,
    /// Process tracking, even where cgroups are available.
    Process,
}

/// Root pids of trials this process spawned: they are tokio's to reap, never the subreaper's.
static SPAWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// A process, named so that a reused pid does not match: the start time is field 22 of
/// `/proc/PID/stat`, in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start: u64,
}

/// What survives the worker about one attempt, in `DATA_DIR/containment/<name>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The kernel's boot id: after a reboot no recorded process or cgroup can exist, and a pid
    /// with the same start time would be another process.
    boot_id: String,
    trial: u64,
    attempt: u32,
    rank: u32,
    token: String,
    cgroup: Option<PathBuf>,
    processes: BTreeSet<ProcessId>,
}

/// The worker's containment: which mechanism, and where attempts' records live.
pub struct Containment {
    /// `Some`: cgroup mode, attempts' cgroups are created under this one.
    cgroup_parent: Option<PathBuf>,
    /// Why cgroups are not used, in process-tracking mode.
    fallback_reason: Option<String>,
    /// Set once this process is a child subreaper: it then reaps adopted orphans.
    subreaper: bool,
    records: PathBuf,
    /// Attempts between `enclose` and the end of their kill.
    live: AtomicUsize,
}

impl Containment {
    /// Picks the mechanism for `mode`, with no effect on this process (tests use it directly).
    pub fn new(mode: ContainmentMode, data_dir: &Path) -> Result<Containment, WorkerError> {
        let records = data_dir.join(RECORDS_DIR);
        std::fs::create_dir_all(&records).map_err(WorkerError::io(&records))?;
        let (cgroup_parent, fallback_reason) = match mode {
            ContainmentMode::Process => (None, Some("process tracking was asked for".to_string())),
            ContainmentMode::Auto => match cgroup::usable_parent() {
                Ok(p) => (Some(p), None),
                Err(reason) => (None, Some(reason)),
            },
            ContainmentMode::Cgroup => match cgroup::usable_parent() {
                Ok(p) => (Some(p), None),
                Err(reason) => {
                    return Err(WorkerError::Containment(format!(
                        "--containment cgroup, but this worker cannot use cgroups: {reason}"
                    )));
                }
            },
        };
        Ok(Containment {
            cgroup_parent,
            fallback_reason,
            subreaper: false,
            records,
            live: AtomicUsize::new(0),
        })
    }

    /// As [`Containment::new`], and in process-tracking mode makes this process a child
    /// subreaper. For the worker process only: a subreaper must reap the orphans it adopts,
    /// which is safe only where every other child is a trial spawned here.
    pub fn for_worker(mode: ContainmentMode, data_dir: &Path) -> Result<Containment, WorkerError> {
        let mut c = Containment::new(mode, data_dir)?;
        if c.cgroup_parent.is_none() {
            nix::sys::prctl::set_child_subreaper(true)
                .map_err(|e| WorkerError::Containment(format!("cannot become a child subreaper: {e}")))?;
            c.subreaper = true;
        }
        Ok(c)
    }

    pub fn uses_cgroups(&self) -> bool {
        self.cgroup_parent.is_some()
    }

    /// One line for the worker's start log.
    pub fn describe(&self) -> String {
        match (&self.cgroup_parent, &self.fallback_reason) {
            (Some(p), _) => format!("a cgroup per attempt under {}", p.display()),
            (None, reason) => format!(
                "process tracking{} ({})",
                if self.subreaper { " as a child subreaper" } else { "" },
                reason.as_deref().unwrap_or("no cgroup")
            ),
        }
    }

    /// Kills every process an earlier worker on this data directory left behind, from its
    /// records; returns how many attempts had records. Fails, naming them, when some
    /// processes cannot be killed: a worker must not run attempts beside them.
    pub async fn kill_leftovers(&self) -> Result<usize, WorkerError> {
        let dir = self.records.clone();
        let subreaper = self.subreaper;
        tokio::task::spawn_blocking(move || kill_leftovers_in(&dir, subreaper))
            .await
            .map_err(|e| WorkerError::Task(e.to_string()))?
    }

    /// Prepares the containment of one attempt: its token, its durable record and, in cgroup
    /// mode, its cgroup. The program is started by the caller, configured by
    /// [`Enclosure::configure`].
    pub(crate) async fn enclose(self: &Arc<Self>, trial: u64, attempt: u32, rank: u32) -> Result<Enclosure, String> {
        let token = format!("{:032x}", rand::random::<u128>());
        let name = format!("chorus-t{trial}-a{attempt}-r{rank}-{}", &token[..12]);
        let record = Record {
            boot_id: boot_id(),
            trial,
            attempt,
            rank,
            token: token.clone(),
            cgroup: self.cgroup_parent.as_ref().map(|p| p.join(&name)),
            processes: BTreeSet::new(),
        };
        let path = self.records.join(format!("{name}.json"));
        let cgroup = record.cgroup.clone();
        let written = record.clone();
        let record_path = path.clone();
        // The record exists before the cgroup and before any process: a worker killed at any
        // point leaves nothing its successor cannot find.
        tokio::task::spawn_blocking(move || {
            write_record(&record_path, &written)?;
            if let Some(dir) = &written.cgroup {
                std::fs::create_dir(dir).map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
            }
            Ok::<_, String>(())
        })
        .await
        .map_err(|e| e.to_string())??;
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Enclosure {
            owner: self.clone(),
            token,
            cgroup,
            record_path: path,
            record: Arc::new(Mutex::new(record)),
            pgid: None,
            root: None,
            tracker: None,
            armed: true,
        })
    }
}

/// The containment of one attempt's processes. Dropped armed (its task was cancelled), it
/// kills them all.
pub(crate) struct Enclosure {
    owner: Arc<Containment>,
    token: String,
    cgroup: Option<PathBuf>,
    record_path: PathBuf,
    record: Arc<Mutex<Record>>,
    /// The trial's process group, whose id is its first process's pid.
    pgid: Option<Pid>,
    root: Option<i32>,
    tracker: Option<tokio::task::JoinHandle<()>>,
    armed: bool,
}

impl Enclosure {
    /// Marks the program with the attempt's token and, in cgroup mode, makes its first process
    /// enter the attempt's cgroup before it executes the program.
    pub fn configure(&self, cmd: &mut tokio::process::Command) -> Result<(), String> {
        cmd.env(TOKEN_VAR, &self.token);
        if let Some(dir) = &self.cgroup {
            let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|_| format!("cgroup path {} holds a NUL byte", dir.display()))?;
            // SAFETY: between fork and exec only async-signal-safe calls (open, write, close)
            // on memory prepared before the fork; `last_os_error` does not allocate.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" names the writing process.
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n == 1 { Ok(()) } else { Err(err) }
                });
            }
        }
        Ok(())
    }

    /// Starts the program (configured by [`Enclosure::configure`]) and records its first
    /// process; in process-tracking mode, starts listing its descendants.
    pub async fn spawn(&mut self, cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        let child = {
            // Under the lock, so a sweep of unclaimed adoptees never sees this child unlisted.
            let mut spawned = SPAWNED.lock().unwrap_or_else(|p| p.into_inner());
            let child = cmd.spawn()?;
            if let Some(pid) = child.id() {
                spawned.insert(pid as i32);
            }
            child
        };
        let Some(pid) = child.id().map(|p| p as i32) else {
            return Ok(child);
        };
        self.root = Some(pid);
        self.pgid = Some(Pid::from_raw(pid));
        let record = self.record.clone();
        let path = self.record_path.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(stat) = procfs::stat(pid) {
                let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
                r.processes.insert(ProcessId { pid, start: stat.start });
                if let Err(e) = write_record(&path, &r) {
                    warn!(error = %e, "cannot update the attempt's containment record");
                }
            }
        })
        .await;
        if self.cgroup.is_none() {
            self.tracker = Some(tokio::spawn(track(
                self.record.clone(),
                self.record_path.clone(),
                self.owner.subreaper,
            )));
        }
        Ok(child)
    }

    /// Asks the whole process group to stop (SIGTERM), as a terminal's ctrl-c would.
    pub fn terminate(&self) {
        self.signal_group(Signal::SIGTERM);
    }

    /// Kills what can be killed at once, without waiting: the cgroup, or the process group.
    /// [`Enclosure::kill_all`] finishes the job.
    pub fn kill_now(&self) {
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        self.signal_group(Signal::SIGKILL);
    }

    /// The program's first process has been reaped (by tokio): its pid may be reused now.
    pub fn root_reaped(&mut self) {
        if let Some(pid) = self.root.take() {
            SPAWNED.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
        }
    }

    /// Kills every process of the attempt and waits until they are gone; then the record (and
    /// the cgroup) are removed. On failure the record stays, for the next worker start.
    pub async fn kill_all(mut self) -> Result<(), String> {
        self.armed = false;
        if let Some(t) = self.tracker.take() {
            t.abort();
        }
        let (cgroup, record, path, subreaper) = (
            self.cgroup.clone(),
            self.record.clone(),
            self.record_path.clone(),
            self.owner.subreaper,
        );
        let killed = tokio::task::spawn_blocking(move || {
            let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
            kill_recorded(&mut r, cgroup.as_deref(), subreaper)?;
            remove_record(&path);
            Ok::<_, String>(())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        self.finished().await;
        killed
    }

    /// The attempt's kill is over: when it was the last one, no process the worker adopted
    /// can belong to a running attempt, and whatever is left is killed.
    async fn finished(&self) {
        if self.owner.live.fetch_sub(1, Ordering::SeqCst) == 1 && self.owner.subreaper {
            let owner = self.owner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = kill_unclaimed_adoptees(&owner.live) {
                    warn!(error = %e, "cannot kill the processes this worker adopted");
                }
            })
            .await;
        }
    }

    fn signal_group(&self, sig: Signal) {
        let Some(pgid) = self.pgid else { return };
        match killpg(pgid, sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => warn!(pgid = pgid.as_raw(), signal = %sig, error = %e, "cannot signal the trial's process group"),
        }
    }
}

impl Drop for Enclosure {
    fn drop(&mut self) {
        if let Some(t) = self.tracker.take() {
            t.abort();
        }
        if !self.armed {
            return;
        }
        // The attempt's task was cancelled (the worker is going down, or panicked): kill at once
        // what can be, and finish on a thread of its own, since a drop must not block.
        self.kill_now();
        self.owner.live.fetch_sub(1, Ordering::SeqCst);
        let (cgroup, record, path, subreaper) = (
            self.cgroup.clone(),
            self.record.clone(),
            self.record_path.clone(),
            self.owner.subreaper,
        );
        let _ = std::thread::Builder::new()
            .name("chorus-contain".into())
            .spawn(move || {
                let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
                match kill_recorded(&mut r, cgroup.as_deref(), subreaper) {
                    Ok(()) => remove_record(&path),
                    Err(e) => {
                        warn!(error = %e, "cannot kill a cancelled attempt's processes; the next worker start will")
                    }
                }
            });
    }
}

/// Lists a running attempt's descendants so they stay known whatever they do later, and in a
/// subreaper reaps the orphans it adopted that have died.
async fn track(record: Arc<Mutex<Record>>, path: PathBuf, subreaper: bool) {
    let mut tick = tokio::time::interval(TRACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Processes seen without the token. A process's environment changes only when it executes
    // a program, and it can pass on only a token it has, so one without it never gets it: its
    // environment need not be read again.
    let without_token = Arc::new(Mutex::new(HashSet::<ProcessId>::new()));
    loop {
        tick.tick().await;
        let (record, path, without_token) = (record.clone(), path.clone(), without_token.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let snap = procfs::snapshot();
            let mut r = record.lock().unwrap_or_else(|p| p.into_inner());
            let mut without = without_token.lock().unwrap_or_else(|p| p.into_inner());
            without.retain(|p| snap.get(&p.pid).is_some_and(|s| s.start == p.start));
            let needle = token_entry(&r.token);
            let checked = std::cell::RefCell::new(Vec::new());
            let found = members(&snap, &r.processes, |pid| {
                let id = ProcessId {
                    pid,
                    start: snap[&pid].start,
                };
                if without.contains(&id) {
                    return false;
                }
                let has = procfs::environ_has(pid, &needle);
                if !has {
                    checked.borrow_mut().push(id);
                }
                has
            });
            without.extend(checked.into_inner());
            let before = r.processes.len();
            r.processes.extend(found);
            if r.processes.len() != before
                && let Err(e) = write_record(&path, &r)
            {
                warn!(error = %e, "cannot update the attempt's containment record");
            }
            if subreaper {
                reap_adopted(&snap);
            }
        })
        .await;
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Everything the record names: its cgroup, then every process that is known, carries the
/// token, or descends from one of those.
fn kill_recorded(r: &mut Record, cgroup: Option<&Path>, subreaper: bool) -> Result<(), String> {
    if r.boot_id != boot_id() {
        return Ok(());
    }
    let mut problems = Vec::new();
    if let Some(dir) = cgroup
        && let Err(e) = cgroup::kill_and_remove(dir)
    {
        problems.push(e);
    }
    if let Err(e) = kill_processes(Some(&r.token), &mut r.processes, subreaper) {
        problems.push(e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "trial {} attempt {} rank {}: {}",
            r.trial,
            r.attempt,
            r.rank,
            problems.join("; ")
        ))
    }
}

fn kill_leftovers_in(dir: &Path, subreaper: bool) -> Result<usize, WorkerError> {
    let entries = std::fs::read_dir(dir).map_err(WorkerError::io(dir))?;
    let mut found = 0;
    let mut failed = Vec::new();
    for entry in entries {
        let path = entry.map_err(WorkerError::io(dir))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            // A record being written when the worker died; the one it replaces is beside it.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let mut record: Record = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                failed.push(format!("{}: unreadable record: {e}", path.display()));
                continue;
            }
        };
        found += 1;
        let cgroup = record.cgroup.clone();
        match kill_recorded(&mut record, cgroup.as_deref(), subreaper) {
            Ok(()) => {
                info!(
                    trial = record.trial,
                    attempt = record.attempt,
                    rank = record.rank,
                    "killed what an earlier run of this worker left of the attempt"
                );
                remove_record(&path);
            }
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        Ok(found)
    } else {
        Err(WorkerError::Containment(format!(
            "cannot kill what an earlier run of this worker left running (records in {}): {}",
            dir.display(),
            failed.join("; ")
        )))
    }
}

fn write_record(path: &Path, r: &Record) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(r).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn remove_record(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a containment record"),
    }
}

/// `NAME=value` as it appears, NUL-separated, in `/proc/PID/environ`.
fn token_entry(token: &str) -> Vec<u8> {
    format!("{TOKEN_VAR}={token}").into_bytes()
}

/// The processes of `snap` that belong to an attempt: those `known` (same pid and start time),
/// those `carries_token` says carry its token, and every descendant of either. Zombies
/// included; this process and init never.
fn members(
    snap: &HashMap<i32, procfs::Stat>,
    known: &BTreeSet<ProcessId>,
    carries_token: impl Fn(i32) -> bool,
) -> BTreeSet<ProcessId> {
    let me = std::process::id() as i32;
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, s) in snap {
        children.entry(s.ppid).or_default().push(pid);
    }
    let mut found = HashSet::new();
    let mut queue = Vec::new();
    for (&pid, s) in snap {
        if pid == me || pid == 1 {
            continue;
        }
        let seed = known.contains(&ProcessId { pid, start: s.start }) || (!s.zombie && carries_token(pid));
        if seed && found.insert(pid) {
            queue.push(pid);
        }
    }
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            if c != me && found.insert(c) {
                queue.push(c);
            }
        }
    }
    found
        .into_iter()
        .map(|pid| ProcessId {
            pid,
            start: snap[&pid].start,
        })
        .collect()
}

/// Kills an attempt's processes (see [`members`]) and waits until none is alive. First every
/// member is stopped, until a pass finds no member that is not stopped: a stopped process
/// cannot fork, and while nothing dies no ancestry is lost. Then all are killed. `known`
/// grows by every member found.
fn kill_processes(token: Option<&str>, known: &mut BTreeSet<ProcessId>, reap: bool) -> Result<(), String> {
    let needle = token.map(token_entry);
    let carries = |pid: i32| needle.as_ref().is_some_and(|n| procfs::environ_has(pid, n));
    let start = Instant::now();
    loop {
        let snap = procfs::snapshot();
        let found = members(&snap, known, carries);
        known.extend(found.iter().copied());
        let running: Vec<ProcessId> = found
            .into_iter()
            .filter(|p| snap.get(&p.pid).is_some_and(|s| !s.zombie && !s.stopped))
            .collect();
        if running.is_empty() || start.elapsed() > STOP_WAIT {
            break;
        }
        for p in running {
            let _ = procfs::signal(p, Signal::SIGSTOP);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    loop {
        let snap = procfs::snapshot();
        let found = members(&snap, known, carries);
        known.extend(found.iter().copied());
        if reap {
            reap_adopted(&snap);
        }
        let alive: Vec<ProcessId> = found
            .into_iter()
            .filter(|p| snap.get(&p.pid).is_some_and(|s| !s.zombie))
            .collect();
        if alive.is_empty() {
            return Ok(());
        }
        let mut refused = Vec::new();
        for p in &alive {
            if let Err(e) = procfs::signal(*p, Signal::SIGKILL) {
                refused.push(format!("{} ({e})", p.pid));
            }
        }
        if start.elapsed() > KILL_WAIT {
            let pids: Vec<String> = alive.iter().map(|p| p.pid.to_string()).collect();
            return Err(format!(
                "processes {} still alive after {KILL_WAIT:?}{}",
                pids.join(", "),
                if refused.is_empty() {
                    String::new()
                } else {
                    format!("; refused: {}", refused.join(", "))
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// In a subreaper: the children it adopted (every child it did not spawn itself as a trial) and
/// their descendants, once no attempt runs.
fn kill_unclaimed_adoptees(live: &AtomicUsize) -> Result<(), String> {
    let me = std::process::id() as i32;
    let mut adopted: BTreeSet<ProcessId> = {
        // Under the lock no trial is being spawned, so every child that is not listed is an
        // adoptee; an attempt that began meanwhile may own some of them, so it ends the sweep.
        let spawned = SPAWNED.lock().unwrap_or_else(|p| p.into_inner());
        if live.load(Ordering::SeqCst) != 0 {
            return Ok(());
        }
        procfs::snapshot()
            .into_iter()
            .filter(|(pid, s)| s.ppid == me && !s.zombie && !spawned.contains(pid))
            .map(|(pid, s)| ProcessId { pid, start: s.start })
            .collect()
    };
    if adopted.is_empty() {
        return Ok(());
    }
    warn!(
        count = adopted.len(),
        "killing processes of finished trials that no attempt could claim"
    );
    kill_processes(None, &mut adopted, true)
}

/// Reaps this subreaper's dead adopted children; tokio reaps the trials it spawned.
fn reap_adopted(snap: &HashMap<i32, procfs::Stat>) {
    let me = std::process::id() as i32;
    let spawned = SPAWNED.lock().unwrap_or_else(|p| p.into_inner());
    for (&pid, s) in snap {
        if s.ppid == me && s.zombie && !spawned.contains(&pid) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
    }
}

/// Reading `/proc`, and signalling a process by identity.
mod procfs {
    use super::*;

    pub struct Stat {
        pub ppid: i32,
        pub start: u64,
        pub zombie: bool,
        pub stopped: bool,
    }

    pub fn stat(pid: i32) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&text)
    }

    /// The command name (field 2) is in parentheses and may hold spaces and parentheses itself,
    /// so the fields are counted from the last `)`.
    pub fn parse_stat(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let state = *f.first()?;
        Some(Stat {
            ppid: f.get(1)?.parse().ok()?,
            start: f.get(19)?.parse().ok()?,
            zombie: matches!(state, "Z" | "X" | "x"),
            stopped: matches!(state, "T" | "t"),
        })
    }

    /// Every process now, by pid. A process gone between listing and reading is left out.
    pub fn snapshot() -> HashMap<i32, Stat> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return HashMap::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| Some((pid, stat(pid)?)))
            .collect()
    }

    /// Whether the process's initial environment holds `entry` (`NAME=value`) as a whole entry.
    /// Unreadable (another user's process, or gone) counts as no.
    pub fn environ_has(pid: i32, entry: &[u8]) -> bool {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            return false;
        };
        env.split(|b| *b == 0).any(|e| e == entry)
    }

    /// Signals `p` only if its pid still names that process: through a pidfd, opened and then
    /// checked against the start time, so a pid reused in between is never hit. A process
    /// already gone is not an error.
    pub fn signal(p: ProcessId, sig: Signal) -> Result<(), Errno> {
        // SAFETY: plain syscalls; the returned descriptor is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
        if fd < 0 {
            return match Errno::last() {
                Errno::ESRCH => Ok(()),
                // Kernels before 5.3: check, then signal by pid (a narrow window for reuse).
                Errno::ENOSYS if stat(p.pid).is_some_and(|s| s.start == p.start) => {
                    match nix::sys::signal::kill(Pid::from_raw(p.pid), sig) {
                        Ok(()) | Err(Errno::ESRCH) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Errno::ENOSYS => Ok(()),
                e => Err(e),
            };
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if stat(p.pid).is_none_or(|s| s.start != p.start) {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a valid pidfd, a null siginfo (as kill(2) would send), no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::ESRCH => Ok(()),
            e => Err(e),
        }
    }
}

/// cgroup v2: finding the worker's own cgroup, checking it may hold attempts, killing one.
mod cgroup {
    use super::*;

    /// The worker's own cgroup, if it can create a child there and move a process into it.
    pub fn usable_parent() -> Result<PathBuf, String> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read mountinfo: {e}"))?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("the worker is in no cgroup v2 hierarchy")?;
        let parent = locate(&mountinfo, own)?;
        probe(&parent)?;
        Ok(parent)
    }

    /// The directory of cgroup `own` (as `/proc/self/cgroup` names it) under the cgroup2 mount
    /// whose root contains it.
    pub fn locate(mountinfo: &str, own: &str) -> Result<PathBuf, String> {
        for line in mountinfo.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let Some(sep) = f.iter().position(|x| *x == "-") else {
                continue;
            };
            if f.get(sep + 1) != Some(&"cgroup2") || f.len() < 5 {
                continue;
            }
            let (root, point) = (unescape(f[3]), unescape(f[4]));
            let Ok(rel) = Path::new(own).strip_prefix(&root) else {
                continue;
            };
            return Ok(PathBuf::from(point).join(rel));
        }
        Err(format!("no cgroup2 mount holds the worker's cgroup {own}"))
    }

    /// mountinfo writes space, tab, newline and backslash as octal escapes.
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && let Some(v) = b
                    .get(i + 1..i + 4)
                    .and_then(|d| std::str::from_utf8(d).ok())
                    .and_then(|d| u8::from_str_radix(d, 8).ok())
            {
                out.push(v);
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Creates a child cgroup and moves a short-lived process into it the way a trial will be
    /// moved (from between fork and exec); read-only mounts, missing delegation and threaded
    /// cgroups all fail here, at start, rather than at a trial's spawn.
    fn probe(parent: &Path) -> Result<(), String> {
        let dir = parent.join(format!(
            "chorus-probe-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create a cgroup under {}: {e}", parent.display()))?;
        let result = probe_in(&dir);
        let _ = std::fs::remove_dir(&dir);
        result
    }

    fn probe_in(dir: &Path) -> Result<(), String> {
        if !dir.join("cgroup.kill").exists() && !dir.join("cgroup.freeze").exists() {
            return Err("the kernel offers neither cgroup.kill nor cgroup.freeze".into());
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        // SAFETY: as in `Enclosure::configure`. The child never executes anything: it reports
        // success as ECANCELED and exits, so the parent learns the outcome from spawn's error.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n == 1 {
                    Err(std::io::Error::from_raw_os_error(libc::ECANCELED))
                } else {
                    Err(err)
                }
            });
        }
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => Ok(()),
            Err(e) => Err(format!("cannot move a process into {}: {e}", dir.display())),
            Ok(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
                Err("the cgroup probe ran unexpectedly".into())
            }
        }
    }

    /// Kills everything in the cgroup `dir` (and its sub-cgroups), waits until it is empty and
    /// removes it. A cgroup already gone is fine.
    pub fn kill_and_remove(dir: &Path) -> Result<(), String> {
        if !dir.exists() {
            return Ok(());
        }
        let start = Instant::now();
        let kill_file = dir.join("cgroup.kill");
        let by_kill_file = kill_file.exists();
        if by_kill_file {
            std::fs::write(&kill_file, "1").map_err(|e| format!("cannot write {}: {e}", kill_file.display()))?;
        } else {
            // Frozen, its members cannot fork while they are killed one by one.
            let _ = std::fs::write(dir.join("cgroup.freeze"), "1");
        }
        while populated(dir)? {
            if !by_kill_file {
                for pid in members(dir) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            if start.elapsed() > KILL_WAIT {
                return Err(format!(
                    "cgroup {} still holds processes {:?} after {KILL_WAIT:?}",
                    dir.display(),
                    members(dir)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        remove_tree(dir)
    }

    fn populated(dir: &Path) -> Result<bool, String> {
        let events = dir.join("cgroup.events");
        match std::fs::read_to_string(&events) {
            Ok(text) => Ok(text.lines().any(|l| l == "populated 1")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(format!("cannot read {}: {e}", events.display())),
        }
    }

    /// Pids in the cgroup and its sub-cgroups.
    fn members(dir: &Path) -> Vec<i32> {
        let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for sub in subdirs(dir) {
            pids.extend(members(&sub));
        }
        pids
    }

    fn subdirs(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    /// An empty cgroup is removed with rmdir, children first (a trial may have made some).
    fn remove_tree(dir: &Path) -> Result<(), String> {
        for sub in subdirs(dir) {
            remove_tree(&sub)?;
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove cgroup {}: {e}", dir.display())),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_cgroup_is_found_under_the_mount_that_holds_it() {
            let hybrid = "25 24 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                          30 24 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
            assert_eq!(locate(hybrid, "/").unwrap(), PathBuf::from("/sys/fs/cgroup/unified"));
            let unified = "30 24 0:27 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
            assert_eq!(
                locate(unified, "/system.slice/chorus.service").unwrap(),
                PathBuf::from("/sys/fs/cgroup/system.slice/chorus.service")
            );
            // A mount of a sub-tree (a container's namespace root), with an escaped space.
            let sub = "30 24 0:27 /kube/pod\\0401 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
            assert_eq!(
                locate(sub, "/kube/pod 1/worker").unwrap(),
                PathBuf::from("/sys/fs/cgroup/worker")
            );
            assert!(locate(sub, "/elsewhere").is_err());
            assert!(locate("25 24 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "/").is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ppid: i32, start: u64, zombie: bool) -> procfs::Stat {
        procfs::Stat {
            ppid,
            start,
            zombie,
            stopped: false,
        }
    }

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (we(ird) name) S 17 4242 4242 0 -1 4194560 120 0 0 0 0 0 0 0 20 0 1 0 98765 1 2 3";
        let s = procfs::parse_stat(line).unwrap();
        assert_eq!((s.ppid, s.start, s.zombie, s.stopped), (17, 98765, false, false));
        let z = procfs::parse_stat("7 (sh) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0").unwrap();
        assert!(z.zombie);
        assert!(procfs::parse_stat("garbage").is_none());
    }

    #[test]
    fn members_are_the_known_the_tokened_and_their_descendants() {
        // 10 is the attempt's root; 11 its child; 12 a grandchild that left the session and was
        // re-parented to init; 13 its child; 20 an unrelated process; 21 carries the token but
        // lost its parent; 30 reuses a known pid with another start time.
        let snap: HashMap<i32, procfs::Stat> = [
            (10, stat(1, 100, false)),
            (11, stat(10, 101, false)),
            (12, stat(1, 102, false)),
            (13, stat(12, 103, true)),
            (20, stat(1, 50, false)),
            (21, stat(1, 104, false)),
            (22, stat(21, 105, false)),
            (30, stat(1, 999, false)),
        ]
        .into();
        let known: BTreeSet<ProcessId> = [
            ProcessId { pid: 10, start: 100 },
            ProcessId { pid: 12, start: 102 },
            ProcessId { pid: 30, start: 1 },
        ]
        .into();
        let found = members(&snap, &known, |pid| pid == 21);
        let pids: Vec<i32> = found.iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![10, 11, 12, 13, 21, 22]);
        assert!(found.contains(&ProcessId { pid: 13, start: 103 }));
    }

    #[test]
    fn environ_entries_match_whole() {
        let me = std::process::id() as i32;
        // This test process does not carry a token; PATH is there as a whole entry only.
        assert!(!procfs::environ_has(me, &token_entry("0123")));
        if let Some(path) = std::env::var_os("PATH") {
            let mut entry = b"PATH=".to_vec();
            entry.extend_from_slice(path.as_bytes());
            assert!(procfs::environ_has(me, &entry));
            assert!(!procfs::environ_has(me, &entry[..entry.len() - 1]));
        }
    }

    fn unique_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// Starts `sh -c script` the way the runner does, inside `enclosure`, and waits for the
    /// pids the script writes to `pids` (one per line, `n` of them).
    async fn start(
        enclosure: &mut Enclosure,
        script: &str,
        pids_file: &Path,
        n: usize,
    ) -> (tokio::process::Child, Vec<i32>) {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .env("PIDS", pids_file)
            .stdin(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        enclosure.configure(&mut cmd).unwrap();
        let child = enclosure.spawn(&mut cmd).await.unwrap();
        let t = Instant::now();
        loop {
            let pids: Vec<i32> = std::fs::read_to_string(pids_file)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.len() >= n {
                return (child, pids);
            }
            assert!(t.elapsed() < Duration::from_secs(10), "the script wrote {pids:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(pid: i32) -> bool {
        procfs::stat(pid).is_some_and(|s| !s.zombie)
    }

    async fn assert_all_dead(pids: &[i32]) {
        let t = Instant::now();
        while pids.iter().any(|p| alive(*p)) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "still alive: {:?}",
                pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A tree that leaves the process group and the session in every way a shell can: a
    /// background child, a `setsid` grandchild, a double-forked daemon whose parent is gone,
    /// and one of those that also scrubs its environment.
    const ESCAPING_TREE: &str = r#"
        sleep 1000 & echo $! >> "$PIDS"
        setsid sh -c 'echo $$ >> "$PIDS"; exec sleep 1000' &
        sh -c 'setsid sh -c "echo \$\$ >> \"$PIDS\"; exec sleep 1000" &' &
        sh -c 'setsid sh -c "echo \$\$ >> \"$PIDS\"; sleep 0.6; exec env -i sleep 1000" &' &
        wait
    "#;

    async fn kills_the_whole_tree(mode: ContainmentMode) {
        let data = unique_dir();
        let c = Arc::new(Containment::new(mode, data.path()).unwrap());
        let mut e = c.enclose(1, 1, 0).await.unwrap();
        let pids_file = data.path().join("pids");
        let (mut child, pids) = start(&mut e, ESCAPING_TREE, &pids_file, 4).await;
        // Long enough for the tracker to list the last one before it scrubs its environment.
        tokio::time::sleep(TRACK_EVERY * 4).await;
        assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
        // The polite stop ends the shell; everything it detached is left to `kill_all`.
        e.terminate();
        let _ = child.wait().await;
        e.root_reaped();
        let cgroup = e.cgroup.clone();
        e.kill_all().await.unwrap();
        assert_all_dead(&pids).await;
        assert_eq!(std::fs::read_dir(data.path().join(RECORDS_DIR)).unwrap().count(), 0);
        assert!(
            cgroup.is_none_or(|dir| !dir.exists()),
            "the attempt's cgroup is removed"
        );
    }

    #[tokio::test]
    async fn process_tracking_kills_setsid_and_double_forked_descendants() {
        kills_the_whole_tree(ContainmentMode::Process).await;
    }

    #[tokio::test]
    async fn a_cgroup_per_attempt_kills_setsid_and_double_forked_descendants() {
        let data = unique_dir();
        let c = Containment::new(ContainmentMode::Auto, data.path()).unwrap();
        if !c.uses_cgroups() {
            eprintln!("skipped: {}", c.describe());
            return;
        }
        kills_the_whole_tree(ContainmentMode::Cgroup).await;
    }

    /// A worker that died (its enclosures never killed) leaves records; the next start on the
    /// data directory kills every process they lead to, setsid'd ones included.
    async fn leftovers_are_killed_on_the_next_start(mode: ContainmentMode) {
        let data = unique_dir();
        let c = Arc::new(Containment::new(mode, data.path()).unwrap());
        let mut e = c.enclose(7, 2, 0).await.unwrap();
        let pids_file = data.path().join("pids");
        let (mut child, pids) = start(&mut e, ESCAPING_TREE, &pids_file, 4).await;
        tokio::time::sleep(TRACK_EVERY * 4).await;
        // As if the worker were SIGKILLed: nothing runs its cleanup, and the first process goes
        // as its parent-death signal would take it.
        if let Some(t) = e.tracker.take() {
            t.abort();
        }
        std::mem::forget(e);
        child.kill().await.unwrap();
        assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");

        let next = Containment::new(mode, data.path()).unwrap();
        assert_eq!(next.kill_leftovers().await.unwrap(), 1);
        assert_all_dead(&pids).await;
        assert_eq!(next.kill_leftovers().await.unwrap(), 0, "the record is gone");
    }

    #[tokio::test]
    async fn process_tracking_leftovers_are_killed_on_the_next_start() {
        leftovers_are_killed_on_the_next_start(ContainmentMode::Process).await;
    }

    #[tokio::test]
    async fn cgroup_leftovers_are_killed_on_the_next_start() {
        let data = unique_dir();
        if !Containment::new(ContainmentMode::Auto, data.path())
            .unwrap()
            .uses_cgroups()
        {
            eprintln!("skipped: no usable cgroup");
            return;
        }
        leftovers_are_killed_on_the_next_start(ContainmentMode::Cgroup).await;
    }

    #[test]
    fn forced_process_mode_uses_no_cgroup() {
        let data = unique_dir();
        let c = Containment::new(ContainmentMode::Process, data.path()).unwrap();
        assert!(!c.uses_cgroups());
        assert!(c.describe().starts_with("process tracking"), "{}", c.describe());
    }
}
