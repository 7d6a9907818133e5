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
    /// Coordinator URL: `http://` or, for a TLS coordinator, `https://`.
    #[arg(
        long,
        global = true,
        env = "CHORUS_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// PEM bundle of the certificate authorities trusted for an `https://` coordinator
    /// [default: the system's roots]. Empty counts as unset.
    #[arg(long, global = true, env = "CHORUS_CA", value_name = "PATH")]
    pub ca: Option<String>,
    /// Bearer token sent with every call; prefer the environment variable so it stays out of
    /// shell history and `ps`.
    #[arg(long, global = true, env = "CHORUS_TOKEN", hide = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Deadline for each request/response call, in seconds (streams have none).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Records asked for per page when listing experiments or trials (each page is one call
    /// under `--timeout`) [default: the coordinator's, 1000].
    #[arg(long, global = true, value_name = "N", hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit, inspect and steer experiments.
    #[command(subcommand, visible_alias = "exp")]
    Experiment(ExperimentCmd),
    /// Inspect the trials of an experiment.
    #[command(subcommand)]
    Trial(TrialCmd),
    /// List and download a trial's checkpoints.
    #[command(subcommand)]
    Checkpoint(crate::commands::checkpoint::CheckpointCmd),
    /// Compare the trials of one or more experiments, best first.
    ///
    /// Filter, sort and choose columns; with several experiments, their best trials are shown
    /// side by side above the table. Columns (for --columns, --filter and --sort): experiment,
    /// trial (or id), seq, state (or status), restarts, attempt, run_seconds, best, value (the
    /// compared metric; its name works too), params.NAME, last.NAME (a field of the last
    /// reported line), or a bare NAME: a parameter, else a field of the last reported line.
    Compare(CompareArgs),
    /// Inspect the workers registered with the coordinator.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Ask a gRPC health endpoint (grpc.health.v1) for a service's status: exit 0 if SERVING,
    /// 1 otherwise. Works against the coordinator's port and a worker's --health-listen port, so
    /// it serves as a container HEALTHCHECK.
    Health(HealthArgs),
    /// Make, pack and inspect datasets for the built-in emotion trainer (in object storage; no
    /// coordinator needed).
    #[command(subcommand)]
    Dataset(DatasetCmd),
    /// Try a searcher before spending compute (no coordinator needed).
    #[command(subcommand)]
    Search(SearchCmd),
    /// Draw pictures of experiments and trials: PNG or SVG, by the output file's extension.
    #[command(subcommand)]
    Plot(PlotCmd),
    /// Export an experiment for other tools (no server of ours needed to view it).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// Write an experiment's trials as TensorBoard runs: one directory per trial (`trial-ID`)
    /// with its metric history as scalars, and HParams data so TensorBoard's HParams tab
    /// compares the trials. Re-exporting into the same directory replaces the files.
    Tensorboard {
        /// Experiment id.
        experiment: u64,
        /// The log directory to write (`tensorboard --logdir DIR`); created if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SearchCmd {
    /// Run the experiment's searcher (and scheduler) against a synthetic objective in simulation:
    /// which trials it would create, which it would stop early, and the steps it would spend.
    Preview {
        /// The experiment file (YAML); `-` reads stdin.
        file: PathBuf,
        /// Trials to simulate [default: the experiment's max_trials].
        #[arg(long, value_name = "N")]
        trials: Option<u64>,
        /// Steps each trial runs to [default: the searcher's max_resource, else 20].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        steps: Option<u64>,
        /// Seed of the synthetic objective.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Override a field, as at submit (`--set max_trials=50`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
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
    /// List experiments (archived ones only with `--archived` or `--all`).
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        filter: crate::commands::lifecycle::ListFilter,
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
    /// Pause an experiment: its running trials stop now and no new trial starts.
    ///
    /// On `resume`, each stopped trial starts again from its last checkpoint, at no cost to its
    /// restart budget.
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
    #[command(flatten)]
    Lifecycle(crate::commands::lifecycle::LifecycleCmd),
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
pub struct HealthArgs {
    /// The service to ask about; the empty default is the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
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
    /// Print a trial's metric history, oldest report first (across restarts: the reports the
    /// trial's history keeps).
    Metrics {
        /// Trial id.
        trial: u64,
        /// Only this metric; repeat for more [default: every metric].
        #[arg(long = "metric", short = 'm', value_name = "NAME")]
        metrics: Vec<String>,
        /// Only reports from this step on.
        #[arg(long, value_name = "STEP")]
        min_step: Option<i64>,
        /// Only reports up to this step.
        #[arg(long, value_name = "STEP")]
        max_step: Option<i64>,
        /// One line per metric: a sparkline of its history with its min, max and last value.
        #[arg(long, conflicts_with = "output")]
        spark: bool,
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
        /// The rank whose output to print, for a multi-rank trial (rank 0 reports the metrics).
        #[arg(long, default_value_t = 0)]
        rank: u32,
    },
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Experiment ids.
    #[arg(required = true, value_name = "EXP")]
    pub experiments: Vec<u64>,
    /// The metric to compare [default: each experiment's searcher metric].
    #[arg(long, value_name = "NAME")]
    pub metric: Option<String>,
    /// How a trial's history becomes one value: its best (by the goal), or the last, smallest or
    /// largest reported value. Anything but the searcher metric's best reads the trials' metric
    /// histories.
    #[arg(long, value_enum, default_value_t)]
    pub agg: Agg,
    /// Which end of the metric is better [default: the experiment's goal].
    #[arg(long, value_enum)]
    pub goal: Option<Goal>,
    /// Keep only trials where KEY OP VALUE holds, OP one of = != < <= > >=, e.g.
    /// `state=completed`, `lr<0.01`, `optimizer!=sgd`; repeat to AND them. Numbers compare as
    /// numbers, anything else by equality; a trial lacking KEY is left out.
    #[arg(long = "filter", value_name = "EXPR")]
    pub filters: Vec<String>,
    /// Order each experiment's trials by a column, `KEY[:asc|desc]` [default: the metric, best
    /// first; other columns ascending]. Trials lacking it go last.
    #[arg(long, value_name = "KEY[:asc|desc]")]
    pub sort: Option<String>,
    /// The columns to show, in order, e.g. `trial,lr,layers,loss,state`.
    #[arg(long, value_name = "KEYS", value_delimiter = ',')]
    pub columns: Vec<String>,
    /// Show only the first N trials of each experiment (after filtering and sorting).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: TabularOutput,
}

/// How `compare` reduces a trial's metric history to one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Agg {
    #[default]
    Best,
    Last,
    Min,
    Max,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Goal {
    Minimize,
    Maximize,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCmd {
    /// List registered workers.
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Place no new trials on a worker (its running trials go on to their end), e.g. before
    /// taking its node away; `--undo` places on it again.
    Drain {
        /// Worker id.
        worker: String,
        /// Make the worker eligible for new trials again.
        #[arg(long)]
        undo: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum DatasetCmd {
    /// Generate a synthetic 7-class emotion dataset: drawn faces, tones and sentences that each
    /// carry a noisy signal of the class (see docs/DATASETS.md).
    Synth(SynthArgs),
    /// Pack the files a CSV lists (columns image, audio, text, label, split) into a dataset.
    Pack(PackArgs),
    /// Import a published emotion corpus from its own files (FER2013, RAVDESS, MELD): labels
    /// mapped onto the seven emotions, faces to 48x48 gray, audio to 16 kHz mono.
    #[command(subcommand)]
    Import(ImportCmd),
    /// Show a dataset: samples per class and split, modalities present, shards and size.
    Inspect {
        /// The dataset's directory, e.g. `file:///data/emo` or `s3://bucket/datasets/emo`.
        uri: String,
        /// Also download every shard and check its checksum and every sample in it; exit 1 if
        /// any shard is bad.
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        storage: StorageArgs,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    #[command(flatten)]
    pub out: DatasetOut,
    /// Samples in total.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub samples: u64,
    /// Shards in total; each split gets at least one.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub shards: u64,
    /// The same seed gives the same dataset, byte for byte.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub fractions: SplitFractions,
    /// Probability that a sample lacks each of its image, audio and text.
    #[arg(long, value_name = "P", default_value_t = 0.05)]
    pub missing: f64,
}

#[derive(Debug, Args)]
pub struct PackArgs {
    /// The CSV: a header row naming columns among image, audio, text, label (required) and
    /// split; paths relative to the CSV's directory.
    #[arg(long, value_name = "FILE")]
    pub csv: PathBuf,
    #[command(flatten)]
    pub out: DatasetOut,
    /// Shards in total; each split gets at least one [default: 8, or fewer for a small CSV].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub shards: Option<u64>,
    /// Class names, in label-index order [default: anger,disgust,fear,happiness,sadness,surprise,neutral].
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Seed of the split of rows without a split cell, and of the order of rows in shards.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub fractions: SplitFractions,
    /// Most tokens in the vocabulary (built from the train split's texts, most frequent first).
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(3..))]
    pub max_vocab: u64,
}

#[derive(Debug, Subcommand)]
pub enum ImportCmd {
    /// FER2013's CSV (`emotion,pixels,Usage`): one 48x48 face per row; emotion codes 0-6 mapped
    /// by name, Usage Training / PublicTest / PrivateTest as train / val / test (a CSV without
    /// Usage is split by the fractions).
    Fer2013(Fer2013Args),
    /// RAVDESS's audio-only WAVs (`03-VC-EE-II-SS-RR-AA.wav`, found recursively): emotion from the
    /// name (calm as neutral), the spoken statement as text, split by actor.
    Ravdess(RavdessArgs),
    /// MELD's utterance CSVs, each with a directory of WAV clips `dia{D}_utt{U}.wav`: Utterance as
    /// text, Emotion mapped by name (joy as happiness); a row without a clip is kept as text only.
    Meld(MeldArgs),
}

#[derive(Debug, Args)]
pub struct Fer2013Args {
    /// `fer2013.csv`: header `emotion,pixels,Usage` (`Usage` may be missing).
    #[arg(long, value_name = "FILE")]
    pub csv: PathBuf,
    #[command(flatten)]
    pub out: DatasetOut,
    #[command(flatten)]
    pub shards: ImportShards,
    /// Split of a CSV without a Usage column.
    #[command(flatten)]
    pub fractions: SplitFractions,
}

#[derive(Debug, Args)]
pub struct RavdessArgs {
    /// The directory holding the `Actor_NN` folders; searched recursively.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub out: DatasetOut,
    #[command(flatten)]
    pub shards: ImportShards,
    /// Actors (1-24) whose files make the val split; the others not in --test-actors are train.
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_value = "21,22")]
    pub val_actors: Vec<u8>,
    /// Actors (1-24) whose files make the test split.
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_value = "23,24")]
    pub test_actors: Vec<u8>,
    /// Leave the sung files (vocal channel 02) out.
    #[arg(long)]
    pub speech_only: bool,
}

