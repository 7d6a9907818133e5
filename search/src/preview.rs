//! `chorus search preview`: a searcher run against a synthetic objective in simulation, to see
//! which trials it would create, stop and let finish before spending any compute.
//!
//! The objective is a smooth bowl over the parameters a trial has (each mapped onto [0, 1] by
//! its domain, categories by their index; inactive conditional ones left out) whose centre is
//! drawn from the preview seed, seen through a learning curve that falls as `1/sqrt(step)`
//! towards the trial's final value. Trials run `parallel_trials` at a time, each advancing one
//! step per tick and reporting at every step, so early-stopping searchers act exactly as they
//! would on a live cluster with equal-speed workers. Pure and deterministic.

use super::{SearchAction, SearchEvent, Searcher, Suggestion};
use chorus_core::TrialId;
use chorus_core::space::{Param, Params, Space};
use chorus_core::spec::{Goal, ValidSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// What happened to one simulated trial.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreviewTrial {
    pub trial: u64,
    pub params: Params,
    /// Steps it ran.
    pub steps: u64,
    /// Its last reported value (the metric as the user sees it).
    pub value: f64,
    /// Why it was stopped early; `None` when it ran to the end.
    pub stopped: Option<String>,
    /// Times it continued from a better trial's checkpoint (population-based training).
    pub exploits: u32,
    /// Times it was promoted after a pause at a rung (successive halving).
    pub promotions: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    pub trials: Vec<PreviewTrial>,
    /// Steps run over all trials: the compute the search would spend.
    pub steps: u64,
    pub best_trial: Option<u64>,
}

/// The synthetic objective: a loss in [0, ~1] for a parameter set (lower is better).
pub fn objective(space: &Space, params: &Params, seed: u64) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5052_4556);
    let mut sum = 0.0;
    let mut dims = 0.0;
    for (name, p) in space {
        let centre: f64 = rng.random();
        let Some(u) = params.get(name).and_then(|v| unit(p, v)) else {
            continue;
        };
        sum += (u - centre).powi(2);
        dims += 1.0;
    }
    if dims == 0.0 { 0.0 } else { sum / dims }
}

/// A value's place in its domain, in [0, 1].
fn unit(p: &Param, v: &serde_json::Value) -> Option<f64> {
    let span = |x: f64, lo: f64, hi: f64| {
        if hi > lo {
            ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
        } else {
            0.5
        }
    };
    match p {
        Param::Constant { .. } => None,
        Param::Categorical { values } => {
            let i = values.iter().position(|x| x == v)?;
            Some(if values.len() > 1 {
                i as f64 / (values.len() - 1) as f64
            } else {
                0.5
            })
        }
        Param::Uniform { min, max } | Param::QUniform { min, max, .. } => Some(span(v.as_f64()?, *min, *max)),
        Param::LogUniform { min, max } => Some(span(v.as_f64()?.ln(), min.ln(), max.ln())),
        Param::IntUniform { min, max } => Some(span(v.as_f64()?, *min as f64, *max as f64)),
        Param::LogIntUniform { min, max } => {
            Some(span(v.as_f64()?.max(1.0).ln(), (*min as f64).ln(), (*max as f64).ln()))
        }
    }
}

/// The value a trial with final loss `f` reports at `step` of `steps`.
fn curve(f: f64, step: u64) -> f64 {
    f + 0.5 / (step as f64).sqrt()
}

/// Runs `searcher` for up to `max_trials` trials of `steps` steps each, `parallel` at a time.
pub fn simulate(searcher: Box<dyn Searcher>, spec: &ValidSpec, max_trials: u64, steps: u64, seed: u64) -> Preview {
    let space = &spec.space;
    let mut source = |params: &Params, step: u64| curve(objective(space, params, seed), step);
    run(
        searcher,
        spec,
        Limits {
            max_trials,
            steps,
            budget: u64::MAX,
        },
        &mut source,
    )
}

/// How long a simulated search goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Trials created at most.
    pub max_trials: u64,
    /// Steps a trial that is never stopped runs.
    pub steps: u64,
    /// Steps run over all trials after which the search ends (the compute budget).
    pub budget: u64,
}

