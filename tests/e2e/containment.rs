//! No process of a trial outlives its attempt or its worker, however it detaches (a background
//! child, `setsid`, a double fork), in both containment modes; and a trial does not see the
//! worker's secrets.

use super::*;
use chorus_tests::ClusterConfig;

/// The worker's containment, as `--containment` names it; `None` lets the worker choose.
fn cluster(containment: Option<&str>, workers: usize) -> TestCluster {
    let env = containment
        .map(|m| vec![("CHORUS_WORKER_CONTAINMENT".to_string(), m.to_string())])
        .unwrap_or_default();
    let c = TestCluster::start(ClusterConfig {
        workers,
        lease_ttl: Duration::from_secs(2),
        env,
        ..Default::default()
    })
    .unwrap();
    if containment == Some("process") {
        let log = std::fs::read_to_string(c.dir.path().join("logs/worker-0.log")).unwrap();
        assert!(log.contains("process tracking"), "the fallback is not in use:\n{log}");
    }
    c
}

/// A trial that detaches processes in every way a shell can, each named by a marker in its
/// command line: `chorus-mark-NONCE-aATTEMPT-KIND` (and the plain `sleep` as `9NONCEATTEMPT`).
/// The two loops keep appending to `ticks`, as the leaked processes of the report did.
fn escaping_trial(c: &TestCluster, nonce: u32) -> std::path::PathBuf {
    let ticks = c.dir.path().join("ticks");
    let script = c.write(
        "escape.sh",
        &format!(
            r#"mark="chorus-mark-{nonce}-a$CHORUS_ATTEMPT"
sleep 9{nonce}$CHORUS_ATTEMPT &
sh -c 'while :; do echo "$0" >> "$1"; sleep 0.1; done' "$mark-loop" "{ticks}" &
setsid sh -c 'while :; do echo "$0" >> "$1"; sleep 0.1; done' "$mark-setsid" "{ticks}" &
sh -c 'setsid sh -c "while :; do sleep 0.1; done" "$0" &' "$mark-daemon" &
echo "chorus:metric {{\"step\": 1, \"loss\": 1}}"
wait
"#,
            ticks = ticks.display()
        ),
    );
    c.write(
        "escape.yaml",
        &format!(
            r#"
name: e2e-escape
metric: {{name: loss, goal: minimize}}
parameters:
  x: {{value: 1}}
searcher: {{name: grid}}
max_restarts: 3
trial:
  command: [sh, {}]
"#,
            script.display()
        ),
    )
}

