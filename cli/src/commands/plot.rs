//! `chorus plot curves|parallel|importance|pareto|confusion`: pictures drawn by `chorus-plot`
//! from what the coordinator already serves (ListTrials, DescribeExperiment, TrialMetrics).
//!
//! This module only gathers data and turns it into `chorus-plot`'s plain inputs; the pictures and
//! the statistics are that crate's.

use super::trial::history;
use super::{Ctx, emit, listing, required};
use crate::args::{PlotCmd, PlotOut};
use crate::client::Coordinator;
use crate::error::CliError;
use chorus_core::space::Param;
use chorus_core::spec::{ResourceName, SearcherName, ValidSpec};
use chorus_plot as plot;
use chorus_proto::pb;
use chorus_search::AshaSettings;
use futures::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// Metric histories read at once by `plot curves`.
const HISTORY_READS: usize = 8;

pub async fn run(cmd: PlotCmd, ctx: &Ctx) -> Result<ExitCode, CliError> {
    // A picture name without .png or .svg is refused before anything is fetched.
    plot::Format::from_path(&out_path(plot_out(&cmd), "x")).map_err(plot_err)?;
    let coord = ctx.connect().await?;
    match cmd {
        PlotCmd::Curves {
            experiments,
            metric,
            out,
        } => {
            let ids: Vec<String> = experiments.iter().map(u64::to_string).collect();
            let path = out_path(&out, &format!("{}-curves", ids.join("-")));
            let input = curves_input(&coord, ctx, &experiments, metric).await?;
            for s in input.series.iter().filter(|s| s.points.is_empty()) {
                eprintln!("warning: {} has no report of {:?}", s.label, input.metric);
            }
            let drawn = plot::curves(&input, &path).map_err(plot_err)?;
            finish(&out, serde_json::to_value(&drawn), &drawn)
        }
        PlotCmd::Parallel {
            experiment,
            metric,
            out,
        } => {
            let path = out_path(&out, &format!("{experiment}-parallel"));
            let input = trials_input(&coord, ctx, experiment, metric).await?;
            let drawn = plot::parallel(&input, &path).map_err(plot_err)?;
            finish(&out, serde_json::to_value(&drawn), &drawn)
        }
        PlotCmd::Importance {
            experiment,
            metric,
            out,
        } => {
            let path = out_path(&out, &format!("{experiment}-importance"));
            let input = trials_input(&coord, ctx, experiment, metric).await?;
            let (drawn, scores) = plot::importance(&input, &path).map_err(plot_err)?;
            let json = serde_json::to_value(&drawn).and_then(|mut v| {
                v["importance"] = serde_json::to_value(&scores)?;
                Ok(v)
            });
            if !out.describe {
                for s in &scores {
                    let v = s.value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.3}"));
                    let how = match s.measure {
                        plot::Measure::AbsSpearman => "|spearman|",
                        plot::Measure::Eta => "eta",
                    };
                    emit(&format!("{:<24} {how:<10} {v:>6}  ({} trials)\n", s.param, s.trials))?;
                }
            }
            finish(&out, json, &drawn)
        }
        PlotCmd::Pareto {
            experiment,
            metrics,
            out,
        } => {
            let path = out_path(&out, &format!("{experiment}-pareto"));
            let input = pareto_input(&coord, ctx, experiment, &metrics).await?;
            let drawn = plot::pareto(&input, &path).map_err(plot_err)?;
            finish(&out, serde_json::to_value(&drawn), &drawn)
        }
        PlotCmd::Confusion { trial, step, out } => {
            let path = out_path(&out, &format!("trial-{trial}-confusion"));
            let input = confusion_input(&coord, trial, step).await?;
            let drawn = plot::confusion(&input, &path).map_err(plot_err)?;
            finish(&out, serde_json::to_value(&drawn), &drawn)
        }
    }
}

fn plot_out(cmd: &PlotCmd) -> &PlotOut {
    match cmd {
        PlotCmd::Curves { out, .. }
        | PlotCmd::Parallel { out, .. }
        | PlotCmd::Importance { out, .. }
        | PlotCmd::Pareto { out, .. }
        | PlotCmd::Confusion { out, .. } => out,
    }
}

fn out_path(out: &PlotOut, stem: &str) -> PathBuf {
    out.out.clone().unwrap_or_else(|| PathBuf::from(format!("{stem}.png")))
}

fn plot_err(e: plot::PlotError) -> CliError {
    match e {
        plot::PlotError::Io(what, source) => CliError::io(what, source),
        e => CliError::Plot(e),
    }
}

