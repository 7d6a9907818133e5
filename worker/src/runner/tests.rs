//! The runner against `memory://` storage with small `sh` trials.

use super::*;
use chorus_core::storage::parse_log_chunk_name;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::json;
use std::time::Instant as StdInstant;

const EXP: u64 = 1;

struct Fixture {
    ctx: RunnerContext,
    storage_uri: String,
    storage: Storage,
    _dir: tempfile::TempDir,
    scratch: tempfile::TempDir,
}

fn fixture(name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ctx = RunnerContext {
        worker_id: "w-test".into(),
        data_dir: dir.path().join("data"),
        stores: StorageCache::new(StorageOptions::default()),
        kill_grace: Duration::from_millis(300),
        output_grace: Duration::from_millis(300),
        store_retry: Duration::from_secs(2),
        advertise_address: std::net::Ipv4Addr::LOCALHOST.into(),
        collective_timeout: Duration::from_secs(5),
        rendezvous_timeout: Duration::from_secs(5),
        rendezvous: None,
        containment: Arc::new(
            containment::Containment::new(containment::ContainmentMode::Auto, &dir.path().join("data")).unwrap(),
        ),
        trial_env: environment::TrialEnv::from_worker(&[]),
        gpus: Vec::new(),
        gpu_sampling: None,
    };
    let storage_uri = format!("memory://runner-{name}");
    let storage = ctx.stores.open(&storage_uri).unwrap();
    Fixture {
        ctx,
        storage_uri,
        storage,
        _dir: dir,
        scratch: tempfile::tempdir().unwrap(),
    }
}

impl Fixture {
    fn assignment(&self, trial: u64, attempt: u32, script: &str) -> pb::Assignment {
        pb::Assignment {
            experiment_id: EXP,
            trial_id: trial,
            attempt,
            params_json: r#"{"lr":0.1}"#.into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: [("SCRATCH".to_string(), self.scratch.path().display().to_string())].into(),
            timeout_ms: 0,
            storage: self.storage_uri.clone(),
            resources: Some(pb::Resources { cpus: 1, gpus: 0 }),
            keep_checkpoints: 3,
            metric: "loss".into(),
            builtin_json: String::new(),
            keep_best_checkpoints: 0,
            maximize: false,
            world_size: 1,
            local_world_size: 1,
            group_world_size: 1,
            ..Default::default()
        }
    }

    async fn run(&self, a: &pb::Assignment) -> (pb::Exited, Vec<pb::TrialEvent>) {
        let (_stop, stop_rx) = watch::channel(None);
        self.run_with(a, stop_rx).await
    }

    async fn run_with(
        &self,
        a: &pb::Assignment,
        stop: watch::Receiver<Option<Stop>>,
    ) -> (pb::Exited, Vec<pb::TrialEvent>) {
        self.run_on(a, &[], stop).await
    }

    /// Runs `a` with the worker GPUs `gpu_ids` allotted to it.
    async fn run_on(
        &self,
        a: &pb::Assignment,
        gpu_ids: &[String],
        stop: watch::Receiver<Option<Stop>>,
    ) -> (pb::Exited, Vec<pb::TrialEvent>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let events = Events::new(tx);
        // Acknowledges every event at once, as an agent with a coordinator that is up does.
        let flow = events.flow().clone();
        let attempt = a.attempt;
        let delivered = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(e) = rx.recv().await {
                flow.delivered(attempt, std::slice::from_ref(&e));
                all.push(e);
            }
            all
        });
        let exited = run_attempt(&self.ctx, a, gpu_ids, events, stop).await;
        (exited, delivered.await.unwrap())
    }

    async fn object(&self, key: &object_store::path::Path) -> Option<String> {
        match self.storage.store.get(key).await {
            Ok(r) => Some(String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    async fn metrics(&self, trial: u64) -> Vec<serde_json::Value> {
        chorus_core::history::read_history(&self.storage, ExperimentId(EXP), TrialId(trial), 10_000)
            .await
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The attempt's log, chunks in order; also checks chunks are numbered 0, 1, 2...
    async fn log(&self, trial: u64, attempt: u32) -> String {
        let prefix = self.storage.logs_prefix(ExperimentId(EXP), TrialId(trial));
        let objects: Vec<_> = self.storage.store.list(Some(&prefix)).try_collect().await.unwrap();
        let mut chunks: Vec<(u32, object_store::path::Path)> = objects
            .into_iter()
            .filter_map(|o| {
                let (a, r, c) = parse_log_chunk_name(o.location.filename()?)?;
                (a == attempt && r == 0).then_some((c, o.location))
            })
            .collect();
        chunks.sort();
        let mut out = String::new();
        for (i, (c, key)) in chunks.iter().enumerate() {
            assert_eq!(*c as usize, i, "log chunks are numbered from 0 without gaps");
            let text = self.object(key).await.unwrap();
            assert!(!text.is_empty(), "empty chunks are not stored");
            out.push_str(&text);
        }
        out
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}

fn kind_names(events: &[pb::TrialEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e.kind.as_ref().unwrap() {
            Kind::Started(_) => "started",
            Kind::Metric(_) => "metric",
            Kind::Checkpoint(_) => "checkpoint",
            Kind::Exited(_) => "exited",
            Kind::Malformed(_) => "malformed",
        })
        .collect()
}

fn assert_seqs_from_one(events: &[pb::TrialEvent]) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
}

/// A typed metric event as the report it carries.
fn typed(m: &pb::Metric) -> chorus_core::metric::MetricReport {
    chorus_core::metric::MetricReport {
        step: m.step,
        values: m.values.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}

fn metric_jsons(events: &[pb::TrialEvent]) -> Vec<serde_json::Value> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Metric(m)) => Some(serde_json::Value::Object(typed(m).to_json())),
            _ => None,
        })
        .collect()
}

