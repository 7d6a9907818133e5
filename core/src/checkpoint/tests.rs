use super::*;
use crate::storage::{StorageUri, open};

fn mem(name: &str) -> Storage {
    open(
        &StorageUri::parse(&format!("memory://{name}")).unwrap(),
        &Default::default(),
    )
    .unwrap()
}

fn at(step: i64, attempt: u32) -> CheckpointRef {
    CheckpointRef::new(step, attempt)
}

/// A local checkpoint directory holding `content` in `w`.
fn dir_with(content: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("w"), content).unwrap();
    d
}

async fn put(s: &Storage, key: Path, body: &'static str) {
    s.store.put(&key, body.into()).await.unwrap();
}

async fn restored_content(s: &Storage, prefix: &Path, from: Option<CheckpointRef>) -> (Restored, Option<String>) {
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("ckpt");
    let r = restore(s, prefix, from, &target).await.unwrap();
    let content = std::fs::read_to_string(target.join("w")).ok();
    (r, content)
}

const NONE: Retention<'static> = Retention {
    keep_last: 1,
    keep_best: 0,
    maximize: false,
    score: &|_| None,
};

#[test]
fn directory_names_sort_and_parse() {
    for r in [at(0, 0), at(7, 0), at(7, 3), at(123_456, 9999)] {
        assert_eq!(CheckpointRef::parse_dir_name(&r.dir_name()), Some(r), "{r}");
    }
    assert_eq!(at(5, 0).dir_name(), "000000000005");
    assert_eq!(at(5, 2).dir_name(), "000000000005-a0002");
    assert!(at(5, 9).dir_name() < at(6, 1).dir_name());
    for bad in ["", "x", "5-a", "5-a0", "5-ax", "-a1", "5-b1", "+5"] {
        assert_eq!(CheckpointRef::parse_dir_name(bad), None, "{bad}");
    }
}

#[test]
fn manifests_with_unsafe_or_unbounded_content_are_refused() {
    let ok = r#"{"version":2,"step":1,"attempt":1,"created_unix_ms":0,"files":[{"path":"a/b","size":1,"crc32c":0}]}"#;
    assert!(Manifest::parse(ok.as_bytes()).is_ok());
    let legacy = r#"{"version":1,"step":1,"created_unix_ms":0,"files":[]}"#;
    assert_eq!(Manifest::parse(legacy.as_bytes()).unwrap().attempt, 0);
    for path in ["../x", "/abs", "a//b", "a/./b", "", "a\\..\\b", "MANIFEST.json"] {
        let m = format!(
            r#"{{"version":2,"step":1,"created_unix_ms":0,"files":[{{"path":{path:?},"size":1,"crc32c":0}}]}}"#
        );
        assert!(Manifest::parse(m.as_bytes()).is_err(), "{path:?} must be refused");
    }
    let twice = r#"{"version":2,"step":1,"created_unix_ms":0,"files":[{"path":"a","size":1,"crc32c":0},{"path":"a","size":1,"crc32c":0}]}"#;
    assert!(Manifest::parse(twice.as_bytes()).unwrap_err().contains("twice"));
    let newer_parent =
        r#"{"version":2,"step":1,"attempt":1,"parent":{"step":0,"attempt":2},"created_unix_ms":0,"files":[]}"#;
    assert!(Manifest::parse(newer_parent.as_bytes()).is_err());
    let huge = vec![b' '; MAX_MANIFEST_BYTES as usize + 1];
    assert!(Manifest::parse(&huge).unwrap_err().contains("limit"));
}

