//! The data directory's lock: one coordinator per store. A rolling update that starts the new
//! pod before the old one has stopped, or two coordinators pointed at one volume, would
//! otherwise both write the store, each sure of a state the other is changing.
//!
//! The lock is an exclusive advisory lock (`flock`) on `DATA_DIR/LOCK`, held as long as the
//! file stays open, which the kernel ends with the process however it dies: a lock file left by
//! a dead coordinator blocks nothing. The file says who holds it (pid, host, since), so the
//! refusal of a second coordinator names the first. Backups do not take it: they only read.

use crate::error::{CoordError, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// The held lock of a data directory; dropping it lets go.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock of `dir` (created if missing) without waiting, and records this process
    /// as its holder. Fails, naming the holder, when another process (or another open of the
    /// same directory in this one) holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock> {
        let io = |source| CoordError::Io {
            what: format!("cannot lock data directory {}", dir.display()),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOCK_FILE);
        // Not truncated on open: until the lock is ours, what the file says is the holder's.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut said = String::new();
                let _ = file.read_to_string(&mut said);
                return Err(CoordError::DataDirInUse {
                    dir: dir.to_path_buf(),
                    holder: describe(&said),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "an unknown host".into());
        let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let record = format!("pid={}\nhost={host}\nsince={since}\n", std::process::id());
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(record.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(DataDirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// "pid P on host H since T" from what the holder wrote (or as much of it as is there).
fn describe(record: &str) -> String {
    let field = |k: &str| {
        record
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    match (field("pid"), field("host"), field("since")) {
        (Some(pid), Some(host), Some(since)) => format!("pid {pid} on host {host} since {since}"),
        (Some(pid), host, _) => format!("pid {pid} on host {}", host.unwrap_or("unknown")),
        _ => "another process (it has not said which yet)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = DataDirLock::acquire(&data).unwrap();
        let err = DataDirLock::acquire(&data).unwrap_err().to_string();
        let pid = std::process::id();
        assert!(
            err.contains(&format!(
                "data directory {} is in use by pid {pid} on host ",
                data.display()
            )),
            "{err}"
        );
        assert!(err.contains(" since 20"), "{err}");
        drop(first);
        // Released with the file: the next one takes it at once.
        let again = DataDirLock::acquire(&data).unwrap();
        let said = std::fs::read_to_string(again.path()).unwrap();
        assert!(said.starts_with(&format!("pid={pid}\n")), "{said}");
    }

    /// A lock file a dead coordinator left (its record there, no lock held) blocks nothing.
    #[test]
    fn a_stale_lock_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(LOCK_FILE),
            "pid=999999\nhost=gone\nsince=2020-01-01T00:00:00Z\nleftover bytes of a longer record\n",
        )
        .unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        let said = std::fs::read_to_string(lock.path()).unwrap();
        assert!(
            !said.contains("gone") && !said.contains("leftover"),
            "rewritten: {said}"
        );
    }

    #[test]
    fn describe_reads_partial_records() {
        assert_eq!(describe("pid=7\nhost=h\nsince=t\n"), "pid 7 on host h since t");
        assert_eq!(describe("pid=7\n"), "pid 7 on host unknown");
        assert!(describe("").contains("another process"));
    }
}
