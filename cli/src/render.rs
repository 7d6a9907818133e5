//! Presentation: tables for people, JSON and CSV for programs. Functions here return strings
//! and never print, so every format is unit-tested.
//!
//! Tables round floats to six significant digits; JSON and CSV carry values exactly as the
//! coordinator sent them.

use crate::args::Agg;
use crate::query::Row;
use crate::rank::{CompareGroup, shared_metric};
use chorus_core::convert::{experiment_state_name, trial_state_name};
use chorus_dataset::{Imported, Manifest, Split};
use chorus_proto::pb;
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// Scalars

/// A float with six significant digits and no trailing zeros, like C's `%g`.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    if (-4..6).contains(&exp) {
        let decimals = (5 - exp).max(0) as usize;
        trim_fraction(&format!("{v:.decimals$}")).to_string()
    } else {
        let s = format!("{v:.5e}");
        let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
        format!("{}e{e}", trim_fraction(mantissa))
    }
}

fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// `12.3s`, `3m05s`, `2h07m`: precise enough to compare trials, short enough for a column.
pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// UTC RFC 3339 to the second; `-` for the wire's "not set" (0).
pub fn fmt_time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms as u64)).to_string()
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `5s ago`, `3m ago`, `2h ago`.
pub fn fmt_ago(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let s = (now_ms - unix_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// A JSON object sent as text (params, metric lines); anything else reads as empty, because a
/// listing should not fail over one odd record.
pub fn parse_object(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// A value in a `k=v` list: strings bare unless they would be ambiguous, floats rounded.
fn compact_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '=') => v.to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(|| n.to_string(), fmt_value),
        other => other.to_string(),
    }
}

/// `lr=0.001 layers=2 opt=adam`, in name order.
pub fn params_compact(params_json: &str) -> String {
    kv_list(parse_object(params_json).iter())
}

/// The last metric line as `step=120 loss=0.31 acc=0.9`: step first, it says how far along.
pub fn metrics_compact(metrics_json: &str) -> String {
    let m = parse_object(metrics_json);
    let step = m.get_key_value("step");
    kv_list(step.into_iter().chain(m.iter().filter(|(k, _)| *k != "step")))
}

fn kv_list<'a>(items: impl Iterator<Item = (&'a String, &'a Value)>) -> String {
    items
        .map(|(k, v)| format!("{k}={}", compact_value(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A value as it goes into a CSV cell: exact, strings bare.
fn csv_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn opt_value(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), fmt_value)
}

fn goal(maximize: bool) -> &'static str {
    if maximize { "maximize" } else { "minimize" }
}

/// Durations of running trials keep growing; the wire's `run_seconds` may only count finished
/// attempts, so take the larger of it and the time since the trial started.
fn trial_seconds(t: &pb::Trial, now_ms: i64) -> f64 {
    let running = t.state == pb::TrialState::Running as i32 && t.started_unix_ms > 0;
    if running {
        t.run_seconds.max((now_ms - t.started_unix_ms) as f64 / 1000.0)
    } else {
        t.run_seconds
    }
}

// ---------------------------------------------------------------------------------------------
// Containers

/// A borderless table with a header rule, wrapped to the terminal's width when there is one.
pub fn table(header: Vec<String>, rows: Vec<Vec<String>>) -> String {
    use comfy_table::TableComponent as C;
    let mut t = Table::new();
    // Only a rule under the header: output that reads like `kubectl get`, and whose rows survive
    // `grep` and `awk` whole.
    t.load_preset(presets::NOTHING)
        .set_style(C::HeaderLines, '─')
        .set_style(C::MiddleHeaderIntersections, ' ')
        .remove_style(C::LeftBorder)
        .remove_style(C::RightBorder)
        .remove_style(C::LeftHeaderIntersection)
        .remove_style(C::RightHeaderIntersection)
        .remove_style(C::TopBorder)
        .remove_style(C::BottomBorder)
        .remove_style(C::HorizontalLines)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    for r in rows {
        t.add_row(r);
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 1));
    }
    let mut s: String = t
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    s.push('\n');
    s
}