/// Prints the description (`--describe`) or where the picture went.
fn finish(
    out: &PlotOut,
    json: Result<serde_json::Value, serde_json::Error>,
    drawn: &plot::Drawn,
) -> Result<ExitCode, CliError> {
    if out.describe {
        let json = json.map_err(|e| CliError::Usage(format!("describing the picture: {e}")))?;
        emit(&format!("{json:#}\n"))?;
    } else {
        eprintln!("wrote {}", drawn.path);
    }
    Ok(ExitCode::SUCCESS)
}

/// The experiment's record and its validated spec, when the spec can be read back (it is
/// needed only for the scales of parameters and the rungs; without it they are inferred or left
/// out).
async fn describe(coord: &Coordinator, experiment: u64) -> Result<(pb::Experiment, Option<ValidSpec>), CliError> {
    let req = pb::DescribeExperimentRequest {
        experiment_id: experiment,
    };
    let resp = coord.api().describe_experiment(coord.unary(req)).await?.into_inner();
    let exp = required(resp.experiment, "experiment")?;
    let spec = match chorus_core::spec::parse_stored(&resp.spec_yaml) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: experiment {experiment}'s spec could not be read ({e}); parameter scales are guessed");
            None
        }
    };
    Ok((exp, spec))
}

/// The goal of `metric` among the objectives of a trial listing, if it is one.
fn goal_of(resp: &pb::ListTrialsResponse, metric: &str) -> Option<bool> {
    if resp.metric == metric {
        return Some(resp.maximize);
    }
    resp.objectives.iter().find(|o| o.name == metric).map(|o| o.maximize)
}

/// The rung budgets (in steps) of an ASHA or Hyperband experiment, every bracket's; none for
/// other searchers, or when rungs count epochs, which the x axis (steps) cannot place.
fn rung_steps(spec: &ValidSpec) -> Vec<f64> {
    let s = &spec.spec.searcher;
    if !matches!(s.name, SearcherName::Asha | SearcherName::Hyperband) {
        return Vec::new();
    }
    let settings = AshaSettings::from_spec(s);
    if settings.resource != ResourceName::Step {
        return Vec::new();
    }
    let mut rungs: Vec<u64> = (0..settings.brackets).flat_map(|b| settings.rungs(b)).collect();
    rungs.sort_unstable();
    rungs.dedup();
    rungs.into_iter().map(|r| r as f64).collect()
}

