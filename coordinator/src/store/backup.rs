//! Online backup of the store: a consistent copy of the database taken while a coordinator
//! serves on it, through SQLite's backup API.
//!
//! The copy is read in one step inside one read transaction, so it is a single point in time
//! (WAL readers never block the coordinator's writer, and the writer never restarts the copy).
//! It does not take the data directory's lock: it only reads. The copy is written beside its
//! destination under a temporary name, made self-contained (no write-ahead log), checked with
//! `PRAGMA integrity_check`, synced, and only then renamed into place, so `DEST` is either the
//! previous file or a whole, checked copy.

use super::DB_FILE;
use crate::error::{CoordError, Result};
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};

/// What a backup copied.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub source: PathBuf,
    pub dest: PathBuf,
    pub bytes: u64,
    pub experiments: u64,
    pub trials: u64,
}

/// Copies the store of `data_dir` to `dest` (a file path).
pub fn backup(data_dir: &Path, dest: &Path) -> Result<BackupReport> {
    let src = data_dir.join(DB_FILE);
    if !src.is_file() {
        return Err(CoordError::Backup(format!("no coordinator store at {}", src.display())));
    }
    let fail = |what: &str, why: &dyn std::fmt::Display| {
        CoordError::Backup(format!(
            "backup of {} to {}: cannot {what}: {why}",
            src.display(),
            dest.display()
        ))
    };
    let sq = |what: &'static str| move |e: rusqlite::Error| fail(what, &e);
    let io = |what: &'static str| move |e: std::io::Error| fail(what, &e);
    let from = Connection::open_with_flags(&src, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(sq("open the store read-only"))?;
    from.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sq("open the store read-only"))?;

    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| fail("name the destination", &"DEST must name a file"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let copied = (|| {
        let mut to = Connection::open(&tmp).map_err(sq("create the copy"))?;
        {
            let b = rusqlite::backup::Backup::new(&from, &mut to).map_err(sq("start the copy"))?;
            // Every page in one step (-1): one read transaction, one point in time. Busy or
            // locked (a checkpoint at that moment) is retried for a while.
            let mut tries = 0;
            loop {
                match b.step(-1).map_err(sq("copy the store"))? {
                    rusqlite::backup::StepResult::Done => break,
                    _ if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    _ => {
                        return Err(fail("copy the store", &"it stayed busy"));
                    }
                }
            }
        }
        // One self-contained file: a restore copies it alone.
        let _: String = to
            .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
            .map_err(sq("finish the copy"))?;
        let report: Vec<String> = {
            let mut stmt = to.prepare("PRAGMA integrity_check").map_err(sq("check the copy"))?;
            stmt.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(sq("check the copy"))?
        };
        if report != ["ok"] {
            return Err(fail(
                "trust the copy",
                &format!("integrity check: {}", report.join("; ")),
            ));
        }
        let count = |table: &str| -> Result<u64> {
            to.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(sq("count the copy"))
        };
        let (experiments, trials) = (count("experiments")?, count("trials")?);
        drop(to);
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("sync the copy"))?;
        Ok((experiments, trials))
    })();
    let (experiments, trials) = match copied {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("move the copy into place")(e));
    }
    // The rename is durable once the directory is.
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the destination directory"))?;
    let bytes = std::fs::metadata(dest).map_err(io("read the copy"))?.len();
    Ok(BackupReport {
        source: src,
        dest: dest.to_path_buf(),
        bytes,
        experiments,
        trials,
    })
}
