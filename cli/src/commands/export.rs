//! `chorus export tensorboard EXP --out DIR`: an experiment's trials as TensorBoard runs (scalars
//! and HParams). Fetches the experiment, its trials and each trial's metric history, then hands
//! them to `crate::tensorboard`, which writes the files.

use super::trial::history;
use super::{Ctx, emit, listing, required};
use crate::args::ExportCmd;
use crate::error::CliError;
use crate::render;
use crate::tensorboard::{self, Export, ScalarPoint, SessionStatus, TrialExport};
use chorus_proto::pb;
use std::collections::BTreeMap;
use std::process::ExitCode;

pub async fn run(cmd: ExportCmd, ctx: &Ctx) -> Result<ExitCode, CliError> {
    match cmd {
        ExportCmd::Tensorboard { experiment, out } => {
            let coord = ctx.connect().await?;
            let req = pb::DescribeExperimentRequest {
                experiment_id: experiment,
            };
            let resp = coord.api().describe_experiment(coord.unary(req)).await?.into_inner();
            let exp = required(resp.experiment, "experiment")?;
            let listing = listing::trials(&coord, ctx, experiment, None).await?;
            let mut trials = listing.trials;
            trials.sort_by_key(|t| t.seq);

            // The stored spec gives each parameter's domain. A spec this CLI cannot read (a newer
            // coordinator's) costs only the domains: types then come from the trials' values.
            let (space, description) = match chorus_core::spec::parse_stored(&resp.spec_yaml) {
                Ok(valid) => (
                    Some(valid.space.iter().map(|(k, p)| (k.clone(), p.clone())).collect()),
                    valid.spec.description,
                ),
                Err(e) => {
                    eprintln!("warning: cannot read the experiment's spec ({e}); hparam domains are left out");
                    (None, String::new())
                }
            };
            let mut objectives: Vec<String> = listing.objectives.iter().map(|o| o.name.clone()).collect();
            if objectives.is_empty() && !listing.metric.is_empty() {
                objectives.push(listing.metric.clone());
            }

            let mut exported = Vec::with_capacity(trials.len());
            let mut points_total = 0;
            for t in &trials {
                let points = history(&coord, t.id, Vec::new()).await?;
                points_total += points.len();
                exported.push(trial_export(t, points, exp.created_unix_ms)?);
            }
            let export = Export {
                name: exp.name.clone(),
                description,
                created_secs: secs(exp.created_unix_ms),
                space,
                objectives,
                trials: exported,
            };
            let now = secs(render::now_ms());
            tensorboard::write(&out, &export, now, &host_name())
                .map_err(|e| CliError::io(format!("writing event files under {}", out.display()), e))?;
            emit(&format!(
                "wrote {} trial runs ({points_total} metric reports) of experiment {experiment} to {}\nview them with: tensorboard --logdir {}\n",
                trials.len(),
                out.display(),
                out.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn trial_export(t: &pb::Trial, points: Vec<pb::MetricPoint>, created_ms: i64) -> Result<TrialExport, CliError> {
    let params: BTreeMap<String, serde_json::Value> = if t.params_json.is_empty() {
        BTreeMap::new()
    } else {
        serde_json::from_str(&t.params_json)
            .map_err(|e| CliError::BadResponse(format!("trial {} has unreadable params: {e}", t.id)))?
    };
    let state = pb::TrialState::try_from(t.state).unwrap_or(pb::TrialState::Unspecified);
    let (status, ended) = match state {
        pb::TrialState::Completed => (SessionStatus::Success, true),
        pb::TrialState::Failed | pb::TrialState::Killed => (SessionStatus::Failure, true),
        _ => (SessionStatus::Running, false),
    };
    // A trial that never started (killed while pending) starts, for TensorBoard, with its
    // experiment.
    let start_ms = if t.started_unix_ms > 0 {
        t.started_unix_ms
    } else {
        created_ms
    };
    Ok(TrialExport {
        id: t.id,
        params,
        status,
        start_secs: secs(start_ms),
        end_secs: ended.then(|| secs(t.ended_unix_ms.max(start_ms))),
        points: points
            .into_iter()
            .map(|p| ScalarPoint {
                step: p.step,
                // The history keeps no report times; the writer makes up a monotone clock.
                wall_time: None,
                values: p.values.into_iter().collect(),
            })
            .collect(),
    })
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// This machine's name for the event file names, as TensorFlow's writer puts it there.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
