//! Runs the real `chorus` binary against an in-process stand-in for the coordinator's
//! `ExperimentService`, to check what only the wire shows: the token and deadline reach the
//! server, `INVALID_ARGUMENT` details come out as field errors with exit 2, and `--wait` survives
//! a coordinator restart. The stand-in is scripted, not a coordinator; the e2e suite in `tests/`
//! runs the CLI against the real one.

use chorus_proto::pb;
use chorus_proto::pb::experiment_service_server::{ExperimentService, ExperimentServiceServer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExperimentEvent, Status>> + Send>>;
type LogStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LogChunk, Status>> + Send>>;
type MetricsStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::TrialMetricsPage, Status>> + Send>>;

#[derive(Default)]
struct Script {
    /// Experiment states sent by the n-th `WatchExperiment` call. The last call's stream then
    /// ends; earlier ones stay open until the server is killed.
    watches: Vec<Vec<pb::Experiment>>,
    watch_calls: AtomicUsize,
    /// Events sent so far, so a test knows when to kill the server.
    events_sent: AtomicUsize,
    trials: Vec<pb::Trial>,
}

struct Mock(Arc<Script>);

fn experiment(id: u64, state: pb::ExperimentState, completed: u64, failed: u64) -> pb::Experiment {
    pb::Experiment {
        id,
        name: "demo".into(),
        state: state as i32,
        metric: "val_loss".into(),
        max_trials: 3,
        parallel_trials: 1,
        counts: Some(pb::TrialCounts {
            completed,
            failed,
            ..Default::default()
        }),
        best_value: (completed > 0).then_some(0.25),
        best_trial_id: (completed > 0).then_some(11),
        ..Default::default()
    }
}

/// Every call must carry the token and, unless it is a stream, a deadline.
fn check<T>(req: &Request<T>, unary: bool) -> Result<(), Status> {
    if req.metadata().get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer tok") {
        return Err(Status::unauthenticated("missing or wrong bearer token"));
    }
    if unary && req.metadata().get("grpc-timeout").is_none() {
        return Err(Status::failed_precondition("the call has no deadline"));
    }
    Ok(())
}

#[tonic::async_trait]
impl ExperimentService for Mock {
    async fn submit_experiment(
        &self,
        req: Request<pb::SubmitExperimentRequest>,
    ) -> Result<Response<pb::SubmitExperimentResponse>, Status> {
        check(&req, true)?;
        let r = req.into_inner();
        if r.spec_yaml.contains("name: server-reject") {
            let details = ErrorDetails::with_bad_request(vec![FieldViolation::new(
                "parameters.lr.min",
                "(line 4, column 9): must be below the cluster limit",
            )]);
            return Err(Status::with_error_details(
                tonic::Code::InvalidArgument,
                "invalid experiment spec",
                details,
            ));
        }
        assert_eq!(r.overrides, ["max_trials=3"]);
        Ok(Response::new(pb::SubmitExperimentResponse {
            experiment: Some(experiment(7, pb::ExperimentState::Active, 0, 0)),
            warnings: Vec::new(),
        }))
    }

