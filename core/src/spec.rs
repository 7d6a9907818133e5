//! The experiment file: its YAML schema, `--set` overrides, and validation.
//!
//! The grammar borrows what users already know: W&B's `parameters` and `metric`, Katib's
//! budgets, Determined's split between `searcher`, `resources` and storage. Unknown fields are
//! rejected, and every error names the field path and, when the field is in the file, its line
//! and column.

use crate::error::{CoreError, FieldError, SpecErrors};
use crate::limits::{self, BudgetLimits, MAX_ERRORS};
use crate::space::{self, Condition, DomainIndex, GridSize, Param, Params, Space};
use crate::template;
use crate::yaml_locate::Locations;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

/// An experiment file exactly as written (after overrides).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The metric to optimise. With `metrics`, it may be left out (the first objective is the
    /// primary one: it ranks trials, picks the best and keeps the best checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<MetricSpec>,
    /// Several objectives at once (random, grid and tpe); `compare` shows their Pareto front.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricSpec>,
    #[serde(default)]
    pub parameters: BTreeMap<String, ParamSpec>,
    pub searcher: SearcherSpec,
    /// Early stopping for grid, random and tpe searches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerSpec>,
    /// Trials to create in total; defaults to the grid size for grid search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_trials: Option<u64>,
    #[serde(default = "one")]
    pub parallel_trials: u32,
    /// The experiment fails once more trials than this have failed; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failed_trials: Option<u64>,
    /// Times one trial may be restarted after a failure or a lost worker.
    #[serde(default)]
    pub max_restarts: u32,
    #[serde(default)]
    pub resources: ResourceSpec,
    pub trial: TrialSpec,
    /// Object-storage URI for checkpoints, metrics and logs; the coordinator's default if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
}

/// Ranks of one trial: a ring collective's latency grows with the ranks, and no deployment this
/// coordinator is meant for runs one model on more.
pub const MAX_RANKS: u32 = 1024;

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub name: String,
    pub goal: Goal,
    /// Stop the experiment once a trial reaches this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    Minimize,
    Maximize,
}

impl Goal {
    /// True when `a` is strictly better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Goal::Minimize => a < b,
            Goal::Maximize => a > b,
        }
    }

    /// True when `value` meets or beats `target`.
    pub fn reached(self, value: f64, target: f64) -> bool {
        match self {
            Goal::Minimize => value <= target,
            Goal::Maximize => value >= target,
        }
    }
}

/// One entry of `parameters`, in W&B's shape: `value`, `values`, or `min`/`max` with a
/// `distribution`; `when` makes it conditional on other parameters.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
    /// Step for `q_uniform`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<f64>,
    /// The parameter exists only when every parent named here is active and takes the value
    /// given (a list: any of them), as in `when: {optimizer: [sgd, rmsprop]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<BTreeMap<String, Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    Uniform,
    LogUniform,
    IntUniform,
    QUniform,
    /// Integers on a log scale (Optuna's `IntDistribution(log=True)`, Ray Tune's `lograndint`).
    LogIntUniform,
}

/// The search algorithm and its settings. Settings an algorithm does not use are refused, so a
/// typo'd or misplaced one never silently does nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearcherSpec {
    pub name: SearcherName,
    #[serde(default)]
    pub seed: u64,
    /// tpe (and asha, hyperband with `sampler: tpe`): trials drawn at random before the model
    /// takes over (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_startup_trials: Option<u32>,
    /// tpe (and the tpe sampler): candidates drawn from the good density per suggestion
    /// (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_ei_candidates: Option<u32>,
    /// tpe (and the tpe sampler): the share of finished trials counted as good (default 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// asha, hyperband: keep the best 1/reduction_factor at each rung (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduction_factor: Option<u32>,
    /// asha: the resource (step or epoch, as the trial reports it) of the first rung;
    /// hyperband: of the most aggressive bracket's first rung (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<u64>,
    /// asha, hyperband: how many brackets of successive halving run side by side, the `b`-th
    /// (from 0) first deciding at `grace_period * reduction_factor^b` (asha: 1; hyperband: one
    /// for each such resource up to max_resource, the last of which may stop nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brackets: Option<u32>,
    /// asha, hyperband: decide once, when a trial reaches a rung (go on or stop for good),
    /// instead of pausing it there until it is promoted (default false: pause and promote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_once: Option<bool>,
    /// asha, hyperband: where new configurations come from (default tpe: a TPE model of every
    /// trial so far, ranked by how far it got and then by its loss there; random: independent
    /// draws).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<SamplerName>,
    /// asha, hyperband: the resource a trial runs to at most; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_resource: Option<u64>,
    /// The resource the rungs (or perturbations) count: `step` (default) or `epoch`, as the
    /// trial's reports name them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceName>,
    /// pbt: trials trained together (default: max_trials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population_size: Option<u32>,
    /// pbt: resource between two exploit/explore decisions of a trial; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perturbation_interval: Option<u64>,
    /// pbt: the bottom share of the population copies from the top share (default 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantile_fraction: Option<f64>,
    /// pbt: chance that explore draws a parameter afresh instead of perturbing it (default 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resample_probability: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResourceName {
    #[default]
    Step,
    Epoch,
}

/// How successive halving draws new configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SamplerName {
    #[default]
    Tpe,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearcherName {
    Grid,
    Random,
    Tpe,
    Asha,
    Hyperband,
    Pbt,
}

/// Early stopping layered over a searcher that does not stop trials itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    pub name: SchedulerName,
    /// No trial is stopped before it reports this resource (default 1).
    #[serde(default = "one_u64")]
    pub grace_period: u64,
    /// Trials that must have reported at a resource before the median there is trusted (default 3).
    #[serde(default = "three")]
    pub min_trials: u32,
    #[serde(default)]
    pub resource: ResourceName,
}

fn one_u64() -> u64 {
    1
}

fn three() -> u32 {
    3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerName {
    /// Stop a trial whose best value so far is worse than the median of the other trials'
    /// running means at the same resource (the median stopping rule of Google Vizier).
    Median,
}

impl SearcherName {
    pub fn as_str(self) -> &'static str {
        match self {
            SearcherName::Grid => "grid",
            SearcherName::Random => "random",
            SearcherName::Tpe => "tpe",
            SearcherName::Asha => "asha",
            SearcherName::Hyperband => "hyperband",
            SearcherName::Pbt => "pbt",
        }
    }
}

/// What each trial needs: `workers` ranks, each with `cpus` slots and `gpus` devices, on
/// workers carrying every label in `labels` (like a Kubernetes node selector).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    #[serde(default)]
    pub workers: WorkerCount,
    #[serde(default = "one")]
    pub cpus: u32,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// How many ranks a trial runs on: `workers: 4` (exactly four, placed all at once) or
/// `workers: {min: 2, max: 4}` (elastic: placed with as many as fit up to `max`, never fewer
/// than `min`, and placed again with whatever fits after it loses a rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum WorkerCount {
    Fixed(u32),
    Elastic { min: u32, max: u32 },
}

