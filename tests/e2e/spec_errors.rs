//! Bad specs give exit code 2, name the field, and store nothing.

use super::*;
use chorus_tests::ClusterConfig;

const GOOD: &str = r#"
name: e2e-spec
metric: {name: loss, goal: minimize}
parameters:
  lr: {min: 0.001, max: 0.1}
searcher: {name: random}
max_trials: 2
trial:
  command: [sh, -c, 'echo "chorus:metric {\"loss\": ${params.lr}}"']
"#;

fn assert_rejected(c: &TestCluster, name: &str, yaml: &str, field: &str) {
    let file = c.write(name, yaml);
    for cmd in ["submit", "validate"] {
        let out = c.chorus(&["experiment", cmd, file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd} {name}: {stderr}");
        assert!(
            stderr.contains(field),
            "{cmd} {name}: stderr should name {field}: {stderr}"
        );
    }
}

#[test]
fn bad_specs_exit_2_and_store_nothing() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        ..Default::default()
    })
    .unwrap();
    assert_rejected(&c, "bad-yaml.yaml", "name: [unclosed\nmetric: {name: loss\n", "line");
    assert_rejected(
        &c,
        "unknown.yaml",
        &GOOD.replace("max_trials: 2", "max_trails: 2"),
        "max_trails",
    );
    assert_rejected(
        &c,
        "range.yaml",
        &GOOD.replace("min: 0.001, max: 0.1", "min: 0.5, max: 0.1"),
        "parameters.lr.min",
    );
    // An override that breaks the spec is caught the same way.
    let good = c.write("good.yaml", GOOD);
    let out = c.chorus(&[
        "experiment",
        "submit",
        good.to_str().unwrap(),
        "--set",
        "parallel_trials=0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parallel_trials"));

    let listed = c.chorus_json(&["experiment", "list", "--output", "json"]).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "nothing stored: {listed}");
    let storage = c.coordinator_dir().join("storage");
    let stored = std::fs::read_dir(&storage).map_or(0, |d| d.count());
    assert_eq!(stored, 0, "no records in {}", storage.display());

    // The server validates too (for clients that skip local validation), with the field named.
    let bad = c.write("remote.yaml", &GOOD.replace("max_trials: 2", "max_trails: 2"));
    let out = c.chorus(&["experiment", "validate", "--remote", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_trails"));

    // A good one still goes through afterwards.
    let id = submit(&c, &good);
    assert_eq!(wait_ended(&c, id, Duration::from_secs(60)), "completed");
}
