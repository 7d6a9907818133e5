//! `chorus compare` with aggregations, filters, sorts, chosen columns and two experiments side
//! by side; `trial metrics --spark`; and the summary `submit --wait` prints, against a real
//! cluster running grids of `sh` trials whose loss goes 5, 1, 3 above a base over three steps,
//! so the best, last, min and max of each history all differ from the first report.

use super::*;
use chorus_tests::ClusterConfig;
use serde_json::json;

/// Base loss `a * SCALE`, plus 100 for `opt=sgd`; reports base+5, base+1, base+3 at steps 1-3.
const SPEC: &str = r#"
name: NAME
metric: {name: loss, goal: minimize}
parameters:
  a: {values: AS}
  opt: {values: OPTS}
searcher: {name: grid}
parallel_trials: 4
trial:
  command: [sh, -c, 'off=0; if [ "${params.opt}" = sgd ]; then off=100; fi; b=$(( ${params.a} * SCALE + off )); s=0; for d in 5 1 3; do s=$((s+1)); echo "chorus:metric {\"step\": $s, \"loss\": $(( b + d ))}"; done']
"#;

fn spec(name: &str, a: &str, opts: &str, scale: u32) -> String {
    SPEC.replace("NAME", name)
        .replace("AS", a)
        .replace("OPTS", opts)
        .replace("SCALE", &scale.to_string())
}

