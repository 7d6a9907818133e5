//! Multi-rank trials: gang placement, the torchrun environment for command trials, and
//! data-parallel builtin training that reads every sample exactly once per epoch even when a
//! worker is SIGKILLed mid-epoch.

use super::*;
use chorus_tests::ClusterConfig;
use std::collections::{BTreeMap, BTreeSet};

/// A two-rank command trial whose ranks really talk: rank 0 listens on MASTER_ADDR:MASTER_PORT
/// as `torch.distributed`'s TCP store would, rank 1 connects to it and sends its rank, and each
/// rank writes the torchrun variables it was given.
const TWO_RANK_PROGRAM: &str = r#"
import json, os, socket, sys, time
out = sys.argv[1]
env = {k: os.environ.get(k) for k in ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
       "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT"]}
addr = (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
print("hello from rank " + env["RANK"], flush=True)
if env["RANK"] == "0":
    s = socket.create_server(addr)
    conn, _ = s.accept()
    env["heard"] = conn.recv(16).decode()
    print('chorus:metric {"step": 1, "loss": 0.5}')
else:
    for _ in range(200):
        try:
            c = socket.create_connection(addr)
            break
        except OSError:
            time.sleep(0.05)
    c.sendall(env["RANK"].encode())
with open(os.path.join(out, "rank-" + env["RANK"] + ".json"), "w") as f:
    json.dump(env, f)
"#;

#[test]
fn command_trials_get_the_torchrun_environment() {
    let c = TestCluster::start(ClusterConfig {
        workers: 2,
        slots: 1,
        ..Default::default()
    })
    .unwrap();
    let program = c.write("two_ranks.py", TWO_RANK_PROGRAM);
    let out = c.dir.path().join("ranks");
    std::fs::create_dir_all(&out).unwrap();
    let yaml = format!(
        r#"
name: torchrun-env
metric: {{name: loss, goal: minimize}}
parameters: {{}}
searcher: {{name: grid}}
resources: {{workers: 2, cpus: 1}}
trial:
  command: [python3, {program}, {out}]
"#,
        program = program.display(),
        out = out.display()
    );
    let id = submit(&c, &c.write("env.yaml", &yaml));
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(60)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let read = |r: u32| -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(format!("rank-{r}.json"))).unwrap()).unwrap()
    };
    let (r0, r1) = (read(0), read(1));
    assert_eq!(r0["heard"], "1", "rank 1 reached rank 0 at MASTER_ADDR:MASTER_PORT");
    for (r, v) in [(0, &r0), (1, &r1)] {
        assert_eq!(v["RANK"], r.to_string());
        assert_eq!(v["WORLD_SIZE"], "2");
        assert_eq!(v["LOCAL_RANK"], "0", "one rank per worker");
        assert_eq!(v["LOCAL_WORLD_SIZE"], "1");
        assert_eq!(v["TORCHELASTIC_RESTART_COUNT"], "0");
        assert_eq!(v["MASTER_PORT"], r0["MASTER_PORT"]);
    }
    let groups: BTreeSet<String> = [&r0, &r1].iter().map(|v| v["GROUP_RANK"].to_string()).collect();
    assert_eq!(groups.len(), 2, "each worker is its own group");
    let t = &trials(&c, id)[0];
    assert_eq!(t["best_value"], 0.5, "rank 0's metrics are the trial's");
    // Each rank's output is kept; `trial logs` shows rank 0's unless told another.
    let tid = t["id"].to_string();
    let logs = |extra: &[&str]| {
        let mut args = vec!["trial", "logs", tid.as_str()];
        args.extend_from_slice(extra);
        c.chorus(&args)
    };
    let (r0, r1) = (logs(&[]), logs(&["--rank", "1"]));
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text(&r0).contains("hello from rank 0") && !text(&r0).contains("rank 1"),
        "{r0:?}"
    );
    assert!(
        text(&r1).contains("hello from rank 1") && !text(&r1).contains("rank 0"),
        "{r1:?}"
    );
    let none = logs(&["--rank", "2"]);
    assert_eq!(none.status.code(), Some(2), "{none:?}");
    assert!(String::from_utf8_lossy(&none.stderr).contains("no rank 2"), "{none:?}");
}

