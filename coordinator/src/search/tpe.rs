//! Multivariate Tree-structured Parzen Estimator (Bergstra et al. 2011; the multivariate form of
//! Falkner et al. 2018, as Optuna's `multivariate=True`).
//!
//! Finished trials are split by loss into the good ones (the best `ceil(gamma * n)`, at most
//! 25, as Optuna does by default) and the rest. Each group is a mixture with one component per
//! trial plus a wide prior component; a component is a product over the parameters of a
//! truncated normal (floats, log floats in log space, integers widened by half a step) or a
//! smoothed point mass (categories). Candidates are drawn from the good mixture, one component
//! for all parameters at once, and the one with the highest `log l(x) - log g(x)` is suggested.
//! Bandwidths follow Scott's rule for a d-dimensional mixture, `(high - low) * n^(-1/(d+4))`.
//!
//! Trials stopped early arrive as completed with their best value so far, so they inform the
//! model as Optuna's pruned trials do; failed trials do not. A parameter missing from a trial's
//! values (a conditional one) is left out of that trial's kernel product. Pure: every draw comes
//! from a ChaCha stream keyed by the suggestion's index, and the state is plain data.

use super::{SearchAction, SearchEvent, Searcher, Suggestion, loss};
use chorus_core::TrialId;
use chorus_core::space::{Param, Params, Space};
use chorus_core::spec::Goal;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Settings of the TPE searcher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpeSettings {
    pub n_startup_trials: u32,
    pub n_ei_candidates: u32,
    pub gamma: f64,
}

/// Good trials never exceed this many, however many have finished (Optuna's default cap).
const MAX_GOOD: usize = 25;
/// Weight of the observed category in a categorical kernel; the rest is spread evenly.
const CATEGORY_WEIGHT: f64 = 0.75;

#[derive(Debug)]
pub struct TpeSearcher {
    space: Space,
    seed: u64,
    goal: Goal,
    settings: TpeSettings,
    /// The non-constant parameters, in space order, with their internal domains.
    dims: Vec<(String, Dim)>,
    state: TpeState,
    /// Finished trials' coordinates, derived from `state` (so not saved).
    coords: BTreeMap<TrialId, Vec<f64>>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct TpeState {
    suggested: u64,
    /// Parameters of every trial this searcher created.
    params: BTreeMap<TrialId, Params>,
    /// Final losses of finished trials.
    finished: BTreeMap<TrialId, f64>,
}

/// A parameter's domain as the estimator sees it.
#[derive(Debug, Clone, PartialEq)]
enum Dim {
    /// A real interval (log space for log floats).
    Real { lo: f64, hi: f64, param: Param },
    Choice { values: Vec<Value> },
}

impl Dim {
    fn of(p: &Param) -> Option<Dim> {
        let real = |lo: f64, hi: f64| Dim::Real {
            lo,
            hi,
            param: p.clone(),
        };
        match p {
            Param::Constant { .. } => None,
            Param::Categorical { values } => Some(Dim::Choice { values: values.clone() }),
            Param::Uniform { min, max } | Param::QUniform { min, max, .. } => Some(real(*min, *max)),
            Param::LogUniform { min, max } => Some(real(min.ln(), max.ln())),
            Param::IntUniform { min, max } => Some(real(*min as f64 - 0.5, *max as f64 + 0.5)),
        }
    }

    /// A value's internal coordinate, or `None` if it does not belong to the domain.
    fn encode(&self, v: &Value) -> Option<f64> {
        match self {
            Dim::Choice { values } => values.iter().position(|x| x == v).map(|i| i as f64),
            Dim::Real { param, .. } => {
                let x = v.as_f64()?;
                Some(match param {
                    Param::LogUniform { .. } => x.max(f64::MIN_POSITIVE).ln(),
                    _ => x,
                })
            }
        }
    }

