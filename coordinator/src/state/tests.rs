//! The state machine driven the way the API drives it, without a server: register, stream,
//! report, restart from the store, lose a worker.

use super::*;
use crate::api::convert;
use crate::experiment::lifecycle::Deletion;
use crate::rendezvous::Joined;
use crate::store::Store;
use chorus_core::spec;
use chorus_core::spec::ValidSpec;
use chorus_proto::pb;
use pb::trial_event::Kind;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

type Rx = UnboundedReceiver<Command>;

/// A state with its store's writer, as the coordinator holds it, on a clock the test moves.
struct Harness {
    state: Arc<Mutex<State>>,
    writer: Writer,
    clock: Clock,
}

impl Harness {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Waits until the writer has done everything queued (a failed commit's reload included).
    fn settle(&self) {
        self.writer.sync_blocking();
    }
}

/// The requests as the API receives them, converted as the API converts them. A request that
/// carries no epoch (0) is given the worker's current one: such a test speaks as the worker's
/// newest registration; the epoch tests set epochs explicitly and call the state directly.
trait PbApi {
    fn register_pb(&mut self, req: pb::RegisterRequest) -> Result<Vec<pb::RunningAttempt>>;
    fn heartbeat_pb(&mut self, req: &pb::HeartbeatRequest) -> Result<Vec<pb::RunningAttempt>>;
    fn report_pb(&mut self, req: pb::ReportTrialRequest) -> Result<()>;
    fn rendezvous_pb(&mut self, req: &pb::RendezvousRequest) -> Result<Joined>;
    /// Flushes and waits for the commit.
    fn commit(&mut self) -> Result<()>;
}

impl PbApi for State {
    fn register_pb(&mut self, req: pb::RegisterRequest) -> Result<Vec<pb::RunningAttempt>> {
        let r = self.register(convert::registration(req))?;
        Ok(r.kill.into_iter().map(convert::running_to_pb).collect())
    }

    fn heartbeat_pb(&mut self, req: &pb::HeartbeatRequest) -> Result<Vec<pb::RunningAttempt>> {
        let running: Vec<RunningAttempt> = req.running.iter().map(convert::running).collect();
        let worker = WorkerId(req.worker_id.clone());
        let epoch = or_current(self, &worker, req.epoch);
        let kill = self.heartbeat(&worker, epoch, &running)?;
        Ok(kill.into_iter().map(convert::running_to_pb).collect())
    }

    fn report_pb(&mut self, mut req: pb::ReportTrialRequest) -> Result<()> {
        req.epoch = or_current(self, &WorkerId(req.worker_id.clone()), req.epoch);
        self.report(convert::report(req))
    }

    fn rendezvous_pb(&mut self, req: &pb::RendezvousRequest) -> Result<Joined> {
        let mut req = req.clone();
        req.epoch = or_current(self, &WorkerId(req.worker_id.clone()), req.epoch);
        self.rendezvous(&convert::join_request(req))
    }

