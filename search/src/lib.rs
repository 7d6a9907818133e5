//! The pure searchers of Chorus: they decide which hyperparameters to try next (grid, random,
//! TPE, ASHA and Hyperband, PBT), the median stopping rule that may wrap any of them, and the
//! simulator behind `chorus search preview`. A searcher takes events (a trial reported, completed,
//! failed) and returns actions (create, stop, pause, promote, exploit); it does no I/O, reads no
//! clock, is deterministic from the spec's seed, and its whole state is a JSON value so a
//! restarted coordinator continues exactly where the old one stopped. One file per algorithm.
//!
//! This crate depends on `chorus-core` alone among ours and must stay free of servers, stores and
//! async runtimes: the coordinator runs it under its lock, and the CLI links it for previews.

mod asha;
mod error;
mod grid;
mod median;
mod pbt;
pub mod preview;
mod random;
mod tpe;

use chorus_core::TrialId;
use chorus_core::space::Params;
use chorus_core::spec::{Goal, ResourceName, SearcherName, ValidSpec};

pub use asha::{AshaSearcher, AshaSettings, default_grace};
pub use error::{Result, SearchError};
pub use grid::GridSearcher;
pub use median::MedianStopping;
pub use pbt::{PbtSearcher, PbtSettings};
pub use random::RandomSearcher;
pub use tpe::{TpeSearcher, TpeSettings};

/// What the experiment tells its searcher.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchEvent {
    /// A trial reported the experiment's metric, at a step and (when the report names one) an
    /// epoch: the resources adaptive searchers count.
    Reported {
        trial: TrialId,
        step: Option<i64>,
        epoch: Option<f64>,
        value: f64,
    },
    /// A trial completed; `value` is its best metric, if it reported any. For an experiment with
    /// several objectives, `objectives` holds the trial's last value of each, in the spec's
    /// order (empty when it did not report them all).
    Completed {
        trial: TrialId,
        value: Option<f64>,
        objectives: Vec<f64>,
    },
    /// A trial failed for good (restarts exhausted) or was killed.
    Failed { trial: TrialId },
}

/// What a searcher asks for when the experiment has room for another trial.
#[derive(Debug, Clone, PartialEq)]
pub enum Suggestion {
    Create(Params),
    /// Nothing to suggest until more results arrive.
    Wait,
    /// The search space is exhausted: no more trials, ever.
    Exhausted,
}

/// Actions a searcher may take in response to events: adaptive searchers and schedulers stop
/// trials that are not worth their resource; grid, random and tpe alone never do.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchAction {
    Stop {
        trial: TrialId,
        reason: String,
    },
    /// Successive halving with promotion: `trial` stops its attempt and waits at a rung until
    /// [`Searcher::promote`] names it (it then resumes from its newest checkpoint) or the
    /// search ends.
    Pause {
        trial: TrialId,
        reason: String,
    },
    /// Population-based training: `trial` stops its attempt and continues from `donor`'s latest
    /// checkpoint with `params` (the donor's, perturbed).
    Exploit {
        trial: TrialId,
        donor: TrialId,
        params: Params,
        reason: String,
    },
}

impl SearchEvent {
    /// How far a report says its trial got, in the resource a searcher counts.
    pub fn resource(&self, name: ResourceName) -> Option<f64> {
        match (self, name) {
            (SearchEvent::Reported { step, .. }, ResourceName::Step) => step.map(|s| s as f64),
            (SearchEvent::Reported { epoch, .. }, ResourceName::Epoch) => *epoch,
            _ => None,
        }
    }
}

/// A metric value turned into a loss (lower is better), so searchers need one ordering only.
pub fn loss(goal: Goal, value: f64) -> f64 {
    match goal {
        Goal::Minimize => value,
        Goal::Maximize => -value,
    }
}

pub trait Searcher: Send + std::fmt::Debug {
    /// Parameters for a new trial that will be `trial` if created; the id lets adaptive
    /// searchers match later reports to what they suggested.
    fn suggest(&mut self, trial: TrialId) -> Suggestion;
    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction>;
    /// A paused trial to resume, with the reason, asked whenever the experiment has a free
    /// slot and before [`Searcher::suggest`]: a promotion comes before any new trial.
    fn promote(&mut self) -> Option<(TrialId, String)> {
        None
    }
    /// The state to persist; `build` with it yields an equivalent searcher.
    fn save(&self) -> serde_json::Value;
    /// Seeds a new searcher with another experiment's finished trials (their parameters and
    /// final metric value, as reported), before it suggests anything. Returns whether it used
    /// them; a searcher that cannot (its state is a schedule, not a model) starts fresh.
    fn warm_start(&mut self, _prior: &[Prior]) -> bool {
        false
    }
}