async fn curves_input(
    coord: &Coordinator,
    ctx: &Ctx,
    experiments: &[u64],
    metric: Option<String>,
) -> Result<plot::CurvesInput, CliError> {
    let mut series = Vec::new();
    let mut rungs = Vec::new();
    let mut metric = metric;
    let mut maximize = None;
    for &exp in experiments {
        let resp = listing::trials(coord, ctx, exp, None).await?;
        let metric = metric.get_or_insert_with(|| resp.metric.clone()).clone();
        maximize = maximize.or(goal_of(&resp, &metric));
        let (_, spec) = describe(coord, exp).await?;
        rungs.extend(spec.as_ref().map(rung_steps).unwrap_or_default());
        let mut trials = resp.trials;
        trials.sort_by_key(|t| t.seq);
        // Histories are read a few at a time: one stream per trial, without opening hundreds at
        // once on a large sweep.
        let histories: Vec<Vec<pb::MetricPoint>> =
            futures::stream::iter(trials.iter().map(|t| history(coord, t.id, vec![metric.clone()])))
                .buffered(HISTORY_READS)
                .try_collect()
                .await?;
        for (t, points) in trials.iter().zip(histories) {
            let points = points
                .into_iter()
                .filter_map(|p| Some((p.step? as f64, *p.values.get(&metric)?)))
                .collect();
            let label = if experiments.len() > 1 {
                format!("exp {exp} trial {}", t.id)
            } else {
                format!("trial {}", t.id)
            };
            series.push(plot::Series {
                label,
                trial: t.id,
                points,
            });
        }
    }
    let metric = metric.unwrap_or_default();
    rungs.sort_by(f64::total_cmp);
    rungs.dedup();
    // The best trial: the best value any trial reported, by the metric's goal where an
    // experiment names one; a metric that is no objective has no best.
    let best = maximize.and_then(|max| {
        series
            .iter()
            .filter_map(|s| {
                let vals = s.points.iter().map(|p| p.1).filter(|v| v.is_finite());
                let v = if max {
                    vals.reduce(f64::max)
                } else {
                    vals.reduce(f64::min)
                }?;
                Some((s.trial, if max { v } else { -v }))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|b| b.0)
    });
    let title = format!(
        "{metric} by step, experiment{} {}",
        if experiments.len() > 1 { "s" } else { "" },
        join(experiments)
    );
    Ok(plot::CurvesInput {
        title,
        metric,
        series,
        best,
        rungs,
    })
}

fn join(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// A trial's value of `metric`: its best for the experiment's own metric, its last reported
/// one otherwise.
fn trial_value(t: &pb::Trial, resp: &pb::ListTrialsResponse, metric: &str) -> Option<f64> {
    if metric == resp.metric {
        return t.best_value.filter(|v| v.is_finite());
    }
    crate::rank::last_metric(t, metric).filter(|v| v.is_finite())
}

/// A categorical level's name, as the axis lists it.
fn level(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// The axes of the parameters that vary, from the search space when known.
fn axes(spec: Option<&ValidSpec>, trials: &[plot::TrialPoint]) -> Vec<plot::Axis> {
    let Some(spec) = spec else {
        return plot::Axis::infer(trials);
    };
    spec.space
        .iter()
        .filter_map(|(name, p)| {
            let scale = match p {
                Param::Constant { .. } => return None,
                Param::Categorical { values } => plot::Scale::Levels(values.iter().map(level).collect()),
                Param::LogUniform { .. } | Param::LogIntUniform { .. } => plot::Scale::Log,
                Param::Uniform { .. } | Param::IntUniform { .. } | Param::QUniform { .. } => plot::Scale::Linear,
            };
            Some(plot::Axis {
                name: name.clone(),
                scale,
            })
        })
        .collect()
}

/// Parameters and metric value of every trial that has one, for parallel coordinates and
/// importance.
async fn trials_input(
    coord: &Coordinator,
    ctx: &Ctx,
    experiment: u64,
    metric: Option<String>,
) -> Result<plot::ParallelInput, CliError> {
    let resp = listing::trials(coord, ctx, experiment, None).await?;
    let (_, spec) = describe(coord, experiment).await?;
    let metric = metric.unwrap_or_else(|| resp.metric.clone());
    let categorical = |name: &str| {
        matches!(
            spec.as_ref().and_then(|s| s.space.get(name)),
            Some(Param::Categorical { .. })
        )
    };
    let mut trials: Vec<plot::TrialPoint> = Vec::new();
    let mut sorted: Vec<&pb::Trial> = resp.trials.iter().collect();
    sorted.sort_by_key(|t| t.seq);
    for t in sorted {
        let Some(value) = trial_value(t, &resp, &metric) else {
            continue;
        };
        let params: BTreeMap<String, serde_json::Value> = serde_json::from_str(&t.params_json)
            .map_err(|e| CliError::BadResponse(format!("trial {}'s parameters are not a JSON object: {e}", t.id)))?;
        let params = params
            .into_iter()
            .map(|(k, v)| {
                let v = match v.as_f64() {
                    Some(n) if !categorical(&k) => plot::Value::Num(n),
                    _ => plot::Value::Cat(level(&v)),
                };
                (k, v)
            })
            .collect();
        trials.push(plot::TrialPoint {
            trial: t.id,
            params,
            metric: value,
        });
    }
    let skipped = resp.trials.len() - trials.len();
    if skipped > 0 {
        eprintln!("note: {skipped} trial(s) without a value of {metric:?} are left out");
    }
    let axes = axes(spec.as_ref(), &trials);
    Ok(plot::ParallelInput {
        title: format!("experiment {experiment}: {metric}"),
        metric,
        axes,
        trials,
    })
}

/// `A,B` or `A:min,B:max` into names and explicit goals (true = maximise).
fn parse_metrics(s: &str) -> Result<[(String, Option<bool>); 2], CliError> {
    let one = |part: &str| -> Result<(String, Option<bool>), CliError> {
        let (name, goal) = match part.split_once(':') {
            Some((n, g)) => (n, Some(g)),
            None => (part, None),
        };
        let goal = match goal.map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("min" | "minimize") => Some(false),
            Some("max" | "maximize") => Some(true),
            Some(g) => return Err(CliError::Usage(format!("--metrics: goal {g:?} is neither min nor max"))),
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(CliError::Usage("--metrics: a metric name is empty".into()));
        }
        Ok((name.to_string(), goal))
    };
    let parts: Vec<&str> = s.split(',').collect();
    match parts[..] {
        [a, b] => Ok([one(a)?, one(b)?]),
        _ => Err(CliError::Usage(format!(
            "--metrics takes two metrics, A,B or A:min,B:max; got {s:?}"
        ))),
    }
}

async fn pareto_input(
    coord: &Coordinator,
    ctx: &Ctx,
    experiment: u64,
    metrics: &str,
) -> Result<plot::ParetoInput, CliError> {
    let [(a, ga), (b, gb)] = parse_metrics(metrics)?;
    let resp = listing::trials(coord, ctx, experiment, None).await?;
    let goal = |name: &str, given: Option<bool>| {
        given.or_else(|| goal_of(&resp, name)).ok_or_else(|| {
            CliError::Usage(format!(
                "{name:?} is not an objective of experiment {experiment}: give its goal, {name}:min or {name}:max"
            ))
        })
    };
    let (max_a, max_b) = (goal(&a, ga)?, goal(&b, gb)?);
    let points: Vec<plot::ParetoPoint> = resp
        .trials
        .iter()
        .filter_map(|t| {
            Some(plot::ParetoPoint {
                trial: t.id,
                a: trial_value(t, &resp, &a)?,
                b: trial_value(t, &resp, &b)?,
            })
        })
        .collect();
    Ok(plot::ParetoInput {
        title: format!("experiment {experiment}: {a} against {b}"),
        a_name: a,
        b_name: b,
        maximize_a: max_a,
        maximize_b: max_b,
        points,
    })
}

/// The confusion matrix of a trial's report at `step` (the last one holding a matrix when
/// `None`): the builtin trainer reports it as counts `confusion.<true>.<predicted>`.
async fn confusion_input(coord: &Coordinator, trial: u64, step: Option<i64>) -> Result<plot::ConfusionInput, CliError> {
    let points = history(coord, trial, Vec::new()).await?;
    let mut with_matrix = points
        .iter()
        .filter(|p| p.values.keys().any(|k| k.starts_with("confusion.")))
        .filter(|p| step.is_none() || p.step == step);
    let Some(point) = with_matrix.next_back() else {
        return Err(CliError::Usage(match step {
            Some(s) => format!("trial {trial} reported no confusion matrix at step {s}"),
            None => {
                format!("trial {trial} reported no confusion matrix (builtin trials report one after each validation)")
            }
        }));
    };
    let mut cells: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (k, v) in &point.values {
        if let Some((t, p)) = k.strip_prefix("confusion.").and_then(|r| r.split_once('.')) {
            cells.insert((t.to_string(), p.to_string()), *v);
        }
    }
    let mut classes: Vec<String> = cells.keys().flat_map(|(t, p)| [t.clone(), p.clone()]).collect();
    classes.sort();
    classes.dedup();
    // Class indices (a dataset without names) in numeric order.
    if classes.iter().all(|c| c.parse::<u64>().is_ok()) {
        classes.sort_by_key(|c| c.parse::<u64>().unwrap_or(0));
    }
    let counts = classes
        .iter()
        .map(|t| {
            classes
                .iter()
                .map(|p| cells.get(&(t.clone(), p.clone())).copied().unwrap_or(0.0))
                .collect()
        })
        .collect();
    Ok(plot::ConfusionInput {
        title: format!(
            "trial {trial}: confusion matrix{}",
            point.step.map(|s| format!(" at step {s}")).unwrap_or_default()
        ),
        classes,
        counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn metrics_with_and_without_goals() {
        let [(a, ga), (b, gb)] = parse_metrics("loss:min,accuracy:max").unwrap();
        assert_eq!(
            (a.as_str(), ga, b.as_str(), gb),
            ("loss", Some(false), "accuracy", Some(true))
        );
        let [(a, ga), (_, gb)] = parse_metrics("loss,acc").unwrap();
        assert_eq!((a.as_str(), ga, gb), ("loss", None, None));
        assert!(parse_metrics("loss").is_err());
        assert!(parse_metrics("a,b,c").is_err());
        assert!(parse_metrics("a:up,b").is_err());
    }

    fn spec(searcher: &str) -> ValidSpec {
        let yaml = format!(
            "name: s\nmetric: {{name: loss, goal: minimize}}\nparameters:\n  a: {{min: 0, max: 1}}\nsearcher: {searcher}\nmax_trials: 4\ntrial:\n  command: [\"true\"]\n"
        );
        chorus_core::spec::parse(&yaml, &[]).unwrap()
    }

    #[test]
    fn rungs_are_the_searchers_decision_steps() {
        assert_eq!(
            rung_steps(&spec(
                "{name: asha, max_resource: 9, grace_period: 1, reduction_factor: 3}"
            )),
            vec![1.0, 3.0]
        );
        // Hyperband's brackets start higher: 1, 3 and 3 alone, together 1 and 3.
        assert_eq!(
            rung_steps(&spec("{name: hyperband, max_resource: 9, reduction_factor: 3}")),
            vec![1.0, 3.0]
        );
        assert!(rung_steps(&spec("{name: random}")).is_empty());
        // Rungs counted in epochs cannot be placed on a step axis.
        assert!(rung_steps(&spec("{name: asha, max_resource: 9, resource: epoch}")).is_empty());
    }

    #[test]
    fn default_names_follow_the_experiment() {
        let out = PlotOut {
            out: None,
            describe: false,
        };
        assert_eq!(out_path(&out, "7-curves"), Path::new("7-curves.png"));
    }
}