    fn commit(&mut self) -> Result<()> {
        self.flush().wait_blocking()
    }
}

/// `epoch`, or the worker's current epoch when it is 0.
fn or_current(st: &State, worker: &WorkerId, epoch: u64) -> u64 {
    match epoch {
        0 => st.registry.epoch(worker).map_or(0, |e| e.epoch),
        e => e,
    }
}

/// Opens a worker's command stream as its current registration.
fn stream(st: &mut State, id: &str) -> Rx {
    let worker = WorkerId(id.into());
    let epoch = or_current(st, &worker, 0);
    let (tx, rx) = unbounded_channel();
    st.open_stream(&worker, epoch, tx).unwrap();
    rx
}

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

fn open(dir: &std::path::Path, ttl_ms: u64) -> Harness {
    let store = Store::open(&dir.join("db")).unwrap();
    let timing = Timing {
        lease_ttl: Duration::from_millis(ttl_ms),
        heartbeat_interval: Duration::from_millis(ttl_ms / 3),
        start_timeout: Duration::from_secs(60),
    };
    let clock = Clock::manual();
    let state = State::load(&store, timing, clock.clone(), Default::default()).unwrap();
    let state = Arc::new(Mutex::new(state));
    State::attach(&state, store, broadcast::channel(1024).0);
    let writer = state.lock().unwrap().writer().clone();
    Harness { state, writer, clock }
}

fn join(st: &mut State, id: &str, cpus: u32, running: Vec<pb::RunningAttempt>) -> (Vec<pb::RunningAttempt>, Rx) {
    let kill = st
        .register_pb(pb::RegisterRequest {
            worker_id: id.into(),
            capacity: Some(pb::Resources { cpus, gpus: 0 }),
            running,
            ..Default::default()
        })
        .unwrap();
    let rx = stream(st, id);
    st.commit().unwrap();
    (kill, rx)
}

fn assignments(rx: &mut Rx) -> Vec<pb::Assignment> {
    commands(rx)
        .into_iter()
        .filter_map(|c| match c.command? {
            pb::worker_command::Command::Assign(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn ev(seq: u64, kind: Kind) -> pb::TrialEvent {
    pb::TrialEvent {
        seq,
        unix_ms: Clock::system().now_ms(),
        kind: Some(kind),
    }
}

/// Runs an assignment to the end: started, one metric (`loss` = a * b), exited with `exit`.
fn finish(st: &mut State, worker: &str, a: &pb::Assignment, exit: pb::ExitKind) -> Result<()> {
    let params: serde_json::Value = serde_json::from_str(&a.params_json).unwrap();
    let loss = params["a"].as_f64().unwrap() * params["b"].as_f64().unwrap();
    let r = st.report_pb(pb::ReportTrialRequest {
        epoch: 0,
        worker_id: worker.into(),
        rank: 0,
        trial_id: a.trial_id,
        attempt: a.attempt,
        events: vec![
            ev(
                1,
                Kind::Started(pb::Started {
                    restored_step: None,
                    ..Default::default()
                }),
            ),
            ev(
                2,
                Kind::Metric(pb::Metric {
                    json: format!(r#"{{"step": 1, "loss": {loss}}}"#),
                    ..Default::default()
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
    st.commit().unwrap();
    r
}

#[test]
fn a_grid_runs_to_completion_within_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    st.commit().unwrap();
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
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec("max_restarts: 1\n"), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
    let a = assignments(&mut rx).remove(0);
    let started = pb::ReportTrialRequest {
        epoch: 0,
        worker_id: "w1".into(),
        rank: 0,
        trial_id: a.trial_id,
        attempt: a.attempt,
        events: vec![
            ev(
                1,
                Kind::Started(pb::Started {
                    restored_step: None,
                    ..Default::default()
                }),
            ),
            ev(
                2,
                Kind::Malformed(pb::MalformedMetric {
                    line: "x".into(),
                    error: "y".into(),
                }),
            ),
        ],
    };
    st.report_pb(started.clone()).unwrap();
    st.report_pb(started).unwrap();
    assert_eq!(
        st.trials[&TrialId(a.trial_id)].malformed,
        1,
        "a resent report is applied once"
    );
    // A failure with restarts left requeues the trial under a new attempt.
    let fail = pb::ReportTrialRequest {
        epoch: 0,
        worker_id: "w1".into(),
        rank: 0,
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
    st.report_pb(fail.clone()).unwrap();
    st.commit().unwrap();
    let t = &st.trials[&TrialId(a.trial_id)];
    assert_eq!((t.restarts, t.state), (1, TrialState::Running));
    assert_eq!(t.attempt, 2);
    let err = st.report_pb(fail).unwrap_err();
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
        let h = open(dir.path(), 300);
        let mut st = h.lock();
        let exp = st.reserve_experiment_id();
        st.add_experiment(exp, grid_spec("max_restarts: 2\n"), "memory://t".into());
        let (_, mut rx1) = join(&mut st, "w1", 1, vec![]);
        let (_, mut rx2) = join(&mut st, "w2", 1, vec![]);
        let a1 = assignments(&mut rx1).remove(0);
        let a2 = assignments(&mut rx2).remove(0);
        for (w, a) in [("w1", &a1), ("w2", &a2)] {
            st.report_pb(pb::ReportTrialRequest {
                epoch: 0,
                worker_id: w.into(),
                rank: 0,
                trial_id: a.trial_id,
                attempt: a.attempt,
                events: vec![ev(
                    1,
                    Kind::Started(pb::Started {
                        restored_step: None,
                        ..Default::default()
                    }),
                )],
            })
            .unwrap();
        }
        st.commit().unwrap();
        (exp, a1, a2)
    }; // the coordinator dies here

    let h = open(dir.path(), 300);

    let mut st = h.lock();
    assert_eq!(st.counts[&exp].running, 2);
    // w1 comes back still running its attempt; w2 never returns.
    let claim = vec![pb::RunningAttempt {
        trial_id: a1.trial_id,
        rank: 0,
        attempt: a1.attempt,
    }];
    let (kill, _rx) = join(&mut st, "w1", 1, claim.clone());
    assert!(kill.is_empty(), "a live attempt is re-attached, not killed");
    // The lease lapses: time moves, no one sleeps.
    h.clock.advance(Duration::from_millis(400));
    st.heartbeat_pb(&pb::HeartbeatRequest {
        epoch: 0,
        worker_id: "w1".into(),
        running: claim,
        leaving: false,
    })
    .unwrap();
    st.reconcile();
    st.commit().unwrap();
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
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec("max_failed_trials: 0\n"), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 2, vec![]);
    let a = assignments(&mut rx);
    finish(&mut st, "w1", &a[0], pb::ExitKind::Failed).unwrap();
    assert_eq!(st.experiments[&exp].state, ExperimentState::Failed);
    let other = &st.trials[&TrialId(a[1].trial_id)];
    assert_eq!(other.state, TrialState::Killed);
    let killed = commands(&mut rx)
        .into_iter()
        .filter_map(|c| match c.command? {
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
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 2, vec![]);
    assert_eq!(assignments(&mut rx).len(), 2);
    st.pause(exp).unwrap();
    st.commit().unwrap();
    assert_eq!(st.counts[&exp].pending, 2);
    assert!(st.trials.values().all(|t| t.restarts == 0 && t.live.is_none()));
    assert!(assignments(&mut rx).is_empty(), "a paused experiment places nothing");
    st.resume(exp).unwrap();
    st.commit().unwrap();
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
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
    let a = assignments(&mut rx).remove(0);
    finish(&mut st, "w1", &a, pb::ExitKind::Interrupted).unwrap();
    let t = &st.trials[&TrialId(a.trial_id)];
    assert_eq!((t.restarts, t.attempt), (0, 2), "placed again without a restart: {t:?}");
    assert!(t.message.starts_with("interrupted"), "{}", t.message);
}

#[test]
fn a_leaving_worker_gets_nothing_more_and_its_handed_back_attempt_runs_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    // Registered as a pod would be, so the same pod may register again while its lease holds.
    let register_w1 = |st: &mut State| {
        st.register_pb(pb::RegisterRequest {
            worker_id: "w1".into(),
            instance: "pod-uid-1".into(),
            capacity: Some(pb::Resources { cpus: 1, gpus: 0 }),
            ..Default::default()
        })
        .unwrap();
        let rx = stream(st, "w1");
        st.commit().unwrap();
        rx
    };
    let mut rx1 = register_w1(&mut st);
    let a = assignments(&mut rx1).remove(0);
    // SIGTERM: the worker says it is leaving, then hands its attempt back.
    let w1 = WorkerId("w1".into());
    st.leaving(&w1);
    finish(&mut st, "w1", &a, pb::ExitKind::Interrupted).unwrap();
    st.commit().unwrap();
    assert!(
        assignments(&mut rx1).is_empty(),
        "nothing is placed on a worker that is leaving"
    );
    let t = &st.trials[&TrialId(a.trial_id)];
    assert_eq!((t.restarts, t.live.is_none()), (0, true), "waits, at no cost: {t:?}");
    assert!(
        st.workers().iter().any(|w| w.id == w1 && w.drained),
        "shown as draining"
    );

    let (_, mut rx2) = join(&mut st, "w2", 1, vec![]);
    let again = assignments(&mut rx2);
    assert!(
        again
            .iter()
            .any(|b| b.trial_id == a.trial_id && b.attempt == a.attempt + 1),
        "the handed-back trial runs on the other worker: {again:?}"
    );
    // Registering again (a restarted worker) makes it eligible once more.
    drop(rx1);
    let mut rx1 = register_w1(&mut st);
    assert!(!assignments(&mut rx1).is_empty(), "placed on again after registering");
}

fn report(st: &mut State, worker: &str, a: &pb::Assignment, seq: u64, kind: Kind) -> Result<()> {
    let r = st.report_pb(pb::ReportTrialRequest {
        epoch: 0,
        worker_id: worker.into(),
        rank: a.rank,
        trial_id: a.trial_id,
        attempt: a.attempt,
        events: vec![ev(seq, kind)],
    });
    st.commit().unwrap();
    r
}

fn exited(kind: pb::ExitKind, message: &str) -> Kind {
    Kind::Exited(pb::Exited {
        kind: kind as i32,
        code: None,
        message: message.into(),
    })
}

fn join_rendezvous(
    st: &mut State,
    worker: &str,
    a: &pb::Assignment,
    data: Option<pb::DataPlanRequest>,
) -> Result<Joined> {
    let r = st.rendezvous_pb(&pb::RendezvousRequest {
        epoch: 0,
        worker_id: worker.into(),
        trial_id: a.trial_id,
        attempt: a.attempt,
        rank: a.rank,
        address: format!("127.0.0.1:{}", 4000 + a.rank),
        nccl_id: vec![],
        data,
    });
    st.commit().unwrap();
    r
}

fn plan_request() -> pb::DataPlanRequest {
    pb::DataPlanRequest {
        shards: (0..3)
            .map(|i| pb::ShardSize {
                key: format!("shard-{i:05}.tar"),
                samples: 20,
            })
            .collect(),
        seed: 1,
        batch_size: 4,
        position_json: String::new(),
        epoch: 0,
    }
}

/// A two-rank trial: both ranks are placed at once with their rank numbers, meet at the
/// rendezvous (which records the data plan), and when one rank fails the other is killed and
/// the whole trial restarts under a new attempt.
#[test]
fn a_gang_is_placed_whole_meets_and_fails_whole() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(
        exp,
        grid_spec("max_restarts: 1\nresources: {workers: 2, cpus: 1}\nmax_trials: 1\n"),
        "memory://t".into(),
    );
    let (_, mut rx1) = join(&mut st, "w1", 1, vec![]);
    assert!(assignments(&mut rx1).is_empty(), "one slot cannot hold a two-rank gang");
    let (_, mut rx2) = join(&mut st, "w2", 1, vec![]);
    let (a0, a1) = (assignments(&mut rx1).remove(0), assignments(&mut rx2).remove(0));
    assert_eq!((a0.rank, a1.rank, a0.world_size, a1.world_size), (0, 1, 2, 2));
    assert_eq!((a0.local_world_size, a0.local_rank), (1, 0));
    assert_eq!(a0.attempt, a1.attempt);

    // Rank 1 waits for rank 0, then both hear the same answer.
    let Joined::Wait(rx) = join_rendezvous(&mut st, "w2", &a1, None).unwrap() else {
        panic!("rank 1 alone cannot complete the rendezvous")
    };
    assert_eq!(st.rendezvous_missing(TrialId(a0.trial_id)), vec![0]);
    let Joined::Ready(r0) = join_rendezvous(&mut st, "w1", &a0, Some(plan_request())).unwrap() else {
        panic!("the last rank completes the rendezvous")
    };
    assert!(*rx.borrow(), "the waiting rank is woken");
    let Joined::Ready(r1) = join_rendezvous(&mut st, "w2", &a1, None).unwrap() else {
        panic!("ready")
    };
    assert_eq!(r0, r1);
    assert_eq!(r0.addresses, vec!["127.0.0.1:4000", "127.0.0.1:4001"]);
    let pos: chorus_core::shards::DataPosition = serde_json::from_str(&r0.position_json).unwrap();
    assert_eq!((pos.plan.samples_of(0), pos.plan.samples_of(1)), (30, 30));
    assert_eq!(st.trials[&TrialId(a0.trial_id)].data_position, r0.position_json);
    // A rank's worker must be the one it was placed on.
    assert!(matches!(
        join_rendezvous(&mut st, "w1", &a1, None),
        Err(CoordError::Stale(_))
    ));

    report(
        &mut st,
        "w1",
        &a0,
        1,
        Kind::Started(pb::Started {
            restored_step: None,
            ..Default::default()
        }),
    )
    .unwrap();
    report(
        &mut st,
        "w2",
        &a1,
        1,
        Kind::Started(pb::Started {
            restored_step: None,
            ..Default::default()
        }),
    )
    .unwrap();
    report(
        &mut st,
        "w2",
        &a1,
        2,
        exited(pb::ExitKind::Failed, "collective: rank 0 went away"),
    )
    .unwrap();
    let t = &st.trials[&TrialId(a0.trial_id)];
    assert_eq!((t.restarts, t.attempt), (1, 2));
    assert!(t.message.contains("rank 1 of 2"), "{}", t.message);
    let mut on_w1 = Vec::new();
    let mut killed = Vec::new();
    for cmd in commands(&mut rx1) {
        match cmd.command {
            Some(pb::worker_command::Command::Kill(k)) => killed.push((k.trial_id, k.attempt)),
            Some(pb::worker_command::Command::Assign(a)) => on_w1.push(a),
            None => {}
        }
    }
    assert_eq!(killed, vec![(a0.trial_id, 1)], "rank 0's worker is told to stop it");
    // The stale rank 0 is refused; the new attempt is placed whole again.
    assert!(matches!(
        report(&mut st, "w1", &a0, 2, exited(pb::ExitKind::Killed, "")),
        Err(CoordError::Stale(_))
    ));
    assert!(matches!(
        join_rendezvous(&mut st, "w1", &a0, None),
        Err(CoordError::Stale(_))
    ));
    let again = [on_w1, assignments(&mut rx2)].concat();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|a| a.attempt == 2 && a.restart_count == 1));

    // Rank 1 finishing first waits for rank 0, whose success completes the trial.
    let (b0, b1) = if again[0].rank == 0 {
        (&again[0], &again[1])
    } else {
        (&again[1], &again[0])
    };
    let w = |a: &pb::Assignment| if std::ptr::eq(a, &again[0]) { "w1" } else { "w2" };
    report(&mut st, w(b1), b1, 1, exited(pb::ExitKind::Succeeded, "")).unwrap();
    assert_eq!(st.trials[&TrialId(b0.trial_id)].state, TrialState::Running);
    report(&mut st, w(b0), b0, 1, exited(pb::ExitKind::Succeeded, "")).unwrap();
    assert_eq!(st.trials[&TrialId(b0.trial_id)].state, TrialState::Completed);
}

/// Ranks packed onto one worker get their local ranks; an elastic gang takes what fits.
#[test]
fn elastic_gangs_pack_and_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 200);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(
        exp,
        grid_spec("resources: {workers: {min: 1, max: 3}, cpus: 1}\nmax_trials: 1\nmax_restarts: 3\n"),
        "memory://t".into(),
    );
    let (_, mut rx1) = join(&mut st, "w1", 2, vec![]);
    let first = assignments(&mut rx1);
    assert_eq!(first.len(), 2, "two of three ranks fit, above the minimum of one");
    assert!(first.iter().all(|a| a.world_size == 2 && a.local_world_size == 2));
    let mut locals: Vec<u32> = first.iter().map(|a| a.local_rank).collect();
    locals.sort();
    assert_eq!(locals, vec![0, 1]);
    for a in &first {
        report(
            &mut st,
            "w1",
            a,
            1,
            Kind::Started(pb::Started {
                restored_step: None,
                ..Default::default()
            }),
        )
        .unwrap();
    }
    // The worker vanishes; a smaller one joins: the trial goes on with one rank.
    let (_, mut rx2) = join(&mut st, "w2", 1, vec![]);
    h.clock.advance(Duration::from_millis(250));
    st.heartbeat_pb(&pb::HeartbeatRequest {
        epoch: 0,
        worker_id: "w2".into(),
        running: vec![],
        leaving: false,
    })
    .unwrap();
    st.reconcile();
    st.commit().unwrap();
    let again = assignments(&mut rx2);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].world_size, again[0].attempt), (1, 2));
}

/// A store written before multi-rank attempts opens and keeps its live attempts.
#[test]
fn a_version_one_store_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let h = open(dir.path(), 10_000);
        let mut st = h.lock();
        let exp = st.reserve_experiment_id();
        st.add_experiment(exp, grid_spec(""), "memory://t".into());
        join(&mut st, "w1", 1, vec![]);
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    // As version 1 kept them: searcher state in the experiment row, metric history in a table.
    conn.execute_batch(
        "ALTER TABLE trials DROP COLUMN live_ranks; ALTER TABLE trials DROP COLUMN data_position;
         ALTER TABLE trials DROP COLUMN exploit_from; ALTER TABLE trials DROP COLUMN checkpoint_attempt;
         ALTER TABLE trials DROP COLUMN acked_metrics;
         ALTER TABLE experiments DROP COLUMN labels; ALTER TABLE experiments DROP COLUMN note;
         ALTER TABLE experiments DROP COLUMN archived; ALTER TABLE experiments DROP COLUMN deleting;
         ALTER TABLE experiments DROP COLUMN continued_from;
         UPDATE experiments SET searcher_state = (SELECT state FROM searcher_snapshots WHERE experiment_id = experiments.id);
         DROP TABLE searcher_snapshots; DROP TABLE searcher_journal;
         CREATE TABLE metrics (trial_id INTEGER NOT NULL, attempt INTEGER NOT NULL, seq INTEGER NOT NULL, step INTEGER,
             unix_ms INTEGER NOT NULL, json TEXT NOT NULL, PRIMARY KEY (trial_id, attempt, seq));
         INSERT INTO metrics SELECT id, 1, 2, 1, 0, '{\"loss\": 1}' FROM trials WHERE live_worker IS NOT NULL;
         INSERT INTO metrics SELECT id, 1, 3, 2, 0, 'not json' FROM trials WHERE live_worker IS NOT NULL;
         UPDATE meta SET value = '1' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(conn);
    let h = open(dir.path(), 10_000);
    let st = h.lock();
    let live: Vec<&TrialRecord> = st.trials.values().filter(|t| t.live.is_some()).collect();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].live.as_ref().unwrap().ranks[0].worker, WorkerId("w1".into()));
    assert_eq!(
        live[0].acked_metrics,
        BTreeMap::from([(1, 2)]),
        "the metric lines acknowledged per attempt are counted from the old history table"
    );
    assert!(st.experiments.values().all(|e| e.unreadable_searcher.is_none()));
}

