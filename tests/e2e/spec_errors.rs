//! Bad specs give exit code 2, name the field, and store nothing.

use super::*;
use chorus_tests::ClusterConfig;

const GOOD: &str = r#"
name: e2e-spec
metric: {name: loss, goal: minimize}
parameters:
  lr: {min: 0.001, max: 0.1}
searcher: {name: random}
max_trials: 2
trial:
  command: [sh, -c, 'echo "chorus:metric {\"loss\": ${params.lr}}"']
"#;

fn assert_rejected(c: &TestCluster, name: &str, yaml: &str, field: &str) {
    let file = c.write(name, yaml);
    for cmd in ["submit", "validate"] {
        let out = c.chorus(&["experiment", cmd, file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd} {name}: {stderr}");
        assert!(
            stderr.contains(field),
            "{cmd} {name}: stderr should name {field}: {stderr}"
        );
    }
}

#[test]
fn bad_specs_exit_2_and_store_nothing() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        ..Default::default()
    })
    .unwrap();
    assert_rejected(&c, "bad-yaml.yaml", "name: [unclosed\nmetric: {name: loss\n", "line");
    assert_rejected(
        &c,
        "unknown.yaml",
        &GOOD.replace("max_trials: 2", "max_trails: 2"),
        "max_trails",
    );
    assert_rejected(
        &c,
        "range.yaml",
        &GOOD.replace("min: 0.001, max: 0.1", "min: 0.5, max: 0.1"),
        "parameters.lr.min",
    );
    // An override that breaks the spec is caught the same way.
    let good = c.write("good.yaml", GOOD);
    let out = c.chorus(&[
        "experiment",
        "submit",
        good.to_str().unwrap(),
        "--set",
        "parallel_trials=0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parallel_trials"));

    let listed = c.chorus_json(&["experiment", "list", "--output", "json"]).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "nothing stored: {listed}");
    let storage = c.coordinator_dir().join("storage");
    let stored = std::fs::read_dir(&storage).map_or(0, |d| d.count());
    assert_eq!(stored, 0, "no records in {}", storage.display());

    // The server validates too (for clients that skip local validation), with the field named.
    let bad = c.write("remote.yaml", &GOOD.replace("max_trials: 2", "max_trails: 2"));
    let out = c.chorus(&["experiment", "validate", "--remote", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_trails"));

    // A good one still goes through afterwards.
    let id = submit(&c, &good);
    assert_eq!(wait_ended(&c, id, Duration::from_secs(60)), "completed");
}

/// Runs the CLI; returns its exit code and stderr.
fn run(c: &TestCluster, args: &[&str]) -> (Option<i32>, String) {
    let out = c.chorus(args);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn refused(c: &TestCluster, args: &[&str], wants: &[&str]) {
    let started = std::time::Instant::now();
    let (code, stderr) = run(c, args);
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
    for want in wants {
        assert!(
            stderr.contains(want),
            "{args:?}: stderr should contain {want:?}: {stderr}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{args:?} took {:?}",
        started.elapsed()
    );
}

#[test]
fn unbounded_inputs_are_refused_with_exit_2_and_the_coordinator_keeps_serving() {
    // A coordinator allowing 8 trials at once (set through its environment, as in a deployment).
    let c = TestCluster::start(ClusterConfig {
        workers: 0,
        env: vec![("CHORUS_MAX_PARALLEL_TRIALS".into(), "8".into())],
        ..Default::default()
    })
    .unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();

    // 50 MB: once validated for 33 s and then refused by the transport (exit 1).
    let big = c.dir.path().join("big.yaml");
    std::fs::write(&big, format!("{GOOD}description: '{}'\n", "x".repeat(50 << 20))).unwrap();
    let size = format!(
        "the experiment file is {} bytes",
        std::fs::metadata(&big).unwrap().len()
    );
    for cmd in ["submit", "validate"] {
        refused(
            &c,
            &["experiment", cmd, &path(&big)],
            &[&size, "the limit is 1048576 bytes (1 MiB)"],
        );
    }

    // Not UTF-8: once exit 1; now exit 2 with where the byte is.
    let latin1 = c.dir.path().join("latin1.yaml");
    // "café" as Latin-1 writes it.
    let text = GOOD.replace("name: e2e-spec", "name: caf\u{0}");
    let bytes: Vec<u8> = text.bytes().map(|b| if b == 0 { 0xE9 } else { b }).collect();
    std::fs::write(&latin1, bytes).unwrap();
    refused(
        &c,
        &["experiment", "submit", &path(&latin1)],
        &["(line 2, column 10)", "not UTF-8", "0xE9"],
    );

    // A duplicate key: once at line 1, column 1.
    let dup = c.write(
        "dup.yaml",
        &GOOD.replace("max_trials: 2\n", "max_trials: 2\nmax_trials: 3\n"),
    );
    refused(
        &c,
        &["experiment", "submit", &path(&dup)],
        &[
            "max_trials (line 8, column 1): `max_trials` is given twice",
            "first at line 7, column 1",
        ],
    );

    // NaN: once stored as null, after which the coordinator could not load its store.
    let nan = c.write("nan.yaml", &GOOD.replace("{min: 0.001, max: 0.1}", "{value: .nan}"));
    refused(
        &c,
        &["experiment", "submit", &path(&nan)],
        &["parameters.lr.value (line 5, column 15)", "NaN"],
    );

    // Ten parameters of 1,000 values: once 18446744073709551615 trials.
    let mut grid =
        String::from("name: huge-grid\nmetric: {name: loss, goal: minimize}\nsearcher: {name: grid}\nparameters:\n");
    for i in 0..10 {
        grid.push_str(&format!("  p{i}: {{min: 1, max: 1000}}\n"));
    }
    grid.push_str("trial: {command: [sh, -c, 'true']}\n");
    let grid = c.write("grid.yaml", &grid);
    refused(
        &c,
        &["experiment", "validate", "--remote", &path(&grid)],
        &[
            "parameters (line 4, column 1): the grid has 1000000000000000000000000000000 points",
            "limited to 10000000",
        ],
    );

    // A condition parent over 10^15 integers: once allocated whole by ValidateExperiment.
    let cond = c.write(
        "cond.yaml",
        &GOOD.replace(
            "  lr: {min: 0.001, max: 0.1}\n",
            "  lr: {min: 0.001, max: 0.1}\n  big: {min: 0, max: 1000000000000000}\n  m: {values: [1, 2], when: {big: 7}}\n",
        ),
    );
    let started = std::time::Instant::now();
    let (code, stderr) = run(&c, &["experiment", "validate", "--remote", &path(&cond)]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // Budgets past the coordinator's limits: the CLI knows no limit, the coordinator refuses.
    let wide = c.write("wide.yaml", &format!("{GOOD}parallel_trials: 4000000000\n"));
    assert_eq!(run(&c, &["experiment", "validate", &path(&wide)]).0, Some(0));
    refused(
        &c,
        &["experiment", "submit", &path(&wide)],
        &[
            "parallel_trials (line 10, column 1): 4000000000 is above this coordinator's limit of 8 (--max-parallel-trials)",
        ],
    );
    let nine = c.write("nine.yaml", &format!("{GOOD}parallel_trials: 9\n"));
    refused(&c, &["experiment", "submit", &path(&nine)], &["limit of 8"]);
    let good = c.write("good.yaml", GOOD);
    let id = submit(&c, &good).to_string();
    refused(
        &c,
        &["experiment", "update", &id, "--parallel-trials", "4000000000"],
        &["parallel_trials: 4000000000 is above this coordinator's limit of 8"],
    );
    refused(
        &c,
        &["experiment", "update", &id, "--max-trials", "1000000"],
        &["limit of 100000 trials per experiment (--max-trials-per-experiment)"],
    );
    let updated = c
        .chorus_json(&[
            "experiment",
            "update",
            &id,
            "--parallel-trials",
            "8",
            "--output",
            "json",
        ])
        .unwrap();
    assert_eq!(updated["parallel_trials"], 8);

    // Only the good one was stored, and the coordinator still serves.
    let listed = c.chorus_json(&["experiment", "list", "--output", "json"]).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

/// A valid spec with a first rung under 5 % of max_resource is accepted with a warning on
/// stderr, from the coordinator (submit, remote validation) and from local validation alike;
/// stdout stays the id, and the experiment runs. The default grace period draws no warning.
#[test]
fn a_tiny_grace_period_is_accepted_with_a_warning() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let asha = GOOD
        .replace(
            "searcher: {name: random}",
            "searcher: {name: asha, max_resource: 50, grace_period: 1, resource: epoch}",
        )
        .replace("max_trials: 2", "max_trials: 3");
    let file = c.write("tiny.yaml", &asha);
    let warning = "warning: searcher.grace_period 1 is 2.0 % of max_resource 50";
    for args in [
        vec!["experiment", "validate"],
        vec!["experiment", "validate", "--remote"],
        vec!["experiment", "submit"],
    ] {
        let mut all = args.clone();
        all.push(file.to_str().unwrap());
        let out = c.chorus(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert_eq!(stderr.matches(warning).count(), 1, "{args:?}: {stderr}");
        if args[1] == "submit" {
            let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            assert_eq!(wait_ended(&c, id, Duration::from_secs(60)), "completed");
        }
    }
    let default = c.write("default.yaml", &asha.replace("grace_period: 1, ", ""));
    let out = c.chorus(&["experiment", "submit", default.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
