//! The side-by-side table: reads result lines (one JSON object per run) and prints, for each
//! case, the chosen figures of each build (the median over its runs) and their ratio.

use anyhow::Context;
use serde_json::Value;
use std::path::PathBuf;

/// A figure of the table: its title and where it sits in a result.
struct Row {
    title: &'static str,
    pointer: &'static str,
}

const fn row(title: &'static str, pointer: &'static str) -> Row {
    Row { title, pointer }
}

const COMMON_TAIL: &[Row] = &[
    row("lapses", "/lapses"),
    row("heartbeat errors (not lapses)", "/window/counts/heartbeat_errors"),
    row("coordinator CPU %", "/window/coordinator/cpu_pct"),
    row("coordinator peak RSS MiB", "/window/coordinator/peak_rss_mib"),
    row("coordinator MiB written", "/window/coordinator/write_mib"),
    row("generator CPU %", "/window/generator/cpu_pct"),
];

fn rows(scenario: &str) -> Vec<Row> {
    let mut rows = match scenario {
        "idle" => vec![
            row("registration s", "/registration/seconds"),
            row("Register p99 ms", "/registration/latency/p99_ms"),
            row("heartbeats/s", "/heartbeats_per_s"),
            row("heartbeat p50 ms", "/heartbeat/p50_ms"),
            row("heartbeat p99 ms", "/heartbeat/p99_ms"),
            row("heartbeat max ms", "/heartbeat/max_ms"),
        ],
        "reports" => vec![
            row("reports/s", "/reports_per_s"),
            row("metric events/s", "/events_per_s"),
            row("ReportTrial p50 ms", "/report/p50_ms"),
            row("ReportTrial p99 ms", "/report/p99_ms"),
            row("heartbeat p99 ms", "/heartbeat/p99_ms"),
            row("bytes written/report", "/bytes_per_report"),
        ],
        "growth" => {
            let mut r = vec![
                row("reports made", "/reports_made"),
                row("reports/s (whole run)", "/reports_per_s"),
                row("trials stopped", "/trials_stopped"),
            ];
            for (title, p) in GROWTH_SLICES {
                r.push(row(title, p));
            }
            r
        }
        "queries" => vec![
            row("fill: trials/s", "/fill/trials_per_s"),
            row("fill: trials ended", "/fill_progress/trials_ended"),
            row("fill: heartbeat p99 ms", "/fill/heartbeat/p99_ms"),
            row("fill: lapses", "/fill/lapses"),
            row("fill: heartbeat errors", "/fill/window/counts/heartbeat_errors"),
            row("ListWorkers p50 ms", "/list_workers/latency/p50_ms"),
            row("ListWorkers max ms", "/list_workers/latency/max_ms"),
            row("ListTrials (all pages) p50 ms", "/list_trials/latency/p50_ms"),
            row("ListTrials (all pages) max ms", "/list_trials/latency/max_ms"),
            row("ListTrials page p99 ms", "/list_trials/page/p99_ms"),
            row("ListTrials pages", "/list_trials/listing/pages"),
            row("heartbeat p99 ms (queries)", "/heartbeat/p99_ms"),
        ],
        _ => vec![],
    };
    rows.extend(COMMON_TAIL.iter().map(|r| row(r.title, r.pointer)));
    rows
}

/// Latency and bytes per report of the first, middle and last slices of a growth run.
const GROWTH_SLICES: &[(&str, &str)] = &[
    ("ReportTrial p99 ms, slice 1", "/slices/0/report/p99_ms"),
    ("ReportTrial p99 ms, slice 5", "/slices/4/report/p99_ms"),
    ("ReportTrial p99 ms, slice 10", "/slices/9/report/p99_ms"),
    ("bytes written/report, slice 1", "/slices/0/bytes_per_report"),
    ("bytes written/report, slice 5", "/slices/4/bytes_per_report"),
    ("bytes written/report, slice 10", "/slices/9/bytes_per_report"),
];

pub fn print(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            results.push(serde_json::from_str::<Value>(line).with_context(|| format!("in {}", f.display()))?);
        }
    }
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut cases: Vec<String> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    for r in &results {
        let (c, l) = (s(r, "case"), s(r, "label"));
        if !cases.contains(&c) {
            cases.push(c);
        }
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    for case in &cases {
        let of_case: Vec<&Value> = results.iter().filter(|r| &s(r, "case") == case).collect();
        let scenario = s(of_case[0], "scenario");
        let encoding = s(of_case[0], "encoding");
        println!("\n## {case} (metric encoding: {encoding})");
        let mut header = format!("{:<34}", "");
        for l in &labels {
            header.push_str(&format!(" {l:>14}"));
        }
        if labels.len() == 2 {
            header.push_str(&format!(" {:>10}", format!("{}/{}", labels[1], labels[0])));
        }
        println!("{header}");
        let runs =
            |label: &str| -> Vec<&Value> { of_case.iter().copied().filter(|r| s(r, "label") == label).collect() };
        let mut line = format!("{:<34}", "runs (finished)");
        for l in &labels {
            let rs = runs(l);
            let done = rs
                .iter()
                .filter(|r| r.get("completed") == Some(&Value::Bool(true)))
                .count();
            line.push_str(&format!(" {:>14}", format!("{} ({done})", rs.len())));
        }
        println!("{line}");
        for row in rows(&scenario) {
            let mut line = format!("{:<34}", row.title);
            let mut medians = Vec::new();
            for l in &labels {
                let m = median(
                    runs(l)
                        .iter()
                        .filter_map(|r| r.pointer(row.pointer)?.as_f64())
                        .collect(),
                );
                line.push_str(&format!(" {:>14}", m.map_or("-".into(), fmt)));
                medians.push(m);
            }
            if let [Some(a), Some(b)] = medians[..]
                && a != 0.0
            {
                line.push_str(&format!(" {:>10.2}", b / a));
            }
            println!("{line}");
        }
        for r in &of_case {
            if r.get("completed") != Some(&Value::Bool(true)) {
                println!("  {}: not finished: {}", s(r, "label"), s(r, "reason"));
            }
            if let Some(errors) = r
                .get("query_errors")
                .and_then(Value::as_array)
                .filter(|e| !e.is_empty())
            {
                println!(
                    "  {}: {} query errors, first: {}",
                    s(r, "label"),
                    errors.len(),
                    errors[0]
                );
            }
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_runs() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(super::median(vec![]), None);
    }
}