// By hand rather than `untagged`, whose only error is "did not match any variant": a user who
// writes `{min: 2}` should hear that `max` is missing.
impl<'de> Deserialize<'de> for WorkerCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = WorkerCount;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of workers, or {min: N, max: M}")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<WorkerCount, E> {
                u32::try_from(v)
                    .map(WorkerCount::Fixed)
                    .map_err(|_| E::custom(format!("{v} workers is too many")))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<WorkerCount, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("a number of workers cannot be negative, got {v}"))),
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<WorkerCount, A::Error> {
                use serde::de::Error;
                let (mut min, mut max) = (None, None);
                while let Some(key) = m.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "min" => &mut min,
                        "max" => &mut max,
                        other => return Err(A::Error::unknown_field(other, &["min", "max"])),
                    };
                    *slot = Some(m.next_value::<u32>()?);
                }
                match (min, max) {
                    (Some(min), Some(max)) => Ok(WorkerCount::Elastic { min, max }),
                    (None, _) => Err(A::Error::missing_field("min")),
                    (_, None) => Err(A::Error::missing_field("max")),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Default for WorkerCount {
    fn default() -> Self {
        WorkerCount::Fixed(1)
    }
}

impl WorkerCount {
    pub fn min(self) -> u32 {
        match self {
            WorkerCount::Fixed(n) => n,
            WorkerCount::Elastic { min, .. } => min,
        }
    }

    pub fn max(self) -> u32 {
        match self {
            WorkerCount::Fixed(n) => n,
            WorkerCount::Elastic { max, .. } => max,
        }
    }

    pub fn is_elastic(self) -> bool {
        matches!(self, WorkerCount::Elastic { .. })
    }

    /// More than one rank may run: the trial is data-parallel.
    pub fn is_distributed(self) -> bool {
        self.max() > 1
    }
}

impl Default for ResourceSpec {
    fn default() -> Self {
        ResourceSpec {
            workers: WorkerCount::Fixed(1),
            cpus: 1,
            gpus: 0,
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialSpec {
    /// argv of the trial program; `${params.NAME}` is replaced by the trial's value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A built-in model trained in the worker instead of a command (see [`crate::builtin`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Kill the trial after this long, e.g. `90s`, `30m`, `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Newest checkpoints kept per trial; older ones are deleted after each commit.
    #[serde(default = "keep_last_default")]
    pub keep_last: u32,
    /// Also keep the best this many by the experiment's metric (reported at the checkpoint's step).
    #[serde(default = "keep_best_default")]
    pub keep_best: u32,
}

fn keep_last_default() -> u32 {
    3
}

fn keep_best_default() -> u32 {
    1
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            keep_last: keep_last_default(),
            keep_best: keep_best_default(),
        }
    }
}

/// A spec that passed validation, with its derived search space and budgets resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    pub spec: ExperimentSpec,
    pub space: Space,
    /// Resolved total trial budget.
    pub max_trials: u64,
    pub timeout: Option<Duration>,
}

impl ValidSpec {
    /// The primary metric (the only one, or the first of several).
    pub fn metric(&self) -> &MetricSpec {
        self.spec.metric.as_ref().expect("validation sets the primary metric")
    }

    /// Every objective, the primary first.
    pub fn objectives(&self) -> Vec<&MetricSpec> {
        if self.spec.metrics.is_empty() {
            vec![self.metric()]
        } else {
            self.spec.metrics.iter().collect()
        }
    }

    /// The spec as normalised YAML (defaults filled in, `max_trials` resolved), as stored and
    /// shown by `describe`. [`parse_stored`] reads it back to an equal `ValidSpec`.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.spec).unwrap_or_default()
    }

    /// [`ValidSpec::to_yaml`], checked to read back to this very spec: what a coordinator stores,
    /// so a spec it accepts can never be one it cannot load again.
    pub fn to_stored_yaml(&self) -> Result<String, CoreError> {
        let yaml = self.to_yaml();
        match parse_stored(&yaml) {
            Ok(back) if back == *self => Ok(yaml),
            Ok(_) => Err(spec_err(
                "",
                None,
                "the spec does not read back the same once normalised; it is refused so that no stored spec is unreadable",
            )),
            Err(CoreError::Spec(SpecErrors(errs))) => {
                let first = errs.first().map_or(String::new(), |e| format!(": {e}"));
                Err(spec_err(
                    "",
                    None,
                    &format!(
                        "the spec does not read back once normalised{first}; it is refused so that no stored spec is unreadable"
                    ),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// The trial argv with `${params.NAME}` replaced. An argument that refers to a parameter
    /// the trial lacks (an inactive conditional one) is left out, so `--momentum=${params.momentum}`
    /// disappears for the trials without a momentum instead of reaching the program unreplaced.
    pub fn command_for(&self, params: &Params) -> Vec<String> {
        self.spec
            .trial
            .command
            .iter()
            .filter(|a| !template::refers_to_missing(a, params))
            .map(|a| template::substitute(a, params))
            .collect()
    }

    /// The builtin trainer settings with `${params.NAME}` replaced, as JSON, or `None` for a
    /// command trial.
    pub fn builtin_for(&self, params: &Params) -> Option<serde_json::Value> {
        self.spec
            .trial
            .builtin
            .as_ref()
            .map(|t| template::substitute_tree(t, params))
    }

    /// The trial environment with `${params.NAME}` replaced in values; a variable that refers
    /// to a parameter the trial lacks is left unset.
    pub fn env_for(&self, params: &Params) -> BTreeMap<String, String> {
        self.spec
            .trial
            .env
            .iter()
            .filter(|(_, v)| !template::refers_to_missing(v, params))
            .map(|(k, v)| (k.clone(), template::substitute(v, params)))
            .collect()
    }
}

/// Parses, applies `overrides` (`a.b.c=value`, value read as YAML), and validates, with no
/// budget limit: what the CLI does, since only a coordinator knows its own limits.
pub fn parse(yaml: &str, overrides: &[String]) -> Result<ValidSpec, CoreError> {
    parse_with(yaml, overrides, &BudgetLimits::UNLIMITED)
}

/// As [`parse`], and refuses budgets above `budgets` (what a coordinator does).
pub fn parse_with(yaml: &str, overrides: &[String], budgets: &BudgetLimits) -> Result<ValidSpec, CoreError> {
    check_size(yaml, overrides)?;
    parse_text(yaml, overrides, budgets)
}

/// Reads back a spec written by [`ValidSpec::to_yaml`]: as [`parse`] without the size limit,
/// which a normalised spec may exceed (block style is longer than flow style), and without
/// budget limits, which the spec met when it was accepted.
pub fn parse_stored(yaml: &str) -> Result<ValidSpec, CoreError> {
    parse_text(yaml, &[], &BudgetLimits::UNLIMITED)
}

/// An experiment file as read from disk or stdin: at most [`limits::MAX_SPEC_BYTES`], and
/// UTF-8 (the position of the first byte that is not is reported, so it can be found).
pub fn spec_text(bytes: &[u8]) -> Result<&str, CoreError> {
    if bytes.len() > limits::MAX_SPEC_BYTES {
        return Err(too_large(bytes.len()));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        // The prefix is valid UTF-8, so counting characters is exact.
        let column = String::from_utf8_lossy(&valid[line_start..]).chars().count() + 1;
        let byte = bytes[e.valid_up_to()];
        spec_err(
            "",
            Some((line, column)),
            &format!(
                "the experiment file is not UTF-8 text: byte 0x{byte:02X} at offset {} does not start a UTF-8 character",
                e.valid_up_to()
            ),
        )
    })
}

fn too_large(len: usize) -> CoreError {
    spec_err(
        "",
        None,
        &format!(
            "the experiment file is {len} bytes; the limit is {} bytes (1 MiB)",
            limits::MAX_SPEC_BYTES
        ),
    )
}

fn check_size(yaml: &str, overrides: &[String]) -> Result<(), CoreError> {
    if yaml.len() > limits::MAX_SPEC_BYTES {
        return Err(too_large(yaml.len()));
    }
    if overrides.len() > limits::MAX_OVERRIDES {
        return Err(spec_err(
            "",
            None,
            &format!(
                "{} --set overrides; the limit is {}",
                overrides.len(),
                limits::MAX_OVERRIDES
            ),
        ));
    }
    let total: usize = overrides.iter().map(String::len).sum();
    if total > limits::MAX_OVERRIDE_BYTES {
        return Err(spec_err(
            "",
            None,
            &format!(
                "the --set overrides total {total} bytes; the limit is {} bytes",
                limits::MAX_OVERRIDE_BYTES
            ),
        ));
    }
    Ok(())
}

/// The problems the first pass found, as spec errors.
fn scan_errors(problems: &[(String, (usize, usize), String)], from_set: bool) -> CoreError {
    CoreError::Spec(SpecErrors(
        problems
            .iter()
            .map(|(path, at, message)| FieldError {
                path: path.clone(),
                location: (!from_set).then_some(*at),
                message: if from_set {
                    format!("{message} (from --set)")
                } else {
                    message.clone()
                },
            })
            .collect(),
    ))
}

fn parse_text(yaml: &str, overrides: &[String], budgets: &BudgetLimits) -> Result<ValidSpec, CoreError> {
    let locs = Locations::scan(yaml, "");
    if !locs.problems.is_empty() {
        return Err(scan_errors(&locs.problems, false));
    }
    let at = |path: &str| locs.get(path);
    let mut overridden = Vec::new();
    let spec: ExperimentSpec = if overrides.is_empty() {
        deserialize_text(yaml, &at)?
    } else {
        // Parse the file first so its own errors keep their line numbers.
        let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).map_err(|e| yaml_error(&e, ""))?;
        for o in overrides {
            let path = apply_override(&mut doc, o)?;
            overridden.push(path);
        }
        let de = doc;
        serde_path_to_error::deserialize::<_, ExperimentSpec>(de).map_err(|e| {
            let path = e.path().to_string();
            let from_set = overridden.iter().any(|p| path.starts_with(p.as_str()));
            let location = if from_set { None } else { at(&path) };
            let mut message = e.into_inner().to_string();
            if from_set {
                message.push_str(" (from --set)");
            }
            CoreError::Spec(SpecErrors(vec![FieldError {
                path: clean_path(&path),
                location,
                message,
            }]))
        })?
    };
    // A field an override set is not where the file says: name the override instead.
    let place = |path: &str| {
        let from_set = overridden.iter().any(|p| {
            path.strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        });
        if from_set {
            Place::Override
        } else {
            Place::File(at(path))
        }
    };
    validate(spec, &place, budgets)
}

fn deserialize_text(yaml: &str, at: &dyn Fn(&str) -> Option<(usize, usize)>) -> Result<ExperimentSpec, CoreError> {
    if yaml.trim().is_empty() {
        return Err(spec_err("", None, "the experiment file is empty"));
    }
    let de = serde_yaml_ng::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = clean_path(&e.path().to_string());
        let inner = e.into_inner();
        let location = inner.location().map(|l| (l.line(), l.column())).or_else(|| at(&path));
        let message = strip_location(&inner.to_string());
        // serde_yaml_ng starts nested errors with the path (or its parent), which the error
        // shows already.
        let message = match message.split_once(": ") {
            Some((head, rest)) if !head.is_empty() && path.starts_with(head) => rest.to_string(),
            _ => message,
        };
        CoreError::Spec(SpecErrors(vec![FieldError {
            path,
            location,
            message,
        }]))
    })
}

fn yaml_error(e: &serde_yaml_ng::Error, path: &str) -> CoreError {
    let location = e.location().map(|l| (l.line(), l.column()));
    spec_err(path, location, &strip_location(&e.to_string()))
}

/// serde_yaml_ng appends "at line L column C"; we report the location separately.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// serde_path_to_error renders the root as `.`; we render it as the empty path.
fn clean_path(p: &str) -> String {
    if p == "." { String::new() } else { p.to_string() }
}

fn spec_err(path: &str, location: Option<(usize, usize)>, message: &str) -> CoreError {
    CoreError::Spec(SpecErrors(vec![FieldError {
        path: path.to_string(),
        location,
        message: message.to_string(),
    }]))
}

/// Applies one `a.b.c=value` override to the parsed document; returns the dotted path.
fn apply_override(doc: &mut serde_yaml_ng::Value, o: &str) -> Result<String, CoreError> {
    let Some((path, raw)) = o.split_once('=') else {
        return Err(spec_err("", None, &format!("--set {o:?}: expected key=value")));
    };
    let path = path.trim();
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return Err(spec_err(
            "",
            None,
            &format!("--set {o:?}: the key must be a dotted path such as parameters.lr.max"),
        ));
    }
    let scan = Locations::scan(raw, path);
    if !scan.problems.is_empty() {
        return Err(scan_errors(&scan.problems, true));
    }
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(raw)
        .map_err(|e| spec_err(path, None, &format!("--set {o:?}: value is not valid YAML: {e}")))?;
    let parts: Vec<&str> = path.split('.').collect();
    if parts.len() > limits::MAX_DEPTH || parts.iter().any(|p| p.len() > limits::MAX_KEY_BYTES) {
        return Err(spec_err(
            "",
            None,
            &format!(
                "--set {o:?}: a key is at most {} levels of {} bytes each",
                limits::MAX_DEPTH,
                limits::MAX_KEY_BYTES
            ),
        ));
    }
    let mut cur = doc;
    for (i, part) in parts.iter().enumerate() {
        let map = match cur {
            serde_yaml_ng::Value::Mapping(m) => m,
            v @ serde_yaml_ng::Value::Null => {
                *v = serde_yaml_ng::Value::Mapping(Default::default());
                match v {
                    serde_yaml_ng::Value::Mapping(m) => m,
                    _ => unreachable!("just assigned a mapping"),
                }
            }
            _ => {
                let parent = parts[..i].join(".");
                return Err(spec_err(
                    &parent,
                    None,
                    &format!("--set {o:?}: {parent} is not a mapping"),
                ));
            }
        };
        let key = serde_yaml_ng::Value::String((*part).to_string());
        if i == parts.len() - 1 {
            map.insert(key, value);
            return Ok(path.to_string());
        }
        cur = map.entry(key).or_insert(serde_yaml_ng::Value::Null);
    }
    unreachable!("a non-empty path always reaches its last part")
}