/// Successive halving with promotion through the state machine: a trial paused at a rung is
/// neither placed nor counted as active, survives a coordinator restart, resumes (at no restart
/// cost) when promoted, and ends as completed if never promoted.
#[test]
fn paused_trials_wait_for_promotion() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    let spec = spec::parse(
        "name: h\nmetric: {name: loss, goal: minimize}\n\
         searcher: {name: asha, seed: 1, reduction_factor: 2, max_resource: 4, sampler: random}\n\
         max_trials: 3\nparameters:\n  x: {min: 0.0, max: 1.0}\ntrial: {command: [train]}\n",
        &[],
    )
    .unwrap();
    st.add_experiment(exp, spec, "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
    let metric = |step: i64, loss: f64| {
        Kind::Metric(pb::Metric {
            json: format!(r#"{{"step": {step}, "loss": {loss}}}"#),
            ..Default::default()
        })
    };
    let started = || {
        Kind::Started(pb::Started {
            restored_step: None,
            ..Default::default()
        })
    };
    // Trial 1 alone at rung 0 (top floor(1/2) = 0): paused; trial 2 takes the slot.
    let a1 = assignments(&mut rx).remove(0);
    report(&mut st, "w1", &a1, 1, started()).unwrap();
    report(&mut st, "w1", &a1, 2, metric(1, 0.5)).unwrap();
    let t1 = TrialId(a1.trial_id);
    assert_eq!(st.trials[&t1].state, TrialState::Paused);
    assert!(st.trials[&t1].live.is_none());
    assert!(
        st.trials[&t1].message.contains("paused at rung 0"),
        "{}",
        st.trials[&t1].message
    );
    assert_eq!((st.counts[&exp].paused, st.counts[&exp].active()), (1, 1));
    {
        let h2 = open(dir.path(), 10_000);
        let again = h2.lock();
        assert_eq!(again.trials[&t1].state, TrialState::Paused, "held across a restart");
        assert_eq!(again.counts[&exp].paused, 1);
    }
    let a2 = assignments(&mut rx).remove(0);
    assert_ne!(a2.trial_id, a1.trial_id);
    // Trial 2 is worse: trial 1 (now top 1 of 2) is promoted into the slot trial 2 frees.
    report(&mut st, "w1", &a2, 1, started()).unwrap();
    report(&mut st, "w1", &a2, 2, metric(1, 0.6)).unwrap();
    assert_eq!(st.trials[&TrialId(a2.trial_id)].state, TrialState::Paused);
    let a1b = assignments(&mut rx).remove(0);
    assert_eq!((a1b.trial_id, a1b.attempt), (a1.trial_id, 2));
    let t = &st.trials[&t1];
    assert_eq!(t.restarts, 0, "a promotion is no restart");
    assert!(t.message.contains("promoted from rung 0"), "{}", t.message);
    // At rung 1 it is alone again: paused; the last trial is created and paused at rung 0.
    report(&mut st, "w1", &a1b, 1, started()).unwrap();
    report(&mut st, "w1", &a1b, 2, metric(2, 0.4)).unwrap();
    let a3 = assignments(&mut rx).remove(0);
    report(&mut st, "w1", &a3, 1, started()).unwrap();
    report(&mut st, "w1", &a3, 2, metric(1, 0.7)).unwrap();
    // Nothing runs, nothing is promotable, no trial is left to create: the search is over.
    let e = st.experiment(exp).unwrap();
    assert_eq!(e.state, ExperimentState::Completed);
    for t in st.trials.values() {
        assert_eq!(t.state, TrialState::Completed, "{t:?}");
        assert!(t.message.contains("never promoted"), "{}", t.message);
    }
}

/// A drained worker gets no new trials (what runs there goes on), the drain outlives a
/// coordinator restart, and undoing it places trials there again.
#[test]
fn a_drained_worker_gets_no_new_trials() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let (_, mut rx1) = join(&mut st, "w1", 1, vec![]);
    assert!(matches!(
        st.drain(&WorkerId("nosuch".into()), false),
        Err(CoordError::NotFound(_))
    ));
    st.drain(&WorkerId("w1".into()), false).unwrap();
    st.commit().unwrap();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    st.commit().unwrap();
    assert!(assignments(&mut rx1).is_empty(), "nothing placed on a drained worker");
    let (_, mut rx2) = join(&mut st, "w2", 1, vec![]);
    assert_eq!(assignments(&mut rx2).len(), 1, "the other worker takes a trial");
    {
        let h2 = open(dir.path(), 10_000);
        let again = h2.lock();
        assert!(again.drained.contains(&WorkerId("w1".into())), "kept across a restart");
    }
    st.drain(&WorkerId("w1".into()), true).unwrap();
    st.commit().unwrap();
    assert_eq!(assignments(&mut rx1).len(), 1, "undone: it takes a trial again");
    let h2 = open(dir.path(), 10_000);
    let again = h2.lock();
    assert!(again.drained.is_empty());
}

