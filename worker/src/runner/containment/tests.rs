//! Containment against real processes, in both modes.

use super::*;

fn stat(ppid: i32, start: u64, zombie: bool) -> procfs::Stat {
    procfs::Stat {
        ppid,
        start,
        zombie,
        stopped: false,
    }
}

#[test]
fn stat_fields_are_counted_from_the_last_parenthesis() {
    let line = "4242 (we(ird) name) S 17 4242 4242 0 -1 4194560 120 0 0 0 0 0 0 0 20 0 1 0 98765 1 2 3";
    let s = procfs::parse_stat(line).unwrap();
    assert_eq!((s.ppid, s.start, s.zombie, s.stopped), (17, 98765, false, false));
    let z = procfs::parse_stat("7 (sh) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0").unwrap();
    assert!(z.zombie);
    assert!(procfs::parse_stat("garbage").is_none());
}

#[test]
fn members_are_the_known_the_tokened_and_their_descendants() {
    // 10 is the attempt's root; 11 its child; 12 a grandchild that left the session and was
    // re-parented to init; 13 its child; 20 an unrelated process; 21 carries the token but
    // lost its parent; 30 reuses a known pid with another start time.
    let snap: HashMap<i32, procfs::Stat> = [
        (10, stat(1, 100, false)),
        (11, stat(10, 101, false)),
        (12, stat(1, 102, false)),
        (13, stat(12, 103, true)),
        (20, stat(1, 50, false)),
        (21, stat(1, 104, false)),
        (22, stat(21, 105, false)),
        (30, stat(1, 999, false)),
    ]
    .into();
    let known: BTreeSet<ProcessId> = [
        ProcessId { pid: 10, start: 100 },
        ProcessId { pid: 12, start: 102 },
        ProcessId { pid: 30, start: 1 },
    ]
    .into();
    let found = members(&snap, &known, |pid| pid == 21);
    let pids: Vec<i32> = found.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![10, 11, 12, 13, 21, 22]);
    assert!(found.contains(&ProcessId { pid: 13, start: 103 }));
}

#[test]
fn environ_entries_match_whole() {
    let me = std::process::id() as i32;
    // This test process does not carry a token; PATH is there as a whole entry only.
    assert!(!procfs::environ_has(me, &token_entry("0123")));
    if let Some(path) = std::env::var_os("PATH") {
        let mut entry = b"PATH=".to_vec();
        entry.extend_from_slice(path.as_bytes());
        assert!(procfs::environ_has(me, &entry));
        assert!(!procfs::environ_has(me, &entry[..entry.len() - 1]));
    }
}

