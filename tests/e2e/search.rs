//! Adaptive search through the real coordinator and workers: ASHA stopping weak trials early,
//! and a TPE search that survives a coordinator SIGKILL without repeating or losing a trial.

use super::*;
use chorus_tests::ClusterConfig;
use std::collections::{BTreeMap, BTreeSet};

/// A learning curve per trial: loss = x + 1/step, reported every step up to 9.
fn curve_spec(name: &str, searcher: &str, runs: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
name: {name}
metric: {{name: loss, goal: minimize}}
parameters:
  x: {{min: 0.0, max: 1.0}}
searcher: {searcher}
{extra}
parallel_trials: 2
trial:
  command: [sh, -c, 'echo "$CHORUS_TRIAL_ID $CHORUS_ATTEMPT ${{params.x}}" >> {runs}; s=0; while [ $s -lt 9 ]; do s=$((s+1)); echo "chorus:metric {{\"step\": $s, \"loss\": $(awk -v x=${{params.x}} -v s=$s "BEGIN {{ print x + 1 / s }}")}}"; sleep 0.15; done']
"#,
        runs = runs.display()
    )
}

#[test]
fn asha_stops_weak_trials_at_their_rungs() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let runs = c.dir.path().join("runs.txt");
    let yaml = curve_spec(
        "asha",
        "{name: asha, seed: 4, reduction_factor: 3, grace_period: 1, max_resource: 9}",
        &runs,
        "max_trials: 9",
    );
    let id = submit(&c, &c.write("asha.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 9);
    let stopped: Vec<&Value> = ts
        .iter()
        .filter(|t| t["message"].as_str().unwrap_or_default().contains("successive halving"))
        .collect();
    assert!(!stopped.is_empty(), "some trial was stopped at a rung: {ts:?}");
    // Stopped trials ran less: their last report is before step 9.
    for t in &stopped {
        assert!(t["last_metrics"]["step"].as_i64().unwrap() < 9, "{t}");
    }
    // The best trial (lowest x) was never stopped.
    let best = ts
        .iter()
        .min_by(|a, b| {
            a["params"]["x"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["params"]["x"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(best["last_metrics"]["step"], 9, "{best}");
}

#[test]
fn a_tpe_search_survives_a_coordinator_sigkill() {
    let mut c = TestCluster::start(ClusterConfig {
        lease_ttl: Duration::from_secs(6),
        ..Default::default()
    })
    .unwrap();
    let runs = c.dir.path().join("runs.txt");
    let yaml = curve_spec(
        "tpe-crash",
        "{name: tpe, seed: 2, n_startup_trials: 3}",
        &runs,
        "max_trials: 10",
    );
    let id = submit(&c, &c.write("tpe.yaml", &yaml));
    c.wait_until(Duration::from_secs(90), "four trials done", |c| {
        Ok(experiment(c, id)?["counts"]["completed"].as_u64().unwrap_or(0) >= 4)
    })
    .unwrap();
    c.kill_coordinator();
    std::thread::sleep(Duration::from_millis(500));
    c.start_coordinator().unwrap();
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 10, "no trial lost, none extra");
    let params: BTreeSet<String> = ts.iter().map(|t| t["params"].to_string()).collect();
    assert_eq!(params.len(), 10, "no parameter set twice: {params:?}");
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&runs).unwrap().lines() {
        *count.entry(line.split(' ').next().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(count.len(), 10, "{count:?}");
    assert!(count.values().all(|n| *n == 1), "a trial ran twice: {count:?}");
}