#[derive(Debug, Args)]
pub struct MeldArgs {
    /// A MELD CSV (`train_sent_emo.csv`, `dev_sent_emo.csv`, `test_sent_emo.csv`); repeat for
    /// several splits.
    #[arg(long, value_name = "FILE", required = true)]
    pub csv: Vec<PathBuf>,
    /// The directory of each --csv's clips, in the same order (or one for all), holding
    /// `dia{Dialogue_ID}_utt{Utterance_ID}.wav` at any rate.
    #[arg(long, value_name = "DIR", required = true)]
    pub audio_dir: Vec<PathBuf>,
    /// The split of each --csv, in the same order [default: from the file name: train..., dev...
    /// or val..., test...].
    #[arg(long, value_name = "SPLIT")]
    pub split: Vec<chorus_dataset::Split>,
    #[command(flatten)]
    pub out: DatasetOut,
    #[command(flatten)]
    pub shards: ImportShards,
    /// Most tokens in the vocabulary (built from the train split's utterances, most frequent first).
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(3..))]
    pub max_vocab: u64,
}

/// How an importer cuts and orders shards, as `pack` does.
#[derive(Debug, Args)]
pub struct ImportShards {
    /// Shards in total; each split gets at least one [default: 8, or fewer for a small corpus].
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub shards: Option<u64>,
    /// Seed of the order of samples in shards (and of any split drawn by the fractions).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
}

