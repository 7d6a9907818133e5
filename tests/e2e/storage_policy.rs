//! Where experiments may write: only under the storage the coordinator allows, however the
//! path is spelled, and in paths of the coordinator's own store.

use super::*;
use chorus_tests::ClusterConfig;

const QUICK: &str = r#"
name: e2e-storage
metric: {name: loss, goal: minimize}
parameters:
  k: {values: [1]}
searcher: {name: grid}
trial:
  command: [sh, -c, 'echo "chorus:metric {\"loss\": ${params.k}}"']
"#;

/// Specs naming storage outside the allowed prefixes are refused as spec errors (exit 2) that
/// name what is allowed, and nothing is created there; allowed storage is used normalised,
/// with the coordinator's cluster id as its last segment.
#[test]
fn experiment_storage_stays_where_the_coordinator_allows() {
    let shared = tempfile::tempdir().unwrap();
    let shared_uri = format!("file://{}", shared.path().display());
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        coordinator_args: vec!["--allowed-storage".into(), shared_uri.clone()],
        ..Default::default()
    })
    .unwrap();
    let data = c.coordinator_dir();
    let own = format!("file://{}/storage/", data.display());
    let outside = c.dir.path().join("elsewhere");
    let cases = [
        (format!("file://{}", outside.display()), outside.clone()),
        (
            format!("file://{}/storage/../../escape", data.display()),
            c.dir.path().join("escape"),
        ),
        (
            format!("file://{}/storage/..%2F..%2Fescape2", data.display()),
            c.dir.path().join("escape2"),
        ),
        (
            format!("{shared_uri}-sibling"),
            std::path::PathBuf::from(format!("{}-sibling", shared.path().display())),
        ),
    ];
    for (storage, must_not_exist) in cases {
        let spec = c.write("outside.yaml", &format!("{QUICK}storage: {storage}\n"));
        let out = c.chorus(&["experiment", "submit", spec.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{storage}: {err}");
        assert!(err.contains("storage"), "{storage}: {err}");
        assert!(
            err.contains("is outside the storage this coordinator allows"),
            "{storage}: {err}"
        );
        assert!(err.contains(&own), "{storage}: names its own storage: {err}");
        assert!(err.contains(&shared_uri), "{storage}: names the allowed prefix: {err}");
        assert!(!must_not_exist.exists(), "{} was created", must_not_exist.display());
    }
    let spec = c.write("memory.yaml", &format!("{QUICK}storage: memory://t\n"));
    let out = c.chorus(&["experiment", "submit", spec.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("for tests only"), "{err}");
    let listed = c.chorus_json(&["experiment", "list", "--output", "json"]).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "nothing stored: {listed}");

    let spec = c.write("shared.yaml", &format!("{QUICK}storage: {shared_uri}/team/./a//\n"));
    let id = submit(&c, &spec);
    assert_eq!(wait_ended(&c, id, Duration::from_secs(60)), "completed");
    let uri = experiment(&c, id).unwrap()["storage"].as_str().unwrap().to_string();
    let cluster = uri
        .strip_prefix(&format!("{shared_uri}/team/a/"))
        .and_then(|c| c.strip_suffix('/'))
        .unwrap_or_else(|| panic!("{uri}"));
    assert!(cluster.len() == 16 && !cluster.contains('/'), "{uri}");
    let dir = experiment_dir(&c, id);
    assert!(
        dir.starts_with(shared.path().join("team/a").join(cluster)),
        "{}",
        dir.display()
    );
    assert!(dir.join("spec.yaml").exists());
}

/// Checkpoints at every step, and reports the step it started from.
const CHECKPOINTED: &str = r#"
name: e2e-fresh-store
metric: {name: loss, goal: minimize}
parameters:
  n: {value: 3}
searcher: {name: grid}
trial:
  command: [sh, -c, 'd="$CHORUS_CHECKPOINT_DIR"; s=0; [ -f "$d/step" ] && s=$(cat "$d/step"); from=$s; while [ "$s" -lt ${params.n} ]; do s=$((s+1)); echo "$s" > "$d/step"; echo "chorus:metric {\"step\": $s, \"loss\": $((100 - s)), \"from\": $from}"; sleep 0.2; done']
"#;

/// Two coordinator stores in turn over the same storage: ids start at 1 again in the fresh
/// one, but its trial 1 starts from scratch instead of restoring the old trial 1's checkpoint.
#[test]
fn a_fresh_store_never_picks_up_another_stores_trials() {
    let shared = tempfile::tempdir().unwrap();
    let storage = format!("file://{}/runs", shared.path().display());
    let config = ClusterConfig {
        workers: 1,
        storage: Some(storage),
        ..Default::default()
    };
    let run = || {
        let c = TestCluster::start(config.clone()).unwrap();
        let id = submit(&c, &c.write("fresh.yaml", CHECKPOINTED));
        assert_eq!(
            wait_ended(&c, id, Duration::from_secs(60)),
            "completed",
            "{}",
            c.logs_tail()
        );
        let t = trials(&c, id).remove(0);
        let last = t["last_metrics"].clone();
        let uri = experiment(&c, id).unwrap()["storage"].as_str().unwrap().to_string();
        (id, t["id"].as_u64().unwrap(), last, uri)
    };
    let (id1, trial1, last1, uri1) = run();
    let (id2, trial2, last2, uri2) = run();
    assert_eq!((id1, trial1), (id2, trial2), "a fresh store numbers from 1 again");
    assert_eq!(last1["from"].as_f64(), Some(0.0), "{last1}");
    assert_eq!(
        last2["from"].as_f64(),
        Some(0.0),
        "the fresh store's trial started from scratch: {last2}"
    );
    assert_eq!(last2["step"].as_f64(), Some(3.0), "{last2}");
    assert_ne!(uri1, uri2, "the fresh store writes elsewhere");
}
