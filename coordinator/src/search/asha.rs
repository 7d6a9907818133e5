//! Asynchronous successive halving (ASHA, Li et al., "A System for Massively Parallel
//! Hyperparameter Tuning", MLSys 2020) and Hyperband built from several ASHA brackets.
//!
//! A bracket has rungs at resources `r, r*eta, r*eta^2, ...` below `max_resource` (`r` the
//! bracket's grace period, `eta` the reduction factor; the resource is the step or epoch a trial
//! reports). When a trial first reports at or beyond a rung, its best loss so far is recorded
//! there, and it goes on only if it is among the best `ceil(n / eta)` of the `n` trials recorded
//! at that rung so far; otherwise it is stopped. Deciding as each trial arrives, rather than
//! holding trials at a rung until a worker frees up, keeps every slot busy and needs no pause:
//! the asynchronous promotion rule of the paper applied at arrival, as Ray Tune and Determined
//! run it. A trial that reaches `max_resource` simply completes.
//!
//! Hyperband runs brackets with grace periods `r * eta^s` for `s = 0..=s_max`, where
//! `s_max = floor(log_eta(max_resource / r))`; new trials are dealt to the brackets in turn, so the
//! search hedges between aggressive early stopping and none. New configurations are random draws,
//! each from its own stream of the seed, so the state is plain data and restores exactly.