fn checkpoints(events: &[pb::TrialEvent]) -> Vec<pb::CheckpointCommitted> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Checkpoint(c)) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn kind(e: &pb::Exited) -> pb::ExitKind {
    pb::ExitKind::try_from(e.kind).unwrap()
}

/// Members of a process group that are still alive. `kill(-pgid, 0)` alone cannot tell: it also
/// succeeds while a member is a zombie, and an init that does not reap orphans (as in some
/// containers) leaves killed grandchildren as zombies for good. A zombie is dead, so read states.
fn live_group_members(pgid: i32) -> Vec<i32> {
    if nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None) == Err(nix::errno::Errno::ESRCH) {
        return Vec::new();
    }
    let mut live = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (state, pgrp) = (fields[0], fields[2].parse::<i32>().unwrap_or(0));
        if pgrp == pgid && state != "Z" && state != "X" {
            live.push(pid);
        }
    }
    live
}

async fn wait_for_file(path: &Path) -> String {
    let start = StdInstant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_group_gone(pgid: i32) {
    let start = StdInstant::now();
    while !live_group_members(pgid).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "processes of group {pgid} survived: {:?}",
            live_group_members(pgid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_successful_trial_reports_metrics_checkpoints_and_logs() {
    let f = fixture("success");
    let mut a = f.assignment(11, 1, r#"
        echo "env $CHORUS_EXPERIMENT_ID $CHORUS_TRIAL_ID $CHORUS_ATTEMPT $CHORUS_WORKER_ID $PYTHONUNBUFFERED $CHORUS_PARAMS restored=${CHORUS_RESTORED_STEP:-none} mine=$MY_VAR"
        echo 'chorus:metric {"loss": 0.9}'
        echo "to stderr" >&2
        echo state-3 > "$CHORUS_CHECKPOINT_DIR/state.txt"
        echo 'chorus:metric {"step": 3, "loss": 0.25}'
        echo "$CHORUS_CHECKPOINT_DIR" > "$SCRATCH/ckdir"
    "#);
    a.env.insert("MY_VAR".into(), "hello".into());
    // The worker's facts win over a spec that tries to set them.
    a.env.insert("CHORUS_TRIAL_ID".into(), "999".into());
    let (exited, events) = f.run(&a).await;

    assert_eq!(kind(&exited), pb::ExitKind::Succeeded, "{exited:?}");
    assert_eq!(exited.code, Some(0));
    assert_eq!(
        kind_names(&events),
        ["started", "metric", "metric", "checkpoint", "exited"]
    );
    assert_seqs_from_one(&events);
    assert!(matches!(&events[0].kind, Some(Kind::Started(s)) if s.restored_step.is_none()));
    assert_eq!(events.last().unwrap().kind, Some(Kind::Exited(exited.clone())));
    assert_eq!(
        metric_jsons(&events),
        vec![json!({"loss": 0.9}), json!({"step": 3, "loss": 0.25})]
    );
    let ck = checkpoints(&events);
    assert_eq!(ck[0].step, 3);
    assert_eq!(
        ck[0].manifest_key,
        "experiments/1/trials/11/checkpoints/000000000003-a0001/MANIFEST.json"
    );
    assert!(
        f.object(&object_store::path::Path::from(ck[0].manifest_key.as_str()))
            .await
            .is_some()
    );

    assert_eq!(
        f.metrics(11).await,
        vec![
            json!({"loss": 0.9, "attempt": 1}),
            json!({"step": 3, "loss": 0.25, "attempt": 1})
        ]
    );
    let log = f.log(11, 1).await;
    assert!(
        log.contains("env 1 11 1 w-test 1 {\"lr\":0.1} restored=none mine=hello\n"),
        "{log}"
    );
    assert!(log.contains("to stderr\n"), "{log}");
    assert!(log.contains("chorus:metric {\"step\": 3, \"loss\": 0.25}\n"), "{log}");

    let restored = tempfile::tempdir().unwrap();
    let r = checkpoint::restore_latest(
        &f.storage,
        &f.storage.checkpoints_prefix(ExperimentId(EXP), TrialId(11)),
        restored.path(),
    )
    .await
    .unwrap();
    assert_eq!(r.step(), Some(3));
    assert_eq!(
        std::fs::read_to_string(restored.path().join("state.txt")).unwrap(),
        "state-3\n"
    );

    let ckdir = std::fs::read_to_string(f.scratch("ckdir")).unwrap();
    assert!(ckdir.trim().starts_with(f.ctx.data_dir.to_str().unwrap()), "{ckdir}");
    assert!(
        !Path::new(ckdir.trim()).exists(),
        "the local attempt directory is removed"
    );
    assert!(!f.ctx.attempt_dir(11, 1, 0).exists());
}

#[tokio::test]
async fn attempt_two_restores_the_checkpoint_and_extends_the_metrics() {
    let f = fixture("restore");
    let a1 = f.assignment(
        12,
        1,
        r#"
        echo from-attempt-1 > "$CHORUS_CHECKPOINT_DIR/state.txt"
        echo 'chorus:metric {"step": 5, "loss": 0.7}'
        exit 3
    "#,
    );
    let (exited, events) = f.run(&a1).await;
    assert_eq!(kind(&exited), pb::ExitKind::Failed);
    assert_eq!(
        (exited.code, exited.message.as_str()),
        (Some(3), "exited with status 3")
    );
    assert_eq!(checkpoints(&events).iter().map(|c| c.step).collect::<Vec<_>>(), [5]);

    let mut a2 = f.assignment(
        12,
        2,
        r#"
        test "$CHORUS_RESTORED_STEP" = 5 || { echo "restored step is '$CHORUS_RESTORED_STEP'"; exit 7; }
        echo "restored: $(cat "$CHORUS_CHECKPOINT_DIR/state.txt")"
        echo a2-six > "$CHORUS_CHECKPOINT_DIR/state.txt"
        echo 'chorus:metric {"step": 6, "loss": 0.5}'
        sleep 0.2
        echo a2-seven > "$CHORUS_CHECKPOINT_DIR/state.txt"
        echo 'chorus:metric {"step": 7, "loss": 0.4}'
    "#,
    );
    a2.keep_checkpoints = 1;
    // What the coordinator hands the second attempt: the checkpoint and metric line it
    // acknowledged from the first.
    a2.restore = Some(pb::CheckpointRef { step: 5, attempt: 1 });
    a2.acked_metrics = vec![pb::AttemptMetricCount { attempt: 1, count: 1 }];
    let (exited, events) = f.run(&a2).await;
    assert_eq!(
        kind(&exited),
        pb::ExitKind::Succeeded,
        "{exited:?} {:?}",
        f.log(12, 2).await
    );
    assert!(matches!(&events[0].kind, Some(Kind::Started(s)) if s.restored_step == Some(5)));
    assert!(f.log(12, 2).await.contains("restored: from-attempt-1\n"));
    // Step 6 may be folded into 7 when the uploader is slow; order and the last one are fixed.
    let steps: Vec<i64> = checkpoints(&events).iter().map(|c| c.step).collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]) && steps.last() == Some(&7),
        "{steps:?}"
    );
    assert_eq!(*kind_names(&events).last().unwrap(), "exited");

    let prefix = f.storage.checkpoints_prefix(ExperimentId(EXP), TrialId(12));
    assert_eq!(
        checkpoint::list_steps(&f.storage, &prefix).await.unwrap(),
        [7],
        "keep_checkpoints = 1 prunes"
    );
    let restored = tempfile::tempdir().unwrap();
    checkpoint::restore_latest(&f.storage, &prefix, restored.path())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(restored.path().join("state.txt")).unwrap(),
        "a2-seven\n"
    );

    assert_eq!(
        f.metrics(12).await,
        vec![
            json!({"step": 5, "loss": 0.7, "attempt": 1}),
            json!({"step": 6, "loss": 0.5, "attempt": 2}),
            json!({"step": 7, "loss": 0.4, "attempt": 2}),
        ]
    );
    // Each attempt's log is its own.
    assert!(!f.log(12, 1).await.contains("restored"));
}