/// Where a field of the spec came from.
enum Place {
    /// The file, at this line and column when it is found there.
    File(Option<(usize, usize)>),
    /// A `--set` override.
    Override,
}

/// Semantic checks the schema cannot express; collects every problem (the first
/// [`MAX_ERRORS`] of them).
///
/// `place` says where each field came from.
fn validate(
    mut spec: ExperimentSpec,
    place: &dyn Fn(&str) -> Place,
    budgets: &BudgetLimits,
) -> Result<ValidSpec, CoreError> {
    let mut errs = Vec::new();
    let mut dropped = 0usize;
    let mut push = |path: String, message: String| {
        if errs.len() >= MAX_ERRORS {
            dropped += 1;
            return;
        }
        let (location, message) = match place(&path) {
            Place::File(location) => (location, message),
            Place::Override => (None, format!("{message} (from --set)")),
        };
        errs.push(FieldError {
            path,
            location,
            message,
        });
    };
    for (path, value) in floats(&spec) {
        if let Some(v) = value
            && !v.is_finite()
        {
            push(path, format!("{v} is not a finite number"));
        }
    }
    if spec.parameters.len() > limits::MAX_PARAMETERS {
        push(
            "parameters".into(),
            format!(
                "{} parameters; the limit is {}",
                spec.parameters.len(),
                limits::MAX_PARAMETERS
            ),
        );
    }
    if spec.name.trim().is_empty() {
        push("name".into(), "must not be empty".into());
    }
    match (&spec.metric, spec.metrics.first()) {
        (None, None) => push("metric".into(), "an experiment needs a metric (or metrics)".into()),
        (Some(m), Some(first)) if m != first => push(
            "metric".into(),
            format!(
                "with metrics, metric must be left out or be the first of them ({})",
                first.name
            ),
        ),
        (None, Some(first)) => spec.metric = Some(first.clone()),
        _ => {}
    }
    let objectives: Vec<(String, MetricSpec)> = if spec.metrics.is_empty() {
        spec.metric.iter().map(|m| ("metric".to_string(), m.clone())).collect()
    } else {
        spec.metrics
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("metrics.{i}"), m.clone()))
            .collect()
    };
    let mut seen = std::collections::BTreeSet::new();
    for (path, m) in &objectives {
        if m.name.trim().is_empty() {
            push(format!("{path}.name"), "must not be empty".into());
        }
        if m.name == "step" {
            push(
                format!("{path}.name"),
                "`step` is the step counter, not a metric".into(),
            );
        }
        if !seen.insert(m.name.clone()) {
            push(format!("{path}.name"), format!("{} is named twice", m.name));
        }
    }
    if spec.metrics.len() > 1 {
        if !matches!(
            spec.searcher.name,
            SearcherName::Grid | SearcherName::Random | SearcherName::Tpe
        ) {
            push(
                "metrics".into(),
                format!(
                    "several objectives work with grid, random and tpe, not {}",
                    spec.searcher.name.as_str()
                ),
            );
        }
        if spec.scheduler.is_some() {
            push("scheduler".into(), "early stopping needs a single metric".into());
        }
        if spec.metrics.iter().any(|m| m.target.is_some()) {
            push(
                "metrics".into(),
                "a target stops on one metric; set it with a single metric".into(),
            );
        }
    }
    let mut space = Space::new();
    for (name, p) in &spec.parameters {
        let path = format!("parameters.{name}");
        if !valid_param_name(name) {
            push(path.clone(), "parameter names use letters, digits, `_` and `-`".into());
        }
        match param_of(p) {
            Ok(param) => {
                space.insert(name.clone(), param);
            }
            Err((field, msg)) => {
                let path = if field.is_empty() {
                    path
                } else {
                    format!("{path}.{field}")
                };
                push(path, msg);
            }
        }
    }
    let mut problems = Vec::new();
    let conditions = conditions_of(&spec.parameters, &space, &mut problems);
    for (path, msg) in problems {
        push(path, msg);
    }
    for (name, when) in conditions {
        if let Some(param) = space.get(&name).cloned() {
            space.insert_when(name, param, when);
        }
    }
    if spec.parallel_trials == 0 {
        push("parallel_trials".into(), "must be at least 1".into());
    }
    if spec.max_trials == Some(0) {
        push("max_trials".into(), "must be at least 1".into());
    }
    let r = &spec.resources;
    match r.workers {
        WorkerCount::Fixed(0) => push("resources.workers".into(), "must be at least 1".into()),
        WorkerCount::Elastic { min: 0, .. } => push("resources.workers.min".into(), "must be at least 1".into()),
        WorkerCount::Elastic { min, max } if max < min => push(
            "resources.workers.max".into(),
            format!("must be at least min ({min}), got {max}"),
        ),
        _ => {}
    }
    if r.workers.max() > MAX_RANKS {
        push(
            "resources.workers".into(),
            format!("at most {MAX_RANKS} ranks per trial, got {}", r.workers.max()),
        );
    }
    if r.cpus == 0 && r.gpus == 0 {
        push(
            "resources.cpus".into(),
            "a trial needs at least one cpu slot or one gpu".into(),
        );
    }
    match (&spec.trial.builtin, spec.trial.command.is_empty()) {
        (Some(_), false) => push(
            "trial.builtin".into(),
            "give either trial.command or trial.builtin, not both".into(),
        ),
        (None, true) => push(
            "trial.command".into(),
            "must name a program to run (or use trial.builtin)".into(),
        ),
        (None, false) if spec.trial.command[0].trim().is_empty() => {
            push("trial.command".into(), "must name a program to run".into())
        }
        _ => {}
    }
    for (i, arg) in spec.trial.command.iter().enumerate() {
        for missing in unknown_refs(arg, &spec.parameters) {
            push(
                format!("trial.command[{i}]"),
                format!("refers to ${{params.{missing}}}, which is not in parameters"),
            );
        }
    }
    for (k, v) in &spec.trial.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            push(
                format!("trial.env.{k}"),
                "is not a valid environment variable name".into(),
            );
        }
        for missing in unknown_refs(v, &spec.parameters) {
            push(
                format!("trial.env.{k}"),
                format!("refers to ${{params.{missing}}}, which is not in parameters"),
            );
        }
    }
    if let Some(tree) = &spec.trial.builtin {
        let mut found = Vec::new();
        template::strings(tree, "trial.builtin", &mut found);
        for (path, s) in &found {
            for missing in unknown_refs(s, &spec.parameters) {
                push(
                    path.clone(),
                    format!("refers to ${{params.{missing}}}, which is not in parameters"),
                );
            }
        }
        // Type-check with a representative value of each parameter in place.
        let sample = template::substitute_tree(tree, &crate::builtin::representative(&space));
        match serde_path_to_error::deserialize::<_, crate::builtin::BuiltinSpec>(sample) {
            Ok(b) => {
                for (field, msg) in b.problems() {
                    push(format!("trial.builtin.{field}"), msg);
                }
            }
            Err(e) => {
                let sub = e.path().to_string();
                let path = if sub == "." {
                    "trial.builtin".to_string()
                } else {
                    format!("trial.builtin.{sub}")
                };
                push(path, e.into_inner().to_string());
            }
        }
    }
    let timeout = match &spec.trial.timeout {
        None => None,
        Some(t) => match humantime::parse_duration(t) {
            Ok(d) if d.is_zero() => {
                push("trial.timeout".into(), "must be longer than zero".into());
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                push(
                    "trial.timeout".into(),
                    format!("{t:?} is not a duration such as 90s, 30m or 2h: {e}"),
                );
                None
            }
        },
    };
    if let Some(s) = &spec.storage
        && let Err(e) = crate::storage::StorageUri::parse(s)
    {
        push("storage".into(), e.to_string());
    }
    if spec.checkpoint.keep_last == 0 {
        push("checkpoint.keep_last".into(), "must be at least 1".into());
    }
    let max_trials = match spec.searcher.name {
        // Sized only when every parameter converted and their number is within bounds: a grid
        // of what is left would be sized for nothing.
        SearcherName::Grid
            if space.len() != spec.parameters.len() || spec.parameters.len() > limits::MAX_PARAMETERS =>
        {
            0
        }
        SearcherName::Grid => match space::grid_count(&space, limits::MAX_GRID_STEPS) {
            GridSize::Continuous => {
                let continuous: Vec<(&str, &Param)> = space
                    .iter()
                    .filter(|(_, p)| p.grid_len().is_none())
                    .map(|(k, p)| (k.as_str(), p))
                    .collect();
                for (name, p) in continuous {
                    let why = match p {
                        Param::LogIntUniform { .. } => {
                            "a log_int_uniform range is drawn on a log scale, not enumerated; list the values to visit (values: [16, 32, 64])"
                        }
                        _ => "this range is continuous",
                    };
                    push(
                        format!("parameters.{name}"),
                        format!("grid search needs values, int_uniform or q_uniform; {why}"),
                    );
                }
                0
            }
            GridSize::Points(g) if g <= limits::MAX_GRID_POINTS as u128 => {
                let g = g as u64;
                spec.max_trials.map_or(g, |m| m.min(g))
            }
            too_many => {
                let size = match too_many {
                    GridSize::Points(g) => format!("{g} points"),
                    GridSize::TooIntricate { at_least } => format!("at least {at_least} points"),
                    _ => "more than 2^128 points".to_string(),
                };
                let message = match too_many {
                    GridSize::TooIntricate { at_least } if at_least <= limits::MAX_GRID_POINTS as u128 => format!(
                        "the grid's conditions are too intricate to size (more than {} steps); use fewer conditions between parameters",
                        limits::MAX_GRID_STEPS
                    ),
                    _ => format!(
                        "the grid has {size}, {}; a grid search is limited to {} points (use fewer values, or a random search)",
                        grid_factors(&space),
                        limits::MAX_GRID_POINTS
                    ),
                };
                push("parameters".into(), message);
                0
            }
        },
        name => match spec.max_trials {
            Some(m) => m,
            None => {
                push(
                    "max_trials".into(),
                    format!("{} search needs max_trials", name.as_str()),
                );
                0
            }
        },
    };
    for (field, message) in searcher_problems(&spec.searcher, spec.scheduler.as_ref()) {
        push(field, message);
    }
    for (field, message) in budget_problems(&spec, max_trials, budgets) {
        push(field, message);
    }
    // Stored and described with the budget it resolved to, so reading it back gives the same.
    spec.max_trials = Some(max_trials);
    if dropped > 0 {
        errs.push(FieldError {
            path: String::new(),
            location: None,
            message: format!("... and {dropped} more problems"),
        });
    }
    if errs.is_empty() {
        Ok(ValidSpec {
            spec,
            space,
            max_trials,
            timeout,
        })
    } else {
        Err(CoreError::Spec(SpecErrors(errs)))
    }
}