/// Every command waiting on a worker's stream, as the stream sends it.
fn commands(rx: &mut Rx) -> Vec<pb::WorkerCommand> {
    let mut out = Vec::new();
    while let Ok(cmd) = rx.try_recv() {
        out.push(convert::command(cmd));
    }
    out
}

/// A commit that fails because the store is full keeps nothing of its change: nothing of it is
/// visible, nothing is sent, the caller hears RESOURCE_EXHAUSTED naming the store, and once
/// there is room again the worker's retry is applied once, without a restart, and survives one.
#[test]
fn a_failed_commit_changes_nothing_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    st.commit().unwrap();
    let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
    let a = assignments(&mut rx).remove(0);
    let tid = TrialId(a.trial_id);
    report(
        &mut st,
        "w1",
        &a,
        1,
        Kind::Started(pb::Started {
            restored_step: None,
            ..Default::default()
        }),
    )
    .unwrap();

    st.writer().with_store(|s| s.cap_pages(Some(0)));
    // Big enough to need pages the store cannot have; the attempt ends in the same report.
    let extra: String = (0..2000).map(|i| format!(", \"m{i}\": {i}")).collect();
    let metric = format!(r#"{{"step": 1, "loss": 5.0{extra}}}"#);
    let req = pb::ReportTrialRequest {
        epoch: 0,
        worker_id: "w1".into(),
        rank: 0,
        trial_id: a.trial_id,
        attempt: a.attempt,
        events: vec![
            ev(
                2,
                Kind::Metric(pb::Metric {
                    json: metric,
                    ..Default::default()
                }),
            ),
            ev(3, exited(pb::ExitKind::Succeeded, "")),
        ],
    };
    st.report_pb(req.clone()).unwrap();
    let status = tonic::Status::from(st.commit().unwrap_err());
    // The writer puts memory back to what the store holds once the lock is free.
    drop(st);
    h.settle();
    let mut st = h.lock();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let db = dir.path().join("db");
    assert!(status.message().starts_with("disk full"), "{}", status.message());
    assert!(
        status.message().contains(&db.display().to_string()),
        "names the store: {}",
        status.message()
    );
    let t = &st.trials[&tid];
    assert_eq!((t.state, t.best_value), (TrialState::Running, None), "{t:?}");
    assert_eq!(
        t.live.as_ref().unwrap().ranks[0].last_seq,
        1,
        "the report is not applied"
    );
    assert_eq!(st.counts[&exp].completed, 0);
    assert!(!st.best.contains_key(&exp));
    assert!(
        commands(&mut rx).is_empty(),
        "nothing sent for a change that was not kept"
    );

    st.writer().with_store(|s| s.cap_pages(None));
    st.report_pb(req.clone()).unwrap();
    st.commit().unwrap();
    assert_eq!(st.trials[&tid].state, TrialState::Completed);
    assert_eq!(st.best[&exp], (tid, 5.0));
    assert_eq!(assignments(&mut rx).len(), 1, "the next trial is placed");
    // A duplicate of the retry changes nothing: that attempt has ended.
    assert!(matches!(st.report_pb(req), Err(CoordError::Stale(_))));
    st.commit().unwrap();
    drop(st);

    let h = open(dir.path(), 10_000);

    let st = h.lock();
    assert_eq!(st.trials[&tid].state, TrialState::Completed);
    assert_eq!(st.counts[&exp].completed, 1);
    assert_eq!(
        st.trials[&tid].acked_metrics.get(&a.attempt),
        Some(&1),
        "the metric is counted once"
    );
}

