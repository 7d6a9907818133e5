//! The state machine driven the way the API drives it, without a server: register, stream,
//! report, restart from the store, lose a worker.

use super::*;
use crate::store::Store;
use chorus_core::spec;
use pb::trial_event::Kind;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

type Rx = UnboundedReceiver<Result<pb::WorkerCommand, tonic::Status>>;

fn grid_spec(extra: &str) -> ValidSpec {
    spec::parse(
        &format!(
            "name: g\nmetric: {{name: loss, goal: minimize}}\nsearcher: {{name: grid}}\nparallel_trials: 2\n\
             parameters:\n  a: {{values: [1, 2, 3]}}\n  b: {{values: [10, 20]}}\n\
             trial: {{command: [train, '${{params.a}}']}}\n{extra}"
        ),
        &[],
    )
    .unwrap()
}

fn open(dir: &std::path::Path, ttl_ms: u64) -> State {
    let store = Store::open(&dir.join("db")).unwrap();
    let timing = Timing {
        lease_ttl: Duration::from_millis(ttl_ms),
        heartbeat_interval: Duration::from_millis(ttl_ms / 3),
        start_timeout: Duration::from_secs(60),
    };
    State::load(store, timing, broadcast::channel(1024).0).unwrap()
}

fn join(st: &mut State, id: &str, cpus: u32, running: Vec<pb::RunningAttempt>) -> (Vec<pb::RunningAttempt>, Rx) {
    let kill = st
        .register(pb::RegisterRequest {
            worker_id: id.into(),
            capacity: Some(pb::Resources { cpus, gpus: 0 }),
            running,
            ..Default::default()
        })
        .unwrap();
    let (tx, rx) = unbounded_channel();
    st.open_stream(&WorkerId(id.into()), tx).unwrap();
    st.flush();
    (kill, rx)
}

fn assignments(rx: &mut Rx) -> Vec<pb::Assignment> {
    let mut out = Vec::new();
    while let Ok(Ok(cmd)) = rx.try_recv() {
        if let Some(pb::worker_command::Command::Assign(a)) = cmd.command {
            out.push(a);
        }
    }
    out
}

fn ev(seq: u64, kind: Kind) -> pb::TrialEvent {
    pb::TrialEvent {
        seq,
        unix_ms: now_ms(),
        kind: Some(kind),
    }
}

/// Runs an assignment to the end: started, one metric (`loss` = a * b), exited with `exit`.
fn finish(st: &mut State, worker: &str, a: &pb::Assignment, exit: pb::ExitKind) -> Result<()> {
    let params: serde_json::Value = serde_json::from_str(&a.params_json).unwrap();
    let loss = params["a"].as_f64().unwrap() * params["b"].as_f64().unwrap();
    let r = st.report(pb::ReportTrialRequest {
        worker_id: worker.into(),
        trial_id: a.trial_id,
        attempt: a.attempt,
        events: vec![
            ev(1, Kind::Started(pb::Started { restored_step: None })),
            ev(
                2,
                Kind::Metric(pb::Metric {
                    json: format!(r#"{{"step": 1, "loss": {loss}}}"#),
                }),
            ),
            ev(
                3,
                Kind::Exited(pb::Exited {
                    kind: exit as i32,
                    code: None,
                    message: String::new(),
                }),
            ),
        ],
    });
    st.flush();
    r
}

#[test]
fn a_grid_runs_to_completion_within_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = open(dir.path(), 10_000);
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    st.flush();
    assert_eq!(
        st.counts[&exp].pending, 2,
        "parallel_trials bounds the trials created ahead"
    );
    let (_, mut rx) = join(&mut st, "w1", 4, vec![]);
    let mut seen = BTreeSet::new();
    loop {
        let batch = assignments(&mut rx);
        if batch.is_empty() {
            break;
        }
        assert!(st.counts[&exp].running <= 2);
        for a in batch {
            assert!(seen.insert(a.params_json.clone()), "grid point assigned twice");
            assert_eq!(a.command[0], "train");
            finish(&mut st, "w1", &a, pb::ExitKind::Succeeded).unwrap();
        }
    }
    assert_eq!(seen.len(), 6);
    assert_eq!(st.experiments[&exp].state, ExperimentState::Completed);
    assert_eq!(st.counts[&exp].completed, 6);
    let (best, value) = st.best[&exp];
    assert_eq!(value, 10.0);
    assert_eq!(st.trials[&best].params["a"], serde_json::json!(1));
}

#[test]
fn reports_are_applied_once_and_stale_attempts_are_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = open(dir.path(), 10_000);
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec("max_restarts: 1\n"), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
    let a = assignments(&mut rx).remove(0);
    let started = pb::ReportTrialRequest {
        worker_id: "w1".into(),
        trial_id: a.trial_id,
        attempt: a.attempt,
        events: vec![
            ev(1, Kind::Started(pb::Started { restored_step: None })),
            ev(
                2,
                Kind::Malformed(pb::MalformedMetric {
                    line: "x".into(),
                    error: "y".into(),
                }),
            ),
        ],
    };
    st.report(started.clone()).unwrap();
    st.report(started).unwrap();
    assert_eq!(
        st.trials[&TrialId(a.trial_id)].malformed,
        1,
        "a resent report is applied once"
    );
    // A failure with restarts left requeues the trial under a new attempt.
    let fail = pb::ReportTrialRequest {
        worker_id: "w1".into(),
        trial_id: a.trial_id,
        attempt: a.attempt,
        events: vec![ev(
            3,
            Kind::Exited(pb::Exited {
                kind: pb::ExitKind::Failed as i32,
                code: Some(1),
                message: "boom".into(),
            }),
        )],
    };
    st.report(fail.clone()).unwrap();
    st.flush();
    let t = &st.trials[&TrialId(a.trial_id)];
    assert_eq!((t.restarts, t.state), (1, TrialState::Running));
    assert_eq!(t.attempt, 2);
    let err = st.report(fail).unwrap_err();
    assert!(matches!(err, CoordError::Stale(_)), "{err:?}");
    let again = assignments(&mut rx)
        .into_iter()
        .find(|x| x.trial_id == a.trial_id)
        .unwrap();
    assert_eq!(again.attempt, 2);
    finish(&mut st, "w1", &again, pb::ExitKind::Failed).unwrap();
    let t = &st.trials[&TrialId(a.trial_id)];
    assert_eq!(t.state, TrialState::Failed);
    assert!(t.message.contains("after 1 restarts"), "{}", t.message);
}

