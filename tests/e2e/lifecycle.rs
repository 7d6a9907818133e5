//! The experiment lifecycle through the real binaries: labels, notes and list filters,
//! archival, deletion (whole, and keeping the best trials' checkpoints) with file storage
//! checked on disk, continuation, and checkpoint listing and verified download.

use super::*;
use chorus_tests::ClusterConfig;
use std::path::Path;

/// `k` trials, each writing a checkpoint per step (loss = 10 * k - step, steps 1 to 3).
fn spec(name: &str, ks: &str, searcher: &str) -> String {
    format!(
        r#"
name: {name}
metric: {{name: loss, goal: minimize}}
parameters:
  k: {{values: [{ks}]}}
searcher: {searcher}
parallel_trials: 2
trial:
  command: [sh, -c, 'for s in 1 2 3; do echo "weights-${{params.k}}-$s" > "$CHORUS_CHECKPOINT_DIR/model.bin"; echo "chorus:metric {{\"step\": $s, \"loss\": $((10 * ${{params.k}} - s))}}"; sleep 0.1; done']
"#
    )
}

/// A trial that runs until it is killed.
const LONG: &str = r#"
name: long
metric: {name: loss, goal: minimize}
parameters:
  k: {values: [1]}
searcher: {name: grid}
trial:
  command: [sh, -c, 'echo "chorus:metric {\"step\": 1, \"loss\": 1}"; sleep 300']
"#;