/// Runs `searcher` under `limits`, `parallel_trials` at a time, reading each trial's loss at a
/// step (one-based) from `source` (lower is better; the value reported is that loss with the
/// spec's goal applied). Every report names the step as both its step and its epoch, so the
/// searcher counts whichever resource its spec names. [`simulate`] runs it on the synthetic
/// objective; benchmarks run it on recorded learning curves.
pub fn run(
    mut searcher: Box<dyn Searcher>,
    spec: &ValidSpec,
    limits: Limits,
    source: &mut dyn FnMut(&Params, u64) -> f64,
) -> Preview {
    let Limits {
        max_trials,
        steps,
        budget,
    } = limits;
    let goal = spec.metric().goal;
    let parallel = spec.spec.parallel_trials.max(1) as usize;
    let shown = |l: f64| match goal {
        Goal::Minimize => l,
        Goal::Maximize => 1.0 - l,
    };
    let mut out: Vec<PreviewTrial> = Vec::new();
    let mut running: Vec<usize> = Vec::new(); // indices in `out`
    let mut created = 0u64;
    let mut exhausted = false;
    let mut total = 0u64;
    // Trials held at a rung, by index in `out`.
    let mut paused: Vec<usize> = Vec::new();
    loop {
        // A searcher that says wait is asked again on the next tick.
        let mut waiting = false;
        while running.len() < parallel && !waiting {
            // A promotion comes before any new trial, as on a live cluster.
            if let Some((trial, _)) = searcher.promote() {
                if let Some(k) = paused.iter().position(|i| out[*i].trial == trial.0) {
                    let j = paused.remove(k);
                    out[j].stopped = None;
                    out[j].promotions += 1;
                    running.push(j);
                }
                continue;
            }
            if created >= max_trials || exhausted {
                break;
            }
            let id = created + 1;
            match searcher.suggest(TrialId(id)) {
                Suggestion::Create(params) => {
                    created += 1;
                    out.push(PreviewTrial {
                        trial: id,
                        params,
                        steps: 0,
                        value: f64::NAN,
                        stopped: None,
                        exploits: 0,
                        promotions: 0,
                    });
                    running.push(out.len() - 1);
                }
                Suggestion::Wait => waiting = true,
                Suggestion::Exhausted => exhausted = true,
            }
        }
        if running.is_empty() || total >= budget {
            // Nothing runs and nothing more can start (a waiting searcher with no trial running
            // would wait forever); trials still paused keep their pause as the reason they
            // stopped.
            for j in paused.drain(..).chain(running.drain(..)) {
                let t = &out[j];
                searcher.observe(&SearchEvent::Completed {
                    trial: TrialId(t.trial),
                    value: Some(t.value),
                    objectives: Vec::new(),
                });
            }
            break;
        }
        let mut ended: Vec<usize> = Vec::new();
        let mut held: Vec<usize> = Vec::new();
        for &i in &running {
            if total >= budget {
                break;
            }
            let t = &mut out[i];
            t.steps += 1;
            total += 1;
            t.value = shown(source(&t.params, t.steps));
            let actions = searcher.observe(&SearchEvent::Reported {
                trial: TrialId(t.trial),
                step: Some(t.steps as i64),
                epoch: Some(t.steps as f64),
                value: t.value,
            });
            for a in actions {
                match a {
                    SearchAction::Stop { trial, reason } => {
                        if let Some(j) = out.iter().position(|x| x.trial == trial.0) {
                            out[j].stopped = Some(reason);
                            ended.push(j);
                        }
                    }
                    SearchAction::Pause { trial, reason } => {
                        if let Some(j) = out.iter().position(|x| x.trial == trial.0) {
                            out[j].stopped = Some(reason);
                            held.push(j);
                        }
                    }
                    SearchAction::Exploit {
                        trial, donor, params, ..
                    } => {
                        // The receiver continues from the donor's progress with new parameters.
                        let from = out.iter().find(|x| x.trial == donor.0).map_or(0, |d| d.steps);
                        if let Some(j) = out.iter().position(|x| x.trial == trial.0) {
                            out[j].exploits += 1;
                            out[j].steps = from;
                            out[j].params = params.clone();
                        }
                    }
                }
            }
            if out[i].steps >= steps && !held.contains(&i) {
                ended.push(i);
            }
        }
        for j in held {
            if let Some(k) = running.iter().position(|i| *i == j) {
                paused.push(running.remove(k));
            }
        }
        ended.sort_unstable();
        ended.dedup();
        for j in ended {
            running.retain(|i| *i != j);
            let t = &out[j];
            searcher.observe(&SearchEvent::Completed {
                trial: TrialId(t.trial),
                value: Some(t.value),
                objectives: Vec::new(),
            });
        }
    }
    let best_trial = out
        .iter()
        .min_by(|a, b| super::loss(goal, a.value).total_cmp(&super::loss(goal, b.value)))
        .map(|t| t.trial);
    Preview {
        trials: out,
        steps: total,
        best_trial,
    }
}

