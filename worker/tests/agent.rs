//! The agent against a fake coordinator in the same process: registration, assignment handling,
//! report delivery across a coordinator restart, stale attempts, auth, and graceful shutdown.

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
        self.state().seen.push(Seen::Register(req.into_inner()));
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: 100,
            lease_ttl_ms: 1000,
            kill: vec![],
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.admit(&req)?;
        let mut s = self.state();
        s.seen.push(Seen::Heartbeat(req.into_inner().running));
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
    let handle = tokio::spawn(async move {
        tonic::transport::Server::builder()
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
    server.stop(&fake).await;
}
