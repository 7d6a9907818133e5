//! `chorus search preview` runs searchers in simulation, without a coordinator.

use std::process::{Command, Output};

fn chorus(args: &[&str], spec: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spec.yaml");
    std::fs::write(&file, spec).unwrap();
    let mut all = vec!["search", "preview", file.to_str().unwrap()];
    all.extend_from_slice(args);
    Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(&all)
        // Nothing listens here: preview must not need a coordinator.
        .env("CHORUS_COORDINATOR", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

const SPEC: &str = "name: p\nmetric: {name: loss, goal: minimize}\n\
    parameters:\n  lr: {min: 0.0001, max: 0.1, distribution: log_uniform}\n  k: {values: [1, 2, 3]}\n\
    searcher: {name: hyperband, seed: 2, max_resource: 27}\nmax_trials: 16\nparallel_trials: 4\n\
    trial: {command: [x]}\n";

#[test]
fn preview_shows_what_a_search_would_create_and_stop() {
    let out = chorus(&["--output", "json"], SPEC);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let trials = v["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 16);
    let stopped = trials.iter().filter(|t| !t["stopped"].is_null()).count();
    assert!(stopped > 0 && stopped < 16, "{stopped} stopped");
    assert!(v["steps"].as_u64().unwrap() < 16 * 27, "early stopping saves steps");
    // The same file previews the same way.
    assert_eq!(chorus(&["--output", "json"], SPEC).stdout, out.stdout);
    let table = chorus(&["--trials", "5", "--steps", "9"], SPEC);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("5 trials") && text.contains("of 45 steps"), "{text}");
    // Hyperband's brackets from 1 to 27: the last one judges nothing before the end.
    assert!(text.contains("bracket 0 rungs at steps 1, 3, 9 then 27"), "{text}");
    assert!(text.contains("bracket 3 rungs: none, every trial runs to 27"), "{text}");
}

#[test]
fn a_bad_spec_is_a_usage_error() {
    let out = chorus(&[], &SPEC.replace("max_resource: 27", "grace_period: 0"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("searcher.max_resource"));
}

/// ASHA's promotion rule in the preview: some trials are paused at a rung and promoted later,
/// the rest end paused; `stop_once` stops instead and promotes nothing.
#[test]
fn preview_shows_pauses_and_promotions() {
    // Random draws: with the TPE sampler, later trials tend to beat the paused ones outright.
    let spec = SPEC
        .replace("name: hyperband,", "name: asha, sampler: random,")
        .replace("max_trials: 16", "max_trials: 27");
    let out = chorus(&["--output", "json"], &spec);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let trials = v["trials"].as_array().unwrap();
    let promoted = trials.iter().filter(|t| t["promotions"].as_u64().unwrap() > 0).count();
    let paused = trials
        .iter()
        .filter(|t| t["stopped"].as_str().is_some_and(|s| s.contains("paused at rung")))
        .count();
    assert!(promoted > 0 && paused > 0, "{promoted} promoted, {paused} left paused");
    let table = chorus(&[], &spec);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("promoted"), "{text}");

    let once = chorus(
        &["--output", "json"],
        &spec.replace("seed: 2,", "seed: 2, stop_once: true,"),
    );
    let v: serde_json::Value = serde_json::from_slice(&once.stdout).unwrap();
    let trials = v["trials"].as_array().unwrap();
    assert!(trials.iter().all(|t| t["promotions"] == 0));
    assert!(
        trials
            .iter()
            .any(|t| t["stopped"].as_str().is_some_and(|s| s.contains("only the best")))
    );
}

/// The preview shows how the budget splits by how far configurations ran (one row per rung
/// where successive halving judged them, and the full runs), summing to all steps spent, and
/// the rungs the settings give; a first rung under 5 % of max_resource is warned about on
/// stderr, the default one is not.
#[test]
fn preview_shows_where_the_budget_goes() {
    let spec = SPEC
        .replace("name: hyperband,", "name: asha,")
        .replace("max_resource: 27", "max_resource: 50, resource: epoch")
        .replace("max_trials: 16", "max_trials: 60");
    let out = chorus(&["--output", "json"], &spec);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rungs"], serde_json::json!([[3, 9, 27]]));
    assert_eq!(v["warnings"], serde_json::json!([]));
    let spend = v["spend"].as_array().unwrap();
    let ran: Vec<u64> = spend.iter().map(|s| s["ran"].as_u64().unwrap()).collect();
    assert!(ran.contains(&3) && ran.contains(&50), "{ran:?}");
    let sum = |k: &str| spend.iter().map(|s| s[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("trials"), 60);
    assert_eq!(sum("steps"), v["steps"].as_u64().unwrap());
    let share: f64 = spend.iter().map(|s| s["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9, "{share}");

    let table = chorus(&[], &spec);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("rungs at epochs 3, 9, 27 then 50 (the first at 6 % of max_resource)"),
        "{text}"
    );
    assert!(
        text.contains("judged after (epochs)") && text.contains("share of budget"),
        "{text}"
    );

    let tiny = chorus(&[], &spec.replace("name: asha,", "name: asha, grace_period: 1,"));
    assert!(tiny.status.success());
    let err = String::from_utf8_lossy(&tiny.stderr);
    assert!(
        err.contains("warning: searcher.grace_period 1 is 2.0 % of max_resource 50"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&tiny.stdout).contains("rungs at epochs 1, 3, 9, 27 then 50"));
}
