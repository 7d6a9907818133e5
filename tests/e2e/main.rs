//! End-to-end tests: the real binaries on loopback, one module per behaviour.

mod auth;
mod builtin;
mod chaos;
mod crash;
mod data_parallel;
mod fencing;
mod s3;
mod search;
mod spec_errors;
mod sweep;

use chorus_tests::TestCluster;
use serde_json::Value;
use std::time::Duration;

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
