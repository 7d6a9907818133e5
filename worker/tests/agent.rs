//! The agent against a fake coordinator in the same process: registration, assignment handling,
//! report delivery across a coordinator restart, stale attempts, auth, graceful shutdown,
//! registration epochs (a worker replaced by a newer instance of its id), TLS and mutual TLS,
//! and the health endpoint.

use chorus_proto::pb::{
    self,
    trial_event::Kind,
    worker_command::Command,
    worker_service_server::{WorkerService, WorkerServiceServer},
};
use chorus_worker::WorkerConfig;
use chorus_worker::config::Timings;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
enum Seen {
    Register(pb::RegisterRequest),
    Heartbeat(Vec<pb::RunningAttempt>),
    Report(pb::ReportTrialRequest),
    /// A Register refused with ALREADY_EXISTS; the instance that asked.
    Held(String),
    /// A call refused as fenced, and the epoch it carried.
    Fenced(u64),
    /// A heartbeat that said the worker is leaving (recorded just before that heartbeat).
    Leaving,
}

#[derive(Default)]
struct FakeState {
    seen: Vec<Seen>,
    authorization: Vec<Option<String>>,
    stream: Option<mpsc::UnboundedSender<Result<pb::WorkerCommand, Status>>>,
    /// Reports for these trials are answered ABORTED.
    stale_trials: HashSet<u64>,
    forget_next_heartbeat: bool,
    required_token: Option<String>,
    /// While set every call fails UNAVAILABLE, so a stopping server takes no new stream.
    down: bool,
    /// The epoch of the latest registration; calls under another are refused as fenced.
    epoch: u64,
    /// The instance of the latest registration.
    owner: Option<String>,
    /// While set, a Register by another instance than the owner is refused ALREADY_EXISTS (the
    /// owner holds its lease).
    lease_held: bool,
    /// How many client certificates each Register came with (mutual TLS).
    client_certs: Vec<usize>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        let mut s = self.state();
        s.authorization.push(auth.clone());
        if s.down {
            return Err(Status::unavailable("coordinator going down"));
        }
        match &s.required_token {
            Some(t) if auth.as_deref() != Some(&format!("Bearer {t}")) => Err(Status::unauthenticated("bad token")),
            _ => Ok(()),
        }
    }

    /// The coordinator's fence: a call under an epoch other than the latest registration's.
    fn check_epoch(&self, epoch: u64) -> Result<(), Status> {
        let mut s = self.state();
        if epoch == s.epoch {
            return Ok(());
        }
        s.seen.push(Seen::Fenced(epoch));
        Err(Status::aborted(format!(
            "worker w-agent-test: epoch {epoch} is fenced by a newer registration (epoch {})",
            s.epoch
        )))
    }

    fn send(&self, command: Command) {
        let s = self.state();
        let tx = s.stream.as_ref().expect("the worker has an open stream");
        tx.send(Ok(pb::WorkerCommand { command: Some(command) })).unwrap();
    }

    fn seen(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    fn registers(&self) -> Vec<pb::RegisterRequest> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Register(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// The trial's events as the coordinator would apply them: once per seq, in seq order.
    fn events(&self, trial: u64) -> Vec<pb::TrialEvent> {
        let mut out: Vec<pb::TrialEvent> = Vec::new();
        for s in self.seen() {
            if let Seen::Report(r) = s
                && r.trial_id == trial
            {
                for e in r.events {
                    if !out.iter().any(|o| o.seq == e.seq) {
                        out.push(e);
                    }
                }
            }
        }
        out.sort_by_key(|e| e.seq);
        out
    }

    fn exited(&self, trial: u64) -> Option<pb::Exited> {
        self.events(trial).into_iter().find_map(|e| match e.kind {
            Some(Kind::Exited(x)) => Some(x),
            _ => None,
        })
    }

    async fn wait_connected(&self) {
        self.wait_for("the assignment stream", |f| f.state().stream.is_some())
            .await;
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&Fake) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}; saw {:#?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tonic::async_trait]
impl WorkerService for Fake {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.admit(&req)?;
        let certs = req.peer_certs().map_or(0, |c| c.len());
        let r = req.into_inner();
        let mut s = self.state();
        s.client_certs.push(certs);
        if s.lease_held && s.owner.as_ref().is_some_and(|o| *o != r.instance) {
            s.seen.push(Seen::Held(r.instance));
            return Err(Status::already_exists(
                "worker id w-agent-test is registered by another live instance",
            ));
        }
        s.epoch += 1;
        s.owner = Some(r.instance.clone());
        // A fresh registration holds its lease.
        s.lease_held = true;
        s.seen.push(Seen::Register(r));
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: 100,
            lease_ttl_ms: 1000,
            kill: vec![],
            epoch: s.epoch,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.admit(&req)?;
        self.check_epoch(req.get_ref().epoch)?;
        let mut s = self.state();
        let req = req.into_inner();
        if req.leaving {
            s.seen.push(Seen::Leaving);
        }
        s.seen.push(Seen::Heartbeat(req.running));
        if std::mem::take(&mut s.forget_next_heartbeat) {
            return Err(Status::not_found("unknown worker"));
        }
        Ok(Response::new(pb::HeartbeatResponse { kill: vec![] }))
    }

    type AssignmentsStream = UnboundedReceiverStream<Result<pb::WorkerCommand, Status>>;

    async fn assignments(
        &self,
        req: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        self.admit(&req)?;
        self.check_epoch(req.get_ref().epoch)?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().stream = Some(tx);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn rendezvous(
        &self,
        _req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        // These tests place single-rank attempts only; the real rendezvous is tested end to end.
        Err(Status::unimplemented("multi-rank attempts are not part of these tests"))
    }

    async fn report_trial(
        &self,
        req: Request<pb::ReportTrialRequest>,
    ) -> Result<Response<pb::ReportTrialResponse>, Status> {
        self.admit(&req)?;
        self.check_epoch(req.get_ref().epoch)?;
        let r = req.into_inner();
        let mut s = self.state();
        let stale = s.stale_trials.contains(&r.trial_id);
        s.seen.push(Seen::Report(r));
        if stale {
            return Err(Status::aborted("stale attempt"));
        }
        Ok(Response::new(pb::ReportTrialResponse {}))
    }
}

struct Server {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

async fn serve(fake: &Fake, addr: SocketAddr) -> Server {
    serve_with(fake, addr, None).await
}

async fn serve_with(fake: &Fake, addr: SocketAddr, tls: Option<tonic::transport::ServerTlsConfig>) -> Server {
    fake.state().down = false;
    let start = Instant::now();
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            // Rebinding the port of a server that just stopped can race its teardown.
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                eprintln!("rebinding {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    };
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = oneshot::channel::<()>();
    let service = WorkerServiceServer::new(fake.clone());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    let handle = tokio::spawn(async move {
        builder
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Server { addr, shutdown, handle }
}

impl Server {
    /// The coordinator goes away: calls fail, the stream ends, the port closes.
    async fn stop(self, fake: &Fake) {
        {
            let mut s = fake.state();
            s.down = true;
            s.stream = None;
        }
        let _ = self.shutdown.send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the fake coordinator stops")
            .unwrap();
    }
}

struct Worker {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), chorus_worker::WorkerError>>,
    scratch: tempfile::TempDir,
    _data: tempfile::TempDir,
}

fn config(addr: SocketAddr, data: &Path) -> WorkerConfig {
    let mut c = WorkerConfig::new(format!("http://{addr}"), "w-agent-test", data);
    c.slots = 4;
    c.timings = Timings {
        rpc_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        kill_grace: Duration::from_millis(500),
        output_grace: Duration::from_millis(300),
        shutdown_flush: Duration::from_secs(5),
        ..Timings::default()
    };
    c
}

fn start_worker(config: WorkerConfig, data: tempfile::TempDir) -> Worker {
    let (stop, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(chorus_worker::run(config, async {
        let _ = rx.await;
    }));
    Worker {
        stop,
        handle,
        scratch: tempfile::tempdir().unwrap(),
        _data: data,
    }
}

impl Worker {
    fn assignment(&self, trial: u64, script: &str) -> pb::Assignment {
        pb::Assignment {
            experiment_id: 1,
            trial_id: trial,
            attempt: 1,
            params_json: "{}".into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: [("SCRATCH".to_string(), self.scratch.path().display().to_string())].into(),
            timeout_ms: 0,
            storage: format!("memory://agent-{}", self.scratch.path().display()),
            resources: Some(pb::Resources { cpus: 1, gpus: 0 }),
            keep_checkpoints: 2,
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

    async fn shut_down(self) -> Result<(), chorus_worker::WorkerError> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("the worker shuts down")
            .unwrap()
    }
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn kinds(events: &[pb::TrialEvent]) -> Vec<&'static str> {
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

fn exit_kind(e: &pb::Exited) -> pb::ExitKind {
    pb::ExitKind::try_from(e.kind).unwrap()
}

fn process_gone(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_buffered_during_a_coordinator_restart_arrive_in_order_after_it() {
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let addr = server.addr;
    let data = tempfile::tempdir().unwrap();
    let worker = start_worker(config(addr, data.path()), data);
    fake.wait_connected().await;
    assert_eq!(fake.registers()[0].capacity, Some(pb::Resources { cpus: 4, gpus: 0 }));

    let a = worker.assignment(
        1,
        r#"
        echo 'chorus:metric {"step": 1, "loss": 1}'
        while [ ! -f "$SCRATCH/go" ]; do sleep 0.05; done
        echo 'chorus:metric {"step": 2, "loss": 0.5}'
        echo 'chorus:metric {"step": 3, "loss": 0.25}'
    "#,
    );
    fake.send(Command::Assign(a));
    fake.wait_for("the first metric", |f| f.events(1).len() >= 2).await;

    server.stop(&fake).await;
    std::fs::write(worker.scratch.path().join("go"), "").unwrap();
    // The trial ends while nobody listens; its last events wait in the worker.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen_while_down = fake.seen().len();
    let server = serve(&fake, addr).await;

    fake.wait_for("the exit report", |f| f.exited(1).is_some()).await;
    let events = fake.events(1);
    assert_eq!(kinds(&events), ["started", "metric", "metric", "metric", "exited"]);
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(exit_kind(&fake.exited(1).unwrap()), pb::ExitKind::Succeeded);

    // Re-registered, naming the attempt whose exit was not yet acknowledged, before reporting.
    let after: Vec<Seen> = fake.seen().split_off(seen_while_down);
    let first_register = after
        .iter()
        .position(|s| matches!(s, Seen::Register(_)))
        .expect("registered again");
    let Seen::Register(r) = &after[first_register] else {
        unreachable!()
    };
    assert_eq!(
        r.running,
        vec![pb::RunningAttempt {
            trial_id: 1,
            attempt: 1,
            rank: 0,
        }]
    );
    let first_report = after.iter().position(|s| matches!(s, Seen::Report(_))).unwrap();
    assert!(first_register < first_report, "{after:#?}");

    // Once the exit is acknowledged the attempt is forgotten.
    fake.wait_for(
        "an empty heartbeat",
        |f| matches!(f.seen().last(), Some(Seen::Heartbeat(running)) if running.is_empty()),
    )
    .await;
    worker.shut_down().await.unwrap();
    server.stop(&fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_ignored_kills_are_obeyed_and_stale_attempts_are_dropped() {
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let data = tempfile::tempdir().unwrap();
    let worker = start_worker(config(server.addr, data.path()), data);
    fake.wait_connected().await;

    let long = r#"echo $$ >> "$SCRATCH/runs-$CHORUS_TRIAL_ID"; exec sleep 1000"#;
    fake.send(Command::Assign(worker.assignment(2, long)));
    fake.send(Command::Assign(worker.assignment(2, long)));
    fake.wait_for("trial 2 started", |f| !f.events(2).is_empty()).await;
    let runs = |trial| std::fs::read_to_string(worker.scratch.path().join(format!("runs-{trial}"))).unwrap_or_default();
    fake.wait_for("trial 2's pid", |_| !runs(2).is_empty()).await;
    fake.send(Command::Kill(pb::KillAttempt {
        trial_id: 2,
        attempt: 1,
        reason: "user asked".into(),
    }));
    fake.wait_for("trial 2's exit", |f| f.exited(2).is_some()).await;
    let exited = fake.exited(2).unwrap();
    assert_eq!(
        (exit_kind(&exited), exited.message.as_str()),
        (pb::ExitKind::Killed, "user asked")
    );
    assert_eq!(runs(2).lines().count(), 1, "the repeated assignment did not run");
    assert_eq!(kinds(&fake.events(2)), ["started", "exited"]);
    assert!(process_gone(runs(2).trim().parse().unwrap()));

    // The coordinator moves on from trial 3 while it runs; its next report learns so.
    let reports = r#"
        echo $$ >> "$SCRATCH/runs-$CHORUS_TRIAL_ID"
        while [ ! -f "$SCRATCH/go" ]; do sleep 0.05; done
        echo 'chorus:metric {"loss": 1}'
        exec sleep 1000
    "#;
    fake.send(Command::Assign(worker.assignment(3, reports)));
    fake.wait_for("trial 3's pid", |_| runs(3).ends_with('\n')).await;
    fake.wait_for("trial 3 started", |f| !f.events(3).is_empty()).await;
    let pid: i32 = runs(3).trim().parse().unwrap();
    fake.state().stale_trials.insert(3);
    std::fs::write(worker.scratch.path().join("go"), "").unwrap();
    let start = Instant::now();
    while !process_gone(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the stale attempt was not killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fake.wait_for(
        "the stale attempt forgotten",
        |f| matches!(f.seen().last(), Some(Seen::Heartbeat(running)) if running.is_empty()),
    )
    .await;
    let reports_of_3 = fake
        .seen()
        .iter()
        .filter(|s| matches!(s, Seen::Report(r) if r.trial_id == 3))
        .count();
    assert_eq!(reports_of_3, 2, "nothing is resent after ABORTED");
    assert_eq!(kinds(&fake.events(3)), ["started", "metric"]);
    worker.shut_down().await.unwrap();
    server.stop(&fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_worker_registers_again() {
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let data = tempfile::tempdir().unwrap();
    let worker = start_worker(config(server.addr, data.path()), data);
    fake.wait_for("registration", |f| f.registers().len() == 1).await;
    fake.state().forget_next_heartbeat = true;
    fake.wait_for("a second registration", |f| f.registers().len() == 2)
        .await;
    worker.shut_down().await.unwrap();
    server.stop(&fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_sent_and_a_refused_one_stops_the_worker() {
    let fake = Fake::default();
    fake.state().required_token = Some("right".into());
    let server = serve(&fake, local()).await;

    let data = tempfile::tempdir().unwrap();
    let mut c = config(server.addr, data.path());
    c.token = Some("wrong".into());
    let refused = tokio::time::timeout(Duration::from_secs(10), chorus_worker::run(c, std::future::pending()))
        .await
        .expect("a refused worker exits on its own");
    let err = refused.unwrap_err();
    assert!(err.to_string().contains("bad token"), "{err}");

    let data = tempfile::tempdir().unwrap();
    let mut c = config(server.addr, data.path());
    c.token = Some("right".into());
    let worker = start_worker(c, data);
    fake.wait_for("registration", |f| f.registers().len() == 1).await;
    assert!(
        fake.state()
            .authorization
            .iter()
            .any(|a| a.as_deref() == Some("Bearer right"))
    );
    worker.shut_down().await.unwrap();
    server.stop(&fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_trials_and_delivers_their_exit() {
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let data = tempfile::tempdir().unwrap();
    let worker = start_worker(config(server.addr, data.path()), data);
    fake.wait_connected().await;
    fake.send(Command::Assign(
        worker.assignment(4, r#"echo $$ > "$SCRATCH/pid"; sleep 1000 & wait"#),
    ));
    let pid_file = worker.scratch.path().join("pid");
    fake.wait_for("the trial's pid", |_| {
        std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();

    worker.shut_down().await.unwrap();
    let exited = fake
        .exited(4)
        .expect("the exit was delivered before the worker returned");
    assert_eq!(exit_kind(&exited), pb::ExitKind::Interrupted);
    assert!(exited.message.contains("worker shut down"), "{}", exited.message);
    assert!(process_gone(pid));
    // The coordinator heard that the worker is leaving before the attempt came back, so it
    // places the attempt elsewhere rather than on the worker about to go.
    let seen = fake.seen();
    let leaving = seen.iter().position(|s| matches!(s, Seen::Leaving));
    let handed_back = seen.iter().position(|s| {
        matches!(s, Seen::Report(r) if r.trial_id == 4 && r.events.iter().any(|e| matches!(e.kind, Some(pb::trial_event::Kind::Exited(_)))))
    });
    assert!(
        leaving.is_some() && leaving < handed_back,
        "leaving at {leaving:?}, the exit at {handed_back:?}"
    );
    server.stop(&fake).await;
}

/// Waits for `handle` to end on its own.
async fn ends(
    handle: tokio::task::JoinHandle<Result<(), chorus_worker::WorkerError>>,
) -> Result<(), chorus_worker::WorkerError> {
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("the worker exits on its own")
        .unwrap()
}

async fn read_pid(path: &Path) -> i32 {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s.trim().parse().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no pid in {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_waits_for_the_lease_then_replaces_the_first_which_kills_its_trials_and_exits() {
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let data_a = tempfile::tempdir().unwrap();
    let dir_a = data_a.path().to_path_buf();
    let first = start_worker(config(server.addr, data_a.path()), data_a);
    fake.wait_connected().await;
    // The default instance is random, kept in the data directory.
    let instance_a = fake.registers()[0].instance.clone();
    assert_eq!(instance_a.len(), 32, "{instance_a:?}");
    assert_eq!(
        std::fs::read_to_string(dir_a.join("instance")).unwrap().trim(),
        instance_a
    );
    fake.send(Command::Assign(
        first.assignment(5, r#"echo $$ > "$SCRATCH/pid"; exec sleep 1000"#),
    ));
    let pid = read_pid(&first.scratch.path().join("pid")).await;
    fake.wait_for("trial 5 started", |f| !f.events(5).is_empty()).await;

    // A second instance of the same worker id is refused while the first holds its lease, and
    // keeps trying.
    let data_b = tempfile::tempdir().unwrap();
    let mut c = config(server.addr, data_b.path());
    c.instance = Some("pod-b".into());
    let second = start_worker(c, data_b);
    fake.wait_for("two refused registrations of the second instance", |f| {
        f.seen()
            .iter()
            .filter(|s| matches!(s, Seen::Held(i) if i == "pod-b"))
            .count()
            >= 2
    })
    .await;
    assert!(!second.handle.is_finished(), "a refused instance keeps trying");
    assert!(!first.handle.is_finished());
    assert!(
        !fake.seen().iter().any(|s| matches!(s, Seen::Fenced(..))),
        "every call of the registered worker carried its epoch"
    );

    // The first one's lease lapses (its pod is on its way out): the second registers, and the
    // first learns it was replaced at its next call.
    let Worker {
        stop: _keep_running,
        handle,
        scratch: _scratch,
        ..
    } = first;
    fake.state().lease_held = false;
    let err = ends(handle).await.unwrap_err();
    assert!(matches!(err, chorus_worker::WorkerError::Fenced { .. }), "{err}");
    assert!(err.to_string().contains("replaced"), "{err}");
    assert!(process_gone(pid), "the replaced worker killed its trial");
    assert!(fake.exited(5).is_none(), "a replaced worker reports nothing more");
    // It learnt so from a call under its old epoch, or from a refused registration.
    assert!(
        fake.seen()
            .iter()
            .any(|s| matches!(s, Seen::Fenced(1)) || matches!(s, Seen::Held(i) if *i == instance_a)),
        "{:#?}",
        fake.seen()
    );
    let b = fake.registers().last().unwrap().clone();
    assert_eq!(b.instance, "pod-b");
    fake.wait_for("the second instance's heartbeat", |f| {
        matches!(f.seen().last(), Some(Seen::Heartbeat(_)))
    })
    .await;
    second.shut_down().await.unwrap();
    server.stop(&fake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_keeps_its_instance_and_reports_under_each_new_epoch() {
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let c = config(server.addr, &dir);
    let worker = start_worker(c.clone(), data);
    fake.wait_connected().await;
    let instance = fake.registers()[0].instance.clone();
    let Worker {
        stop,
        handle,
        _data: data,
        ..
    } = worker;
    let _ = stop.send(());
    ends(handle).await.unwrap();
    // The first worker's stream is gone; wait for the second's.
    fake.state().stream = None;

    // Same data directory: same instance, taken over at once although the lease is held.
    let again = start_worker(c, data);
    fake.wait_for("the second registration", |f| f.registers().len() == 2)
        .await;
    assert_eq!(fake.registers()[1].instance, instance);
    fake.wait_connected().await;
    fake.send(Command::Assign(
        again.assignment(6, "echo 'chorus:metric {\"loss\": 1}'"),
    ));
    fake.wait_for("trial 6's exit", |f| f.exited(6).is_some()).await;
    let epochs: HashSet<u64> = fake
        .seen()
        .iter()
        .filter_map(|s| match s {
            Seen::Report(r) if r.trial_id == 6 => Some(r.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, HashSet::from([2]), "reports carry the current epoch");
    again.shut_down().await.unwrap();
    server.stop(&fake).await;
}

/// A CA, a server certificate for 127.0.0.1 it signs, and a client certificate it signs.
struct Pki {
    dir: tempfile::TempDir,
    server_cert: String,
    server_key: String,
    ca: String,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "chorus test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf(vec!["w-agent-test".into()], ExtendedKeyUsagePurpose::ClientAuth);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
        std::fs::write(dir.path().join("client.pem"), client_cert).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key).unwrap();
        Pki {
            dir,
            server_cert,
            server_key,
            ca,
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// The server side; `mutual`: client certificates signed by the CA are required.
    fn server(&self, mutual: bool) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        // The server side asks for the process's default provider, which is ambiguous when any
        // crate of the build also turns on rustls' ring: name the one Chorus uses.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&self.server_cert, &self.server_key));
        if mutual {
            tls.client_ca_root(Certificate::from_pem(&self.ca))
        } else {
            tls
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_trusts_a_tls_coordinator_through_its_ca_and_presents_its_certificate() {
    use chorus_worker::config::ClientTls;
    let pki = Pki::new();
    let fake = Fake::default();
    let server = serve_with(&fake, local(), Some(pki.server(true))).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let identity = || (Some(pki.path("client.pem")), Some(pki.path("client.key")));

    // The system's roots do not know the test CA: refused, with a word on certificates, and at
    // once rather than retried (a person has to change a setting).
    let data = tempfile::tempdir().unwrap();
    let mut c = config(server.addr, data.path());
    c.coordinator = url.clone();
    let (cert, key) = identity();
    c.tls = ClientTls::load(None, cert, key).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(20), chorus_worker::run(c, std::future::pending()))
        .await
        .expect("a worker that does not trust the coordinator exits on its own");
    let err = refused.unwrap_err();
    eprintln!("refused as it should be: {err}");
    assert!(matches!(err, chorus_worker::WorkerError::Tls(_)), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(fake.registers().is_empty());

    let data = tempfile::tempdir().unwrap();
    let mut c = config(server.addr, data.path());
    c.coordinator = url;
    let (cert, key) = identity();
    c.tls = ClientTls::load(Some(pki.path("ca.pem")), cert, key).unwrap();
    let worker = start_worker(c, data);
    fake.wait_connected().await;
    assert_eq!(
        fake.state().client_certs.last(),
        Some(&1),
        "the client certificate was presented"
    );
    worker.shut_down().await.unwrap();
    server.stop(&fake).await;
}

async fn health_of(addr: SocketAddr) -> Option<i32> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let resp = client.check(HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(resp.into_inner().status)
}

async fn wait_health(addr: SocketAddr, want: tonic_health::pb::health_check_response::ServingStatus) {
    let start = Instant::now();
    loop {
        let got = health_of(addr).await;
        if got == Some(want as i32) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "health stayed {got:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_only_while_registered_and_not_draining() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let addr = server.addr;
    // A free port for the health endpoint: bound, read, released.
    let health = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut c = config(addr, data.path());
    c.health_listen = Some(health);
    c.timings.kill_grace = Duration::from_secs(2);
    let worker = start_worker(c, data);
    fake.wait_connected().await;
    wait_health(health, ServingStatus::Serving).await;

    server.stop(&fake).await;
    wait_health(health, ServingStatus::NotServing).await;
    let server = serve(&fake, addr).await;
    wait_health(health, ServingStatus::Serving).await;

    // A trial that ignores SIGTERM keeps the worker draining for the kill grace.
    fake.wait_connected().await;
    fake.send(Command::Assign(worker.assignment(
        7,
        r#"trap '' TERM; echo $$ > "$SCRATCH/pid"; while :; do sleep 0.05; done"#,
    )));
    read_pid(&worker.scratch.path().join("pid")).await;
    let Worker {
        stop, handle, scratch, ..
    } = worker;
    let _ = stop.send(());
    wait_health(health, ServingStatus::NotServing).await;
    assert!(!handle.is_finished(), "still draining");
    ends(handle).await.unwrap();
    drop(scratch);
    server.stop(&fake).await;
}

/// The body of `GET http://addr/metrics`, over a plain socket; `None` while nothing listens.
async fn scrape(addr: SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Some(body.to_string())
}

/// Scrapes until every line of `want` is in the body (the endpoint rereads at most once a
/// second); returns that body.
async fn scrape_until(addr: SocketAddr, want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = scrape(addr).await.unwrap_or_default();
        if want.iter().all(|w| body.lines().any(|l| l == *w)) {
            return body;
        }
        assert!(Instant::now() < deadline, "never saw {want:?}; last:\n{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_shows_registration_slots_and_attempts() {
    let fake = Fake::default();
    let server = serve(&fake, local()).await;
    let addr = server.addr;
    // A free port for the metrics endpoint: bound, read, released.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut c = config(addr, data.path());
    c.metrics_listen = Some(metrics);
    let worker = start_worker(c, data);
    fake.wait_connected().await;
    scrape_until(
        metrics,
        &[
            "chorus_worker_registered 1",
            "chorus_worker_slots{use=\"capacity\"} 4",
            "chorus_worker_slots{use=\"busy\"} 0",
            "chorus_worker_attempts_running 0",
        ],
    )
    .await;

    fake.send(Command::Assign(
        worker.assignment(1, r#"echo $$ > "$SCRATCH/pid"; while :; do sleep 0.05; done"#),
    ));
    read_pid(&worker.scratch.path().join("pid")).await;
    let body = scrape_until(
        metrics,
        &[
            "chorus_worker_slots{use=\"busy\"} 1",
            "chorus_worker_attempts_running 1",
            "chorus_worker_attempts_held 1",
        ],
    )
    .await;
    // This host has no GPU the worker offers: no GPU series.
    assert!(
        body.lines().any(|l| l == "chorus_worker_gpus{use=\"capacity\"} 0"),
        "{body}"
    );
    assert!(!body.contains("chorus_worker_gpu_"), "{body}");

    server.stop(&fake).await;
    scrape_until(
        metrics,
        &["chorus_worker_registered 0", "chorus_worker_attempts_running 1"],
    )
    .await;

    worker.shut_down().await.unwrap();
    // The endpoint goes with the worker.
    let deadline = Instant::now() + Duration::from_secs(5);
    while scrape(metrics).await.is_some() {
        assert!(Instant::now() < deadline, "the metrics endpoint outlived its worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
