//! `chorus experiment ...`: submit, validate, list, describe, watch, pause, resume, kill, update.

use super::{Ctx, emit, listing, required, watch};
use crate::args::{ExperimentCmd, Output, UpdateArgs};
use crate::client::Coordinator;
use crate::error::CliError;
use crate::render;
use crate::summary::{self, Summary, TrialResources};
use chorus_core::CoreError;
use chorus_core::error::{FieldError, SpecErrors};
use chorus_core::limits::MAX_SPEC_BYTES;
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
            warn(&resp.warnings);
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
            wait_for(&coord, ctx, exp.id, output).await
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
                warn(&resp.warnings);
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
                warn(&chorus_search::warnings(&valid));
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
        // Listing and describing show the lifecycle fields (labels, note, archival, origin).
        ExperimentCmd::List { output, filter } => super::lifecycle::list(output, filter, ctx).await,
        ExperimentCmd::Describe { experiment, output } => super::lifecycle::describe(experiment, output, ctx).await,
        ExperimentCmd::Watch { experiment } => {
            let coord = ctx.connect().await?;
            wait_for(&coord, ctx, experiment, Output::Table).await
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
        ExperimentCmd::Lifecycle(cmd) => super::lifecycle::run(cmd, ctx).await,
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
async fn wait_for(coord: &Coordinator, ctx: &Ctx, id: u64, output: Output) -> Result<ExitCode, CliError> {
    let exp = tokio::select! {
        r = watch::watch(coord, id) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nstopped watching; experiment {id} keeps running (chorus experiment watch {id})");
            return Ok(ExitCode::from(130));
        }
    };
    let summary = summarize(coord, ctx, &exp).await;
    emit(&match output {
        Output::Table => match &summary {
            Some((s, _)) => format!("{}\n{}", watch::final_line(&exp), s.text()),
            None => format!("{}\n", watch::final_line(&exp)),
        },
        Output::Json => {
            let mut v = render::experiment_json(&exp);
            if let (Some((s, trials)), Some(obj)) = (&summary, v.as_object_mut()) {
                obj.insert("summary".into(), s.json(trials));
            }
            render::json(&v)
        }
    })?;
    Ok(if exp.state == pb::ExperimentState::Completed as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The summary of an ended experiment, with the trials it was computed from. The experiment
/// has ended either way, so a failure to gather it is a note on stderr, not an error: the exit
/// code still says how the experiment ended.
async fn summarize(coord: &Coordinator, ctx: &Ctx, exp: &pb::Experiment) -> Option<(Summary, Vec<pb::Trial>)> {
    let trials = match listing::trials(coord, ctx, exp.id, None).await {
        Ok(resp) => resp.trials,
        Err(e) => {
            eprint!("note: no summary: {}", e.report());
            return None;
        }
    };
    // The resources a trial asked for are in the stored spec; without it, compute is unknown.
    let req = pb::DescribeExperimentRequest { experiment_id: exp.id };
    let resources = match coord.api().describe_experiment(coord.unary(req)).await {
        Ok(resp) => chorus_core::spec::parse_stored(&resp.into_inner().spec_yaml)
            .ok()
            .map(|s| TrialResources::from(&s.spec.resources)),
        Err(_) => None,
    };
    Some((summary::summarize(exp, &trials, resources), trials))
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

/// The experiment file; `-` reads stdin, so a generated spec can be piped in. At most
/// [`MAX_SPEC_BYTES`] are read (a larger file is refused before it is read, by its size) and
/// the text must be UTF-8: both are spec errors (exit 2), the second with the position of the
/// first byte that is not.
pub(super) fn read_spec(path: &Path) -> Result<String, CliError> {
    let limit = MAX_SPEC_BYTES as u64;
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| CliError::io("cannot read the spec from stdin", e))?;
    } else {
        let what = || format!("cannot read {}", path.display());
        let file = std::fs::File::open(path).map_err(|e| CliError::io(what(), e))?;
        if let Ok(m) = file.metadata()
            && m.is_file()
            && m.len() > limit
        {
            return Err(too_large(&m.len().to_string()));
        }
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| CliError::io(what(), e))?;
    }
    if bytes.len() as u64 > limit {
        return Err(too_large(&format!("more than {limit}")));
    }
    match chorus_core::spec::spec_text(&bytes) {
        Ok(_) => Ok(String::from_utf8(bytes).expect("checked to be UTF-8")),
        Err(CoreError::Spec(errs)) => Err(CliError::Spec(errs)),
        Err(other) => Err(CliError::Usage(other.to_string())),
    }
}

fn too_large(size: &str) -> CliError {
    CliError::Spec(SpecErrors(vec![FieldError {
        path: String::new(),
        location: None,
        message: format!("the experiment file is {size} bytes; the limit is {MAX_SPEC_BYTES} bytes (1 MiB)"),
    }]))
}

/// Settings that are valid but probably not meant, on stderr so stdout stays parseable.
pub(super) fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
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

    #[test]
    fn a_spec_file_is_bounded_and_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let ok = write("ok.yaml", b"name: demo\n");
        assert_eq!(read_spec(&ok).unwrap(), "name: demo\n");
        // Once read whole (50 MB took 33 s to validate, then failed in transport with exit 1).
        let big = write("big.yaml", &vec![b'#'; 3 * MAX_SPEC_BYTES]);
        let err = read_spec(&big).unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::from(2));
        assert_eq!(
            err.report(),
            "error: (document): the experiment file is 3145728 bytes; the limit is 1048576 bytes (1 MiB)\n"
        );
        // Once exit 1 with an I/O error that did not say where.
        let latin1 = write("latin1.yaml", b"name: demo\ndescription: caf\xe9 cr\xe8me\n");
        let err = read_spec(&latin1).unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::from(2));
        assert_eq!(
            err.report(),
            "error: (document) (line 2, column 17): the experiment file is not UTF-8 text: byte 0xE9 at offset 27 does not start a UTF-8 character\n"
        );
    }
}