/// Where a simulated search spent its budget: one row per resource at which trials ended (a
/// rung where successive halving stopped or paused them, or the end of the run), with how many
/// were judged there and the steps they used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spend {
    /// The steps (or epochs) the trials of this row ran.
    pub ran: u64,
    pub trials: u64,
    pub steps: u64,
    /// `steps` as a share of all steps spent, in [0, 1].
    pub share: f64,
}

/// Groups a preview's trials by how far they ran, lowest first.
pub fn spend(p: &Preview) -> Vec<Spend> {
    let mut by: std::collections::BTreeMap<u64, (u64, u64)> = std::collections::BTreeMap::new();
    for t in &p.trials {
        let e = by.entry(t.steps).or_default();
        e.0 += 1;
        e.1 += t.steps;
    }
    by.into_iter()
        .map(|(ran, (trials, steps))| Spend {
            ran,
            trials,
            steps,
            share: steps as f64 / p.steps.max(1) as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build;

    fn spec(searcher: &str) -> ValidSpec {
        chorus_core::spec::parse(
            &format!(
                "name: p\nmetric: {{name: loss, goal: minimize}}\nsearcher: {searcher}\nmax_trials: 27\nparallel_trials: 3\n\
                 parameters:\n  lr: {{min: 0.0001, max: 0.1, distribution: log_uniform}}\n  w: {{min: 0, max: 1}}\n\
                 trial: {{command: [x]}}\n"
            ),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn random_runs_every_trial_to_the_end() {
        let s = spec("{name: random, seed: 1}");
        let p = simulate(build(&s), &s, 27, 9, 5);
        assert_eq!(p.trials.len(), 27);
        assert!(p.trials.iter().all(|t| t.steps == 9 && t.stopped.is_none()));
        assert_eq!(p.steps, 27 * 9);
        assert_eq!(p, simulate(build(&s), &s, 27, 9, 5), "deterministic");
    }

    /// Trials of a conditional space lack their inactive parameters: the objective scores them
    /// over the parameters they have, and the preview lists them as created.
    #[test]
    fn conditional_parameters_are_left_out() {
        let s = chorus_core::spec::parse(
            "name: p\nmetric: {name: loss, goal: minimize}\nsearcher: {name: asha, seed: 1, max_resource: 9}\n\
             max_trials: 27\nparallel_trials: 3\nparameters:\n  opt: {values: [sgd, adam]}\n\
             \x20 momentum: {min: 0.5, max: 0.99, when: {opt: sgd}}\n  w: {min: 0, max: 1}\ntrial: {command: [x]}\n",
            &[],
        )
        .unwrap();
        let p = simulate(build(&s), &s, 27, 9, 5);
        assert_eq!(p.trials.len(), 27);
        for t in &p.trials {
            assert_eq!(
                t.params.contains_key("momentum"),
                t.params["opt"] == "sgd",
                "{:?}",
                t.params
            );
            assert!(t.value.is_finite());
        }
        let adam = Params::from([("opt".into(), "adam".into()), ("w".into(), 1.into())]);
        let mut sgd = adam.clone();
        sgd.insert("opt".into(), "sgd".into());
        sgd.insert("momentum".into(), serde_json::json!(0.7));
        for params in [adam, sgd] {
            let f = objective(&s.space, &params, 5);
            assert!((0.0..=1.0).contains(&f), "{f}");
        }
    }

    /// Every searcher previews a log-integer parameter: trials get integers in range, the
    /// objective places them on the log scale (so 32 is the middle of 1..=1024), and a grid
    /// refuses it at validation, before any preview.
    #[test]
    fn log_integers_preview_with_every_searcher() {
        let yaml = |searcher: &str| {
            format!(
                "name: p\nmetric: {{name: loss, goal: minimize}}\nsearcher: {searcher}\nmax_trials: 27\nparallel_trials: 3\n\
                 parameters:\n  batch: {{min: 1, max: 1024, distribution: log_int_uniform}}\n  w: {{min: 0, max: 1}}\n\
                 trial: {{command: [train, --batch, '${{params.batch}}']}}\n"
            )
        };
        for searcher in [
            "{name: random, seed: 1}",
            "{name: tpe, seed: 1, n_startup_trials: 5}",
            "{name: random, seed: 1}\nscheduler: {name: median}",
            "{name: asha, seed: 1, max_resource: 9}",
            "{name: asha, seed: 1, max_resource: 9, sampler: random}",
            "{name: hyperband, seed: 1, max_resource: 9}",
            "{name: pbt, seed: 1, perturbation_interval: 2, population_size: 6}",
        ] {
            let s = chorus_core::spec::parse(&yaml(searcher), &[]).unwrap();
            let p = simulate(build(&s), &s, 27, 9, 5);
            assert!(!p.trials.is_empty(), "{searcher}");
            for t in &p.trials {
                let b = t.params["batch"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("{searcher}: {:?}", t.params));
                assert!((1..=1024).contains(&b), "{searcher}: {b}");
                assert_eq!(s.command_for(&t.params)[2], b.to_string());
                assert!(t.value.is_finite());
            }
            if searcher.contains("pbt") {
                assert!(p.trials.iter().any(|t| t.exploits > 0), "pbt explored the batch size");
            }
        }
        let batch = Param::LogIntUniform { min: 1, max: 1024 };
        assert_eq!(unit(&batch, &32.into()), Some(0.5));
        assert_eq!(unit(&batch, &1.into()), Some(0.0));
        assert_eq!(unit(&batch, &1024.into()), Some(1.0));
        assert!(chorus_core::spec::parse(&yaml("{name: grid}"), &[]).is_err());
    }

    /// Learning curves that cross: configurations with a small `lr` (where the optimum is)
    /// fall five times slower than the rest, so they look worst for the first epochs and end
    /// best. Judged after one epoch of 50, successive halving stops exactly those and its
    /// sampler learns to avoid them; on its defaults (first rung at 5 % of max_resource)
    /// it finds them, and ends several times closer to the optimum than with a grace period of
    /// one epoch, and than random search at equal compute (40 full trainings). Deterministic.
    #[test]
    fn asha_defaults_hold_up_when_slow_starters_end_best() {
        let yaml = |searcher: &str, seed: u64| {
            chorus_core::spec::parse(
                &format!(
                    "name: p\nmetric: {{name: loss, goal: minimize}}\nsearcher: {{seed: {seed}, {searcher}}}\n\
                     max_trials: 100000\nparallel_trials: 1\nparameters:\n  lr: {{min: 0.0, max: 1.0}}\n  \
                     w: {{min: 0.0, max: 1.0}}\n  d: {{min: 0.0, max: 1.0}}\ntrial: {{command: [x]}}\n"
                ),
                &[],
            )
            .unwrap()
        };
        let curve = |p: &Params, epoch: u64| {
            let x = |k: &str| p[k].as_f64().unwrap();
            let last = (x("lr") - 0.1).powi(2) + (x("w") - 0.6).powi(2) + (x("d") - 0.4).powi(2);
            let tau = if x("lr") < 0.45 { 2.5 } else { 0.5 };
            last + (-(epoch as f64) / tau).exp()
        };
        let median_best = |searcher: &str| {
            let mut bests: Vec<f64> = (0..9)
                .map(|seed| {
                    let s = yaml(searcher, seed);
                    let mut best = f64::INFINITY;
                    let limits = Limits {
                        max_trials: 100_000,
                        steps: 50,
                        budget: 40 * 50,
                    };
                    run(build(&s), &s, limits, &mut |p, e| {
                        let v = curve(p, e);
                        best = best.min(v);
                        v
                    });
                    best
                })
                .collect();
            bests.sort_by(f64::total_cmp);
            bests[bests.len() / 2]
        };
        let defaults = median_best("name: asha, max_resource: 50");
        let first_epoch = median_best("name: asha, max_resource: 50, grace_period: 1");
        let random = median_best("name: random");
        assert!(defaults * 4.0 < random, "defaults {defaults}, random {random}");
        assert!(
            defaults * 4.0 < first_epoch,
            "defaults {defaults}, grace 1 {first_epoch}"
        );
    }

    #[test]
    fn asha_spends_less_and_keeps_the_best() {
        let s = spec("{name: asha, seed: 1, max_resource: 9}");
        let p = simulate(build(&s), &s, 27, 9, 5);
        assert!(p.steps < 27 * 9, "{} steps", p.steps);
        assert!(p.trials.iter().any(|t| t.stopped.is_some()));
        let best = p.trials.iter().find(|t| Some(t.trial) == p.best_trial).unwrap();
        assert_eq!(best.steps, 9, "the best trial ran to the end");
    }
}
