//! Chorus in containers on a real Docker network ([`DockerCluster`]): a sweep over three worker
//! containers, a data-parallel trial whose ranks talk across the network, a partitioned worker
//! whose stale attempt is fenced, node loss with a coordinator replaced mid-sweep, and a worker
//! container stopped politely. Skipped (with the reason) where docker is not usable.
//!
//! They run one at a time (the `containers` test group in `.config/nextest.toml`): each starts
//! several containers, and a small machine runs only so many at once.

use chorus_core::storage::Storage;
use chorus_core::{ExperimentId, TrialId, checkpoint, history};
use chorus_tests::docker::{DockerCluster, DockerConfig, STORAGE_URI, StorageCopy};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Whether the clusters serve gRPC over TLS (their own CA; workers and the CLI trust it through
/// `CHORUS_CA`), as a cluster off loopback should; `CHORUS_TEST_TLS=0` runs them in plain text
/// with `--insecure` instead, to tell a TLS problem from another.
fn tls() -> bool {
    std::env::var_os("CHORUS_TEST_TLS").is_none_or(|v| v != "0")
}

/// Starts a cluster, or returns from the test (printing why) where docker is not usable.
macro_rules! cluster_or_skip {
    ($config:expr) => {
        match DockerCluster::start($config).expect("start the container cluster") {
            Some(c) => c,
            None => return,
        }
    };
}

fn submit(c: &DockerCluster, name: &str, yaml: &str) -> u64 {
    let file = c.write(name, yaml);
    let v = c
        .chorus_json(&["experiment", "submit", file.to_str().unwrap(), "--output", "json"])
        .expect("submit");
    v["id"].as_u64().expect("experiment id")
}

fn experiment(c: &DockerCluster, id: u64) -> anyhow::Result<Value> {
    let v = c.chorus_json(&["experiment", "describe", &id.to_string(), "--output", "json"])?;
    Ok(v["experiment"].clone())
}

fn trials(c: &DockerCluster, id: u64) -> anyhow::Result<Vec<Value>> {
    let v = c.chorus_json(&["trial", "list", &id.to_string(), "--output", "json"])?;
    Ok(v["trials"].as_array().cloned().unwrap_or_default())
}

fn ended(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "killed")
}

/// Waits until the experiment has ended; returns its final state name.
fn wait_ended(c: &DockerCluster, id: u64, timeout: Duration) -> String {
    let mut state = String::new();
    c.wait_until(timeout, &format!("experiment {id} to end"), |c| {
        state = experiment(c, id)?["state"].as_str().unwrap_or_default().to_string();
        Ok(ended(&state))
    })
    .expect("experiment ended");
    state
}

/// The experiment's storage, opened in a host copy of the shared volume's.
fn storage_of(c: &DockerCluster, copy: &StorageCopy, exp: u64) -> Storage {
    let e = experiment(c, exp).expect("describe");
    copy.open(e["storage"].as_str().expect("storage URI"))
        .expect("open the storage copy")
}

/// A trial's metric history as readers see it (the newest attempt's lineage), each line parsed.
fn history_of(storage: &Storage, exp: u64, trial: u64) -> Vec<Value> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(history::read_history(
        storage,
        ExperimentId(exp),
        TrialId(trial),
        1_000_000,
    ))
    .expect("read the history")
    .iter()
    .map(|l| serde_json::from_str(l).expect("a JSON line"))
    .collect()
}

/// Whether a history line is stored under the attempt that printed it (its `a`; metric values
/// are numbers, so `a` reads back as a float).
fn same_attempt(l: &Value) -> bool {
    l["a"].as_f64().is_some_and(|a| Some(a as u64) == l["attempt"].as_u64())
}

