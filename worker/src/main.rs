//! `chorus-worker`: parses its flags, takes its data directory, forks the guardian that kills
//! what its trials leave if it dies, and runs the worker until SIGTERM or ctrl-c.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = chorus_worker::Args::parse();
    chorus_worker::init_tracing(args.log_format);
    let config = args.into_config()?;
    let lock = chorus_worker::DataDirLock::acquire(&config.data_dir, chorus_worker::guardian::LOCK_WAIT)?;
    // Forked while this process has one thread: before the runtime.
    let _guardian = match chorus_worker::guardian::start(&lock) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(error = %e, "no guardian: if this worker is killed, its trials' detached processes run until it starts again");
            None
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(chorus_worker::run_locked(
            config,
            lock,
            chorus_worker::shutdown_signal(),
        ))?;
    Ok(())
}
