//! A grid sweep on two workers runs every point once and `compare` names the best trial.

use super::*;
use chorus_tests::ClusterConfig;
use std::collections::BTreeSet;

pub const GRID: &str = r#"
name: e2e-grid
metric: {name: loss, goal: minimize}
parameters:
  a: {values: [1, 2, 3]}
  b: {values: [1, 2]}
searcher: {name: grid}
parallel_trials: 3
trial:
  command: [sh, -c, 'sleep 0.2; echo "training a=${params.a} b=${params.b}"; echo "chorus:metric {\"step\": 1, \"loss\": $(( (${params.a} - 2) * (${params.a} - 2) + ${params.b} ))}"']
"#;

#[test]
fn grid_sweep_completes_and_compare_names_the_best() {
    let c = TestCluster::start(ClusterConfig {
        metrics: true,
        ..Default::default()
    })
    .unwrap();
    let id = submit_and_wait(&c, "grid.yaml", GRID);
    assert_eq!(experiment(&c, id).unwrap()["state"], "completed");

    let ts = trials(&c, id);
    assert_eq!(ts.len(), 6);
    let points: BTreeSet<(i64, i64)> = ts
        .iter()
        .map(|t| (t["params"]["a"].as_i64().unwrap(), t["params"]["b"].as_i64().unwrap()))
        .collect();
    assert_eq!(points.len(), 6, "every grid point ran once: {points:?}");
    assert!(ts.iter().all(|t| t["state"] == "completed"));
    let workers: BTreeSet<&str> = ts.iter().filter_map(|t| t["worker_id"].as_str()).collect();
    assert!(workers.is_empty() || workers.len() <= 2);

    let rows = c
        .chorus_json(&["compare", &id.to_string(), "--output", "json"])
        .unwrap();
    let best: Vec<&serde_json::Value> = rows.as_array().unwrap().iter().filter(|r| r["best"] == true).collect();
    assert_eq!(best.len(), 1, "{rows}");
    assert_eq!(
        (best[0]["params"]["a"].as_i64(), best[0]["params"]["b"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(best[0]["value"].as_f64(), Some(1.0));

    let table = c.chorus(&["compare", &id.to_string()]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("loss"), "{text}");

    // The coordinator's Prometheus metrics agree.
    let metrics = chorus_tests::http_get(c.metrics_addr.unwrap(), "/metrics").unwrap();
    assert!(metrics.contains(r#"chorus_trials{state="completed"} 6"#), "{metrics}");
    assert!(metrics.contains("chorus_attempts_placed_total 6"), "{metrics}");
    assert!(metrics.contains("chorus_workers 2"), "{metrics}");

    // The trial's log reached storage and is served by the coordinator.
    let first = ts[0]["id"].as_u64().unwrap().to_string();
    let logs = c.chorus(&["trial", "logs", &first]);
    assert!(logs.status.success());
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("training a="),
        "{:?}",
        logs
    );
}

/// `chorus worker drain`: a drained worker gets no new trials while another takes them all,
/// `worker list` says so, and `--undo` makes it eligible again. An unknown worker is an error.
#[test]
fn a_drained_worker_takes_no_new_trials() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let ran = c.dir.path().join("ran.txt");
    let out = c.chorus(&["worker", "drain", "worker-0", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let w: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["draining"], true);
    let listed = c.chorus_json(&["worker", "list", "-o", "json"]).unwrap();
    let draining: Vec<bool> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["draining"].as_bool().unwrap())
        .collect();
    assert_eq!(draining, [true, false]);
    let missing = c.chorus(&["worker", "drain", "nosuch"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("nosuch"),
        "{missing:?}"
    );
    let yaml = format!(
        r#"
name: drained
metric: {{name: loss, goal: minimize}}
parameters:
  k: {{values: [1, 2, 3, 4]}}
searcher: {{name: grid}}
parallel_trials: 4
trial:
  command: [sh, -c, 'echo "$CHORUS_WORKER_ID" >> {ran}; sleep 0.3; echo "chorus:metric {{\"step\": 1, \"loss\": ${{params.k}}}}"']
"#,
        ran = ran.display()
    );
    let id = submit(&c, &c.write("drained.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(60)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let workers: Vec<String> = std::fs::read_to_string(&ran)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(workers, ["worker-1"; 4], "only the undrained worker ran trials");
    let out = c.chorus(&["worker", "drain", "worker-0", "--undo"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("takes new trials"));
    let listed = c.chorus_json(&["worker", "list", "-o", "json"]).unwrap();
    assert!(listed.as_array().unwrap().iter().all(|w| w["draining"] == false));
}