    fn decode(&self, x: f64) -> Value {
        let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
        match self {
            Dim::Choice { values } => values[(x as usize).min(values.len() - 1)].clone(),
            Dim::Real { param, .. } => match param {
                Param::LogUniform { min, max } => float(x.exp().clamp(*min, *max)),
                Param::IntUniform { min, max } => Value::from((x.round() as i64).clamp(*min, *max)),
                Param::QUniform { min, max, q } => {
                    let lo = (min / q).ceil() * q;
                    let hi = (max / q).floor() * q;
                    float(((x / q).round() * q).clamp(lo.min(hi), hi.max(lo)))
                }
                _ => float(x),
            },
        }
    }
}

/// One group's mixture: per component and dimension, the kernel's centre (NaN where the trial
/// lacks the parameter), with per-dimension bandwidths shared by the group's components.
///
/// Evaluating `g` over thousands of components is the searcher's whole cost, so everything that
/// does not depend on the point is folded into one constant per component, and the centres lie
/// in one flat array a pass reads front to back.
struct Mixture {
    /// `centres[j][d]`; the last component is the prior.
    centres: Vec<Vec<f64>>,
    sigma: Vec<f64>,
    /// `centres` flattened, `dims` values per component (the prior excluded).
    flat: Vec<f64>,
    /// Per component (prior excluded): the sum of its log normalisers and of the categorical
    /// kernels' mass off the observed category.
    base: Vec<f64>,
    /// Per dimension: 1/sigma for real ones; for categorical ones, the log-odds of landing on the
    /// observed category.
    scale: Vec<f64>,
    real: Vec<bool>,
    /// The prior component's log density is the same everywhere but for real dimensions' quadratic.
    prior_base: f64,
}

impl Mixture {
    fn new(dims: &[(String, Dim)], points: &[Vec<f64>]) -> Mixture {
        let n = points.len().max(1) as f64;
        let d = dims.len() as f64;
        let sigma: Vec<f64> = dims
            .iter()
            .map(|(_, dim)| match dim {
                // Scott's rule, floored so a kernel never collapses onto a point.
                Dim::Real { lo, hi, .. } => ((hi - lo) * n.powf(-1.0 / (d + 4.0))).max((hi - lo) * 1e-3),
                Dim::Choice { .. } => 0.0,
            })
            .collect();
        let prior: Vec<f64> = dims
            .iter()
            .map(|(_, dim)| match dim {
                Dim::Real { lo, hi, .. } => 0.5 * (lo + hi),
                Dim::Choice { .. } => f64::NAN,
            })
            .collect();
        let mut centres: Vec<Vec<f64>> = points.to_vec();
        centres.push(prior);
        let last = centres.len() - 1;
        let log_norm = |c: f64, s: f64, lo: f64, hi: f64| {
            let mass = phi((hi - c) / s) - phi((lo - c) / s);
            s.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln() + mass.max(1e-300).ln()
        };
        let off = |n: usize| ((1.0 - CATEGORY_WEIGHT) / n as f64).ln();
        let mut flat = Vec::with_capacity(last * dims.len());
        let mut base = Vec::with_capacity(last);
        for c in &centres[..last] {
            let mut b = 0.0;
            for (k, (_, dim)) in dims.iter().enumerate() {
                flat.push(c[k]);
                b -= match dim {
                    Dim::Real { lo, hi, .. } if !c[k].is_nan() => log_norm(c[k], sigma[k], *lo, *hi),
                    // A trial without this parameter: its kernel there is the prior's.
                    Dim::Real { lo, hi, .. } => log_norm(0.5 * (lo + hi), hi - lo, *lo, *hi),
                    Dim::Choice { values } if !c[k].is_nan() => -off(values.len()),
                    Dim::Choice { values } => (values.len() as f64).ln(),
                };
            }
            base.push(b);
        }
        let scale = dims
            .iter()
            .enumerate()
            .map(|(k, (_, dim))| match dim {
                Dim::Real { .. } => 1.0 / sigma[k],
                Dim::Choice { values } => {
                    (CATEGORY_WEIGHT + (1.0 - CATEGORY_WEIGHT) / values.len() as f64).ln() - off(values.len())
                }
            })
            .collect();
        let real = dims.iter().map(|(_, d)| matches!(d, Dim::Real { .. })).collect();
        let prior_base = dims
            .iter()
            .map(|(_, dim)| match dim {
                Dim::Real { lo, hi, .. } => -log_norm(0.5 * (lo + hi), hi - lo, *lo, *hi),
                Dim::Choice { values } => -(values.len() as f64).ln(),
            })
            .sum();
        Mixture {
            centres,
            sigma,
            flat,
            base,
            scale,
            real,
            prior_base,
        }
    }

