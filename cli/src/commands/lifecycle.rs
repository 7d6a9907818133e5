//! `chorus experiment label|note|archive|unarchive|delete|continue`, and the lifecycle side of
//! `list` (label and archive filters) and `describe` (labels, note, archival, origin). Talks to
//! the coordinator's `ExperimentLifecycleService`.

use super::{Ctx, emit, required};
use crate::args::Output;
use crate::client::{AuthInterceptor, connect_channel};
use crate::error::CliError;
use crate::render;
use chorus_proto::MAX_MESSAGE_BYTES;
use chorus_proto::pb;
use chorus_proto::pb::experiment_lifecycle_service_client::ExperimentLifecycleServiceClient;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;
use tonic::Request;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Which experiments `chorus experiment list` shows.
#[derive(Debug, Args)]
pub struct ListFilter {
    /// Only experiments with this label (repeat for several: each must match).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Only archived experiments (hidden by default).
    #[arg(long, conflicts_with = "all")]
    pub archived: bool,
    /// Archived experiments too.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum LifecycleCmd {
    /// Add or remove an experiment's labels (`key=value` tags that `list --label` filters on).
    ///
    /// Keys: up to 63 characters of a-z, 0-9, `_ . - /`; values up to 256 bytes; at most 64
    /// labels per experiment.
    Label {
        /// Experiment id.
        experiment: u64,
        /// Labels to set.
        #[arg(long = "add", value_name = "KEY=VALUE", num_args = 1..)]
        add: Vec<String>,
        /// Label keys to remove (applied before `--add`).
        #[arg(long = "remove", value_name = "KEY", num_args = 1..)]
        remove: Vec<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Set an experiment's note (up to 4 KiB; empty clears it).
    Note {
        /// Experiment id.
        experiment: u64,
        /// The note.
        #[arg(required_unless_present = "note")]
        text: Option<String>,
        /// The note, as an option.
        #[arg(long = "note", conflicts_with = "text")]
        note: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Hide an ended experiment from `list` (see `list --archived` and `--all`).
    Archive {
        /// Experiment id.
        experiment: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Show an archived experiment in `list` again.
    Unarchive {
        /// Experiment id.
        experiment: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete an ended experiment's records from storage, and the experiment itself.
    ///
    /// With `--keep-best N`, the experiment, its records (spec, metrics, logs) and the
    /// checkpoints of its N best trials stay; every other trial's checkpoints are deleted. An
    /// interrupted deletion is finished by running the command again (or by the coordinator's
    /// next start).
    Delete {
        /// Experiment id.
        experiment: u64,
        /// Keep the records and the checkpoints of the N best trials.
        #[arg(long, value_name = "N")]
        keep_best: Option<u32>,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Start a new experiment with this one's spec, its searcher learning from this one's
    /// finished trials where it can (random skips points already tried; TPE models them).
    Continue {
        /// Experiment id.
        experiment: u64,
        /// Override a field of the old spec (`--set max_trials=50`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Trials the new experiment creates.
        #[arg(long)]
        max_trials: Option<u64>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

pub(super) type LifecycleClient = ExperimentLifecycleServiceClient<InterceptedService<Channel, AuthInterceptor>>;

/// A client of the lifecycle service and the deadline of each call.
pub(super) struct Lifecycle {
    client: LifecycleClient,
    timeout: Duration,
}

impl Lifecycle {
    pub(super) async fn connect(ctx: &Ctx) -> Result<Self, CliError> {
        let g = &ctx.global;
        let interceptor = AuthInterceptor::new(g.token.as_deref())?;
        let channel = connect_channel(&g.coordinator, g.ca.as_deref()).await?;
        let client = ExperimentLifecycleServiceClient::with_interceptor(channel, interceptor)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Lifecycle {
            client,
            timeout: Duration::from_secs(g.timeout),
        })
    }

    pub(super) fn api(&self) -> LifecycleClient {
        self.client.clone()
    }

    pub(super) fn unary<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }
}

pub async fn run(cmd: LifecycleCmd, ctx: &Ctx) -> Result<ExitCode, CliError> {
    let lc = Lifecycle::connect(ctx).await?;
    match cmd {
        LifecycleCmd::Label {
            experiment,
            add,
            remove,
            output,
        } => {
            if add.is_empty() && remove.is_empty() {
                return Err(CliError::Usage(
                    "nothing to change: give --add KEY=VALUE or --remove KEY".into(),
                ));
            }
            let add = add.iter().map(|kv| split_label(kv)).collect::<Result<_, _>>()?;
            let req = pb::LabelExperimentRequest {
                experiment_id: experiment,
                add,
                remove,
            };
            let exp = lc.api().label_experiment(lc.unary(req)).await?.into_inner();
            emit(&changed(&exp, output, format!("labels {}", fmt_labels(&exp))))?;
        }
        LifecycleCmd::Note {
            experiment,
            text,
            note,
            output,
        } => {
            let req = pb::SetExperimentNoteRequest {
                experiment_id: experiment,
                note: text.or(note).unwrap_or_default(),
            };
            let exp = lc.api().set_experiment_note(lc.unary(req)).await?.into_inner();
            let what = if exp.note.is_empty() {
                "note cleared"
            } else {
                "note set"
            };
            emit(&changed(&exp, output, what.to_string()))?;
        }
        LifecycleCmd::Archive { experiment, output } | LifecycleCmd::Unarchive { experiment, output } => {
            let undo = matches!(cmd, LifecycleCmd::Unarchive { .. });
            let req = pb::ArchiveExperimentRequest {
                experiment_id: experiment,
                undo,
            };
            let exp = lc.api().archive_experiment(lc.unary(req)).await?.into_inner();
            let what = if exp.archived { "archived" } else { "not archived" };
            emit(&changed(&exp, output, what.to_string()))?;
        }
        LifecycleCmd::Delete {
            experiment,
            keep_best,
            yes,
            output,
        } => {
            if !yes {
                confirm_delete(experiment, keep_best)?;
            }
            let req = pb::DeleteExperimentRequest {
                experiment_id: experiment,
                keep_best,
            };
            // Deleting many objects outlasts an ordinary call: no deadline of its own, and an
            // interrupted deletion is finished by asking again.
            let resp = lc.api().delete_experiment(Request::new(req)).await?.into_inner();
            emit(&match output {
                Output::Table => match keep_best {
                    None => format!(
                        "experiment {experiment} deleted ({} objects removed from storage)\n",
                        resp.objects_deleted
                    ),
                    Some(_) => format!(
                        "experiment {experiment}: checkpoints kept for trials {}; {} objects removed from storage\n",
                        if resp.kept_trials.is_empty() {
                            "(none)".to_string()
                        } else {
                            resp.kept_trials
                                .iter()
                                .map(u64::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                        resp.objects_deleted
                    ),
                },
                Output::Json => render::json(&json!({
                    "experiment_id": experiment,
                    "objects_deleted": resp.objects_deleted,
                    "kept_trials": resp.kept_trials,
                    "experiment": resp.experiment.as_ref().map(experiment_json),
                })),
            })?;
        }
        LifecycleCmd::Continue {
            experiment,
            overrides,
            max_trials,
            output,
        } => {
            let req = pb::ContinueExperimentRequest {
                experiment_id: experiment,
                overrides,
                max_trials,
            };
            let resp = lc.api().continue_experiment(lc.unary(req)).await?.into_inner();
            let exp = required(resp.experiment, "experiment")?;
            match output {
                Output::Table => {
                    eprintln!(
                        "experiment {} continues experiment {experiment}: {}",
                        exp.id, resp.message
                    );
                    // The id alone on stdout, as `submit` prints it.
                    emit(&format!("{}\n", exp.id))?;
                }
                Output::Json => {
                    let mut v = experiment_json(&exp);
                    v["searcher_start"] = json!(resp.message);
                    emit(&render::json(&v))?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `chorus experiment list`, filtered on the coordinator by labels and archival.
pub async fn list(output: Output, filter: ListFilter, ctx: &Ctx) -> Result<ExitCode, CliError> {
    let labels: std::collections::HashMap<String, String> = filter
        .labels
        .iter()
        .map(|kv| split_label(kv))
        .collect::<Result<_, _>>()?;
    let archived = match (filter.archived, filter.all) {
        (true, _) => pb::ArchiveFilter::Archived,
        (_, true) => pb::ArchiveFilter::All,
        _ => pb::ArchiveFilter::Unarchived,
    };
    let coord = ctx.connect().await?;
    let filter = pb::ListExperimentsRequest {
        labels,
        archived: archived as i32,
        ..Default::default()
    };
    let experiments = super::listing::experiments(&coord, ctx, filter).await?;
    emit(&match output {
        Output::Table => render::experiments_table(&experiments),
        Output::Json => render::json(&experiments.iter().map(experiment_json).collect::<Value>()),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `chorus experiment describe`, with the experiment's labels, note, archival and origin.
pub async fn describe(experiment: u64, output: Output, ctx: &Ctx) -> Result<ExitCode, CliError> {
    let coord = ctx.connect().await?;
    let req = pb::DescribeExperimentRequest {
        experiment_id: experiment,
    };
    let resp = coord.api().describe_experiment(coord.unary(req)).await?.into_inner();
    let exp = required(resp.experiment, "experiment")?;
    emit(&match output {
        Output::Table => {
            let detail = render::experiment_detail(&exp, &resp.spec_yaml);
            let (fields, spec) = detail.split_once("\n# spec\n").unwrap_or((&detail, ""));
            let mut out = fields.to_string();
            // Aligned with the fields above: the longest key is "max failed trials:".
            let mut line = |k: &str, v: String| out.push_str(&format!("{:<19} {v}\n", format!("{k}:")));
            line("labels", fmt_labels(&exp));
            if !exp.note.is_empty() {
                line("note", exp.note.clone());
            }
            line("archived", if exp.archived { "yes" } else { "no" }.to_string());
            if let Some(o) = exp.continued_from {
                line("continued from", format!("experiment {o}"));
            }
            if exp.deleting {
                line(
                    "deleting",
                    "begun, not finished (run delete again to finish)".to_string(),
                );
            }
            format!("{out}\n# spec\n{spec}")
        }
        Output::Json => render::json(&json!({"experiment": experiment_json(&exp), "spec_yaml": resp.spec_yaml})),
    })?;
    Ok(ExitCode::SUCCESS)
}

/// An experiment as JSON: the usual fields plus its lifecycle.
pub(super) fn experiment_json(e: &pb::Experiment) -> Value {
    let mut v = render::experiment_json(e);
    if let Some(m) = v.as_object_mut() {
        let labels: std::collections::BTreeMap<&String, &String> = e.labels.iter().collect();
        m.insert("labels".into(), json!(labels));
        m.insert("note".into(), json!(e.note));
        m.insert("archived".into(), json!(e.archived));
        m.insert("deleting".into(), json!(e.deleting));
        m.insert("continued_from".into(), json!(e.continued_from));
    }
    v
}

fn changed(exp: &pb::Experiment, output: Output, what: String) -> String {
    match output {
        Output::Table => format!("experiment {} ({}): {what}\n", exp.id, exp.name),
        Output::Json => render::json(&experiment_json(exp)),
    }
}

fn fmt_labels(exp: &pb::Experiment) -> String {
    let mut labels: Vec<String> = exp.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    if labels.is_empty() {
        "(none)".to_string()
    } else {
        labels.join(", ")
    }
}

fn split_label(kv: &str) -> Result<(String, String), CliError> {
    kv.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| CliError::Usage(format!("label {kv:?} is not KEY=VALUE")))
}

/// Asks on the terminal; without one, refuses (exit 2) rather than delete unasked.
fn confirm_delete(experiment: u64, keep_best: Option<u32>) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(format!(
            "refusing to delete experiment {experiment} without confirmation: stdin is not a terminal; pass --yes"
        )));
    }
    let what = match keep_best {
        None => format!("experiment {experiment} and every record of it in storage"),
        Some(n) => format!("the checkpoints of every trial of experiment {experiment} but its {n} best"),
    };
    eprint!("Delete {what}? This cannot be undone. [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CliError::io("reading the answer", e))?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(CliError::Usage("not deleted".into()))
    }
}
