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
//! so it dies with the worker at once. The rest of the tree is found from the attempt's
//! *record*, written to `DATA_DIR/containment/` before the program starts and kept up to date:
//! its token, its cgroup, and its processes known so far, each as pid and start time (together
//! they survive pid reuse). Two things act on the records: the worker's [`guardian`], a small
//! process forked at start that waits for the worker to end and then kills everything they
//! lead to; and, should the guardian have been killed too, the next worker started on that
//! data directory, which does the same before it registers with the coordinator, so an attempt
//! it is given never runs beside a leftover of an earlier one. The data directory is locked
//! while a worker (or its guardian) uses it, so a second worker on it cannot kill the first
//! one's trials.
//!
//! Linux only (`/proc`, cgroup v2, `prctl`), like the rest of the worker.

mod cgroup;
pub mod guardian;
mod procfs;
#[cfg(test)]
mod tests;

pub use guardian::{DataDirLock, Guardian};

use crate::error::WorkerError;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
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
    /// Set once this process is a child subreaper (or init): it then reaps adopted orphans.
    subreaper: bool,
    /// Whether adopted children no attempt claims are killed once no attempt runs: only in a
    /// subreaper, whose adoptees all descend from its trials. An init (the worker as a
    /// container's pid 1) also adopts processes it never started (`kubectl exec` shells).
    sweep_adoptees: bool,
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
            sweep_adoptees: false,
            records,
            live: AtomicUsize::new(0),
        })
    }

    /// As [`Containment::new`], and in process-tracking mode makes this process a child
    /// subreaper. For the worker process only: a subreaper must reap the orphans it adopts,
    /// which is safe only where every other child is a trial spawned here (or the guardian).
    /// A worker that is pid 1 reaps them in either mode, as an init must.
    pub fn for_worker(mode: ContainmentMode, data_dir: &Path) -> Result<Containment, WorkerError> {
        let mut c = Containment::new(mode, data_dir)?;
        let init = std::process::id() == 1;
        if c.cgroup_parent.is_none() && !init {
            nix::sys::prctl::set_child_subreaper(true)
                .map_err(|e| WorkerError::Containment(format!("cannot become a child subreaper: {e}")))?;
            c.sweep_adoptees = true;
        }
        c.subreaper = c.cgroup_parent.is_none() || init;
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
            if let Some(dir) = &written.cgroup
                && let Err(e) = std::fs::create_dir(dir)
            {
                remove_record(&record_path);
                return Err(format!("cannot create cgroup {}: {e}", dir.display()));
            }
            Ok(())
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
        if self.cgroup.is_some() {
            // The cgroup holds every process of the attempt, its first one included: the record
            // already leads to all of them.
            return Ok(child);
        }
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
        self.tracker = Some(tokio::spawn(track(
            self.record.clone(),
            self.record_path.clone(),
            self.owner.subreaper,
        )));
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
            kill_recorded(&mut r, cgroup.as_deref(), subreaper, Scan::Live)?;
            remove_record(&path);
            Ok(())
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
        if self.owner.live.fetch_sub(1, Ordering::SeqCst) == 1 && self.owner.sweep_adoptees {
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
                match kill_recorded(&mut r, cgroup.as_deref(), subreaper, Scan::Live) {
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
            let me = std::process::id() as i32;
            let found = members(&snap, &r.processes, |pid| {
                let stat = &snap[&pid];
                let id = ProcessId { pid, start: stat.start };
                // Only an orphan can have left the known tree, and the worker (a subreaper) or
                // init adopts it: no other process's environment needs reading (see Scan::Live).
                if without.contains(&id) || (stat.ppid != me && stat.ppid != 1) {
                    return false;
                }
                let has = procfs::environ_has(pid, &needle);
                if !has {
                    checked.borrow_mut().push(id);
                }
                has
            });
            without.extend(checked.into_inner());
            // What has died is of no use later, and keeping it would grow without bound.
            let live: BTreeSet<ProcessId> = found
                .into_iter()
                .filter(|p| snap.get(&p.pid).is_some_and(|s| !s.zombie))
                .collect();
            if live != r.processes {
                r.processes = live;
                if let Err(e) = write_record(&path, &r) {
                    warn!(error = %e, "cannot update the attempt's containment record");
                }
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

/// How far an attempt's processes may have strayed from where its record says they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// The attempt's worker is alive. Under a cgroup everything is in it. Without one, the
    /// worker is a subreaper: a descendant is either in the known tree or was adopted by the
    /// worker (or, without the subreaper, by init), so only those orphans' environments are
    /// read for the token, not every process's.
    Live,
    /// Left by an earlier worker: its orphans went to init or to any subreaper above it, so
    /// every process carrying the token is a member.
    Leftover,
}

fn kill_recorded(r: &mut Record, cgroup: Option<&Path>, subreaper: bool, scan: Scan) -> Result<(), String> {
    if r.boot_id != boot_id() {
        return Ok(());
    }
    let mut problems = Vec::new();
    if let Some(dir) = cgroup {
        match cgroup::kill_and_remove(dir) {
            // A process cannot leave its cgroup by forking or by setsid: an empty cgroup is a
            // dead attempt.
            Ok(()) if scan == Scan::Live => return Ok(()),
            Ok(()) => {}
            Err(e) => problems.push(e),
        }
    }
    if let Err(e) = kill_processes(Some(&r.token), &mut r.processes, subreaper, scan) {
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
        match kill_recorded(&mut record, cgroup.as_deref(), subreaper, Scan::Leftover) {
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
fn kill_processes(token: Option<&str>, known: &mut BTreeSet<ProcessId>, reap: bool, scan: Scan) -> Result<(), String> {
    let needle = token.map(token_entry);
    let me = std::process::id() as i32;
    let carries = |snap: &HashMap<i32, procfs::Stat>, pid: i32| {
        let orphan = snap.get(&pid).is_some_and(|s| s.ppid == me || s.ppid == 1);
        (scan == Scan::Leftover || orphan) && needle.as_ref().is_some_and(|n| procfs::environ_has(pid, n))
    };
    let start = Instant::now();
    loop {
        let snap = procfs::snapshot();
        let found = members(&snap, known, |pid| carries(&snap, pid));
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
        let found = members(&snap, known, |pid| carries(&snap, pid));
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
    kill_processes(None, &mut adopted, true, Scan::Live)
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
