//! `chorus-worker`: parses its flags, takes its data directory, forks the guardian that kills
//! what its trials leave if it dies, and runs the worker until SIGTERM or ctrl-c.
//!
//! Exit codes: 0 after a graceful stop; 1 when the worker fails (the coordinator refused it for
//! good, the data directory is taken, ...); 2 for invalid settings (also under
//! `--check-config`); 3 when a newer registration of its worker id replaced it (its trials were
//! killed; restarting it registers again only once the other instance's lease lapses).

use clap::Parser;
use std::process::ExitCode;

const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_REPLACED: u8 = 3;

fn main() -> ExitCode {
    let args = chorus_worker::Args::parse();
    chorus_worker::init_tracing(args.log_format);
    let check_only = args.check_config;
    let requested_gpus = args.gpus;
    // The GPUs are found after the guardian is forked (see `into_config_without_gpus`), except
    // for `--check-config`, which forks nothing.
    let config = if check_only {
        args.into_config()
    } else {
        args.into_config_without_gpus()
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        print!("{}", config.describe());
        return ExitCode::SUCCESS;
    }
    match run(config, requested_gpus) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the worker stops");
            eprintln!("error: {e}");
            ExitCode::from(match e {
                chorus_worker::WorkerError::Fenced { .. } => EXIT_REPLACED,
                chorus_worker::WorkerError::Config(_) => EXIT_CONFIG,
                _ => EXIT_FAILED,
            })
        }
    }
}

fn run(mut config: chorus_worker::WorkerConfig, requested_gpus: Option<u32>) -> Result<(), chorus_worker::WorkerError> {
    let lock = chorus_worker::DataDirLock::acquire(&config.data_dir, chorus_worker::guardian::LOCK_WAIT)?;
    // Forked while this process has one thread: before the runtime.
    let _guardian = match chorus_worker::guardian::start(&lock) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(error = %e, "no guardian: if this worker is killed, its trials' detached processes run until it starts again");
            None
        }
    };
    config.gpu_ids = chorus_worker::gpu::worker_gpus(requested_gpus);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| chorus_worker::WorkerError::Task(format!("cannot start the async runtime: {e}")))?
        .block_on(chorus_worker::run_locked(
            config,
            lock,
            chorus_worker::shutdown_signal(),
        ))
}