#[tokio::test]
async fn a_rerun_of_the_same_attempt_replaces_its_metric_lines() {
    let f = fixture("rerun");
    let a = f.assignment(13, 1, r#"echo 'chorus:metric {"step": 1, "loss": 1}'"#);
    f.run(&a).await;
    f.run(&a).await;
    assert_eq!(f.metrics(13).await, vec![json!({"step": 1, "loss": 1.0, "attempt": 1})]);
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let f = fixture("timeout");
    let mut a = f.assignment(
        21,
        1,
        r#"
        sleep 1000 &
        echo $$ > "$SCRATCH/pgid"
        echo "still going"
        sleep 1000
    "#,
    );
    a.timeout_ms = 500;
    let started = StdInstant::now();
    let run = f.run(&a);
    tokio::pin!(run);
    let pgid_file = f.scratch("pgid");
    let pgid: i32 = tokio::select! {
        s = wait_for_file(&pgid_file) => s.trim().parse().unwrap(),
        _ = &mut run => panic!("the trial ended before it started its children"),
    };
    assert!(
        live_group_members(pgid).len() >= 2,
        "sh and its background sleep share the group"
    );
    let (exited, events) = run.await;

    assert_eq!(kind(&exited), pb::ExitKind::TimedOut, "{exited:?}");
    assert!(exited.message.contains("timed out after 500ms"), "{}", exited.message);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(kind_names(&events), ["started", "exited"]);
    assert_group_gone(pgid).await;
    assert!(f.log(21, 1).await.contains("still going\n"));
}

#[tokio::test]
async fn a_kill_order_stops_a_trial_that_ignores_sigterm() {
    let f = fixture("kill");
    let a = f.assignment(
        22,
        1,
        r#"
        trap '' TERM
        echo $$ > "$SCRATCH/pgid"
        sleep 1000 &
        wait
    "#,
    );
    let (stop_tx, stop_rx) = watch::channel(None);
    let run = f.run_with(&a, stop_rx);
    tokio::pin!(run);
    let pgid_file = f.scratch("pgid");
    let pgid: i32 = tokio::select! {
        s = wait_for_file(&pgid_file) => s.trim().parse().unwrap(),
        _ = &mut run => panic!("the trial ended early"),
    };
    stop_tx.send_replace(Some(Stop::Kill("user asked".into())));
    let (exited, events) = run.await;
    assert_eq!(kind(&exited), pb::ExitKind::Killed, "{exited:?}");
    assert_eq!(exited.message, "user asked");
    assert_eq!(kind_names(&events), ["started", "exited"]);
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn a_stop_before_start_runs_nothing() {
    let f = fixture("early-stop");
    let a = f.assignment(23, 1, r#"touch "$SCRATCH/ran""#);
    let (_tx, rx) = watch::channel(Some(Stop::Kill("changed my mind".into())));
    let (exited, events) = f.run_with(&a, rx).await;
    assert_eq!(kind(&exited), pb::ExitKind::Killed);
    assert_eq!(kind_names(&events), ["exited"]);
    assert!(!f.scratch("ran").exists());
}

#[tokio::test]
async fn malformed_lines_are_counted_and_capped_but_do_not_fail_the_trial() {
    let f = fixture("malformed");
    let a = f.assignment(
        31,
        1,
        r#"
        i=0
        while [ $i -lt 150 ]; do echo 'chorus:metric {"loss": "high"}'; i=$((i+1)); done
        echo 'chorus:metric {"loss": 0.1}'
        echo 'chorus:metrics are just a log line'
    "#,
    );
    let (exited, events) = f.run(&a).await;
    assert_eq!(kind(&exited), pb::ExitKind::Succeeded, "{exited:?}");
    assert!(exited.message.contains("150 malformed"), "{}", exited.message);
    let names = kind_names(&events);
    assert_eq!(
        names.iter().filter(|n| **n == "malformed").count(),
        MAX_MALFORMED_REPORTED as usize
    );
    assert_eq!(metric_jsons(&events), vec![json!({"loss": 0.1})]);
    let Some(Kind::Malformed(m)) = &events[1].kind else {
        panic!("{:?}", events[1])
    };
    assert_eq!(m.line, r#"chorus:metric {"loss": "high"}"#);
    assert!(m.error.contains("loss"), "{}", m.error);
    let log = f.log(31, 1).await;
    assert_eq!(log.matches("\"high\"").count(), 150, "every line goes to the log");
    assert!(log.contains("chorus:metrics are just a log line\n"));
}

#[tokio::test]
async fn failures_name_their_cause() {
    let f = fixture("failures");
    let (exited, _) = f.run(&f.assignment(41, 1, "kill -9 $$")).await;
    assert_eq!(kind(&exited), pb::ExitKind::Failed);
    assert_eq!(exited.code, None);
    assert!(exited.message.starts_with("killed by signal 9"), "{}", exited.message);

    let mut missing = f.assignment(42, 1, "");
    missing.command = vec!["/nonexistent/chorus-trial".into(), "--flag".into()];
    let (exited, events) = f.run(&missing).await;
    assert_eq!(kind(&exited), pb::ExitKind::Failed);
    assert!(
        exited.message.contains("/nonexistent/chorus-trial"),
        "{}",
        exited.message
    );
    assert!(exited.message.contains("No such file"), "{}", exited.message);
    assert_eq!(kind_names(&events), ["exited"], "nothing started");

    let mut empty = f.assignment(43, 1, "");
    empty.command.clear();
    assert!(f.run(&empty).await.0.message.contains("empty command"));

    let mut bad_storage = f.assignment(44, 1, "true");
    bad_storage.storage = "ftp://nowhere/x".into();
    let (exited, _) = f.run(&bad_storage).await;
    assert_eq!(kind(&exited), pb::ExitKind::Failed);
    assert!(exited.message.contains("cannot open storage"), "{}", exited.message);
}

/// A trial's detached processes (a background child in its group, a `setsid` one holding the
/// pipes, a double-forked daemon) die when its main process exits: a finished attempt owns no
/// processes, in either containment mode.
async fn detached_processes_die_with_the_attempt(f: Fixture) {
    let a = f.assignment(
        51,
        1,
        r#"
        sleep 1000 &
        setsid sh -c 'echo $$ > "$SCRATCH/escaped"; exec sleep 1000' &
        sh -c 'setsid sh -c "echo \$\$ > \"$SCRATCH/daemon\"; exec sleep 1000" &' &
        while [ ! -s "$SCRATCH/escaped" ] || [ ! -s "$SCRATCH/daemon" ]; do sleep 0.05; done
        echo $$ > "$SCRATCH/pgid"
        echo main-done
    "#,
    );
    let started = StdInstant::now();
    let (exited, _) = f.run(&a).await;
    assert_eq!(kind(&exited), pb::ExitKind::Succeeded, "{exited:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let pgid: i32 = std::fs::read_to_string(f.scratch("pgid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_group_gone(pgid).await;
    for name in ["escaped", "daemon"] {
        let pid: i32 = wait_for_file(&f.scratch(name)).await.trim().parse().unwrap();
        assert!(!is_alive(pid), "the {name} process outlived its attempt");
    }
    assert!(f.log(51, 1).await.contains("main-done\n"));
}

fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next());
        !matches!(state, Some("Z" | "X") | None)
    })
}

#[tokio::test]
async fn detached_processes_die_with_the_attempt_in_the_default_containment() {
    detached_processes_die_with_the_attempt(fixture("leftovers")).await;
}

#[tokio::test]
async fn detached_processes_die_with_the_attempt_under_process_tracking() {
    let mut f = fixture("leftovers-tracked");
    f.ctx.containment =
        Arc::new(containment::Containment::new(containment::ContainmentMode::Process, &f.ctx.data_dir).unwrap());
    detached_processes_die_with_the_attempt(f).await;
}

/// The trial gets the allow-list of the worker's environment, its own `env` and Chorus's
/// variables; never the worker's token or storage credentials.
#[tokio::test]
async fn a_trial_does_not_inherit_the_workers_secrets() {
    let mut f = fixture("env");
    f.ctx.trial_env = environment::TrialEnv::from_vars(
        [
            ("PATH", std::env::var("PATH").unwrap_or_default().as_str()),
            ("LC_ALL", "C"),
            ("CHORUS_WORKER_TOKEN", "worker-secret"),
            ("CHORUS_TOKEN", "user-secret"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
            ("UNLISTED", "not-on-the-list"),
        ]
        .map(|(k, v)| (k.into(), v.into())),
        &[],
    );
    let a = f.assignment(52, 1, "env");
    let (exited, _) = f.run(&a).await;
    assert_eq!(kind(&exited), pb::ExitKind::Succeeded, "{exited:?}");
    let env = f.log(52, 1).await;
    for leaked in ["secret", "CHORUS_TOKEN", "AWS_", "UNLISTED"] {
        assert!(!env.contains(leaked), "the trial saw {leaked}:\n{env}");
    }
    for line in [
        "LC_ALL=C\n",
        "CHORUS_TRIAL_ID=52\n",
        "CHORUS_ATTEMPT=1\n",
        "CHORUS_ATTEMPT_TOKEN=",
    ] {
        assert!(env.contains(line), "the trial lacks {line}:\n{env}");
    }
    assert!(env.contains(&format!("SCRATCH={}\n", f.scratch.path().display())));
}

/// Retention keeps the newest checkpoints and the best by the experiment's metric, including a
/// score reported by an earlier attempt.
#[tokio::test]
async fn retention_keeps_the_best_checkpoint_by_the_metric() {
    let f = fixture("retention-best");
    let script = r#"
        for s in 1 2 3 4 5; do
            echo "$s" > "$CHORUS_CHECKPOINT_DIR/state"
            if [ "$s" = 2 ]; then loss=0.1; else loss=0.$((90 + s)); fi
            echo "chorus:metric {\"step\": $s, \"loss\": $loss}"
            sleep 0.05
        done
    "#;
    let mut a = f.assignment(40, 1, script);
    a.keep_checkpoints = 1;
    a.keep_best_checkpoints = 1;
    let (exited, _) = f.run(&a).await;
    assert_eq!(exited.kind(), pb::ExitKind::Succeeded, "{exited:?}");
    let prefix = f.storage.checkpoints_prefix(ExperimentId(EXP), TrialId(40));
    assert_eq!(checkpoint::list_steps(&f.storage, &prefix).await.unwrap(), vec![5, 2]);
    // Maximising instead keeps the newest only: it is also the best.
    a.attempt = 2;
    a.maximize = true;
    a.restore = Some(pb::CheckpointRef { step: 5, attempt: 1 });
    f.run(&a).await;
    assert_eq!(checkpoint::list_steps(&f.storage, &prefix).await.unwrap(), vec![5]);
}

/// Once the agent learns the attempt is stale, its recorder writes nothing more: no metric
/// line, no checkpoint, no log chunk, even though the program goes on printing until killed.
#[tokio::test]
async fn a_stale_attempt_writes_nothing_more() {
    let f = fixture("stale");
    let a = f.assignment(
        60,
        1,
        r#"
        echo 1 > "$CHORUS_CHECKPOINT_DIR/state"
        echo 'chorus:metric {"step": 1, "loss": 1}'
        sleep 1
        for s in 2 3 4 5; do
            echo "$s" > "$CHORUS_CHECKPOINT_DIR/state"
            echo "chorus:metric {\"step\": $s, \"loss\": 1}"
            echo "late output $s"
        done
        sleep 30
    "#,
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let events = Events::new(tx);
    let flow = events.flow().clone();
    let (stop_tx, stop_rx) = watch::channel(None);
    let runner = {
        let a = a.clone();
        let ctx = &f.ctx;
        async move { run_attempt(ctx, &a, &[], events, stop_rx).await }
    };
    let watcher = async {
        let mut seen = Vec::new();
        while let Some(e) = rx.recv().await {
            flow.delivered(1, std::slice::from_ref(&e));
            if matches!(&e.kind, Some(Kind::Checkpoint(c)) if c.step == 1) {
                // The coordinator answers ABORTED: the agent marks it stale, then kills it.
                flow.mark_stale();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = stop_tx.send(Some(Stop::Kill("stale attempt".into())));
            }
            seen.push(e);
        }
        seen
    };
    let (_, seen) = tokio::join!(runner, watcher);
    let steps: Vec<i64> = seen
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Metric(m)) => m.step,
            _ => None,
        })
        .collect();
    assert_eq!(steps, [1], "no report after the attempt went stale");
    assert_eq!(checkpoints(&seen).iter().map(|c| c.step).collect::<Vec<_>>(), [1]);
    let stored: Vec<i64> = f
        .metrics(60)
        .await
        .iter()
        .map(|m| m["step"].as_i64().unwrap())
        .collect();
    assert_eq!(stored, [1], "no metric line stored after the attempt went stale");
    let prefix = f.storage.checkpoints_prefix(ExperimentId(EXP), TrialId(60));
    assert_eq!(checkpoint::list_steps(&f.storage, &prefix).await.unwrap(), [1]);
    assert!(
        !f.log(60, 1).await.contains("late output"),
        "no log chunk after it went stale"
    );
}