/// A finished trial of an earlier experiment, for [`Searcher::warm_start`].
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    /// The trial's id; ids are unique across experiments, so they cannot clash with new trials.
    pub trial: TrialId,
    pub params: Params,
    /// Its final value of the searcher metric (not a loss: the goal is applied by the searcher).
    pub value: f64,
}

/// Stands in for a searcher whose saved state could not be read: it never suggests a trial, so
/// nothing runs twice while its experiment fails.
#[derive(Debug)]
pub struct Unreadable;

impl Searcher for Unreadable {
    fn suggest(&mut self, _trial: TrialId) -> Suggestion {
        Suggestion::Wait
    }

    fn observe(&mut self, _event: &SearchEvent) -> Vec<SearchAction> {
        Vec::new()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// The smallest share of `max_resource` a first rung should give a configuration before it is
/// judged, and `asha`'s default: below it most configurations are compared on the first few percent of their training,
/// where slow starters (small learning rates, large batches, heavy regularisation) look worst
/// and often end best.
pub const MIN_GRACE_SHARE: f64 = 0.05;

/// Settings of a valid spec that are probably not what was meant, one sentence each: shown at
/// submit and validation, never an error.
pub fn warnings(spec: &ValidSpec) -> Vec<String> {
    let s = &spec.spec.searcher;
    let mut out = Vec::new();
    if s.name == SearcherName::Asha {
        let a = AshaSettings::from_spec(s);
        let share = a.grace_period as f64 / a.max_resource.max(1) as f64;
        if share < MIN_GRACE_SHARE {
            let what = match (a.resource, a.grace_period) {
                (ResourceName::Step, 1) => "step",
                (ResourceName::Step, _) => "steps",
                (ResourceName::Epoch, 1) => "epoch",
                (ResourceName::Epoch, _) => "epochs",
            };
            // A grace period this small lies below max_resource, so the rung exists.
            let stop = 100.0 * (1.0 - 1.0 / f64::from(a.reduction_factor));
            out.push(format!(
                "searcher.grace_period {} is {:.1} % of max_resource {}: configurations are first judged after {} {what}, \
                 and about {stop:.0} % of them stop there; slow starters look worst that early and often end best. \
                 Leave grace_period out (the default here is {}), set it to at least {} ({:.0} %), \
                 or use `searcher: hyperband`, which hedges across grace periods",
                a.grace_period,
                100.0 * share,
                a.max_resource,
                a.grace_period,
                default_grace(a.max_resource),
                (MIN_GRACE_SHARE * a.max_resource as f64).ceil() as u64,
                100.0 * MIN_GRACE_SHARE,
            ));
        }
    }
    out
}

/// A new searcher of the kind a spec asks for (with its early-stopping scheduler, if any).
pub fn build(spec: &ValidSpec) -> Box<dyn Searcher> {
    build_with(spec, None).expect("a new searcher reads no saved state")
}

/// The searcher a spec asks for, continuing from the state it saved. A state that cannot be
/// read is an error, never a fresh start: a fresh grid would run its points again.
pub fn restore(spec: &ValidSpec, saved: &serde_json::Value) -> Result<Box<dyn Searcher>> {
    build_with(spec, Some(saved)).map_err(|e| match e {
        // Named as the spec names it, with the part that failed.
        SearchError::State { searcher, reason } => SearchError::State {
            searcher: spec.spec.searcher.name.as_str(),
            reason: format!("{searcher} state: {reason}"),
        },
    })
}

/// Reads a searcher's saved state; `None` (a new search) is the default state.
pub(crate) fn read_state<T: serde::de::DeserializeOwned + Default>(
    searcher: &'static str,
    saved: Option<&serde_json::Value>,
) -> Result<T> {
    match saved {
        None => Ok(T::default()),
        Some(v) => T::deserialize(v).map_err(|e| SearchError::State {
            searcher,
            reason: e.to_string(),
        }),
    }
}

/// The part `key` of a saved state that holds several, required when restoring.
fn part<'a>(
    searcher: &'static str,
    saved: Option<&'a serde_json::Value>,
    key: &str,
) -> Result<Option<&'a serde_json::Value>> {
    match saved {
        None => Ok(None),
        Some(v) => v.get(key).map(Some).ok_or_else(|| SearchError::State {
            searcher,
            reason: format!("the saved state has no `{key}` part"),
        }),
    }
}

