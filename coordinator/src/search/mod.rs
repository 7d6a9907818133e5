//! Searchers decide which hyperparameters to try next. They are pure: no I/O, no clock,
//! deterministic from the spec's seed, and their whole state is a JSON value so a restarted
//! coordinator continues exactly where the old one stopped. One file per algorithm.

mod asha;
mod grid;
mod median;
mod pbt;
pub mod preview;
mod random;
mod tpe;

use chorus_core::TrialId;
use chorus_core::space::Params;
use chorus_core::spec::{Goal, ResourceName, SearcherName, ValidSpec};

pub use asha::{AshaSearcher, AshaSettings};
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
}

/// Builds the searcher a spec asks for (with its early-stopping scheduler, if any), from saved
/// state when resuming.
pub fn build(spec: &ValidSpec, saved: Option<&serde_json::Value>) -> Box<dyn Searcher> {
    match &spec.spec.scheduler {
        Some(sch) => {
            // The scheduler keeps its own state beside the searcher's.
            let inner = build_searcher(spec, saved.and_then(|v| v.get("searcher")));
            Box::new(MedianStopping::new(
                inner,
                spec.metric().goal,
                sch,
                saved.and_then(|v| v.get("scheduler")),
            ))
        }
        None => build_searcher(spec, saved),
    }
}

fn build_searcher(spec: &ValidSpec, saved: Option<&serde_json::Value>) -> Box<dyn Searcher> {
    let s = &spec.spec.searcher;
    let goal = spec.metric().goal;
    let space = spec.space.clone();
    match s.name {
        SearcherName::Grid => Box::new(GridSearcher::new(space, saved)),
        SearcherName::Random => Box::new(RandomSearcher::new(space, s.seed, saved)),
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
            )
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
        )),
        SearcherName::Asha | SearcherName::Hyperband => Box::new(AshaSearcher::new(
            space,
            s.seed,
            goal,
            AshaSettings::from_spec(s),
            saved,
        )),
    }
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
            let mut a = build(&s, None);
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
            let mut b = build(&s, Some(&saved));
            for _ in 0..4 {
                assert_eq!(a.suggest(TrialId(9)), b.suggest(TrialId(9)), "{name}");
            }
            let mut fresh = build(&s, None);
            assert_eq!(
                first,
                (0..2).map(|i| fresh.suggest(TrialId(i))).collect::<Vec<_>>(),
                "{name} is deterministic"
            );
        }
    }
}