use super::{SearchAction, SearchEvent, Searcher, Suggestion, loss};
use chorus_core::TrialId;
use chorus_core::space::{Params, Space};
use chorus_core::spec::{Goal, ResourceName, SearcherName, SearcherSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AshaSettings {
    pub reduction_factor: u32,
    pub grace_period: u64,
    pub max_resource: u64,
    pub resource: ResourceName,
    /// 1 for ASHA; Hyperband's bracket count otherwise.
    pub brackets: u32,
}

impl AshaSettings {
    pub fn from_spec(s: &SearcherSpec) -> Self {
        let eta = s.reduction_factor.unwrap_or(3).max(2);
        let grace = s.grace_period.unwrap_or(1).max(1);
        let max = s.max_resource.unwrap_or(grace).max(grace);
        let brackets = match s.name {
            SearcherName::Hyperband => rungs_between(grace, max, eta) as u32,
            _ => 1,
        };
        AshaSettings {
            reduction_factor: eta,
            grace_period: grace,
            max_resource: max,
            resource: s.resource.unwrap_or_default(),
            brackets: brackets.max(1),
        }
    }

    /// The resources at which bracket `b` decides, lowest first.
    pub fn rungs(&self, bracket: u32) -> Vec<u64> {
        let eta = u64::from(self.reduction_factor);
        let mut r = self.grace_period.saturating_mul(eta.saturating_pow(bracket));
        let mut out = Vec::new();
        while r < self.max_resource {
            out.push(r);
            r = r.saturating_mul(eta);
        }
        out
    }
}

/// How many resources `grace, grace*eta, ...` lie at or below `max` (at least 1).
fn rungs_between(grace: u64, max: u64, eta: u32) -> usize {
    let mut n = 1;
    let mut r = grace;
    while r.saturating_mul(u64::from(eta)) <= max {
        r *= u64::from(eta);
        n += 1;
    }
    n
}

#[derive(Debug)]
pub struct AshaSearcher {
    space: Space,
    seed: u64,
    goal: Goal,
    settings: AshaSettings,
    state: AshaState,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct AshaState {
    drawn: u64,
    /// Each live or finished trial's bracket, best loss so far and rungs already decided.
    trials: BTreeMap<TrialId, TrialProgress>,
    /// Per bracket, per rung: the losses recorded there, by trial.
    rungs: Vec<Vec<BTreeMap<TrialId, f64>>>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct TrialProgress {
    bracket: u32,
    best: Option<f64>,
    /// Rungs passed (recorded and decided), counted from the bracket's first.
    decided: usize,
    stopped: bool,
}

impl AshaSearcher {
    pub fn new(space: Space, seed: u64, goal: Goal, settings: AshaSettings, saved: Option<&serde_json::Value>) -> Self {
        let mut state: AshaState = saved
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        state.rungs.resize_with(settings.brackets as usize, Default::default);
        for (b, rungs) in state.rungs.iter_mut().enumerate() {
            rungs.resize_with(settings.rungs(b as u32).len(), Default::default);
        }
        AshaSearcher {
            space,
            seed,
            goal,
            settings,
            state,
        }
    }

    fn draw(&self, index: u64) -> Params {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        self.space.sample(&mut rng)
    }

    /// Records a trial at every rung its resource has reached and decides each in turn.
    fn arrive(&mut self, trial: TrialId, resource: f64, value: f64) -> Vec<SearchAction> {
        let eta = self.settings.reduction_factor as usize;
        let l = loss(self.goal, value);
        let Some(p) = self.state.trials.get_mut(&trial) else {
            return Vec::new();
        };
        if p.stopped {
            return Vec::new();
        }
        p.best = Some(p.best.map_or(l, |b| b.min(l)));
        let best = p.best.expect("just set");
        let rungs = self.settings.rungs(p.bracket);
        let bracket = p.bracket as usize;
        while p.decided < rungs.len() && resource >= rungs[p.decided] as f64 {
            let k = p.decided;
            let recorded = &mut self.state.rungs[bracket][k];
            recorded.insert(trial, best);
            p.decided += 1;
            let better = recorded
                .iter()
                .filter(|(t, v)| **v < best || (**v == best && **t < trial))
                .count();
            let keep = recorded.len().div_ceil(eta);
            if better >= keep {
                p.stopped = true;
                return vec![SearchAction::Stop {
                    trial,
                    reason: format!(
                        "successive halving: at rung {} ({} {}) rank {} of {}, only the best {keep} go on",
                        k,
                        resource_name(self.settings.resource),
                        rungs[k],
                        better + 1,
                        recorded.len()
                    ),
                }];
            }
        }
        Vec::new()
    }
}

fn resource_name(r: ResourceName) -> &'static str {
    match r {
        ResourceName::Step => "step",
        ResourceName::Epoch => "epoch",
    }
}

impl Searcher for AshaSearcher {
    fn suggest(&mut self, trial: TrialId) -> Suggestion {
        let params = self.draw(self.state.drawn);
        let bracket = (self.state.drawn % u64::from(self.settings.brackets)) as u32;
        self.state.drawn += 1;
        self.state.trials.insert(
            trial,
            TrialProgress {
                bracket,
                ..Default::default()
            },
        );
        Suggestion::Create(params)
    }

    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction> {
        match event {
            SearchEvent::Reported { trial, value, .. } => match event.resource(self.settings.resource) {
                Some(resource) => self.arrive(*trial, resource, *value),
                None => Vec::new(),
            },
            SearchEvent::Completed { .. } | SearchEvent::Failed { .. } => Vec::new(),
        }
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("asha state serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::space::Param;

    fn settings(brackets: u32) -> AshaSettings {
        AshaSettings {
            reduction_factor: 3,
            grace_period: 1,
            max_resource: 27,
            resource: ResourceName::Step,
            brackets,
        }
    }

    fn searcher(brackets: u32) -> AshaSearcher {
        let mut space = Space::new();
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        AshaSearcher::new(space, 1, Goal::Minimize, settings(brackets), None)
    }

    fn report(s: &mut AshaSearcher, t: u64, step: i64, value: f64) -> bool {
        let actions = s.observe(&SearchEvent::Reported {
            trial: TrialId(t),
            step: Some(step),
            epoch: None,
            value,
        });
        actions
            .iter()
            .any(|a| matches!(a, SearchAction::Stop { trial, .. } if *trial == TrialId(t)))
    }

    #[test]
    fn rungs_follow_the_reduction_factor() {
        assert_eq!(settings(1).rungs(0), vec![1, 3, 9]);
        assert_eq!(settings(1).rungs(2), vec![9]);
        let spec = SearcherSpec {
            name: SearcherName::Hyperband,
            seed: 0,
            n_startup_trials: None,
            n_ei_candidates: None,
            gamma: None,
            reduction_factor: Some(3),
            grace_period: None,
            max_resource: Some(27),
            resource: None,
            population_size: None,
            perturbation_interval: None,
            quantile_fraction: None,
            resample_probability: None,
        };
        assert_eq!(AshaSettings::from_spec(&spec).brackets, 4);
    }

    /// A scripted arrival sequence at rung 0 (eta = 3): each arrival goes on only while it is in
    /// the top ceil(n/3) of the n trials recorded at the rung so far.
    #[test]
    fn stops_exactly_by_the_rule_at_each_arrival() {
        let mut s = searcher(1);
        for t in 1..=7 {
            assert!(matches!(s.suggest(TrialId(t)), Suggestion::Create(_)));
        }
        // (trial, loss at step 1, stopped?)
        let script = [
            (1, 0.50, false), // 1 recorded, keep 1: it is the best
            (2, 0.60, true),  // 2 recorded, keep 1: rank 2
            (3, 0.40, false), // 3 recorded, keep 1: rank 1
            (4, 0.45, false), // 4 recorded, keep 2: rank 2
            (5, 0.70, true),  // 5 recorded, keep 2: rank 5
            (6, 0.55, true),  // 6 recorded, keep 2: rank 4
            (7, 0.41, false), // 7 recorded, keep 3: rank 2
        ];
        for (t, v, stopped) in script {
            assert_eq!(report(&mut s, t, 1, v), stopped, "trial {t}");
        }
        // Rung 1 (step 3): trial 1 arrives first and goes on; trial 7 is then second of 2.
        assert!(!report(&mut s, 1, 3, 0.30));
        assert!(report(&mut s, 7, 3, 0.35));
        // Reports between rungs decide nothing; a stopped trial is not decided again.
        assert!(!report(&mut s, 3, 2, 0.9));
        assert!(!report(&mut s, 2, 5, 0.1));
    }

    #[test]
    fn a_report_beyond_several_rungs_is_decided_at_each() {
        let mut s = searcher(1);
        s.suggest(TrialId(1));
        s.suggest(TrialId(2));
        assert!(!report(&mut s, 1, 10, 0.2));
        assert_eq!(s.state.trials[&TrialId(1)].decided, 3);
        assert!(report(&mut s, 2, 10, 0.3), "second of two at rung 0");
    }

    #[test]
    fn maximising_keeps_the_highest() {
        let mut space = Space::new();
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        let mut s = AshaSearcher::new(space, 1, Goal::Maximize, settings(1), None);
        s.suggest(TrialId(1));
        s.suggest(TrialId(2));
        assert!(!report(&mut s, 1, 1, 0.9));
        assert!(report(&mut s, 2, 1, 0.5));
    }

    #[test]
    fn hyperband_deals_trials_to_brackets_and_restores() {
        let mut s = searcher(4);
        for t in 1..=8 {
            s.suggest(TrialId(t));
        }
        let brackets: Vec<u32> = (1..=8).map(|t| s.state.trials[&TrialId(t)].bracket).collect();
        assert_eq!(brackets, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        // Bracket 3 has no rung below 27: its trials are never stopped.
        assert!(!report(&mut s, 4, 26, 99.0));
        report(&mut s, 1, 1, 0.5);
        let saved = s.save();
        let mut space = Space::new();
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        let mut r = AshaSearcher::new(space, 1, Goal::Minimize, settings(4), Some(&saved));
        assert_eq!(r.state, s.state);
        assert_eq!(r.suggest(TrialId(9)), s.suggest(TrialId(9)));
        assert_eq!(report(&mut r, 5, 1, 0.6), report(&mut s, 5, 1, 0.6));
    }
}