/// Every float field of the spec that a YAML `.nan` or `.inf` could reach, with its path.
fn floats(spec: &ExperimentSpec) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    if let Some(m) = &spec.metric {
        out.push(("metric.target".to_string(), m.target));
    }
    for (i, m) in spec.metrics.iter().enumerate() {
        out.push((format!("metrics.{i}.target"), m.target));
    }
    for (name, p) in &spec.parameters {
        out.push((format!("parameters.{name}.q"), p.q));
        out.push((
            format!("parameters.{name}.min"),
            p.min.as_ref().and_then(Number::as_f64),
        ));
        out.push((
            format!("parameters.{name}.max"),
            p.max.as_ref().and_then(Number::as_f64),
        ));
    }
    let s = &spec.searcher;
    out.push(("searcher.gamma".to_string(), s.gamma));
    out.push(("searcher.quantile_fraction".to_string(), s.quantile_fraction));
    out.push(("searcher.resample_probability".to_string(), s.resample_probability));
    out
}

/// "10 x 1000 x 1000": the sizes of the parameters that make a grid large, largest first.
fn grid_factors(space: &Space) -> String {
    let mut sizes: Vec<(u128, &str)> = space
        .iter()
        .filter_map(|(name, p)| Some((p.grid_len_exact()?, name.as_str())))
        .filter(|(n, _)| *n > 1)
        .collect();
    sizes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let shown: Vec<String> = sizes.iter().take(6).map(|(n, name)| format!("{name}: {n}")).collect();
    let more = if sizes.len() > 6 {
        format!(" and {} more", sizes.len() - 6)
    } else {
        String::new()
    };
    format!("from values per parameter {}{more}", shown.join(", "))
}

/// Budgets above what the coordinator allows; the flag that raises each is named.
fn budget_problems(spec: &ExperimentSpec, max_trials: u64, budgets: &BudgetLimits) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if max_trials > budgets.max_trials {
        let what = if spec.max_trials.is_none() {
            format!("the grid has {max_trials} points, more than")
        } else {
            format!("{max_trials} is above")
        };
        out.push((
            "max_trials".to_string(),
            format!(
                "{what} this coordinator's limit of {} trials per experiment (--max-trials-per-experiment)",
                budgets.max_trials
            ),
        ));
    }
    if spec.parallel_trials > budgets.max_parallel_trials {
        out.push((
            "parallel_trials".to_string(),
            format!(
                "{} is above this coordinator's limit of {} (--max-parallel-trials)",
                spec.parallel_trials, budgets.max_parallel_trials
            ),
        ));
    }
    if spec.max_restarts > budgets.max_restarts {
        out.push((
            "max_restarts".to_string(),
            format!(
                "{} is above this coordinator's limit of {} (--max-restarts)",
                spec.max_restarts, budgets.max_restarts
            ),
        ));
    }
    out
}

