//! Split brain: a worker frozen past its lease has its trial restarted elsewhere; when it wakes
//! up, its stale attempt must not write over, delete or mix into what the new attempt wrote.

use super::*;
use chorus_core::{ExperimentId, TrialId, checkpoint};
use chorus_tests::ClusterConfig;
use nix::sys::signal::Signal;

/// One trial of 40 steps, each a metric line and a checkpoint holding the step.
const SPEC: &str = r#"
name: e2e-fencing
metric: {name: loss, goal: minimize}
parameters:
  x: {value: 1.0}
searcher: {name: grid}
max_restarts: 3
checkpoint: {keep_last: 1}
trial:
  command: [sh, -c, 'start=${CHORUS_RESTORED_STEP:-0}; for s in $(seq $((start + 1)) 40); do echo "step $s" > "$CHORUS_CHECKPOINT_DIR/state"; echo "chorus:metric {\"step\": $s, \"loss\": $((100 - s))}"; sleep 0.2; done']
"#;

#[test]
fn a_frozen_workers_stale_attempt_cannot_touch_the_new_attempts_records() {
    let mut c = TestCluster::start(ClusterConfig {
        workers: 1,
        slots: 1,
        lease_ttl: Duration::from_secs(2),
        ..Default::default()
    })
    .unwrap();
    let exp = submit(&c, &c.write("fencing.yaml", SPEC));
    c.wait_until(Duration::from_secs(30), "the trial to report a few steps", |c| {
        let t = trials(c, exp);
        Ok(t.first()
            .is_some_and(|t| t["attempt"].as_u64() == Some(1) && t["best_step"].as_i64().unwrap_or(0) >= 5))
    })
    .unwrap();
    // Freeze worker 0 past its lease; the trial moves to worker 1 as attempt 2.
    c.signal_worker(0, Signal::SIGSTOP);
    c.start_worker().unwrap();
    c.wait_until(Duration::from_secs(60), "attempt 2 to start", |c| {
        Ok(trials(c, exp).first().is_some_and(|t| t["attempt"].as_u64() >= Some(2)))
    })
    .unwrap();
    assert_eq!(
        wait_ended(&c, exp, Duration::from_secs(90)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let trial = trials(&c, exp)[0].clone();
    let tid = trial["id"].as_u64().unwrap();
    let final_attempt = trial["attempt"].as_u64().unwrap();

    let store = experiment_storage(&c, exp);
    let before = trial_history(&c, exp, tid);

    // The stale attempt wakes up with a pipe full of output and flush timers due.
    c.signal_worker(0, Signal::SIGCONT);
    std::thread::sleep(Duration::from_secs(5));
    let after = trial_history(&c, exp, tid);
    assert_eq!(before, after, "the stale attempt changed the trial's history");

    // The history is the final attempt's lineage: attempts in order, ending with its step 40.
    let attempts: Vec<u64> = after.iter().map(|l| l["attempt"].as_u64().unwrap()).collect();
    assert!(attempts.windows(2).all(|w| w[0] <= w[1]), "{attempts:?}");
    let last = after.last().unwrap();
    assert_eq!(
        (last["step"].as_i64(), last["attempt"].as_u64()),
        (Some(40), Some(final_attempt))
    );
    let final_steps: Vec<i64> = after
        .iter()
        .filter(|l| l["attempt"].as_u64() == Some(final_attempt))
        .map(|l| l["step"].as_i64().unwrap())
        .collect();
    assert!(final_steps.windows(2).all(|w| w[1] == w[0] + 1), "{final_steps:?}");

    // The newest checkpoint is the final attempt's step 40, whole.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prefix = store.checkpoints_prefix(ExperimentId(exp), TrialId(tid));
    let dest = c.dir.path().join("restored");
    let r = rt.block_on(checkpoint::restore_latest(&store, &prefix, &dest)).unwrap();
    assert_eq!(
        r.restored,
        Some(checkpoint::CheckpointRef::new(40, final_attempt as u32))
    );
    assert_eq!(std::fs::read_to_string(dest.join("state")).unwrap(), "step 40\n");
    // The stale attempt's own later checkpoints may exist, but never at a newer attempt's name.
    let all = rt.block_on(checkpoint::list(&store, &prefix)).unwrap();
    assert!(all.iter().all(|r| r.attempt <= final_attempt as u32), "{all:?}");
}