/// Three one-slot workers and two experiments whose trials need two ranks each: one trial runs
/// whole, the other waits whole (it never holds the third slot while waiting), and both finish.
#[test]
fn gangs_that_fit_only_one_at_a_time_never_deadlock() {
    let c = TestCluster::start(ClusterConfig {
        workers: 3,
        slots: 1,
        ..Default::default()
    })
    .unwrap();
    let log = c.dir.path().join("gangs.txt");
    let spec = |name: &str| {
        format!(
            r#"
name: {name}
metric: {{name: loss, goal: minimize}}
parameters: {{k: {{values: [1, 2]}}}}
searcher: {{name: grid}}
parallel_trials: 2
resources: {{workers: 2, cpus: 1}}
trial:
  command: [sh, -c, 'echo "start $CHORUS_TRIAL_ID $RANK $(date +%s%N)" >> {log}; sleep 0.5; echo "end $CHORUS_TRIAL_ID $RANK $(date +%s%N)" >> {log}; echo "chorus:metric {{\"loss\": ${{params.k}}}}"']
"#,
            log = log.display()
        )
    };
    let a = submit(&c, &c.write("a.yaml", &spec("gang-a")));
    let b = submit(&c, &c.write("b.yaml", &spec("gang-b")));
    for id in [a, b] {
        assert_eq!(
            wait_ended(&c, id, Duration::from_secs(90)),
            "completed",
            "{}",
            c.logs_tail()
        );
    }
    // Replay the log: never more than three ranks at once, and each trial's ranks together.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut events: Vec<(u128, i32, String)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[3].parse().unwrap(),
                if f[0] == "start" { 1 } else { -1 },
                f[1].to_string(),
            )
        })
        .collect();
    events.sort();
    let (mut running, mut most) = (0, 0);
    for (_, delta, _) in &events {
        running += delta;
        most = most.max(running);
    }
    assert!(most <= 3, "{most} ranks ran at once on three slots");
    let starts: BTreeMap<String, usize> = events.iter().filter(|e| e.1 == 1).fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.2.clone()).or_default() += 1;
        m
    });
    assert_eq!(starts.len(), 4, "four trials: {starts:?}");
    assert!(
        starts.values().all(|&n| n == 2),
        "every trial ran both ranks once: {starts:?}"
    );
}