/// Ids handed out before a failed commit are not handed out again by the same process.
#[test]
fn ids_are_not_reused_after_a_failed_commit() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    st.writer().with_store(|s| s.cap_pages(Some(0)));
    let first = st.reserve_experiment_id();
    let big = grid_spec(&format!("description: '{}'\n", "y".repeat(50_000)));
    st.add_experiment(first, big, "memory://t".into());
    assert!(st.commit().is_err());
    drop(st);
    h.settle();
    let mut st = h.lock();
    assert!(st.experiments.is_empty(), "the experiment was not kept");
    st.writer().with_store(|s| s.cap_pages(None));
    let second = st.reserve_experiment_id();
    assert!(second.0 > first.0, "{second} after {first}");
}

/// The searchers, each over the same discrete space.
fn searcher_specs() -> Vec<(&'static str, ValidSpec)> {
    let spec = |searcher: &str, extra: &str| {
        spec::parse(
            &format!(
                "name: s\nmetric: {{name: loss, goal: minimize}}\nsearcher: {searcher}\nmax_trials: 6\n\
                 parallel_trials: 1\nparameters:\n  a: {{values: [1, 2, 3]}}\n  b: {{values: [10, 20]}}\n\
                 trial: {{command: [train]}}\n{extra}"
            ),
            &[],
        )
        .unwrap()
    };
    vec![
        ("grid", spec("{name: grid}", "")),
        ("random", spec("{name: random, seed: 1}", "")),
        ("tpe", spec("{name: tpe, seed: 1, n_startup_trials: 2}", "")),
        (
            "asha",
            spec("{name: asha, seed: 1, max_resource: 4, sampler: random}", ""),
        ),
        ("hyperband", spec("{name: hyperband, seed: 1, max_resource: 4}", "")),
        (
            "pbt",
            spec("{name: pbt, seed: 1, population_size: 2, perturbation_interval: 1}", ""),
        ),
        (
            "median stopping",
            spec(
                "{name: random, seed: 1}",
                "scheduler: {name: median, grace_period: 1, min_trials: 1}\n",
            ),
        ),
    ]
}

/// A searcher state that cannot be read back (cut short, or of the wrong shape) fails its
/// experiment at start, saying why, instead of starting the search over: no trial is created
/// or placed again, and the stored state is left as it was found.
#[test]
fn an_unreadable_searcher_state_fails_its_experiment() {
    for (name, spec) in searcher_specs() {
        for corruption in ["cut short", "wrong shape", "journal"] {
            let what = format!("{name}, {corruption}");
            let dir = tempfile::tempdir().unwrap();
            let h = open(dir.path(), 10_000);
            let mut st = h.lock();
            let exp = st.reserve_experiment_id();
            st.add_experiment(exp, spec.clone(), "memory://t".into());
            st.commit().unwrap();
            let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
            let a = assignments(&mut rx).remove(0);
            finish(&mut st, "w1", &a, pb::ExitKind::Succeeded).unwrap();
            let created = st.experiments[&exp].created_trials;
            let trials = st.trials.len();
            assert!(created >= 2, "{what}: the search went on");
            drop(st);

            let conn = rusqlite::Connection::open(dir.path().join("db")).unwrap();
            let saved: String = conn
                .query_row("SELECT state FROM searcher_snapshots", [], |r| r.get(0))
                .unwrap();
            let (table, column, corrupt) = match corruption {
                "cut short" => ("searcher_snapshots", "state", saved[..saved.len() / 2].to_string()),
                "wrong shape" => ("searcher_snapshots", "state", r#""corrupt""#.to_string()),
                _ => ("searcher_journal", "call", r#"{"call": "nonsense"}"#.to_string()),
            };
            let changed = conn
                .execute(&format!("UPDATE {table} SET {column} = ?1"), [&corrupt])
                .unwrap();
            assert!(changed > 0, "{what}: there is a stored state to corrupt");
            drop(conn);

            let h = open(dir.path(), 10_000);

            let mut st = h.lock();
            let e = &st.experiments[&exp];
            assert_eq!(e.state, ExperimentState::Failed, "{what}");
            let label = spec.spec.searcher.name.as_str();
            assert!(
                e.message
                    .contains(&format!("the saved state of the {label} searcher cannot be read")),
                "{what}: {}",
                e.message
            );
            assert!(e.message.contains("run trials again"), "{what}: {}", e.message);
            st.commit().unwrap();
            assert_eq!(st.counts[&exp].active(), 0, "{what}: nothing left to run");
            let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
            assert!(assignments(&mut rx).is_empty(), "{what}: nothing placed");
            assert_eq!(st.trials.len(), trials, "{what}: no trial created");
            assert_eq!(st.experiments[&exp].created_trials, created, "{what}");
            drop(st);

            // Still failed after another restart, with the state as it was found.
            let h = open(dir.path(), 10_000);
            let st = h.lock();
            assert_eq!(st.experiments[&exp].state, ExperimentState::Failed, "{what}");
            drop(st);
            drop(h);
            let conn = rusqlite::Connection::open(dir.path().join("db")).unwrap();
            let kept: Vec<String> = conn
                .prepare(&format!("SELECT {column} FROM {table}"))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert!(kept.contains(&corrupt), "{what}: left as it was found");
        }
    }
}

/// Each store has its own cluster id, kept across restarts and added to a store that
/// predates it.
#[test]
fn the_cluster_id_is_made_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let id = open(dir.path(), 10_000).lock().cluster_id().to_string();
    assert_eq!(id.len(), 16);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_eq!(open(dir.path(), 10_000).lock().cluster_id(), id, "kept across restarts");
    let other = tempfile::tempdir().unwrap();
    assert_ne!(
        open(other.path(), 10_000).lock().cluster_id(),
        id,
        "a fresh store has its own"
    );

    // A store made before cluster ids gets one; its experiments keep their storage.
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "file:///data/storage/".into());
    st.commit().unwrap();
    drop(st);
    let conn = rusqlite::Connection::open(dir.path().join("db")).unwrap();
    conn.execute("DELETE FROM meta WHERE key = 'cluster_id'", []).unwrap();
    drop(conn);
    let h = open(dir.path(), 10_000);
    let st = h.lock();
    let migrated = st.cluster_id().to_string();
    assert_eq!(migrated.len(), 16);
    assert_eq!(st.experiments[&exp].storage, "file:///data/storage/");
    drop(st);
    assert_eq!(open(dir.path(), 10_000).lock().cluster_id(), migrated);
}

