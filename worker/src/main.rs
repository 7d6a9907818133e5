//! `chorus-worker`: parses its flags and runs the worker until SIGTERM or ctrl-c.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = chorus_worker::Args::parse();
    chorus_worker::init_tracing(args.log_format);
    chorus_worker::run(args.into_config()?, chorus_worker::shutdown_signal()).await?;
    Ok(())
}
