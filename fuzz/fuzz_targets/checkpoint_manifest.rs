//! A checkpoint's `MANIFEST.json` as restore reads it: `Manifest::parse` (bounds, safe paths),
//! then `checkpoint::restore_latest` over an in-memory object store, with the fuzzed manifest as
//! the newest checkpoint and a valid older one.
//!
//! Input: the manifest's bytes. When `Manifest::parse` accepts them, the files they list (the
//! first [`MAX_FILES`], up to [`MAX_FILE_BYTES`] each) are stored with the listed size and the
//! manifest is stored with their true CRC-32Cs, so restore gets past verification and reaches
//! the code that turns manifest paths into local files; otherwise the bytes are stored as they
//! are. Oracles: no panic; restore never fails (the store does not), writes nothing outside its
//! destination and leaves no staging directory; it restores the fuzzed checkpoint exactly, or
//! when it cannot be restored, the older one exactly.
#![no_main]

use chorus_core::checkpoint::{MANIFEST, Manifest, ManifestFile, restore_latest, step_dir};
use chorus_core::storage::Storage;
use libfuzzer_sys::fuzz_target;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, OnceLock};

const MAX_FILES: usize = 16;
const MAX_FILE_BYTES: u64 = 64 * 1024;
const OLD_STEP: i64 = 1;
const NEW_STEP: i64 = 2;
const OLD_FILE: &str = "state.json";
const OLD_STATE: &[u8] = br#"{"epoch": 1, "best": null}"#;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap())
}

/// A scratch directory of this process; restore writes into `dest` inside it.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("chorus-fuzz-checkpoint-{}", std::process::id())))
}

/// The object key restore reads a manifest file from.
fn key(base: &Path, rel: &str) -> Path {
    rel.split('/').fold(base.clone(), |p, part| p.join(part))
}

async fn put(storage: &Storage, key: &Path, data: Vec<u8>) {
    storage
        .store
        .put(key, PutPayload::from(data))
        .await
        .expect("in-memory put");
}

/// Every file under `dir`, relative, `/`-separated, sorted.
fn files_under(dir: &FsPath) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let storage = Storage {
        store: Arc::new(object_store::memory::InMemory::new()),
        root: Path::default(),
    };
    let prefix = Path::from("experiments/1/trials/1/checkpoints");
    let old_base = prefix.clone().join(step_dir(OLD_STEP));
    let new_base = prefix.clone().join(step_dir(NEW_STEP));
    let root = scratch();
    let _ = std::fs::remove_dir_all(root);
    let dest = root.join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("left-over"), b"from an earlier attempt").unwrap();

    let parsed = Manifest::parse(data).ok();
    // What the fuzzed checkpoint holds when it is restorable: its files, with their sizes.
    let mut restorable = None;
    let restored = runtime().block_on(async {
        // A valid older checkpoint to fall back to.
        put(&storage, &key(&old_base, OLD_FILE), OLD_STATE.to_vec()).await;
        let old = Manifest {
            version: 1,
            step: OLD_STEP,
            attempt: 0,
            parent: None,
            created_unix_ms: 0,
            files: vec![ManifestFile {
                path: OLD_FILE.into(),
                size: OLD_STATE.len() as u64,
                crc32c: crc32c::crc32c(OLD_STATE),
            }],
        };
        put(
            &storage,
            &old_base.clone().join(MANIFEST),
            serde_json::to_vec(&old).unwrap(),
        )
        .await;

        let manifest = match &parsed {
            Some(m) if m.files.len() <= MAX_FILES && m.files.iter().all(|f| f.size <= MAX_FILE_BYTES) => {
                let mut m = m.clone();
                for (i, f) in m.files.iter_mut().enumerate() {
                    let body: Vec<u8> = (0..f.size).map(|j| (i as u64 + j) as u8).collect();
                    f.crc32c = crc32c::crc32c(&body);
                    put(&storage, &key(&new_base, &f.path), body).await;
                }
                let mut files: Vec<(String, u64)> = m.files.iter().map(|f| (f.path.clone(), f.size)).collect();
                files.sort();
                restorable = Some(files);
                serde_json::to_vec(&m).unwrap()
            }
            _ => data.to_vec(),
        };
        put(&storage, &new_base.clone().join(MANIFEST), manifest).await;
        restore_latest(&storage, &prefix, &dest).await
    });

    // Whatever happened, nothing was written beside the destination, staging included.
    for e in std::fs::read_dir(root).unwrap() {
        let name = e.unwrap().file_name();
        assert_eq!(name, "dest", "restore left {name:?} beside its destination");
    }
    let r = match restored {
        Ok(r) => r,
        Err(e) => panic!("restore failed although the store works and an older checkpoint is valid: {e}"),
    };
    let on_disk = files_under(&dest);
    match r.step() {
        Some(OLD_STEP) => assert_eq!(on_disk, [OLD_FILE], "the older checkpoint, exactly"),
        Some(NEW_STEP) => {
            let files = restorable.expect("only a manifest that parses is restorable");
            let sizes: Vec<(String, u64)> = on_disk
                .iter()
                .map(|p| (p.clone(), std::fs::metadata(dest.join(p)).unwrap().len()))
                .collect();
            // A manifest may list a file that is also a directory of another; it is refused then.
            assert_eq!(sizes, files, "the fuzzed checkpoint, exactly");
        }
        other => panic!("restored step {other:?}, which was never stored whole"),
    }
});