/// A placement pass offers the workers with the most room first, and every worker with room
/// when that leaves a trial unplaced: a trial that needs a label only one worker of many idle
/// ones carries still finds it, and single-rank trials spread over the most room.
#[test]
fn placement_finds_a_labelled_worker_among_many_idle_ones() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let mut streams = Vec::new();
    for i in 0..60 {
        let id = format!("w{i:02}");
        // The labelled worker has the least room, so it sorts last.
        let (cpus, labels) = if i == 59 {
            (1, [("zone".to_string(), "b".to_string())].into())
        } else {
            (4, Default::default())
        };
        st.register_pb(pb::RegisterRequest {
            worker_id: id.clone(),
            capacity: Some(pb::Resources { cpus, gpus: 0 }),
            labels,
            ..Default::default()
        })
        .unwrap();
        streams.push(stream(&mut st, &id));
    }
    st.commit().unwrap();
    let exp = st.reserve_experiment_id();
    st.add_experiment(
        exp,
        grid_spec("resources: {cpus: 1, labels: {zone: b}}\nmax_trials: 1\n"),
        "memory://t".into(),
    );
    st.commit().unwrap();
    assert_eq!(
        assignments(&mut streams[59]).len(),
        1,
        "the one labelled worker takes it"
    );
    for rx in &mut streams[..59] {
        assert!(assignments(rx).is_empty());
    }
    // Two single-rank trials land on two different workers: the most room, spread.
    let other = st.reserve_experiment_id();
    st.add_experiment(other, grid_spec("max_trials: 2\n"), "memory://t".into());
    st.commit().unwrap();
    let placed: Vec<usize> = streams
        .iter_mut()
        .enumerate()
        .filter_map(|(i, rx)| (!assignments(rx).is_empty()).then_some(i))
        .collect();
    assert_eq!(placed.len(), 2, "{placed:?}");
    assert!(
        !placed.contains(&59),
        "not on the worker with the least room: {placed:?}"
    );
}

fn register_as(st: &mut State, id: &str, instance: &str, running: Vec<RunningAttempt>) -> Result<u64> {
    let r = st.register(crate::protocol::Registration {
        worker: WorkerId(id.into()),
        capacity: Resources { cpus: 1, gpus: 0 },
        labels: BTreeMap::new(),
        address: String::new(),
        running,
        instance: instance.into(),
    })?;
    Ok(r.epoch)
}

fn code_and_message(e: CoordError) -> (tonic::Code, String) {
    let s = tonic::Status::from(e);
    (s.code(), s.message().to_string())
}

/// Two pods with one worker id cannot both hold it; the same instance takes it over at once and
/// fences every call of its older registration.
#[test]
fn registration_epochs_fence_older_registrations() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 3_000);
    let mut st = h.lock();
    let w = WorkerId("w1".into());
    let e1 = register_as(&mut st, "w1", "pod-a", vec![]).unwrap();
    assert!(e1 > 0);
    let (tx, mut old_stream) = unbounded_channel();
    st.open_stream(&w, e1, tx).unwrap();
    st.commit().unwrap();

    // Another instance, or one that does not say, is refused while the lease holds.
    h.clock.advance(Duration::from_millis(1_000));
    for other in ["pod-b", ""] {
        let (code, msg) = code_and_message(register_as(&mut st, "w1", other, vec![]).unwrap_err());
        assert_eq!(code, tonic::Code::AlreadyExists, "{other:?}: {msg}");
        assert!(msg.contains("worker id w1") && msg.contains("lease lapses at"), "{msg}");
        assert!(msg.contains("in 2000 ms"), "{msg}");
    }
    assert_eq!(st.registry.epoch(&w).unwrap().epoch, e1, "a refusal changes nothing");
    st.heartbeat(&w, e1, &[]).unwrap();
    assert!(
        old_stream
            .try_recv()
            .is_err_and(|e| e == tokio::sync::mpsc::error::TryRecvError::Empty)
    );

    // The same instance (a restart in place) takes over at once with a higher epoch.
    let e2 = register_as(&mut st, "w1", "pod-a", vec![]).unwrap();
    st.commit().unwrap();
    assert!(e2 > e1);
    assert_eq!(
        old_stream.try_recv(),
        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected),
        "the fenced registration's stream ends"
    );
    let fenced = |r: Result<()>| {
        let (code, msg) = code_and_message(r.unwrap_err());
        assert_eq!(code, tonic::Code::Aborted, "{msg}");
        assert!(
            msg.starts_with(&format!("worker w1 epoch {e1} is fenced: epoch {e2} registered at 20")),
            "{msg}"
        );
        assert!(msg.contains("by instance pod-a"), "{msg}");
    };
    fenced(st.heartbeat(&w, e1, &[]).map(drop));
    fenced(st.open_stream(&w, e1, unbounded_channel().0));
    fenced(st.report(convert::report(pb::ReportTrialRequest {
        worker_id: "w1".into(),
        epoch: e1,
        trial_id: 1,
        attempt: 1,
        ..Default::default()
    })));
    fenced(
        st.rendezvous(&convert::join_request(pb::RendezvousRequest {
            worker_id: "w1".into(),
            epoch: e1,
            trial_id: 1,
            attempt: 1,
            address: "x:1".into(),
            ..Default::default()
        }))
        .map(drop),
    );
    // The fenced status carries a machine-readable reason, apart from a stale attempt's.
    let status = tonic::Status::from(st.heartbeat(&w, e1, &[]).unwrap_err());
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().expect("error info");
    assert_eq!(info.reason, crate::error::FENCED_REASON);
    assert_eq!(info.metadata["current_epoch"], e2.to_string());
    // A worker that sends no epoch predates them: refused too, and told why.
    let (code, msg) = code_and_message(st.heartbeat(&w, 0, &[]).unwrap_err());
    assert_eq!(code, tonic::Code::Aborted);
    assert!(msg.contains("epoch 0 is fenced") && msg.contains("upgrade"), "{msg}");
    st.heartbeat(&w, e2, &[]).unwrap();

    // Once the lease lapses, another instance may take the id.
    h.clock.advance(Duration::from_millis(3_500));
    let e3 = register_as(&mut st, "w1", "pod-b", vec![]).unwrap();
    assert!(e3 > e2);
    assert_eq!(
        code_and_message(st.heartbeat(&w, e2, &[]).unwrap_err()).0,
        tonic::Code::Aborted
    );
    // An unnamed instance too, but only once the id is free.
    h.clock.advance(Duration::from_millis(3_500));
    st.reconcile();
    let e4 = register_as(&mut st, "w1", "", vec![]).unwrap();
    assert!(e4 > e3);
    // Epochs rise across worker ids: a new id starts above every earlier epoch.
    assert!(register_as(&mut st, "w2", "pod-c", vec![]).unwrap() > e4);
    st.commit().unwrap();
}

