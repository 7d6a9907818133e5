//! The command surface. Only clap definitions live here, so `chorus --help` can be read from one
//! file and completions are generated from exactly what the parser accepts.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "chorus", version, about = "Submit, watch and compare Chorus experiments")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Coordinator URL.
    #[arg(
        long,
        global = true,
        env = "CHORUS_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// Bearer token sent with every call; prefer the environment variable so it stays out of
    /// shell history and `ps`.
    #[arg(long, global = true, env = "CHORUS_TOKEN", hide = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Deadline for each request/response call, in seconds (streams have none).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit, inspect and steer experiments.
    #[command(subcommand, visible_alias = "exp")]
    Experiment(ExperimentCmd),
    /// Inspect the trials of an experiment.
    #[command(subcommand)]
    Trial(TrialCmd),
    /// Compare the trials of one or more experiments, best first.
    Compare(CompareArgs),
    /// Inspect the workers registered with the coordinator.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum ExperimentCmd {
    /// Validate an experiment file locally, then submit it.
    Submit {
        /// The experiment file (YAML); `-` reads stdin.
        file: PathBuf,
        #[command(flatten)]
        sets: SetArgs,
        /// Watch the experiment until it ends; exit 0 if it completed, 1 if it failed or was killed.
        #[arg(long)]
        wait: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Validate an experiment file and print it normalised (no coordinator needed).
    Validate {
        /// The experiment file (YAML); `-` reads stdin.
        file: PathBuf,
        #[command(flatten)]
        sets: SetArgs,
        /// Ask the coordinator instead, which may know of settings this CLI does not.
        #[arg(long)]
        remote: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// List experiments.
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Show an experiment: state, budgets, trial counts, best trial and its spec.
    Describe {
        /// Experiment id.
        experiment: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Watch a running experiment until it ends; exit 0 if it completed, 1 otherwise.
    Watch {
        /// Experiment id.
        experiment: u64,
    },
    /// Stop placing new trials; running trials continue.
    Pause {
        /// Experiment id.
        experiment: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Resume a paused experiment.
    Resume {
        /// Experiment id.
        experiment: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Kill an experiment and all its running trials.
    Kill {
        /// Experiment id.
        experiment: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Change the budgets of a live experiment.
    Update(UpdateArgs),
}

#[derive(Debug, Args)]
#[group(skip)]
#[command(group(
    clap::ArgGroup::new("budget").required(true).multiple(true).args(["max_trials", "parallel_trials", "max_failed_trials"])
))]
pub struct UpdateArgs {
    /// Experiment id.
    pub experiment: u64,
    /// Trials to create in total.
    #[arg(long)]
    pub max_trials: Option<u64>,
    /// Trials to run at once.
    #[arg(long)]
    pub parallel_trials: Option<u32>,
    /// Fail the experiment once more trials than this have failed.
    #[arg(long)]
    pub max_failed_trials: Option<u64>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Override a field of the file, e.g. `--set max_trials=20 --set parameters.lr.max=0.1`
    /// (the value is read as YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum TrialCmd {
    /// List the trials of an experiment.
    List {
        /// Experiment id.
        experiment: u64,
        /// Sort by a metric, trials without it last. The experiment's own metric sorts by each
        /// trial's best value, best first by the experiment's goal; any other metric sorts by the
        /// trial's last reported value, ascending.
        #[arg(long, value_name = "METRIC")]
        sort: Option<String>,
        /// Show only the first N trials (after sorting).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: TabularOutput,
    },
    /// Print a trial's log, attempt by attempt.
    Logs {
        /// Trial id.
        trial: u64,
        /// Keep streaming until the trial ends.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Experiment ids.
    #[arg(required = true, value_name = "EXP")]
    pub experiments: Vec<u64>,
    /// Show only the best N trials of each experiment.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: TabularOutput,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCmd {
    /// List registered workers.
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum TabularOutput {
    #[default]
    Table,
    Json,
    Csv,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn update_needs_a_budget() {
        let err = Cli::try_parse_from(["chorus", "experiment", "update", "3"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = Cli::try_parse_from(["chorus", "experiment", "update", "3", "--max-trials", "9"]).unwrap();
        let Command::Experiment(ExperimentCmd::Update(u)) = cli.command else {
            panic!("parsed {cli:?}")
        };
        assert_eq!((u.experiment, u.max_trials, u.parallel_trials), (3, Some(9), None));
    }

    #[test]
    fn sets_repeat_and_globals_go_anywhere() {
        let cli = Cli::try_parse_from([
            "chorus",
            "experiment",
            "submit",
            "x.yaml",
            "--set",
            "a=1",
            "--set",
            "b.c=2",
            "--timeout",
            "5",
        ])
        .unwrap();
        assert_eq!(cli.global.timeout, 5);
        let Command::Experiment(ExperimentCmd::Submit { sets, wait, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(sets.overrides, ["a=1", "b.c=2"]);
        assert!(!wait);
        assert!(Cli::try_parse_from(["chorus", "--timeout", "0", "worker", "list"]).is_err());
    }
}
