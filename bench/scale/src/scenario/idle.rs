//! `idle`: N workers register, open their Assignments stream and renew their leases; nothing
//! else happens. Measures registration, the coordinator's cost of keeping N leases, and whether
//! any lapse.

use super::{Bench, Common, Record};
use crate::fleet::Behaviour;
use serde_json::json;

pub async fn run(common: &Common, record: &Record, workers: usize) -> anyhow::Result<()> {
    // No experiment is submitted, so the behaviour never comes into play.
    let behaviour = Behaviour::Report {
        events_per_call: 1,
        steps: None,
    };
    let mut bench = Bench::start(common, record, &[], workers, behaviour, None).await?;
    record.phase("warm-up: every worker's heartbeat phase starts");
    bench.sleep(common.warmup).await?;
    record.phase("measurement window");
    let start = bench.window()?;
    bench.sleep(common.window).await?;
    let w = bench.close(&start)?;
    eprintln!("  heartbeats: {}; {}", w.heartbeat.brief(), w.brief());
    eprintln!(
        "  lapses {}, heartbeat errors {}, stream breaks {}",
        w.counts.lapses, w.counts.heartbeat_errors, w.counts.stream_breaks
    );
    record.set("heartbeats_per_s", w.per_s(w.counts.heartbeats));
    record.set("heartbeat", w.heartbeat);
    record.set("lapses", w.counts.lapses);
    record.set(
        "errors",
        json!({"heartbeat": w.counts.heartbeat_errors, "stream_breaks": w.counts.stream_breaks}),
    );
    record.set("window", &w);
    bench.finish(record).await;
    Ok(())
}