#[tokio::test]
async fn commit_restore_and_fallback() {
    let s = mem("ckpt-fallback");
    let prefix = Path::from("t/checkpoints");
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("sub")).unwrap();
    std::fs::write(src.path().join("w"), "step 1").unwrap();
    std::fs::write(src.path().join("sub/x.bin"), [1u8, 2, 3]).unwrap();
    commit(&s, &prefix, at(1, 1), None, src.path()).await.unwrap().unwrap();
    std::fs::write(src.path().join("w"), "step 2").unwrap();
    let m2 = commit(&s, &prefix, at(2, 1), None, src.path()).await.unwrap().unwrap();
    assert_eq!(m2.files.len(), 2);
    assert_eq!(m2.at(), at(2, 1));

    // An interrupted upload of step 3: files but no manifest.
    put(&s, dir_of(&prefix, at(3, 1)).join("w"), "partial").await;
    let (r, content) = restored_content(&s, &prefix, Some(at(3, 1))).await;
    assert_eq!(r.restored, Some(at(2, 1)));
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(content.as_deref(), Some("step 2"));

    // Corrupt step 2: restore falls back to step 1.
    put(&s, dir_of(&prefix, at(2, 1)).join("w"), "step X").await;
    let (r, content) = restored_content(&s, &prefix, Some(at(2, 1))).await;
    assert_eq!(r.restored, Some(at(1, 1)));
    assert!(
        r.skipped
            .iter()
            .any(|(a, why)| *a == at(2, 1) && why.contains("crc32c")),
        "{:?}",
        r.skipped
    );
    assert_eq!(content.as_deref(), Some("step 1"));

    // Re-committing the corrupt step (the same attempt again) replaces it.
    std::fs::write(src.path().join("w"), "step 2 again").unwrap();
    commit(&s, &prefix, at(2, 1), None, src.path()).await.unwrap();
    let (r, content) = restored_content(&s, &prefix, Some(at(2, 1))).await;
    assert_eq!(r.restored, Some(at(2, 1)));
    assert_eq!(content.as_deref(), Some("step 2 again"));

    // Nothing acknowledged: nothing restored, whatever storage holds.
    let (r, content) = restored_content(&s, &prefix, None).await;
    assert_eq!((r.restored, content), (None, None));

    // Keep the newest committed one; the newer partial upload may be in flight.
    let scope = PruneScope {
        attempt: 1,
        start: None,
        acknowledged: Some(at(2, 1)),
    };
    assert_eq!(prune(&s, &prefix, &scope, &NONE).await.unwrap(), 1);
    assert_eq!(list(&s, &prefix).await.unwrap(), vec![at(3, 1), at(2, 1)]);
}

/// A stale attempt (its worker frozen past its lease, then resumed) commits the same step as
/// the attempt that replaced it, and a later step of its own: neither reaches the new
/// attempt's history.
#[tokio::test]
async fn a_stale_attempt_can_neither_overwrite_nor_enter_the_new_lineage() {
    let s = mem("ckpt-stale");
    let prefix = Path::from("t/checkpoints");
    commit(&s, &prefix, at(5, 1), None, dir_with("a1 step 5").path())
        .await
        .unwrap();
    // Attempt 2 resumes from the acknowledged step 5 and commits step 10.
    commit(&s, &prefix, at(10, 2), Some(at(5, 1)), dir_with("a2 step 10").path())
        .await
        .unwrap();
    // The stale attempt 1 commits step 10 too, and step 12.
    let stale = commit(&s, &prefix, at(10, 1), None, dir_with("a1 step 10").path())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale.at(), at(10, 1), "the stale commit lands in its own directory");
    commit(&s, &prefix, at(12, 1), None, dir_with("a1 step 12").path())
        .await
        .unwrap();

    let (r, content) = restored_content(&s, &prefix, Some(at(10, 2))).await;
    assert_eq!(r.restored, Some(at(10, 2)));
    assert_eq!(
        content.as_deref(),
        Some("a2 step 10"),
        "the new attempt's step 10 is intact"
    );

    // With attempt 2's step 10 corrupt, the fallback is where attempt 2 started, never the
    // stale attempt's later steps.
    put(&s, dir_of(&prefix, at(10, 2)).join("w"), "garbage!!").await;
    let (r, content) = restored_content(&s, &prefix, Some(at(10, 2))).await;
    assert_eq!(r.restored, Some(at(5, 1)));
    assert_eq!(content.as_deref(), Some("a1 step 5"));
}

