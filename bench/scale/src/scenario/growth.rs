//! `growth`: T trials in flight under the median stopping rule, each reporting up to S steps
//! (a stopped trial's slot takes a new trial), until T × S metric reports have been made.
//! Reports each successive slice of the run (by reports made) on its own: ReportTrial latency,
//! throughput, and the bytes the coordinator wrote per report. A cost that grows with the
//! history shows as a rising column; a flat one is what a coordinator should manage.

use super::{Bench, Common, Record, experiment_yaml, wait_held};
use crate::coordinator::Usage;
use crate::fleet::Behaviour;
use serde_json::json;
use std::time::{Duration, Instant};

/// A run in which no report is accepted for this long has stalled.
const STALL: Duration = Duration::from_secs(60);

pub struct Growth {
    pub in_flight: u32,
    pub steps: u64,
    pub slices: u32,
}

pub async fn run(common: &Common, record: &Record, g: &Growth) -> anyhow::Result<()> {
    let budget = u64::from(g.in_flight) * g.steps;
    let slices = u64::from(g.slices.max(1));
    record.set("in_flight", g.in_flight);
    record.set("steps", g.steps);
    record.set("reports_planned", budget);
    let behaviour = Behaviour::Report {
        events_per_call: 1,
        steps: Some(g.steps),
    };
    let mut bench = Bench::start(common, record, &[], g.in_flight as usize, behaviour, Some(budget)).await?;
    record.phase("submitting the experiment (median stopping rule)");
    let exp = bench
        .submit(experiment_yaml("scale-growth", 100_000, g.in_flight, true))
        .await?;
    let all = bench.window()?;
    let fill = wait_held(&mut bench, u64::from(g.in_flight)).await?;
    eprintln!(
        "  experiment {exp}: {} trials in flight after {:.2} s",
        g.in_flight,
        fill.as_secs_f64()
    );
    record.phase("run, slice by slice");
    let stats = &bench.shared.stats;
    let mut out = Vec::new();
    let mut prev = bench.coord.sample()?;
    let mut prev_counts = stats.counts();
    let start_counts = prev_counts;
    stats.report.take();
    let mut last_change = (prev_counts.metric_events, Instant::now());
    for k in 1..=slices {
        let boundary = budget * k / slices;
        loop {
            let done = bench.shared.stats.metric_events.get();
            if done >= boundary {
                break;
            }
            if done != last_change.0 {
                last_change = (done, Instant::now());
            }
            if last_change.1.elapsed() > STALL {
                anyhow::bail!("no report was made for {} s", STALL.as_secs());
            }
            bench.sleep(Duration::from_millis(50)).await?;
        }
        let now = bench.coord.sample()?;
        let counts = bench.shared.stats.counts();
        let d = counts.since(&prev_counts);
        let usage = Usage::between(&prev, &now);
        let latency = bench.shared.stats.report.take();
        let slice = json!({
            "slice": k,
            "progress_pct": 100 * k / slices,
            "reports": d.metric_events,
            "seconds": usage.seconds,
            "reports_per_s": d.metric_events as f64 / usage.seconds.max(1e-9),
            "report": latency,
            "write_bytes": usage.write_bytes,
            "bytes_per_report": usage.write_bytes as f64 / (d.metric_events.max(1)) as f64,
            "coordinator_cpu_pct": usage.cpu_pct,
            "rss_mib": usage.rss_mib,
            "kills": d.kills,
        });
        eprintln!(
            "  {:>3} %: {:>6} reports in {:>6.1} s, ReportTrial p50 {:.2} ms p99 {:.2} ms, {:.0} B written/report, RSS {:.0} MiB",
            100 * k / slices,
            d.metric_events,
            usage.seconds,
            latency.p50_ms,
            latency.p99_ms,
            usage.write_bytes as f64 / (d.metric_events.max(1)) as f64,
            usage.rss_mib
        );
        out.push(slice);
        record.set("slices", &out);
        // Kept current so that a run stopped by its time limit still says how far it got.
        let so_far = counts.since(&start_counts);
        record.set("reports_made", so_far.metric_events);
        record.set("trials_stopped", so_far.kills);
        record.set("lapses", so_far.lapses);
        prev = now;
        prev_counts = counts;
    }
    let w = bench.close(&all)?;
    eprintln!(
        "  whole run: {} reports, {} trials stopped by the rule, {} finished; {}",
        w.counts.metric_events,
        w.counts.kills,
        w.counts.trials_finished,
        w.brief()
    );
    record.set("reports_made", w.counts.metric_events);
    record.set("reports_per_s", w.per_s(w.counts.metric_events));
    record.set("trials_stopped", w.counts.kills);
    record.set("trials_finished", w.counts.trials_finished);
    record.set("lapses", w.counts.lapses);
    record.set("heartbeat", w.heartbeat);
    record.set("window", &w);
    bench.finish(record).await;
    Ok(())
}
