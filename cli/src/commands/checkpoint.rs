//! `chorus checkpoint list|download`: a trial's committed checkpoints. The coordinator lists
//! them (and names the experiment's storage); the bytes come from object storage directly,
//! never over the control plane.

use super::lifecycle::Lifecycle;
use super::{Ctx, emit};
use crate::args::{Output, StorageArgs};
use crate::error::CliError;
use crate::render;
use chorus_core::checkpoint::{self, CheckpointRef};
use chorus_core::error::CoreError;
use chorus_core::storage::{StorageOptions, StorageUri};
use chorus_core::{ExperimentId, TrialId};
use chorus_proto::pb;
use clap::Subcommand;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum CheckpointCmd {
    /// List a trial's committed checkpoints, newest first.
    List {
        /// Trial id.
        trial: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Download a checkpoint into DIR, every file checked against its manifest (size and
    /// CRC-32C); DIR appears only once all of them are verified.
    Download {
        /// Trial id.
        trial: u64,
        /// The step to download [default: the newest valid checkpoint].
        #[arg(long)]
        step: Option<i64>,
        /// Where to put it; must not exist.
        dir: PathBuf,
        #[command(flatten)]
        storage: StorageArgs,
    },
}

pub async fn run(cmd: CheckpointCmd, ctx: &Ctx) -> Result<ExitCode, CliError> {
    let lc = Lifecycle::connect(ctx).await?;
    match cmd {
        CheckpointCmd::List { trial, output } => {
            let resp = list(&lc, trial).await?;
            emit(&match output {
                Output::Table => render::table(
                    ["STEP", "ATTEMPT", "SIZE", "FILES", "CREATED"]
                        .map(String::from)
                        .to_vec(),
                    resp.checkpoints
                        .iter()
                        .map(|c| {
                            vec![
                                c.step.to_string(),
                                c.attempt.to_string(),
                                render::fmt_bytes(c.size_bytes),
                                c.files.to_string(),
                                render::fmt_time(c.created_unix_ms),
                            ]
                        })
                        .collect(),
                ),
                Output::Json => render::json(&json!({
                    "trial_id": trial,
                    "storage": resp.storage,
                    "checkpoints": resp.checkpoints.iter().map(|c| json!({
                        "step": c.step,
                        "attempt": c.attempt,
                        "size_bytes": c.size_bytes,
                        "files": c.files,
                        "created_unix_ms": c.created_unix_ms,
                        "manifest_key": c.manifest_key,
                    })).collect::<Vec<_>>(),
                })),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        CheckpointCmd::Download {
            trial,
            step,
            dir,
            storage,
        } => {
            if dir.exists() {
                return Err(CliError::Usage(format!("{} already exists", dir.display())));
            }
            let resp = list(&lc, trial).await?;
            let candidates: Vec<CheckpointRef> = resp
                .checkpoints
                .iter()
                .filter(|c| step.is_none_or(|s| c.step == s))
                .map(|c| CheckpointRef::new(c.step, c.attempt))
                .collect();
            if candidates.is_empty() {
                return Err(CliError::Usage(match step {
                    Some(s) => format!("trial {trial} has no committed checkpoint at step {s}"),
                    None => format!("trial {trial} has no committed checkpoint"),
                }));
            }
            let uri = StorageUri::parse(&resp.storage).map_err(|e| CliError::BadResponse(e.to_string()))?;
            let opts = StorageOptions {
                s3_endpoint: storage.s3_endpoint,
            };
            let store = chorus_core::storage::open(&uri, &opts).map_err(|e| CliError::Usage(e.to_string()))?;
            let prefix = store.checkpoints_prefix(ExperimentId(resp.experiment_id), TrialId(trial));
            let last = candidates.len() - 1;
            for (i, at) in candidates.into_iter().enumerate() {
                match checkpoint::download(&store, &prefix, at, &dir).await {
                    Ok(m) => {
                        eprintln!(
                            "downloaded step {} (attempt {}) of trial {trial}: {} files, {}",
                            m.step,
                            m.attempt,
                            m.files.len(),
                            render::fmt_bytes(m.files.iter().map(|f| f.size).sum())
                        );
                        emit(&format!("{}\n", dir.display()))?;
                        return Ok(ExitCode::SUCCESS);
                    }
                    // The newest that verifies is taken by default; an explicit step is exact.
                    Err(e @ CoreError::CorruptCheckpoint { .. }) if step.is_none() && i < last => {
                        eprintln!("skipping {at}: {e}");
                    }
                    Err(e @ CoreError::CorruptCheckpoint { .. }) => {
                        eprintln!("error: data loss: {e}");
                        return Ok(ExitCode::from(1));
                    }
                    Err(e) => return Err(CliError::BadResponse(e.to_string())),
                }
            }
            unreachable!("the last candidate returns")
        }
    }
}

async fn list(lc: &Lifecycle, trial: u64) -> Result<pb::ListCheckpointsResponse, CliError> {
    let req = pb::ListCheckpointsRequest { trial_id: trial };
    Ok(lc.api().list_checkpoints(lc.unary(req)).await?.into_inner())
}
