//! The median stopping rule (Golovin et al., "Google Vizier", KDD 2017) as a scheduler over any
//! searcher that does not stop trials itself: a trial is stopped at resource `x` when its best
//! loss so far is worse than the median, over the other trials that have reported up to `x`, of
//! their running mean loss up to `x`. Nothing is stopped before `grace_period`, nor while fewer
//! than `min_trials` others can be compared. The wrapped searcher still decides what to try;
//! its state and the scheduler's are saved side by side.

use super::{SearchAction, SearchEvent, Searcher, Suggestion, loss, read_state};
use crate::Result;
use chorus_core::TrialId;
use chorus_core::spec::{Goal, ResourceName, SchedulerSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug)]
pub struct MedianStopping {
    inner: Box<dyn Searcher>,
    goal: Goal,
    grace_period: u64,
    min_trials: u32,
    resource: ResourceName,
    state: MedianState,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct MedianState {
    /// Each trial's (resource, loss) reports, in arrival order.
    history: BTreeMap<TrialId, Vec<(f64, f64)>>,
    stopped: BTreeSet<TrialId>,
}

impl MedianStopping {
    pub fn new(
        inner: Box<dyn Searcher>,
        goal: Goal,
        spec: &SchedulerSpec,
        saved: Option<&serde_json::Value>,
    ) -> Result<Self> {
        Ok(MedianStopping {
            inner,
            goal,
            grace_period: spec.grace_period,
            min_trials: spec.min_trials,
            resource: spec.resource,
            state: read_state("median stopping", saved)?,
        })
    }

    fn decide(&mut self, trial: TrialId, at: f64) -> Option<SearchAction> {
        if at < self.grace_period as f64 || self.state.stopped.contains(&trial) {
            return None;
        }
        let best = self.state.history[&trial]
            .iter()
            .filter(|(x, _)| *x <= at)
            .map(|(_, l)| *l)
            .fold(f64::INFINITY, f64::min);
        let mut means: Vec<f64> = self
            .state
            .history
            .iter()
            .filter(|(t, _)| **t != trial)
            .filter_map(|(_, reports)| {
                let upto: Vec<f64> = reports.iter().filter(|(x, _)| *x <= at).map(|(_, l)| *l).collect();
                // A trial counts once it has run at least as far as this one.
                let reached = reports.iter().any(|(x, _)| *x >= at);
                (reached && !upto.is_empty()).then(|| upto.iter().sum::<f64>() / upto.len() as f64)
            })
            .collect();
        if means.len() < self.min_trials as usize {
            return None;
        }
        means.sort_by(f64::total_cmp);
        let mid = means.len() / 2;
        let median = if means.len() % 2 == 1 {
            means[mid]
        } else {
            (means[mid - 1] + means[mid]) / 2.0
        };
        if best > median {
            self.state.stopped.insert(trial);
            return Some(SearchAction::Stop {
                trial,
                reason: format!(
                    "median stopping: best {} so far is worse than the median {} of {} other trials' running means at {at}",
                    self.shown(best),
                    self.shown(median),
                    means.len()
                ),
            });
        }
        None
    }

    /// A loss shown as the metric the user knows.
    fn shown(&self, l: f64) -> f64 {
        loss(self.goal, l)
    }
}

impl Searcher for MedianStopping {
    fn suggest(&mut self, trial: TrialId) -> Suggestion {
        self.inner.suggest(trial)
    }

    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction> {
        let mut actions = self.inner.observe(event);
        if let (SearchEvent::Reported { trial, value, .. }, Some(at)) = (event, event.resource(self.resource)) {
            self.state
                .history
                .entry(*trial)
                .or_default()
                .push((at, loss(self.goal, *value)));
            actions.extend(self.decide(*trial, at));
        }
        actions
    }

    fn promote(&mut self) -> Option<(TrialId, String)> {
        self.inner.promote()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::json!({
            "searcher": self.inner.save(),
            "scheduler": serde_json::to_value(&self.state).expect("median state serialises"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RandomSearcher;
    use chorus_core::space::{Param, Space};
    use chorus_core::spec::SchedulerName;

    fn scheduler(goal: Goal) -> MedianStopping {
        restored(goal, &serde_json::Value::Null)
    }

    /// The scheduler (over random search) rebuilt from `saved`, as `build` would.
    fn restored(goal: Goal, saved: &serde_json::Value) -> MedianStopping {
        let mut space = Space::new();
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        let spec = SchedulerSpec {
            name: SchedulerName::Median,
            grace_period: 2,
            min_trials: 2,
            resource: ResourceName::Step,
        };
        MedianStopping::new(
            Box::new(RandomSearcher::new(space, 1, saved.get("searcher")).unwrap()),
            goal,
            &spec,
            saved.get("scheduler"),
        )
        .unwrap()
    }

    fn report(s: &mut MedianStopping, t: u64, step: i64, value: f64) -> bool {
        s.observe(&SearchEvent::Reported {
            trial: TrialId(t),
            step: Some(step),
            epoch: None,
            value,
        })
        .iter()
        .any(|a| matches!(a, SearchAction::Stop { trial, .. } if *trial == TrialId(t)))
    }

    #[test]
    fn stops_a_trial_worse_than_the_median_of_running_means() {
        // Trial 3 at step 2: best 1.0; running means of 1 and 2 up to step 2: 0.9 and 0.8.
        let mut fresh = scheduler(Goal::Minimize);
        for (t, losses) in [(1, [1.0, 0.8]), (2, [0.9, 0.7])] {
            for (i, l) in losses.iter().enumerate() {
                report(&mut fresh, t, i as i64 + 1, *l);
            }
        }
        assert!(!report(&mut fresh, 3, 1, 1.2), "inside the grace period");
        assert!(report(&mut fresh, 3, 2, 1.0), "worse than the median 0.85");
        assert!(
            !report(&mut fresh, 4, 2, 0.8),
            "better than the median (0.85 of 1 and 2)"
        );
    }

    #[test]
    fn too_few_peers_stop_nothing_and_state_restores() {
        let mut s = scheduler(Goal::Maximize);
        assert!(!report(&mut s, 1, 5, 0.9));
        assert!(!report(&mut s, 2, 5, 0.1), "one peer is fewer than min_trials");
        assert!(!report(&mut s, 3, 5, 0.8));
        assert!(
            report(&mut s, 4, 5, 0.2),
            "maximising: 0.2 is below the median 0.8 of 0.9, 0.1 and 0.8"
        );
        let r = restored(Goal::Maximize, &s.save());
        assert_eq!(r.state, s.state);
    }
}
