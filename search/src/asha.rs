//! Asynchronous successive halving (ASHA, Li et al., "A System for Massively Parallel
//! Hyperparameter Tuning", MLSys 2020) and Hyperband built from several ASHA brackets.
//!
//! A bracket has rungs at resources `r, r*eta, r*eta^2, ...` below `max_resource` (`r` the
//! bracket's grace period, `eta` the reduction factor; the resource is the step or epoch a trial
//! reports). When a trial first reports at or beyond a rung, its best loss so far is recorded
//! there. Two rules decide what happens next:
//!
//! - **Promotion** (the default; the paper's Algorithm 2). A trial reaching a rung has finished
//!   its job, so the slot it frees goes where the paper's `get_job` sends it: to the promotable
//!   trial of the highest rung, where a rung's promotable trials are its best
//!   `floor(n / eta)` of the `n` recorded there that were not promoted yet (best first), else to
//!   a new configuration. If that is the arriving trial itself it simply goes on (no checkpoint
//!   round trip); otherwise it is paused at the rung ([`SearchAction::Pause`]) and the
//!   coordinator asks [`Searcher::promote`] before creating anything, which resumes the chosen
//!   trial from its newest checkpoint. A paused trial may be promoted later, when enough trials
//!   have been recorded behind it. Trials still paused when the search ends stay stopped.
//! - **`stop_once`**. The decision is made once, at arrival: a trial goes on only while it is
//!   among the best `ceil(n / eta)` of the `n` recorded at the rung so far, and is stopped for
//!   good otherwise; nothing pauses, so trials need not checkpoint (Ray Tune's and
//!   Determined's `stop_once` variant).
//!
//! `asha`'s first rung is by default at 5 % of `max_resource` (see [`default_grace`]): judging
//! configurations after one step or epoch of tens stops the slow starters that often end best,
//! and teaches the sampler to avoid them. `brackets` runs several brackets side by side, as
//! Hyperband does.
//!
//! Hyperband runs brackets with grace periods `r * eta^s` for `s = 0..=s_max`, where
//! `s_max = floor(log_eta(max_resource / r))`; new trials are dealt to the brackets in
//! proportion to their sizes in Hyperband (see `next_bracket`), so the search hedges between
//! aggressive early stopping and none at about equal compute each. Each bracket promotes on its
//! own; a free slot goes to the first bracket with a promotable trial.
//!
//! New configurations come from a TPE model (the default `sampler: tpe`): each draw fits TPE to
//! every trial recorded so far, ranked first by the highest resource it reached (a rung, or
//! `max_resource`) and then by its loss there. Successive halving has already judged the trials
//! that went further to be better, so the good group comes from them, and every trial cut short
//! weighs on the bad one; this is how Optuna's TPE ranks pruned trials, and it learns from far
//! more results than a model of one resource level alone (BOHB's choice), which sees only the
//! few trials that reached it. Until `n_startup_trials` trials have a result, and with
//! `sampler: random`, draws are independent. Every draw comes from its own stream of the seed,
//! so the state is plain data and restores exactly.