fn run_ok(c: &TestCluster, args: &[&str]) -> String {
    let out = c.chorus(args);
    assert!(
        out.status.success(),
        "chorus {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs_tail()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit code and stderr of a command that must fail.
fn run_err(c: &TestCluster, args: &[&str]) -> (i32, String) {
    let out = c.chorus(args);
    assert!(!out.status.success(), "chorus {args:?} succeeded");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn listed(c: &TestCluster, extra: &[&str]) -> Vec<u64> {
    let mut args = vec!["experiment", "list", "--output", "json"];
    args.extend_from_slice(extra);
    c.chorus_json(&args)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect()
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn wait_running(c: &TestCluster, id: u64) {
    c.wait_until(Duration::from_secs(60), "a trial to run", |c| {
        Ok(experiment(c, id)?["counts"]["running"].as_u64().unwrap_or(0) > 0)
    })
    .unwrap();
}

#[test]
fn labels_notes_archival_and_list_filters() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        ..Default::default()
    })
    .unwrap();
    let a = submit(&c, &c.write("a.yaml", &spec("a", "1", "{name: grid}")));
    let b = submit(&c, &c.write("b.yaml", &spec("b", "2", "{name: grid}")));
    assert_eq!(wait_ended(&c, a, Duration::from_secs(60)), "completed");
    assert_eq!(wait_ended(&c, b, Duration::from_secs(60)), "completed");
    let (a_s, b_s) = (a.to_string(), b.to_string());

    run_ok(&c, &["experiment", "label", &a_s, "--add", "team=vision", "stage=prod"]);
    run_ok(&c, &["experiment", "label", &b_s, "--add", "team=audio"]);
    run_ok(
        &c,
        &["experiment", "note", &a_s, "baseline before the new augmentations"],
    );
    assert_eq!(listed(&c, &["--label", "team=vision"]), vec![a]);
    assert_eq!(
        listed(&c, &["--label", "team=vision", "--label", "stage=dev"]),
        Vec::<u64>::new()
    );
    assert_eq!(listed(&c, &[]), vec![a, b]);
    let e = experiment(&c, a).unwrap();
    assert_eq!(e["labels"], serde_json::json!({"team": "vision", "stage": "prod"}));
    assert_eq!(e["note"], "baseline before the new augmentations");
    let detail = run_ok(&c, &["experiment", "describe", &a_s]);
    assert!(detail.contains("stage=prod, team=vision"), "{detail}");
    assert!(detail.contains("baseline before the new augmentations"), "{detail}");
    run_ok(&c, &["experiment", "label", &a_s, "--remove", "stage"]);
    assert_eq!(
        experiment(&c, a).unwrap()["labels"],
        serde_json::json!({"team": "vision"})
    );

    // Out of bounds: INVALID_ARGUMENT naming the field, exit 2, nothing changed.
    let (code, err) = run_err(&c, &["experiment", "label", &a_s, "--add", "Team=x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("labels.Team"), "{err}");
    let long = "n".repeat(4097);
    let (code, err) = run_err(&c, &["experiment", "note", &a_s, "--note", &long]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("note"), "{err}");
    assert_eq!(
        experiment(&c, a).unwrap()["note"],
        "baseline before the new augmentations"
    );

    // Archival: only ended experiments, hidden unless asked for.
    let long_id = submit(&c, &c.write("long.yaml", LONG));
    wait_running(&c, long_id);
    let (code, err) = run_err(&c, &["experiment", "archive", &long_id.to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only an ended experiment can be archived"), "{err}");
    run_ok(&c, &["experiment", "kill", &long_id.to_string()]);
    run_ok(&c, &["experiment", "archive", &b_s]);
    assert_eq!(listed(&c, &[]), vec![a, long_id]);
    assert_eq!(listed(&c, &["--archived"]), vec![b]);
    assert_eq!(listed(&c, &["--all"]), vec![a, b, long_id]);
    assert_eq!(listed(&c, &["--archived", "--label", "team=audio"]), vec![b]);
    assert_eq!(experiment(&c, b).unwrap()["archived"], true);
    run_ok(&c, &["experiment", "unarchive", &b_s]);
    assert_eq!(listed(&c, &[]), vec![a, b, long_id]);
}

#[test]
fn delete_cleans_storage_keeps_the_best_on_request_and_spares_other_experiments() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        ..Default::default()
    })
    .unwrap();
    let a = submit(&c, &c.write("a.yaml", &spec("a", "1, 2, 3", "{name: grid}")));
    let b = submit(&c, &c.write("b.yaml", &spec("b", "1, 2", "{name: grid}")));
    assert_eq!(
        wait_ended(&c, a, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    assert_eq!(
        wait_ended(&c, b, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let (dir_a, dir_b) = (experiment_dir(&c, a), experiment_dir(&c, b));
    let files_b = files_under(&dir_b);
    assert!(!files_b.is_empty());
    let ts = trials(&c, a);
    let best = ts
        .iter()
        .find(|t| t["params"]["k"] == 1)
        .and_then(|t| t["id"].as_u64())
        .unwrap();
    for t in &ts {
        let ckpt = dir_a.join("trials").join(t["id"].to_string()).join("checkpoints");
        assert!(!files_under(&ckpt).is_empty(), "trial {} has checkpoints", t["id"]);
    }

    // A running experiment is refused, naming its state.
    let long_id = submit(&c, &c.write("long.yaml", LONG));
    wait_running(&c, long_id);
    let (code, err) = run_err(&c, &["experiment", "delete", &long_id.to_string(), "--yes"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("it is active"), "{err}");
    run_ok(&c, &["experiment", "kill", &long_id.to_string()]);

    // Without a terminal and without --yes: refused, exit 2, nothing deleted.
    let (code, err) = run_err(&c, &["experiment", "delete", &a.to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert!(!files_under(&dir_a).is_empty());

    // Keep the best: its checkpoints, every trial's records and the experiment stay.
    let v = c
        .chorus_json(&[
            "experiment",
            "delete",
            &a.to_string(),
            "--keep-best",
            "1",
            "--yes",
            "--output",
            "json",
        ])
        .unwrap();
    assert_eq!(v["kept_trials"], serde_json::json!([best]), "{v}");
    assert!(v["objects_deleted"].as_u64().unwrap() > 0);
    for t in &ts {
        let id = t["id"].as_u64().unwrap();
        let trial = dir_a.join("trials").join(id.to_string());
        let ckpts = files_under(&trial.join("checkpoints"));
        assert_eq!(!ckpts.is_empty(), id == best, "trial {id}: {ckpts:?}");
        assert!(
            !files_under(&trial.join("metrics")).is_empty(),
            "trial {id} keeps its metrics"
        );
    }
    assert!(dir_a.join("spec.yaml").exists());
    assert_eq!(experiment(&c, a).unwrap()["deleting"], false);
    // Repeating it is harmless.
    run_ok(
        &c,
        &["experiment", "delete", &a.to_string(), "--keep-best", "1", "--yes"],
    );

    // The whole experiment: its storage prefix is empty and the coordinator forgets it.
    run_ok(&c, &["experiment", "delete", &a.to_string(), "--yes"]);
    assert_eq!(files_under(&dir_a), Vec::<std::path::PathBuf>::new());
    let (code, err) = run_err(&c, &["experiment", "describe", &a.to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(listed(&c, &["--all"]), vec![b, long_id]);
    assert_eq!(
        files_under(&dir_b),
        files_b,
        "another experiment's records are untouched"
    );
    assert_eq!(trials(&c, b).len(), 2);
    // Gone for good: a restarted coordinator does not bring it back.
    let mut c = c;
    assert!(c.stop_coordinator(Duration::from_secs(20)));
    c.start_coordinator().unwrap();
    assert_eq!(listed(&c, &["--all"]), vec![b, long_id]);
}

#[test]
fn continue_warm_starts_and_checkpoints_download_verified() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        ..Default::default()
    })
    .unwrap();
    let a = submit(
        &c,
        &c.write(
            "a.yaml",
            &spec("a", "1, 2, 3, 4, 5, 6", "{name: random, seed: 3}\nmax_trials: 3"),
        ),
    );
    assert_eq!(
        wait_ended(&c, a, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let out = c.chorus(&["experiment", "continue", &a.to_string(), "--max-trials", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warm-started with 3 finished trial(s)"), "{stderr}");
    let next: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(
        wait_ended(&c, next, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    assert_eq!(experiment(&c, next).unwrap()["continued_from"], a);
    let detail = run_ok(&c, &["experiment", "describe", &next.to_string()]);
    assert!(
        detail.contains(&format!("continued from:     experiment {a}")),
        "{detail}"
    );
    // The random searcher does not try a point of the old experiment again.
    let old: Vec<serde_json::Value> = trials(&c, a).iter().map(|t| t["params"].clone()).collect();
    for t in trials(&c, next) {
        assert!(!old.contains(&t["params"]), "{} repeats an old point", t["params"]);
    }

    // Checkpoints: listed newest first, downloaded whole and verified.
    let trial = trials(&c, a)[0]["id"].as_u64().unwrap();
    let t = trial.to_string();
    let v = c.chorus_json(&["checkpoint", "list", &t, "--output", "json"]).unwrap();
    let cps = v["checkpoints"].as_array().unwrap();
    assert!(!cps.is_empty(), "{v}");
    let steps: Vec<i64> = cps.iter().map(|c| c["step"].as_i64().unwrap()).collect();
    assert_eq!(steps[0], 3, "{v}");
    assert!(steps.windows(2).all(|w| w[0] >= w[1]), "{steps:?}");
    let table = run_ok(&c, &["checkpoint", "list", &t]);
    assert!(table.contains("STEP") && table.contains("ATTEMPT"), "{table}");
    let dest = c.dir.path().join("ckpt");
    run_ok(&c, &["checkpoint", "download", &t, dest.to_str().unwrap()]);
    let k = trials(&c, a)[0]["params"]["k"].clone();
    assert_eq!(
        std::fs::read_to_string(dest.join("model.bin")).unwrap(),
        format!("weights-{k}-3\n")
    );
    // Into a directory that exists: refused.
    let (code, _) = run_err(&c, &["checkpoint", "download", &t, dest.to_str().unwrap()]);
    assert_eq!(code, 2);

    // A file that no longer matches its manifest: exit 1 naming it, and no directory left.
    let step3 = experiment_dir(&c, a).join("trials").join(&t).join("checkpoints");
    let model = files_under(&step3)
        .into_iter()
        .find(|p| p.ends_with("model.bin") && p.to_string_lossy().contains("000000000003"))
        .expect("step 3's file");
    // Same size, other bytes: only the checksum tells.
    std::fs::write(&model, "weights-9-3\n").unwrap();
    let bad = c.dir.path().join("bad");
    let (code, err) = run_err(
        &c,
        &["checkpoint", "download", &t, "--step", "3", bad.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("model.bin") && err.contains("crc32c"), "{err}");
    assert!(!bad.exists());
    assert!(!c.dir.path().join("bad.partial").exists());
    // By default the newest checkpoint that verifies is taken instead.
    run_ok(&c, &["checkpoint", "download", &t, bad.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(bad.join("model.bin")).unwrap(),
        format!("weights-{k}-2\n")
    );
}