/// Settings that do not fit the chosen algorithm, or values out of range.
fn searcher_problems(s: &SearcherSpec, scheduler: Option<&SchedulerSpec>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let name = s.name;
    let mut only = |field: &str, set: bool, allowed: &[SearcherName]| {
        if set && !allowed.contains(&name) {
            let names: Vec<&str> = allowed.iter().map(|a| a.as_str()).collect();
            out.push((
                format!("searcher.{field}"),
                format!("applies to {} only, not to {}", names.join(" and "), name.as_str()),
            ));
        }
    };
    use SearcherName::*;
    only(
        "n_startup_trials",
        s.n_startup_trials.is_some(),
        &[Tpe, Asha, Hyperband],
    );
    only("n_ei_candidates", s.n_ei_candidates.is_some(), &[Tpe, Asha, Hyperband]);
    only("gamma", s.gamma.is_some(), &[Tpe, Asha, Hyperband]);
    only("reduction_factor", s.reduction_factor.is_some(), &[Asha, Hyperband]);
    only("grace_period", s.grace_period.is_some(), &[Asha, Hyperband]);
    only("stop_once", s.stop_once.is_some(), &[Asha, Hyperband]);
    only("brackets", s.brackets.is_some(), &[Asha, Hyperband]);
    only("sampler", s.sampler.is_some(), &[Asha, Hyperband]);
    only("max_resource", s.max_resource.is_some(), &[Asha, Hyperband]);
    only("resource", s.resource.is_some(), &[Asha, Hyperband, Pbt]);
    only("population_size", s.population_size.is_some(), &[Pbt]);
    only("perturbation_interval", s.perturbation_interval.is_some(), &[Pbt]);
    only("quantile_fraction", s.quantile_fraction.is_some(), &[Pbt]);
    only("resample_probability", s.resample_probability.is_some(), &[Pbt]);
    if matches!(name, Asha | Hyperband) && s.sampler == Some(SamplerName::Random) {
        for (field, set) in [
            ("n_startup_trials", s.n_startup_trials.is_some()),
            ("n_ei_candidates", s.n_ei_candidates.is_some()),
            ("gamma", s.gamma.is_some()),
        ] {
            if set {
                out.push((
                    format!("searcher.{field}"),
                    "applies to the tpe sampler only, not to sampler: random".into(),
                ));
            }
        }
    }
    if name == Pbt {
        if s.perturbation_interval.is_none_or(|i| i == 0) {
            out.push((
                "searcher.perturbation_interval".into(),
                "pbt needs a perturbation_interval of at least 1 (steps or epochs between exploits)".into(),
            ));
        }
        if s.population_size.is_some_and(|p| p < 2) {
            out.push(("searcher.population_size".into(), "must be at least 2".into()));
        }
        if let Some(q) = s.quantile_fraction
            && !(q > 0.0 && q <= 0.5)
        {
            out.push((
                "searcher.quantile_fraction".into(),
                format!("must lie in (0, 0.5], got {q}"),
            ));
        }
        if let Some(p) = s.resample_probability
            && !(0.0..=1.0).contains(&p)
        {
            out.push((
                "searcher.resample_probability".into(),
                format!("must lie in [0, 1], got {p}"),
            ));
        }
    }
    if let Some(g) = s.gamma
        && !(g > 0.0 && g < 1.0)
    {
        out.push((
            "searcher.gamma".into(),
            format!("must lie strictly between 0 and 1, got {g}"),
        ));
    }
    match s.n_ei_candidates {
        Some(0) => out.push(("searcher.n_ei_candidates".into(), "must be at least 1".into())),
        Some(n) if n > limits::MAX_EI_CANDIDATES => out.push((
            "searcher.n_ei_candidates".into(),
            format!("{n} is above the limit of {}", limits::MAX_EI_CANDIDATES),
        )),
        _ => {}
    }
    if s.reduction_factor.is_some_and(|r| r < 2) {
        out.push(("searcher.reduction_factor".into(), "must be at least 2".into()));
    }
    if s.grace_period == Some(0) {
        out.push(("searcher.grace_period".into(), "must be at least 1".into()));
    }
    if s.brackets == Some(0) {
        out.push(("searcher.brackets".into(), "must be at least 1".into()));
    }
    if matches!(name, Asha | Hyperband) {
        match s.max_resource {
            None => out.push((
                "searcher.max_resource".into(),
                format!(
                    "{} needs max_resource, the step or epoch a trial runs to",
                    name.as_str()
                ),
            )),
            Some(m) if m < s.grace_period.unwrap_or(1) => out.push((
                "searcher.max_resource".into(),
                format!("must be at least grace_period ({})", s.grace_period.unwrap_or(1)),
            )),
            _ => {}
        }
    }
    if let Some(sch) = scheduler {
        if matches!(name, Asha | Hyperband | Pbt) {
            out.push((
                "scheduler".into(),
                format!(
                    "{} stops trials itself; a scheduler composes with grid, random and tpe",
                    name.as_str()
                ),
            ));
        }
        if sch.min_trials == 0 {
            out.push(("scheduler.min_trials".into(), "must be at least 1".into()));
        }
    }
    out
}

fn valid_param_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Converts one W&B-style entry; on error returns the sub-field and the message.
fn param_of(p: &ParamSpec) -> Result<Param, (&'static str, String)> {
    let ranged = p.min.is_some() || p.max.is_some();
    let forms = [p.value.is_some(), p.values.is_some(), ranged]
        .iter()
        .filter(|b| **b)
        .count();
    if forms != 1 {
        return Err(("", "give exactly one of value, values, or min and max".into()));
    }
    if let Some(v) = &p.value {
        if p.distribution.is_some() || p.q.is_some() {
            return Err(("distribution", "only applies to min/max ranges".into()));
        }
        return Ok(Param::Constant { value: v.clone() });
    }
    if let Some(vs) = &p.values {
        if p.distribution.is_some() || p.q.is_some() {
            return Err(("distribution", "only applies to min/max ranges".into()));
        }
        if vs.is_empty() {
            return Err(("values", "must list at least one value".into()));
        }
        return Ok(Param::Categorical { values: vs.clone() });
    }
    let (Some(min), Some(max)) = (&p.min, &p.max) else {
        return Err((
            if p.min.is_none() { "min" } else { "max" },
            "a range needs both min and max".into(),
        ));
    };
    let ints = min.is_i64() && max.is_i64();
    let dist = p.distribution.unwrap_or(if ints {
        Distribution::IntUniform
    } else {
        Distribution::Uniform
    });
    let (lo, hi) = (min.as_f64().unwrap_or(f64::NAN), max.as_f64().unwrap_or(f64::NAN));
    if !lo.is_finite() || !hi.is_finite() {
        return Err(("min", "min and max must be finite numbers".into()));
    }
    if lo > hi {
        return Err(("min", format!("min ({min}) is greater than max ({max})")));
    }
    // A draw spans max - min; past f64's range it is infinite and no draw can be made.
    if !(hi - lo).is_finite() {
        return Err((
            "max",
            format!("the range from {min} to {max} is wider than a float can hold"),
        ));
    }
    if p.q.is_some() && dist != Distribution::QUniform {
        return Err(("q", "only applies to distribution: q_uniform".into()));
    }
    match dist {
        Distribution::Uniform => Ok(Param::Uniform { min: lo, max: hi }),
        Distribution::LogUniform => {
            if lo <= 0.0 {
                return Err(("min", format!("log_uniform needs min > 0, got {min}")));
            }
            Ok(Param::LogUniform { min: lo, max: hi })
        }
        Distribution::IntUniform => {
            let (Some(a), Some(b)) = (min.as_i64(), max.as_i64()) else {
                return Err(("min", "int_uniform needs integer min and max".into()));
            };
            Ok(Param::IntUniform { min: a, max: b })
        }
        Distribution::QUniform => {
            let Some(q) = p.q else {
                return Err(("q", "q_uniform needs q, the step between values".into()));
            };
            if !(q.is_finite() && q > 0.0) {
                return Err(("q", format!("must be a positive number, got {q}")));
            }
            // Grid values are counted as multiples of q; f64 counts them exactly up to 2^53.
            const EXACT: f64 = (1u64 << 53) as f64;
            if !((lo / q).abs() <= EXACT && (hi / q).abs() <= EXACT) {
                return Err((
                    "q",
                    format!("{q} is too small for this range: min/q and max/q must lie within ±2^53"),
                ));
            }
            if (lo / q).ceil() > (hi / q).floor() {
                return Err(("q", format!("no multiple of {q} lies between {min} and {max}")));
            }
            Ok(Param::QUniform { min: lo, max: hi, q })
        }
        Distribution::LogIntUniform => {
            let (Some(a), Some(b)) = (min.as_i64(), max.as_i64()) else {
                return Err(("min", "log_int_uniform needs integer min and max".into()));
            };
            if a < 1 {
                return Err(("min", format!("log_int_uniform needs min >= 1, got {min}")));
            }
            Ok(Param::LogIntUniform { min: a, max: b })
        }
    }
}

