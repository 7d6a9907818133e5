//! `chorus search preview`: the experiment's searcher run in simulation, locally.

use super::emit;
use super::experiment::{read_spec, validate_locally};
use crate::args::{Output, SearchCmd};
use crate::error::CliError;
use crate::render;
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
            emit(&match output {
                Output::Json => render::json(&serde_json::to_value(&p).expect("previews serialise")),
                Output::Table => preview_table(&p, &spec.metric().name, trials, steps),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
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
