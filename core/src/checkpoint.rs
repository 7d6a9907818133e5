//! Crash-safe checkpoints on object storage, fenced by attempt.
//!
//! Object stores cannot rename, so a checkpoint is committed by writing its `MANIFEST.json`
//! last, with create-if-absent, listing every file with its size and CRC-32C. A directory
//! without a manifest is an interrupted upload and is ignored; one whose files do not match
//! its manifest is corrupt, and restore falls back to the next older checkpoint.
//!
//! Every attempt of a trial writes under directories of its own, `{step:012}-a{attempt:04}`,
//! so two attempts never write the same object: an attempt the coordinator has given up on
//! (a frozen or partitioned worker that still runs it) can neither overwrite a newer attempt's
//! checkpoint nor commit a step in its place. Which checkpoints belong to a trial's history
//! is decided by lineage, never by recency: each manifest names the checkpoint its attempt
//! started from (`parent`), a new attempt restores only the checkpoint the coordinator
//! acknowledged (and its ancestors, as fallbacks), and retention deletes only within the
//! pruning attempt's own lineage and what no lineage reaches, never an attempt newer than
//! itself, never the newest acknowledged checkpoint nor anything after it.
//! Directories named `{step:012}` alone are checkpoints written before this scheme; they read
//! as attempt 0.
//!
//! Files are streamed in both directions in bounded chunks, so a checkpoint of any size costs
//! a few megabytes of memory.

use crate::error::CoreError;
use crate::storage::Storage;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path as FsPath, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const MANIFEST: &str = "MANIFEST.json";
/// A manifest larger than this is refused unread.
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// Files one checkpoint may hold.
pub const MAX_MANIFEST_FILES: usize = 100_000;
/// Bytes held in memory per file while uploading or restoring (also the multipart part size).
const IO_CHUNK: usize = 8 * 1024 * 1024;

/// A committed checkpoint: the step it holds and the attempt that committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub step: i64,
    /// 0 for a checkpoint written before checkpoints were kept per attempt.
    pub attempt: u32,
}

impl CheckpointRef {
    pub fn new(step: i64, attempt: u32) -> Self {
        CheckpointRef { step, attempt }
    }

    /// Its directory name: zero-padded so names sort by step, then attempt.
    pub fn dir_name(&self) -> String {
        match self.attempt {
            0 => format!("{:012}", self.step),
            a => format!("{:012}-a{a:04}", self.step),
        }
    }

    pub fn parse_dir_name(name: &str) -> Option<Self> {
        let (step, attempt) = match name.split_once("-a") {
            Some((s, a)) => (s, a.parse().ok().filter(|&a| a > 0)?),
            None => (name, 0),
        };
        if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(CheckpointRef::new(step.parse().ok()?, attempt))
    }
}

impl std::fmt::Display for CheckpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {} of attempt {}", self.step, self.attempt)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub step: i64,
    /// The attempt that committed it (0: written before checkpoints were kept per attempt).
    #[serde(default)]
    pub attempt: u32,
    /// The checkpoint the committing attempt started from, if any: the link to its ancestors.
    #[serde(default)]
    pub parent: Option<CheckpointRef>,
    pub created_unix_ms: i64,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Path relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub crc32c: u32,
}

impl Manifest {
    /// Parses and checks a manifest as read from storage: bounded, and every path a plain
    /// relative path that cannot leave the checkpoint directory.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(format!(
                "manifest is {} bytes, over the limit of {MAX_MANIFEST_BYTES}",
                bytes.len()
            ));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid: {e}"))?;
        if m.files.len() > MAX_MANIFEST_FILES {
            return Err(format!(
                "manifest lists {} files, over the limit of {MAX_MANIFEST_FILES}",
                m.files.len()
            ));
        }
        if let Some(p) = m.parent
            && p.attempt > m.attempt
        {
            return Err(format!("parent {p} is newer than the manifest's attempt {}", m.attempt));
        }
        let mut seen = BTreeSet::new();
        for f in &m.files {
            if !safe_relative_path(&f.path) {
                return Err(format!("unsafe path {:?}", f.path));
            }
            if f.path == MANIFEST {
                return Err("a file may not be named like the manifest".into());
            }
            if !seen.insert(f.path.as_str()) {
                return Err(format!("path {:?} is listed twice", f.path));
            }
        }
        // A file and a directory of one name cannot both be restored.
        for f in &m.files {
            let mut dir = f.path.as_str();
            while let Some((parent, _)) = dir.rsplit_once('/') {
                if seen.contains(parent) {
                    return Err(format!(
                        "{parent:?} is listed as a file and as the directory of {:?}",
                        f.path
                    ));
                }
                dir = parent;
            }
        }
        Ok(m)
    }

    pub fn at(&self) -> CheckpointRef {
        CheckpointRef::new(self.step, self.attempt)
    }
}