fn ok(c: &TestCluster, args: &[&str]) -> String {
    let out = c.chorus(args);
    assert!(
        out.status.success(),
        "chorus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_of(c: &TestCluster, args: &[&str]) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&ok(c, args)).unwrap();
    v.as_array()
        .cloned()
        .unwrap_or_else(|| panic!("{args:?}: not an array: {v}"))
}

/// `(a, opt, value)` of each row, in order.
fn points(rows: &[serde_json::Value]) -> Vec<(i64, String, f64)> {
    rows.iter()
        .map(|r| {
            (
                r["params"]["a"].as_i64().unwrap(),
                r["params"]["opt"].as_str().unwrap().to_string(),
                r["value"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn compare_aggregates_filters_sorts_and_sets_experiments_side_by_side() {
    let c = TestCluster::start(ClusterConfig::default()).unwrap();
    let file = c.write("a.yaml", &spec("sweep-a", "[1, 2, 3]", "[adam, sgd]", 10));
    let out = c.chorus(&["experiment", "submit", file.to_str().unwrap(), "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs_tail()
    );
    let a: u64 = stdout.lines().next().unwrap().parse().unwrap();
    let ts = trials(&c, a);
    let best = ts
        .iter()
        .find(|t| t["params"] == json!({"a": 1, "opt": "adam"}))
        .expect("the best point ran");
    let best_id = best["id"].as_u64().unwrap();

    // The summary after `--wait`, from the real listing and the stored spec.
    for line in [
        format!("summary of experiment {a}:"),
        format!("  best trial  {best_id}  loss=11 (minimize)  a=1 opt=adam"),
        "  trials      6 completed, 0 stopped early by the searcher, 0 failed, 0 killed".to_string(),
        "  restarts    0".to_string(),
    ] {
        assert!(stdout.lines().any(|l| l == line), "no line {line:?} in:\n{stdout}");
    }
    let compute = stdout
        .lines()
        .find(|l| l.starts_with("  compute     "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        compute.ends_with(" cpu (1 cpus, 0 gpus × 1 rank(s) per trial)"),
        "{compute}"
    );
    assert!(
        stdout.contains(" of trials, ") && stdout.contains(" wall\n"),
        "{stdout}"
    );

    let e = a.to_string();
    // The default is each trial's best by the goal, best first: the output it always had.
    let rows = json_of(&c, &["compare", &e, "-o", "json"]);
    let got = points(&rows);
    assert_eq!(got[0], (1, "adam".into(), 11.0));
    assert_eq!(
        got.iter().map(|p| p.2).collect::<Vec<_>>(),
        [11.0, 21.0, 31.0, 111.0, 121.0, 131.0]
    );
    assert!(rows.iter().all(|r| r["agg"] == "best"));
    assert_eq!(rows[0]["best"], true);

    // Last, min and max come from the histories; a filter on a string and one on a number.
    let last = json_of(
        &c,
        &["compare", &e, "--agg", "last", "--filter", "opt!=sgd", "-o", "json"],
    );
    assert_eq!(
        points(&last),
        [
            (1, "adam".into(), 13.0),
            (2, "adam".into(), 23.0),
            (3, "adam".into(), 33.0)
        ]
    );
    assert!(last.iter().all(|r| r["agg"] == "last"));
    let max = json_of(
        &c,
        &[
            "compare", &e, "--agg", "max", "--filter", "a>=2", "--filter", "loss<130", "-o", "json",
        ],
    );
    assert_eq!(
        points(&max),
        [
            (2, "adam".into(), 25.0),
            (3, "adam".into(), 35.0),
            (2, "sgd".into(), 125.0)
        ]
    );
    // A sort on a parameter, descending, and chosen columns in CSV.
    let csv = ok(
        &c,
        &[
            "compare",
            &e,
            "--agg",
            "min",
            "--filter",
            "state=completed",
            "--filter",
            "opt=sgd",
            "--sort",
            "a:desc",
            "--columns",
            "a,opt,loss,state",
            "-o",
            "csv",
        ],
    );
    assert_eq!(
        csv,
        "a,opt,loss,state\n3,sgd,131,completed\n2,sgd,121,completed\n1,sgd,111,completed\n"
    );
    let cols = json_of(
        &c,
        &["compare", &e, "--columns", "trial,a,loss", "--limit", "1", "-o", "json"],
    );
    assert_eq!(cols, [json!({"trial": best_id, "a": 1, "loss": 11.0})]);

    // A malformed filter is a usage error that names it.
    let bad = c.chorus(&["compare", &e, "--filter", "a=<2"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"a=<2\""), "{bad:?}");

    // The best trial's history as a sparkline: 15, 11, 13.
    let spark = ok(&c, &["trial", "metrics", &best_id.to_string(), "-m", "loss", "--spark"]);
    assert_eq!(spark, "loss  █▁▅  min 11  max 15  last 13  (3 points)\n");

    // A second experiment, whose best (a=4: 8+1) beats the first's, side by side.
    let b = submit(&c, &c.write("b.yaml", &spec("sweep-b", "[4, 5]", "[adam]", 2)));
    assert_eq!(wait_ended(&c, b, Duration::from_secs(60)), "completed");
    let both = json_of(&c, &["compare", &e, &b.to_string(), "-o", "json"]);
    assert_eq!(both.len(), 8);
    let marked: Vec<_> = both.iter().filter(|r| r["best"] == true).collect();
    assert_eq!(marked.len(), 1, "{both:?}");
    assert_eq!(
        (marked[0]["experiment"].as_u64(), marked[0]["value"].as_f64()),
        (Some(b), Some(9.0))
    );
    let both_last = json_of(
        &c,
        &[
            "compare",
            &e,
            &b.to_string(),
            "--agg",
            "last",
            "--filter",
            "opt=adam",
            "-o",
            "json",
        ],
    );
    let values: Vec<(u64, f64)> = both_last
        .iter()
        .map(|r| (r["experiment"].as_u64().unwrap(), r["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(values, [(a, 13.0), (a, 23.0), (a, 33.0), (b, 11.0), (b, 13.0)]);

    let table = ok(&c, &["compare", &e, &b.to_string()]);
    let block: Vec<&str> = table.split("\n\n").next().unwrap().lines().collect();
    let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(
        words(block[0]),
        ["experiment", &e, "experiment", &b.to_string()],
        "{table}"
    );
    let b_best = trials(&c, b)
        .iter()
        .find(|t| t["params"]["a"] == 4)
        .and_then(|t| t["id"].as_u64())
        .unwrap();
    let row = |label: &str| {
        block
            .iter()
            .find(|l| l.starts_with(label))
            .map(|l| words(l))
            .unwrap_or_else(|| panic!("no {label:?} row in:\n{table}"))
    };
    assert_eq!(
        row("best trial"),
        ["best", "trial", &best_id.to_string(), &b_best.to_string()]
    );
    assert_eq!(row("loss"), ["loss", "(minimize)", "11", "9"]);
    assert_eq!(row("a "), ["a", "1", "4"]);
    assert!(
        !block.iter().any(|l| l.starts_with("opt")),
        "both bests use adam:\n{table}"
    );
}