pub fn json(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

pub fn csv(header: &[String], rows: &[Vec<String>]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing into memory cannot fail; the unwraps document that rather than hide an error.
    w.write_record(header).expect("csv to memory");
    for r in rows {
        w.write_record(r).expect("csv to memory");
    }
    String::from_utf8(w.into_inner().expect("csv to memory")).expect("csv of utf-8 fields is utf-8")
}

/// Union of the keys of JSON objects, for one CSV column each.
fn key_union<'a>(objs: impl Iterator<Item = &'a Map<String, Value>>) -> Vec<String> {
    objs.flat_map(|m| m.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn cells(obj: &Map<String, Value>, keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| obj.get(k).map(csv_value).unwrap_or_default())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Experiments

pub fn experiment_json(e: &pb::Experiment) -> Value {
    let c = e.counts.unwrap_or_default();
    json!({
        "id": e.id,
        "name": e.name,
        "state": experiment_state_name(e.state),
        "metric": e.metric,
        "goal": goal(e.maximize),
        "searcher": e.searcher,
        "max_trials": e.max_trials,
        "parallel_trials": e.parallel_trials,
        "max_failed_trials": e.max_failed_trials,
        "counts": {
            "pending": c.pending, "running": c.running, "completed": c.completed,
            "failed": c.failed, "killed": c.killed, "paused": c.paused,
        },
        "best_trial_id": e.best_trial_id,
        "best_value": e.best_value,
        "created_unix_ms": e.created_unix_ms,
        "ended_unix_ms": e.ended_unix_ms,
        "storage": e.storage,
        "message": e.message,
    })
}

/// Trials that have ended, whatever the outcome: the progress of a sweep.
pub fn finished(c: &pb::TrialCounts) -> u64 {
    c.completed + c.failed + c.killed
}

/// `val_loss=0.12 (trial 7)`, or `-` before any trial reported.
pub fn best_summary(e: &pb::Experiment) -> String {
    match (e.best_value, e.best_trial_id) {
        (Some(v), Some(t)) => format!("{}={} (trial {t})", e.metric, fmt_value(v)),
        (Some(v), None) => format!("{}={}", e.metric, fmt_value(v)),
        _ => "-".into(),
    }
}

pub fn experiments_table(exps: &[pb::Experiment]) -> String {
    let header = [
        "id", "name", "state", "searcher", "metric", "trials", "running", "failed", "best", "created",
    ];
    let rows = exps
        .iter()
        .map(|e| {
            let c = e.counts.unwrap_or_default();
            vec![
                e.id.to_string(),
                e.name.clone(),
                experiment_state_name(e.state).to_string(),
                e.searcher.clone(),
                format!("{} ({})", e.metric, goal(e.maximize)),
                format!("{}/{}", finished(&c), e.max_trials),
                c.running.to_string(),
                c.failed.to_string(),
                match (e.best_value, e.best_trial_id) {
                    (Some(v), Some(t)) => format!("{} (trial {t})", fmt_value(v)),
                    (v, _) => opt_value(v),
                },
                fmt_time(e.created_unix_ms),
            ]
        })
        .collect();
    table(header.map(String::from).to_vec(), rows)
}

/// `describe`: one field per line, then the stored spec.
pub fn experiment_detail(e: &pb::Experiment, spec_yaml: &str) -> String {
    let c = e.counts.unwrap_or_default();
    let mut fields: Vec<(&str, String)> = vec![
        ("id", e.id.to_string()),
        ("name", e.name.clone()),
        ("state", experiment_state_name(e.state).to_string()),
    ];
    if !e.message.is_empty() {
        fields.push(("message", e.message.clone()));
    }
    fields.extend([
        ("searcher", e.searcher.clone()),
        ("metric", format!("{} ({})", e.metric, goal(e.maximize))),
        ("max trials", e.max_trials.to_string()),
        ("parallel trials", e.parallel_trials.to_string()),
        (
            "max failed trials",
            e.max_failed_trials.map_or("unlimited".to_string(), |v| v.to_string()),
        ),
        (
            "trials",
            format!(
                "{} pending, {} running, {} paused, {} completed, {} failed, {} killed",
                c.pending, c.running, c.paused, c.completed, c.failed, c.killed
            ),
        ),
        ("best", best_summary(e)),
        ("storage", e.storage.clone()),
        ("created", fmt_time(e.created_unix_ms)),
        ("ended", fmt_time(e.ended_unix_ms)),
    ]);
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in fields {
        let v = if v.is_empty() { "-".to_string() } else { v };
        out.push_str(&format!("{:<width$} {v}\n", format!("{k}:")));
    }
    out.push_str("\n# spec\n");
    out.push_str(spec_yaml);
    if !spec_yaml.ends_with('\n') {
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Trials

pub fn trial_json(t: &pb::Trial) -> Value {
    json!({
        "id": t.id,
        "experiment_id": t.experiment_id,
        "seq": t.seq,
        "state": trial_state_name(t.state),
        "params": Value::Object(parse_object(&t.params_json)),
        "attempt": t.attempt,
        "restarts": t.restarts,
        "best_value": t.best_value,
        "best_step": t.best_step,
        "last_metrics": Value::Object(parse_object(&t.last_metrics_json)),
        "worker_id": t.worker_id,
        "started_unix_ms": t.started_unix_ms,
        "ended_unix_ms": t.ended_unix_ms,
        "run_seconds": t.run_seconds,
        "checkpoint_step": t.checkpoint_step,
        "malformed_metric_lines": t.malformed_metric_lines,
        "message": t.message,
        "world_size": t.world_size,
        "data_position": serde_json::from_str::<Value>(&t.data_position_json).unwrap_or(Value::Null),
    })
}

pub fn trials_json(trials: &[pb::Trial], metric: &str, maximize: bool) -> String {
    json(&json!({
        "metric": metric,
        "goal": goal(maximize),
        "trials": trials.iter().map(trial_json).collect::<Vec<_>>(),
    }))
}

/// The best value column is headed by the metric's name, so `trial list` reads like a report.
pub fn trials_table(trials: &[pb::Trial], metric: &str, now_ms: i64) -> String {
    let header = [
        "trial",
        "seq",
        "state",
        "params",
        metric,
        "last metrics",
        "attempt/restarts",
        "worker",
        "duration",
    ];
    let rows = trials
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.seq.to_string(),
                trial_state_name(t.state).to_string(),
                params_compact(&t.params_json),
                opt_value(t.best_value),
                metrics_compact(&t.last_metrics_json),
                format!("{}/{}", t.attempt, t.restarts),
                if t.worker_id.is_empty() {
                    "-".into()
                } else {
                    t.worker_id.clone()
                },
                fmt_duration(trial_seconds(t, now_ms)),
            ]
        })
        .collect();
    table(header.map(String::from).to_vec(), rows)
}

/// One column per parameter (`params.NAME`) and per last-metric field (`last.NAME`), so a
/// spreadsheet or dataframe gets typed columns without parsing JSON out of a cell.
pub fn trials_csv(trials: &[pb::Trial], metric: &str, now_ms: i64) -> String {
    let params: Vec<_> = trials.iter().map(|t| parse_object(&t.params_json)).collect();
    let lasts: Vec<_> = trials.iter().map(|t| parse_object(&t.last_metrics_json)).collect();
    let pkeys = key_union(params.iter());
    let lkeys = key_union(lasts.iter());
    let mut header: Vec<String> = vec!["trial".into(), "seq".into(), "state".into()];
    header.extend(pkeys.iter().map(|k| format!("params.{k}")));
    header.push(metric.to_string());
    header.extend(lkeys.iter().map(|k| format!("last.{k}")));
    header.extend(["attempt", "restarts", "worker", "run_seconds"].map(String::from));
    let rows: Vec<Vec<String>> = trials
        .iter()
        .zip(params.iter().zip(&lasts))
        .map(|(t, (p, l))| {
            let mut r = vec![
                t.id.to_string(),
                t.seq.to_string(),
                trial_state_name(t.state).to_string(),
            ];
            r.extend(cells(p, &pkeys));
            r.push(t.best_value.map(|v| v.to_string()).unwrap_or_default());
            r.extend(cells(l, &lkeys));
            r.extend([
                t.attempt.to_string(),
                t.restarts.to_string(),
                t.worker_id.clone(),
                trial_seconds(t, now_ms).to_string(),
            ]);
            r
        })
        .collect();
    csv(&header, &rows)
}

// ---------------------------------------------------------------------------------------------
// Metric history

/// The metric columns of `trial metrics`: the metrics asked for, in the order given (once
/// each), or else every metric the points hold, sorted.
pub fn metric_columns(points: &[pb::MetricPoint], requested: &[String]) -> Vec<String> {
    if requested.is_empty() {
        let names: BTreeSet<&String> = points.iter().flat_map(|p| p.values.keys()).collect();
        return names.into_iter().cloned().collect();
    }
    let mut seen = BTreeSet::new();
    requested.iter().filter(|m| seen.insert(*m)).cloned().collect()
}

/// One row per report: its step, its attempt, then each metric (`-` where it has none).
pub fn metrics_table(points: &[pb::MetricPoint], names: &[String]) -> String {
    let mut header = vec!["step".to_string(), "attempt".to_string()];
    header.extend(names.iter().cloned());
    let rows = points
        .iter()
        .map(|p| {
            let mut r = vec![p.step.map_or("-".into(), |s| s.to_string()), p.attempt.to_string()];
            r.extend(
                names
                    .iter()
                    .map(|n| p.values.get(n).map_or("-".into(), |v| fmt_value(*v))),
            );
            r
        })
        .collect();
    table(header, rows)
}

/// Values exactly as reported; an empty cell where a report has no step or lacks a metric.
pub fn metrics_csv(points: &[pb::MetricPoint], names: &[String]) -> String {
    let mut header = vec!["step".to_string(), "attempt".to_string()];
    header.extend(names.iter().cloned());
    let rows: Vec<Vec<String>> = points
        .iter()
        .map(|p| {
            let mut r = vec![p.step.map(|s| s.to_string()).unwrap_or_default(), p.attempt.to_string()];
            r.extend(
                names
                    .iter()
                    .map(|n| p.values.get(n).map(f64::to_string).unwrap_or_default()),
            );
            r
        })
        .collect();
    csv(&header, &rows)
}

/// `trial metrics --spark`: one line per metric, its history drawn in at most `width` blocks,
/// then its min, max and last value and how many reports it has.
pub fn metrics_spark(points: &[pb::MetricPoint], names: &[String], width: usize) -> String {
    let pad = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for name in names {
        let series: Vec<f64> = points
            .iter()
            .filter_map(|p| p.values.get(name).copied())
            .filter(|v| v.is_finite())
            .collect();
        let line = match (series.first(), series.last()) {
            (Some(_), Some(last)) => {
                let lo = series.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = series.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!(
                    "{name:<pad$}  {}  min {}  max {}  last {}  ({} points)",
                    crate::spark::sparkline(&crate::spark::downsample(&series, width)),
                    fmt_value(lo),
                    fmt_value(hi),
                    fmt_value(*last),
                    series.len()
                )
            }
            _ => format!("{name:<pad$}  (no reports)"),
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn metrics_json(trial: u64, points: &[pb::MetricPoint]) -> String {
    let points: Vec<Value> = points
        .iter()
        .map(|p| {
            let values: Map<String, Value> = p
                .values
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect();
            json!({"step": p.step, "attempt": p.attempt, "values": values})
        })
        .collect();
    json(&json!({"trial_id": trial, "points": points}))
}

// ---------------------------------------------------------------------------------------------
// Compare

/// Rows in display order, each with whether it is the best trial overall.
fn compare_rows(groups: &[CompareGroup], best: Option<u64>) -> impl Iterator<Item = (&CompareGroup, &pb::Trial, bool)> {
    groups
        .iter()
        .flat_map(move |g| g.trials.iter().map(move |t| (g, t, Some(t.id) == best)))
}

/// With a shared metric its name heads the value column; otherwise each row names its metric.
pub fn compare_table(groups: &[CompareGroup], shared: Option<&str>, best: Option<u64>) -> String {
    let mut header: Vec<String> = vec!["".into(), "experiment".into(), "trial".into(), "params".into()];
    match shared {
        Some(m) => header.push(m.to_string()),
        None => header.extend(["metric".into(), "best value".into()]),
    }
    header.extend(["status".into(), "duration".into()]);
    let rows = compare_rows(groups, best)
        .map(|(g, t, is_best)| {
            let mut r = vec![
                if is_best { "*".into() } else { String::new() },
                g.experiment.to_string(),
                t.id.to_string(),
                params_compact(&t.params_json),
            ];
            if shared.is_none() {
                r.push(format!("{} ({})", g.metric, goal(g.maximize)));
            }
            r.extend([
                opt_value(g.value(t)),
                trial_state_name(t.state).to_string(),
                fmt_duration(t.run_seconds),
            ]);
            r
        })
        .collect();
    let mut out = table(header, rows);
    for g in groups.iter().filter(|g| !g.objectives.is_empty()) {
        let names: Vec<String> = g
            .objectives
            .iter()
            .map(|(n, m)| format!("{n} ({})", goal(*m)))
            .collect();
        let ids: Vec<String> = g.pareto.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "experiment {}: Pareto front over {}: trial(s) {}\n",
            g.experiment,
            names.join(", "),
            if ids.is_empty() {
                "none yet".into()
            } else {
                ids.join(", ")
            }
        ));
    }
    out
}

pub fn compare_json(groups: &[CompareGroup], best: Option<u64>) -> String {
    let rows: Vec<Value> = compare_rows(groups, best)
        .map(|(g, t, is_best)| {
            json!({
                "experiment": g.experiment,
                "trial": t.id,
                "params": Value::Object(parse_object(&t.params_json)),
                "metric": g.metric,
                "goal": goal(g.maximize),
                "value": g.value(t),
                "agg": crate::query::agg_name(g.agg),
                "status": trial_state_name(t.state),
                "run_seconds": t.run_seconds,
                "best": is_best,
                "pareto": (!g.objectives.is_empty()).then(|| g.pareto.contains(&t.id)),
            })
        })
        .collect();
    json(&Value::Array(rows))
}

pub fn compare_csv(groups: &[CompareGroup], shared: Option<&str>, best: Option<u64>) -> String {
    let params: Vec<_> = compare_rows(groups, best)
        .map(|(_, t, _)| parse_object(&t.params_json))
        .collect();
    let pkeys = key_union(params.iter());
    let mut header: Vec<String> = vec!["experiment".into(), "trial".into()];
    header.extend(pkeys.iter().map(|k| format!("params.{k}")));
    match shared {
        Some(m) => header.push(m.to_string()),
        None => header.extend(["metric".into(), "value".into()]),
    }
    header.extend(["status".into(), "run_seconds".into(), "best".into()]);
    let rows: Vec<Vec<String>> = compare_rows(groups, best)
        .zip(&params)
        .map(|((g, t, is_best), p)| {
            let mut r = vec![g.experiment.to_string(), t.id.to_string()];
            r.extend(cells(p, &pkeys));
            if shared.is_none() {
                r.push(g.metric.clone());
            }
            r.extend([
                g.value(t).map(|v| v.to_string()).unwrap_or_default(),
                trial_state_name(t.state).to_string(),
                t.run_seconds.to_string(),
                is_best.to_string(),
            ]);
            r
        })
        .collect();
    csv(&header, &rows)
}

/// Rows of chosen columns (`compare --columns`), in display order.
fn column_rows(groups: &[CompareGroup], best: Option<u64>, columns: &[String]) -> Vec<Vec<Value>> {
    compare_rows(groups, best)
        .map(|(g, t, is_best)| {
            let row = Row::new(g.experiment, t, &g.metric, g.value(t), is_best);
            columns.iter().map(|c| row.cell(c)).collect()
        })
        .collect()
}

/// A cell of a table: numbers rounded, strings bare, `-` for none.
fn table_cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        other => compact_value(other),
    }
}