#[test]
fn a_restarted_coordinator_reattaches_or_requeues() {
    let dir = tempfile::tempdir().unwrap();
    let (exp, a1, a2) = {
        let mut st = open(dir.path(), 300);
        let exp = st.reserve_experiment_id();
        st.add_experiment(exp, grid_spec("max_restarts: 2\n"), "memory://t".into());
        let (_, mut rx1) = join(&mut st, "w1", 1, vec![]);
        let (_, mut rx2) = join(&mut st, "w2", 1, vec![]);
        let a1 = assignments(&mut rx1).remove(0);
        let a2 = assignments(&mut rx2).remove(0);
        for (w, a) in [("w1", &a1), ("w2", &a2)] {
            st.report(pb::ReportTrialRequest {
                worker_id: w.into(),
                trial_id: a.trial_id,
                attempt: a.attempt,
                events: vec![ev(1, Kind::Started(pb::Started { restored_step: None }))],
            })
            .unwrap();
        }
        st.flush();
        (exp, a1, a2)
    }; // the coordinator dies here

    let mut st = open(dir.path(), 300);
    assert_eq!(st.counts[&exp].running, 2);
    // w1 comes back still running its attempt; w2 never returns.
    let claim = vec![pb::RunningAttempt {
        trial_id: a1.trial_id,
        attempt: a1.attempt,
    }];
    let (kill, _rx) = join(&mut st, "w1", 1, claim.clone());
    assert!(kill.is_empty(), "a live attempt is re-attached, not killed");
    std::thread::sleep(Duration::from_millis(400));
    st.heartbeat(&pb::HeartbeatRequest {
        worker_id: "w1".into(),
        running: claim,
    })
    .unwrap();
    st.reconcile();
    st.flush();
    let t1 = &st.trials[&TrialId(a1.trial_id)];
    assert_eq!(
        (t1.state, t1.attempt, t1.restarts),
        (TrialState::Running, a1.attempt, 0)
    );
    let t2 = &st.trials[&TrialId(a2.trial_id)];
    assert_eq!(t2.restarts, 1, "the lost worker's attempt costs a restart");
    assert!(t2.message.contains("w2"), "{}", t2.message);
    // Same trial set: no trial was created twice.
    let params: BTreeSet<String> = st.experiments[&exp]
        .trials
        .iter()
        .map(|t| serde_json::to_string(&st.trials[t].params).unwrap())
        .collect();
    assert_eq!(params.len(), st.experiments[&exp].trials.len());
}

#[test]
fn failures_beyond_the_budget_fail_the_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = open(dir.path(), 10_000);
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec("max_failed_trials: 0\n"), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 2, vec![]);
    let a = assignments(&mut rx);
    finish(&mut st, "w1", &a[0], pb::ExitKind::Failed).unwrap();
    assert_eq!(st.experiments[&exp].state, ExperimentState::Failed);
    let other = &st.trials[&TrialId(a[1].trial_id)];
    assert_eq!(other.state, TrialState::Killed);
    let killed = std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|c| match c.ok()?.command? {
            pb::worker_command::Command::Kill(k) => Some(k.trial_id),
            _ => None,
        })
        .collect::<Vec<_>>();
    assert_eq!(
        killed,
        vec![a[1].trial_id],
        "the running trial's worker is told to kill it"
    );
}

#[test]
fn pause_stops_attempts_without_spending_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = open(dir.path(), 10_000);
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 2, vec![]);
    assert_eq!(assignments(&mut rx).len(), 2);
    st.pause(exp).unwrap();
    st.flush();
    assert_eq!(st.counts[&exp].pending, 2);
    assert!(st.trials.values().all(|t| t.restarts == 0 && t.live.is_none()));
    assert!(assignments(&mut rx).is_empty(), "a paused experiment places nothing");
    st.resume(exp).unwrap();
    st.flush();
    let again = assignments(&mut rx);
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|a| a.attempt == 2));
    assert!(matches!(
        st.update_budget(exp, Some(1), None, None),
        Err(CoordError::InvalidArgument(_))
    ));
    st.kill(exp).unwrap();
    assert!(matches!(st.resume(exp), Err(CoordError::FailedPrecondition(_))));
}

#[test]
fn an_interrupted_attempt_is_placed_again_at_no_cost() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = open(dir.path(), 10_000);
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
    let a = assignments(&mut rx).remove(0);
    finish(&mut st, "w1", &a, pb::ExitKind::Interrupted).unwrap();
    let t = &st.trials[&TrialId(a.trial_id)];
    assert_eq!((t.restarts, t.attempt), (0, 2), "placed again without a restart: {t:?}");
    assert!(t.message.starts_with("interrupted"), "{}", t.message);
}