/// The ids of the workers of a trial (`worker_id` lists a gang's, comma-separated).
fn workers_of(t: &Value) -> Vec<String> {
    t["worker_id"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// A trial of `n` steps of `pause` seconds that resumes after the step of the checkpoint
/// restored into it (`CHORUS_RESTORED_STEP`), keeps its step in its checkpoint, and logs each step to `/shared/ticks/TRIAL-ATTEMPT` on the shared volume (a record
/// outside the trial's own storage, which shows what an attempt did whatever the coordinator
/// made of it). Its start and its end go to `/shared/runs`. The loss is a function of the
/// trial's `k` and the step, whatever attempt printed it.
fn stepping_trial(n: u32, pause: &str) -> String {
    let script = format!(
        r#"d="$CHORUS_CHECKPOINT_DIR"; k=${{params.k}}; s=${{CHORUS_RESTORED_STEP:-0}}
mkdir -p /shared/ticks
echo "start $CHORUS_TRIAL_ID $CHORUS_ATTEMPT $CHORUS_WORKER_ID" >> /shared/runs
while [ "$s" -lt {n} ]; do
  s=$((s+1)); sleep {pause}
  echo "$s" > "$d/step.tmp" && mv "$d/step.tmp" "$d/step"
  echo "$s" >> "/shared/ticks/$CHORUS_TRIAL_ID-$CHORUS_ATTEMPT"
  echo "chorus:metric {{\"step\": $s, \"loss\": $((k * 1000 - s)), \"a\": $CHORUS_ATTEMPT}}"
done
echo "done $CHORUS_TRIAL_ID $CHORUS_ATTEMPT" >> /shared/runs"#
    );
    // A literal block keeps the script's lines as they are.
    let body: String = script.lines().map(|l| format!("      {l}\n")).collect();
    format!("  command:\n    - sh\n    - -c\n    - |\n{body}")
}

/// `/shared/runs`: per trial, the attempts that started and the attempts that finished.
#[derive(Debug, Default)]
struct Runs {
    started: BTreeMap<u64, Vec<u64>>,
    done: BTreeMap<u64, Vec<u64>>,
    /// The worker each (trial, attempt) started on.
    worker: BTreeMap<(u64, u64), String>,
}

fn runs(c: &DockerCluster) -> Runs {
    let text = c.read_shared("runs").expect("read /shared/runs").unwrap_or_default();
    let mut r = Runs::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (trial, attempt): (u64, u64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        match f[0] {
            "start" => {
                r.started.entry(trial).or_default().push(attempt);
                r.worker.insert((trial, attempt), f[3].to_string());
            }
            "done" => r.done.entry(trial).or_default().push(attempt),
            other => panic!("unexpected line in /shared/runs: {other}"),
        }
    }
    r
}

/// The steps an attempt logged to `/shared/ticks`.
fn ticks(c: &DockerCluster, trial: u64, attempt: u64) -> Vec<u32> {
    c.read_shared(&format!("ticks/{trial}-{attempt}"))
        .expect("read ticks")
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().expect("a step"))
        .collect()
}

const GRID: &str = r#"
name: containers-grid
metric: {name: loss, goal: minimize}
parameters:
  a: {values: [1, 2, 3]}
  b: {values: [1, 2]}
searcher: {name: grid}
parallel_trials: 3
trial:
  command: [sh, -c, 'echo "$CHORUS_WORKER_ID" >> /shared/ran; echo "training a=${params.a} b=${params.b} on $CHORUS_WORKER_ID"; sleep 1; echo "chorus:metric {\"step\": 1, \"loss\": $(( (${params.a} - 2) * (${params.a} - 2) + ${params.b} ))}"']
"#;

/// A grid sweep on three one-slot worker containers: every point runs once, the first three at
/// once on the three workers, and `chorus compare` run from a container names the best trial.
#[test]
fn a_sweep_runs_on_three_worker_containers_and_compare_names_the_best() {
    let c = cluster_or_skip!(DockerConfig {
        workers: 3,
        tls: tls(),
        ..Default::default()
    });
    let id = submit(&c, "grid.yaml", GRID);
    assert_eq!(wait_ended(&c, id, Duration::from_secs(90)), "completed");
    let ts = trials(&c, id).unwrap();
    assert_eq!(ts.len(), 6, "{ts:?}");
    assert!(ts.iter().all(|t| t["state"] == "completed"), "{ts:?}");
    let points: BTreeSet<(i64, i64)> = ts
        .iter()
        .map(|t| (t["params"]["a"].as_i64().unwrap(), t["params"]["b"].as_i64().unwrap()))
        .collect();
    assert_eq!(points.len(), 6, "every grid point ran once: {points:?}");
    // Three trials at once on three one-slot workers: each worker ran one.
    let ran = c.read_shared("ran").unwrap().unwrap_or_default();
    assert_eq!(ran.lines().count(), 6, "{ran}");
    let workers: BTreeSet<String> = ran.lines().map(String::from).collect();
    assert_eq!(
        workers,
        BTreeSet::from(["w0".to_string(), "w1".into(), "w2".into()]),
        "{ran}"
    );
    assert!(ts.iter().all(|t| t["attempt"] == 1 && t["restarts"] == 0), "{ts:?}");

    let rows = c
        .chorus_json_in_container(&["compare", &id.to_string(), "--output", "json"])
        .unwrap();
    let best: Vec<&Value> = rows.as_array().unwrap().iter().filter(|r| r["best"] == true).collect();
    assert_eq!(best.len(), 1, "{rows}");
    assert_eq!(
        (best[0]["params"]["a"].as_i64(), best[0]["params"]["b"].as_i64()),
        (Some(2), Some(1)),
        "{rows}"
    );
    assert_eq!(best[0]["value"].as_f64(), Some(1.0));
    // The trial's log went from its worker container to the shared storage, and the coordinator
    // container serves it.
    let t = &ts[0];
    let out = c.chorus_in_container(&["trial", "logs", &t["id"].to_string()]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let want = format!("training a={} b={} on w", t["params"]["a"], t["params"]["b"]);
    assert!(text.contains(&want), "the trial's log: {text}");
}

/// A two-rank data-parallel builtin trial on two worker containers: the ranks rendezvous at the
/// addresses their workers advertise and all-reduce over the container network.
#[test]
fn a_data_parallel_trial_trains_across_two_worker_containers() {
    let c = cluster_or_skip!(DockerConfig {
        workers: 2,
        // A rank that cannot reach its peer fails fast instead of waiting out the default.
        worker_env: vec![("CHORUS_COLLECTIVE_TIMEOUT".into(), "30s".into())],
        tls: tls(),
        ..Default::default()
    });
    let data = format!("{STORAGE_URI}/datasets/emo");
    let out = c
        .chorus_in_container(&[
            "dataset",
            "synth",
            "--out",
            &data,
            "--samples",
            "600",
            "--shards",
            "4",
            "--seed",
            "3",
        ])
        .unwrap();
    assert!(out.status.success(), "synth: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = chorus_tests::data_parallel_spec("containers-dp", &data);
    let id = submit(&c, "dp.yaml", &yaml);
    // Where its ranks run, seen while they run (an ended trial names no worker).
    let mut ws = Vec::new();
    c.wait_until(Duration::from_secs(100), "the trial to end", |c| {
        let t = trials(c, id)?.remove(0);
        if t["state"] == "running" && ws.is_empty() {
            ws = workers_of(&t);
        }
        Ok(ended(t["state"].as_str().unwrap_or_default()))
    })
    .unwrap();
    assert_eq!(wait_ended(&c, id, Duration::from_secs(10)), "completed");
    let t = &trials(&c, id).unwrap()[0];
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(
        (t["attempt"].as_u64(), t["restarts"].as_u64()),
        (Some(1), Some(0)),
        "{t}"
    );
    ws.sort();
    assert_eq!(ws, ["w0", "w1"], "one rank on each worker container: {t}");
    assert!(t["best_value"].as_f64().is_some(), "rank 0 reported its accuracy: {t}");
    let log = c.chorus(&["trial", "logs", &t["id"].to_string()]);
    assert!(log.status.success() && !log.stdout.is_empty(), "rank 0's log: {log:?}");
}

/// A worker container cut off the network longer than its lease: its trial is requeued and
/// finishes on the other worker, while the cut-off attempt goes on running (and writing to the
/// shared volume). Once the worker is back on the network its stale attempt is killed, and
/// nothing it wrote after the cut-over is in the trial's metric history or its newest
/// checkpoint.
#[test]
fn a_partitioned_worker_containers_stale_attempt_is_fenced() {
    const STEPS: u32 = 90;
    let c = cluster_or_skip!(DockerConfig {
        workers: 2,
        lease_ttl: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(500),
        tls: tls(),
        ..Default::default()
    });
    let yaml = format!(
        "name: containers-partition
metric: {{name: loss, goal: minimize}}
parameters:
  k: {{value: 1}}
searcher: {{name: grid}}
max_restarts: 3
checkpoint: {{keep_last: 2}}
trial:
{}",
        stepping_trial(STEPS, "0.2")
    );
    let exp = submit(&c, "partition.yaml", &yaml);
    let mut victim = String::new();
    let mut tid = 0;
    c.wait_until(Duration::from_secs(60), "a checkpoint of attempt 1", |c| {
        let ts = trials(c, exp)?;
        let Some(t) = ts.first() else { return Ok(false) };
        tid = t["id"].as_u64().unwrap_or(0);
        victim = workers_of(t).first().cloned().unwrap_or_default();
        Ok(t["attempt"] == 1 && t["checkpoint_step"].as_i64().unwrap_or(0) >= 3 && !victim.is_empty())
    })
    .unwrap();
    let other = if victim == "w0" { "w1" } else { "w0" };
    c.disconnect(&victim).unwrap();
    let cut_at = ticks(&c, tid, 1).len();

    c.wait_until(Duration::from_secs(60), "attempt 2 on the other worker", |c| {
        let t = trials(c, exp)?.remove(0);
        Ok(t["attempt"].as_u64() >= Some(2) && workers_of(&t) == [other] && t["state"] == "running")
    })
    .unwrap();
    // The cut-off attempt knows nothing of it and goes on.
    c.wait_until(Duration::from_secs(20), "the stale attempt to go on running", |c| {
        Ok(ticks(c, tid, 1).len() >= cut_at + 10)
    })
    .unwrap();

    c.connect(&victim).unwrap();
    // Back on the network, the worker learns its attempt is stale and kills it: its steps stop.
    let mut last = ticks(&c, tid, 1).len();
    let mut still_since = Instant::now();
    c.wait_until(Duration::from_secs(60), "the stale attempt to stop", |c| {
        let now = ticks(c, tid, 1).len();
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
        // It steps every 0.2 s: 3 s without a step is a dead attempt (checked again at the end).
        Ok(still_since.elapsed() > Duration::from_secs(3))
    })
    .unwrap();
    assert!(
        (last as u32) < STEPS,
        "the stale attempt was killed before it finished: it ran to step {last}"
    );
    // No process of it is left in the worker's container (its shell names the ticks file).
    let ps = c.exec(&victim, &["ps", "-ww", "-eo", "pid,args"]).unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.contains("chorus-worker"), "{ps}");
    assert!(
        !ps.contains("/shared/ticks"),
        "the stale attempt's processes live on:\n{ps}"
    );
    c.wait_until(Duration::from_secs(30), "the partitioned worker back", |c| {
        Ok(c.alive_workers()? == 2)
    })
    .unwrap();
    assert_eq!(wait_ended(&c, exp, Duration::from_secs(90)), "completed");
    assert_eq!(
        ticks(&c, tid, 1).len(),
        last,
        "the stale attempt stepped on after it was seen to stop"
    );

    let t = trials(&c, exp).unwrap().remove(0);
    let final_attempt = t["attempt"].as_u64().unwrap();
    assert!(final_attempt >= 2, "{t}");
    let r = runs(&c);
    assert_eq!(
        r.worker.get(&(tid, 1)).map(String::as_str),
        Some(victim.as_str()),
        "{r:?}"
    );
    assert_eq!(
        r.worker.get(&(tid, final_attempt)).map(String::as_str),
        Some(other),
        "{r:?}"
    );
    assert_eq!(r.done.get(&tid).cloned().unwrap_or_default(), [final_attempt], "{r:?}");
    let copy = c.storage_copy().unwrap();
    let storage = storage_of(&c, &copy, exp);
    let h = history_of(&storage, exp, tid);
    // The lineage: attempts in order, each one's steps consecutive, ending with the final
    // attempt's last step.
    let attempts: Vec<u64> = h.iter().map(|l| l["attempt"].as_u64().unwrap()).collect();
    assert!(attempts.windows(2).all(|w| w[0] <= w[1]), "{attempts:?}");
    assert!(h.iter().all(same_attempt), "{h:?}");
    for a in 1..=final_attempt {
        let steps: Vec<i64> = h
            .iter()
            .filter(|l| l["attempt"] == a)
            .map(|l| l["step"].as_i64().unwrap())
            .collect();
        assert!(steps.windows(2).all(|w| w[1] == w[0] + 1), "attempt {a}: {steps:?}");
    }
    let end = h.last().unwrap();
    assert_eq!(
        (end["step"].as_i64(), end["attempt"].as_u64()),
        (Some(STEPS as i64), Some(final_attempt))
    );
    // No line of attempt 1 from after the cut-over: it printed at most `cut_at` lines before it
    // (each step is ticked before it is printed), and it stepped on to `last` after.
    // The stale attempt did store lines after the cut-over, under its own attempt's names:
    // what keeps them out of the history is the fencing, not a lack of writing.
    let e = experiment(&c, exp).unwrap();
    let metrics = copy
        .dir_of(e["storage"].as_str().unwrap())
        .unwrap()
        .join(format!("experiments/{exp}/trials/{tid}/metrics"));
    let mut stored_by_1 = Vec::new();
    for f in std::fs::read_dir(&metrics).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("0001-") && name.ends_with(".jsonl") {
            for line in std::fs::read_to_string(&f).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                stored_by_1.extend(v["step"].as_i64());
            }
        }
    }
    assert!(
        stored_by_1.iter().any(|s| *s as usize > cut_at),
        "attempt 1 stored no line after the cut-over (steps {stored_by_1:?}, cut after {cut_at})"
    );
    let kept_of_1: Vec<i64> = h
        .iter()
        .filter(|l| l["attempt"] == 1)
        .map(|l| l["step"].as_i64().unwrap())
        .collect();
    assert!(
        kept_of_1.len() <= cut_at && kept_of_1.first().is_none_or(|s| *s == 1),
        "the history keeps steps {kept_of_1:?} of attempt 1, cut off after {cut_at} steps (it ran to {last})"
    );

    // The newest checkpoint is the final attempt's last step, whole; the stale attempt's later
    // checkpoints, if any, are under its own attempt's names.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prefix = storage.checkpoints_prefix(ExperimentId(exp), TrialId(tid));
    let dest = copy.path().join("../restored");
    let r = rt
        .block_on(checkpoint::restore_latest(&storage, &prefix, &dest))
        .unwrap();
    assert_eq!(
        r.restored,
        Some(checkpoint::CheckpointRef::new(STEPS as i64, final_attempt as u32))
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("step")).unwrap(),
        format!("{STEPS}\n")
    );
    let all = rt.block_on(checkpoint::list(&storage, &prefix)).unwrap();
    assert!(all.iter().all(|r| r.attempt as u64 <= final_attempt), "{all:?}");
}

