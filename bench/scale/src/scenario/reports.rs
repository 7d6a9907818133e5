//! `reports`: T trials in flight, each reporting metric events back to back (a call waits for
//! the answer to the previous one) while the other workers only heartbeat. Measures the report
//! throughput the coordinator sustains, its latency, and what the load does to heartbeats.

use super::{Bench, Common, Record, experiment_yaml, wait_held};
use crate::fleet::Behaviour;
use anyhow::ensure;
use serde_json::json;

pub struct Reports {
    pub workers: usize,
    pub in_flight: u32,
    pub events_per_call: u32,
    pub steps: Option<u64>,
    pub max_trials: u64,
}

pub async fn run(common: &Common, record: &Record, r: &Reports) -> anyhow::Result<()> {
    ensure!(
        r.workers >= r.in_flight as usize,
        "--workers ({}) must be at least --in-flight ({}): each worker has one slot",
        r.workers,
        r.in_flight
    );
    record.set("in_flight", r.in_flight);
    record.set("events_per_call", r.events_per_call);
    record.set("steps", r.steps);
    let extra = vec![
        "--max-parallel-trials".to_string(),
        r.in_flight.max(1000).to_string(),
        "--max-trials-per-experiment".to_string(),
        r.max_trials.max(100_000).to_string(),
    ];
    let behaviour = Behaviour::Report {
        events_per_call: r.events_per_call,
        steps: r.steps,
    };
    let mut bench = Bench::start(common, record, &extra, r.workers, behaviour, None).await?;
    record.phase("submitting the experiment");
    let yaml = experiment_yaml("scale-reports", r.max_trials, r.in_flight, false);
    let exp = bench.submit(yaml).await?;
    record.phase(&format!("waiting for {} trials in flight", r.in_flight));
    let fill = wait_held(&mut bench, u64::from(r.in_flight)).await?;
    eprintln!(
        "  experiment {exp}: {} trials in flight after {:.2} s",
        r.in_flight,
        fill.as_secs_f64()
    );
    record.set("fill_seconds", fill.as_secs_f64());
    record.phase("warm-up");
    bench.sleep(common.warmup).await?;
    record.phase("measurement window");
    let start = bench.window()?;
    bench.sleep(common.window).await?;
    let w = bench.close(&start)?;
    let reports_per_s = w.per_s(w.counts.reports);
    let events_per_s = w.per_s(w.counts.metric_events);
    eprintln!("  {reports_per_s:.0} reports/s, {events_per_s:.0} metric events/s");
    eprintln!("  ReportTrial: {}", w.report.brief());
    eprintln!("  heartbeats: {}; lapses {}", w.heartbeat.brief(), w.counts.lapses);
    eprintln!("  {}", w.brief());
    record.set("reports_per_s", reports_per_s);
    record.set("events_per_s", events_per_s);
    record.set("report", w.report);
    record.set(
        "bytes_per_report",
        w.coordinator.write_bytes as f64 / w.counts.reports.max(1) as f64,
    );
    record.set("heartbeat", w.heartbeat);
    record.set("lapses", w.counts.lapses);
    record.set(
        "errors",
        json!({
            "report": w.counts.report_errors,
            "stale_report": w.counts.stale_reports,
            "heartbeat": w.counts.heartbeat_errors,
            "stream_breaks": w.counts.stream_breaks,
        }),
    );
    record.set("window", &w);
    bench.finish(record).await;
    Ok(())
}