/// Live (not zombie) processes of attempt `attempt`, with their command lines.
fn attempt_processes(nonce: u32, attempt: u32) -> Vec<(i32, String)> {
    let marks = [
        format!("chorus-mark-{nonce}-a{attempt}-"),
        format!("sleep 9{nonce}{attempt}"),
    ];
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("");
        if matches!(state, "Z" | "X") {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if marks.iter().any(|m| cmdline.contains(m.as_str())) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Waits until every kind of process of the attempt runs.
fn wait_all_detached(c: &TestCluster, nonce: u32, attempt: u32) {
    c.wait_until(
        Duration::from_secs(60),
        &format!("attempt {attempt}'s detached processes"),
        |_| {
            let ps = attempt_processes(nonce, attempt);
            Ok(["-loop", "-setsid", "-daemon", &format!("sleep 9{nonce}")]
                .iter()
                .all(|kind| ps.iter().any(|(_, cmd)| cmd.contains(kind))))
        },
    )
    .unwrap();
}

fn assert_none_left(nonce: u32, attempt: u32, within: Duration, what: &str) {
    let start = std::time::Instant::now();
    loop {
        let left = attempt_processes(nonce, attempt);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{what}: processes of attempt {attempt} still run: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Six digits that tell this test's processes from any other's.
fn nonce() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    100_000 + (t ^ std::process::id().wrapping_mul(2_654_435_761)) % 900_000
}

/// The worker's guardian: its child named `chorus-guardian`.
fn guardian_of(worker: u32) -> Option<i32> {
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (comm == "chorus-guardian" && ppid == worker).then_some(pid)
    })
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// The report's case: SIGKILL of the worker alone. Its guardian kills the trial's detached
/// processes at once, with no restart.
fn a_sigkilled_worker_takes_its_trials_processes_along(containment: Option<&str>) {
    let mut c = cluster(containment, 1);
    let nonce = nonce();
    submit(&c, &escaping_trial(&c, nonce));
    wait_all_detached(&c, nonce, 1);
    c.kill_worker(0);
    assert_none_left(nonce, 1, Duration::from_secs(10), "after the worker's SIGKILL");
}

#[test]
fn a_sigkilled_worker_takes_its_trials_processes_along_with_cgroups_where_possible() {
    a_sigkilled_worker_takes_its_trials_processes_along(None);
}

#[test]
fn a_sigkilled_worker_takes_its_trials_processes_along_with_process_tracking() {
    a_sigkilled_worker_takes_its_trials_processes_along(Some("process"));
}

/// SIGKILL of the worker and of its guardian: the restarted worker (same id, same data
/// directory) kills what attempt 1 left before it registers, so attempt 2 runs alone.
fn worker_restart_kills_what_a_killed_worker_left(containment: Option<&str>) {
    let mut c = cluster(containment, 1);
    let nonce = nonce();
    let id = submit(&c, &escaping_trial(&c, nonce));
    wait_all_detached(&c, nonce, 1);

    let guardian = guardian_of(c.worker_pid(0).unwrap()).expect("the worker's guardian");
    sigkill(guardian);
    c.kill_worker(0);
    std::thread::sleep(Duration::from_millis(300));
    let left = attempt_processes(nonce, 1);
    assert!(
        left.len() >= 3,
        "the detached processes outlive a worker killed with its guardian: {left:?}"
    );

    c.restart_worker(0).unwrap();
    // The trial comes back to the restarted worker (the only one) as attempt 2.
    c.wait_until(Duration::from_secs(60), "attempt 2 to run", |_| {
        Ok(!attempt_processes(nonce, 2).is_empty())
    })
    .unwrap();
    assert_none_left(nonce, 1, Duration::ZERO, "once attempt 2 runs");
    wait_all_detached(&c, nonce, 2);
    assert_none_left(nonce, 1, Duration::ZERO, "while attempt 2 runs");
    let t = &trials(&c, id)[0];
    assert_eq!(t["attempt"], 2, "{t}");

    // Attempt 1 stopped writing for good.
    let ticks = c.dir.path().join("ticks");
    let count = |a: u32| {
        std::fs::read_to_string(&ticks)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("chorus-mark-{nonce}-a{a}-")))
            .count()
    };
    let before = count(1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(1), before, "attempt 1 still writes");
    assert!(count(2) > 0);

    let out = c.chorus(&["experiment", "kill", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_ended(&c, id, Duration::from_secs(30));
    assert_none_left(nonce, 2, Duration::from_secs(10), "after the kill");
}

#[test]
fn worker_restart_kills_what_a_killed_worker_left_with_cgroups_where_possible() {
    worker_restart_kills_what_a_killed_worker_left(None);
}

#[test]
fn worker_restart_kills_what_a_killed_worker_left_with_process_tracking() {
    worker_restart_kills_what_a_killed_worker_left(Some("process"));
}

fn killing_an_experiment_kills_detached_descendants(containment: Option<&str>) {
    let c = cluster(containment, 1);
    let nonce = nonce();
    let id = submit(&c, &escaping_trial(&c, nonce));
    wait_all_detached(&c, nonce, 1);
    let out = c.chorus(&["experiment", "kill", &id.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(wait_ended(&c, id, Duration::from_secs(30)), "killed");
    assert_none_left(nonce, 1, Duration::from_secs(10), "after the kill");
}

#[test]
fn killing_an_experiment_kills_detached_descendants_with_cgroups_where_possible() {
    killing_an_experiment_kills_detached_descendants(None);
}

#[test]
fn killing_an_experiment_kills_detached_descendants_with_process_tracking() {
    killing_an_experiment_kills_detached_descendants(Some("process"));
}

#[test]
fn a_trial_does_not_see_the_workers_secrets() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        auth: Some(chorus_tests::Auth {
            user: "user-secret-1".into(),
            worker: "worker-secret-2".into(),
        }),
        env: vec![
            ("AWS_SECRET_ACCESS_KEY".into(), "aws-secret-3".into()),
            ("AWS_ACCESS_KEY_ID".into(), "aws-key-4".into()),
            ("LC_ALL".into(), "C".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    let spec = c.write(
        "env.yaml",
        r#"
name: e2e-env
metric: {name: loss, goal: minimize}
parameters:
  x: {value: 1}
searcher: {name: grid}
trial:
  command: [sh, -c, 'env; echo "chorus:metric {\"loss\": 1}"']
  env: {OWN: "from-the-spec"}
"#,
    );
    let id = submit(&c, &spec);
    assert_eq!(wait_ended(&c, id, Duration::from_secs(60)), "completed");
    let trial = trials(&c, id)[0]["id"].to_string();
    let out = c.chorus(&["trial", "logs", &trial]);
    let env = String::from_utf8_lossy(&out.stdout);
    for secret in [
        "secret-1",
        "secret-2",
        "secret-3",
        "aws-key-4",
        "CHORUS_WORKER_TOKEN",
        "AWS_",
    ] {
        assert!(!env.contains(secret), "the trial saw {secret}:\n{env}");
    }
    for expected in [
        "PATH=",
        "LC_ALL=C",
        "OWN=from-the-spec",
        "CHORUS_TRIAL_ID=",
        "CHORUS_ATTEMPT_TOKEN=",
    ] {
        assert!(env.contains(expected), "the trial lacks {expected}:\n{env}");
    }
}
