//! TLS over a real socket: a client that trusts the CA gets through, a rotated certificate is
//! what the next connection sees, and under mutual TLS a worker's certificate is its identity.

use crate::support::{Pki, Server, options};
use chorus_coordinator::{TlsOptions, Tokens};
use chorus_proto::pb;
use chorus_proto::pb::experiment_service_client::ExperimentServiceClient;
use chorus_proto::pb::worker_service_client::WorkerServiceClient;
use std::time::Duration;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

async fn list(channel: Channel) -> Result<(), tonic::Status> {
    ExperimentServiceClient::new(channel)
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .map(drop)
}

#[tokio::test]
async fn tls_serves_grpc_and_follows_rotated_certificates() {
    let pki = Pki::new("first");
    let (cert, key) = pki.issue(&["localhost"], false);
    let cert_path = pki.write("tls.crt", &cert);
    let key_path = pki.write("tls.key", &key);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.tls = Some(TlsOptions {
        reload_check: Duration::ZERO,
        ..TlsOptions::new(cert_path.clone(), key_path.clone())
    });
    let server = Server::start(opts).await;

    list(pki.connect(server.addr, None).await.unwrap()).await.unwrap();
    // Plain HTTP/2 gets no answer from a TLS listener.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(list(ch).await.is_err(), "clear text must not be served");
    }

    // cert-manager writes a new pair in place: the next connection sees it, no restart.
    let rotated = Pki::new("second");
    let (cert2, key2) = rotated.issue(&["localhost"], false);
    std::fs::write(&key_path, &key2).unwrap();
    std::fs::write(&cert_path, &cert2).unwrap();
    list(rotated.connect(server.addr, None).await.unwrap()).await.unwrap();
    let stale = pki.connect(server.addr, None).await;
    assert!(
        stale.is_err(),
        "a client trusting only the old CA no longer gets through"
    );

    // A broken new file is logged and the served certificate stays.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n").unwrap();
    list(rotated.connect(server.addr, None).await.unwrap()).await.unwrap();
    server.stop().await;
}

fn register(id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        worker_id: id.into(),
        capacity: Some(pb::Resources { cpus: 1, gpus: 0 }),
        address: "127.0.0.1:1".into(),
        instance: format!("{id}-uid"),
        ..Default::default()
    }
}

fn bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let v: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    req.metadata_mut().insert("authorization", v);
    req
}

#[tokio::test]
async fn mutual_tls_makes_the_certificate_the_worker_identity() {
    let pki = Pki::new("cluster");
    let (cert, key) = pki.issue(&["localhost"], false);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.tokens = Tokens {
        user: vec!["user-secret".into()],
        worker: vec!["worker-secret".into()],
    };
    opts.tls = Some(TlsOptions {
        client_ca: Some(pki.write("ca.crt", &pki.ca_pem())),
        ..TlsOptions::new(pki.write("tls.crt", &cert), pki.write("tls.key", &key))
    });
    let server = Server::start(opts).await;

    // A worker with a certificate for its pod name needs no token.
    let pod_a = pki.issue(&["pod-a"], true);
    let mut w = WorkerServiceClient::new(pki.connect(server.addr, Some(&pod_a)).await.unwrap());
    let epoch = w.register(register("pod-a")).await.unwrap().into_inner().epoch;
    w.heartbeat(pb::HeartbeatRequest {
        worker_id: "pod-a".into(),
        epoch,
        running: vec![],
        leaving: false,
    })
    .await
    .unwrap();
    // It acts under its own name only.
    let denied = w.register(register("pod-b")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{}", denied.message());
    assert!(
        denied.message().contains("pod-a") && denied.message().contains("pod-b"),
        "{}",
        denied.message()
    );
    // A certificate is no user identity: the experiment API still wants the user token.
    let as_user = list(pki.connect(server.addr, Some(&pod_a)).await.unwrap())
        .await
        .unwrap_err();
    assert_eq!(as_user.code(), Code::Unauthenticated);

    // Without a certificate: the token, as before; with neither, refused.
    let anonymous = pki.connect(server.addr, None).await.unwrap();
    let none = WorkerServiceClient::new(anonymous.clone())
        .register(register("pod-c"))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{}", none.message());
    WorkerServiceClient::new(anonymous.clone())
        .register(bearer(register("pod-c"), "worker-secret"))
        .await
        .unwrap();
    ExperimentServiceClient::new(anonymous)
        .list_experiments(bearer(pb::ListExperimentsRequest::default(), "user-secret"))
        .await
        .unwrap();

    // A certificate from another CA does not get through the handshake.
    let stranger = Pki::new("stranger").issue(&["pod-a"], true);
    let refused = match pki.connect(server.addr, Some(&stranger)).await {
        Err(_) => true,
        Ok(ch) => WorkerServiceClient::new(ch).register(register("pod-a")).await.is_err(),
    };
    assert!(refused, "a client certificate outside the CA is refused");
    server.stop().await;
}

/// Kubernetes gRPC probes speak neither TLS nor tokens: with TLS on, `--health-listen` serves
/// health alone in plain text, and nothing else.
#[tokio::test]
async fn a_plain_health_port_answers_probes_while_the_api_needs_tls() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let pki = Pki::new("health");
    let (cert, key) = pki.issue(&["localhost"], false);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.tls = Some(TlsOptions::new(pki.write("tls.crt", &cert), pki.write("tls.key", &key)));
    opts.tokens = Tokens {
        user: vec!["user-secret".into()],
        worker: vec!["worker-secret".into()],
    };
    let health_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    opts.health_listener = Some(health_addr);
    let server = Server::start(opts).await;

    let plain = tonic::transport::Endpoint::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("the health port speaks plain HTTP/2");
    for service in ["", "chorus.v1.ExperimentService", "chorus.v1.WorkerService"] {
        let status = HealthClient::new(plain.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health needs no token")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    // Health is all it serves: the API is not reachable around TLS and tokens.
    let err = list(plain).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    server.stop().await;
}
