//! The coordinator's own store under stress: a full disk (and a restart on one), a searcher
//! state that cannot be read, and what the coordinator says before it serves.

use super::*;
use chorus_tests::{ClusterConfig, Tmpfs, binary};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// Two trials that run until killed, printing nothing (so they write nothing to storage).
const LONG: &str = r#"
name: e2e-long
metric: {name: loss, goal: minimize}
parameters:
  k: {values: [1, 2]}
searcher: {name: grid}
parallel_trials: 2
trial:
  command: [sh, -c, 'sleep 600']
"#;

const QUICK: &str = r#"
name: e2e-quick
metric: {name: loss, goal: minimize}
parameters:
  k: {values: [1]}
searcher: {name: grid}
trial:
  command: [sh, -c, 'echo "chorus:metric {\"loss\": ${params.k}}"']
"#;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the CLI and expects it to fail with exit code 1 and every one of `needles` in its error.
fn refused(c: &TestCluster, args: &[&str], needles: &[&str]) {
    let out = c.chorus(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "chorus {args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "chorus {args:?} should say {n:?}: {err}");
    }
}

/// A full disk under the coordinator's data directory: changes are refused with
/// RESOURCE_EXHAUSTED naming the store, nothing of them is kept, reads go on, the coordinator
/// stays up and recovers by itself once there is room; a restart on the full disk starts and
/// answers the same way, and nothing acknowledged is lost.
#[test]
fn a_full_disk_is_reported_survived_and_recovered_from() {
    let disk = match Tmpfs::mount("24m") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping a_full_disk_is_reported_survived_and_recovered_from: {e:#}");
            return;
        }
    };
    let data = disk.path().join("coordinator");
    let mut c = TestCluster::start(ClusterConfig {
        workers: 1,
        slots: 2,
        coordinator_dir: Some(data.clone()),
        ..Default::default()
    })
    .unwrap();
    let long = submit(&c, &c.write("long.yaml", LONG));
    let l = long.to_string();
    c.wait_until(Duration::from_secs(30), "both trials running", |c| {
        Ok(experiment(c, long)?["counts"]["running"] == 2)
    })
    .unwrap();
    let quick = c.write("quick.yaml", QUICK);
    let quick = quick.to_str().unwrap();
    let db = data.join("chorus.db").display().to_string();
    let storage = data.join("storage").display().to_string();

    let filler = disk.fill("filler").unwrap();
    assert!(disk.free_bytes() < 4096, "{} bytes still free", disk.free_bytes());
    refused(
        &c,
        &["experiment", "pause", &l],
        &["resource exhausted: disk full", &db, "the change was not made"],
    );
    // The spec cannot be written to the full storage either.
    refused(
        &c,
        &["experiment", "submit", quick],
        &["resource exhausted", &storage, "is full", "No space left on device"],
    );
    // Reads go on and show nothing of what was refused.
    let e = experiment(&c, long).unwrap();
    assert_eq!(
        (e["state"].as_str(), e["counts"]["running"].as_u64()),
        (Some("active"), Some(2)),
        "{e}"
    );
    assert_eq!(trials(&c, long).len(), 2);
    let listed = c.chorus_json(&["experiment", "list", "--output", "json"]).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(c.alive_workers().unwrap(), 1);
    // Several reconcile passes later, it is still serving.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.coordinator_exited(),
        None,
        "the coordinator exited:\n{}",
        c.logs_tail()
    );

    // Room again: it recovers by itself, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let paused = c.chorus_json(&["experiment", "pause", &l, "--output", "json"]).unwrap();
    assert_eq!(paused["state"], "paused", "{paused}");
    let q = submit(&c, std::path::Path::new(quick));
    assert_eq!(wait_ended(&c, q, Duration::from_secs(60)), "completed");
    c.chorus_json(&["experiment", "resume", &l, "--output", "json"])
        .unwrap();

    // A restart on the full disk starts, keeps everything acknowledged, and answers precisely.
    let filler = disk.fill("filler").unwrap();
    c.kill_coordinator();
    c.start_coordinator().unwrap();
    assert_eq!(experiment(&c, q).unwrap()["state"], "completed");
    assert_eq!(experiment(&c, long).unwrap()["state"], "active");
    refused(&c, &["experiment", "kill", &l], &["resource exhausted: disk full", &db]);
    assert_eq!(experiment(&c, long).unwrap()["state"], "active");
    std::fs::remove_file(&filler).unwrap();
    let killed = c.chorus_json(&["experiment", "kill", &l, "--output", "json"]).unwrap();
    assert_eq!(killed["state"], "killed", "{killed}");

    // Closed cleanly, then the disk fills: there is no room to open the store for writing. It
    // starts read-only, answers changes with "disk full", and writes again once there is room.
    let out = c.chorus(&["worker", "drain", "worker-0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.stop_worker(0);
    assert!(c.stop_coordinator(Duration::from_secs(10)), "a clean stop");
    let filler = disk.fill("filler").unwrap();
    c.start_coordinator().unwrap();
    assert_eq!(experiment(&c, long).unwrap()["state"], "killed");
    assert_eq!(experiment(&c, q).unwrap()["state"], "completed");
    refused(
        &c,
        &["worker", "drain", "worker-0", "--undo"],
        &["resource exhausted: disk full", &db],
    );
    refused(&c, &["experiment", "submit", quick], &["resource exhausted", "is full"]);
    std::fs::remove_file(&filler).unwrap();
    let out = c.chorus(&["worker", "drain", "worker-0", "--undo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    drop(c);
}

/// Runs `chorus-coordinator` with `args` until it exits (at most 15 s).
fn run_coordinator(args: &[&str]) -> Output {
    let mut child = Command::new(binary("chorus-coordinator"))
        .args(args)
        .env_remove("CHORUS_TOKEN")
        .env_remove("CHORUS_WORKER_TOKEN")
        .env_remove("CHORUS_STORAGE")
        .env_remove("CHORUS_ALLOWED_STORAGE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chorus-coordinator");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "chorus-coordinator {args:?} went on running; stdout: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `listening on` means serving: a coordinator that refuses its tokens or cannot read its
/// store exits with the reason and never prints it.
#[test]
fn listening_is_printed_only_by_a_coordinator_that_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let garbage = dir.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("chorus.db"), vec![0x5a; 8192]).unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--listen", "0.0.0.0:0", "--data-dir", data_arg], "refusing to listen"),
        // Empty tokens are no tokens.
        (
            &[
                "--listen",
                "0.0.0.0:0",
                "--data-dir",
                data_arg,
                "--token",
                "",
                "--worker-token",
                " ",
            ],
            "refusing to listen",
        ),
        (
            &["--listen", "127.0.0.1:0", "--data-dir", garbage.to_str().unwrap()],
            "chorus.db",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data_arg,
                "--storage",
                "memory://x",
            ],
            "for tests only",
        ),
    ];
    for (args, reason) in cases {
        let out = run_coordinator(args);
        let (stdout, err) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(!out.status.success(), "{args:?} started");
        assert!(stdout.is_empty(), "{args:?} printed {stdout:?}");
        assert!(err.contains(reason), "{args:?} should say {reason:?}: {err}");
    }
}