    async fn validate_experiment(
        &self,
        _: Request<pb::ValidateExperimentRequest>,
    ) -> Result<Response<pb::ValidateExperimentResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn list_experiments(
        &self,
        _: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn describe_experiment(
        &self,
        req: Request<pb::DescribeExperimentRequest>,
    ) -> Result<Response<pb::DescribeExperimentResponse>, Status> {
        check(&req, true)?;
        Err(Status::not_found(format!(
            "experiment {} does not exist",
            req.get_ref().experiment_id
        )))
    }

    async fn list_trials(
        &self,
        req: Request<pb::ListTrialsRequest>,
    ) -> Result<Response<pb::ListTrialsResponse>, Status> {
        check(&req, true)?;
        let exp = req.get_ref().experiment_id;
        let trials = self
            .0
            .trials
            .iter()
            .filter(|t| t.experiment_id == exp)
            .cloned()
            .collect();
        Ok(Response::new(pb::ListTrialsResponse {
            trials,
            metric: "val_loss".into(),
            maximize: false,
            ..Default::default()
        }))
    }

    async fn pause_experiment(&self, _: Request<pb::ExperimentRef>) -> Result<Response<pb::Experiment>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn resume_experiment(&self, _: Request<pb::ExperimentRef>) -> Result<Response<pb::Experiment>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn kill_experiment(&self, _: Request<pb::ExperimentRef>) -> Result<Response<pb::Experiment>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn update_experiment(
        &self,
        _: Request<pb::UpdateExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type WatchExperimentStream = EventStream;

    async fn watch_experiment(&self, req: Request<pb::ExperimentRef>) -> Result<Response<EventStream>, Status> {
        check(&req, false)?;
        let n = self.0.watch_calls.fetch_add(1, Ordering::SeqCst);
        let script = Arc::clone(&self.0);
        let Some(states) = script.watches.get(n).cloned() else {
            return Err(Status::internal("watched more often than scripted"));
        };
        let last = n + 1 == script.watches.len();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for e in states {
                let _ = tx
                    .send(Ok(pb::ExperimentEvent {
                        experiment: Some(e),
                        trial: None,
                    }))
                    .await;
                script.events_sent.fetch_add(1, Ordering::SeqCst);
            }
            if !last {
                // Hold the stream open: only the server's death ends it.
                tx.closed().await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type TrialMetricsStream = MetricsStream;

    async fn trial_metrics(&self, _: Request<pb::TrialMetricsRequest>) -> Result<Response<MetricsStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type TrialLogsStream = LogStream;

    async fn trial_logs(&self, req: Request<pb::TrialLogsRequest>) -> Result<Response<LogStream>, Status> {
        check(&req, false)?;
        let chunks = [(1, "one\n"), (1, "two\n"), (2, "three\n")].map(|(attempt, s)| {
            Ok(pb::LogChunk {
                attempt,
                data: s.as_bytes().to_vec(),
                cursor: format!("{attempt}-{s}"),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn drain_worker(&self, _: Request<pb::DrainWorkerRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// A stand-in coordinator on its own runtime, so dropping it closes every connection at once,
/// like a killed process.
struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl Server {
    fn start(script: &Arc<Script>, addr: SocketAddr) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = ExperimentServiceServer::new(Mock(Arc::clone(script)));
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Server {
            runtime: Some(runtime),
            addr,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `chorus` with a token and a 60 s guard against hangs; stdout and stderr are pipes, so
/// the CLI takes its non-terminal paths.
fn chorus(url: &str, token: Option<&str>, args: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
    cmd.args(args).env("CHORUS_COORDINATOR", url).env_remove("CHORUS_TOKEN");
    if let Some(t) = token {
        cmd.env("CHORUS_TOKEN", t);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(mut child: std::process::Child) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("chorus did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run(url: &str, token: Option<&str>, args: &[&str]) -> Outcome {
    finish(chorus(url, token, args))
}

fn spec_file(name: &str) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        "name: {name}\nmetric: {{name: val_loss, goal: minimize}}\nparameters:\n  lr: {{min: 0.001, max: 0.1}}\n\
         searcher: {{name: random}}\nmax_trials: 5\ntrial:\n  command: [python3, train.py]\n"
    )
    .unwrap();
    f
}

fn unused_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn submit_sends_token_and_deadline_and_prints_the_id() {
    let server = Server::start(&Arc::new(Script::default()), unused_addr());
    let spec = spec_file("demo");
    let path = spec.path().to_str().unwrap();

    let ok = run(
        &server.url(),
        Some("tok"),
        &["experiment", "submit", path, "--set", "max_trials=3"],
    );
    assert_eq!((ok.code, ok.stdout.as_str()), (0, "7\n"), "stderr: {}", ok.stderr);

    let denied = run(
        &server.url(),
        None,
        &["experiment", "submit", path, "--set", "max_trials=3"],
    );
    assert_eq!(denied.code, 1);
    assert_eq!(denied.stderr, "error: unauthenticated: missing or wrong bearer token\n");
    server.kill();
}

#[test]
fn spec_errors_exit_2_locally_and_from_the_server() {
    // Nothing listens here: a bad file must be caught before any connection is tried.
    let bad = spec_file("demo");
    std::fs::write(
        bad.path(),
        std::fs::read_to_string(bad.path())
            .unwrap()
            .replace("max: 0.1", "max: 0.0001"),
    )
    .unwrap();
    let local = run(
        "http://127.0.0.1:1",
        Some("tok"),
        &["experiment", "submit", bad.path().to_str().unwrap()],
    );
    assert_eq!(local.code, 2);
    assert!(
        local.stderr.starts_with("error: parameters.lr.min (line 4, column "),
        "{}",
        local.stderr
    );
    assert!(local.stderr.contains("greater than max"), "{}", local.stderr);

    let server = Server::start(&Arc::new(Script::default()), unused_addr());
    let rejected = spec_file("server-reject");
    let remote = run(
        &server.url(),
        Some("tok"),
        &["experiment", "submit", rejected.path().to_str().unwrap()],
    );
    assert_eq!(remote.code, 2);
    assert_eq!(
        remote.stderr,
        "error: parameters.lr.min (line 4, column 9): must be below the cluster limit\n"
    );
    server.kill();
}

#[test]
fn unknown_experiment_and_unreachable_coordinator_exit_1() {
    let server = Server::start(&Arc::new(Script::default()), unused_addr());
    let missing = run(&server.url(), Some("tok"), &["experiment", "describe", "42"]);
    assert_eq!(
        (missing.code, missing.stderr.as_str()),
        (1, "error: not found: experiment 42 does not exist\n")
    );
    server.kill();

    let down = run("http://127.0.0.1:1", Some("tok"), &["experiment", "list"]);
    assert_eq!(down.code, 1);
    assert!(
        down.stderr
            .starts_with("error: cannot reach coordinator at http://127.0.0.1:1: "),
        "{}",
        down.stderr
    );
}

/// `--wait` outlives a coordinator restart and exits by how the experiment ended.
fn wait_across_restart(end: pb::ExperimentState) -> Outcome {
    let script = Arc::new(Script {
        watches: vec![
            vec![
                experiment(7, pb::ExperimentState::Active, 0, 0),
                experiment(7, pb::ExperimentState::Active, 1, 0),
            ],
            vec![experiment(7, end, 2, 1)],
        ],
        ..Default::default()
    });
    let first = Server::start(&script, unused_addr());
    let addr = first.addr;
    let spec = spec_file("demo");
    let child = chorus(
        &first.url(),
        Some("tok"),
        &[
            "experiment",
            "submit",
            spec.path().to_str().unwrap(),
            "--set",
            "max_trials=3",
            "--wait",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while script.events_sent.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the CLI never watched");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill();
    // Down long enough for the CLI to fail at least one reconnect.
    std::thread::sleep(Duration::from_millis(700));
    let second = Server::start(&script, addr);
    let out = finish(child);
    second.kill();
    assert_eq!(script.watch_calls.load(Ordering::SeqCst), 2);
    out
}

#[test]
fn wait_survives_a_restart_and_exits_0_when_completed() {
    let out = wait_across_restart(pb::ExperimentState::Completed);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(
        out.stdout,
        "7\nexperiment 7 (demo) completed: 3 trials (2 completed, 1 failed, 0 killed), best val_loss=0.25 (trial 11)\n\
         summary of experiment 7:\n  \
         best trial  11  val_loss=0.25 (minimize)\n  \
         trials      0 completed, 0 stopped early by the searcher, 0 failed, 0 killed\n  \
         restarts    0\n  \
         run time    0.0s of trials\n  \
         compute     unknown (the experiment's resources could not be read)\n"
    );
    assert!(out.stderr.contains("reconnecting"), "{}", out.stderr);
    // Plain progress (stderr is a pipe here) shows the counts.
    assert!(
        out.stderr.contains("experiment 7: 0/3  running 0  done 0  failed 0"),
        "{}",
        out.stderr
    );
}

#[test]
fn wait_exits_1_when_the_experiment_failed() {
    let out = wait_across_restart(pb::ExperimentState::Failed);
    assert_eq!(out.code, 1, "stderr: {}", out.stderr);
    assert!(
        out.stdout.contains(
            "experiment 7 (demo) failed: 3 trials (2 completed, 1 failed, 0 killed), best val_loss=0.25 (trial 11)\n\
             summary of experiment 7:\n"
        ),
        "{}",
        out.stdout
    );
}

#[test]
fn logs_mark_attempts_on_stderr() {
    let server = Server::start(&Arc::new(Script::default()), unused_addr());
    let out = run(&server.url(), Some("tok"), &["trial", "logs", "5"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "one\ntwo\nthree\n");
    assert_eq!(out.stderr, "--- attempt 1 ---\n--- attempt 2 ---\n");
    server.kill();
}

#[test]
fn compare_marks_the_best_trial_across_experiments() {
    let t = |id, exp, best: Option<f64>| pb::Trial {
        id,
        experiment_id: exp,
        seq: id,
        state: pb::TrialState::Completed as i32,
        params_json: format!(r#"{{"lr": 0.{id}}}"#),
        best_value: best,
        run_seconds: 2.0,
        ..Default::default()
    };
    let script = Arc::new(Script {
        trials: vec![
            t(1, 1, Some(0.5)),
            t(2, 1, Some(0.3)),
            t(3, 2, Some(0.2)),
            t(4, 2, None),
        ],
        ..Default::default()
    });
    let server = Server::start(&script, unused_addr());
    let out = run(&server.url(), Some("tok"), &["compare", "1", "2", "--output", "csv"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "experiment,trial,params.lr,val_loss,status,run_seconds,best\n\
         1,2,0.2,0.3,completed,2,false\n\
         1,1,0.1,0.5,completed,2,false\n\
         2,3,0.3,0.2,completed,2,true\n\
         2,4,0.4,,completed,2,false\n"
    );
    let sorted = run(
        &server.url(),
        Some("tok"),
        &["trial", "list", "1", "--sort", "val_loss", "--limit", "1", "-o", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&sorted.stdout).unwrap();
    assert_eq!(v["trials"].as_array().unwrap().len(), 1);
    assert_eq!(v["trials"][0]["id"], 2);
    server.kill();
}