/// A `/`-separated relative path with no empty, `.` or `..` part and no backslash or NUL.
fn safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains(['\\', '\0'])
        && p.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Directory name of a step committed before checkpoints were kept per attempt.
pub fn step_dir(step: i64) -> String {
    CheckpointRef::new(step, 0).dir_name()
}

fn dir_of(prefix: &Path, at: CheckpointRef) -> Path {
    prefix.clone().join(at.dir_name())
}

/// The manifest key of a checkpoint.
pub fn manifest_key(prefix: &Path, at: CheckpointRef) -> Path {
    dir_of(prefix, at).join(MANIFEST)
}

fn file_key(base: &Path, rel: &str) -> Path {
    rel.split('/').fold(base.clone(), |p, part| p.join(part))
}

/// Files under `dir`, relative and sorted, skipping nothing but directories.
fn local_files(dir: &FsPath) -> Result<Vec<PathBuf>, CoreError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(CoreError::io(&d, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| CoreError::io(&d, e))?;
            let ft = entry.file_type().map_err(|e| CoreError::io(entry.path(), e))?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                out.push(entry.path().strip_prefix(dir).unwrap_or(&entry.path()).to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A cheap fingerprint of a directory's contents (names, sizes, mtimes), to skip uploading a
/// checkpoint directory that has not changed since the last commit.
pub fn fingerprint(dir: &FsPath) -> Result<Option<u64>, CoreError> {
    let files = local_files(dir)?;
    if files.is_empty() {
        return Ok(None);
    }
    let mut h: u32 = 0;
    for rel in files {
        let md = std::fs::metadata(dir.join(&rel)).map_err(|e| CoreError::io(dir.join(&rel), e))?;
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h = crc32c::crc32c_append(h, rel.to_string_lossy().as_bytes());
        h = crc32c::crc32c_append(h, &md.len().to_le_bytes());
        h = crc32c::crc32c_append(h, &mtime.to_le_bytes());
    }
    Ok(Some(h as u64))
}

/// Streams one local file to `key`, returning its size and CRC-32C.
async fn upload_file(storage: &Storage, key: &Path, path: &FsPath) -> Result<(u64, u32), CoreError> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| CoreError::io(path, e))?;
    let mut out = object_store::buffered::BufWriter::with_capacity(storage.store.clone(), key.clone(), IO_CHUNK);
    let mut buf = vec![0u8; 1024 * 1024];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = file.read(&mut buf).await.map_err(|e| CoreError::io(path, e))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
        if let Err(e) = out.write_all(&buf[..n]).await {
            let _ = out.abort().await;
            return Err(upload_error(key, e));
        }
    }
    out.shutdown().await.map_err(|e| upload_error(key, e))?;
    Ok((size, crc))
}

fn upload_error(key: &Path, e: std::io::Error) -> CoreError {
    match e.downcast::<object_store::Error>() {
        Ok(e) => CoreError::ObjectStore(e),
        Err(e) => CoreError::ObjectStore(object_store::Error::Generic {
            store: "checkpoint upload",
            source: format!("{key}: {e}").into(),
        }),
    }
}