/// A trial printing far more than storage takes (here: storage refuses every write) cannot grow
/// the worker: the runner stops reading its pipes once the backlog is full, and the trial
/// blocks on its writes.
#[tokio::test]
async fn output_beyond_the_backlog_blocks_the_trial_instead_of_growing_the_worker() {
    let f = fixture("backlog");
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let mut a = f.assignment(
        61,
        1,
        r#"
        i=0
        while [ $i -lt 400 ]; do
            head -c 65000 /dev/zero | tr '\0' x; echo
            i=$((i + 1))
            echo $i > "$SCRATCH/printed.tmp" && mv "$SCRATCH/printed.tmp" "$SCRATCH/printed"
        done
    "#,
    );
    a.storage = format!("file://{}", store_dir.display());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let events = Events::new(tx);
    let (stop_tx, stop_rx) = watch::channel(None);
    let runner = {
        let a = a.clone();
        let ctx = &f.ctx;
        async move { run_attempt(ctx, &a, &[], events, stop_rx).await }
    };
    let probe = async {
        while let Some(e) = rx.recv().await {
            if matches!(e.kind, Some(Kind::Started(_))) {
                break;
            }
        }
        let repair = break_store(&store_dir);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let printed: u32 = std::fs::read_to_string(f.scratch("printed"))
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0);
        let _ = stop_tx.send(Some(Stop::Kill("test over".into())));
        repair();
        while rx.recv().await.is_some() {}
        printed
    };
    let (_, printed) = tokio::join!(runner, probe);
    // 400 lines of 65 kB are 26 MB; the backlog holds 16 MiB, the line channel 4 MiB at most.
    assert!(printed > 100, "the trial ran ({printed} lines)");
    assert!(
        printed < 400,
        "the trial was held back, not buffered whole ({printed} lines)"
    );
}