pub fn columns_table(groups: &[CompareGroup], best: Option<u64>, columns: &[String]) -> String {
    let rows = column_rows(groups, best, columns)
        .iter()
        .map(|r| r.iter().map(table_cell).collect())
        .collect();
    table(columns.to_vec(), rows)
}

pub fn columns_csv(groups: &[CompareGroup], best: Option<u64>, columns: &[String]) -> String {
    let rows: Vec<Vec<String>> = column_rows(groups, best, columns)
        .iter()
        .map(|r| {
            r.iter()
                .map(|v| match v {
                    Value::Null => String::new(),
                    // As `compare_csv` writes values: `11`, not serde's `11.0`.
                    Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(|| n.to_string(), |f| f.to_string()),
                    other => csv_value(other),
                })
                .collect()
        })
        .collect();
    csv(columns, &rows)
}

/// One object per trial with exactly the chosen keys, in order.
pub fn columns_json(groups: &[CompareGroup], best: Option<u64>, columns: &[String]) -> String {
    let rows: Vec<Value> = column_rows(groups, best, columns)
        .into_iter()
        .map(|r| Value::Object(columns.iter().cloned().zip(r).collect()))
        .collect();
    json(&Value::Array(rows))
}

/// Each experiment's best trial in a column of its own: its id, its value, and the parameters
/// on which the bests differ (the ones they share say nothing about why one did better).
pub fn side_by_side(groups: &[CompareGroup]) -> String {
    let bests: Vec<Option<&pb::Trial>> = groups.iter().map(CompareGroup::best).collect();
    let params: Vec<Map<String, Value>> = bests
        .iter()
        .map(|b| b.map(|t| parse_object(&t.params_json)).unwrap_or_default())
        .collect();
    let mut header = vec![String::new()];
    header.extend(groups.iter().map(|g| format!("experiment {}", g.experiment)));
    let mut rows = vec![];
    let row = |label: String, cells: Vec<String>| {
        let mut r = vec![label];
        r.extend(cells);
        r
    };
    rows.push(row(
        "best trial".into(),
        bests
            .iter()
            .map(|b| b.map_or("-".into(), |t| t.id.to_string()))
            .collect(),
    ));
    let agg = groups.first().map_or(Agg::Best, |g| g.agg);
    let label = |g: &CompareGroup| {
        let goal = goal(g.maximize);
        match agg {
            Agg::Best => format!("{} ({goal})", g.metric),
            other => format!("{} ({}, {goal})", g.metric, crate::query::agg_name(other)),
        }
    };
    match shared_metric(groups) {
        Some(_) => rows.push(row(
            label(&groups[0]),
            groups
                .iter()
                .zip(&bests)
                .map(|(g, b)| opt_value(b.and_then(|t| g.value(t))))
                .collect(),
        )),
        None => {
            rows.push(row("metric".into(), groups.iter().map(label).collect()));
            rows.push(row(
                "value".into(),
                groups
                    .iter()
                    .zip(&bests)
                    .map(|(g, b)| opt_value(b.and_then(|t| g.value(t))))
                    .collect(),
            ));
        }
    }
    for k in key_union(params.iter()) {
        let cells: Vec<String> = params
            .iter()
            .map(|p| p.get(&k).map_or("-".into(), compact_value))
            .collect();
        if cells.iter().any(|c| *c != cells[0]) {
            rows.push(row(k, cells));
        }
    }
    table(header, rows)
}