use super::tpe::{TpeSearcher, TpeSettings};
use super::{SearchAction, SearchEvent, Searcher, Suggestion, loss, read_state};
use crate::Result;
use chorus_core::TrialId;
use chorus_core::space::{Params, Space};
use chorus_core::spec::{Goal, ResourceName, SamplerName, SearcherName, SearcherSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AshaSettings {
    pub reduction_factor: u32,
    pub grace_period: u64,
    pub max_resource: u64,
    pub resource: ResourceName,
    /// 1 for ASHA; Hyperband's bracket count otherwise.
    pub brackets: u32,
    /// Decide once at each rung instead of pausing and promoting.
    pub stop_once: bool,
    /// The TPE sampler's settings; `None` draws at random.
    pub sampler: Option<TpeSettings>,
    /// The grace period of a state saved before `asha`'s default became a share of
    /// `max_resource`: the spec's, else the old default 1. Such a state keeps its rungs, so an
    /// experiment running across the upgrade is judged as it started.
    pub saved_grace_period: u64,
}

impl AshaSettings {
    pub fn from_spec(s: &SearcherSpec) -> Self {
        let eta = s.reduction_factor.unwrap_or(3).max(2);
        let grace = match (s.grace_period, s.name) {
            (Some(g), _) => g.max(1),
            (None, SearcherName::Asha) => default_grace(s.max_resource.unwrap_or(1)),
            // Hyperband hedges with its brackets from the smallest resource up.
            (None, _) => 1,
        };
        let max = s.max_resource.unwrap_or(grace).max(grace);
        // Every bracket must decide somewhere below max_resource, which bounds their number.
        let fit = rungs_between(grace, max, eta) as u32;
        let brackets = match (s.brackets, s.name) {
            (Some(n), _) => n.min(fit),
            (None, SearcherName::Hyperband) => fit,
            (None, _) => 1,
        };
        AshaSettings {
            reduction_factor: eta,
            grace_period: grace,
            max_resource: max,
            resource: s.resource.unwrap_or_default(),
            brackets: brackets.max(1),
            saved_grace_period: s.grace_period.unwrap_or(1).max(1),
            stop_once: s.stop_once.unwrap_or(false),
            sampler: match s.sampler.unwrap_or_default() {
                SamplerName::Random => None,
                SamplerName::Tpe => Some(TpeSettings {
                    n_startup_trials: s.n_startup_trials.unwrap_or(10),
                    n_ei_candidates: s.n_ei_candidates.unwrap_or(24),
                    gamma: s.gamma.unwrap_or(0.25),
                }),
            },
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

/// The first rung of `asha` when the spec names no grace period: 5 % of `max_resource`
/// ([`crate::MIN_GRACE_SHARE`]), rounded up (3 of 50 epochs, 2 of 27). A grace period of one
/// step or epoch out of tens judges most configurations where slow starters (small learning
/// rates, large batches, heavy regularisation) look worst and often end best, and teaches the
/// sampler to avoid them; a much larger one spends the budget on fewer configurations, which
/// loses where early epochs do rank well. docs/BENCHMARKS.md has the measurements behind the
/// choice.
pub fn default_grace(max_resource: u64) -> u64 {
    // In integers: 5 % is 1/20, and a float product could round 20 * 0.05 up past 1.
    max_resource.div_ceil(20).max(1)
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
    /// Per bracket, per rung: the trials promoted from it.
    #[serde(default)]
    promoted: Vec<Vec<BTreeSet<TrialId>>>,
    /// Best losses of the trials that ran to `max_resource`.
    #[serde(default)]
    top: BTreeMap<TrialId, f64>,
    /// The grace period the rungs were built with; absent from states saved before it was
    /// recorded (see [`AshaSettings::saved_grace_period`]).
    #[serde(default)]
    grace_period: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct TrialProgress {
    bracket: u32,
    best: Option<f64>,
    /// Rungs passed (recorded and decided), counted from the bracket's first.
    decided: usize,
    stopped: bool,
    /// Held at its last recorded rung, waiting for a promotion.
    #[serde(default)]
    paused: bool,
    /// Failed or killed: never promoted.
    #[serde(default)]
    gone: bool,
    /// What it was created with, for the sampler's model.
    #[serde(default)]
    params: Params,
}

impl AshaSearcher {
    pub fn new(
        space: Space,
        seed: u64,
        goal: Goal,
        mut settings: AshaSettings,
        saved: Option<&serde_json::Value>,
    ) -> Result<Self> {
        let mut state: AshaState = read_state("successive halving", saved)?;
        // Rungs keep the grace period they were recorded with, whatever the defaults now say.
        match (saved, state.grace_period) {
            (_, Some(g)) => settings.grace_period = g,
            (Some(_), None) => settings.grace_period = settings.saved_grace_period,
            (None, None) => {}
        }
        settings.max_resource = settings.max_resource.max(settings.grace_period);
        state.grace_period = Some(settings.grace_period);
        state.rungs.resize_with(settings.brackets as usize, Default::default);
        state.promoted.resize_with(settings.brackets as usize, Default::default);
        for (b, (rungs, promoted)) in state.rungs.iter_mut().zip(&mut state.promoted).enumerate() {
            let n = settings.rungs(b as u32).len();
            rungs.resize_with(n, Default::default);
            promoted.resize_with(n, Default::default);
        }
        Ok(AshaSearcher {
            space,
            seed,
            goal,
            settings,
            state,
        })
    }

    fn draw(&self, index: u64) -> Params {
        if let Some(tpe) = self.settings.sampler
            && let Some(results) = self.model_results(tpe)
        {
            return TpeSearcher::fitted(self.space.clone(), self.seed, self.goal, tpe, results).draw(index);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        self.space.sample(&mut rng)
    }

    /// Every trial recorded at a rung (or at `max_resource`), ranked by the highest resource it
    /// reached and then by its loss there, with its rank as the loss the model sees: a trial
    /// that got further beat every trial stopped or paused before it, so the good group is
    /// drawn from the trials that went furthest and every trial cut short shapes the bad one.
    /// `None` until `n_startup_trials` trials have a result.
    fn model_results(&self, tpe: TpeSettings) -> Option<Vec<(TrialId, Params, f64)>> {
        let mut at: BTreeMap<TrialId, (u64, f64)> = BTreeMap::new();
        for (b, rungs) in self.state.rungs.iter().enumerate() {
            for (resource, recorded) in self.settings.rungs(b as u32).into_iter().zip(rungs) {
                for (t, l) in recorded {
                    let e = at.entry(*t).or_insert((resource, *l));
                    if resource > e.0 {
                        *e = (resource, *l);
                    }
                }
            }
        }
        for (t, l) in &self.state.top {
            at.insert(*t, (self.settings.max_resource, *l));
        }
        if at.len() < tpe.n_startup_trials as usize {
            return None;
        }
        let mut order: Vec<(u64, f64, TrialId)> = at.into_iter().map(|(t, (r, l))| (r, l, t)).collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        Some(
            order
                .into_iter()
                .enumerate()
                .filter_map(|(i, (_, _, t))| {
                    let p = &self.state.trials.get(&t)?.params;
                    (!p.is_empty()).then(|| (t, p.clone(), i as f64))
                })
                .collect(),
        )
    }

    /// The bracket of the next new trial. Brackets get trials in proportion to their sizes in
    /// Hyperband (Li et al. 2018): with `s_max + 1` brackets, the one with `s` rungs starts
    /// `ceil((s_max + 1) / (s + 1) * eta^s)` configurations, so the aggressive brackets, whose
    /// trials mostly stop at the first rung, get many more than the one that never stops any,
    /// and each bracket spends about the same compute. Dealt by smooth weighted round robin
    /// (the bracket furthest below its share goes next), so the sequence is deterministic.
    fn next_bracket(&self) -> u32 {
        let n = self.settings.brackets as usize;
        if n == 1 {
            return 0;
        }
        let eta = f64::from(self.settings.reduction_factor);
        let s_max = (n - 1) as f64;
        let mut dealt = vec![0u64; n];
        for p in self.state.trials.values() {
            if let Some(d) = dealt.get_mut(p.bracket as usize) {
                *d += 1;
            }
        }
        (0..n)
            .map(|b| {
                let s = s_max - b as f64;
                let weight = ((s_max + 1.0) / (s + 1.0) * eta.powf(s)).ceil();
                (dealt[b] as f64 / weight, b)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map_or(0, |(_, b)| b as u32)
    }

    /// The paper's `get_job` within one bracket: the best not-yet-promoted trial among the
    /// top `floor(n / eta)` of the highest rung that has one. Only paused trials and `arriving`
    /// (the trial being decided) are candidates.
    fn choose(&self, bracket: usize, arriving: Option<TrialId>) -> Option<(TrialId, usize, usize, usize)> {
        let eta = self.settings.reduction_factor as usize;
        let rungs = &self.state.rungs[bracket];
        for k in (0..rungs.len()).rev() {
            let mut order: Vec<(f64, TrialId)> = rungs[k].iter().map(|(t, l)| (*l, *t)).collect();
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let keep = order.len() / eta;
            for (rank, (_, t)) in order.iter().enumerate().take(keep) {
                let waiting = self
                    .state
                    .trials
                    .get(t)
                    .is_some_and(|p| (p.paused || arriving == Some(*t)) && !p.gone);
                if waiting && !self.state.promoted[bracket][k].contains(t) {
                    return Some((*t, k, rank + 1, order.len()));
                }
            }
        }
        None
    }

    /// Records a trial at every rung its resource has reached and decides each in turn.
    fn arrive(&mut self, trial: TrialId, resource: f64, value: f64) -> Vec<SearchAction> {
        let eta = self.settings.reduction_factor as usize;
        let l = loss(self.goal, value);
        let Some(p) = self.state.trials.get_mut(&trial) else {
            return Vec::new();
        };
        if p.stopped || p.paused || p.gone {
            return Vec::new();
        }
        let best = p.best.map_or(l, |b| b.min(l));
        p.best = Some(best);
        let rungs = self.settings.rungs(p.bracket);
        let bracket = p.bracket as usize;
        if resource >= self.settings.max_resource as f64 {
            self.state.top.insert(trial, best);
        }
        let what = resource_name(self.settings.resource);
        loop {
            let p = self.state.trials.get_mut(&trial).expect("looked up above");
            let k = p.decided;
            if k >= rungs.len() || resource < rungs[k] as f64 {
                return Vec::new();
            }
            let recorded = &mut self.state.rungs[bracket][k];
            recorded.insert(trial, best);
            p.decided += 1;
            if self.settings.stop_once {
                let better = better_than(recorded, trial, best);
                let keep = recorded.len().div_ceil(eta);
                if better >= keep {
                    p.stopped = true;
                    return vec![SearchAction::Stop {
                        trial,
                        reason: format!(
                            "successive halving: at rung {k} ({what} {}) rank {} of {}, only the best {keep} go on",
                            rungs[k],
                            better + 1,
                            recorded.len()
                        ),
                    }];
                }
                continue;
            }
            match self.choose(bracket, Some(trial)) {
                Some((t, at, _, _)) if t == trial && at == k => {
                    self.state.promoted[bracket][k].insert(trial);
                }
                chosen => {
                    let recorded = &self.state.rungs[bracket][k];
                    let (n, rank) = (recorded.len(), 1 + better_than(recorded, trial, best));
                    self.state.trials.get_mut(&trial).expect("looked up above").paused = true;
                    let why = match chosen {
                        Some((t, at, _, _)) => format!("trial {t} at rung {at} is promoted first"),
                        None => format!("not among the best {} of {n}", n / eta),
                    };
                    return vec![SearchAction::Pause {
                        trial,
                        reason: format!(
                            "successive halving: paused at rung {k} ({what} {}), rank {rank} of {n}; {why}",
                            rungs[k]
                        ),
                    }];
                }
            }
        }
    }
}

/// How many trials recorded at a rung rank ahead of `trial` with loss `best` (ties go to the
/// older trial, so every rank is distinct).
fn better_than(recorded: &BTreeMap<TrialId, f64>, trial: TrialId, best: f64) -> usize {
    recorded
        .iter()
        .filter(|(t, v)| **v < best || (**v == best && **t < trial))
        .count()
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
        let bracket = self.next_bracket();
        self.state.drawn += 1;
        self.state.trials.insert(
            trial,
            TrialProgress {
                bracket,
                params: params.clone(),
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
            SearchEvent::Completed { trial, value, .. } => {
                if let Some(p) = self.state.trials.get_mut(trial) {
                    if p.paused {
                        // Ended while held at a rung: the search is over for it.
                        p.paused = false;
                        p.stopped = true;
                    } else if !p.stopped
                        && let Some(l) = value.map(|v| loss(self.goal, v)).or(p.best)
                        && self.settings.rungs(p.bracket).len() == p.decided
                    {
                        // It ran its whole course (its last report may not name the resource).
                        let best = p.best.map_or(l, |b| b.min(l));
                        self.state.top.entry(*trial).or_insert(best);
                    }
                }
                Vec::new()
            }
            SearchEvent::Failed { trial } => {
                if let Some(p) = self.state.trials.get_mut(trial) {
                    p.gone = true;
                    p.paused = false;
                }
                Vec::new()
            }
        }
    }

    fn promote(&mut self) -> Option<(TrialId, String)> {
        if self.settings.stop_once {
            return None;
        }
        let what = resource_name(self.settings.resource);
        for b in 0..self.state.rungs.len() {
            if let Some((t, k, rank, n)) = self.choose(b, None) {
                self.state.promoted[b][k].insert(t);
                self.state.trials.get_mut(&t).expect("chosen trials exist").paused = false;
                let rung = self.settings.rungs(b as u32)[k];
                return Some((
                    t,
                    format!("successive halving: promoted from rung {k} ({what} {rung}) as rank {rank} of {n}"),
                ));
            }
        }
        None
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("asha state serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::space::Param;

    /// The decide-once rule with random draws: what the older tests script.
    fn settings(brackets: u32) -> AshaSettings {
        AshaSettings {
            reduction_factor: 3,
            grace_period: 1,
            max_resource: 27,
            resource: ResourceName::Step,
            brackets,
            stop_once: true,
            sampler: None,
            saved_grace_period: 1,
        }
    }

    fn searcher(brackets: u32) -> AshaSearcher {
        let mut space = Space::new();
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        AshaSearcher::new(space, 1, Goal::Minimize, settings(brackets), None).unwrap()
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

    /// What a report led to: "pause", "stop" or nothing.
    fn act(s: &mut AshaSearcher, t: u64, step: i64, value: f64) -> Option<&'static str> {
        let actions = s.observe(&SearchEvent::Reported {
            trial: TrialId(t),
            step: Some(step),
            epoch: None,
            value,
        });
        match actions.as_slice() {
            [] => None,
            [SearchAction::Pause { trial, .. }] if *trial == TrialId(t) => Some("pause"),
            [SearchAction::Stop { trial, .. }] if *trial == TrialId(t) => Some("stop"),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn promoting(eta: u32, max_resource: u64) -> AshaSearcher {
        let mut space = Space::new();
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        let settings = AshaSettings {
            reduction_factor: eta,
            max_resource,
            stop_once: false,
            ..settings(1)
        };
        AshaSearcher::new(space, 1, Goal::Minimize, settings, None).unwrap()
    }

    /// The paper's rule (eta = 3) on a scripted sequence: a trial reaching a rung goes on only
    /// when it is the job `get_job` would hand out (the best not-yet-promoted trial among the
    /// top floor(n/3) of its rung, with no such trial at a higher rung); otherwise it is paused,
    /// and a paused trial is promoted once enough trials have been recorded behind it.
    #[test]
    fn promotes_and_pauses_exactly_by_the_papers_rule() {
        let mut s = promoting(3, 27);
        for t in 1..=12 {
            s.suggest(TrialId(t));
        }
        // (trial, loss at step 1, outcome)
        let script = [
            (1, 0.50, Some("pause")),  // n=1, top 0
            (2, 0.60, Some("pause")),  // n=2, top 0
            (3, 0.40, None),           // n=3, top 1 = {3}: promoted
            (4, 0.45, Some("pause")),  // n=4, top 1 = {3}, already promoted
            (5, 0.70, Some("pause")),  // n=5, top 1
            (6, 0.30, None),           // n=6, top 2 = {6, 3}: 6 promoted
            (7, 0.55, Some("pause")),  // n=7, top 2 = {6, 3}
            (8, 0.42, Some("pause")),  // n=8, top 2 = {6, 3}
            (9, 0.35, None),           // n=9, top 3 = {6, 9, 3}: 9 promoted
            (10, 0.44, Some("pause")), // n=10, top 3
            (11, 0.90, Some("pause")), // n=11, top 3
        ];
        for (t, v, outcome) in script {
            assert_eq!(act(&mut s, t, 1, v), outcome, "trial {t}");
            assert_eq!(s.promote(), None, "nothing promotable after trial {t}");
        }
        // n=12, top 4 = {6, 9, 3, 8}: trial 8, paused earlier, is now promotable, so trial 12
        // (last of 12) pauses and the free slot goes to trial 8.
        assert_eq!(act(&mut s, 12, 1, 0.95), Some("pause"));
        let (t, why) = s.promote().expect("trial 8 is promotable");
        assert_eq!(t, TrialId(8));
        assert!(why.contains("rank 4 of 12"), "{why}");
        assert_eq!(s.promote(), None);
        // A promoted trial resumes from its checkpoint: reports at or below its rung decide
        // nothing again.
        assert_eq!(act(&mut s, 8, 1, 0.42), None);
        // Rung 1 (step 3): the first arrivals pause (top 0 of 1 and of 2), the third goes on.
        assert_eq!(act(&mut s, 3, 3, 0.30), Some("pause"));
        assert_eq!(act(&mut s, 6, 3, 0.25), Some("pause"));
        assert_eq!(act(&mut s, 9, 3, 0.20), None);
        // A paused trial sends no more decisions; one that fails is never promoted.
        assert_eq!(act(&mut s, 1, 3, 0.01), None);
        s.observe(&SearchEvent::Failed { trial: TrialId(6) });
        assert!(s.state.trials[&TrialId(6)].gone);
    }

    /// A free slot goes to the highest rung first, even when the arriving trial is itself
    /// promotable from a lower one.
    #[test]
    fn promotion_prefers_the_highest_rung() {
        let mut s = promoting(2, 8); // rungs at 1, 2, 4
        for t in 1..=11 {
            s.suggest(TrialId(t));
        }
        let script = [
            (1, 1, 0.50, Some("pause")), // rung 0: n=1, top 0
            (2, 1, 0.40, None),          // rung 0: n=2, top 1 = {2}
            (2, 2, 0.30, Some("pause")), // rung 1: n=1, top 0
            (3, 1, 0.60, Some("pause")), // rung 0: n=3, top 1 = {2}, promoted
            (4, 1, 0.20, None),          // rung 0: n=4, top 2 = {4, 2}
            (4, 2, 0.10, None),          // rung 1: n=2, top 1 = {4}
            (5, 1, 0.45, Some("pause")), // rung 0: n=5, top 2 = {4, 2}
            (7, 1, 0.15, None),          // rung 0: n=6, top 3 = {7, 4, 2}
            (7, 2, 0.05, None),          // rung 1: n=3, top 1 = {7}
            (8, 1, 0.16, None),          // rung 0: n=7, top 3 = {7, 8, 4}
            (8, 2, 0.32, Some("pause")), // rung 1: n=4, top 2 = {7, 4}
            (5, 2, 0.99, None),          // paused: ignored
            (9, 1, 0.17, None),          // rung 0: n=8, top 4 = {7, 8, 9, 4}
            (9, 2, 0.60, Some("pause")), // rung 1: n=5, top 2 = {7, 4}
        ];
        for (t, step, v, outcome) in script {
            assert_eq!(act(&mut s, t, step, v), outcome, "trial {t} at step {step}");
        }
        assert_eq!(s.promote(), None);
        // Rungs record each trial's best loss so far. Rung 0 (n=9, top 4 = {7, 8, 9, 10}) lets
        // trial 10 go on; at rung 1 (n=6, top 3 = {7, 4, 8}) the paused trial 8 is promotable,
        // so trial 10 pauses for it.
        assert_eq!(act(&mut s, 10, 1, 0.18), None);
        assert_eq!(act(&mut s, 10, 2, 0.70), Some("pause"));
        // Trial 11 arrives best at rung 0 (n=10, top 5), promotable there, but the slot goes to
        // the higher rung first: it pauses, then both are promoted, rung 1 first.
        assert_eq!(act(&mut s, 11, 1, 0.001), Some("pause"));
        let (t, why) = s.promote().expect("rung 1 first");
        assert_eq!(t, TrialId(8), "{why}");
        assert!(why.contains("rung 1"), "{why}");
        assert_eq!(s.promote().map(|p| p.0), Some(TrialId(11)));
        assert_eq!(s.promote(), None);
    }

    /// The sampler orders trials by how far they got, then by loss where they stopped.
    #[test]
    fn the_sampler_ranks_trials_by_how_far_they_got() {
        let mut s = promoting(3, 27);
        s.settings.sampler = Some(TpeSettings {
            n_startup_trials: 3,
            n_ei_candidates: 24,
            gamma: 0.25,
        });
        for t in 1..=4 {
            s.suggest(TrialId(t));
        }
        // 1 and 2 pause at rung 0, 3 is promoted (best of 3) and reaches rung 1 with a loss
        // worse than any at rung 0; 4 arrives last at rung 0.
        act(&mut s, 1, 1, 0.2);
        act(&mut s, 2, 1, 0.3);
        act(&mut s, 3, 1, 0.1);
        act(&mut s, 3, 3, 0.9);
        act(&mut s, 4, 1, 0.25);
        let ranked: Vec<(TrialId, f64)> = s
            .model_results(s.settings.sampler.unwrap())
            .unwrap()
            .into_iter()
            .map(|(t, _, l)| (t, l))
            .collect();
        // Trial 3's best so far (0.1) is what rung 1 recorded; it ranks first for getting there.
        assert_eq!(
            ranked,
            vec![
                (TrialId(3), 0.0),
                (TrialId(1), 1.0),
                (TrialId(4), 2.0),
                (TrialId(2), 3.0)
            ]
        );
        let mut few = promoting(3, 27);
        few.settings.sampler = s.settings.sampler;
        few.suggest(TrialId(1));
        act(&mut few, 1, 1, 0.2);
        assert!(
            few.model_results(few.settings.sampler.unwrap()).is_none(),
            "too few to model"
        );
    }

    /// In simulation (a bowl seen through learning curves, one trial at a time), the TPE
    /// sampler finds better configurations than random draws under the same promotion rule.
    #[test]
    fn the_tpe_sampler_beats_random_draws() {
        use crate::{build, preview};
        let spec = |sampler: &str| {
            chorus_core::spec::parse(
                &format!(
                    "name: s\nmetric: {{name: loss, goal: minimize}}\n\
                     searcher: {{name: asha, seed: 1, max_resource: 27, sampler: {sampler}}}\nmax_trials: 80\n\
                     parameters:\n  a: {{min: 0.0, max: 1.0}}\n  b: {{min: 0.0, max: 1.0}}\n  c: {{min: 0.0, max: 1.0}}\n\
                     trial: {{command: [x]}}\n"
                ),
                &[],
            )
            .unwrap()
        };
        let best = |sampler: &str, seed: u64| {
            let mut s = spec(sampler);
            s.spec.searcher.seed = seed;
            let p = preview::simulate(build(&s), &s, 80, 27, seed);
            p.trials
                .iter()
                .filter(|t| t.steps >= 9)
                .map(|t| preview::objective(&s.space, &t.params, seed))
                .fold(f64::INFINITY, f64::min)
        };
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let tpe = median((0..10).map(|seed| best("tpe", seed)).collect());
        let random = median((0..10).map(|seed| best("random", seed)).collect());
        assert!(tpe < random / 2.0, "median best: tpe {tpe}, random {random}");
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
            stop_once: None,
            brackets: None,
            sampler: None,
        };
        assert_eq!(AshaSettings::from_spec(&spec).brackets, 4);
    }

    fn spec_of(yaml: &str) -> SearcherSpec {
        chorus_core::spec::parse(
            &format!(
                "name: s\nmetric: {{name: loss, goal: minimize}}\nsearcher: {yaml}\nmax_trials: 10\n\
                 parameters:\n  a: {{min: 0.0, max: 1.0}}\ntrial: {{command: [x]}}\n"
            ),
            &[],
        )
        .unwrap()
        .spec
        .searcher
    }

    /// `asha` without a grace period judges a configuration first after 5 % of `max_resource`,
    /// never after one step of tens; a named grace period is kept, and hyperband still starts
    /// its most aggressive bracket at 1.
    #[test]
    fn the_default_grace_period_is_a_share_of_max_resource() {
        for (max, grace) in [
            (50, 3),
            (52, 3),
            (27, 2),
            (100, 5),
            (1000, 50),
            (9, 1),
            (1, 1),
            (20, 1),
            (21, 2),
        ] {
            assert_eq!(default_grace(max), grace, "max {max}");
        }
        let a = AshaSettings::from_spec(&spec_of("{name: asha, max_resource: 50}"));
        assert_eq!((a.grace_period, a.brackets, a.rungs(0)), (3, 1, vec![3, 9, 27]));
        let a = AshaSettings::from_spec(&spec_of("{name: asha, max_resource: 50, grace_period: 1}"));
        assert_eq!(a.rungs(0), vec![1, 3, 9, 27]);
        let h = AshaSettings::from_spec(&spec_of("{name: hyperband, max_resource: 50}"));
        assert_eq!((h.grace_period, h.brackets), (1, 4));
        let h = AshaSettings::from_spec(&spec_of("{name: hyperband, max_resource: 50, grace_period: 3}"));
        assert_eq!((h.grace_period, h.brackets, h.rungs(2)), (3, 3, vec![27]));
    }

    /// A state saved before the default grace period changed keeps the rungs it was recorded
    /// with (grace period 1, or the spec's); a new state records its grace period, so a later
    /// change of the default cannot move its rungs either.
    #[test]
    fn saved_states_keep_their_grace_period() {
        let spec = spec_of("{name: asha, max_resource: 27}");
        let mut space = Space::new();
        space.insert("a".into(), chorus_core::space::Param::Uniform { min: 0.0, max: 1.0 });
        let new = |saved: Option<&serde_json::Value>, settings: AshaSettings| {
            AshaSearcher::new(space.clone(), 1, Goal::Minimize, settings, saved).unwrap()
        };
        let mut s = new(None, AshaSettings::from_spec(&spec));
        assert_eq!(s.settings.rungs(0), vec![2, 6, 18]);
        s.suggest(TrialId(1));
        let saved = s.save();
        assert_eq!(saved["grace_period"], 2);
        let mut other_default = AshaSettings::from_spec(&spec);
        other_default.grace_period = 5;
        assert_eq!(new(Some(&saved), other_default).settings.rungs(0), vec![2, 6, 18]);

        let mut legacy = saved.clone();
        legacy.as_object_mut().unwrap().remove("grace_period");
        let old = new(Some(&legacy), AshaSettings::from_spec(&spec));
        assert_eq!(old.settings.rungs(0), vec![1, 3, 9]);
        assert_eq!(old.save()["grace_period"], 1);
        let named = spec_of("{name: asha, max_resource: 27, grace_period: 3}");
        assert_eq!(
            new(Some(&legacy), AshaSettings::from_spec(&named)).settings.rungs(0),
            vec![3, 9]
        );
    }

    /// `brackets` runs that many brackets side by side, at most as many as have a rung below
    /// max_resource.
    #[test]
    fn brackets_are_bounded_by_the_rungs_that_fit() {
        let a = AshaSettings::from_spec(&spec_of("{name: asha, max_resource: 50, grace_period: 2, brackets: 2}"));
        assert_eq!((a.brackets, a.rungs(0), a.rungs(1)), (2, vec![2, 6, 18], vec![6, 18]));
        let a = AshaSettings::from_spec(&spec_of("{name: asha, max_resource: 50, grace_period: 2, brackets: 9}"));
        assert_eq!(a.brackets, 3);
        let h = AshaSettings::from_spec(&spec_of("{name: hyperband, max_resource: 27, brackets: 2}"));
        assert_eq!((h.brackets, h.rungs(1)), (2, vec![3, 9]));
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
        let mut s = AshaSearcher::new(space, 1, Goal::Maximize, settings(1), None).unwrap();
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
        assert_eq!(brackets, vec![0, 1, 2, 3, 0, 0, 1, 0]);
        // Over a whole round, Hyperband's bracket sizes for eta = 3 and 4 brackets: 27, 12, 6, 4.
        let mut round = searcher(4);
        for t in 1..=49 {
            round.suggest(TrialId(t));
        }
        let mut sizes = [0; 4];
        for p in round.state.trials.values() {
            sizes[p.bracket as usize] += 1;
        }
        assert_eq!(sizes, [27, 12, 6, 4]);
        // Bracket 3 has no rung below 27: its trials are never stopped.
        assert!(!report(&mut s, 4, 26, 99.0));
        report(&mut s, 1, 1, 0.5);
        let saved = s.save();
        let mut space = Space::new();
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        let mut r = AshaSearcher::new(space, 1, Goal::Minimize, settings(4), Some(&saved)).unwrap();
        assert_eq!(r.state, s.state);
        assert_eq!(r.suggest(TrialId(9)), s.suggest(TrialId(9)));
        assert_eq!(report(&mut r, 5, 1, 0.6), report(&mut s, 5, 1, 0.6));
    }
}