/// A two-rank builtin trial on three one-slot workers. Once it has checkpointed mid-epoch, the
/// worker of one rank is SIGKILLed: the other rank fails within the collective timeout, the
/// trial restarts from its checkpoint on the two live workers, and the samples trained on in
/// the surviving lineage are every training sample exactly once per epoch.
#[test]
fn a_sigkilled_rank_loses_and_repeats_no_sample() {
    let trace_root = tempfile::tempdir().unwrap();
    let trace = trace_root.path().to_path_buf();
    let mut c = TestCluster::start(ClusterConfig {
        workers: 3,
        slots: 1,
        // Long enough that the lease cannot be what notices the death: the surviving rank's
        // collective must.
        lease_ttl: Duration::from_secs(30),
        env: vec![
            ("CHORUS_COLLECTIVE_TIMEOUT".into(), "5s".into()),
            ("CHORUS_SAMPLE_TRACE_DIR".into(), trace.display().to_string()),
        ],
        ..Default::default()
    })
    .unwrap();
    let data_dir = c.dir.path().join("emo");
    let data = format!("file://{}", data_dir.display());
    let out = c.chorus(&[
        "dataset",
        "synth",
        "--out",
        &data,
        "--samples",
        "1500",
        "--shards",
        "7",
        "--seed",
        "2",
    ]);
    assert!(out.status.success(), "synth: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = format!(
        r#"
name: exactly-once
metric: {{name: val_accuracy, goal: maximize}}
parameters: {{}}
searcher: {{name: grid}}
max_restarts: 2
resources: {{workers: 2, cpus: 1}}
trial:
  builtin:
    model: {{kind: multimodal, modalities: [text, audio]}}
    data: {data}
    epochs: 2
    batch_size: 16
    lr: 0.003
    checkpoint_every: 6
    log_every: 2
"#
    );
    let id = submit(&c, &c.write("dp.yaml", &yaml));
    let mut victim = String::new();
    c.wait_until(Duration::from_secs(180), "a mid-epoch checkpoint", |c| {
        let ts = trials(c, id);
        let Some(t) = ts.first() else { return Ok(false) };
        if t["checkpoint_step"].as_i64().unwrap_or(0) >= 12 {
            victim = t["worker_id"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .nth(1)
                .unwrap_or_default()
                .to_string();
            return Ok(!victim.is_empty());
        }
        Ok(false)
    })
    .unwrap();
    let i: usize = victim.trim_start_matches("worker-").parse().unwrap();
    c.kill_worker(i);
    let killed_at = std::time::Instant::now();
    let mut message = String::new();
    c.wait_until(Duration::from_secs(20), "the surviving rank to fail", |c| {
        let t = trials(c, id).remove(0);
        message = t["message"].as_str().unwrap_or_default().to_string();
        Ok(t["restarts"].as_u64().unwrap_or(0) >= 1)
    })
    .unwrap();
    // Within the 5 s collective timeout plus reporting, far inside the 30 s lease.
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed_at.elapsed()
    );
    assert!(
        message.contains("collective"),
        "the survivor's error names the collective: {message}"
    );
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(300)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let t = &trials(&c, id)[0];
    assert!(
        t["restarts"].as_u64().unwrap() >= 1,
        "the killed rank cost a restart: {t}"
    );
    assert!(t["attempt"].as_u64().unwrap() >= 2, "{t}");

    // The surviving lineage: for each (epoch, step), the latest attempt that trained it.
    let mut lineage: BTreeMap<(u64, u64), (u64, Vec<String>)> = BTreeMap::new();
    let trial_dir = trace.join(format!("trial-{}", t["id"]));
    for attempt_dir in std::fs::read_dir(&trial_dir).unwrap() {
        let attempt_dir = attempt_dir.unwrap().path();
        let attempt: u64 = attempt_dir
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches("attempt-")
            .parse()
            .unwrap();
        let mut steps: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
        for file in std::fs::read_dir(&attempt_dir).unwrap() {
            for line in std::fs::read_to_string(file.unwrap().path()).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                let keys = v["keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().to_string());
                steps
                    .entry((v["epoch"].as_u64().unwrap(), v["step"].as_u64().unwrap()))
                    .or_default()
                    .extend(keys);
            }
        }
        for (k, keys) in steps {
            if lineage.get(&k).is_none_or(|(a, _)| *a < attempt) {
                lineage.insert(k, (attempt, keys));
            }
        }
    }
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("manifest.json")).unwrap()).unwrap();
    let train_samples: u64 = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["split"] == "train")
        .map(|s| s["samples"].as_u64().unwrap())
        .sum();
    assert!(train_samples > 0);
    let attempts: BTreeSet<u64> = lineage.values().map(|(a, _)| *a).collect();
    assert!(
        attempts.len() >= 2,
        "the lineage spans the killed attempt and its successor: {attempts:?}"
    );
    for epoch in 0..2 {
        let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
        for ((e, _), (_, keys)) in &lineage {
            if *e == epoch {
                for k in keys {
                    *seen.entry(k.as_str()).or_default() += 1;
                }
            }
        }
        let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            repeated.is_empty(),
            "epoch {epoch}: samples trained twice: {repeated:?}"
        );
        assert_eq!(
            seen.len() as u64,
            train_samples,
            "epoch {epoch}: every training sample once"
        );
    }
    // The coordinator recorded where the data stood at the last checkpoint.
    let position = &t["data_position"];
    assert_eq!(
        position["plan"]["epoch"], 1,
        "the last checkpoint is of the last epoch: {position}"
    );
    assert_eq!(position["plan"]["ranks"].as_array().map(Vec::len), Some(2));
}

/// A worker of a two-rank builtin trial shuts down politely mid-epoch: the ranks agree to stop at
/// the same step, rank 0 checkpoints, and the trial is placed again without spending a restart.
#[test]
fn a_worker_shutdown_pauses_every_rank_at_no_cost() {
    let mut c = TestCluster::start(ClusterConfig {
        workers: 2,
        slots: 1,
        ..Default::default()
    })
    .unwrap();
    let data = format!("file://{}", c.dir.path().join("emo").display());
    let out = c.chorus(&[
        "dataset",
        "synth",
        "--out",
        &data,
        "--samples",
        "1200",
        "--shards",
        "5",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "synth: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = chorus_tests::data_parallel_spec("dp-shutdown", &data);
    let id = submit(&c, &c.write("dp.yaml", &yaml));
    c.wait_until(Duration::from_secs(120), "training under way", |c| {
        let ts = trials(c, id);
        Ok(ts
            .first()
            .is_some_and(|t| t["last_metrics"]["step"].as_u64().unwrap_or(0) >= 4))
    })
    .unwrap();
    c.stop_worker(1);
    c.wait_until(Duration::from_secs(30), "the trial to be requeued", |c| {
        Ok(trials(c, id)[0]["attempt"].as_u64().unwrap_or(0) >= 2 || trials(c, id)[0]["state"] == "pending")
    })
    .unwrap();
    c.start_worker().unwrap();
    assert_eq!(
        wait_ended(&c, id, Duration::from_secs(240)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let t = &trials(&c, id)[0];
    assert_eq!(t["restarts"], 0, "a polite shutdown costs no restart: {t}");
    assert!(t["attempt"].as_u64().unwrap() >= 2, "{t}");
}
