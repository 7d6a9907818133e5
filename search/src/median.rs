//! The median stopping rule (Golovin et al., "Google Vizier", KDD 2017) as a scheduler over any
//! searcher that does not stop trials itself: a trial is stopped at resource `x` when its best
//! loss so far is worse than the median, over the other trials that have reported up to `x`, of
//! their running mean loss up to `x`. Nothing is stopped before `grace_period`, nor while fewer
//! than `min_trials` others can be compared. The wrapped searcher still decides what to try;
//! its state and the scheduler's are saved side by side.
//!
//! The rule asks three things of a trial's reports at any `x`: the best loss up to `x`, the mean
//! loss up to `x`, and whether it got as far as `x`. So the scheduler keeps, per trial, one
//! summary per distinct resource value ([`Curve`]) instead of every report: its saved state
//! grows with the resource values trials reach, not with how often they report at them (a
//! restarted attempt reports again from its checkpoint).

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
#[serde(try_from = "SavedState")]
struct MedianState {
    /// Each trial's reports, summarised.
    trials: BTreeMap<TrialId, Curve>,
    stopped: BTreeSet<TrialId>,
}

/// A saved [`MedianState`] in either of its formats.
#[derive(Deserialize)]
struct SavedState {
    #[serde(default)]
    trials: Option<BTreeMap<TrialId, Curve>>,
    /// The format before [`Curve`]: each trial's (resource, loss) reports, in arrival order.
    #[serde(default)]
    history: Option<BTreeMap<TrialId, Vec<(f64, f64)>>>,
    stopped: BTreeSet<TrialId>,
}

impl TryFrom<SavedState> for MedianState {
    type Error = &'static str;

    fn try_from(saved: SavedState) -> Result<Self, Self::Error> {
        let trials = match (saved.trials, saved.history) {
            (Some(trials), None) => trials,
            // Replayed in arrival order, the reports make the very curves they would have made
            // live, so an old search continues with identical decisions.
            (None, Some(history)) => history
                .into_iter()
                .map(|(trial, reports)| {
                    let mut curve = Curve::default();
                    for (x, l) in reports {
                        curve.record(x, l);
                    }
                    (trial, curve)
                })
                .collect(),
            (None, None) => return Err("missing field `trials`"),
            (Some(_), Some(_)) => return Err("both `trials` and `history` are present"),
        };
        Ok(MedianState {
            trials,
            stopped: saved.stopped,
        })
    }
}

/// One trial's reports as the rule reads them: for each distinct resource value `x` the trial
/// reported at, in increasing order, the best loss, the sum of the losses and their count over
/// every report at or below `x`.
///
/// A report at `x` updates the entry at `x` and every entry above it, in the order reports
/// arrive, so each sum is added up in the same order as a sum over the full list of reports
/// would be: the means, and so the decisions and the reasons given, are the same to the last
/// bit.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Upto>", into = "Vec<Upto>")]
struct Curve(Vec<Upto>);

/// The reports of a trial at or below the resource value `x`, summarised. Saved as
/// `[x, best, sum, count]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "(f64, f64, f64, u64)", into = "(f64, f64, f64, u64)")]
struct Upto {
    x: f64,
    best: f64,
    sum: f64,
    count: u64,
}

impl From<(f64, f64, f64, u64)> for Upto {
    fn from((x, best, sum, count): (f64, f64, f64, u64)) -> Self {
        Upto { x, best, sum, count }
    }
}

impl From<Upto> for (f64, f64, f64, u64) {
    fn from(u: Upto) -> Self {
        (u.x, u.best, u.sum, u.count)
    }
}

impl TryFrom<Vec<Upto>> for Curve {
    type Error = &'static str;

    fn try_from(entries: Vec<Upto>) -> Result<Self, Self::Error> {
        // The lookups bisect on `x` and read counts as non-empty: refuse what they would misread.
        let increasing = entries.windows(2).all(|w| w[0].x < w[1].x && w[0].count < w[1].count);
        if !increasing || entries.first().is_some_and(|u| u.count == 0) {
            return Err("a trial's summaries must have increasing resources and counts");
        }
        Ok(Curve(entries))
    }
}

impl From<Curve> for Vec<Upto> {
    fn from(c: Curve) -> Self {
        c.0
    }
}

impl Curve {
    fn record(&mut self, x: f64, loss: f64) {
        if x.is_nan() {
            // At no resource: no `x` is at or below it, nor at or above it, so it never counts.
            return;
        }
        let i = self.0.partition_point(|u| u.x < x);
        if self.0.get(i).is_none_or(|u| u.x != x) {
            // A new resource value starts from the reports below it; they all arrived before
            // this one. The starting values are those of `Iterator::sum` and of a fold with
            // `f64::min`, so the first report makes the same bits as the full list did.
            let below = i.checked_sub(1).map(|j| self.0[j]);
            self.0.insert(
                i,
                Upto {
                    x,
                    best: below.map_or(f64::INFINITY, |b| b.best),
                    sum: below.map_or(-0.0, |b| b.sum),
                    count: below.map_or(0, |b| b.count),
                },
            );
        }
        for u in &mut self.0[i..] {
            u.best = u.best.min(loss);
            u.sum += loss;
            u.count += 1;
        }
    }

