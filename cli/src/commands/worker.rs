//! `chorus worker list` and `chorus worker drain`.

use super::{Ctx, emit};
use crate::args::{Output, WorkerCmd};
use crate::error::CliError;
use crate::render;
use chorus_proto::pb;
use std::process::ExitCode;

pub async fn run(cmd: WorkerCmd, ctx: &Ctx) -> Result<ExitCode, CliError> {
    match cmd {
        WorkerCmd::List { output } => {
            let coord = ctx.connect().await?;
            let resp = coord
                .api()
                .list_workers(coord.unary(pb::ListWorkersRequest {}))
                .await?
                .into_inner();
            emit(&match output {
                Output::Table => render::workers_table(&resp.workers, render::now_ms()),
                Output::Json => render::json(
                    &resp
                        .workers
                        .iter()
                        .map(render::worker_json)
                        .collect::<serde_json::Value>(),
                ),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        WorkerCmd::Drain { worker, undo, output } => {
            let coord = ctx.connect().await?;
            let w = coord
                .api()
                .drain_worker(coord.unary(pb::DrainWorkerRequest {
                    worker_id: worker,
                    undo,
                }))
                .await?
                .into_inner();
            emit(&match output {
                Output::Table => format!(
                    "worker {} {}; running trials: {}\n",
                    w.id,
                    if w.draining {
                        "drained: no new trials are placed on it"
                    } else {
                        "takes new trials"
                    },
                    if w.running_trials.is_empty() {
                        "none".to_string()
                    } else {
                        w.running_trials
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    }
                ),
                Output::Json => render::json(&render::worker_json(&w)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
