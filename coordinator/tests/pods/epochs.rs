//! Registration epochs over real gRPC: a second instance is refused, the same instance takes
//! over, and the fenced registration's stream and calls end with ABORTED.

use crate::support::{Server, options};
use chorus_proto::pb;
use chorus_proto::pb::worker_service_client::WorkerServiceClient;
use std::time::Duration;
use tonic::Code;

fn register(id: &str, instance: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        worker_id: id.into(),
        capacity: Some(pb::Resources { cpus: 1, gpus: 0 }),
        address: "127.0.0.1:1".into(),
        instance: instance.into(),
        ..Default::default()
    }
}

fn heartbeat(id: &str, epoch: u64) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        worker_id: id.into(),
        epoch,
        running: vec![],
        leaving: false,
    }
}

#[tokio::test]
async fn a_newer_registration_fences_the_older_one_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(options(dir.path())).await;
    let mut c = WorkerServiceClient::new(server.channel().await);

    let e1 = c.register(register("pod-w", "uid-1")).await.unwrap().into_inner().epoch;
    assert!(e1 > 0);
    let mut old = c
        .assignments(pb::AssignmentsRequest {
            worker_id: "pod-w".into(),
            epoch: e1,
        })
        .await
        .unwrap()
        .into_inner();

    // A second pod given the same id is refused and changes nothing.
    let refused = c.register(register("pod-w", "uid-2")).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{}", refused.message());
    assert!(refused.message().contains("pod-w"), "{}", refused.message());
    c.heartbeat(heartbeat("pod-w", e1)).await.unwrap();

    // The same instance restarted takes over at once.
    let e2 = c.register(register("pod-w", "uid-1")).await.unwrap().into_inner().epoch;
    assert!(e2 > e1);
    let ended = tokio::time::timeout(Duration::from_secs(10), old.message())
        .await
        .expect("the fenced stream ends")
        .expect_err("with a status");
    assert_eq!(ended.code(), Code::Aborted, "{}", ended.message());
    assert!(
        ended
            .message()
            .contains(&format!("worker pod-w epoch {e1} is fenced: epoch {e2} registered at")),
        "{}",
        ended.message()
    );
    let fenced = c.heartbeat(heartbeat("pod-w", e1)).await.unwrap_err();
    assert_eq!(fenced.code(), Code::Aborted);
    let old_client = c.heartbeat(heartbeat("pod-w", 0)).await.unwrap_err();
    assert_eq!(old_client.code(), Code::Aborted, "{}", old_client.message());
    let stream = c
        .assignments(pb::AssignmentsRequest {
            worker_id: "pod-w".into(),
            epoch: e1,
        })
        .await
        .unwrap_err();
    assert_eq!(stream.code(), Code::Aborted);
    c.heartbeat(heartbeat("pod-w", e2)).await.unwrap();
    server.stop().await;
}