/// The failure this fences: with `keep_last: 1`, a stale attempt pruning after its late commit
/// deleted the checkpoint the coordinator had handed to the new attempt.
#[tokio::test]
async fn a_stale_attempts_retention_spares_what_the_new_attempt_relies_on() {
    let s = mem("ckpt-stale-prune");
    let prefix = Path::from("t/checkpoints");
    commit(&s, &prefix, at(5, 1), None, dir_with("a1 step 5").path())
        .await
        .unwrap();
    commit(&s, &prefix, at(6, 2), Some(at(5, 1)), dir_with("a2 step 6").path())
        .await
        .unwrap();
    commit(&s, &prefix, at(8, 1), None, dir_with("a1 step 8").path())
        .await
        .unwrap();
    // The stale attempt's last acknowledged checkpoint was step 5.
    let stale = PruneScope {
        attempt: 1,
        start: None,
        acknowledged: Some(at(5, 1)),
    };
    prune(&s, &prefix, &stale, &NONE).await.unwrap();
    assert_eq!(list(&s, &prefix).await.unwrap(), vec![at(8, 1), at(6, 2), at(5, 1)]);

    // Attempt 2 prunes: its lineage keeps its newest; the stale branch goes.
    let current = PruneScope {
        attempt: 2,
        start: Some(at(5, 1)),
        acknowledged: Some(at(6, 2)),
    };
    assert_eq!(prune(&s, &prefix, &current, &NONE).await.unwrap(), 2);
    assert_eq!(list(&s, &prefix).await.unwrap(), vec![at(6, 2)]);
}

/// The other half of the reported failure: retention trusted a manifest whose files had been
/// overwritten, kept only that step, and deleted the only valid one.
#[tokio::test]
async fn retention_never_deletes_the_only_valid_checkpoint() {
    let s = mem("ckpt-verify");
    let prefix = Path::from("t/checkpoints");
    commit(&s, &prefix, at(1, 1), None, dir_with("step 1").path())
        .await
        .unwrap();
    commit(&s, &prefix, at(2, 1), None, dir_with("step 2").path())
        .await
        .unwrap();
    put(&s, dir_of(&prefix, at(2, 1)).join("w"), "cut").await;
    let scope = PruneScope {
        attempt: 1,
        start: None,
        acknowledged: Some(at(2, 1)),
    };
    prune(&s, &prefix, &scope, &NONE).await.unwrap();
    assert_eq!(list(&s, &prefix).await.unwrap(), vec![at(2, 1), at(1, 1)]);
    let (r, content) = restored_content(&s, &prefix, Some(at(2, 1))).await;
    assert_eq!((r.restored, content.as_deref()), (Some(at(1, 1)), Some("step 1")));

    // Once a newer whole checkpoint exists, the corrupt one and the old one go.
    commit(&s, &prefix, at(3, 1), None, dir_with("step 3").path())
        .await
        .unwrap();
    let scope = PruneScope {
        acknowledged: Some(at(3, 1)),
        ..scope
    };
    assert_eq!(prune(&s, &prefix, &scope, &NONE).await.unwrap(), 2);
    assert_eq!(list(&s, &prefix).await.unwrap(), vec![at(3, 1)]);
}

#[tokio::test]
async fn retention_keeps_the_newest_and_the_best() {
    let s = mem("ckpt-retention");
    let prefix = Path::from("r/checkpoints");
    for step in 1..=6 {
        commit(&s, &prefix, at(step, 1), None, dir_with(&format!("{step}")).path())
            .await
            .unwrap();
    }
    let scope = PruneScope {
        attempt: 1,
        start: None,
        acknowledged: Some(at(6, 1)),
    };
    // Loss by step: step 2 is the best, then step 5.
    let loss = |step: i64| Some([0.0, 0.9, 0.1, 0.8, 0.7, 0.3, 0.6][step as usize]);
    let r = Retention {
        keep_last: 2,
        keep_best: 1,
        maximize: false,
        score: &loss,
    };
    assert_eq!(prune(&s, &prefix, &scope, &r).await.unwrap(), 3);
    assert_eq!(list_steps(&s, &prefix).await.unwrap(), vec![6, 5, 2]);
    let r = Retention {
        keep_last: 1,
        keep_best: 1,
        maximize: true,
        score: &loss,
    };
    prune(&s, &prefix, &scope, &r).await.unwrap();
    assert_eq!(
        list_steps(&s, &prefix).await.unwrap(),
        vec![6],
        "step 6 is newest, and best of what is left"
    );
}