fn unique_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Starts `sh -c script` the way the runner does, inside `enclosure`, and waits for the
/// pids the script writes to `pids` (one per line, `n` of them).
async fn start(
    enclosure: &mut Enclosure,
    script: &str,
    pids_file: &Path,
    n: usize,
) -> (tokio::process::Child, Vec<i32>) {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .env("PIDS", pids_file)
        .env("GO", pids_file.with_extension("go"))
        .env("SCRUBBER", pids_file.with_extension("scrubber"))
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    enclosure.configure(&mut cmd).unwrap();
    let child = enclosure.spawn(&mut cmd).await.unwrap();
    let t = Instant::now();
    loop {
        let pids: Vec<i32> = std::fs::read_to_string(pids_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.len() >= n {
            return (child, pids);
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the script wrote {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: i32) -> bool {
    procfs::stat(pid).is_some_and(|s| !s.zombie)
}

async fn assert_all_dead(pids: &[i32]) {
    let t = Instant::now();
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still alive: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tree that leaves the process group and the session in every way a shell can: a
/// background child, a `setsid` grandchild, a double-forked daemon whose parent is gone,
/// and one of those that also scrubs its environment once `$GO` exists (see [`scrub`]).
const ESCAPING_TREE: &str = r#"
    sleep 1000 & echo $! >> "$PIDS"
    setsid sh -c 'echo $$ >> "$PIDS"; exec sleep 1000' &
    sh -c 'setsid sh -c "echo \$\$ >> \"$PIDS\"; exec sleep 1000" &' &
    sh -c 'setsid sh -c "echo \$\$ > \"$SCRUBBER\"; echo \$\$ >> \"$PIDS\"; while [ ! -e \"$GO\" ]; do sleep 0.02; done; exec env -i sleep 1000" &' &
    wait
"#;

/// Lets the scrubbing process of [`ESCAPING_TREE`] scrub its environment, and waits until it has.
/// In process-tracking mode, only once the tracker has listed every process: an orphan that
/// scrubs its environment before the tracker first sees it cannot be attributed (the module
/// docs say so), and on a loaded machine no fixed sleep guarantees a tick.
async fn scrub(e: &Enclosure, pids_file: &Path, pids: &[i32]) {
    let t = Instant::now();
    if e.cgroup.is_none() {
        loop {
            let listed: Vec<i32> = {
                let r = e.record.lock().unwrap();
                r.processes.iter().map(|p| p.pid).collect()
            };
            if pids.iter().all(|p| listed.contains(p)) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "listed {listed:?} of {pids:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    std::fs::write(pids_file.with_extension("go"), b"").unwrap();
    let last: i32 = std::fs::read_to_string(pids_file.with_extension("scrubber"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let needle = token_entry(&e.token);
    while procfs::environ_has(last, &needle) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{last} never scrubbed its environment"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn kills_the_whole_tree(mode: ContainmentMode) {
    let data = unique_dir();
    let c = Arc::new(Containment::new(mode, data.path()).unwrap());
    let mut e = c.enclose(1, 1, 0).await.unwrap();
    let pids_file = data.path().join("pids");
    let (mut child, pids) = start(&mut e, ESCAPING_TREE, &pids_file, 4).await;
    scrub(&e, &pids_file, &pids).await;
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
    // The polite stop ends the shell; everything it detached is left to `kill_all`.
    e.terminate();
    let _ = child.wait().await;
    e.root_reaped();
    let cgroup = e.cgroup.clone();
    e.kill_all().await.unwrap();
    assert_all_dead(&pids).await;
    assert_eq!(std::fs::read_dir(data.path().join(RECORDS_DIR)).unwrap().count(), 0);
    assert!(
        cgroup.is_none_or(|dir| !dir.exists()),
        "the attempt's cgroup is removed"
    );
}

#[tokio::test]
async fn process_tracking_kills_setsid_and_double_forked_descendants() {
    kills_the_whole_tree(ContainmentMode::Process).await;
}

#[tokio::test]
async fn a_cgroup_per_attempt_kills_setsid_and_double_forked_descendants() {
    let data = unique_dir();
    let c = Containment::new(ContainmentMode::Auto, data.path()).unwrap();
    if !c.uses_cgroups() {
        eprintln!("skipped: {}", c.describe());
        return;
    }
    kills_the_whole_tree(ContainmentMode::Cgroup).await;
}

/// A worker that died (its enclosures never killed) leaves records; the next start on the
/// data directory kills every process they lead to, setsid'd ones included.
async fn leftovers_are_killed_on_the_next_start(mode: ContainmentMode) {
    let data = unique_dir();
    let c = Arc::new(Containment::new(mode, data.path()).unwrap());
    let mut e = c.enclose(7, 2, 0).await.unwrap();
    let pids_file = data.path().join("pids");
    let (mut child, pids) = start(&mut e, ESCAPING_TREE, &pids_file, 4).await;
    // The tracker writes the record to disk under the lock `scrub` reads it by.
    scrub(&e, &pids_file, &pids).await;
    // As if the worker were SIGKILLed: nothing runs its cleanup, and the first process goes
    // as its parent-death signal would take it.
    if let Some(t) = e.tracker.take() {
        t.abort();
    }
    std::mem::forget(e);
    child.kill().await.unwrap();
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");

    let next = Containment::new(mode, data.path()).unwrap();
    assert_eq!(next.kill_leftovers().await.unwrap(), 1);
    assert_all_dead(&pids).await;
    assert_eq!(next.kill_leftovers().await.unwrap(), 0, "the record is gone");
}

#[tokio::test]
async fn process_tracking_leftovers_are_killed_on_the_next_start() {
    leftovers_are_killed_on_the_next_start(ContainmentMode::Process).await;
}

#[tokio::test]
async fn cgroup_leftovers_are_killed_on_the_next_start() {
    let data = unique_dir();
    if !Containment::new(ContainmentMode::Auto, data.path())
        .unwrap()
        .uses_cgroups()
    {
        eprintln!("skipped: no usable cgroup");
        return;
    }
    leftovers_are_killed_on_the_next_start(ContainmentMode::Cgroup).await;
}

#[test]
fn forced_process_mode_uses_no_cgroup() {
    let data = unique_dir();
    let c = Containment::new(ContainmentMode::Process, data.path()).unwrap();
    assert!(!c.uses_cgroups());
    assert!(c.describe().starts_with("process tracking"), "{}", c.describe());
}
