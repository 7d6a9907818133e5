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
fn asha_stop_once_stops_weak_trials_at_their_rungs() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let runs = c.dir.path().join("runs.txt");
    let yaml = curve_spec(
        "asha",
        "{name: asha, seed: 4, reduction_factor: 3, grace_period: 1, max_resource: 9, stop_once: true}",
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
    cut_short_and_best_ran_on(&ts, "successive halving");
}

/// Trials whose message holds `marker` were cut short (their last report is before step 9),
/// there was at least one, and the best trial (lowest x) ran to the end.
fn cut_short_and_best_ran_on(ts: &[Value], marker: &str) {
    let cut: Vec<&Value> = ts
        .iter()
        .filter(|t| t["message"].as_str().unwrap_or_default().contains(marker))
        .collect();
    assert!(!cut.is_empty(), "some trial was cut short at a rung: {ts:?}");
    for t in &cut {
        assert!(t["last_metrics"]["step"].as_i64().unwrap() < 9, "{t}");
    }
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

/// ASHA with promotion over 9 checkpointing trials (loss = x + 1/step up to step 9), one at a
/// time, so arrivals at the rungs come in one order and the promotions are fixed. Each attempt
/// appends `trial attempt first-step` to `runs`.
fn promoting_spec(runs: &std::path::Path) -> String {
    format!(
        r#"
name: asha-promote
metric: {{name: loss, goal: minimize}}
parameters:
  x: {{min: 0.0, max: 1.0}}
searcher: {{name: asha, seed: 4, reduction_factor: 3, grace_period: 1, max_resource: 9}}
max_trials: 9
parallel_trials: 1
trial:
  command: [sh, -c, 'd="$CHORUS_CHECKPOINT_DIR"; s=0; if [ -f "$d/step" ]; then s=$(cat "$d/step"); fi; echo "$CHORUS_TRIAL_ID $CHORUS_ATTEMPT $s" >> {runs}; while [ $s -lt 9 ]; do s=$((s+1)); echo $s > "$d/step.tmp"; mv "$d/step.tmp" "$d/step"; echo "chorus:metric {{\"step\": $s, \"loss\": $(awk -v x=${{params.x}} -v s=$s "BEGIN {{ print x + 1 / s }}")}}"; sleep 0.15; done']
"#,
        runs = runs.display()
    )
}

/// ASHA's promotion rule: trials pause at rungs, the promoted ones resume from the checkpoint
/// they paused at (at no restart cost), and the rest end as never promoted.
#[test]
fn asha_pauses_and_promotes_from_checkpoints() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let runs = c.dir.path().join("runs.txt");
    let yaml = promoting_spec(&runs);
    let id = submit(&c, &c.write("asha-promote.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 9);
    assert!(ts.iter().all(|t| t["restarts"] == 0), "pauses cost no restart: {ts:?}");
    cut_short_and_best_ran_on(&ts, "never promoted");
    // Attempts after the first resumed where their trial paused, from its checkpoint.
    let text = std::fs::read_to_string(&runs).unwrap();
    let resumed: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (f[1] > 1).then_some((f[0], f[2]))
        })
        .collect();
    assert!(!resumed.is_empty(), "some trial was promoted after a pause: {text}");
    assert!(
        resumed.iter().any(|(_, step)| *step > 0),
        "resumed from a checkpoint: {text}"
    );
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
    sigkill_the_coordinator_and_finish(&mut c, id, 10);
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&runs).unwrap().lines() {
        *count.entry(line.split(' ').next().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(count.len(), 10, "{count:?}");
    assert!(count.values().all(|n| *n == 1), "a trial ran twice: {count:?}");
}

/// SIGKILLs the coordinator mid-search and restarts it on the same store; the experiment must
/// then complete with exactly `n` trials, no parameter set twice. Returns the trials.
fn sigkill_the_coordinator_and_finish(c: &mut TestCluster, id: u64, n: usize) -> Vec<Value> {
    c.kill_coordinator();
    std::thread::sleep(Duration::from_millis(500));
    c.start_coordinator().unwrap();
    assert_eq!(
        wait_ended(c, id, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(c, id);
    assert_eq!(ts.len(), n, "no trial lost, none extra");
    let params: BTreeSet<String> = ts.iter().map(|t| t["params"].to_string()).collect();
    assert_eq!(params.len(), n, "no parameter set twice: {params:?}");
    ts
}

/// Population-based training: the worst trials continue from the best ones' checkpoints (copied
/// through object storage) with explored parameters, without spending restarts.
#[test]
fn pbt_exploit_restores_the_donors_checkpoint() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let runs = c.dir.path().join("runs.txt");
    let yaml = format!(
        r#"
name: pbt
metric: {{name: loss, goal: minimize}}
parameters:
  q: {{min: 0.0, max: 1.0}}
searcher: {{name: pbt, seed: 3, population_size: 4, perturbation_interval: 6}}
max_trials: 4
parallel_trials: 4
trial:
  command: [sh, -c, 'd="$CHORUS_CHECKPOINT_DIR"; s=0; owner=none; if [ -f "$d/step" ]; then s=$(cat "$d/step"); owner=$(cat "$d/owner"); fi; echo "$CHORUS_TRIAL_ID $CHORUS_ATTEMPT $owner $s" >> {runs}; while [ $s -lt 30 ]; do s=$((s+1)); echo $s > "$d/step"; echo $CHORUS_TRIAL_ID > "$d/owner"; echo "chorus:metric {{\"step\": $s, \"loss\": $(awk -v q=${{params.q}} -v s=$s "BEGIN {{ print q + 1 / s }}")}}"; sleep 0.1; done']
"#,
        runs = runs.display()
    );
    let id = submit(&c, &c.write("pbt.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 4);
    assert!(
        ts.iter().all(|t| t["restarts"] == 0),
        "exploits cost no restart: {ts:?}"
    );
    let text = std::fs::read_to_string(&runs).unwrap();
    let exploited: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f[2] != "none" && f[2] != f[0])
        .collect();
    assert!(
        !exploited.is_empty(),
        "some attempt started from another trial's checkpoint:\n{text}"
    );
    for f in &exploited {
        assert!(f[1].parse::<u32>().unwrap() >= 2, "a later attempt: {f:?}");
        // The donor's newest committed checkpoint; it may trail the step of the decision.
        assert!(f[3].parse::<u32>().unwrap() >= 1, "from the donor's progress: {f:?}");
    }
}

/// Two objectives at once: `compare` marks the trials on the Pareto front.
#[test]
fn compare_shows_the_pareto_front_of_two_objectives() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let yaml = r#"
name: two-objectives
metrics: [{name: loss, goal: minimize}, {name: speed, goal: maximize}]
parameters:
  x: {values: [0.1, 0.3, 0.5, 0.7, 0.9]}
searcher: {name: grid}
parallel_trials: 4
trial:
  command: [sh, -c, 'echo "chorus:metric {\"step\": 1, \"loss\": ${params.x}, \"speed\": $(awk -v x=${params.x} "BEGIN { print x * (1 - x) }")}"']
"#;
    let id = submit(&c, &c.write("mo.yaml", yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(60)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let rows = c
        .chorus_json(&["compare", &id.to_string(), "--output", "json"])
        .unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    // speed = x(1 - x): x = 0.7 and 0.9 are as fast as 0.3 and 0.1 with a higher loss.
    let mut front: Vec<f64> = rows
        .iter()
        .filter(|r| r["pareto"] == true)
        .map(|r| r["params"]["x"].as_f64().unwrap())
        .collect();
    front.sort_by(f64::total_cmp);
    assert_eq!(front, vec![0.1, 0.3, 0.5], "{rows:?}");
    let table = c.chorus(&["compare", &id.to_string()]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("Pareto front over loss (minimize), speed (maximize)"),
        "{text}"
    );
}

/// Conditional parameters through the real coordinator and workers: a grid over a tree visits
/// each active combination once, and each trial sees only its active parameters, in
/// `CHORUS_PARAMS` and in its command (an argument naming an inactive one is left out).
#[test]
fn conditional_parameters_reach_trials_only_when_active() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let runs = c.dir.path().join("runs.txt");
    let yaml = format!(
        r#"
name: conditional
metric: {{name: loss, goal: minimize}}
parameters:
  optimizer: {{values: [sgd, adam]}}
  momentum: {{values: [0.0, 0.9], when: {{optimizer: sgd}}}}
searcher: {{name: grid}}
parallel_trials: 2
trial:
  command: [sh, -c, 'echo "$CHORUS_PARAMS|$0|$1" >> {runs}; echo "chorus:metric {{\"step\": 1, \"loss\": 1}}"', '--opt=${{params.optimizer}}', '--momentum=${{params.momentum}}']
"#,
        runs = runs.display()
    );
    let id = submit(&c, &c.write("conditional.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(60)),
        "completed",
        "{}",
        c.logs_tail()
    );
    assert_eq!(trials(&c, id).len(), 3, "sgd x 2 momenta, adam alone");
    let mut lines: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            r#"{"momentum":0.0,"optimizer":"sgd"}|--opt=sgd|--momentum=0.0"#,
            r#"{"momentum":0.9,"optimizer":"sgd"}|--opt=sgd|--momentum=0.9"#,
            r#"{"optimizer":"adam"}|--opt=adam|"#,
        ]
    );
}

/// Live changes: a running search gets a larger trial budget and more trials at once, and the
/// coordinator refuses an invalid budget (exit code 2) without touching the search.
#[test]
fn a_running_search_takes_a_new_budget() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let runs = c.dir.path().join("runs.txt");
    let yaml = format!(
        r#"
name: live
metric: {{name: loss, goal: minimize}}
parameters:
  x: {{min: 0.0, max: 1.0}}
searcher: {{name: random, seed: 5}}
max_trials: 2
parallel_trials: 1
trial:
  command: [sh, -c, 'echo "start $CHORUS_TRIAL_ID $(date +%s%N)" >> {runs}; sleep 2; echo "end $CHORUS_TRIAL_ID $(date +%s%N)" >> {runs}; echo "chorus:metric {{\"step\": 1, \"loss\": ${{params.x}}}}"']
"#,
        runs = runs.display()
    );
    let id = submit(&c, &c.write("live.yaml", &yaml));
    c.wait_until(Duration::from_secs(30), "first trial running", |c| {
        Ok(experiment(c, id)?["counts"]["running"].as_u64().unwrap_or(0) == 1)
    })
    .unwrap();
    let below = c.chorus(&["experiment", "update", &id.to_string(), "--max-trials", "0"]);
    assert_eq!(below.status.code(), Some(2), "{below:?}");
    let out = c.chorus(&[
        "experiment",
        "update",
        &id.to_string(),
        "--max-trials",
        "5",
        "--parallel-trials",
        "3",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = experiment(&c, id).unwrap();
    assert_eq!(
        (e["max_trials"].as_u64(), e["parallel_trials"].as_u64()),
        (Some(5), Some(3))
    );
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(60)),
        "completed",
        "{}",
        c.logs_tail()
    );
    assert_eq!(trials(&c, id).len(), 5, "the new budget was spent");
    // Most trials running at once: 1 before the update, up to 3 after.
    let mut edges: Vec<(u128, i32)> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[2].parse().unwrap(), if f[0] == "start" { 1 } else { -1 })
        })
        .collect();
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    assert_eq!(most, 3, "three at once after the update");
}

/// A coordinator SIGKILLed while trials wait at rungs: the restarted one keeps them paused,
/// promotes them as before, and the search ends with every trial once and none left paused.
#[test]
fn paused_trials_survive_a_coordinator_sigkill() {
    let mut c = TestCluster::start(ClusterConfig {
        lease_ttl: Duration::from_secs(6),
        ..Default::default()
    })
    .unwrap();
    let runs = c.dir.path().join("runs.txt");
    let id = submit(&c, &c.write("asha-crash.yaml", &promoting_spec(&runs)));
    c.wait_until(Duration::from_secs(60), "two trials paused", |c| {
        Ok(experiment(c, id)?["counts"]["paused"].as_u64().unwrap_or(0) >= 2)
    })
    .unwrap();
    let ts = sigkill_the_coordinator_and_finish(&mut c, id, 9);
    assert_eq!(experiment(&c, id).unwrap()["counts"]["paused"], 0);
    cut_short_and_best_ran_on(&ts, "never promoted");
}
