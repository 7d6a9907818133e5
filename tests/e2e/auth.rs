//! Tokens: the right one works, a wrong one is UNAUTHENTICATED, the other role's is PERMISSION_DENIED.

use chorus_tests::{Auth, ClusterConfig, TestCluster};

#[test]
fn tokens_are_checked_per_role() {
    let auth = Auth {
        user: "user-secret".into(),
        worker: "worker-secret".into(),
    };
    // The workers register with their token, or the cluster would not start.
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        auth: Some(auth.clone()),
        ..Default::default()
    })
    .unwrap();

    let ok = c.chorus_with_token(&["experiment", "list"], Some(&auth.user));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    for (token, expect) in [
        (None, "unauthenticated"),
        (Some("wrong"), "unauthenticated"),
        (Some(auth.worker.as_str()), "permission denied"),
    ] {
        let out = c.chorus_with_token(&["experiment", "list"], token);
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert_eq!(out.status.code(), Some(1), "{token:?}: {stderr}");
        assert!(stderr.contains(expect), "{token:?}: expected {expect}: {stderr}");
    }
}

#[test]
fn coordinator_refuses_a_public_address_without_tokens() {
    let out = std::process::Command::new(chorus_tests::binary("chorus-coordinator"))
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .env_remove("CHORUS_TOKEN")
        .env_remove("CHORUS_WORKER_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without authentication"),
        "{out:?}"
    );
}

#[test]
fn a_worker_without_a_token_is_told_to_set_the_worker_token() {
    let c = TestCluster::start(ClusterConfig {
        workers: 0,
        auth: Some(Auth {
            user: "user-secret".into(),
            worker: "worker-secret".into(),
        }),
        ..Default::default()
    })
    .unwrap();
    for (token, expect) in [
        (None, "set CHORUS_WORKER_TOKEN"),
        (Some("wrong"), "refused the worker token (set with CHORUS_WORKER_TOKEN"),
    ] {
        let mut cmd = std::process::Command::new(chorus_tests::binary("chorus-worker"));
        cmd.args([
            "--coordinator",
            &c.url(),
            "--worker-id",
            "tokenless",
            "--gpus",
            "0",
            "--data-dir",
        ])
        .arg(c.dir.path().join("tokenless"))
        .env_remove("CHORUS_TOKEN")
        .env_remove("CHORUS_WORKER_TOKEN");
        if let Some(t) = token {
            cmd.env("CHORUS_WORKER_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{token:?}: {stderr}");
        assert!(stderr.contains(expect), "{token:?}: expected {expect:?}: {stderr}");
        // The user's variable is the wrong advice for a worker.
        assert!(!stderr.contains("set CHORUS_TOKEN"), "{token:?}: {stderr}");
    }
}