#[tokio::test]
async fn checkpoints_before_attempts_had_directories_of_their_own_still_restore() {
    let s = mem("ckpt-legacy");
    let prefix = Path::from("t/checkpoints");
    commit(&s, &prefix, at(4, 0), None, dir_with("legacy 4").path())
        .await
        .unwrap();
    assert!(
        s.store
            .head(&prefix.clone().join("000000000004").join(MANIFEST))
            .await
            .is_ok()
    );
    commit(&s, &prefix, at(7, 3), Some(at(4, 0)), dir_with("a3 step 7").path())
        .await
        .unwrap();
    let (r, content) = restored_content(&s, &prefix, Some(at(4, 0))).await;
    assert_eq!((r.restored, content.as_deref()), (Some(at(4, 0)), Some("legacy 4")));
    put(&s, dir_of(&prefix, at(7, 3)).join("w"), "garbage").await;
    let (r, _) = restored_content(&s, &prefix, Some(at(7, 3))).await;
    assert_eq!(r.restored, Some(at(4, 0)), "the lineage reaches the legacy checkpoint");
}

/// Files larger than the streaming chunk go up in parts and come back whole.
#[tokio::test]
async fn large_files_stream_both_ways() {
    let s = mem("ckpt-large");
    let prefix = Path::from("t/checkpoints");
    let src = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..(IO_CHUNK * 2 + 12_345)).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.path().join("w"), &big).unwrap();
    let m = commit(&s, &prefix, at(1, 1), None, src.path()).await.unwrap().unwrap();
    assert_eq!(m.files[0].size, big.len() as u64);
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("ckpt");
    restore(&s, &prefix, Some(at(1, 1)), &target).await.unwrap();
    assert!(std::fs::read(target.join("w")).unwrap() == big);
    assert!(!staging_dir(&target).exists());
}

#[tokio::test]
async fn empty_dir_commits_nothing() {
    let s = mem("ckpt-empty");
    let src = tempfile::tempdir().unwrap();
    assert!(
        commit(&s, &Path::from("x"), at(1, 1), None, src.path())
            .await
            .unwrap()
            .is_none()
    );
    let r = restore_latest(&s, &Path::from("x"), src.path()).await.unwrap();
    assert_eq!(r.restored, None);
}

#[tokio::test]
async fn discarding_an_abandoned_lineage_spares_the_current_attempt() {
    let s = mem("ckpt-discard");
    let prefix = Path::from("t/checkpoints");
    commit(&s, &prefix, at(1, 1), None, dir_with("1").path()).await.unwrap();
    commit(&s, &prefix, at(2, 2), None, dir_with("2").path()).await.unwrap();
    commit(&s, &prefix, at(3, 3), None, dir_with("3").path()).await.unwrap();
    assert_eq!(discard_before(&s, &prefix, 2).await.unwrap(), 1);
    assert_eq!(list(&s, &prefix).await.unwrap(), vec![at(3, 3), at(2, 2)]);
}

/// A download is exact: the checkpoint asked for, every file verified, nothing older instead;
/// a mismatch names the file and leaves neither the directory nor its staging behind.
#[tokio::test]
async fn a_download_is_verified_and_never_partial() {
    let s = mem("ckpt-download");
    let prefix = Path::from("t/checkpoints");
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("sub")).unwrap();
    std::fs::write(src.path().join("w"), "step 1").unwrap();
    std::fs::write(src.path().join("sub/x.bin"), [1u8, 2, 3]).unwrap();
    commit(&s, &prefix, at(1, 1), None, src.path()).await.unwrap().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("ckpt");
    let m = download(&s, &prefix, at(1, 1), &dest).await.unwrap();
    assert_eq!(m.files.len(), 2);
    assert_eq!(std::fs::read_to_string(dest.join("w")).unwrap(), "step 1");
    assert_eq!(std::fs::read(dest.join("sub/x.bin")).unwrap(), [1, 2, 3]);
    // Same size, other bytes: the checksum catches it.
    put(&s, dir_of(&prefix, at(1, 1)).join("w"), "step X").await;
    let bad = out.path().join("bad");
    let e = download(&s, &prefix, at(1, 1), &bad).await.unwrap_err();
    assert!(
        matches!(&e, CoreError::CorruptCheckpoint { key, reason } if key.ends_with("/w") && reason.contains("crc32c")),
        "{e}"
    );
    assert!(!bad.exists() && !out.path().join("bad.partial").exists());
    // An uncommitted checkpoint (no manifest) is not downloaded.
    put(&s, dir_of(&prefix, at(2, 1)).join("w"), "partial").await;
    let e = download(&s, &prefix, at(2, 1), &bad).await.unwrap_err();
    assert!(e.to_string().contains("no manifest"), "{e}");
    assert!(!bad.exists());
}
