//! A real trial's metric history read back through `chorus trial metrics` in every format,
//! filtered, and page by page over `TrialMetrics`, resuming from a cursor.

use super::*;
use chorus_proto::pb;
use chorus_proto::pb::experiment_service_client::ExperimentServiceClient;
use chorus_tests::ClusterConfig;

/// Thirty reports with a step (`loss` = 100.25 - step, `acc` = step), then one without.
const SPEC: &str = r#"
name: history
metric: {name: loss, goal: minimize}
parameters:
  x: {value: 1}
searcher: {name: grid}
trial:
  command: [sh, -c, 'i=0; while [ $i -lt 30 ]; do echo "chorus:metric {\"step\": $i, \"loss\": $((100 - i)).25, \"acc\": $i}"; i=$((i + 1)); done; echo "chorus:metric {\"throughput\": 12.5}"']
"#;

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "chorus failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn a_trials_metrics_read_back_in_every_format_and_resume_from_a_cursor() {
    let c = TestCluster::start(ClusterConfig {
        workers: 1,
        slots: 1,
        ..Default::default()
    })
    .unwrap();
    let exp = submit(&c, &c.write("history.yaml", SPEC));
    assert_eq!(
        wait_ended(&c, exp, Duration::from_secs(120)),
        "completed",
        "{}",
        c.logs_tail()
    );
    let tid = trials(&c, exp)[0]["id"].as_u64().unwrap();
    let trial = tid.to_string();

    // JSON: every report, in order, as stored.
    let v = c.chorus_json(&["trial", "metrics", &trial, "-o", "json"]).unwrap();
    assert_eq!(v["trial_id"], tid);
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 31, "{v}");
    for (i, p) in points[..30].iter().enumerate() {
        let i = i as f64;
        assert_eq!(p["step"].as_f64(), Some(i));
        assert_eq!(p["attempt"], 1);
        assert_eq!(p["values"], serde_json::json!({"loss": 100.25 - i, "acc": i}));
    }
    assert_eq!(
        points[30],
        serde_json::json!({"step": null, "attempt": 1, "values": {"throughput": 12.5}})
    );
    let stored = trial_history(&c, exp, tid);
    assert_eq!(stored.len(), 31, "the CLI shows what storage holds");

    // CSV: a column per metric, sorted; empty cells where a report lacks one.
    let csv = stdout(&c.chorus(&["trial", "metrics", &trial, "--output", "csv"]));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 32);
    assert_eq!(lines[0], "step,attempt,acc,loss,throughput");
    assert_eq!(lines[4], "3,1,3,97.25,");
    assert_eq!(lines[31], ",1,,,12.5");

    // Table: the same rows, for people.
    let table = stdout(&c.chorus(&["trial", "metrics", &trial]));
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["step", "attempt", "acc", "loss", "throughput"]);
    assert_eq!(rows.len(), 33, "header, rule and 31 rows:\n{table}");
    assert_eq!(rows[2 + 29], ["29", "1", "29", "71.25", "-"]);
    assert_eq!(rows[2 + 30], ["-", "1", "-", "-", "12.5"]);

    // Filters: only the named metrics, only the steps asked for.
    let v = c
        .chorus_json(&["trial", "metrics", &trial, "--metric", "loss", "-o", "json"])
        .unwrap();
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 30, "the report without loss is left out");
    assert!(
        points
            .iter()
            .all(|p| p["values"].as_object().unwrap().keys().eq(["loss"]))
    );
    let csv = stdout(&c.chorus(&[
        "trial",
        "metrics",
        &trial,
        "-m",
        "acc",
        "-m",
        "loss",
        "--min-step",
        "10",
        "--max-step",
        "12",
        "-o",
        "csv",
    ]));
    assert_eq!(
        csv,
        "step,attempt,acc,loss\n10,1,10,90.25\n11,1,11,89.25\n12,1,12,88.25\n"
    );

    // Usage errors exit 2; an unknown trial is an error of its own (1).
    for args in [
        vec!["trial", "metrics", &trial, "-o", "yaml"],
        vec!["trial", "metrics", &trial, "--min-step", "5", "--max-step", "4"],
        vec!["trial", "metrics", &trial, "--metric", ""],
    ] {
        let out = c.chorus(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = c.chorus(&["trial", "metrics", "999999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trial 999999 does not exist"));

    // Over the API: pages of 7, each with the cursor of its last point; resuming after any of
    // them gives exactly the points after it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = ExperimentServiceClient::connect(c.url()).await.unwrap();
        let read = |after: String, page_size: u32| {
            let mut client = client.clone();
            async move {
                let req = pb::TrialMetricsRequest {
                    trial_id: tid,
                    page_size,
                    after,
                    ..Default::default()
                };
                let mut stream = client.trial_metrics(req).await?.into_inner();
                let mut pages = Vec::new();
                while let Some(p) = stream.message().await? {
                    pages.push(p);
                }
                Ok::<_, tonic::Status>(pages)
            }
        };
        let pages = read(String::new(), 7).await.unwrap();
        assert_eq!(
            pages.iter().map(|p| p.points.len()).collect::<Vec<_>>(),
            [7, 7, 7, 7, 3]
        );
        for (k, page) in pages.iter().enumerate() {
            let rest = read(page.cursor.clone(), 0).await.unwrap();
            let got: Vec<pb::MetricPoint> = rest.into_iter().flat_map(|p| p.points).collect();
            let want: Vec<pb::MetricPoint> = pages[k + 1..].iter().flat_map(|p| p.points.clone()).collect();
            assert_eq!(got, want, "after {}", page.cursor);
        }
        let err = read("not-a-cursor".into(), 0).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("not a metrics cursor"), "{}", err.message());
        let req = pb::TrialMetricsRequest {
            trial_id: 999_999,
            ..Default::default()
        };
        let err = client.trial_metrics(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    });
}