/// A grid whose saved state was damaged while the coordinator was down: the restarted
/// coordinator fails the experiment, saying why, and runs none of its points again.
#[test]
fn an_unreadable_grid_state_fails_the_experiment_and_reruns_nothing() {
    let mut c = TestCluster::start(ClusterConfig {
        workers: 1,
        slots: 1,
        ..Default::default()
    })
    .unwrap();
    let runs = c.dir.path().join("runs.txt");
    let spec = format!(
        r#"
name: e2e-grid-state
metric: {{name: loss, goal: minimize}}
parameters:
  a: {{values: [1, 2, 3, 4, 5, 6]}}
searcher: {{name: grid}}
parallel_trials: 1
trial:
  command: [sh, -c, 'echo "${{params.a}}" >> {runs}; sleep 0.4; echo "chorus:metric {{\"loss\": ${{params.a}}}}"']
"#,
        runs = runs.display()
    );
    let id = submit(&c, &c.write("grid.yaml", &spec));
    c.wait_until(Duration::from_secs(60), "two points done", |c| {
        Ok(experiment(c, id)?["counts"]["completed"].as_u64().unwrap_or(0) >= 2)
    })
    .unwrap();
    c.kill_coordinator();
    let conn = rusqlite::Connection::open(c.coordinator_dir().join("chorus.db")).unwrap();
    let damaged = conn
        .execute(
            "UPDATE searcher_snapshots SET state = substr(state, 1, length(state) - 1) WHERE experiment_id = ?1",
            [id as i64],
        )
        .unwrap();
    assert_eq!(damaged, 1);
    drop(conn);
    c.start_coordinator().unwrap();

    let e = experiment(&c, id).unwrap();
    assert_eq!(e["state"], "failed", "{e}");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the saved state of the grid searcher cannot be read"),
        "{message}"
    );
    let created = trials(&c, id).len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(trials(&c, id).len(), created, "no trial created after the restart");
    let mut ran: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let all = ran.len();
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), all, "a grid point ran twice: {ran:?}");
    assert!(all <= created, "{all} runs of {created} trials");
}