/// Makes every write to a `file://` store fail from now on (a file where its directory was,
/// which stops root too), and returns how to give it back.
fn break_store(dir: &Path) -> impl FnOnce() {
    let moved = dir.with_extension("moved");
    std::fs::rename(dir, &moved).unwrap();
    std::fs::write(dir, "not a directory").unwrap();
    let dir = dir.to_path_buf();
    move || {
        std::fs::remove_file(&dir).unwrap();
        std::fs::rename(&moved, &dir).unwrap();
    }
}

/// Runs `a` and breaks its store once it has started; `repair_after` gives the store back that
/// long after the break (never when `None`).
async fn run_with_broken_store(
    f: &Fixture,
    a: &pb::Assignment,
    store_dir: &Path,
    repair_after: Option<Duration>,
) -> (pb::Exited, Vec<pb::TrialEvent>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let events = Events::new(tx);
    let flow = events.flow().clone();
    let (_stop, stop_rx) = watch::channel(None);
    let runner = run_attempt(&f.ctx, a, &[], events, stop_rx);
    let watcher = async {
        let mut seen = Vec::new();
        let mut repair: Option<Box<dyn FnOnce()>> = None;
        let mut repair_at = None;
        loop {
            let e = match repair_at {
                Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        if let Some(r) = repair.take() {
                            r();
                        }
                        repair_at = None;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(e) = e else { break };
            flow.delivered(a.attempt, std::slice::from_ref(&e));
            if matches!(e.kind, Some(Kind::Started(_))) {
                let r = break_store(store_dir);
                if let Some(d) = repair_after {
                    repair = Some(Box::new(r));
                    repair_at = Some(tokio::time::Instant::now() + d);
                }
            }
            seen.push(e);
        }
        if let Some(r) = repair.take() {
            r();
        }
        seen
    };
    tokio::join!(runner, watcher)
}

const THREE_STEPS: &str = r#"
    sleep 0.3
    for s in 1 2 3; do echo "chorus:metric {\"step\": $s, \"loss\": 0.5}"; done
"#;

/// The failure the chaos suite found: storage refused the last metric lines, the attempt gave
/// them up and reported success, and the trial completed with a history that stopped short.
/// Now the attempt fails, saying why, and runs again from its acknowledged checkpoint.
#[tokio::test]
async fn a_trial_whose_metric_lines_cannot_be_stored_does_not_complete() {
    let f = fixture("unstorable");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut a = f.assignment(62, 1, THREE_STEPS);
    a.storage = format!("file://{}", store.display());
    let (exited, events) = run_with_broken_store(&f, &a, &store, None).await;
    assert_eq!(exited.kind(), pb::ExitKind::Failed, "{exited:?}");
    assert!(
        exited.message.contains("3 metric line(s) could not be stored"),
        "{}",
        exited.message
    );
    assert!(!kind_names(&events).contains(&"metric"), "nothing unstored is reported");
}

/// Storage that comes back within the retry budget loses nothing: every line is stored and
/// reported, and the trial completes.
#[tokio::test]
async fn metric_lines_refused_for_a_while_are_stored_once_storage_returns() {
    let f = fixture("storable-later");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut a = f.assignment(63, 1, THREE_STEPS);
    a.storage = format!("file://{}", store.display());
    let (exited, events) = run_with_broken_store(&f, &a, &store, Some(Duration::from_millis(800))).await;
    assert_eq!(exited.kind(), pb::ExitKind::Succeeded, "{exited:?}");
    assert_eq!(kind_names(&events).iter().filter(|k| **k == "metric").count(), 3);
    let storage = f.ctx.stores.open(&a.storage).unwrap();
    let history = chorus_core::history::read_history(&storage, ExperimentId(EXP), TrialId(63), 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 3, "{history:?}");
}

/// A builtin trial of a tiny model on a small synthetic dataset in `memory://` storage.
async fn builtin_assignment(f: &Fixture, trial: u64) -> (pb::Assignment, chorus_dataset::Manifest) {
    let data = format!("{}-data", f.storage_uri);
    let options = chorus_dataset::SynthOptions {
        samples: 120,
        shards: 3,
        seed: 1,
        ..Default::default()
    };
    let manifest = chorus_dataset::synth(f.ctx.stores.open(&data).unwrap(), &options, false)
        .await
        .unwrap();
    let mut a = f.assignment(trial, 1, "");
    a.command.clear();
    a.metric = "val_accuracy".into();
    a.maximize = true;
    a.builtin_json = json!({
        "data": data,
        "model": {
            "kind": "multimodal",
            "image": {"channels": [4, 8]},
            "text": {"embedding_dim": 8, "hidden": 8},
            "audio": {"hidden": 8},
            "classifier": {"hidden": 16},
        },
        "epochs": 2,
        "batch_size": 16,
        "log_every": 2,
        "seed": 1,
    })
    .to_string();
    (a, manifest)
}

/// The trainer's reports reach the agent typed, as the reports they are, and the metrics
/// segment holds each as the line it is logged as would be stored if a trial printed it.
#[tokio::test(flavor = "multi_thread")]
async fn a_builtin_trials_reports_arrive_typed_and_are_stored_as_their_lines() {
    let f = fixture("builtin-typed");
    let (a, manifest) = builtin_assignment(&f, 71).await;
    let (exited, events) = f.run(&a).await;
    assert_eq!(kind(&exited), pb::ExitKind::Succeeded, "{exited:?}");
    assert!(!kind_names(&events).contains(&"malformed"), "{events:?}");

    let reports: Vec<MetricReport> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Metric(m)) => {
                assert!(m.json.is_empty(), "sent as text: {m:?}");
                Some(typed(m))
            }
            _ => None,
        })
        .collect();
    let keys = |r: &MetricReport| r.values.keys().cloned().collect::<Vec<_>>();
    let mut summaries = Vec::new();
    let mut last_step = 0;
    for (i, r) in reports.iter().enumerate() {
        let step = r.step.expect("every report of the trainer has its step");
        assert!(step >= last_step, "steps go forward: {reports:?}");
        last_step = step;
        if r.values.contains_key("lr") {
            assert_eq!(keys(r), ["epoch", "lr", "train_loss"]);
            assert_eq!(step % 2, 0, "a training loss every 2 steps: {r:?}");
        } else if r.values.contains_key("val_accuracy") {
            // An epoch's summary, right after its confusion matrix at the same step.
            let confusion = &reports[i - 1];
            assert_eq!(confusion.step, r.step);
            let classes = &manifest.classes;
            assert_eq!(confusion.values.len(), classes.len() * classes.len());
            for t in classes {
                for p in classes {
                    let count = confusion.values[&format!("confusion.{t}.{p}")];
                    assert!(count >= 0.0 && count.fract() == 0.0, "{confusion:?}");
                }
                assert!((0.0..=1.0).contains(&r.values[&format!("f1_{t}")]), "{r:?}");
            }
            let total: f64 = confusion.values.values().sum();
            assert_eq!(
                total, manifest.splits.val as f64,
                "every validation sample counted once"
            );
            for k in ["train_loss", "val_loss", "macro_f1"] {
                assert!(r.values[k].is_finite(), "{k} in {r:?}");
            }
            assert!((0.0..=1.0).contains(&r.values["val_accuracy"]), "{r:?}");
            summaries.push((r.values["epoch"], step));
        } else {
            assert!(keys(r).iter().all(|k| k.starts_with("confusion.")), "{r:?}");
        }
    }
    let epochs: Vec<f64> = summaries.iter().map(|s| s.0).collect();
    assert_eq!(epochs, [1.0, 2.0]);
    assert!(reports.iter().any(|r| r.values.contains_key("lr")), "{reports:?}");
    // A checkpoint committed at each epoch's end, as the trainer made it.
    let committed: Vec<i64> = checkpoints(&events).iter().map(|c| c.step).collect();
    assert_eq!(committed, summaries.iter().map(|s| s.1).collect::<Vec<_>>());

    // Stored in the order reported, each with the attempt.
    let history = chorus_core::history::read_history(&f.storage, ExperimentId(EXP), TrialId(71), 10_000)
        .await
        .unwrap();
    let stored: Vec<String> = reports.iter().map(|r| records::stored_line(r, 1)).collect();
    assert_eq!(history, stored);
    // The log carries each report as a `chorus:metric` line; a trial printing those lines would
    // have had exactly the same lines stored.
    let log = f.log(71, 1).await;
    let printed: Vec<String> = log
        .lines()
        .filter(|l| l.starts_with(metric::PREFIX))
        .map(|l| match metric::parse_line(l) {
            Line::Metric(r) => records::stored_line(&r, 1),
            other => panic!("{l}: {other:?}"),
        })
        .collect();
    assert_eq!(printed, history);
    assert!(log.starts_with("training on Cpu with 1 thread(s), "), "{log}");
    assert!(log.contains("epoch 2: validation on "), "{log}");
}

