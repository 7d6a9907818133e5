//! `chorus compare EXP...`: the trials of several experiments side by side, best first.

use super::{Ctx, emit, listing};
use crate::args::{CompareArgs, TabularOutput};
use crate::error::CliError;
use crate::rank::{CompareGroup, best_overall, shared_metric};
use crate::render;
use std::process::ExitCode;

pub async fn run(args: CompareArgs, ctx: &Ctx) -> Result<ExitCode, CliError> {
    let coord = ctx.connect().await?;
    let calls = args.experiments.iter().map(|&id| {
        let coord = &coord;
        async move {
            let resp = listing::trials(coord, ctx, id, None).await?;
            Ok::<_, CliError>(CompareGroup::new(id, resp, args.limit))
        }
    });
    let groups = futures::future::try_join_all(calls).await?;
    let shared = shared_metric(&groups);
    let best = best_overall(&groups);
    if groups.len() > 1 && best.is_none() && groups.iter().any(|g| g.trials.iter().any(|t| t.best_value.is_some())) {
        eprintln!("note: the experiments optimise different metrics or goals, so no trial is marked best overall");
    }
    emit(&match args.output {
        TabularOutput::Table => render::compare_table(&groups, shared, best),
        TabularOutput::Json => render::compare_json(&groups, best),
        TabularOutput::Csv => render::compare_csv(&groups, shared, best),
    })?;
    Ok(ExitCode::SUCCESS)
}
