//! `chorus health` against real grpc.health.v1 servers, plain and TLS: the exit code follows the
//! status, a TLS server is trusted through `--ca`, and one the system's roots do not know is
//! refused with a word on certificates.

use std::net::SocketAddr;
use std::process::{Command, Output};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

struct Pki {
    dir: tempfile::TempDir,
    cert: String,
    key: String,
}

/// A CA, written to `ca.pem`, and a server certificate for 127.0.0.1 it signs.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "chorus test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap()
        .pem();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    Pki {
        dir,
        cert,
        key: key.serialize_pem(),
    }
}

/// Serves grpc.health.v1 on 127.0.0.1 until the returned sender is dropped.
async fn serve(tls: Option<ServerTlsConfig>) -> (SocketAddr, HealthReporter, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    tokio::spawn(
        builder
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    (addr, reporter, stop)
}

/// Runs `chorus` off the runtime's threads, with none of the CHORUS_ variables of the
/// environment running the tests.
async fn chorus(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CHORUS_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(&args).output().unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_only_while_serving() {
    let (addr, reporter, _stop) = serve(None).await;
    let url = format!("http://{addr}");
    reporter
        .set_service_status("chorus.v1.WorkerService", ServingStatus::Serving)
        .await;

    let o = chorus(args(&["health", "--coordinator", &url])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "SERVING\n");

    reporter.set_service_status("", ServingStatus::NotServing).await;
    let o = chorus(args(&["health", "--coordinator", &url])).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stdout(&o), "NOT_SERVING\n");

    let o = chorus(args(&[
        "health",
        "--coordinator",
        &url,
        "--service",
        "chorus.v1.WorkerService",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // A service the server does not know is NOT_FOUND: not healthy.
    let o = chorus(args(&["health", "--coordinator", &url, "--service", "nope"])).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("error"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reaches_a_tls_server_through_its_ca() {
    // The test server asks for the process's default provider, which is ambiguous when any crate
    // of the build also turns on rustls' ring: name the one Chorus uses.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pki = pki();
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.cert, &pki.key));
    let (addr, _reporter, _stop) = serve(Some(tls)).await;
    let url = format!("https://{addr}");
    let ca = pki.dir.path().join("ca.pem");

    let o = chorus(args(&["health", "--coordinator", &url, "--ca", ca.to_str().unwrap()])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "SERVING\n");

    // The system's roots do not know the test CA.
    let o = chorus(args(&["health", "--coordinator", &url])).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
}