/// The `when` of every parameter as conditions; the problems found in them go to `problems`
/// (field path, message). `space` holds the parameters that converted; a parent missing from it
/// had its own error reported already.
fn conditions_of(
    params: &BTreeMap<String, ParamSpec>,
    space: &Space,
    problems: &mut Vec<(String, String)>,
) -> Vec<(String, Condition)> {
    let mut out = Vec::new();
    // One hashed index per parent, so a condition costs what it names, not what its parent holds.
    let mut lookups: BTreeMap<&str, DomainIndex<'_>> = BTreeMap::new();
    for (name, p) in params {
        let Some(when) = &p.when else { continue };
        let path = format!("parameters.{name}.when");
        if when.is_empty() {
            problems.push((path, "name at least one parameter this one depends on".into()));
            continue;
        }
        let mut condition = Condition::new();
        for (parent, given) in when {
            let path = format!("{path}.{parent}");
            // A list means any of its values; a single value is a list of one.
            let (values, listed) = match given {
                Value::Array(vs) => (vs.clone(), true),
                v => (vec![v.clone()], false),
            };
            if parent == name {
                problems.push((path, "a parameter cannot depend on itself".into()));
                continue;
            }
            if !params.contains_key(parent) {
                problems.push((path, format!("{parent} is not a parameter")));
                continue;
            }
            if values.is_empty() {
                problems.push((path, "must list at least one value".into()));
                continue;
            }
            let Some(parent_param) = space.get(parent) else {
                continue;
            };
            if matches!(
                parent_param,
                Param::Uniform { .. } | Param::LogUniform { .. } | Param::QUniform { .. }
            ) {
                problems.push((
                    path,
                    format!("{parent} is a float range; a condition tests a parameter given by value, values or an integer range"),
                ));
                continue;
            }
            let lookup = lookups
                .entry(parent.as_str())
                .or_insert_with(|| DomainIndex::new(parent_param));
            for (i, v) in values.iter().enumerate() {
                if lookup.index_of(v).is_none() {
                    let at = if listed { format!("{path}[{i}]") } else { path.clone() };
                    problems.push((at, format!("{parent} never takes {v} ({})", domain_text(parent_param))));
                }
            }
            condition.insert(parent.clone(), values);
        }
        out.push((name.clone(), condition));
    }
    for cycle in cycles(params) {
        let path = format!("parameters.{}.when.{}", cycle[0], cycle[1]);
        problems.push((path, format!("conditions form a cycle: {}", cycle.join(" -> "))));
    }
    out
}

/// What a discrete domain can take, for error messages.
fn domain_text(p: &Param) -> String {
    match p {
        Param::Constant { value } => format!("its value is {value}"),
        Param::Categorical { values } => {
            let vs: Vec<String> = values.iter().map(Value::to_string).collect();
            format!("its values are {}", vs.join(", "))
        }
        Param::IntUniform { min, max } | Param::LogIntUniform { min, max } => {
            format!("its range is {min} to {max}")
        }
        other => format!("{other:?}"),
    }
}

/// One cycle of `when` references per group of parameters that depend on each other (a strongly
/// connected component), starting at the group's smallest name and closed by repeating it; the
/// shortest such cycle through that name. Linear in the parameters and their references.
fn cycles(params: &BTreeMap<String, ParamSpec>) -> Vec<Vec<String>> {
    let names: Vec<&str> = params.keys().map(String::as_str).collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    // Edges from a parameter to the parents it names, in name order.
    let parents: Vec<Vec<usize>> = names
        .iter()
        .map(|name| {
            params[*name]
                .when
                .iter()
                .flat_map(|w| w.keys())
                .filter(|p| p.as_str() != *name)
                .filter_map(|p| index.get(p.as_str()).copied())
                .collect()
        })
        .collect();
    let mut found = Vec::new();
    for component in components(&parents) {
        if component.len() < 2 {
            continue;
        }
        let inside: HashSet<usize> = component.iter().copied().collect();
        let start = *component.iter().min().expect("not empty");
        // Breadth first from the smallest name, within the group, back to it.
        let mut came_from: HashMap<usize, usize> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut last = None;
        'search: while let Some(v) = queue.pop_front() {
            for &w in &parents[v] {
                if w == start {
                    last = Some(v);
                    break 'search;
                }
                if inside.contains(&w) && !came_from.contains_key(&w) {
                    came_from.insert(w, v);
                    queue.push_back(w);
                }
            }
        }
        let Some(mut v) = last else { continue };
        let mut path = vec![v];
        while v != start {
            v = came_from[&v];
            path.push(v);
        }
        path.reverse();
        let mut cycle: Vec<String> = path.iter().map(|i| names[*i].to_string()).collect();
        cycle.push(names[start].to_string());
        found.push(cycle);
    }
    found.sort();
    found
}

