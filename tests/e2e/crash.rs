//! SIGKILL of the coordinator or of a worker mid-sweep: nothing is lost, nothing runs twice.

use super::*;
use chorus_tests::ClusterConfig;
use std::collections::BTreeMap;

/// Random search whose trials append `trial attempt params` to a shared file, so the test can
/// count how often each trial really ran.
fn random_spec(runs_file: &std::path::Path) -> String {
    format!(
        r#"
name: e2e-crash
metric: {{name: loss, goal: minimize}}
parameters:
  x: {{min: 0.0, max: 1.0}}
  k: {{values: [1, 2, 3]}}
searcher: {{name: random, seed: 7}}
max_trials: 8
parallel_trials: 3
max_restarts: 0
trial:
  command: [sh, -c, 'echo "$CHORUS_TRIAL_ID $CHORUS_ATTEMPT ${{params.x}} ${{params.k}}" >> {runs}; sleep 0.6; echo "chorus:metric {{\"loss\": ${{params.x}}}}"']
"#,
        runs = runs_file.display()
    )
}

fn param_set(c: &TestCluster, id: u64) -> Vec<String> {
    let mut v: Vec<String> = trials(c, id).iter().map(|t| t["params"].to_string()).collect();
    v.sort();
    v
}

#[test]
fn coordinator_sigkill_mid_sweep_loses_and_repeats_nothing() {
    let mut c = TestCluster::start(ClusterConfig {
        lease_ttl: Duration::from_secs(6),
        ..Default::default()
    })
    .unwrap();
    // The reference: the same sweep, uninterrupted.
    let reference_runs = c.dir.path().join("reference-runs.txt");
    let reference = submit(&c, &c.write("reference.yaml", &random_spec(&reference_runs)));
    assert_eq!(wait_ended(&c, reference, Duration::from_secs(90)), "completed");

    let runs = c.dir.path().join("runs.txt");
    let id = submit(&c, &c.write("crash.yaml", &random_spec(&runs)));
    c.wait_until(Duration::from_secs(60), "two trials done", |c| {
        Ok(experiment(c, id)?["counts"]["completed"].as_u64().unwrap_or(0) >= 2)
    })
    .unwrap();
    c.kill_coordinator();
    std::thread::sleep(Duration::from_millis(700));
    c.start_coordinator().unwrap();

    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(90)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 8);
    assert!(ts.iter().all(|t| t["state"] == "completed"), "{ts:?}");
    assert_eq!(
        param_set(&c, id),
        param_set(&c, reference),
        "same trial set as the uninterrupted run"
    );

    // Each trial ran exactly once: re-attached after the restart, never started again.
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&runs).unwrap().lines() {
        *count.entry(line.split(' ').next().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(count.len(), 8, "{count:?}");
    assert!(count.values().all(|n| *n == 1), "a trial ran twice: {count:?}");
    assert!(ts.iter().all(|t| t["attempt"] == 1 && t["restarts"] == 0), "{ts:?}");
}

const RESUMABLE: &str = r#"
name: e2e-resume
metric: {name: loss, goal: minimize}
parameters:
  n: {value: 14}
searcher: {name: grid}
max_restarts: 2
trial:
  command: [sh, -c, 'd="$CHORUS_CHECKPOINT_DIR"; s=0; [ -f "$d/step" ] && s=$(cat "$d/step"); echo "attempt $CHORUS_ATTEMPT resumes from $s"; while [ "$s" -lt ${params.n} ]; do s=$((s+1)); sleep 0.25; echo "$s" > "$d/step"; echo "chorus:metric {\"step\": $s, \"loss\": $((100 - s))}"; done']
"#;

#[test]
fn worker_sigkill_moves_its_trial_which_resumes_from_its_checkpoint() {
    let mut c = TestCluster::start(ClusterConfig {
        lease_ttl: Duration::from_secs(2),
        ..Default::default()
    })
    .unwrap();
    let id = submit(&c, &c.write("resume.yaml", RESUMABLE));
    let mut victim = String::new();
    c.wait_until(Duration::from_secs(60), "a checkpoint at step 3", |c| {
        let t = &trials(c, id)[0];
        victim = t["worker_id"].as_str().unwrap_or_default().to_string();
        Ok(t["checkpoint_step"].as_i64().unwrap_or(0) >= 3 && !victim.is_empty())
    })
    .unwrap();
    let index: usize = victim.trim_start_matches("worker-").parse().unwrap();
    c.kill_worker(index);

    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(90)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let t = &trials(&c, id)[0];
    assert_eq!(
        (t["attempt"].as_u64(), t["restarts"].as_u64()),
        (Some(2), Some(1)),
        "{t}"
    );
    assert_eq!(t["best_value"].as_f64(), Some(86.0));

    // The second attempt started from the checkpoint, not from scratch.
    let history = trial_history(&c, id, t["id"].as_u64().unwrap());
    let second: Vec<i64> = history
        .iter()
        .filter(|v| v["attempt"] == 2)
        .map(|v| v["step"].as_i64().unwrap())
        .collect();
    assert!(!second.is_empty() && second[0] >= 4, "attempt 2 steps: {second:?}");
    assert_eq!(*second.last().unwrap(), 14);

    let logs = c.chorus(&["trial", "logs", &t["id"].to_string()]);
    let text = String::from_utf8_lossy(&logs.stdout);
    let resumed = text
        .lines()
        .find(|l| l.starts_with("attempt 2 resumes from"))
        .expect("attempt 2 log line");
    let from: i64 = resumed.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(from >= 3, "{resumed}");
}

/// `chorus trial logs -f` survives a coordinator SIGKILL: it reconnects and resumes after the
/// last chunk it printed, so its output holds every line of the trial once, in order.
#[test]
fn following_logs_survives_a_coordinator_sigkill() {
    let mut c = TestCluster::start(ClusterConfig {
        lease_ttl: Duration::from_secs(6),
        ..Default::default()
    })
    .unwrap();
    let yaml = r#"
name: follow
metric: {name: loss, goal: minimize}
parameters: {}
searcher: {name: grid}
trial:
  command: [sh, -c, 'i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo "line $i"; sleep 0.1; done; echo "chorus:metric {\"step\": 1, \"loss\": 1}"']
"#;
    let id = submit(&c, &c.write("follow.yaml", yaml));
    c.wait_until(Duration::from_secs(30), "the trial running", |c| {
        Ok(experiment(c, id)?["counts"]["running"].as_u64().unwrap_or(0) == 1)
    })
    .unwrap();
    let tid = trials(&c, id)[0]["id"].to_string();
    let out = c.dir.path().join("follow.out");
    let mut follower = std::process::Command::new(chorus_tests::binary("chorus"))
        .env("CHORUS_COORDINATOR", c.url())
        .args(["trial", "logs", &tid, "-f"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(c.dir.path().join("follow.err")).unwrap())
        .spawn()
        .unwrap();
    let printed = |n: usize| {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("line "))
            .count()
            >= n
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !printed(5) {
        assert!(std::time::Instant::now() < deadline, "the follower printed nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill_coordinator();
    std::thread::sleep(Duration::from_millis(800));
    c.start_coordinator().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = follower.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the follower never ended");
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = std::fs::read_to_string(c.dir.path().join("follow.err")).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.contains("reconnecting"),
        "it lost the coordinator and came back: {err}"
    );
    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("line "))
        .map(String::from)
        .collect();
    let want: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "every line once, in order");
}
