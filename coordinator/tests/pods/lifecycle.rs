//! Start, serve and stop as a pod sees them: one coordinator per data directory, health that
//! follows readiness and shutdown, the refusal to serve clear text off loopback,
//! `--check-config`, and a backup taken while serving that a new coordinator starts from.

use crate::support::{Pki, Server, binary, options, run_binary, spec};
use chorus_proto::pb;
use chorus_proto::pb::experiment_service_client::ExperimentServiceClient;
use std::io::BufRead;
use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn a_second_coordinator_on_the_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Server::start(options(&data)).await;

    let err = Server::try_start(options(&data))
        .await
        .err()
        .expect("refused")
        .to_string();
    let me = format!(
        "data directory {} is in use by pid {} on host",
        data.display(),
        std::process::id()
    );
    assert!(err.contains(&me), "{err}");

    // Another process: refused before it touches the store, exit code non-zero.
    let (code, _, stderr) = run_binary(binary().args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(&data));
    assert_ne!(code, 0);
    assert!(stderr.contains(&me), "{stderr}");
    first.stop().await;

    // Released with the coordinator: the next one starts.
    Server::start(options(&data)).await.stop().await;
}

#[tokio::test]
async fn health_is_serving_once_loaded_and_not_serving_from_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(options(dir.path())).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "chorus.v1.ExperimentService", "chorus.v1.WorkerService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    server.signal_stop();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a status change")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(30), server.task)
        .await
        .expect("drains and stops")
        .unwrap()
        .unwrap();
}

#[test]
fn a_coordinator_off_loopback_needs_tls_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (code, _, stderr) = run_binary(
        binary()
            .args([
                "--listen",
                "0.0.0.0:0",
                "--token",
                "u",
                "--worker-token",
                "w",
                "--data-dir",
            ])
            .arg(&data),
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("without TLS") && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert!(
        !data.join("LOCK").exists(),
        "refused before the data directory is touched"
    );

    // Told the network is private, it serves (and still wants its tokens).
    let mut child = binary()
        .args([
            "--listen",
            "0.0.0.0:0",
            "--token",
            "u",
            "--worker-token",
            "w",
            "--data-dir",
        ])
        .arg(&data)
        .env("CHORUS_INSECURE", "true")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(line.starts_with("chorus-coordinator listening on 0.0.0.0:"), "{line:?}");
}

#[test]
fn check_config_validates_without_starting() {
    let pki = Pki::new("check");
    let (cert, key) = pki.issue(&["localhost"], false);
    let (cert, key) = (pki.write("tls.crt", &cert), pki.write("tls.key", &key));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("not-yet");
    let good = || {
        let mut c = binary();
        c.arg("--check-config")
            .env("CHORUS_LISTEN", "0.0.0.0:7070")
            .env("CHORUS_DATA_DIR", &data)
            .env("CHORUS_TOKEN", "user-secret-value")
            .env("CHORUS_WORKER_TOKEN", "worker-secret-value")
            .env("CHORUS_TLS_CERT", &cert)
            .env("CHORUS_TLS_KEY", &key);
        c
    };
    let (code, out, err) = run_binary(&mut good());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tls: on\n") && out.contains("token: (set, redacted)\n"),
        "{out}"
    );
    assert!(!out.contains("secret-value"), "secrets are redacted: {out}");
    assert!(!data.exists(), "neither the lock nor the store is touched");

    let bad = |c: &mut std::process::Command, expect: &str| {
        let (code, out, err) = run_binary(c);
        assert_eq!(code, 2, "{expect}: {out}{err}");
        assert!(err.contains(expect), "wanted {expect:?}: {err}");
    };
    // A token of whitespace is no token.
    bad(good().env("CHORUS_TOKEN", "  \n"), "without authentication");
    bad(
        good().env_remove("CHORUS_TLS_CERT").env_remove("CHORUS_TLS_KEY"),
        "without TLS",
    );
    let broken = pki.write(
        "broken.crt",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    bad(good().env("CHORUS_TLS_CERT", &broken), &broken.display().to_string());
    bad(
        good().env("CHORUS_TLS_KEY", pki.dir.path().join("missing.key")),
        "missing.key",
    );
    bad(good().env("CHORUS_LISTEN", "no port here"), "is not an address");
    let file = pki.write("a-file", "");
    bad(good().env("CHORUS_DATA_DIR", file.join("sub")), "is not a directory");
}

#[tokio::test]
async fn a_backup_taken_while_serving_starts_a_new_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("live");
    let server = Server::start(options(&data)).await;
    let mut client = ExperimentServiceClient::new(server.channel().await);
    for name in ["alpha", "beta"] {
        client
            .submit_experiment(pb::SubmitExperimentRequest {
                spec_yaml: spec(name, 3),
                overrides: vec![],
            })
            .await
            .unwrap();
    }

    let dest = dir.path().join("backups").join("chorus-backup.db");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let (code, out, err) = {
        let mut c = binary();
        c.arg("backup").arg(&dest).arg("--data-dir").arg(&data);
        tokio::task::spawn_blocking(move || run_binary(&mut c)).await.unwrap()
    };
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 experiments") && out.contains("integrity ok"), "{out}");
    // Still serving, and nothing but the copy was written beside it.
    client
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["chorus-backup.db"]);

    let restored = dir.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::copy(&dest, restored.join("chorus.db")).unwrap();
    let copy = Server::start(options(&restored)).await;
    let mut names: Vec<String> = ExperimentServiceClient::new(copy.channel().await)
        .list_experiments(pb::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .experiments
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta"]);
    copy.stop().await;
    server.stop().await;

    // A store no coordinator serves is backed up the same way.
    let offline = dir.path().join("backups").join("offline.db");
    let (code, out, err) = run_binary(binary().arg("backup").arg(&offline).arg("--data-dir").arg(&data));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 experiments"), "{out}");
    // A missing store is an error that names it.
    let (code, _, err) = run_binary(
        binary()
            .arg("backup")
            .arg(dir.path().join("never.db"))
            .arg("--data-dir")
            .arg(dir.path().join("nothing-here")),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("no coordinator store at") && err.contains("nothing-here"),
        "{err}"
    );
}
