//! One module per command group. Each command connects only if it needs the coordinator, prints
//! its result on stdout, and returns the exit code for outcomes that are not errors.

pub(crate) mod checkpoint;
mod compare;
mod dataset;
mod experiment;
mod export;
mod health;
pub(crate) mod lifecycle;
mod listing;
mod plot;
mod search;
mod trial;
mod watch;
mod worker;

use crate::args::{Cli, Command, GlobalOpts};
use crate::client::Coordinator;
use crate::error::CliError;
use clap::CommandFactory;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let ctx = Ctx { global: cli.global };
    match cli.command {
        Command::Experiment(cmd) => experiment::run(cmd, &ctx).await,
        Command::Checkpoint(cmd) => checkpoint::run(cmd, &ctx).await,
        Command::Trial(cmd) => trial::run(cmd, &ctx).await,
        Command::Compare(args) => compare::run(args, &ctx).await,
        Command::Worker(cmd) => worker::run(cmd, &ctx).await,
        Command::Health(args) => health::run(args, &ctx).await,
        Command::Dataset(cmd) => dataset::run(cmd).await,
        Command::Search(cmd) => search::run(cmd),
        Command::Plot(cmd) => plot::run(cmd, &ctx).await,
        Command::Export(cmd) => export::run(cmd, &ctx).await,
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "chorus", &mut buf);
            emit_bytes(&buf)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What every command may need from the global options.
pub struct Ctx {
    global: GlobalOpts,
}

impl Ctx {
    async fn connect(&self) -> Result<Coordinator, CliError> {
        let g = &self.global;
        Coordinator::connect(
            &g.coordinator,
            g.ca.as_deref(),
            g.token.as_deref(),
            Duration::from_secs(g.timeout),
        )
        .await
    }

    /// The page size to ask for; 0 leaves it to the coordinator.
    fn page_size(&self) -> u32 {
        self.global.page_size.unwrap_or(0)
    }
}

/// Writes a command's result to stdout. Not `print!`, which panics when the reader has gone away
/// (`chorus trial list | head`); a closed pipe comes back as an error that `main` ignores.
fn emit(s: &str) -> Result<(), CliError> {
    emit_bytes(s.as_bytes())
}

fn emit_bytes(b: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(b)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::io("writing to stdout", e))
}

/// A response field that proto3 makes optional but the API always sets.
fn required<T>(v: Option<T>, what: &str) -> Result<T, CliError> {
    v.ok_or_else(|| CliError::BadResponse(format!("the coordinator's response has no {what}")))
}