/// A random sweep on three worker containers. One worker container is killed (node loss) while
/// it runs a trial, then the coordinator container is killed and replaced by a fresh one on the
/// same store volume. Nothing is lost (every trial ends; every metric the coordinator showed is
/// in the trial's history) and nothing runs twice (only the lost worker's trial ran a second
/// attempt; every trial finished exactly once).
#[test]
fn node_loss_and_a_coordinator_replaced_mid_sweep_lose_and_repeat_nothing() {
    const TRIALS: u64 = 9;
    const STEPS: u32 = 12;
    let c = cluster_or_skip!(DockerConfig {
        workers: 3,
        tls: tls(),
        ..Default::default()
    });
    let yaml = format!(
        "name: containers-crash
metric: {{name: loss, goal: minimize}}
parameters:
  k: {{values: [1, 2, 3, 4, 5, 6, 7, 8, 9]}}
  x: {{min: 0.0, max: 1.0}}
searcher: {{name: random, seed: 11}}
max_trials: {TRIALS}
parallel_trials: 3
max_restarts: 2
checkpoint: {{keep_last: 1}}
trial:
{}",
        stepping_trial(STEPS, "0.3")
    );
    let exp = submit(&c, "crash.yaml", &yaml);
    // Every metric the coordinator showed, per trial: (step, loss, attempt that printed it).
    let mut shown: BTreeMap<u64, BTreeSet<(i64, i64, u64)>> = BTreeMap::new();
    let mut observe = |c: &DockerCluster| -> anyhow::Result<Vec<Value>> {
        let ts = trials(c, exp)?;
        for t in &ts {
            let m = &t["last_metrics"];
            if let (Some(step), Some(loss), Some(a)) = (
                m["step"].as_i64(),
                m["loss"].as_f64(),
                m["a"].as_f64().map(|a| a as u64),
            ) {
                shown
                    .entry(t["id"].as_u64().unwrap())
                    .or_default()
                    .insert((step, loss as i64, a));
            }
        }
        Ok(ts)
    };

    // Node loss: a worker container killed mid-trial (well before its trial's end, so the trial
    // cannot have finished unseen).
    let mut victim = (String::new(), 0u64);
    c.wait_until(Duration::from_secs(90), "a trial half-way on a worker", |c| {
        let ts = observe(c)?;
        let done = ts.iter().filter(|t| t["state"] == "completed").count();
        let mid = ts
            .iter()
            .find(|t| t["state"] == "running" && (3..=6).contains(&t["last_metrics"]["step"].as_i64().unwrap_or(0)));
        if let (true, Some(t)) = (done >= 1, mid) {
            victim = (workers_of(t)[0].clone(), t["id"].as_u64().unwrap());
            return Ok(true);
        }
        Ok(false)
    })
    .unwrap();
    c.kill(&victim.0).unwrap();
    let lost_trial = victim.1;

    // The coordinator replaced while trials run on the surviving workers.
    c.wait_until(Duration::from_secs(60), "the lost trial placed again", |c| {
        let ts = observe(c)?;
        Ok(ts
            .iter()
            .any(|t| t["id"] == lost_trial && t["attempt"].as_u64() >= Some(2)))
    })
    .unwrap();
    c.wait_until(Duration::from_secs(30), "trials running", |c| {
        Ok(observe(c)?.iter().filter(|t| t["state"] == "running").count() >= 1)
    })
    .unwrap();
    c.restart_coordinator().unwrap();

    c.wait_until(Duration::from_secs(150), "the sweep to end", |c| {
        let ts = observe(c)?;
        Ok(ended(experiment(c, exp)?["state"].as_str().unwrap_or_default()) && !ts.is_empty())
    })
    .unwrap();
    assert_eq!(experiment(&c, exp).unwrap()["state"], "completed");
    let ts = trials(&c, exp).unwrap();
    assert_eq!(ts.len() as u64, TRIALS, "{ts:?}");
    assert!(ts.iter().all(|t| t["state"] == "completed"), "{ts:?}");

    // Nothing ran twice: the lost worker's trial ran a second attempt (a restart), every other
    // trial one attempt, re-attached across the coordinator's replacement; each finished once.
    let r = runs(&c);
    for t in &ts {
        let id = t["id"].as_u64().unwrap();
        let (attempt, restarts) = (t["attempt"].as_u64().unwrap(), t["restarts"].as_u64().unwrap());
        let started = r.started.get(&id).cloned().unwrap_or_default();
        let done = r.done.get(&id).cloned().unwrap_or_default();
        if id == lost_trial {
            assert_eq!((attempt, restarts), (2, 1), "the lost worker's trial: {t}");
            assert_eq!(started, [1, 2], "trial {id}: {r:?}");
        } else {
            assert_eq!((attempt, restarts), (1, 0), "trial {id}: {t}");
            assert_eq!(started, [1], "trial {id} started again: {r:?}");
        }
        assert_eq!(done, [attempt], "trial {id} finished once, by its final attempt: {r:?}");
    }

    // Nothing lost: each history is whole, and holds every metric the coordinator showed.
    let copy = c.storage_copy().unwrap();
    let storage = storage_of(&c, &copy, exp);
    for t in &ts {
        let id = t["id"].as_u64().unwrap();
        let h = history_of(&storage, exp, id);
        assert!(h.iter().all(same_attempt), "trial {id}: {h:?}");
        let attempt = t["attempt"].as_u64().unwrap();
        for a in 1..=attempt {
            let steps: Vec<i64> = h
                .iter()
                .filter(|l| l["attempt"] == a)
                .map(|l| l["step"].as_i64().unwrap())
                .collect();
            assert!(
                steps.windows(2).all(|w| w[1] == w[0] + 1),
                "trial {id}, attempt {a}: {steps:?}"
            );
        }
        let end = h.last().expect("a history");
        assert_eq!(
            (end["step"].as_i64(), end["attempt"].as_u64()),
            (Some(STEPS as i64), Some(attempt)),
            "trial {id}: {h:?}"
        );
        if id != lost_trial {
            let steps: Vec<i64> = h.iter().map(|l| l["step"].as_i64().unwrap()).collect();
            assert_eq!(steps, (1..=STEPS as i64).collect::<Vec<_>>(), "trial {id}: {h:?}");
        }
        let have: BTreeSet<(i64, i64, u64)> = h
            .iter()
            .map(|l| {
                (
                    l["step"].as_i64().unwrap(),
                    l["loss"].as_f64().unwrap() as i64,
                    l["a"].as_f64().unwrap() as u64,
                )
            })
            .collect();
        let missing: Vec<_> = shown
            .get(&id)
            .into_iter()
            .flatten()
            .filter(|m| !have.contains(m))
            .collect();
        assert!(
            missing.is_empty(),
            "trial {id}: shown but not in its history: {missing:?}"
        );
    }
}

