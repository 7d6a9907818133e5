//! Searchers decide which hyperparameters to try next. They are pure: no I/O, no clock,
//! deterministic from the spec's seed, and their whole state is a JSON value so a restarted
//! coordinator continues exactly where the old one stopped. One file per algorithm.

mod grid;
mod random;

use chorus_core::TrialId;
use chorus_core::space::Params;
use chorus_core::spec::{SearcherName, ValidSpec};

pub use grid::GridSearcher;
pub use random::RandomSearcher;

/// What the experiment tells its searcher.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchEvent {
    /// A trial reported the experiment's metric.
    Reported {
        trial: TrialId,
        step: Option<i64>,
        value: f64,
    },
    /// A trial completed; `value` is its best metric, if it reported any.
    Completed { trial: TrialId, value: Option<f64> },
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

/// Actions a searcher may take in response to events (early stopping arrives with adaptive
/// searchers; grid and random never stop a trial).
#[derive(Debug, Clone, PartialEq)]
pub enum SearchAction {
    Stop { trial: TrialId, reason: String },
}

pub trait Searcher: Send + std::fmt::Debug {
    fn suggest(&mut self) -> Suggestion;
    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction>;
    /// The state to persist; `build` with it yields an equivalent searcher.
    fn save(&self) -> serde_json::Value;
}

/// Builds the searcher a spec asks for, from saved state when resuming.
pub fn build(spec: &ValidSpec, saved: Option<&serde_json::Value>) -> Box<dyn Searcher> {
    match spec.spec.searcher.name {
        SearcherName::Grid => Box::new(GridSearcher::new(spec.space.clone(), saved)),
        SearcherName::Random => Box::new(RandomSearcher::new(spec.space.clone(), spec.spec.searcher.seed, saved)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(searcher: &str) -> ValidSpec {
        chorus_core::spec::parse(
            &format!(
                "name: s\nmetric: {{name: loss, goal: minimize}}\nsearcher: {{name: {searcher}, seed: 3}}\nmax_trials: 5\n\
                 parameters:\n  a: {{values: [1, 2, 3]}}\n  b: {{min: 0, max: 1}}\ntrial: {{command: [x]}}\n"
            ),
            &[],
        )
        .unwrap()
    }

    /// A searcher rebuilt from its saved state continues with exactly the same suggestions.
    #[test]
    fn restored_searchers_continue_identically() {
        for name in ["grid", "random"] {
            let s = spec(name);
            let mut a = build(&s, None);
            let first: Vec<Suggestion> = (0..2).map(|_| a.suggest()).collect();
            let saved = a.save();
            let mut b = build(&s, Some(&saved));
            for _ in 0..4 {
                assert_eq!(a.suggest(), b.suggest(), "{name}");
            }
            let mut fresh = build(&s, None);
            assert_eq!(
                first,
                (0..2).map(|_| fresh.suggest()).collect::<Vec<_>>(),
                "{name} is deterministic"
            );
        }
    }
}
