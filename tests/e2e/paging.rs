//! The CLI's listings are complete over many pages: 20,000 trials (an experiment with no
//! worker creates `parallel_trials` of them at once) listed, compared and counted.

use super::*;
use chorus_tests::ClusterConfig;
use std::collections::BTreeSet;

const SPEC: &str = r#"
name: wide
metric: {name: loss, goal: minimize}
parameters:
  lr: {min: 0.001, max: 0.1}
searcher: {name: random, seed: 3}
max_trials: 20000
parallel_trials: 20000
trial:
  command: [train, '${params.lr}']
"#;

#[test]
fn listings_of_twenty_thousand_trials_are_complete() {
    let c = TestCluster::start(ClusterConfig {
        workers: 0,
        coordinator_args: vec!["--max-parallel-trials".into(), "20000".into()],
        ..Default::default()
    })
    .unwrap();
    let exp = submit(&c, &c.write("wide.yaml", SPEC));
    let small = submit(&c, &c.write("small.yaml", &SPEC.replace("20000", "2")));
    let e = exp.to_string();

    let csv_rows = |args: &[&str]| -> Vec<Vec<String>> {
        let out = c.chorus(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').map(String::from).collect())
            .collect()
    };
    // Default pages (1,000 each), and pages of an odd size that does not divide the total.
    for extra in [&[][..], &["--page-size", "2999"][..]] {
        let mut args = vec!["trial", "list", e.as_str(), "-o", "csv"];
        args.extend(extra);
        let rows = csv_rows(&args);
        assert_eq!(rows.len(), 20_000, "{extra:?}");
        let seqs: Vec<u64> = rows.iter().map(|r| r[1].parse().unwrap()).collect();
        assert_eq!(
            seqs,
            (0..20_000).collect::<Vec<u64>>(),
            "{extra:?}: every trial once, in order"
        );
        let ids: BTreeSet<&String> = rows.iter().map(|r| &r[0]).collect();
        assert_eq!(ids.len(), 20_000);
    }
    // A limit without a sort is the first trials, fetched a page at a time until there are enough.
    let rows = csv_rows(&["trial", "list", &e, "-o", "csv", "--limit", "1500"]);
    let seqs: Vec<u64> = rows.iter().map(|r| r[1].parse().unwrap()).collect();
    assert_eq!(seqs, (0..1500).collect::<Vec<u64>>());
    let rows = csv_rows(&["compare", &e, &small.to_string(), "-o", "csv", "--page-size", "4096"]);
    assert_eq!(rows.len(), 20_002, "compare sees every trial of both");

    let v = c
        .chorus_json(&["experiment", "list", "-o", "json", "--page-size", "1"])
        .unwrap();
    let ids: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [exp, small]);
}