/// Uploads every file of `dir` as the checkpoint `at` under `prefix`, manifest last, naming
/// `parent` (the checkpoint the attempt started from) as its ancestor. Returns `None` when the
/// directory is empty. If this attempt already committed this step (a retry), the valid
/// checkpoint is kept and returned unchanged.
pub async fn commit(
    storage: &Storage,
    prefix: &Path,
    at: CheckpointRef,
    parent: Option<CheckpointRef>,
    dir: &FsPath,
) -> Result<Option<Manifest>, CoreError> {
    let files = local_files(dir)?;
    if files.is_empty() {
        return Ok(None);
    }
    let base = dir_of(prefix, at);
    let key = base.clone().join(MANIFEST);
    match read_manifest(storage, &key).await {
        Ok(Some(m)) if verify_contents(storage, &base, &m).await.is_ok() => return Ok(Some(m)),
        Ok(None) => {}
        Err(CoreError::ObjectStore(e)) => return Err(CoreError::ObjectStore(e)),
        // Corrupt: our own directory, so it is ours to clear.
        _ => delete_prefix(storage, &base).await?,
    }
    let mut entries = Vec::with_capacity(files.len());
    for rel in &files {
        let rel_str = rel.to_string_lossy().replace('\\', "/");
        let (size, crc32c) = upload_file(storage, &file_key(&base, &rel_str), &dir.join(rel)).await?;
        entries.push(ManifestFile {
            path: rel_str,
            size,
            crc32c,
        });
    }
    let manifest = Manifest {
        version: 2,
        step: at.step,
        attempt: at.attempt,
        parent,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        files: entries,
    };
    let body = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match storage.store.put_opts(&key, PutPayload::from(body), opts).await {
        Ok(_) => Ok(Some(manifest)),
        // An earlier run of this same attempt got there first; its checkpoint stands.
        Err(object_store::Error::AlreadyExists { .. }) => Ok(read_manifest(storage, &key).await?),
        Err(e) => Err(e.into()),
    }
}

/// Reads and checks a manifest; `None` when there is none (an interrupted upload).
pub async fn read_manifest(storage: &Storage, key: &Path) -> Result<Option<Manifest>, CoreError> {
    let r = match storage.store.get(key).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if r.meta.size > MAX_MANIFEST_BYTES {
        return Err(CoreError::CorruptCheckpoint {
            key: key.to_string(),
            reason: format!(
                "manifest is {} bytes, over the limit of {MAX_MANIFEST_BYTES}",
                r.meta.size
            ),
        });
    }
    let bytes = r.bytes().await?;
    Manifest::parse(&bytes)
        .map(Some)
        .map_err(|reason| CoreError::CorruptCheckpoint {
            key: key.to_string(),
            reason,
        })
}

