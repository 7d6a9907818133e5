//! `chorus compare EXP...`: the trials of several experiments side by side, best first;
//! filtered, sorted and narrowed to chosen columns on request.
//!
//! Everything is computed here from `ListTrials` and, when a value other than a trial's best of
//! the searcher metric is asked for, from each trial's `TrialMetrics` history (a few streams
//! at a time, so a large sweep neither waits on one stream after another nor floods the
//! coordinator).

use super::trial::history;
use super::{Ctx, emit, listing};
use crate::args::{Agg, CompareArgs, Goal, TabularOutput};
use crate::client::Coordinator;
use crate::error::CliError;
use crate::query::{Filter, Row, Sort, aggregate};
use crate::rank::{CompareGroup, best_overall, shared_metric};
use crate::render;
use futures::{StreamExt, TryStreamExt};
use std::process::ExitCode;

/// Metric histories read at once.
const HISTORY_STREAMS: usize = 8;

pub async fn run(args: CompareArgs, ctx: &Ctx) -> Result<ExitCode, CliError> {
    // Malformed arguments are usage errors before anything is asked of the coordinator.
    let filters = args
        .filters
        .iter()
        .map(|f| Filter::parse(f).map_err(|why| CliError::Usage(format!("bad --filter {f:?}: {why}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let sort = args
        .sort
        .as_deref()
        .map(|s| Sort::parse(s).map_err(|why| CliError::Usage(format!("bad --sort {s:?}: {why}"))))
        .transpose()?;
    if let Some(c) = args.columns.iter().find(|c| c.trim().is_empty()) {
        return Err(CliError::Usage(format!("bad --columns: an empty column name ({c:?})")));
    }
    let coord = ctx.connect().await?;
    let calls = args.experiments.iter().map(|&id| {
        let coord = &coord;
        async move {
            let resp = listing::trials(coord, ctx, id, None).await?;
            Ok::<_, CliError>(CompareGroup::new(id, resp, None))
        }
    });
    let mut groups = futures::future::try_join_all(calls).await?;
    for g in &mut groups {
        choose_value(&coord, g, &args, &filters).await?;
        warn_unknown(g, &filters, sort.as_ref(), &args.columns);
        g.arrange(&filters, sort.as_ref(), args.limit);
    }
    let shared = shared_metric(&groups);
    let best = best_overall(&groups);
    if groups.len() > 1 && best.is_none() && groups.iter().any(|g| g.trials.iter().any(|t| g.value(t).is_some())) {
        eprintln!("note: the experiments optimise different metrics or goals, so no trial is marked best overall");
    }
    let cols = &args.columns;
    emit(&match args.output {
        TabularOutput::Table => {
            let mut out = String::new();
            if groups.len() > 1 {
                out.push_str(&render::side_by_side(&groups));
                out.push('\n');
            }
            out.push_str(&if cols.is_empty() {
                render::compare_table(&groups, shared, best)
            } else {
                render::columns_table(&groups, best, cols)
            });
            out
        }
        TabularOutput::Json if cols.is_empty() => render::compare_json(&groups, best),
        TabularOutput::Json => render::columns_json(&groups, best, cols),
        TabularOutput::Csv if cols.is_empty() => render::compare_csv(&groups, shared, best),
        TabularOutput::Csv => render::columns_csv(&groups, best, cols),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Sets the group's metric, goal and values as asked. The searcher metric's best is what the
/// listing already carries; anything else is read from the histories of the trials that pass
/// the filters not about the value (no point reading a history only to drop its trial).
async fn choose_value(
    coord: &Coordinator,
    g: &mut CompareGroup,
    args: &CompareArgs,
    filters: &[Filter],
) -> Result<(), CliError> {
    let (own, own_max) = (g.metric.clone(), g.maximize);
    if let Some(m) = &args.metric {
        g.metric = m.clone();
    }
    if let Some(goal) = args.goal {
        g.maximize = goal == Goal::Maximize;
    }
    g.agg = args.agg;
    // The listing's `best_value` is the searcher metric's best by the experiment's own goal.
    if args.agg == Agg::Best && g.metric == own && g.maximize == own_max {
        return Ok(());
    }
    let early: Vec<&Filter> = filters.iter().filter(|f| !f.reads_value(&g.metric)).collect();
    let wanted: Vec<u64> = g
        .trials
        .iter()
        .filter(|t| {
            let row = Row::new(g.experiment, t, &g.metric, None, false);
            early.iter().all(|f| f.matches(&row))
        })
        .map(|t| t.id)
        .collect();
    let (metric, maximize, agg) = (g.metric.clone(), g.maximize, g.agg);
    let values: Vec<(u64, Option<f64>)> = futures::stream::iter(wanted)
        .map(|id| {
            let metric = metric.clone();
            async move {
                let points = history(coord, id, vec![metric.clone()]).await?;
                let history: Vec<f64> = points.iter().filter_map(|p| p.values.get(&metric).copied()).collect();
                Ok::<_, CliError>((id, aggregate(&history, agg, maximize)))
            }
        })
        .buffer_unordered(HISTORY_STREAMS)
        .try_collect()
        .await?;
    g.values = values.into_iter().filter_map(|(id, v)| Some((id, v?))).collect();
    Ok(())
}

/// A column no trial has is most likely a typo: say so rather than print an empty result
/// without a word.
fn warn_unknown(g: &CompareGroup, filters: &[Filter], sort: Option<&Sort>, columns: &[String]) {
    if g.trials.is_empty() {
        return;
    }
    let keys = filters
        .iter()
        .map(|f| f.key.as_str())
        .chain(sort.map(|s| s.key.as_str()))
        .chain(columns.iter().map(String::as_str));
    let mut warned = std::collections::BTreeSet::new();
    for k in keys {
        let known = g
            .trials
            .iter()
            .any(|t| Row::new(g.experiment, t, &g.metric, g.value(t), false).knows(k));
        if !known && warned.insert(k) {
            eprintln!("warning: no trial of experiment {} has a column {k:?}", g.experiment);
        }
    }
}
