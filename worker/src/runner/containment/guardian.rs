//! The data directory's lock, and the worker's guardian: a small process forked from the worker
//! at start that waits for the worker to end, however it ends (SIGKILL included), and then kills
//! whatever the worker's attempts left, from their records. It holds the data directory's lock
//! until it is done, so a worker restarted on the directory meanwhile waits for it rather than
//! racing it.
//!
//! The guardian ignores the signals that ask a process to stop (a terminal's ctrl-c reaches the
//! worker's whole process group, and systemd sends SIGTERM to a whole service): it ends once
//! the worker has. Killed itself, it leaves the job to the next worker start.

use super::{RECORDS_DIR, SPAWNED, kill_leftovers_in};
use crate::error::WorkerError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a starting worker waits for the data directory's lock (held by a live worker, or
/// by the guardian of one that just ended while it kills what that one left).
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// An exclusive lock on `DATA_DIR/worker.lock`: one worker per data directory, since a starting
/// worker kills whatever the directory's records name. Released when every descriptor of it is
/// closed, which the kernel does for a dead process.
pub struct DataDirLock {
    _file: std::fs::File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Takes the lock, waiting up to `wait` for its holder to let go. Blocks.
    pub fn acquire(dir: &Path, wait: Duration) -> Result<DataDirLock, WorkerError> {
        std::fs::create_dir_all(dir).map_err(WorkerError::io(dir))?;
        let path = dir.join("worker.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(WorkerError::io(&path))?;
        let start = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(DataDirLock {
                        _file: file,
                        dir: dir.to_path_buf(),
                    });
                }
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < wait => {
                    if !told {
                        info!(dir = %dir.display(), "waiting for the data directory's lock");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(WorkerError::DataDirInUse(dir.to_path_buf()));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(WorkerError::Io { path, source: e }),
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The worker's end of the guardian's pipe: while it is open, the worker lives.
pub struct Guardian {
    pub pid: i32,
    _alive: OwnedFd,
}

/// Forks the guardian of the worker holding `lock`. Must be called while this process has a
/// single thread (before any runtime starts): the child runs ordinary Rust code after the fork.
pub fn start(lock: &DataDirLock) -> Result<Guardian, String> {
    let threads = thread_count();
    if threads != Some(1) {
        return Err(format!(
            "the worker already runs {} threads; a guardian must be forked before any",
            threads.map_or("an unknown number of".into(), |n| n.to_string())
        ));
    }
    let records = lock.dir().join(RECORDS_DIR);
    std::fs::create_dir_all(&records).map_err(|e| format!("cannot create {}: {e}", records.display()))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors, which are owned right below. CLOEXEC keeps them
    // from trials: a trial holding the write end would keep the guardian waiting.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot create a pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both were just created and belong to nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process has one thread (checked above), so the child may run anything.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(write);
            guard(read, &records)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            // Not an adopted orphan to sweep up: the worker's own child.
            SPAWNED.lock().unwrap_or_else(|p| p.into_inner()).insert(child.as_raw());
            Ok(Guardian {
                pid: child.as_raw(),
                _alive: write,
            })
        }
        Err(e) => Err(format!("cannot fork: {e}")),
    }
}

fn guard(alive: OwnedFd, records: &Path) -> ! {
    // SAFETY: setting dispositions and the thread name; no memory is shared with anyone.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        libc::prctl(libc::PR_SET_NAME, c"chorus-guardian".as_ptr());
    }
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: reading into a local buffer from a descriptor this process owns.
        let n = unsafe { libc::read(alive.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if n == 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted) {
            break;
        }
    }
    match kill_leftovers_in(records, false) {
        Ok(0) => {}
        Ok(n) => info!(attempts = n, "the worker ended; killed what its attempts left"),
        Err(e) => warn!(error = %e, "the worker ended; the next worker start will kill the rest"),
    }
    // No exit handlers: they belong to the worker (libtorch's among them).
    // SAFETY: ends this process only.
    unsafe { libc::_exit(0) }
}

fn thread_count() -> Option<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_per_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path(), Duration::ZERO).unwrap();
        let started = Instant::now();
        match DataDirLock::acquire(dir.path(), Duration::from_millis(200)) {
            Err(WorkerError::DataDirInUse(d)) => assert_eq!(d, dir.path()),
            other => panic!("a second lock: {:?}", other.map(|l| l.dir().to_path_buf())),
        }
        assert!(started.elapsed() >= Duration::from_millis(200), "it waited first");
        drop(held);
        DataDirLock::acquire(dir.path(), Duration::ZERO).unwrap();
    }
}
