//! `chorus trial list` and `chorus trial logs`.

use super::{Ctx, emit, emit_bytes};
use crate::args::{TabularOutput, TrialCmd};
use crate::error::CliError;
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
            let req = pb::ListTrialsRequest {
                experiment_id: experiment,
            };
            let resp = coord.api().list_trials(coord.unary(req)).await?.into_inner();
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
        TrialCmd::Logs { trial, follow, rank } => {
            let coord = ctx.connect().await?;
            let req = coord.streaming(pb::TrialLogsRequest {
                trial_id: trial,
                follow,
                rank,
            });
            let mut stream = coord.api().trial_logs(req).await?.into_inner();
            let mut attempt = None;
            // No reconnect here: the request has no offset, so resuming would replay the log.
            while let Some(chunk) = stream.message().await? {
                if attempt != Some(chunk.attempt) {
                    // The marker goes to stderr so stdout stays the program's own output; stdout
                    // is flushed after every chunk, so the two interleave in order on a terminal.
                    eprintln!("--- attempt {} ---", chunk.attempt);
                    attempt = Some(chunk.attempt);
                }
                emit_bytes(&chunk.data)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
