//! `chorus-scale`: a scale benchmark of the Chorus coordinator.
//!
//! It starts the coordinator binary it is given (`--coordinator PATH`) on 127.0.0.1 with a
//! fresh data directory and no tokens (a loopback coordinator allows that), then plays
//! thousands of workers against it over real gRPC: each simulated worker holds its own
//! connection (its own tonic `Channel`, never shared), registers, keeps its Assignments stream
//! open, renews its lease at the interval the coordinator names, and plays the trials it is
//! given as a loop of ReportTrial calls instead of a process. Experiments are submitted through
//! ExperimentService like the CLI does.
//!
//! What it measures, per scenario (each prints one JSON line on stdout, a summary on stderr):
//! - `idle --workers N`: registration time, and with N leases held, the coordinator's CPU and
//!   memory, heartbeat latency and lapsed leases (a heartbeat answered NOT_FOUND).
//! - `reports --workers N --in-flight T`: T trials reporting metric events back to back while
//!   the other workers heartbeat: sustained reports/s and events/s, ReportTrial and heartbeat
//!   latency, lapses.
//! - `growth`: the median stopping rule with T trials × S steps; ReportTrial latency and bytes
//!   written per report for each tenth of the run, so a cost that grows with history shows.
//! - `queries --workers W --trials N`: N trials run to the end (one metric each), then
//!   ListWorkers and ListTrials are timed while the W workers keep heartbeating.
//!
//! The coordinator's CPU time (utime + stime of `/proc/PID/stat`), peak RSS (`VmHWM`) and bytes
//! written to storage (`write_bytes` of `/proc/PID/io`) are read at the edges of each
//! measurement window; the generator's own CPU is reported beside them, since both share the
//! machine. Latencies are HdrHistogram percentiles of every call in the window, as seen by the
//! caller (so they include the client's share of the machine too).
//!
//! A run stops itself at `--time-limit` and still prints its line, with `completed: false` and
//! the phase it was in: an old build may not finish the largest cases. `table FILE...` prints
//! result lines side by side (`bench/scale.sh` runs both builds and calls it).
//!
//! This is a benchmark, not a test: it asserts nothing about the figures.

mod coordinator;
mod fleet;
mod scenario;
mod stats;
mod table;

