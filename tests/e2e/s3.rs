//! Records on a real S3 server: spec, metrics, logs and a checkpoint that restores.

use super::*;
use chorus_core::checkpoint;
use chorus_core::storage::{StorageOptions, StorageUri, open};
use chorus_core::{ExperimentId, TrialId};
use chorus_tests::{ClusterConfig, S3Server};
use object_store::ObjectStoreExt;

const SPEC: &str = r#"
name: e2e-s3
metric: {name: loss, goal: minimize}
parameters:
  k: {values: [1, 2]}
searcher: {name: grid}
parallel_trials: 2
trial:
  command: [sh, -c, 'for s in 1 2 3; do echo "weights-${params.k}-$s" > "$CHORUS_CHECKPOINT_DIR/model.bin"; echo "chorus:metric {\"step\": $s, \"loss\": $((10 * ${params.k} - s))}"; sleep 0.1; done']
storage: s3://chorus/sweeps
"#;

#[test]
fn records_round_trip_through_s3() {
    let s3 = S3Server::start("chorus").unwrap();
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        env: s3.env(),
        coordinator_args: vec!["--allowed-storage".into(), "s3://chorus/sweeps".into()],
        ..Default::default()
    })
    .unwrap();
    let id = submit(&c, &c.write("s3.yaml", SPEC));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(60)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 2);
    // The spec's storage, scoped by the coordinator's cluster id.
    let uri = experiment(&c, id).unwrap()["storage"].as_str().unwrap().to_string();
    let cluster = uri
        .strip_prefix("s3://chorus/sweeps/")
        .and_then(|rest| rest.strip_suffix('/'))
        .unwrap_or_else(|| panic!("{uri}"));
    assert_eq!(cluster.len(), 16, "{uri}");

    // Read everything back through S3 itself, as any other tool would.
    for (k, v) in s3.env() {
        // SAFETY: tests in this binary do not read these variables concurrently.
        unsafe { std::env::set_var(k, v) };
    }
    let storage = open(
        &StorageUri::parse(&uri).unwrap(),
        &StorageOptions {
            s3_endpoint: Some(s3.endpoint.clone()),
        },
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let exp = ExperimentId(id);
        let spec = storage
            .store
            .get(&storage.spec_key(exp))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&spec).contains("e2e-s3"));
        for t in &ts {
            let tid = TrialId(t["id"].as_u64().unwrap());
            let k = t["params"]["k"].as_i64().unwrap();
            let metrics = chorus_core::history::read_history(&storage, exp, tid, 100)
                .await
                .unwrap();
            assert_eq!(metrics.len(), 3, "{metrics:?}");
            let dest = tempfile::tempdir().unwrap();
            let restored = checkpoint::restore_latest(&storage, &storage.checkpoints_prefix(exp, tid), dest.path())
                .await
                .unwrap();
            assert_eq!(restored.step(), Some(3));
            assert_eq!(
                std::fs::read_to_string(dest.path().join("model.bin")).unwrap(),
                format!("weights-{k}-3\n")
            );
        }
    });
    // The files are really on the S3 server's disk.
    assert!(
        s3.dir
            .path()
            .join("chorus/sweeps")
            .join(cluster)
            .join("experiments")
            .join(id.to_string())
            .join("spec.yaml")
            .exists()
    );
}