/// Checks, by listing, that every file of `m` is there with its size. Cheap: nothing is read.
async fn verify_listing(storage: &Storage, base: &Path, m: &Manifest) -> Result<(), CoreError> {
    let listed: BTreeMap<String, u64> = storage
        .store
        .list(Some(base))
        .map_ok(|o| (o.location.to_string(), o.size))
        .try_collect()
        .await?;
    for f in &m.files {
        let key = file_key(base, &f.path);
        match listed.get(key.as_ref()) {
            None => {
                return Err(CoreError::CorruptCheckpoint {
                    key: key.to_string(),
                    reason: "file listed in manifest is missing".into(),
                });
            }
            Some(&size) if size != f.size => {
                return Err(CoreError::CorruptCheckpoint {
                    key: key.to_string(),
                    reason: format!("size {size} differs from manifest's {}", f.size),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Reads every file of `m` back and checks its size and CRC-32C.
async fn verify_contents(storage: &Storage, base: &Path, m: &Manifest) -> Result<(), CoreError> {
    for f in &m.files {
        download_verified(storage, base, f, None).await?;
    }
    Ok(())
}

/// Streams one checkpoint file to `dest` (or nowhere, to check it), checking its size and
/// CRC-32C.
async fn download_verified(
    storage: &Storage,
    base: &Path,
    f: &ManifestFile,
    dest: Option<&FsPath>,
) -> Result<(), CoreError> {
    let key = file_key(base, &f.path);
    let corrupt = |reason: String| CoreError::CorruptCheckpoint {
        key: key.to_string(),
        reason,
    };
    let r = match storage.store.get(&key).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Err(corrupt("file listed in manifest is missing".into())),
        Err(e) => return Err(e.into()),
    };
    if r.meta.size != f.size {
        return Err(corrupt(format!(
            "size {} differs from manifest's {}",
            r.meta.size, f.size
        )));
    }
    let mut out = match dest {
        Some(dest) => {
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| CoreError::io(parent, e))?;
            }
            Some((
                tokio::fs::File::create(dest)
                    .await
                    .map_err(|e| CoreError::io(dest, e))?,
                dest,
            ))
        }
        None => None,
    };
    let mut stream = r.into_stream();
    let (mut size, mut crc) = (0u64, 0u32);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        if size > f.size {
            return Err(corrupt(format!("larger than the manifest's {} bytes", f.size)));
        }
        crc = crc32c::crc32c_append(crc, &chunk);
        if let Some((file, dest)) = out.as_mut() {
            file.write_all(&chunk).await.map_err(|e| CoreError::io(dest, e))?;
        }
    }
    if let Some((file, dest)) = out.as_mut() {
        file.flush().await.map_err(|e| CoreError::io(dest, e))?;
    }
    if size != f.size {
        return Err(corrupt(format!("size {size} differs from manifest's {}", f.size)));
    }
    if crc != f.crc32c {
        return Err(corrupt(format!(
            "crc32c {crc:08x} differs from manifest's {:08x}",
            f.crc32c
        )));
    }
    Ok(())
}

/// Every checkpoint directory under `prefix` (committed, corrupt or interrupted), newest first.
pub async fn list(storage: &Storage, prefix: &Path) -> Result<Vec<CheckpointRef>, CoreError> {
    let listing = storage.store.list_with_delimiter(Some(prefix)).await?;
    let mut refs: Vec<CheckpointRef> = listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().and_then(CheckpointRef::parse_dir_name))
        .collect();
    refs.sort_unstable_by(|a, b| b.cmp(a));
    Ok(refs)
}

/// Steps that have a checkpoint directory, newest first (each step once).
pub async fn list_steps(storage: &Storage, prefix: &Path) -> Result<Vec<i64>, CoreError> {
    let mut steps: Vec<i64> = list(storage, prefix).await?.iter().map(|r| r.step).collect();
    steps.dedup();
    Ok(steps)
}

/// The lineage of `from`: `from` and the older checkpoints of its attempt, then those of the
/// attempt it started from up to where it started, and so on, newest first. `all` is the
/// listing of the trial's checkpoints.
async fn lineage_of(
    storage: &Storage,
    prefix: &Path,
    all: &[CheckpointRef],
    from: CheckpointRef,
) -> Result<Vec<CheckpointRef>, CoreError> {
    let mut out = Vec::new();
    let mut cur = Some(from);
    let mut seen = BTreeSet::new();
    while let Some(c) = cur.take() {
        if !seen.insert(c.attempt) {
            break;
        }
        let mine: Vec<CheckpointRef> = all
            .iter()
            .filter(|r| r.attempt == c.attempt && r.step <= c.step)
            .copied()
            .collect();
        // Where this attempt started: any of its manifests names it.
        for r in &mine {
            match read_manifest(storage, &manifest_key(prefix, *r)).await {
                Ok(Some(m)) => {
                    cur = m.parent.filter(|p| p.attempt < c.attempt);
                    break;
                }
                Ok(None) | Err(CoreError::CorruptCheckpoint { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.extend(mine);
    }
    Ok(out)
}

/// Outcome of a restore.
#[derive(Debug, Default)]
pub struct Restored {
    /// The checkpoint restored, or `None` when no valid one exists.
    pub restored: Option<CheckpointRef>,
    /// Newer checkpoints that were skipped, with the reason, newest first.
    pub skipped: Vec<(CheckpointRef, String)>,
}

impl Restored {
    pub fn step(&self) -> Option<i64> {
        self.restored.map(|r| r.step)
    }
}

/// Restores `from` into `dest` (emptied first), or when it cannot be restored, the newest
/// valid checkpoint of its lineage. `None` restores nothing.
pub async fn restore(
    storage: &Storage,
    prefix: &Path,
    from: Option<CheckpointRef>,
    dest: &FsPath,
) -> Result<Restored, CoreError> {
    let Some(from) = from else {
        return Ok(Restored::default());
    };
    let all = list(storage, prefix).await?;
    let candidates = lineage_of(storage, prefix, &all, from).await?;
    let mut out = Restored::default();
    if !candidates.contains(&from) {
        out.skipped.push((from, "not found in storage".into()));
    }
    restore_first_valid(storage, prefix, &candidates, dest, out).await
}

/// Restores the newest valid checkpoint under `prefix`, of whichever attempt (for tools and
/// tests that look at storage as a whole; attempts restore by lineage with [`restore`]).
pub async fn restore_latest(storage: &Storage, prefix: &Path, dest: &FsPath) -> Result<Restored, CoreError> {
    let all = list(storage, prefix).await?;
    restore_first_valid(storage, prefix, &all, dest, Restored::default()).await
}

async fn restore_first_valid(
    storage: &Storage,
    prefix: &Path,
    candidates: &[CheckpointRef],
    dest: &FsPath,
    mut out: Restored,
) -> Result<Restored, CoreError> {
    let staging = staging_dir(dest);
    for &at in candidates {
        let base = dir_of(prefix, at);
        let manifest = match read_manifest(storage, &base.clone().join(MANIFEST)).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                out.skipped.push((at, "no manifest (upload was interrupted)".into()));
                continue;
            }
            Err(CoreError::ObjectStore(e)) => return Err(CoreError::ObjectStore(e)),
            Err(e) => {
                out.skipped.push((at, e.to_string()));
                continue;
            }
        };
        remove_dir_if_any(&staging)?;
        std::fs::create_dir_all(&staging).map_err(|e| CoreError::io(&staging, e))?;
        let mut bad = None;
        for f in &manifest.files {
            match download_verified(storage, &base, f, Some(&staging.join(&f.path))).await {
                Ok(()) => {}
                Err(e @ (CoreError::ObjectStore(_) | CoreError::Io { .. })) => {
                    remove_dir_if_any(&staging)?;
                    return Err(e);
                }
                Err(e) => {
                    bad = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            out.skipped.push((at, reason));
            continue;
        }
        // The directory appears whole or not at all: a crash mid-download leaves only staging.
        remove_dir_if_any(dest)?;
        std::fs::rename(&staging, dest).map_err(|e| CoreError::io(dest, e))?;
        out.restored = Some(at);
        return Ok(out);
    }
    remove_dir_if_any(&staging)?;
    Ok(out)
}

/// Downloads the committed checkpoint `at` into `dest` as it is, every file checked against
/// its manifest's size and CRC-32C: for people and tools taking a checkpoint out of storage.
/// Unlike a restore, nothing older is tried instead: a missing manifest or a mismatching file
/// is an error naming it. Files land in `{dest}.partial`, renamed to `dest` only once all are
/// verified, so `dest` never holds a partial checkpoint; `dest` must not exist.
pub async fn download(
    storage: &Storage,
    prefix: &Path,
    at: CheckpointRef,
    dest: &FsPath,
) -> Result<Manifest, CoreError> {
    let base = dir_of(prefix, at);
    let key = base.clone().join(MANIFEST);
    let manifest = read_manifest(storage, &key)
        .await?
        .ok_or_else(|| CoreError::CorruptCheckpoint {
            key: key.to_string(),
            reason: "no manifest: the checkpoint was never committed".into(),
        })?;
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    let staging = dest.with_file_name(name);
    remove_dir_if_any(&staging)?;
    std::fs::create_dir_all(&staging).map_err(|e| CoreError::io(&staging, e))?;
    for f in &manifest.files {
        if let Err(e) = download_verified(storage, &base, f, Some(&staging.join(&f.path))).await {
            remove_dir_if_any(&staging)?;
            return Err(e);
        }
    }
    std::fs::rename(&staging, dest).map_err(|e| CoreError::io(dest, e))?;
    Ok(manifest)
}

fn staging_dir(dest: &FsPath) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".restoring");
    dest.with_file_name(name)
}

fn remove_dir_if_any(dir: &FsPath) -> Result<(), CoreError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CoreError::io(dir, e)),
    }
}

