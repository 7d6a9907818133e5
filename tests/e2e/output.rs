//! A trial that prints far more than anyone reads: the worker's memory stays bounded, no log
//! chunk outgrows a message, and `chorus trial logs` reads all of it back.

use super::*;
use chorus_tests::ClusterConfig;
use futures::TryStreamExt;

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_flood_of_output_is_stored_in_bounded_chunks_and_read_back_whole() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        slots: 1,
        ..Default::default()
    })
    .unwrap();
    let pid = c.worker_pid(0).unwrap();
    let before = peak_rss(pid);
    // 60,000 lines of 1,000 characters (60 MB) as fast as the pipe takes them.
    let spec = r#"
name: flood
metric: {name: loss, goal: minimize}
parameters:
  x: {value: 1}
searcher: {name: grid}
trial:
  command: [sh, -c, 'yes "$(printf %999s | tr " " x)" | head -n 60000; echo "chorus:metric {\"loss\": 1}"; echo flood-done']
"#;
    let exp = submit(&c, &c.write("flood.yaml", spec));
    assert_eq!(
        wait_ended(&c, exp, Duration::from_secs(180)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let grown = peak_rss(pid).saturating_sub(before);
    assert!(
        grown < 64 * 1024 * 1024,
        "the worker grew by {} MiB while the trial printed 60 MB",
        grown >> 20
    );

    let tid = trials(&c, exp)[0]["id"].as_u64().unwrap();
    let storage = experiment_storage(&c, exp);
    let prefix = storage.logs_prefix(chorus_core::ExperimentId(exp), chorus_core::TrialId(tid));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let chunks: Vec<object_store::ObjectMeta> = rt.block_on(storage.store.list(Some(&prefix)).try_collect()).unwrap();
    assert!(chunks.len() >= 50, "{} chunks", chunks.len());
    let largest = chunks.iter().map(|o| o.size).max().unwrap();
    assert!(largest <= 1024 * 1024 + 64 * 1024, "a chunk of {largest} bytes");

    let out = c.chorus(&["trial", "logs", &tid.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().filter(|l| l.len() == 999).count(), 60_000);
    assert!(text.contains("flood-done"));
}
