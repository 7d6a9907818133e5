//! `chorus search preview`: the experiment's searcher run in simulation, locally.

use super::emit;
use super::experiment::{read_spec, validate_locally};
use crate::args::{Output, SearchCmd};
use crate::error::CliError;
use crate::render;
use chorus_core::spec::{ResourceName, SearcherName, ValidSpec};
use chorus_search::AshaSettings;
use chorus_search::preview;
use std::process::ExitCode;

/// Default steps per simulated trial when the searcher names no `max_resource`.
const DEFAULT_STEPS: u64 = 20;

pub fn run(cmd: SearchCmd) -> Result<ExitCode, CliError> {
    match cmd {
        SearchCmd::Preview {
            file,
            trials,
            steps,
            seed,
            overrides,
            output,
        } => {
            let spec = validate_locally(&read_spec(&file)?, &overrides)?;
            let trials = trials.unwrap_or(spec.max_trials);
            let steps = steps.or(spec.spec.searcher.max_resource).unwrap_or(DEFAULT_STEPS);
            let p = preview::simulate(chorus_search::build(&spec), &spec, trials, steps, seed);
            let spend = preview::spend(&p);
            let rungs = rungs(&spec);
            emit(&match output {
                Output::Json => {
                    let mut v = serde_json::to_value(&p).expect("previews serialise");
                    v["spend"] = serde_json::to_value(&spend).expect("spend serialises");
                    v["rungs"] = serde_json::to_value(&rungs).expect("rungs serialise");
                    v["warnings"] = serde_json::to_value(chorus_search::warnings(&spec)).expect("strings serialise");
                    render::json(&v)
                }
                Output::Table => {
                    super::experiment::warn(&chorus_search::warnings(&spec));
                    format!(
                        "{}{}",
                        preview_table(&p, &spec.metric().name, trials, steps),
                        spend_table(&spend, &rungs, &spec)
                    )
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Successive halving's rungs, per bracket (one for `asha`), from the spec alone.
fn rungs(spec: &ValidSpec) -> Vec<Vec<u64>> {
    let s = &spec.spec.searcher;
    if !matches!(s.name, SearcherName::Asha | SearcherName::Hyperband) {
        return Vec::new();
    }
    let a = AshaSettings::from_spec(s);
    (0..a.brackets).map(|b| a.rungs(b)).collect()
}

/// Where the budget went: how many configurations were judged after how much training, and the
/// share of all steps each group used.
fn spend_table(spend: &[preview::Spend], rungs: &[Vec<u64>], spec: &ValidSpec) -> String {
    let s = &spec.spec.searcher;
    let what = match s.resource.unwrap_or_default() {
        ResourceName::Step => "steps",
        ResourceName::Epoch => "epochs",
    };
    let mut out = String::new();
    if let Some(max) = s.max_resource {
        for (b, r) in rungs.iter().enumerate() {
            let list: Vec<String> = r.iter().map(u64::to_string).collect();
            let name = if rungs.len() > 1 {
                format!("bracket {b} rungs")
            } else {
                "rungs".into()
            };
            let first = r.first().map_or(String::new(), |g| {
                format!(
                    " (the first at {:.0} % of max_resource)",
                    100.0 * *g as f64 / max.max(1) as f64
                )
            });
            out += &match list.is_empty() {
                // Hyperband's last bracket may judge nothing before max_resource.
                true => format!("{name}: none, every trial runs to {max}\n"),
                false => format!("{name} at {what} {} then {max}{first}\n", list.join(", ")),
            };
        }
    }
    let rows = spend
        .iter()
        .map(|x| {
            vec![
                x.ran.to_string(),
                x.trials.to_string(),
                x.steps.to_string(),
                format!("{:.0} %", 100.0 * x.share),
            ]
        })
        .collect();
    let header = [
        format!("judged after ({what})"),
        "configurations".into(),
        what.into(),
        "share of budget".into(),
    ];
    out + &render::table(header.to_vec(), rows) + "\n"
}

fn preview_table(p: &preview::Preview, metric: &str, trials: u64, steps: u64) -> String {
    let header = ["trial", "params", "steps", metric, "outcome"];
    let rows = p
        .trials
        .iter()
        .map(|t| {
            let mark = if Some(t.trial) == p.best_trial { " (best)" } else { "" };
            vec![
                t.trial.to_string(),
                render::params_compact(&serde_json::to_string(&t.params).unwrap_or_default()),
                t.steps.to_string(),
                format!("{:.5}{mark}", t.value),
                match (&t.stopped, t.promotions) {
                    (Some(why), _) => why.clone(),
                    (None, 0) => "ran to the end".into(),
                    (None, n) => format!("ran to the end, promoted {n} times"),
                },
            ]
        })
        .collect();
    let stopped = p.trials.iter().filter(|t| t.stopped.is_some()).count();
    format!(
        "{}\n{} trials, {stopped} stopped early; {} of {} steps spent ({:.0} %)\n",
        render::table(header.map(String::from).to_vec(), rows),
        p.trials.len(),
        p.steps,
        trials * steps,
        100.0 * p.steps as f64 / (trials * steps).max(1) as f64
    )
}