// ---------------------------------------------------------------------------------------------
// Workers

pub fn worker_json(w: &pb::WorkerInfo) -> Value {
    let res = |r: Option<pb::Resources>| r.map(|r| json!({"cpus": r.cpus, "gpus": r.gpus}));
    json!({
        "id": w.id,
        "address": w.address,
        "alive": w.alive,
        "capacity": res(w.capacity),
        "used": res(w.used),
        "labels": w.labels,
        "last_seen_unix_ms": w.last_seen_unix_ms,
        "running_trials": w.running_trials,
        "draining": w.draining,
    })
}

pub fn workers_table(ws: &[pb::WorkerInfo], now_ms: i64) -> String {
    let header = [
        "id",
        "address",
        "alive",
        "cpus",
        "gpus",
        "labels",
        "last seen",
        "trials",
    ];
    let rows = ws
        .iter()
        .map(|w| {
            let (cap, used) = (w.capacity.unwrap_or_default(), w.used.unwrap_or_default());
            let mut labels: Vec<_> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            vec![
                w.id.clone(),
                w.address.clone(),
                match (w.alive, w.draining) {
                    (true, false) => "yes".into(),
                    (true, true) => "yes, draining".into(),
                    (false, false) => "no".into(),
                    (false, true) => "no, draining".into(),
                },
                format!("{}/{}", used.cpus, cap.cpus),
                format!("{}/{}", used.gpus, cap.gpus),
                labels.join(" "),
                fmt_ago(w.last_seen_unix_ms, now_ms),
                w.running_trials
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    table(header.map(String::from).to_vec(), rows)
}

// ---------------------------------------------------------------------------------------------
// Datasets

/// `512 B`, `3.1 KiB`, `2.4 MiB`: binary units, as `ls -lh` and object-store consoles show.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn share(n: u64, of: u64) -> String {
    if of == 0 {
        return "-".into();
    }
    format!("{:.1}%", 100.0 * n as f64 / of as f64)
}

/// `inspect --output json` (and `synth`/`pack`): everything the table shows, unrounded.
/// `problems` is `None` unless shards were verified.
pub fn dataset_json(uri: &str, m: &Manifest, problems: Option<&[String]>) -> Value {
    let per_split = Split::ALL.map(|s| m.class_counts(s));
    let classes: Vec<Value> = m
        .classes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let [train, val, test] = per_split.each_ref().map(|c| c[i]);
            json!({"name": name, "train": train, "val": val, "test": test, "total": train + val + test})
        })
        .collect();
    let splits: Map<String, Value> = Split::ALL
        .iter()
        .map(|s| {
            let shards: Vec<_> = m.shards_in(*s).collect();
            let v = json!({
                "samples": m.splits.get(*s),
                "shards": shards.len(),
                "bytes": shards.iter().map(|x| x.bytes).sum::<u64>(),
            });
            (s.to_string(), v)
        })
        .collect();
    let mods = m.modalities();
    let mut out = json!({
        "uri": uri,
        "name": m.name,
        "source": m.source,
        "version": m.version,
        "samples": m.samples(),
        "bytes": m.bytes(),
        "sample_rate": m.sample_rate,
        "image_size": m.image_size,
        "vocabulary_size": m.vocabulary.len(),
        "classes": classes,
        "splits": splits,
        "modalities": {"image": mods.image, "audio": mods.audio, "text": mods.text},
        "shards": m.shards.iter().map(|s| json!({
            "key": s.key,
            "split": s.split,
            "samples": s.samples,
            "bytes": s.bytes,
            "crc32c": s.crc32c,
        })).collect::<Vec<_>>(),
    });
    if let Some(p) = problems {
        out["verified"] = json!(p.is_empty());
        out["problems"] = json!(p);
    }
    out
}