/// Two GPUs as NVML would read them, each with figures of its own; counts the readings of each.
struct FixedGpus {
    reads: Mutex<HashMap<String, usize>>,
}

impl crate::gpu::telemetry::GpuSampler for FixedGpus {
    fn gpus(&self) -> Vec<crate::gpu::telemetry::SampledGpu> {
        ["0", "1"]
            .iter()
            .map(|id| crate::gpu::telemetry::SampledGpu {
                id: id.to_string(),
                name: "NVIDIA H100 80GB HBM3".into(),
            })
            .collect()
    }

    fn sample(&self, id: &str) -> Option<crate::gpu::telemetry::GpuSample> {
        *self.reads.lock().unwrap().entry(id.to_string()).or_default() += 1;
        let (util, used_mib) = match id {
            "0" => (11, 5120),
            "1" => (73, 2048),
            _ => return None,
        };
        Some(crate::gpu::telemetry::GpuSample {
            utilization_percent: Some(util),
            memory_used_bytes: Some(used_mib << 20),
            memory_total_bytes: Some(80 << 30),
        })
    }
}

#[tokio::test]
async fn an_attempt_on_a_gpu_reports_that_gpus_utilisation_and_memory() {
    let mut f = fixture("gpu-telemetry");
    let gpus = Arc::new(FixedGpus {
        reads: Mutex::new(HashMap::new()),
    });
    f.ctx.gpu_sampling = Some(GpuSampling {
        sampler: gpus.clone(),
        every: Duration::from_millis(50),
    });
    let mut a = f.assignment(
        31,
        1,
        r#"
        echo "visible=$CUDA_VISIBLE_DEVICES"
        echo 'chorus:metric {"step": 1, "loss": 0.5}'
        sleep 0.6
    "#,
    );
    a.resources = Some(pb::Resources { cpus: 1, gpus: 1 });
    let (_stop, stop_rx) = watch::channel(None);
    let (exited, events) = f.run_on(&a, &["1".to_string()], stop_rx).await;
    assert_eq!(kind(&exited), pb::ExitKind::Succeeded, "{exited:?}");
    assert!(f.log(31, 1).await.contains("visible=1\n"));

    let reported = metric_jsons(&events);
    let gpu: Vec<&serde_json::Value> = reported.iter().filter(|m| m.get("gpu_util").is_some()).collect();
    assert!(gpu.len() >= 2, "a reading every 50 ms over 0.6 s: {reported:?}");
    // Device 1's figures only, and no step: a reading belongs to no training step.
    for m in &gpu {
        assert_eq!(**m, json!({"gpu_util": 73.0, "gpu_mem_mb": 2048.0}));
    }
    assert_eq!(
        gpus.reads.lock().unwrap().get("0"),
        None,
        "the attempt's GPU only is read"
    );
    // The trial's own report is untouched, and the readings are stored in its history too.
    assert!(reported.contains(&json!({"step": 1, "loss": 0.5})), "{reported:?}");
    let stored = f.metrics(31).await;
    assert_eq!(
        stored.iter().filter(|m| m.get("gpu_util").is_some()).count(),
        gpu.len(),
        "{stored:?}"
    );
    // Reported as they are stored: no checkpoint is asked for by a reading.
    assert!(checkpoints(&events).iter().all(|c| c.step == 1), "{events:?}");

    // An attempt without a GPU is never read and reports nothing of GPUs.
    let reads_before = gpus.reads.lock().unwrap().values().sum::<usize>();
    let b = f.assignment(32, 1, "sleep 0.3; echo 'chorus:metric {\"loss\": 1}'");
    let (exited, events) = f.run(&b).await;
    assert_eq!(kind(&exited), pb::ExitKind::Succeeded, "{exited:?}");
    assert_eq!(metric_jsons(&events), vec![json!({"loss": 1.0})]);
    assert_eq!(gpus.reads.lock().unwrap().values().sum::<usize>(), reads_before);
}
