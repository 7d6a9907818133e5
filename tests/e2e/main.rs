//! End-to-end tests: the real binaries on loopback, one module per behaviour.

mod auth;
mod builtin;
mod chaos;
mod compare;
mod containers;
mod containment;
mod crash;
mod data_parallel;
mod fencing;
mod kubernetes;
mod lifecycle;
mod metrics;
mod output;
mod paging;
mod plot;
mod s3;
mod search;
mod spec_errors;
mod storage_policy;
mod store;
mod sweep;
mod tensorboard;

use chorus_tests::TestCluster;
use serde_json::Value;
use std::time::Duration;

/// Writes `yaml` as `name` in the cluster's directory, submits it with `--wait`, asserts it
/// completed, and returns the experiment id (the cluster's first experiment).
pub fn submit_and_wait(c: &TestCluster, name: &str, yaml: &str) -> u64 {
    let spec = c.write(name, yaml);
    let out = c.chorus(&["experiment", "submit", spec.to_str().unwrap(), "--wait"]);
    assert!(
        out.status.success(),
        "submit --wait failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs_tail()
    );
    c.chorus_json(&["experiment", "list", "--output", "json"]).unwrap()[0]["id"]
        .as_u64()
        .unwrap()
}

/// Submits a spec file and returns the experiment id.
pub fn submit(c: &TestCluster, file: &std::path::Path) -> u64 {
    let v = c
        .chorus_json(&["experiment", "submit", file.to_str().unwrap(), "--output", "json"])
        .expect("submit");
    v["id"].as_u64().expect("experiment id")
}

pub fn experiment(c: &TestCluster, id: u64) -> anyhow::Result<Value> {
    let v = c.chorus_json(&["experiment", "describe", &id.to_string(), "--output", "json"])?;
    Ok(v["experiment"].clone())
}

pub fn trials(c: &TestCluster, id: u64) -> Vec<Value> {
    let v = c
        .chorus_json(&["trial", "list", &id.to_string(), "--output", "json"])
        .expect("trial list");
    v["trials"].as_array().cloned().unwrap_or_default()
}

/// The local directory of an experiment's records (its `file://` storage, then
/// `experiments/{id}`).
pub fn experiment_dir(c: &TestCluster, id: u64) -> std::path::PathBuf {
    let e = experiment(c, id).expect("describe");
    let uri = e["storage"].as_str().expect("storage URI");
    let loc = chorus_core::storage_policy::StorageLocation::parse(uri).expect("storage URI");
    assert_eq!(loc.scheme(), "file", "{uri}");
    let mut dir = std::path::PathBuf::from("/");
    dir.extend(loc.segments());
    dir.join("experiments").join(id.to_string())
}

/// Waits until the experiment has ended; returns its final state name.
pub fn wait_ended(c: &TestCluster, id: u64, timeout: Duration) -> String {
    let mut state = String::new();
    c.wait_until(timeout, &format!("experiment {id} to end"), |c| {
        state = experiment(c, id)?["state"].as_str().unwrap_or_default().to_string();
        Ok(matches!(state.as_str(), "completed" | "failed" | "killed"))
    })
    .expect("experiment ended");
    state
}

/// The experiment's object storage, as the coordinator reports it.
pub fn experiment_storage(c: &TestCluster, id: u64) -> chorus_core::storage::Storage {
    let uri = experiment(c, id).expect("describe")["storage"]
        .as_str()
        .expect("storage uri")
        .to_string();
    let uri = chorus_core::storage::StorageUri::parse(&uri).expect("a valid storage uri");
    let opts = chorus_core::storage::StorageOptions::default();
    chorus_core::storage::open(&uri, &opts).expect("open storage")
}

/// A trial's metric history in storage, each line parsed.
pub fn trial_history(c: &TestCluster, exp: u64, trial: u64) -> Vec<Value> {
    let storage = experiment_storage(c, exp);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(chorus_core::history::read_history(
        &storage,
        chorus_core::ExperimentId(exp),
        chorus_core::TrialId(trial),
        1_000_000,
    ))
    .expect("read the history")
    .iter()
    .map(|l| serde_json::from_str(l).expect("a JSON line"))
    .collect()
}