/// `inspect`: the dataset's fields, then samples per class and split, then its shards.
pub fn dataset_summary(uri: &str, m: &Manifest, problems: Option<&[String]>) -> String {
    let mods = m.modalities();
    let total = m.samples();
    let mut fields: Vec<(&str, String)> = vec![("name", m.name.clone()), ("uri", uri.to_string())];
    if let Some(src) = &m.source {
        fields.push(("source", src.clone()));
    }
    fields.extend([
        (
            "samples",
            format!("{total} in {} shards, {}", m.shards.len(), fmt_bytes(m.bytes())),
        ),
        (
            "modalities",
            format!(
                "image {} ({}), audio {} ({}), text {} ({})",
                mods.image,
                share(mods.image, total),
                mods.audio,
                share(mods.audio, total),
                mods.text,
                share(mods.text, total)
            ),
        ),
        (
            "format",
            format!(
                "v{}: {s}x{s} gray PNG, {} Hz mono WAV, {} classes, vocabulary of {} tokens",
                m.version,
                m.sample_rate,
                m.classes.len(),
                m.vocabulary.len(),
                s = m.image_size
            ),
        ),
    ]);
    if let Some(p) = problems {
        let bad = p.len();
        fields.push((
            "verified",
            if bad == 0 {
                format!("all {} shards match the manifest", m.shards.len())
            } else {
                format!("{bad} of {} shards are bad (listed on stderr)", m.shards.len())
            },
        ));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in fields {
        out.push_str(&format!("{:<width$} {v}\n", format!("{k}:")));
    }

    let per_split = Split::ALL.map(|s| m.class_counts(s));
    let header = ["class", "train", "val", "test", "total"].map(String::from).to_vec();
    let mut rows: Vec<Vec<String>> = m
        .classes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let counts = per_split.each_ref().map(|c| c[i]);
            let mut r = vec![name.clone()];
            r.extend(counts.iter().map(u64::to_string));
            r.push(counts.iter().sum::<u64>().to_string());
            r
        })
        .collect();
    let mut r = vec!["total".to_string()];
    r.extend(Split::ALL.iter().map(|s| m.splits.get(*s).to_string()));
    r.push(total.to_string());
    rows.push(r);
    out.push('\n');
    out.push_str(&table(header, rows));

    let header = ["shard", "split", "samples", "size", "crc32c"]
        .map(String::from)
        .to_vec();
    let rows = m
        .shards
        .iter()
        .map(|s| {
            vec![
                s.key.clone(),
                s.split.to_string(),
                s.samples.to_string(),
                fmt_bytes(s.bytes),
                format!("{:08x}", s.crc32c),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(header, rows));
    out
}

/// `import`: the dataset as `inspect` shows it, then what of the corpus was left out or written
/// incomplete, and why.
pub fn import_summary(uri: &str, imported: &Imported) -> String {
    let mut out = dataset_summary(uri, &imported.manifest, None);
    for (title, counts) in [
        ("left out of the dataset", &imported.skipped),
        ("written with a modality missing", &imported.incomplete),
    ] {
        if counts.is_empty() {
            continue;
        }
        let width = counts.values().map(|n| n.to_string().len()).max().unwrap_or(1);
        out.push_str(&format!("\n{title}:\n"));
        for (reason, n) in counts {
            out.push_str(&format!("  {n:>width$}  {reason}\n"));
        }
    }
    out
}

/// `import --output json`: `inspect`'s object plus `skipped` and `incomplete`, each a map from
/// reason to count.
pub fn import_json(uri: &str, imported: &Imported) -> Value {
    let mut out = dataset_json(uri, &imported.manifest, None);
    out["skipped"] = json!(imported.skipped);
    out["incomplete"] = json!(imported.incomplete);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rank::tests::trial;
    use crate::rank::{best_overall, shared_metric};

    #[test]
    fn values_are_rounded_like_g() {
        assert_eq!(fmt_value(0.0), "0");
        assert_eq!(fmt_value(3.0), "3");
        assert_eq!(fmt_value(0.1), "0.1");
        assert_eq!(fmt_value(0.123456789), "0.123457");
        assert_eq!(fmt_value(-12.5), "-12.5");
        assert_eq!(fmt_value(123456.7), "123457");
        assert_eq!(fmt_value(0.00031622776601683794), "0.000316228");
        assert_eq!(fmt_value(1.5e-7), "1.5e-7");
        assert_eq!(fmt_value(2.5e9), "2.5e9");
        assert_eq!(fmt_value(f64::NAN), "NaN");
    }

    fn point(step: Option<i64>, attempt: u32, values: &[(&str, f64)]) -> pb::MetricPoint {
        pb::MetricPoint {
            step,
            attempt,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn metric_history_in_three_formats() {
        let points = [
            point(Some(1), 1, &[("loss", 0.123456789), ("acc", 0.5)]),
            point(Some(2), 2, &[("loss", 0.1)]),
            point(None, 2, &[("zeta", 3.0)]),
        ];
        let names = metric_columns(&points, &[]);
        assert_eq!(names, ["acc", "loss", "zeta"]);
        let t = metrics_table(&points, &names);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("step") && lines[0].ends_with("zeta"), "{t}");
        assert!(lines[2].contains("0.123457") && lines[2].contains("0.5"), "{t}");
        assert!(lines[4].trim_start().starts_with('-'), "{t}");
        assert_eq!(
            metrics_csv(&points, &names),
            "step,attempt,acc,loss,zeta\n1,1,0.5,0.123456789,\n2,2,,0.1,\n,2,,,3\n"
        );
        let v: Value = serde_json::from_str(&metrics_json(9, &points)).unwrap();
        assert_eq!(v["trial_id"], 9);
        assert_eq!(
            v["points"][0],
            json!({"step": 1, "attempt": 1, "values": {"acc": 0.5, "loss": 0.123456789}})
        );
        assert_eq!(v["points"][2]["step"], Value::Null);
        // Asked-for columns keep their order, once each, present or not.
        let asked = ["loss".to_string(), "nope".into(), "loss".into()];
        assert_eq!(metric_columns(&points, &asked), ["loss", "nope"]);
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(0.0), "0.0s");
        assert_eq!(fmt_duration(12.34), "12.3s");
        assert_eq!(fmt_duration(185.0), "3m05s");
        assert_eq!(fmt_duration(7620.0), "2h07m");
        assert_eq!(fmt_duration(-1.0), "-");
        assert_eq!(fmt_ago(0, 10_000), "never");
        assert_eq!(fmt_ago(5_000, 10_000), "5s ago");
        assert_eq!(fmt_ago(1, 7_200_001), "2h ago");
        assert_eq!(fmt_time(0), "-");
        assert_eq!(fmt_time(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn params_are_compact_and_sorted() {
        assert_eq!(
            params_compact(r#"{"opt": "adam", "lr": 0.00031622776601683794, "layers": 2, "tag": "a b", "on": true}"#),
            r#"layers=2 lr=0.000316228 on=true opt=adam tag="a b""#
        );
        assert_eq!(params_compact("{}"), "");
        assert_eq!(params_compact("garbage"), "");
        assert_eq!(
            metrics_compact(r#"{"acc": 0.5, "step": 120, "loss": 0.25}"#),
            "step=120 acc=0.5 loss=0.25"
        );
        assert_eq!(metrics_compact(r#"{"acc": 0.5}"#), "acc=0.5");
    }

    fn t(id: u64, seq: u64, best: Option<f64>, params: &str) -> pb::Trial {
        pb::Trial {
            state: pb::TrialState::Completed as i32,
            params_json: params.into(),
            run_seconds: 1.5,
            ..trial(id, seq, best, "{}")
        }
    }

    #[test]
    fn trials_csv_has_a_column_per_param() {
        let trials = vec![
            pb::Trial {
                last_metrics_json: r#"{"step": 3, "loss": 0.5}"#.into(),
                ..t(1, 0, Some(0.5), r#"{"lr": 0.1}"#)
            },
            pb::Trial {
                worker_id: "w,1".into(),
                ..t(2, 1, None, r#"{"lr": 0.01, "opt": "adam"}"#)
            },
        ];
        assert_eq!(
            trials_csv(&trials, "loss", 0),
            "trial,seq,state,params.lr,params.opt,loss,last.loss,last.step,attempt,restarts,worker,run_seconds\n\
             1,0,completed,0.1,,0.5,0.5,3,0,0,,1.5\n\
             2,1,completed,0.01,adam,,,,0,0,\"w,1\",1.5\n"
        );
    }

    #[test]
    fn table_shape() {
        let t = table(
            vec!["id".into(), "name".into()],
            vec![vec!["1".into(), "alpha".into()], vec!["22".into(), "b".into()]],
        );
        assert_eq!(t, "id  name\n─── ──────\n1   alpha\n22  b\n");
    }

    #[test]
    fn trials_table_heads_value_column_with_metric() {
        let out = trials_table(&[t(1, 0, Some(0.25), r#"{"lr": 0.1}"#)], "val_loss", 0);
        let mut lines = out.lines();
        let header = lines.next().unwrap();
        assert!(
            header.contains("val_loss") && header.contains("attempt/restarts"),
            "{out}"
        );
        let row = lines.find(|l| l.contains("lr=0.1")).expect("a row with the params");
        assert!(
            row.contains("0.25") && row.contains("completed") && row.contains("1.5s"),
            "{out}"
        );
    }

    fn groups() -> Vec<CompareGroup> {
        let g = |exp, trials| {
            CompareGroup::new(
                exp,
                pb::ListTrialsResponse {
                    trials,
                    metric: "loss".into(),
                    maximize: false,
                    ..Default::default()
                },
                None,
            )
        };
        vec![
            g(
                1,
                vec![
                    t(1, 0, Some(0.4), r#"{"lr": 0.1}"#),
                    t(2, 1, Some(0.3), r#"{"lr": 0.2}"#),
                ],
            ),
            g(
                2,
                vec![
                    t(3, 0, None, r#"{"lr": 0.3, "opt": "sgd"}"#),
                    t(4, 1, Some(0.2), r#"{"lr": 0.4}"#),
                ],
            ),
        ]
    }

    #[test]
    fn compare_marks_the_best_trial_in_every_format() {
        let gs = groups();
        let best = best_overall(&gs);
        let shared = shared_metric(&gs);
        assert_eq!(best, Some(4));

        let csv = compare_csv(&gs, shared, best);
        assert_eq!(
            csv,
            "experiment,trial,params.lr,params.opt,loss,status,run_seconds,best\n\
             1,2,0.2,,0.3,completed,1.5,false\n\
             1,1,0.1,,0.4,completed,1.5,false\n\
             2,4,0.4,,0.2,completed,1.5,true\n\
             2,3,0.3,sgd,,completed,1.5,false\n"
        );

        let json: Value = serde_json::from_str(&compare_json(&gs, best)).unwrap();
        let rows = json.as_array().unwrap();
        assert_eq!(rows.len(), 4);
        let marked: Vec<_> = rows
            .iter()
            .filter(|r| r["best"] == true)
            .map(|r| r["trial"].clone())
            .collect();
        assert_eq!(marked, [json!(4)]);
        assert_eq!(rows[3]["value"], Value::Null);
        assert_eq!(rows[3]["params"]["opt"], "sgd");

        let table = compare_table(&gs, shared, best);
        let starred: Vec<_> = table.lines().filter(|l| l.trim_start().starts_with('*')).collect();
        assert_eq!(starred.len(), 1, "{table}");
        assert!(starred[0].contains("lr=0.4") && starred[0].contains("0.2"), "{table}");
        assert!(table.lines().next().unwrap().contains("loss"), "{table}");
    }

    #[test]
    fn compare_without_shared_metric_names_it_per_row() {
        let mut gs = groups();
        gs[1].metric = "acc".into();
        gs[1].maximize = true;
        let shared = shared_metric(&gs);
        let best = best_overall(&gs);
        assert_eq!((shared, best), (None, None));
        let csv = compare_csv(&gs, shared, best);
        assert!(
            csv.starts_with("experiment,trial,params.lr,params.opt,metric,value,status,run_seconds,best\n"),
            "{csv}"
        );
        assert!(csv.contains("\n2,4,0.4,,acc,0.2,completed,1.5,false\n"), "{csv}");
        assert!(!csv.contains("true"));
        let table = compare_table(&gs, shared, best);
        assert!(table.contains("acc (maximize)") && !table.contains('*'), "{table}");
    }

    #[test]
    fn chosen_columns_in_every_format() {
        let gs = groups();
        let best = best_overall(&gs);
        let cols: Vec<String> = ["trial", "lr", "opt", "loss", "best"].map(String::from).to_vec();
        assert_eq!(
            columns_csv(&gs, best, &cols),
            "trial,lr,opt,loss,best\n2,0.2,,0.3,false\n1,0.1,,0.4,false\n4,0.4,,0.2,true\n3,0.3,sgd,,false\n"
        );
        let rows: Value = serde_json::from_str(&columns_json(&gs, best, &cols)).unwrap();
        assert_eq!(
            rows[3],
            json!({"trial": 3, "lr": 0.3, "opt": "sgd", "loss": null, "best": false})
        );
        let table = columns_table(&gs, best, &cols);
        let last: Vec<&str> = table.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(last, ["3", "0.3", "sgd", "-", "false"], "{table}");
    }

    #[test]
    fn side_by_side_shows_each_best_and_the_params_that_differ() {
        let mut gs = groups();
        gs[1].trials[0].params_json = r#"{"lr": 0.4, "opt": "adam"}"#.into();
        let block = side_by_side(&gs);
        let lines: Vec<Vec<&str>> = block.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], ["experiment", "1", "experiment", "2"], "{block}");
        assert_eq!(lines[2], ["best", "trial", "2", "4"], "{block}");
        assert_eq!(lines[3], ["loss", "(minimize)", "0.3", "0.2"], "{block}");
        assert_eq!(lines[4], ["lr", "0.2", "0.4"], "{block}");
        // `opt` is set on one best only: it differs too.
        assert_eq!(lines[5], ["opt", "-", "adam"], "{block}");
        assert_eq!(lines.len(), 6, "{block}");
        // Different metrics: one row names each, the next holds the values.
        gs[1].metric = "acc".into();
        gs[1].maximize = true;
        let block = side_by_side(&gs);
        assert!(
            block.contains("acc (maximize)") && block.contains("loss (minimize)"),
            "{block}"
        );
    }

    #[test]
    fn arranging_filters_sorts_and_limits() {
        use crate::query::{Filter, Sort};
        let mut gs = groups();
        let g = &mut gs[1];
        g.arrange(
            &[Filter::parse("lr>=0.3").unwrap()],
            Some(&Sort::parse("lr:desc").unwrap()),
            None,
        );
        assert_eq!(g.trials.iter().map(|t| t.id).collect::<Vec<_>>(), [4, 3]);
        let mut gs = groups();
        gs[0].values.insert(1, 0.1);
        gs[0].arrange(&[], None, Some(1));
        assert_eq!(
            gs[0].trials.iter().map(|t| t.id).collect::<Vec<_>>(),
            [1],
            "by the new value"
        );
        assert_eq!(gs[0].best().map(|t| t.id), Some(1));
    }

    fn dataset() -> Manifest {
        use chorus_dataset::{ModalityCounts, ShardInfo, SplitCounts, Vocabulary};
        let shard = |i: usize, split, class_counts: Vec<u64>| ShardInfo {
            key: chorus_dataset::shard_key(i),
            split,
            samples: class_counts.iter().sum(),
            bytes: 1536,
            crc32c: 0xbeef,
            class_counts,
            modalities: ModalityCounts {
                image: 2,
                audio: 1,
                text: 0,
            },
        };
        Manifest {
            version: 1,
            name: "emo".into(),
            source: None,
            classes: vec!["calm".into(), "angry".into()],
            sample_rate: 16000,
            image_size: 48,
            splits: SplitCounts {
                train: 3,
                val: 2,
                test: 0,
            },
            shards: vec![shard(0, Split::Train, vec![1, 2]), shard(1, Split::Val, vec![2, 0])],
            vocabulary: Vocabulary::new(["hi"]),
        }
    }

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(1023), "1023 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(3 * 1024 * 1024 + 100_000), "3.1 MiB");
    }

    #[test]
    fn import_summaries_say_what_was_left_out() {
        let imported = Imported {
            manifest: dataset(),
            skipped: [("not a .wav file".to_string(), 2), ("song".to_string(), 120)].into(),
            incomplete: Default::default(),
        };
        let text = import_summary("file:///d/emo", &imported);
        assert!(text.starts_with(&dataset_summary("file:///d/emo", &imported.manifest, None)));
        assert!(
            text.ends_with("\nleft out of the dataset:\n    2  not a .wav file\n  120  song\n"),
            "{text}"
        );
        assert!(!text.contains("modality missing"), "{text}");
        let j = import_json("u", &imported);
        assert_eq!(j["skipped"], json!({"not a .wav file": 2, "song": 120}));
        assert_eq!(j["incomplete"], json!({}));
        assert_eq!(j["samples"], 5);
    }

    #[test]
    fn dataset_summary_counts_classes_splits_and_modalities() {
        let m = dataset();
        m.validate().unwrap();
        let text = dataset_summary("file:///d/emo", &m, None);
        assert!(text.contains("samples:    5 in 2 shards, 3.0 KiB\n"), "{text}");
        assert!(
            text.contains("image 4 (80.0%), audio 2 (40.0%), text 0 (0.0%)"),
            "{text}"
        );
        assert!(text.contains("2 classes, vocabulary of 3 tokens"), "{text}");
        assert!(!text.contains("verified"), "{text}");
        let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
        assert!(rows.contains(&vec!["calm", "1", "2", "0", "3"]), "{text}");
        assert!(rows.contains(&vec!["angry", "2", "0", "0", "2"]), "{text}");
        assert!(rows.contains(&vec!["total", "3", "2", "0", "5"]), "{text}");
        assert!(
            rows.contains(&vec!["shard-00001.tar", "val", "2", "1.5", "KiB", "0000beef"]),
            "{text}"
        );
        let bad = ["shard shard-00001.tar: checksum mismatch".to_string()];
        let text = dataset_summary("file:///d/emo", &m, Some(&bad));
        assert!(text.contains("verified:   1 of 2 shards are bad"), "{text}");

        let j = dataset_json("file:///d/emo", &m, Some(&[]));
        assert_eq!(j["samples"], 5);
        assert_eq!(
            j["classes"][1],
            json!({"name": "angry", "train": 2, "val": 0, "test": 0, "total": 2})
        );
        assert_eq!(j["splits"]["val"], json!({"samples": 2, "shards": 1, "bytes": 1536}));
        assert_eq!(j["modalities"], json!({"image": 4, "audio": 2, "text": 0}));
        assert_eq!(j["shards"][0]["crc32c"], 0xbeef);
        assert_eq!((j["verified"].clone(), j["problems"].clone()), (json!(true), json!([])));
        assert!(dataset_json("u", &m, None).get("verified").is_none());
    }
}