async fn delete_prefix(storage: &Storage, prefix: &Path) -> Result<(), CoreError> {
    let objects: Vec<_> = storage.store.list(Some(prefix)).try_collect().await?;
    for o in objects {
        match storage.store.delete(&o.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Deletes every checkpoint of the attempts before `attempt` (a lineage that population-based
/// training abandoned); never one of `attempt` or a newer attempt.
pub async fn discard_before(storage: &Storage, prefix: &Path, attempt: u32) -> Result<usize, CoreError> {
    let mut removed = 0;
    for at in list(storage, prefix).await? {
        if at.attempt < attempt {
            delete_prefix(storage, &dir_of(prefix, at)).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Which checkpoints of a trial to keep.
pub struct Retention<'a> {
    /// The newest this many committed checkpoints.
    pub keep_last: usize,
    /// And the best this many by the experiment's metric.
    pub keep_best: usize,
    pub maximize: bool,
    /// The metric's value at a step, when the trial reported one.
    pub score: &'a (dyn Fn(i64) -> Option<f64> + Sync),
}

/// Who prunes, and what it must leave alone.
#[derive(Debug, Clone, Copy)]
pub struct PruneScope {
    /// The pruning attempt. Checkpoints of newer attempts are never touched.
    pub attempt: u32,
    /// The checkpoint the attempt started from: its ancestors form the rest of its lineage.
    pub start: Option<CheckpointRef>,
    /// The newest checkpoint the coordinator has acknowledged. It, and every checkpoint of
    /// this attempt after it, are kept whatever the retention says: the coordinator may
    /// restore a new attempt from it, and the others' acknowledgements may be in flight.
    /// `None` keeps every checkpoint of this attempt.
    pub acknowledged: Option<CheckpointRef>,
}

/// Deletes, in the pruning attempt's lineage, committed checkpoints `retention` does not keep,
/// corrupt ones, and interrupted uploads older than the newest committed one; and every
/// checkpoint of an earlier attempt that the lineage does not reach (a stale attempt's late
/// commits, an abandoned branch). A checkpoint counts towards `keep_last` only when its files
/// are all there with their sizes. Returns how many directories were deleted.
pub async fn prune(
    storage: &Storage,
    prefix: &Path,
    scope: &PruneScope,
    retention: &Retention<'_>,
) -> Result<usize, CoreError> {
    let all = list(storage, prefix).await?;
    let mut lineage: Vec<CheckpointRef> = all.iter().filter(|r| r.attempt == scope.attempt).copied().collect();
    if let Some(start) = scope.start {
        lineage.extend(lineage_of(storage, prefix, &all, start).await?);
    }
    lineage.sort_unstable_by(|a, b| b.cmp(a));
    lineage.dedup();
    let protected = |r: &CheckpointRef| match scope.acknowledged {
        Some(ack) => *r == ack || (r.attempt == scope.attempt && r.step > ack.step),
        None => r.attempt == scope.attempt,
    };

    #[derive(PartialEq)]
    enum Health {
        Valid,
        Corrupt,
        Partial,
    }
    let mut health = BTreeMap::new();
    for &r in &lineage {
        let base = dir_of(prefix, r);
        let h = match read_manifest(storage, &base.clone().join(MANIFEST)).await {
            Ok(Some(m)) => match verify_listing(storage, &base, &m).await {
                Ok(()) => Health::Valid,
                Err(CoreError::ObjectStore(e)) => return Err(e.into()),
                Err(_) => Health::Corrupt,
            },
            Ok(None) => Health::Partial,
            Err(CoreError::ObjectStore(e)) => return Err(e.into()),
            Err(_) => Health::Corrupt,
        };
        health.insert(r, h);
    }
    let valid: Vec<CheckpointRef> = lineage
        .iter()
        .filter(|r| health[*r] == Health::Valid)
        .copied()
        .collect();
    let mut keep: BTreeSet<CheckpointRef> = valid.iter().take(retention.keep_last).copied().collect();
    let mut scored: Vec<(CheckpointRef, f64)> = valid
        .iter()
        .filter_map(|&r| (retention.score)(r.step).filter(|v| v.is_finite()).map(|v| (r, v)))
        .collect();
    scored.sort_by(|a, b| {
        let order = a.1.total_cmp(&b.1);
        // Best first; among equals, the newer.
        (if retention.maximize { order.reverse() } else { order }).then(b.0.cmp(&a.0))
    });
    keep.extend(scored.iter().take(retention.keep_best).map(|(r, _)| *r));
    let newest_valid = valid.first().copied();

    let mut removed = 0;
    for &r in &all {
        if r.attempt > scope.attempt || protected(&r) || keep.contains(&r) {
            continue;
        }
        let delete = match health.get(&r) {
            // Outside the lineage: nothing will ever restore it.
            None => r.attempt < scope.attempt,
            Some(Health::Valid) => true,
            // Only once something newer and whole is kept: until then it may be all there is.
            Some(Health::Corrupt) => newest_valid.is_some_and(|n| r < n),
            // Ours may still be uploading; an ancestor's never will be.
            Some(Health::Partial) => r.attempt < scope.attempt || newest_valid.is_some_and(|n| r < n),
        };
        if delete {
            delete_prefix(storage, &dir_of(prefix, r)).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
