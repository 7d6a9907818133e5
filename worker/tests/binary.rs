//! The real `chorus-worker` binary: `--check-config` as a person or a pod's init step runs it
//! (its exit code, what it prints, and that it touches nothing), and the exit code of a worker
//! that a newer registration of its id replaced.

use chorus_proto::pb::{
    self,
    worker_service_server::{WorkerService, WorkerServiceServer},
};
use std::path::Path;
use std::process::{Command, Output};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

/// Runs the binary with `args` and `env`, and none of the CHORUS_ variables of the environment
/// running the tests.
fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus-worker"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CHORUS_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_config_prints_the_resolved_settings_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = worker(
        &[
            "--check-config",
            "--coordinator",
            "127.0.0.1:7070",
            "--gpus",
            "0",
            "--slots",
            "3",
            "--label",
            "zone=a",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[
            ("CHORUS_WORKER_ID", "w-check"),
            ("CHORUS_WORKER_TOKEN", "very-secret-token"),
            ("CHORUS_CA", ""),
            ("CHORUS_HEALTH_LISTEN", "0.0.0.0:7071"),
            ("CHORUS_WORKER_METRICS_LISTEN", "0.0.0.0:9464"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} line in {stdout}"))
            .trim_start_matches(key)
            .trim()
            .to_string()
    };
    assert_eq!(line("coordinator"), "http://127.0.0.1:7070");
    assert_eq!(line("worker id"), "w-check");
    assert_eq!(line("slots"), "3");
    assert_eq!(line("gpus"), "none");
    assert_eq!(line("labels"), "zone=a");
    assert_eq!(line("token"), "set (redacted)");
    assert!(!stdout.contains("very-secret-token"));
    assert_eq!(line("advertise address"), "127.0.0.1 (routes to the coordinator)");
    assert_eq!(line("tls ca"), "none (plain http)");
    assert_eq!(line("health listen"), "0.0.0.0:7071");
    assert_eq!(line("metrics listen"), "http://0.0.0.0:9464/metrics");
    assert_eq!(line("gpu metrics"), "every 10s per attempt with GPUs");
    assert!(line("instance").starts_with("new, created at start in"), "{stdout}");
    assert!(line("data dir").ends_with("data"), "{stdout}");
    assert!(!data.exists(), "the data directory was not created, let alone locked");
}

#[test]
fn a_bad_setting_exits_2_with_a_precise_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--coordinator", "https://coord:7070", "--ca", "/nonexistent/ca.pem"],
            "--ca /nonexistent/ca.pem: cannot read it",
        ),
        (
            &["--coordinator", "http://coord:7070", "--advertise-address", "my-pod"],
            "--advertise-address \"my-pod\" is not an IP address",
        ),
        (&["--coordinator", "ftp://coord"], "must be an http:// or https:// URL"),
        (&["--worker-id", " "], "--worker-id must not be empty"),
        (
            &["--metrics-listen", "9464"],
            "--metrics-listen \"9464\" is not an address",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec![
            "--check-config",
            "--gpus",
            "0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = worker(&all, &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // The same checks stop a real start, before anything connects or takes the directory.
    let out = worker(
        &[
            "--coordinator",
            "https://coord:7070",
            "--tls-key",
            "/nonexistent/key.pem",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--tls-key needs --tls-cert"));
    assert!(!Path::new(&dir.path().join("worker.lock")).exists());
}

/// A coordinator that registers the worker and then answers its first heartbeat as a newer
/// registration of the same worker id would make the real one answer.
struct Replacing;

#[tonic::async_trait]
impl WorkerService for Replacing {
    async fn register(&self, _: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: 100,
            lease_ttl_ms: 1000,
            kill: vec![],
            epoch: 7,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        assert_eq!(req.get_ref().epoch, 7);
        Err(Status::aborted(
            "worker w-replaced: epoch 7 is fenced by a newer registration (epoch 8)",
        ))
    }

    type AssignmentsStream = UnboundedReceiverStream<Result<pb::WorkerCommand, Status>>;

    async fn assignments(
        &self,
        _: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Held open for the test's length: the stream ends only with the server.
        std::mem::forget(tx);
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn rendezvous(&self, _: Request<pb::RendezvousRequest>) -> Result<Response<pb::RendezvousResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn report_trial(
        &self,
        _: Request<pb::ReportTrialRequest>,
    ) -> Result<Response<pb::ReportTrialResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_worker_exits_3_and_says_why() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(Replacing))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let coordinator = format!("http://{addr}");
    let out = tokio::task::spawn_blocking(move || {
        worker(
            &[
                "--coordinator",
                &coordinator,
                "--worker-id",
                "w-replaced",
                "--gpus",
                "0",
                "--data-dir",
                &data,
            ],
            &[],
        )
    })
    .await
    .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("worker w-replaced was replaced by a newer registration"),
        "{stderr}"
    );
    // The instance it registered with stays for its next start.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("instance"))
            .unwrap()
            .trim()
            .len(),
        32
    );
}
