//! `chorus`, the command line of Chorus: submit experiment files, watch sweeps, list and compare
//! trials, read trial logs, inspect workers. It talks to the coordinator's `ExperimentService`
//! over gRPC and nothing else, except `chorus dataset`, which writes and reads datasets in
//! object storage directly through `chorus-dataset`.
//!
//! It must not link tch, open the coordinator's store or any object storage but a dataset's, or
//! decide anything the coordinator owns: it validates a spec locally only to fail fast, and the
//! coordinator's answer is the one that counts. This file only parses arguments, runs the command and maps the
//! outcome to an exit code (see `error.rs`).

mod args;
mod client;
mod commands;
mod error;
mod query;
mod rank;
mod render;
mod spark;
mod summary;
mod tensorboard;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    // One request at a time: a current-thread runtime is all a CLI needs and starts faster.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", e.report());
            e.exit_code()
        }
    }
}