/// Epochs are durable: after a coordinator restart the newest registration is still the one
/// calls must carry, and a new registration goes above it.
#[test]
fn registration_epochs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let w = WorkerId("w1".into());
    let (e1, e2) = {
        let h = open(dir.path(), 3_000);
        let mut st = h.lock();
        let e1 = register_as(&mut st, "w1", "pod-a", vec![]).unwrap();
        let e2 = register_as(&mut st, "w1", "pod-a", vec![]).unwrap();
        st.commit().unwrap();
        (e1, e2)
    };
    let h = open(dir.path(), 3_000);
    let mut st = h.lock();
    // As before epochs: an unregistered worker is told to register, not to stop.
    let (code, _) = code_and_message(st.heartbeat(&w, e2, &[]).unwrap_err());
    assert_eq!(code, tonic::Code::NotFound);
    let (code, msg) = code_and_message(st.heartbeat(&w, e1, &[]).unwrap_err());
    assert_eq!(code, tonic::Code::Aborted, "{msg}");
    assert!(msg.contains(&format!("epoch {e2} registered")), "{msg}");
    let e3 = register_as(&mut st, "w9", "pod-z", vec![]).unwrap();
    assert!(e3 > e2, "{e3} after {e2}");
}

/// A worker whose lease lapsed keeps its epoch until it registers again: its calls are stale
/// (its attempts moved), not fenced, and the same instance re-registers and is told what to kill.
#[test]
fn a_lapsed_worker_reregisters_and_kills_what_moved() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 3_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec("max_trials: 1\nmax_restarts: 2\n"), "memory://t".into());
    let e1 = register_as(&mut st, "w1", "pod-a", vec![]).unwrap();
    let w = WorkerId("w1".into());
    let (tx, mut rx) = unbounded_channel();
    st.open_stream(&w, e1, tx).unwrap();
    st.commit().unwrap();
    let a = assignments(&mut rx).remove(0);
    let running = RunningAttempt {
        trial: TrialId(a.trial_id),
        attempt: a.attempt,
        rank: 0,
    };
    h.clock.advance(Duration::from_millis(3_500));
    st.reconcile();
    st.commit().unwrap();
    assert_eq!(st.trials[&TrialId(a.trial_id)].state, TrialState::Pending);
    let (code, msg) = code_and_message(
        st.report(convert::report(pb::ReportTrialRequest {
            worker_id: "w1".into(),
            epoch: e1,
            trial_id: a.trial_id,
            attempt: a.attempt,
            ..Default::default()
        }))
        .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::Aborted);
    assert!(
        msg.contains("no longer current"),
        "a stale attempt, not a fenced worker: {msg}"
    );
    assert_eq!(
        code_and_message(st.heartbeat(&w, e1, &[running]).unwrap_err()).0,
        tonic::Code::NotFound
    );
    let r = st
        .register(crate::protocol::Registration {
            worker: w.clone(),
            capacity: Resources { cpus: 1, gpus: 0 },
            labels: BTreeMap::new(),
            address: String::new(),
            running: vec![running],
            instance: "pod-a".into(),
        })
        .unwrap();
    assert!(r.epoch > e1);
    assert_eq!(r.kill, vec![running]);
}

/// The autoscaling gauge: ranks of pending trials with no placement, which falls as workers
/// come and take them.
#[test]
fn ranks_waiting_counts_unplaced_demand() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    let spec = spec::parse(
        "name: g\nmetric: {name: loss, goal: minimize}\nsearcher: {name: grid}\nparallel_trials: 4\n\
         parameters:\n  a: {values: [1, 2, 3, 4, 5, 6]}\ntrial: {command: [train]}\n",
        &[],
    )
    .unwrap();
    st.add_experiment(exp, spec, "memory://t".into());
    st.commit().unwrap();
    assert_eq!(st.gauges().ranks_waiting, 4, "four trials ahead, no worker");
    let (_, _rx1) = join(&mut st, "w1", 1, vec![]);
    assert_eq!(st.gauges().ranks_waiting, 3);
    let (_, _rx2) = join(&mut st, "w2", 2, vec![]);
    let g = st.gauges();
    assert_eq!((g.ranks_waiting, g.workers), (1, 2));
    let text = st.telemetry.render(&g);
    assert!(text.contains("chorus_ranks_waiting 1\n"), "{text}");
    assert!(text.contains("chorus_workers_registered 2\n"), "{text}");
    // A paused experiment wants nothing placed.
    st.pause(exp).unwrap();
    assert_eq!(st.gauges().ranks_waiting, 0);
}

fn rows_of(db: &std::path::Path, exp: ExperimentId) -> Vec<i64> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let id = exp.0 as i64;
    [
        "SELECT COUNT(*) FROM experiments WHERE id = ?1",
        "SELECT COUNT(*) FROM trials WHERE experiment_id = ?1",
        "SELECT COUNT(*) FROM attempts WHERE trial_id IN (SELECT id FROM trials WHERE experiment_id = ?1)",
        "SELECT COUNT(*) FROM searcher_snapshots WHERE experiment_id = ?1",
        "SELECT COUNT(*) FROM searcher_journal WHERE experiment_id = ?1",
    ]
    .iter()
    .map(|q| conn.query_row(q, [id], |r| r.get(0)).unwrap())
    .collect()
}

/// Labels, notes and archival are kept across a restart, refused past their bounds with the
/// field named, and archival waits for the experiment to end.
#[test]
fn labels_notes_and_archival_are_bounded_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let exp;
    {
        let h = open(dir.path(), 10_000);
        let mut st = h.lock();
        exp = st.reserve_experiment_id();
        st.add_experiment(exp, grid_spec(""), "memory://t".into());
        let add = BTreeMap::from([
            ("team".to_string(), "vision".to_string()),
            ("run/kind".into(), "sweep".into()),
        ]);
        st.label(exp, &add, &[]).unwrap();
        st.set_note(exp, "first try: lr too high").unwrap();
        st.commit().unwrap();
        let bad = BTreeMap::from([("Bad Key".to_string(), "v".to_string())]);
        let s = tonic::Status::from(st.label(exp, &bad, &[]).unwrap_err());
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let details = tonic_types::StatusExt::get_error_details(&s);
        let violations = details.bad_request().unwrap().field_violations.clone();
        assert_eq!(violations[0].field, "labels.Bad Key");
        let (code, message) = code_and_message(st.set_note(exp, &"n".repeat(4097)).unwrap_err());
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(message.starts_with("note:"), "{message}");
        let (code, message) = code_and_message(st.archive(exp, false).unwrap_err());
        assert_eq!(code, tonic::Code::FailedPrecondition);
        assert!(message.contains("active"), "{message}");
        st.kill(exp).unwrap();
        st.archive(exp, false).unwrap();
        st.label(exp, &BTreeMap::new(), &["team".into()]).unwrap();
        st.commit().unwrap();
    }
    let h = open(dir.path(), 10_000);
    let st = h.lock();
    let l = &st.experiments[&exp].lifecycle;
    assert_eq!(
        l.labels,
        BTreeMap::from([("run/kind".to_string(), "sweep".to_string())])
    );
    assert_eq!(l.note, "first try: lr too high");
    assert!(l.archived);
    let pb = convert::experiment(&st, exp).unwrap();
    assert!(pb.archived);
    assert_eq!(pb.labels.get("run/kind").map(String::as_str), Some("sweep"));
}

