//! (placeholder being replaced: the TPE searcher)
use super::{SearchAction, SearchEvent, Searcher, Suggestion};
use chorus_core::TrialId;
use chorus_core::space::Space;
use chorus_core::spec::Goal;

/// Settings of the TPE searcher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpeSettings {
    pub n_startup_trials: u32,
    pub n_ei_candidates: u32,
    pub gamma: f64,
}

#[derive(Debug)]
pub struct TpeSearcher {
    inner: super::RandomSearcher,
}

impl TpeSearcher {
    pub fn new(
        space: Space,
        seed: u64,
        _goal: Goal,
        _settings: TpeSettings,
        saved: Option<&serde_json::Value>,
    ) -> Self {
        TpeSearcher {
            inner: super::RandomSearcher::new(space, seed, saved),
        }
    }
}

impl Searcher for TpeSearcher {
    fn suggest(&mut self, trial: TrialId) -> Suggestion {
        self.inner.suggest(trial)
    }

    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction> {
        self.inner.observe(event)
    }

    fn save(&self) -> serde_json::Value {
        self.inner.save()
    }
}
