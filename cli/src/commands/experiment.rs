//! `chorus experiment ...`: submit, validate, list, describe, watch, pause, resume, kill, update.

use super::{Ctx, emit, required, watch};
use crate::args::{ExperimentCmd, Output, UpdateArgs};
use crate::client::Coordinator;
use crate::error::CliError;
use crate::render;
use chorus_core::CoreError;
use chorus_core::spec::ValidSpec;
use chorus_proto::pb;
use serde_json::json;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

pub async fn run(cmd: ExperimentCmd, ctx: &Ctx) -> Result<ExitCode, CliError> {
    match cmd {
        ExperimentCmd::Submit {
            file,
            sets,
            wait,
            output,
        } => {
            let yaml = read_spec(&file)?;
            // Validating here first means a bad file is exit 2 with line numbers even when the
            // coordinator is down; the coordinator validates again with its own defaults.
            validate_locally(&yaml, &sets.overrides)?;
            let coord = ctx.connect().await?;
            let req = pb::SubmitExperimentRequest {
                spec_yaml: yaml,
                overrides: sets.overrides,
            };
            let resp = coord.api().submit_experiment(coord.unary(req)).await?.into_inner();
            let exp = required(resp.experiment, "experiment")?;
            if output == Output::Table {
                eprintln!(
                    "submitted experiment {} ({}): {} trials, {} at a time",
                    exp.id, exp.name, exp.max_trials, exp.parallel_trials
                );
                // The id alone on stdout, so `EXP=$(chorus experiment submit ...)` works.
                emit(&format!("{}\n", exp.id))?;
            }
            if !wait {
                if output == Output::Json {
                    emit(&render::json(&render::experiment_json(&exp)))?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            wait_for(&coord, exp.id, output).await
        }
        ExperimentCmd::Validate {
            file,
            sets,
            remote,
            output,
        } => {
            let yaml = read_spec(&file)?;
            if remote {
                let coord = ctx.connect().await?;
                let req = pb::ValidateExperimentRequest {
                    spec_yaml: yaml,
                    overrides: sets.overrides,
                };
                let resp = coord.api().validate_experiment(coord.unary(req)).await?.into_inner();
                emit(&match output {
                    Output::Table if resp.grid_size > 0 => {
                        format!(
                            "{}# grid size: {}\n",
                            with_newline(&resp.normalized_yaml),
                            resp.grid_size
                        )
                    }
                    Output::Table => with_newline(&resp.normalized_yaml),
                    Output::Json => {
                        render::json(&json!({"normalized_yaml": resp.normalized_yaml, "grid_size": resp.grid_size}))
                    }
                })?;
            } else {
                let valid = validate_locally(&yaml, &sets.overrides)?;
                emit(&match output {
                    // A comment keeps stdout valid YAML, so it can be piped into a file.
                    Output::Table => format!("{}# trials: {}\n", with_newline(&valid.to_yaml()), valid.max_trials),
                    Output::Json => {
                        render::json(&json!({"normalized_yaml": valid.to_yaml(), "max_trials": valid.max_trials}))
                    }
                })?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ExperimentCmd::List { output } => {
            let coord = ctx.connect().await?;
            let resp = coord
                .api()
                .list_experiments(coord.unary(pb::ListExperimentsRequest {}))
                .await?
                .into_inner();
            emit(&match output {
                Output::Table => render::experiments_table(&resp.experiments),
                Output::Json => render::json(
                    &resp
                        .experiments
                        .iter()
                        .map(render::experiment_json)
                        .collect::<serde_json::Value>(),
                ),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        ExperimentCmd::Describe { experiment, output } => {
            let coord = ctx.connect().await?;
            let req = pb::DescribeExperimentRequest {
                experiment_id: experiment,
            };
            let resp = coord.api().describe_experiment(coord.unary(req)).await?.into_inner();
            let exp = required(resp.experiment, "experiment")?;
            emit(&match output {
                Output::Table => render::experiment_detail(&exp, &resp.spec_yaml),
                Output::Json => {
                    render::json(&json!({"experiment": render::experiment_json(&exp), "spec_yaml": resp.spec_yaml}))
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        ExperimentCmd::Watch { experiment } => {
            let coord = ctx.connect().await?;
            wait_for(&coord, experiment, Output::Table).await
        }
        ExperimentCmd::Pause { experiment, output } => {
            let coord = ctx.connect().await?;
            let exp = coord
                .api()
                .pause_experiment(coord.unary(exp_ref(experiment)))
                .await?
                .into_inner();
            emit(&state_change(&exp, output))?;
            Ok(ExitCode::SUCCESS)
        }
        ExperimentCmd::Resume { experiment, output } => {
            let coord = ctx.connect().await?;
            let exp = coord
                .api()
                .resume_experiment(coord.unary(exp_ref(experiment)))
                .await?
                .into_inner();
            emit(&state_change(&exp, output))?;
            Ok(ExitCode::SUCCESS)
        }
        ExperimentCmd::Kill { experiment, output } => {
            let coord = ctx.connect().await?;
            let exp = coord
                .api()
                .kill_experiment(coord.unary(exp_ref(experiment)))
                .await?
                .into_inner();
            emit(&state_change(&exp, output))?;
            Ok(ExitCode::SUCCESS)
        }
        ExperimentCmd::Update(UpdateArgs {
            experiment,
            max_trials,
            parallel_trials,
            max_failed_trials,
            output,
        }) => {
            let coord = ctx.connect().await?;
            let req = pb::UpdateExperimentRequest {
                experiment_id: experiment,
                max_trials,
                parallel_trials,
                max_failed_trials,
            };
            let exp = coord.api().update_experiment(coord.unary(req)).await?.into_inner();
            emit(&match output {
                Output::Table => format!(
                    "experiment {} ({}): max_trials {}, parallel_trials {}, max_failed_trials {}\n",
                    exp.id,
                    exp.name,
                    exp.max_trials,
                    exp.parallel_trials,
                    exp.max_failed_trials.map_or("unlimited".to_string(), |v| v.to_string())
                ),
                Output::Json => render::json(&render::experiment_json(&exp)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Watches until the experiment ends, prints how it ended, and turns that into the exit code.
/// Ctrl-C stops watching, not the experiment, and says so.
async fn wait_for(coord: &Coordinator, id: u64, output: Output) -> Result<ExitCode, CliError> {
    let exp = tokio::select! {
        r = watch::watch(coord, id) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nstopped watching; experiment {id} keeps running (chorus experiment watch {id})");
            return Ok(ExitCode::from(130));
        }
    };
    emit(&match output {
        Output::Table => format!("{}\n", watch::final_line(&exp)),
        Output::Json => render::json(&render::experiment_json(&exp)),
    })?;
    Ok(if exp.state == pb::ExperimentState::Completed as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn exp_ref(experiment_id: u64) -> pb::ExperimentRef {
    pb::ExperimentRef { experiment_id }
}

fn state_change(exp: &pb::Experiment, output: Output) -> String {
    match output {
        Output::Table => format!(
            "experiment {} ({}): {}\n",
            exp.id,
            exp.name,
            chorus_core::convert::experiment_state_name(exp.state)
        ),
        Output::Json => render::json(&render::experiment_json(exp)),
    }
}

/// The experiment file; `-` reads stdin, so a generated spec can be piped in.
pub(super) fn read_spec(path: &Path) -> Result<String, CliError> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::io("cannot read the spec from stdin", e))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| CliError::io(format!("cannot read {}", path.display()), e))
}

pub(super) fn validate_locally(yaml: &str, overrides: &[String]) -> Result<ValidSpec, CliError> {
    chorus_core::spec::parse(yaml, overrides).map_err(|e| match e {
        CoreError::Spec(errs) => CliError::Spec(errs),
        other => CliError::Usage(other.to_string()),
    })
}

fn with_newline(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_validation_reports_spec_errors_as_exit_2() {
        let yaml = "name: demo\nmetric: {name: loss, goal: minimize}\nsearcher: {name: random}\n\
                    max_trials: 3\nparallel_trials: 0\ntrial: {command: [echo]}\n";
        let err = validate_locally(yaml, &[]).unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::from(2));
        let report = err.report();
        assert!(
            report.starts_with("error: parallel_trials (line 5, column "),
            "{report}"
        );
        assert!(report.contains("must be at least 1"), "{report}");

        let fixed = validate_locally(yaml, &["parallel_trials=2".into()]).unwrap();
        assert_eq!(fixed.max_trials, 3);
    }
}