/// Where `synth`, `pack` and `import` write.
#[derive(Debug, Args)]
pub struct DatasetOut {
    /// The dataset's directory: manifest.json and the shards go directly under it, e.g.
    /// `file:///data/emo` or `s3://bucket/datasets/emo`.
    #[arg(long, value_name = "URI")]
    pub out: String,
    /// Dataset name recorded in the manifest [default: the last segment of --out].
    #[arg(long)]
    pub name: Option<String>,
    /// Replace a dataset already at --out (its manifest is deleted first, then its shards).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Output format of the summary printed once the dataset is written.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct SplitFractions {
    /// Share of samples in the val split.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Share of samples in the test split.
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub test_fraction: f64,
}

#[derive(Debug, Args)]
pub struct StorageArgs {
    /// S3-compatible endpoint for `s3://` URIs, e.g. `http://127.0.0.1:9000`; credentials come
    /// from the usual `AWS_*` variables.
    #[arg(long, value_name = "URL", env = "CHORUS_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
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

#[derive(Debug, Subcommand)]
pub enum PlotCmd {
    /// Learning curves: one line per trial (x = step), the best trial thicker and in the legend,
    /// and the rung budgets of an ASHA or Hyperband search as vertical lines.
    Curves {
        /// Experiment ids.
        #[arg(required = true, value_name = "EXP")]
        experiments: Vec<u64>,
        /// The metric to draw [default: the first experiment's metric].
        #[arg(long, value_name = "METRIC")]
        metric: Option<String>,
        #[command(flatten)]
        out: PlotOut,
    },
    /// Parallel coordinates: an axis per parameter and one for the metric (each trial's best
    /// value), each trial a line coloured by the metric.
    Parallel {
        /// Experiment id.
        experiment: u64,
        /// The metric [default: the experiment's]; each trial's best value of it (last value for
        /// a metric that is not an objective).
        #[arg(long, value_name = "METRIC")]
        metric: Option<String>,
        #[command(flatten)]
        out: PlotOut,
    },
    /// Parameter importance: |Spearman| of each numeric parameter with the metric, the
    /// correlation ratio (eta) for a categorical one; one parameter at a time, no interactions.
    Importance {
        /// Experiment id.
        experiment: u64,
        /// The metric [default: the experiment's].
        #[arg(long, value_name = "METRIC")]
        metric: Option<String>,
        #[command(flatten)]
        out: PlotOut,
    },
    /// Two metrics against each other, one point per trial, the Pareto front highlighted.
    Pareto {
        /// Experiment id.
        experiment: u64,
        /// The two metrics, each with its goal where the experiment does not say it:
        /// `A,B` or `A:min,B:max`.
        #[arg(long, value_name = "A[:GOAL],B[:GOAL]")]
        metrics: String,
        #[command(flatten)]
        out: PlotOut,
    },
    /// The confusion matrix a builtin trial reported (rows: true class, columns: predicted), as a
    /// heatmap with counts.
    Confusion {
        /// Trial id.
        trial: u64,
        /// The report at this step [default: the last one].
        #[arg(long, value_name = "STEP")]
        step: Option<i64>,
        #[command(flatten)]
        out: PlotOut,
    },
}

#[derive(Debug, Args)]
pub struct PlotOut {
    /// The file to write: .png or .svg [default: EXP-KIND.png, or trial-ID-confusion.png].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also print what was drawn (series and their points, highlighted trials, axes ranges,
    /// bars) as JSON on stdout.
    #[arg(long)]
    pub describe: bool,
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
    fn pause_says_that_running_trials_stop() {
        // It once said they continue; the coordinator stops them.
        let mut cli = Cli::command();
        let pause = cli
            .find_subcommand_mut("experiment")
            .and_then(|c| c.find_subcommand_mut("pause"))
            .expect("experiment pause");
        let help = pause.render_long_help().to_string();
        assert!(help.contains("its running trials stop now"), "{help}");
        assert!(help.contains("from its last checkpoint"), "{help}");
        assert!(!help.contains("continue"), "{help}");
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

    #[test]
    fn trial_metrics_takes_repeated_metrics() {
        let cli = Cli::try_parse_from([
            "chorus", "trial", "metrics", "7", "--metric", "loss", "-m", "acc", "-o", "csv",
        ])
        .unwrap();
        let Command::Trial(TrialCmd::Metrics {
            trial,
            metrics,
            output,
            min_step,
            ..
        }) = cli.command
        else {
            panic!("parsed {cli:?}")
        };
        assert_eq!(
            (trial, metrics, output, min_step),
            (7, vec!["loss".into(), "acc".into()], TabularOutput::Csv, None)
        );
        let err = Cli::try_parse_from(["chorus", "trial", "metrics", "7", "-o", "yaml"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(Cli::try_parse_from(["chorus", "trial", "metrics"]).is_err());
    }

    #[test]
    fn compare_options_parse_and_spark_excludes_an_output_format() {
        let cli = Cli::try_parse_from([
            "chorus",
            "compare",
            "1",
            "2",
            "--agg",
            "last",
            "--filter",
            "lr<0.1",
            "--filter",
            "opt=adam",
            "--columns",
            "trial,lr",
            "--sort",
            "lr:desc",
        ])
        .unwrap();
        let Command::Compare(c) = cli.command else {
            panic!("parsed {cli:?}")
        };
        assert_eq!((c.experiments, c.agg, c.goal), (vec![1, 2], Agg::Last, None));
        assert_eq!(
            (c.filters, c.columns),
            (
                vec!["lr<0.1".into(), "opt=adam".into()],
                vec!["trial".into(), "lr".into()]
            )
        );
        assert!(Cli::try_parse_from(["chorus", "compare", "1", "--agg", "median"]).is_err());
        assert!(Cli::try_parse_from(["chorus", "trial", "metrics", "7", "--spark"]).is_ok());
        let err = Cli::try_parse_from(["chorus", "trial", "metrics", "7", "--spark", "-o", "json"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn dataset_commands_parse() {
        let cli = Cli::try_parse_from([
            "chorus",
            "dataset",
            "pack",
            "--csv",
            "d.csv",
            "--out",
            "file:///tmp/x",
            "--classes",
            "a,b,c",
        ])
        .unwrap();
        let Command::Dataset(DatasetCmd::Pack(p)) = cli.command else {
            panic!("parsed {cli:?}")
        };
        assert_eq!(p.classes, ["a", "b", "c"]);
        assert_eq!((p.shards, p.fractions.val_fraction), (None, 0.1));
        let err =
            Cli::try_parse_from(["chorus", "dataset", "synth", "--out", "file:///tmp/x", "--shards", "2"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = Cli::try_parse_from([
            "chorus",
            "dataset",
            "synth",
            "--out",
            "file:///x",
            "--samples",
            "9",
            "--shards",
            "0",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }
}