/// A deletion is refused while its experiment runs or has a live attempt; once begun it is
/// marked durably (a restart finds it), and finished it removes every row of the experiment and
/// nothing of another.
#[test]
fn a_deletion_is_refused_while_running_marked_durably_and_removes_only_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let (exp, other);
    {
        let h = open(dir.path(), 10_000);
        let mut st = h.lock();
        exp = st.reserve_experiment_id();
        st.add_experiment(exp, grid_spec(""), "memory://t".into());
        other = st.reserve_experiment_id();
        st.add_experiment(other, grid_spec(""), "memory://t".into());
        let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
        let a = assignments(&mut rx).remove(0);
        let running = TrialId(a.trial_id);
        finish(&mut st, "w1", &a, pb::ExitKind::Succeeded).unwrap();
        let next = assignments(&mut rx);
        assert!(!next.is_empty(), "another trial was placed");
        let (code, message) = code_and_message(st.begin_delete(exp, Deletion::All).unwrap_err());
        assert_eq!(code, tonic::Code::FailedPrecondition);
        assert!(message.contains("it is active"), "{message}");
        st.kill(exp).unwrap();
        st.commit().unwrap();
        assert!(
            st.trials
                .values()
                .filter(|t| t.experiment == exp)
                .all(|t| t.live.is_none())
        );
        let plan = st.begin_delete(exp, Deletion::All).unwrap();
        assert!(plan.trials.contains(&running));
        st.commit().unwrap();
        // A partial deletion cannot take over from a full one.
        assert!(st.begin_delete(exp, Deletion::KeepBest(1)).is_err());
    }
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    assert_eq!(st.unfinished_deletions(), vec![(exp, Deletion::All)]);
    assert!(convert::experiment(&st, exp).unwrap().deleting);
    st.finish_delete(exp, Deletion::All).unwrap();
    st.commit().unwrap();
    assert!(st.experiment(exp).is_err());
    assert!(st.trials.values().all(|t| t.experiment != exp));
    assert_eq!(rows_of(&db, exp), vec![0, 0, 0, 0, 0]);
    let kept = rows_of(&db, other);
    assert_eq!(kept[0], 1);
    assert!(kept[1] > 0 && kept[3] == 1, "{kept:?}");
    drop(st);
    drop(h);
    let h = open(dir.path(), 10_000);
    let st = h.lock();
    assert!(st.experiment(exp).is_err());
    assert!(st.experiment(other).is_ok());
    assert!(st.unfinished_deletions().is_empty());
}

/// `--keep-best N` keeps the checkpoints of the N best trials by the experiment's goal, and the
/// experiment itself.
#[test]
fn keep_best_ranks_trials_by_the_goal() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec("max_trials: 6\n"), "memory://t".into());
    let (_, mut rx) = join(&mut st, "w1", 2, vec![]);
    loop {
        let batch = assignments(&mut rx);
        if batch.is_empty() {
            break;
        }
        for a in batch {
            finish(&mut st, "w1", &a, pb::ExitKind::Succeeded).unwrap();
        }
    }
    assert_eq!(st.experiments[&exp].state, ExperimentState::Completed);
    let plan = st.begin_delete(exp, Deletion::KeepBest(2)).unwrap();
    // loss = a * b: the two best are (1, 10) = 10 and (2, 10) = 20.
    let kept: Vec<f64> = plan.keep.iter().map(|t| st.trials[t].best_value.unwrap()).collect();
    assert_eq!(kept, vec![10.0, 20.0]);
    assert_eq!(plan.trials.len(), 6);
    st.finish_delete(exp, Deletion::KeepBest(2)).unwrap();
    st.commit().unwrap();
    assert!(st.experiments[&exp].lifecycle.deleting.is_none());
}

/// A continuation starts from the old spec; its searcher learns from the old finished trials
/// when it can (TPE, random) and says when it cannot (grid); its origin is kept.
#[test]
fn a_continuation_names_its_origin_and_how_its_searcher_started() {
    let dir = tempfile::tempdir().unwrap();
    let specs: BTreeMap<&str, ValidSpec> = searcher_specs().into_iter().collect();
    let mut continued = Vec::new();
    {
        let h = open(dir.path(), 10_000);
        let mut st = h.lock();
        let (_, mut rx) = join(&mut st, "w1", 4, vec![]);
        for name in ["tpe", "random", "grid"] {
            let exp = st.reserve_experiment_id();
            st.add_experiment(exp, specs[name].clone(), "memory://t".into());
            st.commit().unwrap();
            loop {
                let batch = assignments(&mut rx);
                if batch.is_empty() {
                    break;
                }
                for a in batch {
                    finish(&mut st, "w1", &a, pb::ExitKind::Succeeded).unwrap();
                }
            }
            assert_eq!(st.finished_trials(exp).unwrap().len(), 6, "{name}");
            let id = st.reserve_experiment_id();
            let message = st
                .add_continued_experiment(id, specs[name].clone(), "memory://t".into(), exp)
                .unwrap();
            st.commit().unwrap();
            if name == "grid" {
                assert!(message.contains("starts fresh"), "{message}");
            } else {
                assert!(message.contains("warm-started with 6 finished trial(s)"), "{message}");
            }
            continued.push((id, exp));
            // Nothing of the continuation runs here: the worker's slots go to the next sweep.
            st.kill(id).unwrap();
            st.commit().unwrap();
            let _ = assignments(&mut rx);
        }
    }
    let h = open(dir.path(), 10_000);
    let st = h.lock();
    for (id, origin) in continued {
        assert_eq!(convert::experiment(&st, id).unwrap().continued_from, Some(origin.0));
        assert!(st.experiments[&id].unreadable_searcher.is_none());
    }
}

/// A store of schema 6 gains the lifecycle columns, empty.
#[test]
fn a_version_six_store_gains_lifecycle_columns() {
    let dir = tempfile::tempdir().unwrap();
    let exp;
    {
        let h = open(dir.path(), 10_000);
        let mut st = h.lock();
        exp = st.reserve_experiment_id();
        st.add_experiment(exp, grid_spec(""), "memory://t".into());
        st.commit().unwrap();
    }
    let conn = rusqlite::Connection::open(dir.path().join("db")).unwrap();
    conn.execute_batch(
        "ALTER TABLE experiments DROP COLUMN labels; ALTER TABLE experiments DROP COLUMN note;
         ALTER TABLE experiments DROP COLUMN archived; ALTER TABLE experiments DROP COLUMN deleting;
         ALTER TABLE experiments DROP COLUMN continued_from;
         UPDATE meta SET value = '6' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(conn);
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    assert_eq!(st.experiments[&exp].lifecycle, Default::default());
    st.set_note(exp, "after the upgrade").unwrap();
    st.commit().unwrap();
}

/// A worker's GPU reading that lands after a trial's last report (they come every few seconds,
/// on their own) leaves that report as the trial's latest metrics.
#[test]
fn a_gpu_reading_never_hides_the_trials_last_report() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(dir.path(), 10_000);
    let mut st = h.lock();
    let exp = st.reserve_experiment_id();
    st.add_experiment(exp, grid_spec(""), "memory://t".into());
    st.commit().unwrap();
    let (_, mut rx) = join(&mut st, "w1", 1, vec![]);
    let a = assignments(&mut rx).remove(0);
    let metric = |json: &str| {
        Kind::Metric(pb::Metric {
            json: json.into(),
            ..Default::default()
        })
    };
    report(&mut st, "w1", &a, 1, Kind::Started(pb::Started::default())).unwrap();
    report(&mut st, "w1", &a, 2, metric(r#"{"step": 4, "loss": 0.25}"#)).unwrap();
    report(&mut st, "w1", &a, 3, metric(r#"{"gpu_util": 71, "gpu_mem_mb": 2048}"#)).unwrap();
    let tid = TrialId(a.trial_id);
    let last: serde_json::Value = serde_json::from_str(&st.trials[&tid].last_metrics).unwrap();
    assert_eq!(last, serde_json::json!({"step": 4, "loss": 0.25}));
    // A trial's own step-less report is its latest, as ever.
    report(&mut st, "w1", &a, 4, metric(r#"{"loss": 0.2}"#)).unwrap();
    let last: serde_json::Value = serde_json::from_str(&st.trials[&tid].last_metrics).unwrap();
    assert_eq!(last, serde_json::json!({"loss": 0.2}));
}