    fn prior(&self) -> usize {
        self.centres.len() - 1
    }

    /// `log` of the mixture's density at `x` (components weighted equally).
    fn log_density(&self, dims: &[(String, Dim)], x: &[f64]) -> f64 {
        let d = dims.len();
        // The prior: a wide normal over each real dimension, uniform over categories.
        let mut prior = self.prior_base;
        for (k, (_, dim)) in dims.iter().enumerate() {
            if let Dim::Real { lo, hi, .. } = dim {
                let z = (x[k] - 0.5 * (lo + hi)) / (hi - lo);
                prior -= 0.5 * z * z;
            }
        }
        let term = |j: usize| -> f64 {
            let c = &self.flat[j * d..(j + 1) * d];
            let mut sum = self.base[j];
            for k in 0..d {
                let ck = c[k];
                if ck.is_nan() {
                    // Missing parameter: the prior's kernel, already in `base` for categories.
                    if self.real[k] {
                        if let Dim::Real { lo, hi, .. } = &dims[k].1 {
                            let z = (x[k] - 0.5 * (lo + hi)) / (hi - lo);
                            sum -= 0.5 * z * z;
                        }
                    }
                } else if self.real[k] {
                    let z = (x[k] - ck) * self.scale[k];
                    sum -= 0.5 * z * z;
                } else if x[k] == ck {
                    sum += self.scale[k];
                }
            }
            sum
        };
        let n = self.base.len();
        let terms: Vec<f64> = (0..n).map(term).collect();
        let top = terms.iter().copied().fold(prior, f64::max);
        let mut total = (prior - top).exp();
        for t in terms {
            let t = t - top;
            // Terms this far below the largest change the sum by less than 1e-26.
            if t > -60.0 {
                total += t.exp();
            }
        }
        top + total.ln() - ((n + 1) as f64).ln()
    }