fn build_with(spec: &ValidSpec, saved: Option<&serde_json::Value>) -> Result<Box<dyn Searcher>> {
    match &spec.spec.scheduler {
        Some(sch) => {
            // The scheduler keeps its own state beside the searcher's.
            let inner = build_searcher(spec, part("median stopping", saved, "searcher")?)?;
            Ok(Box::new(MedianStopping::new(
                inner,
                spec.metric().goal,
                sch,
                part("median stopping", saved, "scheduler")?,
            )?))
        }
        None => build_searcher(spec, saved),
    }
}

fn build_searcher(spec: &ValidSpec, saved: Option<&serde_json::Value>) -> Result<Box<dyn Searcher>> {
    let s = &spec.spec.searcher;
    let goal = spec.metric().goal;
    let space = spec.space.clone();
    Ok(match s.name {
        SearcherName::Grid => Box::new(GridSearcher::new(space, saved)?),
        SearcherName::Random => Box::new(RandomSearcher::new(space, s.seed, saved)?),
        SearcherName::Tpe => Box::new(
            TpeSearcher::new(
                space,
                s.seed,
                goal,
                TpeSettings {
                    n_startup_trials: s.n_startup_trials.unwrap_or(10),
                    n_ei_candidates: s.n_ei_candidates.unwrap_or(24),
                    gamma: s.gamma.unwrap_or(0.25),
                },
                saved,
            )?
            .with_objectives(spec.objectives().iter().map(|m| m.goal).collect()),
        ),
        SearcherName::Pbt => Box::new(PbtSearcher::new(
            space,
            s.seed,
            goal,
            PbtSettings {
                population: s.population_size.map_or(spec.max_trials, u64::from).max(2),
                interval: s.perturbation_interval.unwrap_or(1).max(1),
                quantile: s.quantile_fraction.unwrap_or(0.25),
                resample: s.resample_probability.unwrap_or(0.25),
                resource: s.resource.unwrap_or_default(),
            },
            saved,
        )?),
        SearcherName::Asha | SearcherName::Hyperband => Box::new(AshaSearcher::new(
            space,
            s.seed,
            goal,
            AshaSettings::from_spec(s),
            saved,
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(searcher: &str) -> ValidSpec {
        let (name, extra) = searcher.split_once(' ').unwrap_or((searcher, ""));
        chorus_core::spec::parse(
            &format!(
                "name: s\nmetric: {{name: loss, goal: minimize}}\nsearcher: {{name: {name}, seed: 3{extra}}}\nmax_trials: 5\n\
                 parameters:\n  a: {{values: [1, 2, 3]}}\n  b: {{min: 0, max: 1}}\ntrial: {{command: [x]}}\n"
            ),
            &[],
        )
        .unwrap()
    }

    /// A first rung under 5 % of max_resource is worth a warning (naming the share, the
    /// default and the alternatives); the default, a larger grace period, hyperband and the
    /// other searchers are not.
    #[test]
    fn a_tiny_grace_period_is_warned_about() {
        let w = warnings(&spec("asha , max_resource: 50, grace_period: 1, resource: epoch"));
        assert_eq!(w.len(), 1, "{w:?}");
        for part in [
            "grace_period 1 is 2.0 % of max_resource 50",
            "after 1 epoch,",
            "67 %",
            "default here is 3",
            "at least 3 (5 %)",
            "hyperband",
        ] {
            assert!(w[0].contains(part), "{part:?} in {}", w[0]);
        }
        assert_eq!(warnings(&spec("asha , max_resource: 1000, grace_period: 49")).len(), 1);
        for quiet in [
            "asha , max_resource: 50",
            "asha , max_resource: 1000, grace_period: 50",
            "asha , max_resource: 9, grace_period: 1",
            "hyperband , max_resource: 50",
            "random",
            "tpe",
        ] {
            assert!(
                warnings(&spec(quiet)).is_empty(),
                "{quiet}: {:?}",
                warnings(&spec(quiet))
            );
        }
    }

    /// A searcher rebuilt from its saved state continues with exactly the same suggestions.
    #[test]
    fn restored_searchers_continue_identically() {
        let mut median = spec("random");
        median.spec.scheduler = Some(chorus_core::spec::SchedulerSpec {
            name: chorus_core::spec::SchedulerName::Median,
            grace_period: 1,
            min_trials: 1,
            resource: ResourceName::Step,
        });
        let specs = [
            spec("grid"),
            spec("random"),
            spec("tpe , n_startup_trials: 1"),
            spec("asha , max_resource: 9"),
            spec("hyperband , max_resource: 9"),
            median,
        ];
        for s in specs {
            let name = s.spec.searcher.name.as_str();
            let mut a = build(&s);
            let first: Vec<Suggestion> = (0..2).map(|i| a.suggest(TrialId(i))).collect();
            for (i, v) in [(0, 0.5), (1, 0.2)] {
                let trial = TrialId(i);
                a.observe(&SearchEvent::Reported {
                    trial,
                    step: Some(3),
                    epoch: None,
                    value: v,
                });
                a.observe(&SearchEvent::Completed {
                    trial,
                    value: Some(v),
                    objectives: Vec::new(),
                });
            }
            let saved = a.save();
            let mut b = restore(&s, &saved).unwrap();
            for _ in 0..4 {
                assert_eq!(a.suggest(TrialId(9)), b.suggest(TrialId(9)), "{name}");
            }
            let mut fresh = build(&s);
            assert_eq!(
                first,
                (0..2).map(|i| fresh.suggest(TrialId(i))).collect::<Vec<_>>(),
                "{name} is deterministic"
            );
        }
    }

    /// The specs of the fixture: every searcher over a space without conditions.
    fn fixture_specs() -> Vec<(&'static str, ValidSpec)> {
        let spec = |searcher: &str| {
            let float = if searcher.contains("grid") {
                ""
            } else {
                "  d: {min: 0.001, max: 1.0, distribution: log_uniform}\n"
            };
            chorus_core::spec::parse(
                &format!(
                    "name: s\nmetric: {{name: loss, goal: minimize}}\nsearcher: {searcher}\nmax_trials: 8\n\
                     parameters:\n  a: {{values: [1, 2, 3]}}\n  b: {{min: 0, max: 1}}\n  c: {{values: [x, y]}}\n{float}\
                     trial: {{command: [x]}}\n"
                ),
                &[],
            )
            .unwrap()
        };
        vec![
            ("grid", spec("{name: grid}")),
            ("random", spec("{name: random, seed: 3}")),
            ("tpe", spec("{name: tpe, seed: 3, n_startup_trials: 3}")),
            // The fixture predates pausing and the TPE sampler: these settings are its rule.
            (
                "asha",
                spec("{name: asha, seed: 3, max_resource: 9, stop_once: true, sampler: random}"),
            ),
            (
                "hyperband",
                spec("{name: hyperband, seed: 3, max_resource: 9, stop_once: true, sampler: random}"),
            ),
            (
                "pbt",
                spec("{name: pbt, seed: 3, population_size: 8, perturbation_interval: 1}"),
            ),
        ]
    }

    /// Runs `count` trials from `first`, each reporting at steps 1..=3 and completing; returns
    /// what was suggested.
    fn script(s: &mut dyn Searcher, first: u64, count: u64) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut live = Vec::new();
        for t in first..first + count {
            match s.suggest(TrialId(t)) {
                Suggestion::Create(p) => {
                    let v = p.values().map(|v| v.to_string().len() as f64).sum::<f64>() / (t as f64 + 1.0);
                    live.push((t, v));
                    out.push(serde_json::to_value(&p).unwrap());
                }
                other => out.push(serde_json::Value::String(format!("{other:?}"))),
            }
        }
        for step in 1..=3 {
            for (t, v) in &live {
                for a in s.observe(&SearchEvent::Reported {
                    trial: TrialId(*t),
                    step: Some(step),
                    epoch: None,
                    value: v / step as f64,
                }) {
                    if let SearchAction::Exploit { trial, params, .. } = a {
                        out.push(serde_json::json!({"exploit": trial.0, "params": params}));
                    }
                }
            }
        }
        for (t, v) in &live {
            s.observe(&SearchEvent::Completed {
                trial: TrialId(*t),
                value: Some(v / 3.0),
                objectives: Vec::new(),
            });
        }
        out
    }

    /// Searches saved before parameters could be conditional continue exactly as they did:
    /// the fixture was recorded by that code (the same script, draws and saved states).
    #[test]
    fn searches_saved_before_conditions_continue_identically() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("testdata/saved_before_conditions.json")).unwrap();
        for (name, spec) in fixture_specs() {
            let f = &fixture[name];
            // Read back as the fixture was, so floats compare after the same parse.
            let read = |v: serde_json::Value| -> serde_json::Value {
                serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap()
            };
            let mut fresh = build(&spec);
            assert_eq!(
                read(script(&mut *fresh, 1, 5).into()),
                f["before"],
                "{name}: same draws"
            );
            if !name.contains("asha") && name != "hyperband" {
                // Successive halving's state has gained fields since (defaulted when read).
                assert_eq!(read(fresh.save()), f["saved"], "{name}: same state");
            }
            let mut restored = restore(&spec, &f["saved"]).unwrap();
            assert_eq!(
                read(script(&mut *restored, 6, 4).into()),
                f["after"],
                "{name}: continues"
            );
        }
    }

    fn conditional_spec(searcher: &str) -> ValidSpec {
        let yaml = format!(
            "name: c\nmetric: {{name: loss, goal: minimize}}\nsearcher: {searcher}\nmax_trials: 40\n\
                 parameters:\n  optimizer: {{values: [sgd, adam, rmsprop]}}\n\
                 \x20 momentum: {{values: [0.0, 0.5, 0.9], when: {{optimizer: [sgd, rmsprop]}}}}\n\
                 \x20 nesterov: {{values: [true, false], when: {{momentum: [0.5, 0.9]}}}}\n\
                 \x20 beta2: {{min: 0.9, max: 0.9999, when: {{optimizer: adam}}}}\n\
                 \x20 lr: {{min: 0.0001, max: 0.1, distribution: log_uniform}}\n\
                 trial: {{command: [x]}}\n"
        );
        let yaml = if searcher.contains("grid") {
            yaml.replace("{min: 0.9, max: 0.9999, ", "{values: [0.99, 0.999], ")
                .replace("{min: 0.0001, max: 0.1, distribution: log_uniform}", "{value: 0.01}")
        } else {
            yaml
        };
        chorus_core::spec::parse(&yaml, &[]).unwrap()
    }

    /// What a suggestion may hold in [`conditional_spec`]: exactly the parameters its own values
    /// make active.
    fn assert_consistent(p: &serde_json::Value, what: &str) {
        let opt = p["optimizer"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no optimizer in {p}"));
        let has = |k: &str| p.get(k).is_some();
        assert!(has("lr"), "{what}: {p}");
        assert_eq!(has("momentum"), opt != "adam", "{what}: {p}");
        assert_eq!(has("beta2"), opt == "adam", "{what}: {p}");
        let spun = p.get("momentum").and_then(|m| m.as_f64()).is_some_and(|m| m > 0.0);
        assert_eq!(has("nesterov"), spun, "{what}: a grandchild follows its parent: {p}");
    }

    /// Every searcher suggests (and pbt explores to) only consistent parameter sets over a
    /// conditional space, and restores from its saved state to continue identically.
    #[test]
    fn conditional_spaces_with_every_searcher() {
        let specs = [
            conditional_spec("{name: random, seed: 1}"),
            conditional_spec("{name: tpe, seed: 1, n_startup_trials: 4}"),
            conditional_spec("{name: asha, seed: 1, max_resource: 9}"),
            conditional_spec("{name: hyperband, seed: 1, max_resource: 9}"),
            conditional_spec("{name: pbt, seed: 1, population_size: 6, perturbation_interval: 1}"),
        ];
        for spec in specs {
            let name = spec.spec.searcher.name.as_str();
            let mut a = build(&spec);
            let mut seen = script(&mut *a, 1, 12);
            let saved = a.save();
            let mut b = restore(&spec, &saved).unwrap();
            let (next_a, next_b) = (script(&mut *a, 13, 12), script(&mut *b, 13, 12));
            assert_eq!(next_a, next_b, "{name} continues identically after a restore");
            seen.extend(next_a);
            let mut branches = std::collections::BTreeSet::new();
            for s in &seen {
                let p = s.get("params").unwrap_or(s);
                if p.is_string() {
                    continue; // pbt's population is complete
                }
                assert_consistent(p, name);
                branches.insert(p["optimizer"].as_str().unwrap().to_string());
            }
            assert_eq!(branches.len(), 3, "{name} visits every branch");
            if name == "pbt" {
                assert!(seen.iter().any(|s| s.get("exploit").is_some()), "pbt explored");
            }
        }
        let grid = conditional_spec("{name: grid}");
        // sgd and rmsprop: momentum 0 (1) or 0.5 and 0.9 with either nesterov (4); adam: 2.
        assert_eq!(grid.max_trials, 5 + 5 + 2);
        let mut g = build(&grid);
        let points = script(&mut *g, 1, 13);
        assert_eq!(points.last().unwrap(), "Exhausted");
        for p in &points[..12] {
            assert_consistent(p, "grid");
        }
    }
}