/// Strongly connected components of a graph given as adjacency lists (Tarjan's algorithm,
/// iterative so a long chain of references cannot exhaust the stack).
fn components(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let n = adj.len();
    let (mut index, mut low, mut on_stack) = (vec![UNSEEN; n], vec![0; n], vec![false; n]);
    let (mut stack, mut out, mut next) = (Vec::new(), Vec::new(), 0);
    for root in 0..n {
        if index[root] != UNSEEN {
            continue;
        }
        let mut calls = vec![(root, 0usize)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&(v, edge)) = calls.last() {
            if let Some(&w) = adj[v].get(edge) {
                calls.last_mut().expect("just read").1 += 1;
                if index[w] == UNSEEN {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(u, _)) = calls.last() {
                low[u] = low[u].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                out.push(component);
            }
        }
    }
    out
}

/// Names in `${params.NAME}` references of `s` that are not parameters.
fn unknown_refs(s: &str, params: &BTreeMap<String, ParamSpec>) -> Vec<String> {
    template::refs(s)
        .into_iter()
        .filter(|n| !params.contains_key(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: demo
metric: {name: val_loss, goal: minimize}
parameters:
  lr: {min: 0.0001, max: 0.1, distribution: log_uniform}
  layers: {values: [1, 2, 3]}
  opt: {value: adam}
searcher: {name: random, seed: 7}
max_trials: 10
parallel_trials: 2
trial:
  command: [python3, train.py, "--lr=${params.lr}", "${params.layers}"]
  env: {OPT: "${params.opt}"}
  timeout: 90s
"#;

    fn errors(yaml: &str, sets: &[&str]) -> Vec<FieldError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match parse(yaml, &sets) {
            Err(CoreError::Spec(SpecErrors(v))) => v,
            other => panic!("expected spec errors, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_good_spec() {
        let v = parse(GOOD, &[]).unwrap();
        assert_eq!(v.max_trials, 10);
        assert_eq!(v.timeout, Some(Duration::from_secs(90)));
        assert_eq!(v.space.len(), 3);
        let mut p = Params::new();
        p.insert("lr".into(), serde_json::json!(0.01));
        p.insert("layers".into(), serde_json::json!(2));
        p.insert("opt".into(), serde_json::json!("adam"));
        assert_eq!(v.command_for(&p), vec!["python3", "train.py", "--lr=0.01", "2"]);
        assert_eq!(v.env_for(&p)["OPT"], "adam");
    }

    #[test]
    fn unknown_field_names_path_and_line() {
        let e = errors(&GOOD.replace("parallel_trials: 2", "parallel_trails: 2"), &[]);
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `parallel_trails`"), "{:?}", e[0]);
        assert_eq!(e[0].location.map(|l| l.0), Some(10));
        let e = errors(&GOOD.replace("distribution: log_uniform", "distrib: log_uniform"), &[]);
        assert!(e[0].path.starts_with("parameters.lr"), "{:?}", e[0]);
        assert!(e[0].message.contains("distrib"));
    }

    #[test]
    fn invalid_range_names_field() {
        let e = errors(&GOOD.replace("min: 0.0001, max: 0.1", "min: 0.5, max: 0.1"), &[]);
        assert_eq!(e[0].path, "parameters.lr.min");
        assert_eq!(e[0].location.map(|l| l.0), Some(5));
        assert!(e[0].message.contains("greater than max"));
    }

    #[test]
    fn bad_yaml_has_a_location() {
        let e = errors("name: [unclosed\nmetric: x\n", &[]);
        assert!(e[0].location.is_some());
    }

    #[test]
    fn overrides_apply_and_are_validated() {
        let v = parse(GOOD, &["max_trials=3".into(), "parameters.opt.value=sgd".into()]).unwrap();
        assert_eq!(v.max_trials, 3);
        assert_eq!(v.space["opt"], Param::Constant { value: "sgd".into() });
        let e = errors(GOOD, &["parallel_trials=-1"]);
        assert_eq!(e[0].path, "parallel_trials");
        assert!(e[0].message.contains("--set"));
        let e = errors(GOOD, &["nonsense"]);
        assert!(e[0].message.contains("key=value"));
    }

    #[test]
    fn references_to_unknown_params_are_rejected() {
        let e = errors(&GOOD.replace("${params.layers}", "${params.depth}"), &[]);
        assert_eq!(e[0].path, "trial.command[3]");
        assert!(e[0].message.contains("depth"));
    }

    #[test]
    fn grid_needs_discrete_space_and_caps_budget() {
        let g = GOOD.replace("name: random, seed: 7", "name: grid");
        let e = errors(&g, &[]);
        assert_eq!(e[0].path, "parameters.lr");
        let g = g.replace(
            "{min: 0.0001, max: 0.1, distribution: log_uniform}",
            "{values: [0.1, 0.01]}",
        );
        let v = parse(&g, &[]).unwrap();
        assert_eq!(v.max_trials, 6);
        let v = parse(&g.replace("max_trials: 10", "max_trials: 4"), &[]).unwrap();
        assert_eq!(v.max_trials, 4);
    }

    #[test]
    fn collects_several_errors() {
        let y = GOOD
            .replace("parallel_trials: 2", "parallel_trials: 0")
            .replace("timeout: 90s", "timeout: soon");
        let e = errors(&y, &[]);
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"parallel_trials") && paths.contains(&"trial.timeout"),
            "{paths:?}"
        );
    }

    #[test]
    fn searcher_settings_belong_to_their_algorithm() {
        let with = |searcher: &str| GOOD.replace("searcher: {name: random, seed: 7}", searcher);
        let v = parse(
            &with("searcher: {name: asha, max_resource: 27, reduction_factor: 3}"),
            &[],
        )
        .unwrap();
        assert_eq!(v.spec.searcher.max_resource, Some(27));
        let v = parse(
            &with("searcher: {name: tpe, gamma: 0.2}\nscheduler: {name: median}"),
            &[],
        )
        .unwrap();
        assert_eq!(v.spec.scheduler.unwrap().min_trials, 3);
        let e = errors(&with("searcher: {name: asha}"), &[]);
        assert_eq!(e[0].path, "searcher.max_resource");
        let e = errors(&with("searcher: {name: random, max_resource: 9}"), &[]);
        assert!(e[0].message.contains("applies to asha and hyperband only"), "{e:?}");
        let v = parse(
            &with("searcher: {name: hyperband, max_resource: 9, stop_once: true, sampler: random}"),
            &[],
        )
        .unwrap();
        assert_eq!(v.spec.searcher.sampler, Some(SamplerName::Random));
        let e = errors(&with("searcher: {name: tpe, stop_once: false}"), &[]);
        assert_eq!(e[0].path, "searcher.stop_once");
        let e = errors(
            &with("searcher: {name: asha, max_resource: 9, sampler: random, gamma: 0.3}"),
            &[],
        );
        assert_eq!(e[0].path, "searcher.gamma");
        assert!(e[0].message.contains("tpe sampler only"), "{e:?}");
        let e = errors(&with("searcher: {name: asha, max_resource: 9, sampler: bayes}"), &[]);
        assert!(e[0].path.starts_with("searcher"), "{e:?}");
        let e = errors(&with("searcher: {name: tpe, gamma: 1.5}"), &[]);
        assert_eq!(e[0].path, "searcher.gamma");
        let e = errors(
            &with("searcher: {name: hyperband, max_resource: 9}\nscheduler: {name: median}"),
            &[],
        );
        assert_eq!(e[0].path, "scheduler");
        let e = errors(
            &with("searcher: {name: asha, max_resource: 9, reduction_factor: 1}"),
            &[],
        );
        assert_eq!(e[0].path, "searcher.reduction_factor");
    }

    #[test]
    fn several_objectives() {
        let multi = GOOD.replace(
            "metric: {name: val_loss, goal: minimize}",
            "metrics: [{name: val_loss, goal: minimize}, {name: acc, goal: maximize}]",
        );
        let v = parse(&multi, &[]).unwrap();
        assert_eq!(v.metric().name, "val_loss", "the first objective is the primary");
        assert_eq!(v.objectives().len(), 2);
        // The normalised spec reads back the same.
        assert_eq!(parse(&v.to_yaml(), &[]).unwrap().objectives().len(), 2);
        let e = errors(&multi.replace("name: acc", "name: val_loss"), &[]);
        assert_eq!(e[0].path, "metrics.1.name");
        let e = errors(
            &multi.replace("{name: random, seed: 7}", "{name: asha, max_resource: 9}"),
            &[],
        );
        assert_eq!(e[0].path, "metrics");
        let e = errors(&GOOD.replace("metric: {name: val_loss, goal: minimize}\n", ""), &[]);
        assert_eq!(e[0].path, "metric");
    }

    #[test]
    fn worker_counts_fixed_and_elastic() {
        let with = |w: &str| format!("{GOOD}resources: {{workers: {w}}}\n");
        assert_eq!(
            parse(&with("4"), &[]).unwrap().spec.resources.workers,
            WorkerCount::Fixed(4)
        );
        let v = parse(&with("{min: 2, max: 4}"), &[]).unwrap();
        assert_eq!(v.spec.resources.workers, WorkerCount::Elastic { min: 2, max: 4 });
        assert!(v.spec.resources.workers.is_elastic() && v.spec.resources.workers.is_distributed());
        let e = errors(&with("{min: 2}"), &[]);
        assert!(e[0].message.contains("missing field `max`"), "{e:?}");
        let e = errors(&with("{min: 2, most: 3}"), &[]);
        assert!(e[0].message.contains("unknown field `most`"), "{e:?}");
        let e = errors(&with("{min: 3, max: 2}"), &[]);
        assert_eq!(e[0].path, "resources.workers.max");
        let e = errors(&with("0"), &[]);
        assert_eq!(e[0].path, "resources.workers");
        let e = errors(&with("-1"), &[]);
        assert!(e[0].message.contains("negative"), "{e:?}");
    }

    #[test]
    fn int_ranges_default_to_int_uniform() {
        let v = parse(&GOOD.replace("{values: [1, 2, 3]}", "{min: 1, max: 4}"), &[]).unwrap();
        assert_eq!(v.space["layers"], Param::IntUniform { min: 1, max: 4 });
    }

    #[test]
    fn log_int_ranges_parse_and_validate() {
        let with = |range: &str| GOOD.replace("{values: [1, 2, 3]}", range);
        let v = parse(&with("{min: 16, max: 1024, distribution: log_int_uniform}"), &[]).unwrap();
        assert_eq!(v.space["layers"], Param::LogIntUniform { min: 16, max: 1024 });
        // The stored form reads back to the same space.
        assert_eq!(parse(&v.to_yaml(), &[]).unwrap().space, v.space);
        assert!(v.to_yaml().contains("log_int_uniform"), "{}", v.to_yaml());
        let v = parse(&with("{min: 1, max: 1, distribution: log_int_uniform}"), &[]).unwrap();
        assert_eq!(v.space["layers"], Param::LogIntUniform { min: 1, max: 1 });

        let one = |range: &str| {
            let e = errors(&with(range), &[]);
            assert_eq!(e.len(), 1, "{e:?}");
            (e[0].path.clone(), e[0].message.clone(), e[0].location.map(|l| l.0))
        };
        let (path, message, line) = one("{min: 0, max: 1024, distribution: log_int_uniform}");
        assert_eq!(path, "parameters.layers.min");
        assert_eq!(message, "log_int_uniform needs min >= 1, got 0");
        assert_eq!(line, Some(6));
        let (path, message, _) = one("{min: -8, max: 8, distribution: log_int_uniform}");
        assert_eq!(path, "parameters.layers.min");
        assert!(message.contains("needs min >= 1"), "{message}");
        for range in [
            "{min: 1.5, max: 8, distribution: log_int_uniform}",
            "{min: 1, max: 8.5, distribution: log_int_uniform}",
            "{min: 16.0, max: 64.0, distribution: log_int_uniform}",
        ] {
            let (path, message, _) = one(range);
            assert_eq!(path, "parameters.layers.min", "{range}");
            assert_eq!(message, "log_int_uniform needs integer min and max", "{range}");
        }
        let (path, message, _) = one("{min: 64, max: 16, distribution: log_int_uniform}");
        assert_eq!(path, "parameters.layers.min");
        assert!(message.contains("greater than max"), "{message}");
        let (path, _, _) = one("{min: 16, max: 64, distribution: log_int_uniform, q: 2}");
        assert_eq!(path, "parameters.layers.q");
        let (path, _, _) = one("{min: 16, distribution: log_int_uniform}");
        assert_eq!(path, "parameters.layers.max");
    }

    #[test]
    fn log_int_ranges_reach_trials_as_integers() {
        let v = parse(
            &GOOD.replace(
                "{values: [1, 2, 3]}",
                "{min: 16, max: 1024, distribution: log_int_uniform}",
            ),
            &[],
        )
        .unwrap();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        for _ in 0..100 {
            let p = v.space.sample(&mut rng);
            let layers = p["layers"].as_i64().expect("an integer");
            let cmd = v.command_for(&p);
            assert_eq!(cmd[3], layers.to_string(), "{cmd:?}");
            assert!(!cmd[3].contains('.'));
        }
    }

    #[test]
    fn grid_refuses_log_int_ranges_with_a_reason() {
        let g = GOOD
            .replace("name: random, seed: 7", "name: grid")
            .replace("{min: 0.0001, max: 0.1, distribution: log_uniform}", "{values: [0.1]}")
            .replace(
                "{values: [1, 2, 3]}",
                "{min: 16, max: 1024, distribution: log_int_uniform}",
            );
        let e = errors(&g, &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "parameters.layers");
        assert!(
            e[0].message.contains("log_int_uniform") && e[0].message.contains("values"),
            "{e:?}"
        );
    }

    #[test]
    fn conditions_may_test_log_int_ranges() {
        let y = GOOD.replace(
            "  layers: {values: [1, 2, 3]}\n",
            "  layers: {min: 1, max: 64, distribution: log_int_uniform}\n  wide: {values: [true], when: {layers: [32, 64]}}\n",
        );
        let v = parse(&y, &[]).unwrap();
        assert!(v.space.condition("wide").is_some());
        let e = errors(&y.replace("[32, 64]", "[32, 128]"), &[]);
        assert_eq!(e[0].path, "parameters.wide.when.layers[1]");
        assert!(e[0].message.contains("its range is 1 to 64"), "{e:?}");
    }

    #[test]
    fn builtin_trials_are_type_checked() {
        let base = GOOD.replace(
            "  command: [python3, train.py, \"--lr=${params.lr}\", \"${params.layers}\"]\n",
            "  builtin:\n    model: {modalities: [image]}\n    data: file:///tmp/emo\n    epochs: 2\n    lr: ${params.lr}\n",
        );
        let v = parse(&base, &[]).unwrap();
        let mut p = Params::new();
        p.insert("lr".into(), serde_json::json!(0.003));
        assert_eq!(v.builtin_for(&p).unwrap()["lr"], serde_json::json!(0.003));
        let e = errors(&base.replace("epochs: 2", "epochs: two"), &[]);
        assert_eq!(e[0].path, "trial.builtin.epochs", "{e:?}");
        let e = errors(&base.replace("epochs: 2", "epoch: 2"), &[]);
        assert!(e[0].message.contains("epoch"), "{e:?}");
        let e = errors(&base.replace("${params.lr}", "${params.rate}"), &[]);
        assert_eq!(e[0].path, "trial.builtin.lr");
        let e = errors(&base.replace("epochs: 2", "epochs: 0"), &[]);
        assert_eq!(e[0].path, "trial.builtin.epochs");
        // A log-integer range type-checks as an integer field.
        let log_int = base
            .replace(
                "{values: [1, 2, 3]}",
                "{min: 1, max: 64, distribution: log_int_uniform}",
            )
            .replace("epochs: 2", "epochs: ${params.layers}");
        parse(&log_int, &[]).unwrap();
    }

    const CONDITIONAL: &str = r#"
name: cond
metric: {name: val_loss, goal: minimize}
parameters:
  optimizer: {values: [sgd, adam, rmsprop]}
  momentum: {values: [0.9, 0.99], when: {optimizer: sgd}}
  beta2: {values: [0.99, 0.999], when: {optimizer: [adam, rmsprop]}}
  nesterov: {values: [true, false], when: {optimizer: sgd, momentum: 0.99}}
  layers: {min: 1, max: 2}
searcher: {name: grid}
trial:
  command: [python3, train.py, "--opt=${params.optimizer}", "--momentum=${params.momentum}", "${params.layers}"]
  env: {BETA2: "${params.beta2}", LAYERS: "${params.layers}"}
"#;

    #[test]
    fn conditions_parse_and_size_the_grid() {
        let v = parse(CONDITIONAL, &[]).unwrap();
        let when = |name: &str| v.space.condition(name).cloned();
        assert_eq!(when("optimizer"), None);
        assert_eq!(
            when("momentum"),
            Some(Condition::from([("optimizer".into(), vec!["sgd".into()])]))
        );
        assert_eq!(
            when("beta2"),
            Some(Condition::from([(
                "optimizer".into(),
                vec!["adam".into(), "rmsprop".into()]
            )]))
        );
        assert_eq!(
            when("nesterov"),
            Some(Condition::from([
                ("momentum".into(), vec![serde_json::json!(0.99)]),
                ("optimizer".into(), vec!["sgd".into()]),
            ]))
        );
        // Per layer: sgd with 0.9 (1) or 0.99 and either nesterov (2), adam and rmsprop with two
        // beta2 each (4): 7 points, not the 48 of the full product.
        assert_eq!(v.max_trials, 2 * 7);
        assert_eq!(space::grid_size(&v.space), Some(14));
        // The normalised spec reads back the same.
        assert_eq!(parse(&v.to_yaml(), &[]).unwrap().space, v.space);
        // Overrides reach conditions too.
        // With beta2 for adam only, rmsprop is one point: 3 + 2 + 1 per layer.
        let v = parse(CONDITIONAL, &["parameters.beta2.when.optimizer=adam".into()]).unwrap();
        assert_eq!(v.max_trials, 2 * 6);
    }

    #[test]
    fn inactive_parameters_leave_their_arguments_out() {
        let v = parse(CONDITIONAL, &[]).unwrap();
        let p = Params::from([
            ("optimizer".into(), "adam".into()),
            ("beta2".into(), serde_json::json!(0.999)),
            ("layers".into(), 2.into()),
        ]);
        assert_eq!(v.command_for(&p), vec!["python3", "train.py", "--opt=adam", "2"]);
        let env = v.env_for(&p);
        assert_eq!(env.get("BETA2").map(String::as_str), Some("0.999"));
        assert_eq!(env.get("LAYERS").map(String::as_str), Some("2"));
        let p = Params::from([
            ("optimizer".into(), "sgd".into()),
            ("momentum".into(), serde_json::json!(0.9)),
            ("layers".into(), 1.into()),
        ]);
        assert_eq!(
            v.command_for(&p),
            vec!["python3", "train.py", "--opt=sgd", "--momentum=0.9", "1"]
        );
        assert!(!v.env_for(&p).contains_key("BETA2"));
    }

    #[test]
    fn condition_errors_name_the_field() {
        let with = |line: &str| CONDITIONAL.replace("  momentum: {values: [0.9, 0.99], when: {optimizer: sgd}}", line);
        let one = |yaml: &str| {
            let e = errors(yaml, &[]);
            assert_eq!(e.len(), 1, "{e:?}");
            e.into_iter().next().unwrap()
        };
        // The momentum line is line 6 of the file.
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {optimiser: sgd}}"));
        assert_eq!(
            (e.path.as_str(), e.location.map(|l| l.0)),
            ("parameters.momentum.when.optimiser", Some(6))
        );
        assert!(e.message.contains("optimiser is not a parameter"), "{e:?}");
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {optimizer: adagrad}}"));
        assert_eq!(e.path, "parameters.momentum.when.optimizer");
        assert!(e.message.contains("never takes \"adagrad\""), "{e:?}");
        assert!(e.message.contains("\"sgd\", \"adam\", \"rmsprop\""), "{e:?}");
        let e = one(&with(
            "  momentum: {values: [0.9, 0.99], when: {optimizer: [sgd, adagrad]}}",
        ));
        assert_eq!(e.path, "parameters.momentum.when.optimizer[1]");
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {optimizer: []}}"));
        assert_eq!(e.path, "parameters.momentum.when.optimizer");
        assert!(e.message.contains("at least one value"), "{e:?}");
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {}}"));
        assert_eq!(e.path, "parameters.momentum.when");
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {momentum: 0.9}}"));
        assert_eq!(e.path, "parameters.momentum.when.momentum");
        assert!(e.message.contains("itself"), "{e:?}");
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {layers: 3}}"));
        assert!(e.message.contains("its range is 1 to 2"), "{e:?}");
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {layers: 1.0}}"));
        assert_eq!(
            e.path, "parameters.momentum.when.layers",
            "a float never equals an integer draw"
        );
        // Integer and constant parents are fine.
        parse(&with("  momentum: {values: [0.9, 0.99], when: {layers: [2]}}"), &[]).unwrap();
        parse(&with("  momentum: {value: 0.99, when: {optimizer: sgd}}\n  fixed: {value: 1}\n  lr: {value: 2, when: {fixed: 1}}"), &[]).unwrap();
        let float = with(
            "  momentum: {min: 0.5, max: 0.99, when: {optimizer: sgd}}\n  lr: {min: 0.1, max: 1.0}\n  wd: {values: [0], when: {lr: 0.5}}",
        );
        let e = errors(&float, &[]);
        assert!(
            e.iter()
                .any(|e| e.path == "parameters.wd.when.lr" && e.message.contains("float range")),
            "{e:?}"
        );
        // A cycle is reported once, from its smallest name.
        let e = one(&with("  momentum: {values: [0.9, 0.99], when: {nesterov: true}}"));
        assert_eq!(e.path, "parameters.momentum.when.nesterov");
        assert!(e.message.contains("cycle: momentum -> nesterov -> momentum"), "{e:?}");
        let e = one(
            &with("  momentum: {values: [0.9, 0.99], when: {optimizer: sgd, beta2: 0.99}}")
                .replace("when: {optimizer: [adam, rmsprop]}", "when: {nesterov: true}"),
        );
        assert_eq!(e.path, "parameters.beta2.when.nesterov");
        assert!(e.message.contains("beta2 -> nesterov -> momentum -> beta2"), "{e:?}");
        // Unknown fields inside a parameter are still refused.
        let e = one(&with("  momentum: {values: [0.9, 0.99], wen: {optimizer: sgd}}"));
        assert!(e.message.contains("unknown field `wen`"), "{e:?}");
    }
}

#[cfg(test)]
#[path = "spec_limits_tests.rs"]
mod limits_tests;