/// A worker container stopped with SIGTERM (`docker stop`), as a node is taken away or a pod
/// evicted, hands its trial back: the worker exits by itself within the grace period, and the
/// trial resumes on the other worker from its checkpoint without spending a restart (it has
/// none to spend).
#[test]
fn a_sigterm_stopped_worker_container_hands_its_trial_back() {
    stop_hands_the_trial_back(false);
}

/// The same, with the worker drained first (`chorus worker drain`), as an operator takes a node
/// away by hand.
#[test]
fn a_drained_worker_container_stopped_with_sigterm_hands_its_trial_back() {
    stop_hands_the_trial_back(true);
}

fn stop_hands_the_trial_back(drain_first: bool) {
    const STEPS: u32 = 30;
    let c = cluster_or_skip!(DockerConfig {
        workers: 2,
        tls: tls(),
        ..Default::default()
    });
    let yaml = format!(
        "name: containers-stop
metric: {{name: loss, goal: minimize}}
parameters:
  k: {{value: 2}}
searcher: {{name: grid}}
max_restarts: 0
checkpoint: {{keep_last: 1}}
trial:
{}",
        stepping_trial(STEPS, "0.2")
    );
    let exp = submit(&c, "stop.yaml", &yaml);
    let mut victim = String::new();
    c.wait_until(Duration::from_secs(60), "a checkpoint of attempt 1", |c| {
        let ts = trials(c, exp)?;
        let Some(t) = ts.first() else { return Ok(false) };
        victim = workers_of(t).first().cloned().unwrap_or_default();
        Ok(t["checkpoint_step"].as_i64().unwrap_or(0) >= 3 && !victim.is_empty())
    })
    .unwrap();
    if drain_first {
        c.chorus_json(&["worker", "drain", &victim, "--output", "json"])
            .unwrap();
    }
    let code = c.stop(&victim, Duration::from_secs(30)).unwrap();
    assert_eq!(
        code,
        0,
        "the worker exited by itself on SIGTERM, not killed after the grace period:\n{}",
        c.logs(&victim)
    );
    assert_eq!(wait_ended(&c, exp, Duration::from_secs(90)), "completed");
    let t = trials(&c, exp).unwrap().remove(0);
    assert_eq!(t["state"], "completed", "{t}");
    assert_eq!(t["restarts"], 0, "a handed-back trial spends no restart: {t}");
    assert_eq!(t["attempt"], 2, "{t}");
    let other = if victim == "w0" { "w1" } else { "w0" };
    let tid = t["id"].as_u64().unwrap();
    let r = runs(&c);
    assert_eq!(r.worker.get(&(tid, 2)).map(String::as_str), Some(other), "{r:?}");
    assert_eq!(r.started.get(&tid).cloned().unwrap_or_default(), [1, 2], "{r:?}");
    assert_eq!(r.done.get(&tid).cloned().unwrap_or_default(), [2], "{r:?}");
    // Attempt 2 went on from attempt 1's checkpoint, not from the start.
    let copy = c.storage_copy().unwrap();
    let storage = storage_of(&c, &copy, exp);
    let h = history_of(&storage, exp, tid);
    assert!(h.iter().all(same_attempt), "{h:?}");
    let steps_of = |a: u64| -> Vec<i64> {
        h.iter()
            .filter(|l| l["attempt"] == a)
            .map(|l| l["step"].as_i64().unwrap())
            .collect()
    };
    let (one, two) = (steps_of(1), steps_of(2));
    assert!(one.len() >= 3 && one.windows(2).all(|w| w[1] == w[0] + 1), "{one:?}");
    assert!(two.windows(2).all(|w| w[1] == w[0] + 1), "{two:?}");
    assert!(
        two.first().is_some_and(|s| *s > 3),
        "attempt 2 began after the checkpoint: {two:?}"
    );
    assert_eq!(two.last().copied(), Some(STEPS as i64), "{two:?}");
}
