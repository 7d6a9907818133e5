//! `chorus worker list`.

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
    }
}