use clap::{Parser, Subcommand};
use fleet::Encoding;
use scenario::{Common, Record};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "chorus-scale",
    about = "Scale benchmark of the Chorus coordinator with simulated workers"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// The chorus-coordinator binary to start and measure.
    #[arg(long, global = true)]
    coordinator: Option<PathBuf>,
    /// A name for this build in the results (e.g. base, new).
    #[arg(long, global = true, default_value = "")]
    label: String,
    /// How metric events are encoded: typed (step and values), json (the text older
    /// coordinators read), or both (every build reads it).
    #[arg(long, global = true, value_enum, default_value_t = Encoding::Both)]
    metric_encoding: Encoding,
    /// Stop the run after this long and report what it measured and where it stopped.
    #[arg(long, global = true, default_value = "15m", value_parser = humantime::parse_duration)]
    time_limit: Duration,
    /// Length of the measurement window (idle, reports).
    #[arg(long, global = true, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Time between the load reaching its size and the window (idle, reports).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Workers connecting and registering at once while the fleet comes up.
    #[arg(long, global = true, default_value_t = 256)]
    connect_concurrency: usize,
    /// An extra flag for the coordinator (repeatable), e.g. --coordinator-arg=--lease-ttl=20s.
    #[arg(long = "coordinator-arg", global = true, allow_hyphen_values = true)]
    coordinator_args: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// N workers hold their leases and nothing else happens.
    Idle {
        #[arg(long, default_value_t = 1000)]
        workers: usize,
    },
    /// T trials report metrics as fast as the coordinator takes them; the other workers idle.
    Reports {
        #[arg(long, default_value_t = 2000)]
        workers: usize,
        #[arg(long, default_value_t = 1000)]
        in_flight: u32,
        /// Metric events in each ReportTrial call.
        #[arg(long, default_value_t = 1)]
        events_per_call: u32,
        /// Steps after which a trial exits succeeded and its slot takes the next (default: never).
        #[arg(long)]
        steps: Option<u64>,
        /// The experiment's max_trials.
        #[arg(long, default_value_t = 100_000)]
        max_trials: u64,
    },
    /// The median stopping rule over T trials × S steps; figures per slice of the run.
    Growth {
        #[arg(long, default_value_t = 200)]
        in_flight: u32,
        #[arg(long, default_value_t = 500)]
        steps: u64,
        #[arg(long, default_value_t = 10)]
        slices: u32,
    },
    /// ListWorkers and ListTrials over W workers and an experiment of N finished trials.
    Queries {
        #[arg(long, default_value_t = 5000)]
        workers: usize,
        #[arg(long, default_value_t = 100_000)]
        trials: u64,
        /// Trials running at once while the experiment fills (at most one per worker).
        #[arg(long, default_value_t = 1000)]
        parallel: u32,
        /// Times each listing is made.
        #[arg(long, default_value_t = 5)]
        repeat: u32,
    },
    /// Prints result files (JSON lines) side by side.
    Table { files: Vec<PathBuf> },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Idle { .. } => "idle",
            Scenario::Reports { .. } => "reports",
            Scenario::Growth { .. } => "growth",
            Scenario::Queries { .. } => "queries",
            Scenario::Table { .. } => "table",
        }
    }

    /// The case as the table groups it: the scenario and its sizes.
    fn case(&self) -> String {
        match self {
            Scenario::Idle { workers } => format!("idle: {workers} workers"),
            Scenario::Reports {
                workers,
                in_flight,
                events_per_call,
                steps,
                ..
            } => {
                let steps = steps.map_or(String::new(), |s| format!(", {s} steps"));
                format!("reports: {in_flight} in flight of {workers} workers, {events_per_call} events/call{steps}")
            }
            Scenario::Growth { in_flight, steps, .. } => {
                format!("growth: {in_flight} trials x {steps} steps, median rule")
            }
            Scenario::Queries { workers, trials, .. } => format!("queries: {workers} workers, {trials} trials"),
            Scenario::Table { .. } => "table".into(),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::Table { files } = &cli.scenario {
        return table::print(files);
    }
    let Some(coordinator) = cli.coordinator.clone() else {
        anyhow::bail!("--coordinator PATH is required");
    };
    let nofile = coordinator::raise_nofile_limit()?;
    let common = Common {
        coordinator: coordinator.clone(),
        coordinator_args: cli.coordinator_args.clone(),
        encoding: cli.metric_encoding,
        window: cli.window,
        warmup: cli.warmup,
        connect_concurrency: cli.connect_concurrency,
    };
    eprintln!(
        "== {} [{}] against {}",
        cli.scenario.case(),
        cli.label,
        coordinator.display()
    );
    let record = Record::default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome =
        runtime.block_on(async { tokio::time::timeout(cli.time_limit, run(&cli.scenario, &common, &record)).await });
    let (completed, reason) = match outcome {
        Ok(Ok(())) => (true, String::new()),
        Ok(Err(e)) => (false, format!("failed during {}: {e:#}", record.current_phase())),
        Err(_) => (
            false,
            format!(
                "time limit of {} reached during {}",
                humantime::format_duration(cli.time_limit),
                record.current_phase()
            ),
        ),
    };
    let mut line = json!({
        "scenario": cli.scenario.name(),
        "case": cli.scenario.case(),
        "label": cli.label,
        "coordinator": coordinator.display().to_string(),
        "encoding": cli.metric_encoding,
        "completed": completed,
        "reason": reason,
        "nofile_limit": nofile,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "window_s": cli.window.as_secs_f64(),
        "unix_s": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    if let Value::Object(m) = &mut line {
        m.extend(record.fields());
    }
    if !completed {
        eprintln!("  NOT FINISHED: {reason}");
    }
    println!("{line}");
    // Whatever a stopped run left behind (its coordinator is already killed) ends here.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn run(scenario: &Scenario, common: &Common, record: &Record) -> anyhow::Result<()> {
    match *scenario {
        Scenario::Idle { workers } => scenario::idle::run(common, record, workers).await,
        Scenario::Reports {
            workers,
            in_flight,
            events_per_call,
            steps,
            max_trials,
        } => {
            let r = scenario::reports::Reports {
                workers,
                in_flight,
                events_per_call: events_per_call.max(1),
                steps,
                max_trials,
            };
            scenario::reports::run(common, record, &r).await
        }
        Scenario::Growth {
            in_flight,
            steps,
            slices,
        } => {
            let g = scenario::growth::Growth {
                in_flight,
                steps,
                slices,
            };
            scenario::growth::run(common, record, &g).await
        }
        Scenario::Queries {
            workers,
            trials,
            parallel,
            repeat,
        } => {
            let q = scenario::queries::Queries {
                workers,
                trials,
                parallel,
                repeat: repeat.max(1),
            };
            scenario::queries::run(common, record, &q).await
        }
        Scenario::Table { .. } => unreachable!("handled before the runtime starts"),
    }
}
