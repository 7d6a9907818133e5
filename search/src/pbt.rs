//! Population-based training (Jaderberg et al., 2017): a population of trials trains at once;
//! every `perturbation_interval` (steps or epochs) a trial in the bottom `quantile_fraction` of
//! the population by latest value *exploits* a trial of the top fraction (continues from its
//! latest checkpoint) and *explores* (takes its parameters, each drawn afresh with
//! `resample_probability`, else perturbed by a factor of 0.8 or 1.2, or a neighbouring choice).
//!
//! The searcher only decides; the coordinator carries an exploit out by ending the receiver's
//! attempt and placing it again with the new parameters and the donor's checkpoint, which the
//! worker copies through object storage. Decisions use only reported values and a counter-keyed
//! random stream, so the state is plain data and a restarted coordinator continues identically.

use super::{SearchAction, SearchEvent, Searcher, Suggestion, loss, read_state};
use crate::Result;
use chorus_core::TrialId;
use chorus_core::space::{Param, Params, Space};
use chorus_core::spec::{Goal, ResourceName};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PbtSettings {
    /// Trials in the population (all created at the start).
    pub population: u64,
    pub interval: u64,
    pub quantile: f64,
    pub resample: f64,
    pub resource: ResourceName,
}

#[derive(Debug)]
pub struct PbtSearcher {
    space: Space,
    seed: u64,
    goal: Goal,
    settings: PbtSettings,
    state: PbtState,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct PbtState {
    drawn: u64,
    /// Random streams used by exploit/explore decisions so far.
    decisions: u64,
    members: BTreeMap<TrialId, Member>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Member {
    params: Params,
    /// Latest loss and the resource it was reported at.
    latest: Option<(f64, f64)>,
    /// Resource of the last exploit/explore decision about this trial.
    last_decision: f64,
    done: bool,
}

impl PbtSearcher {
    pub fn new(
        space: Space,
        seed: u64,
        goal: Goal,
        settings: PbtSettings,
        saved: Option<&serde_json::Value>,
    ) -> Result<Self> {
        Ok(PbtSearcher {
            space,
            seed,
            goal,
            settings,
            state: read_state("pbt", saved)?,
        })
    }

    fn rng(&self, stream: u64, salt: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ salt);
        rng.set_stream(stream);
        rng
    }

    /// The donor's parameters, explored: each resampled or perturbed. Parents go first, so a
    /// parameter that a changed choice switches on is drawn afresh and one it switches off is
    /// left out.
    fn explore(&self, donor: &Params, rng: &mut ChaCha8Rng) -> Params {
        let mut out = Params::new();
        for name in self.space.order() {
            if !self.space.is_active(name, &out) {
                continue;
            }
            let p = &self.space[name];
            let v = match donor.get(name) {
                None => p.sample(rng),
                Some(_) if rng.random::<f64>() < self.settings.resample => p.sample(rng),
                Some(current) => perturb(p, current, rng),
            };
            out.insert(name.to_string(), v);
        }
        out
    }

    fn decide(&mut self, trial: TrialId, at: f64) -> Vec<SearchAction> {
        let interval = self.settings.interval as f64;
        let Some(me) = self.state.members.get(&trial) else {
            return Vec::new();
        };
        if me.done || at - me.last_decision < interval {
            return Vec::new();
        }
        // Rank the live members, best first (ties by id, for determinism); only once every one
        // has a value since its start or its last exploit, so nobody is judged on a stale one.
        let live = self.state.members.values().filter(|m| !m.done).count();
        let mut ranked: Vec<(TrialId, f64)> = self
            .state
            .members
            .iter()
            .filter(|(_, m)| !m.done)
            .filter_map(|(t, m)| m.latest.map(|(l, _)| (*t, l)))
            .collect();
        if ranked.len() < 2 || ranked.len() < live {
            return Vec::new();
        }
        self.state.members.get_mut(&trial).expect("checked").last_decision = at;
        ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        let cut = ((ranked.len() as f64 * self.settings.quantile).ceil() as usize).clamp(1, ranked.len() / 2);
        let position = ranked
            .iter()
            .position(|(t, _)| *t == trial)
            .expect("the trial has reported");
        if position < ranked.len() - cut {
            return Vec::new();
        }
        let stream = self.state.decisions;
        self.state.decisions += 1;
        let mut rng = self.rng(stream, 0x7062_7400);
        let donor = ranked[rng.random_range(0..cut)].0;
        let params = self.explore(&self.state.members[&donor].params, &mut rng);
        let me = self.state.members.get_mut(&trial).expect("checked");
        me.params = params.clone();
        // Its next value comes from the donor's weights; the old one no longer describes it.
        me.latest = None;
        vec![SearchAction::Exploit {
            trial,
            donor,
            params,
            reason: format!(
                "pbt: rank {} of {} at {at}; continues from trial {donor}'s checkpoint with explored parameters",
                position + 1,
                ranked.len()
            ),
        }]
    }
}

/// One explore step of a value within its domain.
fn perturb(p: &Param, v: &Value, rng: &mut ChaCha8Rng) -> Value {
    let factor = if rng.random::<bool>() { 1.2 } else { 0.8 };
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match (p, v.as_f64()) {
        (Param::Uniform { min, max }, Some(x)) | (Param::LogUniform { min, max }, Some(x)) => {
            float((x * factor).clamp(*min, *max))
        }
        (Param::QUniform { min, max, q }, Some(x)) => {
            let y = ((x * factor / q).round() * q).clamp(*min, *max);
            float(y)
        }
        (Param::IntUniform { min, max }, Some(x)) => {
            let mut y = (x * factor).round() as i64;
            if y == x as i64 {
                y += if factor > 1.0 { 1 } else { -1 };
            }
            Value::from(y.clamp(*min, *max))
        }
        // A step of ln(factor) in log space, rounded back to an integer. Near 1 that rounds back
        // to the same value (round(2 * 1.2) = 2), so it moves at least one integer, as
        // int_uniform does, or a small batch size could never change.
        (Param::LogIntUniform { min, max }, Some(x)) => {
            let x = x.round().clamp(*min as f64, *max as f64);
            let mut y = chorus_core::space::log_int_draw(x.ln() + factor.ln(), i64::MIN, i64::MAX);
            if y == x as i64 {
                y = y.saturating_add(if factor > 1.0 { 1 } else { -1 });
            }
            Value::from(y.clamp(*min, *max))
        }
        (Param::Categorical { values }, _) => {
            let i = values.iter().position(|c| c == v).unwrap_or(0);
            let j = if factor > 1.0 {
                (i + 1).min(values.len() - 1)
            } else {
                i.saturating_sub(1)
            };
            values[j].clone()
        }
        _ => v.clone(),
    }
}

impl Searcher for PbtSearcher {
    fn suggest(&mut self, trial: TrialId) -> Suggestion {
        if self.state.drawn >= self.settings.population {
            return Suggestion::Exhausted;
        }
        let mut rng = self.rng(self.state.drawn, 0);
        let params = self.space.sample(&mut rng);
        self.state.drawn += 1;
        self.state.members.insert(
            trial,
            Member {
                params: params.clone(),
                ..Default::default()
            },
        );
        Suggestion::Create(params)
    }

    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction> {
        match event {
            SearchEvent::Reported { trial, value, .. } => {
                let Some(at) = event.resource(self.settings.resource) else {
                    return Vec::new();
                };
                let l = loss(self.goal, *value);
                match self.state.members.get_mut(trial) {
                    Some(m) => m.latest = Some((l, at)),
                    None => return Vec::new(),
                }
                self.decide(*trial, at)
            }
            SearchEvent::Completed { trial, .. } | SearchEvent::Failed { trial } => {
                if let Some(m) = self.state.members.get_mut(trial) {
                    m.done = true;
                }
                Vec::new()
            }
        }
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("pbt state serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn searcher() -> PbtSearcher {
        let mut space = Space::new();
        space.insert("lr".into(), Param::LogUniform { min: 1e-4, max: 1.0 });
        space.insert("layers".into(), Param::IntUniform { min: 1, max: 8 });
        space.insert(
            "opt".into(),
            Param::Categorical {
                values: vec!["sgd".into(), "adam".into(), "adamw".into()],
            },
        );
        PbtSearcher::new(
            space,
            5,
            Goal::Minimize,
            PbtSettings {
                population: 4,
                interval: 10,
                quantile: 0.25,
                resample: 0.25,
                resource: ResourceName::Step,
            },
            None,
        )
        .unwrap()
    }

    fn report(s: &mut PbtSearcher, t: u64, step: i64, value: f64) -> Vec<SearchAction> {
        s.observe(&SearchEvent::Reported {
            trial: TrialId(t),
            step: Some(step),
            epoch: None,
            value,
        })
    }

    #[test]
    fn creates_the_population_then_no_more() {
        let mut s = searcher();
        for t in 1..=4 {
            assert!(matches!(s.suggest(TrialId(t)), Suggestion::Create(_)));
        }
        assert_eq!(s.suggest(TrialId(5)), Suggestion::Exhausted);
    }

    #[test]
    fn the_worst_exploits_the_best_at_each_interval() {
        let mut s = searcher();
        for t in 1..=4 {
            s.suggest(TrialId(t));
        }
        for (t, v) in [(1, 0.1), (2, 0.5), (3, 0.3)] {
            assert!(
                report(&mut s, t, 10, v).is_empty(),
                "trial {t}: not the worst when it reports"
            );
        }
        let actions = report(&mut s, 4, 10, 0.9);
        let [
            SearchAction::Exploit {
                trial, donor, params, ..
            },
        ] = actions.as_slice()
        else {
            panic!("the worst of four exploits: {actions:?}")
        };
        assert_eq!(
            (*trial, *donor),
            (TrialId(4), TrialId(1)),
            "the top quarter of four is trial 1"
        );
        assert_eq!(s.state.members[&TrialId(4)].params, *params);
        let lr = params["lr"].as_f64().unwrap();
        assert!((1e-4..=1.0).contains(&lr));
        let layers = params["layers"].as_i64().unwrap();
        assert!((1..=8).contains(&layers));
        // Within the interval nothing more is decided for that trial.
        assert!(report(&mut s, 4, 15, 0.95).is_empty());
        // The best never exploits.
        assert!(report(&mut s, 1, 20, 0.05).is_empty());
    }

    #[test]
    fn decisions_are_deterministic_and_restore() {
        let run = |s: &mut PbtSearcher| {
            for t in 1..=4 {
                s.suggest(TrialId(t));
            }
            let mut all = Vec::new();
            for step in [10, 20, 30] {
                for t in 1..=4 {
                    all.extend(report(s, t, step, t as f64 * 0.1 + step as f64 * 0.001));
                }
            }
            all
        };
        let (mut a, mut b) = (searcher(), searcher());
        let first = run(&mut a);
        assert!(!first.is_empty());
        assert_eq!(first, run(&mut b));
        let mut restored = PbtSearcher::new(a.space.clone(), 5, Goal::Minimize, a.settings, Some(&a.save())).unwrap();
        assert_eq!(report(&mut restored, 4, 40, 0.9), report(&mut a, 4, 40, 0.9));
    }

    /// Explore walks parents first: when the optimizer moves to a neighbouring choice, the
    /// parameters it switches on are drawn and the ones it switches off are dropped.
    #[test]
    fn explore_keeps_conditional_parameters_consistent() {
        let mut space = Space::new();
        space.insert(
            "opt".into(),
            Param::Categorical {
                values: vec!["sgd".into(), "adam".into()],
            },
        );
        let when = |v: &str| chorus_core::space::Condition::from([("opt".to_string(), vec![Value::from(v)])]);
        space.insert_when("momentum".into(), Param::Uniform { min: 0.5, max: 0.99 }, when("sgd"));
        space.insert_when("beta2".into(), Param::Uniform { min: 0.9, max: 0.999 }, when("adam"));
        space.insert("lr".into(), Param::LogUniform { min: 1e-4, max: 1.0 });
        let consistent = |p: &Params| {
            let sgd = p["opt"] == "sgd";
            p.contains_key("lr") && p.contains_key("momentum") == sgd && p.contains_key("beta2") != sgd
        };
        let s = PbtSearcher::new(space, 5, Goal::Minimize, searcher().settings, None).unwrap();
        let (mut to_sgd, mut to_adam) = (0, 0);
        for stream in 0..200 {
            let mut rng = s.rng(stream, 1);
            let donor = s.space.sample(&mut rng);
            assert!(consistent(&donor), "{donor:?}");
            let explored = s.explore(&donor, &mut rng);
            assert!(consistent(&explored), "{donor:?} explored to {explored:?}");
            if explored["opt"] != donor["opt"] {
                let (on, off) = if explored["opt"] == "sgd" {
                    ("momentum", "beta2")
                } else {
                    ("beta2", "momentum")
                };
                assert!(explored.contains_key(on) && !explored.contains_key(off));
                if on == "momentum" { to_sgd += 1 } else { to_adam += 1 }
            }
        }
        assert!(to_sgd > 10 && to_adam > 10, "{to_sgd} to sgd, {to_adam} to adam");
    }

    /// A log-integer moves by a factor (a step in log space), stays an integer in its range, and
    /// moves at least one integer where the factor would round back to the same value.
    #[test]
    fn log_integers_perturb_by_a_factor() {
        let p = Param::LogIntUniform { min: 1, max: 1024 };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let v = perturb(&p, &Value::from(500), &mut rng);
            seen.insert(v.as_i64().expect("an integer"));
            let low = perturb(&p, &Value::from(2), &mut rng).as_i64().unwrap();
            assert!(low == 1 || low == 3, "{low}");
            let edge = perturb(&p, &Value::from(1024), &mut rng).as_i64().unwrap();
            assert!(edge == 819 || edge == 1024, "{edge}");
            let floor = perturb(&p, &Value::from(1), &mut rng).as_i64().unwrap();
            assert!(floor == 1 || floor == 2, "{floor}");
            // A donor value written as a float still comes back an integer.
            assert!(perturb(&p, &serde_json::json!(64.0), &mut rng).is_i64());
        }
        assert_eq!(seen, std::collections::BTreeSet::from([400, 600]));
    }

    #[test]
    fn perturbations_stay_in_their_domains() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let v = perturb(&Param::IntUniform { min: 1, max: 3 }, &Value::from(3), &mut rng);
            assert!((1..=3).contains(&v.as_i64().unwrap()));
            let v = perturb(
                &Param::Uniform { min: 0.0, max: 1.0 },
                &serde_json::json!(0.95),
                &mut rng,
            );
            assert!((0.0..=1.0).contains(&v.as_f64().unwrap()));
        }
    }
}
