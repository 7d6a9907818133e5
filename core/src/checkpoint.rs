//! Crash-safe checkpoints on object storage.
//!
//! Object stores cannot rename, so a checkpoint is committed by writing its `MANIFEST.json`
//! last, with create-if-absent, listing every file with its size and CRC-32C. A directory
//! without a manifest is an interrupted upload and is ignored; one whose files do not match
//! its manifest is corrupt, and restore falls back to the next older checkpoint.

use crate::error::CoreError;
use crate::storage::Storage;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use std::path::{Path as FsPath, PathBuf};

pub const MANIFEST: &str = "MANIFEST.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub step: i64,
    pub created_unix_ms: i64,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub crc32c: u32,
}

/// Directory name of a step: zero-padded so names sort by step.
pub fn step_dir(step: i64) -> String {
    format!("{step:012}")
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

/// Uploads every file of `dir` as the checkpoint of `step` under `prefix`, manifest last.
/// Returns `None` when the directory is empty. If a valid checkpoint of this step already
/// exists (an earlier attempt committed it), it is kept and returned unchanged.
pub async fn commit(storage: &Storage, prefix: &Path, step: i64, dir: &FsPath) -> Result<Option<Manifest>, CoreError> {
    let files = local_files(dir)?;
    if files.is_empty() {
        return Ok(None);
    }
    let base = prefix.clone().join(step_dir(step));
    let manifest_key = base.clone().join(MANIFEST);
    match read_manifest(storage, &manifest_key).await {
        Ok(Some(m)) if verify(storage, &base, &m).await.is_ok() => return Ok(Some(m)),
        Ok(None) => {}
        // Corrupt or unreadable: clear it so this commit can take its place.
        _ => delete_prefix(storage, &base).await?,
    }
    let mut entries = Vec::with_capacity(files.len());
    for rel in &files {
        let full = dir.join(rel);
        let data = tokio::fs::read(&full).await.map_err(|e| CoreError::io(&full, e))?;
        let rel_str = rel.to_string_lossy().replace('\\', "/");
        entries.push(ManifestFile {
            path: rel_str.clone(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(&data),
        });
        let key = rel_str.split('/').fold(base.clone(), |p, part| p.join(part));
        storage.store.put(&key, PutPayload::from(data)).await?;
    }
    let manifest = Manifest {
        version: 1,
        step,
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
    match storage
        .store
        .put_opts(&manifest_key, PutPayload::from(body), opts)
        .await
    {
        Ok(_) => Ok(Some(manifest)),
        Err(object_store::Error::AlreadyExists { .. }) => {
            // Another writer committed this step between our check and our put; theirs stands.
            Ok(read_manifest(storage, &manifest_key).await?)
        }
        Err(e) => Err(e.into()),
    }
}

async fn read_manifest(storage: &Storage, key: &Path) -> Result<Option<Manifest>, CoreError> {
    let bytes = match storage.store.get(key).await {
        Ok(r) => r.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| CoreError::CorruptCheckpoint {
            key: key.to_string(),
            reason: format!("manifest is not valid: {e}"),
        })
}

async fn fetch_verified(storage: &Storage, base: &Path, f: &ManifestFile) -> Result<bytes::Bytes, CoreError> {
    let key = f.path.split('/').fold(base.clone(), |p, part| p.join(part));
    let data = match storage.store.get(&key).await {
        Ok(r) => r.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(CoreError::CorruptCheckpoint {
                key: key.to_string(),
                reason: "file listed in manifest is missing".into(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    if data.len() as u64 != f.size {
        return Err(CoreError::CorruptCheckpoint {
            key: key.to_string(),
            reason: format!("size {} differs from manifest's {}", data.len(), f.size),
        });
    }
    let crc = crc32c::crc32c(&data);
    if crc != f.crc32c {
        return Err(CoreError::CorruptCheckpoint {
            key: key.to_string(),
            reason: format!("crc32c {crc:08x} differs from manifest's {:08x}", f.crc32c),
        });
    }
    Ok(data)
}

async fn verify(storage: &Storage, base: &Path, m: &Manifest) -> Result<(), CoreError> {
    for f in &m.files {
        fetch_verified(storage, base, f).await?;
    }
    Ok(())
}

/// Steps that have a manifest (committed or corrupt), newest first.
pub async fn list_steps(storage: &Storage, prefix: &Path) -> Result<Vec<i64>, CoreError> {
    let listing = storage.store.list_with_delimiter(Some(prefix)).await?;
    let mut steps: Vec<i64> = listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().and_then(|n| n.parse().ok()))
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    Ok(steps)
}

/// Deletes every checkpoint under `prefix` (a lineage that population-based training abandoned).
pub async fn discard_all(storage: &Storage, prefix: &Path) -> Result<usize, CoreError> {
    let steps = list_steps(storage, prefix).await?;
    for &step in &steps {
        delete_prefix(storage, &prefix.clone().join(step_dir(step))).await?;
    }
    Ok(steps.len())
}

/// Outcome of a restore.
#[derive(Debug, Default)]
pub struct Restored {
    /// Step restored, or `None` when no valid checkpoint exists.
    pub step: Option<i64>,
    /// Newer checkpoints that were skipped, with the reason, newest first.
    pub skipped: Vec<(i64, String)>,
}

/// Restores the newest valid checkpoint under `prefix` into `dest` (emptied first).
pub async fn restore_latest(storage: &Storage, prefix: &Path, dest: &FsPath) -> Result<Restored, CoreError> {
    let mut out = Restored::default();
    for step in list_steps(storage, prefix).await? {
        let base = prefix.clone().join(step_dir(step));
        let manifest = match read_manifest(storage, &base.clone().join(MANIFEST)).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                out.skipped.push((step, "no manifest (upload was interrupted)".into()));
                continue;
            }
            Err(e) => {
                out.skipped.push((step, e.to_string()));
                continue;
            }
        };
        let mut files = Vec::with_capacity(manifest.files.len());
        let mut bad = None;
        for f in &manifest.files {
            match fetch_verified(storage, &base, f).await {
                Ok(d) => files.push((f.path.clone(), d)),
                Err(CoreError::ObjectStore(e)) => return Err(CoreError::ObjectStore(e)),
                Err(e) => {
                    bad = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            out.skipped.push((step, reason));
            continue;
        }
        if dest.exists() {
            std::fs::remove_dir_all(dest).map_err(|e| CoreError::io(dest, e))?;
        }
        std::fs::create_dir_all(dest).map_err(|e| CoreError::io(dest, e))?;
        for (rel, data) in files {
            if rel.split('/').any(|p| p == ".." || p.is_empty()) {
                return Err(CoreError::CorruptCheckpoint {
                    key: base.to_string(),
                    reason: format!("unsafe path {rel:?}"),
                });
            }
            let path = dest.join(&rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
            }
            std::fs::write(&path, &data).map_err(|e| CoreError::io(&path, e))?;
        }
        out.step = Some(step);
        return Ok(out);
    }
    Ok(out)
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

/// Deletes committed checkpoints that `retention` does not keep, and interrupted uploads older
/// than the newest committed one. Newer uploads without a manifest may still be in flight and
/// are left alone. Returns how many were deleted.
pub async fn prune(storage: &Storage, prefix: &Path, retention: &Retention<'_>) -> Result<usize, CoreError> {
    let steps = list_steps(storage, prefix).await?;
    let mut committed = Vec::new();
    for &step in &steps {
        match storage
            .store
            .head(&prefix.clone().join(step_dir(step)).join(MANIFEST))
            .await
        {
            Ok(_) => committed.push(step),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut keep: std::collections::BTreeSet<i64> = committed.iter().take(retention.keep_last).copied().collect();
    let mut scored: Vec<(i64, f64)> = committed
        .iter()
        .filter_map(|&s| (retention.score)(s).filter(|v| v.is_finite()).map(|v| (s, v)))
        .collect();
    scored.sort_by(|a, b| {
        let order = a.1.total_cmp(&b.1);
        // Best first; among equals, the newer.
        (if retention.maximize { order.reverse() } else { order }).then(b.0.cmp(&a.0))
    });
    keep.extend(scored.iter().take(retention.keep_best).map(|(s, _)| *s));
    let newest_committed = committed.first().copied();
    let mut removed = 0;
    for step in steps {
        let stale_partial = !committed.contains(&step) && newest_committed.is_some_and(|n| step < n);
        if keep.contains(&step) || !(committed.contains(&step) || stale_partial) {
            continue;
        }
        delete_prefix(storage, &prefix.clone().join(step_dir(step))).await?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{StorageUri, open};

    fn mem(name: &str) -> Storage {
        open(
            &StorageUri::parse(&format!("memory://{name}")).unwrap(),
            &Default::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn commit_restore_and_fallback() {
        let s = mem("ckpt-fallback");
        let prefix = Path::from("t/checkpoints");
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("state.txt"), "step 1").unwrap();
        std::fs::write(src.path().join("sub/w.bin"), [1u8, 2, 3]).unwrap();
        commit(&s, &prefix, 1, src.path()).await.unwrap().unwrap();
        std::fs::write(src.path().join("state.txt"), "step 2").unwrap();
        let m2 = commit(&s, &prefix, 2, src.path()).await.unwrap().unwrap();
        assert_eq!(m2.files.len(), 2);

        // An interrupted upload of step 3: files but no manifest.
        s.store
            .put(
                &prefix.clone().join(step_dir(3)).clone().join("state.txt"),
                "partial".into(),
            )
            .await
            .unwrap();
        let dest = tempfile::tempdir().unwrap();
        let r = restore_latest(&s, &prefix, dest.path()).await.unwrap();
        assert_eq!(r.step, Some(2));
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(
            std::fs::read_to_string(dest.path().join("state.txt")).unwrap(),
            "step 2"
        );
        assert_eq!(std::fs::read(dest.path().join("sub/w.bin")).unwrap(), vec![1, 2, 3]);

        // Corrupt step 2: restore falls back to step 1.
        s.store
            .put(
                &prefix.clone().join(step_dir(2)).clone().join("state.txt"),
                "step X".into(),
            )
            .await
            .unwrap();
        let r = restore_latest(&s, &prefix, dest.path()).await.unwrap();
        assert_eq!(r.step, Some(1));
        assert!(
            r.skipped.iter().any(|(st, why)| *st == 2 && why.contains("crc32c")),
            "{:?}",
            r.skipped
        );
        assert_eq!(
            std::fs::read_to_string(dest.path().join("state.txt")).unwrap(),
            "step 1"
        );

        // Re-committing the corrupt step replaces it.
        std::fs::write(src.path().join("state.txt"), "step 2 again").unwrap();
        commit(&s, &prefix, 2, src.path()).await.unwrap();
        let r = restore_latest(&s, &prefix, dest.path()).await.unwrap();
        assert_eq!(r.step, Some(2));
        assert_eq!(
            std::fs::read_to_string(dest.path().join("state.txt")).unwrap(),
            "step 2 again"
        );

        // Keep the newest committed one; the newer partial upload may be in flight.
        let last_only = Retention {
            keep_last: 1,
            keep_best: 0,
            maximize: false,
            score: &|_| None,
        };
        assert_eq!(prune(&s, &prefix, &last_only).await.unwrap(), 1);
        assert_eq!(list_steps(&s, &prefix).await.unwrap(), vec![3, 2]);
    }

    #[tokio::test]
    async fn retention_keeps_the_newest_and_the_best() {
        let s = mem("ckpt-retention");
        let prefix = Path::from("r/checkpoints");
        let src = tempfile::tempdir().unwrap();
        for step in 1..=6 {
            std::fs::write(src.path().join("w"), format!("{step}")).unwrap();
            commit(&s, &prefix, step, src.path()).await.unwrap();
        }
        // Loss by step: step 2 is the best, then step 5.
        let loss = |step: i64| Some([0.0, 0.9, 0.1, 0.8, 0.7, 0.3, 0.6][step as usize]);
        let r = Retention {
            keep_last: 2,
            keep_best: 1,
            maximize: false,
            score: &loss,
        };
        assert_eq!(prune(&s, &prefix, &r).await.unwrap(), 3);
        assert_eq!(list_steps(&s, &prefix).await.unwrap(), vec![6, 5, 2]);
        let r = Retention {
            keep_last: 1,
            keep_best: 1,
            maximize: true,
            score: &loss,
        };
        prune(&s, &prefix, &r).await.unwrap();
        assert_eq!(
            list_steps(&s, &prefix).await.unwrap(),
            vec![6],
            "step 6 is newest, and best of what is left"
        );
    }

    #[tokio::test]
    async fn empty_dir_commits_nothing() {
        let s = mem("ckpt-empty");
        let src = tempfile::tempdir().unwrap();
        assert!(commit(&s, &Path::from("x"), 1, src.path()).await.unwrap().is_none());
        let r = restore_latest(&s, &Path::from("x"), src.path()).await.unwrap();
        assert_eq!(r.step, None);
    }
}
