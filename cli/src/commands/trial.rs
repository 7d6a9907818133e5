//! `chorus trial list`, `chorus trial metrics` and `chorus trial logs`.

use super::watch::{Backoff, retryable};
use super::{Ctx, emit, emit_bytes, listing};
use crate::args::{TabularOutput, TrialCmd};
use crate::client::Coordinator;
use crate::error::{CliError, code_name};
use crate::rank::{SortKey, sort_trials};
use crate::render;
use chorus_proto::pb;
use std::process::ExitCode;

pub async fn run(cmd: TrialCmd, ctx: &Ctx) -> Result<ExitCode, CliError> {
    match cmd {
        TrialCmd::List {
            experiment,
            sort,
            limit,
            output,
        } => {
            let coord = ctx.connect().await?;
            // Unsorted, the first trials by creation order are the first pages'.
            let first = if sort.is_none() { limit } else { None };
            let resp = listing::trials(&coord, ctx, experiment, first).await?;
            let mut trials = resp.trials;
            trials.sort_by_key(|t| t.seq);
            if let Some(name) = &sort {
                let key = SortKey::for_metric(name, &resp.metric, resp.maximize);
                if !trials.is_empty() && trials.iter().all(|t| key.value(t).is_none()) {
                    eprintln!("warning: no trial of experiment {experiment} has reported {name:?}");
                }
                sort_trials(&mut trials, &key);
            }
            if let Some(n) = limit {
                trials.truncate(n);
            }
            let now = render::now_ms();
            emit(&match output {
                TabularOutput::Table => render::trials_table(&trials, &resp.metric, now),
                TabularOutput::Json => render::trials_json(&trials, &resp.metric, resp.maximize),
                TabularOutput::Csv => render::trials_csv(&trials, &resp.metric, now),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        TrialCmd::Metrics {
            trial,
            metrics,
            min_step,
            max_step,
            spark,
            output,
        } => {
            let coord = ctx.connect().await?;
            let req = pb::TrialMetricsRequest {
                trial_id: trial,
                metrics: metrics.clone(),
                min_step,
                max_step,
                page_size: 0,
                after: String::new(),
            };
            let points = read_metrics(&coord, req).await?;
            let names = render::metric_columns(&points, &metrics);
            for m in names
                .iter()
                .filter(|m| !points.iter().any(|p| p.values.contains_key(*m)))
            {
                eprintln!("warning: trial {trial} has no report of {m:?} in the steps asked for");
            }
            emit(&match output {
                _ if spark => render::metrics_spark(&points, &names, spark_width(&names)),
                TabularOutput::Table => render::metrics_table(&points, &names),
                TabularOutput::Json => render::metrics_json(trial, &points),
                TabularOutput::Csv => render::metrics_csv(&points, &names),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        TrialCmd::Logs { trial, follow, rank } => {
            let coord = ctx.connect().await?;
            let mut attempt = None;
            let mut after = String::new();
            let mut backoff = Backoff::default();
            // While following, a lost coordinator (restart, network) is reconnected to, resuming
            // after the last chunk printed, so nothing is repeated or skipped.
            loop {
                match print_logs(&coord, trial, follow, rank, &mut after, &mut attempt, &mut backoff).await {
                    Ok(()) => return Ok(ExitCode::SUCCESS),
                    Err(LogsError::Rpc(status)) if follow && retryable(status.code()) => {
                        let delay = backoff.next_delay();
                        eprintln!(
                            "lost the coordinator ({}: {}); reconnecting in {delay:.1?}",
                            code_name(status.code()),
                            status.message()
                        );
                        tokio::time::sleep(delay).await;
                    }
                    Err(LogsError::Rpc(status)) => return Err(CliError::Rpc(status)),
                    Err(LogsError::Cli(e)) => return Err(e),
                }
            }
        }
    }
}

/// Points in a sparkline: what fits beside the name and the numbers on a terminal, else 60.
fn spark_width(names: &[String]) -> usize {
    // Room for `  min X  max X  last X  (N points)` with six-digit numbers.
    const STATS: usize = 60;
    let name = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) + 2;
    match comfy_table::Table::new().width() {
        Some(w) => usize::from(w).saturating_sub(name + STATS).max(10),
        None => 60,
    }
}

/// Every report of `metrics` (all of them when empty) in a trial's history, oldest first.
pub(super) async fn history(
    coord: &Coordinator,
    trial: u64,
    metrics: Vec<String>,
) -> Result<Vec<pb::MetricPoint>, CliError> {
    let req = pb::TrialMetricsRequest {
        trial_id: trial,
        metrics,
        ..Default::default()
    };
    read_metrics(coord, req).await
}

/// Most times a metrics read that lost the coordinator is resumed before giving up.
const METRICS_RETRIES: u32 = 5;

/// Reads the whole (filtered) history, page by page; a lost coordinator is asked again for the
/// points after the last page received, so none is repeated or skipped.
pub(super) async fn read_metrics(
    coord: &Coordinator,
    mut req: pb::TrialMetricsRequest,
) -> Result<Vec<pb::MetricPoint>, CliError> {
    let mut points = Vec::new();
    let mut backoff = Backoff::default();
    let mut retries = 0;
    loop {
        let read = async {
            let mut stream = coord
                .api()
                .trial_metrics(coord.streaming(req.clone()))
                .await?
                .into_inner();
            while let Some(page) = stream.message().await? {
                points.extend(page.points);
                req.after = page.cursor;
            }
            Ok::<_, tonic::Status>(())
        };
        match read.await {
            Ok(()) => return Ok(points),
            Err(status) if retryable(status.code()) && retries < METRICS_RETRIES => {
                retries += 1;
                let delay = backoff.next_delay();
                eprintln!(
                    "lost the coordinator ({}: {}); resuming in {delay:.1?}",
                    code_name(status.code()),
                    status.message()
                );
                tokio::time::sleep(delay).await;
            }
            Err(status) => return Err(CliError::Rpc(status)),
        }
    }
}

/// Why one logs stream stopped: the coordinator's status (maybe worth a reconnect) or a local
/// failure (stdout closed).
enum LogsError {
    Rpc(tonic::Status),
    Cli(CliError),
}

impl From<tonic::Status> for LogsError {
    fn from(s: tonic::Status) -> Self {
        LogsError::Rpc(s)
    }
}

/// Streams a trial's log from just after `after`, advancing it past every chunk printed.
async fn print_logs(
    coord: &Coordinator,
    trial: u64,
    follow: bool,
    rank: u32,
    after: &mut String,
    attempt: &mut Option<u32>,
    backoff: &mut Backoff,
) -> Result<(), LogsError> {
    let req = coord.streaming(pb::TrialLogsRequest {
        trial_id: trial,
        follow,
        rank,
        after: after.clone(),
    });
    let mut stream = coord.api().trial_logs(req).await?.into_inner();
    while let Some(chunk) = stream.message().await? {
        backoff.reset();
        if *attempt != Some(chunk.attempt) {
            // The marker goes to stderr so stdout stays the program's own output; stdout is
            // flushed after every chunk, so the two interleave in order on a terminal.
            eprintln!("--- attempt {} ---", chunk.attempt);
            *attempt = Some(chunk.attempt);
        }
        emit_bytes(&chunk.data).map_err(LogsError::Cli)?;
        *after = chunk.cursor;
    }
    Ok(())
}