    /// A draw: one component for every dimension at once.
    fn sample(&self, dims: &[(String, Dim)], rng: &mut ChaCha8Rng) -> Vec<f64> {
        let j = rng.random_range(0..self.centres.len());
        let last = self.prior();
        dims.iter()
            .enumerate()
            .map(|(k, (_, dim))| match dim {
                Dim::Real { lo, hi, .. } => {
                    let (c, s) = if j == last || self.centres[j][k].is_nan() {
                        (0.5 * (lo + hi), hi - lo)
                    } else {
                        (self.centres[j][k], self.sigma[k])
                    };
                    // Rejection keeps the draw from the truncated normal; a kernel almost all
                    // outside the domain falls back to a uniform draw.
                    for _ in 0..64 {
                        let x = c + s * normal(rng);
                        if (*lo..=*hi).contains(&x) {
                            return x;
                        }
                    }
                    rng.random_range(*lo..=*hi)
                }
                Dim::Choice { values } => {
                    let c = self.centres[j][k];
                    if j != last && !c.is_nan() && rng.random::<f64>() < CATEGORY_WEIGHT {
                        c
                    } else {
                        rng.random_range(0..values.len()) as f64
                    }
                }
            })
            .collect()
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// The standard normal's distribution function, through erfc (Numerical Recipes' Chebyshev fit,
/// relative error below 1.2e-7: ample for kernel normalisers).
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * (-z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
        .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

impl TpeSearcher {
    pub fn new(space: Space, seed: u64, goal: Goal, settings: TpeSettings, saved: Option<&serde_json::Value>) -> Self {
        let dims = space
            .iter()
            .filter_map(|(k, p)| Dim::of(p).map(|d| (k.clone(), d)))
            .collect();
        let mut s = TpeSearcher {
            space,
            seed,
            goal,
            settings,
            dims,
            state: saved
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default(),
            coords: BTreeMap::new(),
        };
        s.coords = s
            .state
            .finished
            .keys()
            .filter_map(|t| s.state.params.get(t).map(|p| (*t, s.encode(p))))
            .collect();
        s
    }

    fn rng(&self, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x7470_6521);
        rng.set_stream(index);
        rng
    }

    fn random(&self, rng: &mut ChaCha8Rng) -> Params {
        self.space.iter().map(|(k, p)| (k.clone(), p.sample(rng))).collect()
    }

    /// A trial's coordinates (NaN where it lacks a parameter).
    fn encode(&self, p: &Params) -> Vec<f64> {
        self.dims
            .iter()
            .map(|(name, dim)| p.get(name).and_then(|v| dim.encode(v)).unwrap_or(f64::NAN))
            .collect()
    }

    fn model(&self, rng: &mut ChaCha8Rng) -> Params {
        let mut obs: Vec<(f64, TrialId)> = self.state.finished.iter().map(|(t, l)| (*l, *t)).collect();
        obs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let n_good = ((self.settings.gamma * obs.len() as f64).ceil() as usize).clamp(1, MAX_GOOD);
        let points = |range: &[(f64, TrialId)]| -> Vec<Vec<f64>> {
            range.iter().filter_map(|(_, t)| self.coords.get(t).cloned()).collect()
        };
        let good = Mixture::new(&self.dims, &points(&obs[..n_good.min(obs.len())]));
        let bad = Mixture::new(&self.dims, &points(&obs[n_good.min(obs.len())..]));
        let mut best: Option<(f64, Vec<f64>)> = None;
        for _ in 0..self.settings.n_ei_candidates.max(1) {
            let x = good.sample(&self.dims, rng);
            let score = good.log_density(&self.dims, &x) - bad.log_density(&self.dims, &x);
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, x));
            }
        }
        let x = best.expect("at least one candidate").1;
        let mut params: Params = self
            .space
            .iter()
            .filter_map(|(k, p)| match p {
                Param::Constant { value } => Some((k.clone(), value.clone())),
                _ => None,
            })
            .collect();
        for ((name, dim), v) in self.dims.iter().zip(x) {
            params.insert(name.clone(), dim.decode(v));
        }
        params
    }
}

impl Searcher for TpeSearcher {
    fn suggest(&mut self, trial: TrialId) -> Suggestion {
        let mut rng = self.rng(self.state.suggested);
        let startup = self.state.finished.len() < self.settings.n_startup_trials.max(1) as usize;
        let params = if startup || self.dims.is_empty() {
            self.random(&mut rng)
        } else {
            self.model(&mut rng)
        };
        self.state.suggested += 1;
        self.state.params.insert(trial, params.clone());
        Suggestion::Create(params)
    }

    fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction> {
        if let SearchEvent::Completed { trial, value: Some(v) } = event
            && let Some(p) = self.state.params.get(trial)
        {
            let c = self.encode(p);
            self.coords.insert(*trial, c);
            self.state.finished.insert(*trial, loss(self.goal, *v));
        }
        Vec::new()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("tpe state serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::RandomSearcher;

    fn space() -> Space {
        let mut s = Space::new();
        s.insert("x".into(), Param::Uniform { min: -5.0, max: 10.0 });
        s.insert("lr".into(), Param::LogUniform { min: 1e-5, max: 1.0 });
        s.insert("k".into(), Param::IntUniform { min: 1, max: 9 });
        s.insert("opt".into(), Param::Categorical {
            values: vec!["sgd".into(), "adam".into(), "adamw".into()],
        });
        s.insert("q".into(), Param::QUniform { min: 0.0, max: 1.0, q: 0.25 });
        s.insert("fixed".into(), Param::Constant { value: "yes".into() });
        s
    }

    fn settings() -> TpeSettings {
        TpeSettings {
            n_startup_trials: 10,
            n_ei_candidates: 24,
            gamma: 0.25,
        }
    }

    /// A bowl with its minimum 0 at x = 2, lr = 1e-3, k = 7, opt = adam, q = 0.75.
    fn f(p: &Params) -> f64 {
        let x = p["x"].as_f64().unwrap();
        let lr = p["lr"].as_f64().unwrap().log10();
        let k = p["k"].as_f64().unwrap();
        let opt = if p["opt"] == "adam" { 0.0 } else { 1.0 };
        let q = p["q"].as_f64().unwrap();
        ((x - 2.0) / 15.0).powi(2) + ((lr + 3.0) / 5.0).powi(2) + ((k - 7.0) / 8.0).powi(2) + 0.3 * opt + (q - 0.75).powi(2)
    }

    fn run(s: &mut dyn Searcher, trials: u64, sign: f64) -> f64 {
        let mut best = f64::INFINITY;
        for t in 1..=trials {
            let Suggestion::Create(p) = s.suggest(TrialId(t)) else {
                panic!("tpe always suggests")
            };
            let v = f(&p);
            best = best.min(v);
            s.observe(&SearchEvent::Completed {
                trial: TrialId(t),
                value: Some(sign * v),
            });
        }
        best
    }

    #[test]
    fn values_respect_their_domains() {
        let mut s = TpeSearcher::new(space(), 1, Goal::Minimize, settings(), None);
        run(&mut s, 40, 1.0);
        for p in s.state.params.values() {
            let x = p["x"].as_f64().unwrap();
            assert!((-5.0..=10.0).contains(&x));
            let lr = p["lr"].as_f64().unwrap();
            assert!((1e-5..=1.0).contains(&lr));
            let k = p["k"].as_i64().expect("integers stay integers");
            assert!((1..=9).contains(&k));
            assert!(["sgd", "adam", "adamw"].contains(&p["opt"].as_str().unwrap()));
            let q = p["q"].as_f64().unwrap();
            assert!((q / 0.25 - (q / 0.25).round()).abs() < 1e-9 && (0.0..=1.0).contains(&q), "{q}");
            assert_eq!(p["fixed"], "yes");
        }
    }

    #[test]
    fn is_deterministic_and_restores() {
        let mut a = TpeSearcher::new(space(), 4, Goal::Minimize, settings(), None);
        let mut b = TpeSearcher::new(space(), 4, Goal::Minimize, settings(), None);
        assert_eq!(run(&mut a, 25, 1.0), run(&mut b, 25, 1.0));
        let mut r = TpeSearcher::new(space(), 4, Goal::Minimize, settings(), Some(&a.save()));
        for t in 26..30 {
            assert_eq!(a.suggest(TrialId(t)), r.suggest(TrialId(t)));
        }
    }

    /// Over 10 seeds of 60 trials each, TPE's median best value is below random search's.
    #[test]
    fn beats_random_search() {
        let (mut tpe, mut random) = (Vec::new(), Vec::new());
        for seed in 0..10 {
            let mut t = TpeSearcher::new(space(), seed, Goal::Minimize, settings(), None);
            tpe.push(run(&mut t, 60, 1.0));
            let mut r = RandomSearcher::new(space(), seed, None);
            random.push(run(&mut r, 60, 1.0));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (t, r) = (median(&mut tpe), median(&mut random));
        assert!(t < r, "median best: tpe {t}, random {r}");
    }

    #[test]
    fn maximising_prefers_high_values() {
        // Maximise -f: the same search as minimising f.
        let mut max = TpeSearcher::new(space(), 2, Goal::Maximize, settings(), None);
        let mut min = TpeSearcher::new(space(), 2, Goal::Minimize, settings(), None);
        assert_eq!(run(&mut max, 30, -1.0), run(&mut min, 30, 1.0));
    }

    #[test]
    fn erfc_is_accurate() {
        for (x, want) in [(0.0, 1.0), (1.0, 0.157_299_207), (-1.0, 1.842_700_793), (2.5, 0.000_406_952)] {
            assert!((erfc(x) - want).abs() < 1e-7, "erfc({x}) = {}", erfc(x));
        }
    }
}