    /// The reports at or below `x`, summarised; `None` when there are none.
    fn upto(&self, x: f64) -> Option<&Upto> {
        self.0[..self.0.partition_point(|u| u.x <= x)].last()
    }

    /// Whether the trial has reported at `x` or beyond.
    fn reached(&self, x: f64) -> bool {
        self.0.last().is_some_and(|u| u.x >= x)
    }
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
        let best = self
            .state
            .trials
            .get(&trial)
            .and_then(|c| c.upto(at))
            .map_or(f64::INFINITY, |u| u.best);
        let mut means: Vec<f64> = self
            .state
            .trials
            .iter()
            .filter(|(t, _)| **t != trial)
            .filter_map(|(_, curve)| {
                let upto = curve.upto(at)?;
                // A trial counts once it has run at least as far as this one.
                curve.reached(at).then(|| upto.sum / upto.count as f64)
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

    fn warm_start(&mut self, prior: &[crate::Prior]) -> bool {
        self.inner.warm_start(prior)
    }

    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction> {
        let mut actions = self.inner.observe(event);
        if let (SearchEvent::Reported { trial, value, .. }, Some(at)) = (event, event.resource(self.resource)) {
            self.state
                .trials
                .entry(*trial)
                .or_default()
                .record(at, loss(self.goal, *value));
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
    use proptest::prelude::*;

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

    /// The reason `trial` was stopped for by this report, if it was.
    fn stop(s: &mut MedianStopping, t: u64, step: i64, value: f64) -> Option<String> {
        s.observe(&SearchEvent::Reported {
            trial: TrialId(t),
            step: Some(step),
            epoch: None,
            value,
        })
        .into_iter()
        .find_map(|a| match a {
            SearchAction::Stop { trial, reason } if trial == TrialId(t) => Some(reason),
            _ => None,
        })
    }

    fn report(s: &mut MedianStopping, t: u64, step: i64, value: f64) -> bool {
        stop(s, t, step, value).is_some()
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

    /// Reports (trial, step, value) that arrive out of order, repeat a step (a restarted attempt
    /// reports again from its checkpoint) and keep coming after a stop.
    const BEFORE: &[(u64, i64, f64)] = &[
        (1, 1, 1.0),
        (1, 2, 0.8),
        (1, 3, 0.7),
        (1, 4, 0.65),
        (2, 1, 0.9),
        (2, 2, 0.7),
        (2, 3, 0.6),
        (2, 2, 0.75),
        (2, 3, 0.62),
        (3, 1, 1.2),
        (3, 2, 1.0),
        (4, 3, 0.5),
        (4, 1, 0.9),
        (4, 2, 0.55),
        (3, 3, 0.3),
    ];
    const AFTER: &[(u64, i64, f64)] = &[
        (5, 1, 0.95),
        (5, 2, 0.85),
        (5, 3, 0.66),
        (5, 4, 0.64),
        (2, 4, 0.61),
        (6, 2, 0.7),
        (6, 2, 0.9),
        (6, 2, 0.8),
        (6, 3, 0.72),
        (4, 5, 0.5),
        (7, 1, 0.1),
        (7, 2, 0.2),
        (7, 3, 0.3),
        (7, 4, 0.7),
        (7, 4, 0.1),
        (8, 3, 0.9),
        (8, 2, 0.95),
        (8, 4, 0.99),
    ];

    /// Each report of `script` with the reason it stopped its trial, as the fixture records them.
    fn run(s: &mut MedianStopping, script: &[(u64, i64, f64)]) -> serde_json::Value {
        script
            .iter()
            .map(|&(t, step, value)| {
                serde_json::json!({"trial": t, "step": step, "value": value, "stop": stop(s, t, step, value)})
            })
            .collect()
    }

    /// A search saved when the scheduler kept every report (the fixture was recorded by that
    /// code: its decisions, its saved state, and its decisions after a restore) continues with
    /// the same decisions, and its state reads back as the summaries a live run builds.
    #[test]
    fn a_state_saved_with_every_report_continues_identically() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("testdata/median_history_format.json")).unwrap();
        assert!(fixture["saved"]["scheduler"].get("history").is_some(), "the old format");
        let mut fresh = scheduler(Goal::Minimize);
        assert_eq!(run(&mut fresh, BEFORE), fixture["before"]);
        let mut old = restored(Goal::Minimize, &fixture["saved"]);
        assert_eq!(old.state, fresh.state, "replayed reports make the live summaries");
        assert_eq!(run(&mut old, AFTER), fixture["after"]);
        assert_eq!(run(&mut fresh, AFTER), fixture["after"]);
    }

    /// However often a trial reports at the same resource, its saved state keeps one entry.
    #[test]
    fn saved_state_does_not_grow_with_repeated_reports() {
        let mut s = scheduler(Goal::Minimize);
        for t in 1..=3 {
            for step in 1..=4 {
                report(&mut s, t, step, 0.5 + t as f64 / 10.0);
            }
        }
        let size = |s: &MedianStopping| serde_json::to_string(&s.save()["scheduler"]).unwrap().len();
        let before = size(&s);
        for i in 0..10_000 {
            // A trial restarted again and again from its checkpoint at step 3.
            report(&mut s, 1, 3 + i % 2, 0.5 + (i % 7) as f64 / 100.0);
        }
        assert_eq!(s.state.trials[&TrialId(1)].0.len(), 4, "one entry per step");
        // The sums and counts gain digits, nothing more.
        let after = size(&s);
        assert!(after < before + 100, "{before} bytes grew to {after}");
    }

    /// A saved state the lookups would misread is refused, never used.
    #[test]
    fn unreadable_summaries_are_refused() {
        for (bad, why) in [
            (
                serde_json::json!({"trials": {"1": [[2.0, 0.5, 0.5, 1], [1.0, 0.5, 1.0, 2]]}, "stopped": []}),
                "increasing resources",
            ),
            (
                serde_json::json!({"trials": {"1": [[1.0, 0.5, 0.5, 0]]}, "stopped": []}),
                "increasing resources and counts",
            ),
            (serde_json::json!({"stopped": []}), "missing field `trials`"),
            (
                serde_json::json!({"trials": {}, "history": {}, "stopped": []}),
                "both `trials` and `history`",
            ),
        ] {
            let e = read_state::<MedianState>("median stopping", Some(&bad)).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("the saved state of the median stopping searcher cannot be read: ")
                    && e.to_string().contains(why),
                "{e}"
            );
        }
    }

    /// The rule as it was first written, over every report in arrival order: what the summaries
    /// must agree with.
    #[derive(Debug, Default, Clone)]
    struct Reference {
        history: BTreeMap<TrialId, Vec<(f64, f64)>>,
        stopped: BTreeSet<TrialId>,
    }

    impl Reference {
        fn observe(&mut self, s: &MedianStopping, trial: TrialId, at: f64, value: f64) -> Option<String> {
            self.history.entry(trial).or_default().push((at, loss(s.goal, value)));
            if at < s.grace_period as f64 || self.stopped.contains(&trial) {
                return None;
            }
            let best = self.history[&trial]
                .iter()
                .filter(|(x, _)| *x <= at)
                .map(|(_, l)| *l)
                .fold(f64::INFINITY, f64::min);
            let mut means: Vec<f64> = self
                .history
                .iter()
                .filter(|(t, _)| **t != trial)
                .filter_map(|(_, reports)| {
                    let upto: Vec<f64> = reports.iter().filter(|(x, _)| *x <= at).map(|(_, l)| *l).collect();
                    let reached = reports.iter().any(|(x, _)| *x >= at);
                    (reached && !upto.is_empty()).then(|| upto.iter().sum::<f64>() / upto.len() as f64)
                })
                .collect();
            if means.len() < s.min_trials as usize {
                return None;
            }
            means.sort_by(f64::total_cmp);
            let mid = means.len() / 2;
            let median = if means.len() % 2 == 1 {
                means[mid]
            } else {
                (means[mid - 1] + means[mid]) / 2.0
            };
            (best > median).then(|| {
                self.stopped.insert(trial);
                format!(
                    "median stopping: best {} so far is worse than the median {} of {} other trials' running means at {at}",
                    s.shown(best),
                    s.shown(median),
                    means.len()
                )
            })
        }

        fn saved(&self) -> serde_json::Value {
            serde_json::json!({"history": self.history, "stopped": self.stopped})
        }
    }

    proptest! {
        /// The summaries decide exactly as the full list of reports did, with the same reasons
        /// (so the same means to the last bit), whatever the order of reports, however often a
        /// step is reported again, and after a restore from either saved format.
        #[test]
        fn summaries_decide_as_every_report_did(
            maximize in any::<bool>(),
            reports in prop::collection::vec(
                (0u64..6, 0i64..8, prop::sample::select(vec![0.0, 0.1, 0.2, 0.3, 0.7, 1.0, 1e-17, 3.0])),
                0..120,
            ),
            cut in 0usize..120,
        ) {
            let goal = if maximize { Goal::Maximize } else { Goal::Minimize };
            let mut s = scheduler(goal);
            let mut reference = Reference::default();
            let cut = cut.min(reports.len());
            for &(t, step, v) in &reports[..cut] {
                let want = reference.observe(&s, TrialId(t), step as f64, v);
                prop_assert_eq!(stop(&mut s, t, step, v), want);
            }
            let saved = s.save();
            let mut from_old = restored(goal, &serde_json::json!({"searcher": saved["searcher"], "scheduler": reference.saved()}));
            let mut from_new = restored(goal, &saved);
            for &(t, step, v) in &reports[cut..] {
                let want = reference.observe(&s, TrialId(t), step as f64, v);
                prop_assert_eq!(&stop(&mut s, t, step, v), &want);
                prop_assert_eq!(&stop(&mut from_old, t, step, v), &want);
                prop_assert_eq!(&stop(&mut from_new, t, step, v), &want);
            }
        }
    }
}
