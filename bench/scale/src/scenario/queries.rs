//! `queries`: W workers heartbeating and an experiment of N trials, each finished at once by
//! its worker (Started, one metric, Exited succeeded in one report). Once every trial has
//! ended, times ListWorkers and ListTrials (every page, when the coordinator pages them) while
//! the heartbeats go on, and what those listings do to heartbeat latency.

use super::{Bench, Common, Record, experiment_yaml};
use crate::fleet::Behaviour;
use crate::stats::Latency;
use anyhow::Context;
use chorus_proto::pb;
use prost::Message;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub struct Queries {
    pub workers: usize,
    pub trials: u64,
    pub parallel: u32,
    pub repeat: u32,
}

pub async fn run(common: &Common, record: &Record, q: &Queries) -> anyhow::Result<()> {
    let parallel = q.parallel.min(q.workers as u32).max(1);
    record.set("trials", q.trials);
    record.set("parallel_trials", parallel);
    let extra = vec![
        "--max-parallel-trials".to_string(),
        parallel.max(1000).to_string(),
        "--max-trials-per-experiment".to_string(),
        q.trials.max(100_000).to_string(),
    ];
    let mut bench = Bench::start(common, record, &extra, q.workers, Behaviour::Finish, None).await?;
    record.phase("submitting the experiment");
    let exp = bench
        .submit(experiment_yaml("scale-queries", q.trials, parallel, false))
        .await?;
    let mut api = bench.experiments().await?;
    record.phase(&format!("filling: {} trials run and finish", q.trials));
    let fill = bench.window()?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        bench.sleep(Duration::from_secs(1)).await?;
        let e = api
            .describe_experiment(pb::DescribeExperimentRequest { experiment_id: exp })
            .await
            .context("DescribeExperiment")?
            .into_inner()
            .experiment
            .context("DescribeExperiment answered no experiment")?;
        let c = e.counts.unwrap_or_default();
        let ended = c.completed + c.failed + c.killed;
        let secs = started.elapsed().as_secs_f64();
        // Kept current so that a run stopped by its time limit still says how far it got.
        record.set(
            "fill_progress",
            json!({"trials_ended": ended, "seconds": secs, "trials_per_s": ended as f64 / secs}),
        );
        if last_print.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "  {ended} of {} trials ended after {secs:.0} s ({:.0}/s)",
                q.trials,
                ended as f64 / secs
            );
            last_print = Instant::now();
        }
        if ended >= q.trials || e.state() != pb::ExperimentState::Active {
            break;
        }
    }
    let w = bench.close(&fill)?;
    let trials_per_s = w.per_s(w.counts.trials_finished);
    eprintln!(
        "  filled in {:.1} s: {trials_per_s:.0} trials/s; heartbeats {}; {}",
        w.coordinator.seconds,
        w.heartbeat.brief(),
        w.brief()
    );
    record.set(
        "fill",
        json!({
            "seconds": w.coordinator.seconds,
            "trials_per_s": trials_per_s,
            "report": w.report,
            "heartbeat": w.heartbeat,
            "lapses": w.counts.lapses,
            "window": &w,
        }),
    );

    record.phase("queries");
    let qs = bench.window()?;
    let list_workers = Latency::new();
    let mut workers_seen = 0;
    let mut workers_bytes = 0;
    let mut errors: Vec<String> = Vec::new();
    for _ in 0..q.repeat {
        let t = Instant::now();
        match api.list_workers(pb::ListWorkersRequest {}).await {
            Ok(r) => {
                list_workers.record(t.elapsed());
                let r = r.into_inner();
                workers_seen = r.workers.len();
                workers_bytes = r.encoded_len();
            }
            Err(s) => errors.push(format!("ListWorkers: {}: {}", s.code(), s.message())),
        }
    }
    let list_workers = list_workers.take();
    eprintln!(
        "  ListWorkers ({workers_seen} workers, {workers_bytes} B): {}",
        list_workers.brief()
    );
    record.set(
        "list_workers",
        json!({"latency": list_workers, "workers": workers_seen, "bytes": workers_bytes}),
    );

    let whole = Latency::new();
    let pages = Latency::new();
    let mut listing = Value::Null;
    for _ in 0..q.repeat {
        let t = Instant::now();
        match list_trials(&mut api, exp, &pages).await {
            Ok(l) => {
                whole.record(t.elapsed());
                listing = l;
            }
            Err(s) => errors.push(format!("ListTrials: {}: {}", s.code(), s.message())),
        }
    }
    let (whole, pages) = (whole.take(), pages.take());
    eprintln!(
        "  ListTrials {listing}: whole listing {}; each page {}",
        whole.brief(),
        pages.brief()
    );
    record.set(
        "list_trials",
        json!({"latency": whole, "page": pages, "listing": listing}),
    );
    let w = bench.close(&qs)?;
    eprintln!(
        "  heartbeats during the queries: {}; lapses {}",
        w.heartbeat.brief(),
        w.counts.lapses
    );
    for e in &errors {
        eprintln!("  error: {e}");
    }
    record.set("query_errors", &errors);
    record.set("heartbeat", w.heartbeat);
    record.set("lapses", w.counts.lapses);
    record.set("window", &w);
    bench.finish(record).await;
    Ok(())
}

/// Lists every trial of the experiment page by page (default page size), timing each call in
/// `pages`. A coordinator that does not page answers everything in its first page, with no
/// next token.
async fn list_trials(
    api: &mut pb::experiment_service_client::ExperimentServiceClient<tonic::transport::Channel>,
    exp: u64,
    pages: &Latency,
) -> Result<Value, tonic::Status> {
    let (mut trials, mut calls, mut bytes) = (0usize, 0u32, 0usize);
    let mut token = String::new();
    loop {
        let t = Instant::now();
        let r = api
            .list_trials(pb::ListTrialsRequest {
                experiment_id: exp,
                page_size: 0,
                page_token: token,
            })
            .await?
            .into_inner();
        pages.record(t.elapsed());
        calls += 1;
        trials += r.trials.len();
        bytes += r.encoded_len();
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    Ok(json!({"trials": trials, "pages": calls, "bytes": bytes}))
}
