//! Multivariate Tree-structured Parzen Estimator (Bergstra et al. 2011; the multivariate form of
//! Falkner et al. 2018, as Optuna's `multivariate=True`).
//!
//! Finished trials are split by loss into the good ones (the best `ceil(gamma * n)`, at most
//! 25, as Optuna does by default) and the rest. Each group is a mixture with one component per
//! trial plus a wide prior component; a component is a product over the parameters of a
//! truncated normal (floats, log floats in log space, integers widened by half a step, log
//! integers both: in log space over `[ln(min - 0.5), ln(max + 0.5)]`, rounded back) or a
//! smoothed point mass (categories). Candidates are drawn from the good mixture, one component
//! for all parameters at once, and the one with the highest `log l(x) - log g(x)` is suggested.
//!
//! Kernel widths are Optuna's multivariate ones: Scott's rule scaled to a fifth of the range,
//! `0.2 * (high - low) * n^(-1/(d+4))`, never narrower than `(high - low) / min(100, n + 1)`
//! (the "magic clip") nor wider than the range; the prior is as wide as the range. Without the
//! fifth a group of a few good trials is nearly as wide as the prior and the search barely
//! leaves random sampling. A categorical kernel is Optuna's too: one count on its own category
//! plus a prior weight of `1 / (n + 1)` on every category, so it sharpens as the group grows.
//!
//! A trial counts once it has finished: with the better of its completed value and its best
//! report (trials stopped early arrive as completed with their best value so far, which is how
//! Optuna uses pruned trials). Running trials do not count: a partial curve ranked against
//! finished ones would read as a bad result and steer the search away from the very region it
//! is exploring. Failed trials are forgotten. A parameter missing from a trial's values (a
//! conditional one) is left out of that trial's kernel product. A candidate keeps only the
//! parameters its own values make active (decoded, then pruned parents first) and is scored by
//! the mixtures' marginal densities over those, so a branch with fewer parameters is neither
//! favoured nor penalised for the dimensions it lacks. Pure: every draw comes from a ChaCha
//! stream keyed by the suggestion's index, and the state is plain data.

use super::{SearchAction, SearchEvent, Searcher, Suggestion, loss, read_state};
use crate::Result;
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
/// Scott's rule scaled down, as Optuna's multivariate estimator does (`SIGMA0_MAGNITUDE`).
const SIGMA0: f64 = 0.2;

#[derive(Debug)]
pub struct TpeSearcher {
    space: Space,
    seed: u64,
    goal: Goal,
    settings: TpeSettings,
    /// The non-constant parameters, in space order, with their internal domains.
    dims: Vec<(String, Dim)>,
    state: TpeState,
    /// The goals of several objectives (empty or one: a single objective).
    goals: Vec<Goal>,
    /// Finished trials' coordinates, derived from `state` (so not saved).
    coords: std::collections::HashMap<TrialId, Vec<f64>>,
    /// Finished trials by loss, best first, kept sorted as they arrive (derived).
    ranked: std::collections::BTreeSet<(u64, TrialId)>,
    /// Component constants of the good and the bad mixture, derived (so not saved).
    cache: std::cell::RefCell<(BaseCache, BaseCache)>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct TpeState {
    suggested: u64,
    /// Parameters of every trial this searcher created.
    params: BTreeMap<TrialId, Params>,
    /// Final losses of finished trials.
    finished: BTreeMap<TrialId, f64>,
    /// Best loss reported so far by each trial still running.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    reported: BTreeMap<TrialId, f64>,
    /// With several objectives: every objective's loss of each finished trial that reported all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    multi: BTreeMap<TrialId, Vec<f64>>,
}

/// A parameter's domain as the estimator sees it.
#[derive(Debug, Clone, PartialEq)]
enum Dim {
    /// A real interval (log space for log floats and log integers).
    Real {
        lo: f64,
        hi: f64,
        param: Param,
    },
    Choice {
        values: Vec<Value>,
    },
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
            // In log space, widened by half a step at each end as the random draw is, so the
            // prior is the random sampler's own distribution.
            Param::LogIntUniform { min, max } => {
                let (lo, hi) = chorus_core::space::log_int_bounds(*min, *max);
                Some(real(lo, hi))
            }
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
                    // Validation keeps min >= 1; a stray value below lands at the low end.
                    Param::LogIntUniform { .. } => x.max(0.5).ln(),
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
                Param::LogIntUniform { min, max } => Value::from(chorus_core::space::log_int_draw(x, *min, *max)),
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

/// A group of `n` trials' size rounded down to a power of 1.05, so kernel widths (and every
/// normaliser cached under them) change only when the group has grown by 5 %, a change of under
/// 0.5 % in a width. Returns the exponent, which keys the cache, and the rounded size.
fn size_bucket(n: usize) -> (i32, f64) {
    let e = ((n.max(1) as f64).ln() / 1.05f64.ln()).floor() as i32;
    (e, 1.05f64.powi(e).max(1.0))
}

/// The kernel width of a group of `n` trials in `d` dimensions over `[lo, hi]`.
fn bandwidth(lo: f64, hi: f64, n: f64, d: usize) -> f64 {
    let scott = SIGMA0 * n.powf(-1.0 / (d as f64 + 4.0));
    let clip = 1.0 / (n + 1.0).min(100.0);
    (hi - lo) * scott.clamp(clip, 1.0)
}

/// The chance that a categorical kernel of a group of `n` trials keeps its own category (it
/// draws uniformly otherwise): Optuna's kernel, `1 + p` on its category and `p = 1 / (n + 1)`
/// on each of the `k`, normalised, is exactly this mixture.
fn category_weight(k: usize, n: f64) -> f64 {
    (n + 1.0) / (n + 1.0 + k as f64)
}

/// `ln` of a truncated normal's normaliser on `[lo, hi]`.
fn log_norm(c: f64, s: f64, lo: f64, hi: f64) -> f64 {
    let mass = phi((hi - c) / s) - phi((lo - c) / s);
    s.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln() + mass.max(1e-300).ln()
}

/// One group's mixture, one component per trial plus the prior, equally weighted.
///
/// Evaluating `g` over thousands of components is the searcher's whole cost, so it is laid out
/// column by column (one array per dimension, one slot per component) for loops the compiler
/// vectorises, with everything that does not depend on the point folded into one constant per
/// component. A trial lacking a parameter has the prior's kernel in that dimension.
struct Mixture {
    /// `centre[k][j]` for real dimensions (the prior's centre where the trial lacks the
    /// parameter); the category index (NaN when missing) for categorical ones.
    centre: Vec<Vec<f64>>,
    /// Per dimension, `1 / sigma` of the trials' kernels.
    inv_sigma: Vec<f64>,
    /// `(component, dimension)` pairs of real parameters a trial lacks: their kernel is the
    /// prior's, wider than the one the column loop applies, which is corrected afterwards.
    wide: Vec<(usize, usize)>,
    /// Per categorical dimension: what landing on the component's category adds.
    bonus: Vec<f64>,
    /// Per component: the sum of its log normalisers and of its categorical kernels' mass off
    /// the observed category.
    base: Vec<f64>,
    /// `base` split by dimension (`part[k][j]`), to take a dimension out of the product when a
    /// candidate lacks it; empty unless built with `marginals`.
    part: Vec<Vec<f64>>,
    /// The components' own centres, for drawing.
    points: Vec<Vec<f64>>,
    sigma: Vec<f64>,
    /// Per categorical dimension, [`category_weight`].
    keep: Vec<f64>,
}

/// Per trial and group size: the part of a component's `base` that depends only on the trial's
/// centres and the kernel widths, which change only at the boundaries of [`size_bucket`]; one
/// term per dimension.
#[derive(Debug, Default)]
struct BaseCache {
    key: Option<i32>,
    /// The sum.
    by_trial: std::collections::HashMap<TrialId, f64>,
    /// Its terms by dimension, kept only for a conditional space (apart from the sums, so the
    /// common case's lookups stay small).
    parts: std::collections::HashMap<TrialId, Vec<f64>>,
}

impl Mixture {
    /// The mixture of `members`; `drawn_from` keeps their centres for [`Mixture::sample`] (only
    /// the good mixture is drawn from); `marginals` keeps what [`Mixture::log_density`] needs to
    /// score points that lack some dimensions (only a conditional space has them).
    fn new(
        dims: &[(String, Dim)],
        members: &[(TrialId, &Vec<f64>)],
        cache: &mut BaseCache,
        drawn_from: bool,
        marginals: bool,
    ) -> Mixture {
        let n = members.len() + 1;
        let d = dims.len();
        let (bucket, size) = size_bucket(members.len());
        let sigma: Vec<f64> = dims
            .iter()
            .map(|(_, dim)| match dim {
                Dim::Real { lo, hi, .. } => bandwidth(*lo, *hi, size, d),
                Dim::Choice { .. } => 0.0,
            })
            .collect();
        let keep: Vec<f64> = dims
            .iter()
            .map(|(_, dim)| match dim {
                Dim::Real { .. } => 0.0,
                Dim::Choice { values } => category_weight(values.len(), size),
            })
            .collect();
        if cache.key != Some(bucket) {
            cache.key = Some(bucket);
            cache.by_trial.clear();
            cache.parts.clear();
        }
        // Log mass a categorical kernel of dimension `k` (of `n` categories) puts on each other one.
        let off = |k: usize, n: usize| ((1.0 - keep[k]) / n as f64).ln();
        let prior_kernel = |k: usize| match &dims[k].1 {
            Dim::Real { lo, hi, .. } => (0.5 * (lo + hi), 1.0 / (hi - lo)),
            Dim::Choice { .. } => (f64::NAN, 0.0),
        };
        let mut centre = vec![Vec::with_capacity(n); d];
        let mut wide = Vec::new();
        let inv_sigma: Vec<f64> = sigma.iter().map(|s| if *s > 0.0 { 1.0 / s } else { 0.0 }).collect();
        let mut base = Vec::with_capacity(n);
        let mut part = if marginals {
            vec![Vec::with_capacity(n); d]
        } else {
            Vec::new()
        };
        let component_parts = |c: &[f64]| -> (f64, Vec<f64>) {
            let terms = dims.iter().enumerate().map(|(k, (_, dim))| -match dim {
                Dim::Real { lo, hi, .. } if !c[k].is_nan() => log_norm(c[k], sigma[k], *lo, *hi),
                Dim::Real { lo, hi, .. } => log_norm(0.5 * (lo + hi), hi - lo, *lo, *hi),
                Dim::Choice { values } if !c[k].is_nan() => -off(k, values.len()),
                Dim::Choice { values } => (values.len() as f64).ln(),
            });
            if marginals {
                let parts: Vec<f64> = terms.collect();
                (parts.iter().fold(0.0, |b, t| b + t), parts)
            } else {
                // Without conditions no point lacks a dimension: the sum alone, no allocation.
                (terms.fold(0.0, |b, t| b + t), Vec::new())
            }
        };
        for (j, (t, c)) in members.iter().enumerate() {
            if marginals && !cache.parts.contains_key(t) {
                let (sum, parts) = component_parts(c);
                cache.by_trial.insert(*t, sum);
                cache.parts.insert(*t, parts);
            }
            base.push(*cache.by_trial.entry(*t).or_insert_with(|| component_parts(c).0));
            if marginals {
                for (column, x) in part.iter_mut().zip(&cache.parts[t]) {
                    column.push(*x);
                }
            }
            for k in 0..d {
                let real = matches!(dims[k].1, Dim::Real { .. });
                if c[k].is_nan() && real {
                    wide.push((j, k));
                    centre[k].push(prior_kernel(k).0);
                } else {
                    centre[k].push(c[k]);
                }
            }
        }
        // The prior component last.
        let prior: Vec<f64> = (0..d).map(|k| prior_kernel(k).0).collect();
        let (sum, parts) = component_parts(&vec![f64::NAN; d]);
        base.push(sum);
        for (column, x) in part.iter_mut().zip(parts) {
            column.push(x);
        }
        for (k, pc) in prior.iter().enumerate() {
            if matches!(dims[k].1, Dim::Real { .. }) {
                wide.push((members.len(), k));
            }
            centre[k].push(*pc);
        }
        let bonus = dims
            .iter()
            .enumerate()
            .map(|(k, (_, dim))| match dim {
                Dim::Real { .. } => 0.0,
                Dim::Choice { values } => (keep[k] + (1.0 - keep[k]) / values.len() as f64).ln() - off(k, values.len()),
            })
            .collect();
        let mut points: Vec<Vec<f64>> = if drawn_from {
            members.iter().map(|(_, c)| (*c).clone()).collect()
        } else {
            Vec::new()
        };
        points.push(prior);
        Mixture {
            centre,
            inv_sigma,
            wide,
            bonus,
            base,
            part,
            points,
            sigma,
            keep,
        }
    }

    fn prior(&self) -> usize {
        self.points.len() - 1
    }

    /// `log` of the mixture's density at `x`. A NaN coordinate (a parameter the candidate's
    /// conditions switch off) is left out: each kernel's marginal over the other dimensions.
    fn log_density(&self, dims: &[(String, Dim)], x: &[f64]) -> f64 {
        let mut acc = self.base.clone();
        for (k, (_, dim)) in dims.iter().enumerate() {
            let (c, xk) = (&self.centre[k], x[k]);
            if xk.is_nan() {
                debug_assert!(!self.part.is_empty(), "a point lacking a dimension needs marginals");
                for (a, t) in acc.iter_mut().zip(&self.part[k]) {
                    *a -= t;
                }
                continue;
            }
            match dim {
                Dim::Real { .. } => {
                    let s = self.inv_sigma[k];
                    for (a, c) in acc.iter_mut().zip(c) {
                        let z = (xk - c) * s;
                        *a -= 0.5 * z * z;
                    }
                }
                Dim::Choice { .. } => {
                    let bonus = self.bonus[k];
                    for (a, c) in acc.iter_mut().zip(c) {
                        *a += if *c == xk { bonus } else { 0.0 };
                    }
                }
            }
        }
        for &(j, k) in &self.wide {
            if let Dim::Real { lo, hi, .. } = &dims[k].1
                && !x[k].is_nan()
            {
                let c = self.centre[k][j];
                let narrow = (x[k] - c) * self.inv_sigma[k];
                let wide = (x[k] - c) / (hi - lo);
                acc[j] += 0.5 * (narrow * narrow - wide * wide);
            }
        }
        let top = acc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = acc.iter().map(|a| fast_exp(a - top)).sum();
        top + total.ln() - (acc.len() as f64).ln()
    }

    /// A draw: one component for every dimension at once.
    fn sample(&self, dims: &[(String, Dim)], rng: &mut ChaCha8Rng) -> Vec<f64> {
        let j = rng.random_range(0..self.points.len());
        let last = self.prior();
        dims.iter()
            .enumerate()
            .map(|(k, (_, dim))| match dim {
                Dim::Real { lo, hi, .. } => {
                    let (c, s) = if j == last || self.points[j][k].is_nan() {
                        (0.5 * (lo + hi), hi - lo)
                    } else {
                        (self.points[j][k], self.sigma[k])
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
                    let c = self.points[j][k];
                    if j != last && !c.is_nan() && rng.random::<f64>() < self.keep[k] {
                        c
                    } else {
                        rng.random_range(0..values.len()) as f64
                    }
                }
            })
            .collect()
    }
}

/// `e^x` for `x <= 0`, to about 1e-7 relative, in straight-line code the compiler vectorises
/// (the mixture's sum needs no more precision than that; below -700 it is 0).
fn fast_exp(x: f64) -> f64 {
    let x = x.max(-700.0);
    // e^x = 2^i * e^r with i = round(x / ln 2) and |r| <= ln(2) / 2.
    let i = (x * std::f64::consts::LOG2_E).round();
    let r = x - i * std::f64::consts::LN_2;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0 + r / 40320.0)))))));
    f64::from_bits(((i as i64 + 1023) as u64) << 52) * p
}

/// A key whose integer order is `f64::total_cmp`'s.
fn order_key(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 { !b } else { b | (1 << 63) }
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
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

impl TpeSearcher {
    pub fn new(
        space: Space,
        seed: u64,
        goal: Goal,
        settings: TpeSettings,
        saved: Option<&serde_json::Value>,
    ) -> Result<Self> {
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
            state: read_state("tpe", saved)?,
            coords: Default::default(),
            goals: Vec::new(),
            ranked: Default::default(),
            cache: Default::default(),
        };
        s.ranked = s.state.finished.iter().map(|(t, l)| (order_key(*l), *t)).collect();
        s.coords = s
            .state
            .finished
            .keys()
            .filter_map(|t| s.state.params.get(t).map(|p| (*t, s.encode(p))))
            .collect();
        Ok(s)
    }

    /// A model of the given results alone, with no history of its own: successive halving's
    /// sampler fits one to the results recorded at a rung (as BOHB does) for each draw.
    pub fn fitted(
        space: Space,
        seed: u64,
        goal: Goal,
        settings: TpeSettings,
        results: impl IntoIterator<Item = (TrialId, Params, f64)>,
    ) -> Self {
        let mut s = Self::new(space, seed, goal, settings, None).expect("a new searcher reads no saved state");
        for (t, p, l) in results {
            s.coords.insert(t, s.encode(&p));
            s.ranked.insert((order_key(l), t));
            s.state.finished.insert(t, l);
            s.state.params.insert(t, p);
        }
        s
    }

    /// The `index`-th draw from the model (random while it has too few results), without
    /// recording it.
    pub fn draw(&self, index: u64) -> Params {
        let mut rng = self.rng(index);
        if self.state.finished.len() < self.settings.n_startup_trials.max(1) as usize || self.dims.is_empty() {
            self.random(&mut rng)
        } else {
            self.model(&mut rng)
        }
    }

    /// Optimises several objectives at once (MOTPE): the good trials are the first
    /// non-dominated fronts, the last one cut by crowding distance.
    pub fn with_objectives(mut self, goals: Vec<Goal>) -> Self {
        self.goals = goals;
        self
    }

    /// With several objectives: the `n` best trials by non-dominated sorting, filling whole
    /// fronts first and taking the most isolated (by crowding distance) of the front that does
    /// not fit whole, so the good set spreads along the Pareto front.
    fn good_by_fronts(&self, n: usize) -> Vec<TrialId> {
        let mut left: Vec<(TrialId, &Vec<f64>)> = self.state.multi.iter().map(|(t, v)| (*t, v)).collect();
        let dominates =
            |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x <= y) && a.iter().zip(b).any(|(x, y)| x < y);
        let mut good = Vec::new();
        while good.len() < n && !left.is_empty() {
            let (front, rest): (Vec<_>, Vec<_>) = left
                .iter()
                .partition(|(_, p)| !left.iter().any(|(_, q)| dominates(q, p)));
            if good.len() + front.len() <= n {
                good.extend(front.iter().map(|(t, _)| *t));
            } else {
                let mut crowd = vec![0.0f64; front.len()];
                for m in 0..self.goals.len() {
                    let mut order: Vec<usize> = (0..front.len()).collect();
                    order.sort_by(|&a, &b| {
                        front[a].1[m]
                            .total_cmp(&front[b].1[m])
                            .then(front[a].0.cmp(&front[b].0))
                    });
                    let span = (front[order[order.len() - 1]].1[m] - front[order[0]].1[m]).max(f64::MIN_POSITIVE);
                    crowd[order[0]] = f64::INFINITY;
                    crowd[order[order.len() - 1]] = f64::INFINITY;
                    for w in order.windows(3) {
                        crowd[w[1]] += (front[w[2]].1[m] - front[w[0]].1[m]) / span;
                    }
                }
                let mut idx: Vec<usize> = (0..front.len()).collect();
                idx.sort_by(|&a, &b| crowd[b].total_cmp(&crowd[a]).then(front[a].0.cmp(&front[b].0)));
                good.extend(idx.into_iter().take(n - good.len()).map(|i| front[i].0));
            }
            left = rest;
        }
        good
    }

    fn rng(&self, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x7470_6521);
        rng.set_stream(index);
        rng
    }

    fn random(&self, rng: &mut ChaCha8Rng) -> Params {
        self.space.sample(rng)
    }

    /// A finished trial, at `coords` with `loss`, joins the observations (replacing an earlier
    /// loss of the same trial).
    fn record_finished(&mut self, trial: TrialId, coords: Vec<f64>, loss: f64) {
        self.coords.insert(trial, coords);
        if let Some(old) = self.state.finished.insert(trial, loss) {
            self.ranked.remove(&(order_key(old), trial));
        }
        self.ranked.insert((order_key(loss), trial));
    }

    /// A trial's coordinates (NaN where it lacks a parameter).
    fn encode(&self, p: &Params) -> Vec<f64> {
        self.dims
            .iter()
            .map(|(name, dim)| p.get(name).and_then(|v| dim.encode(v)).unwrap_or(f64::NAN))
            .collect()
    }

    fn model(&self, rng: &mut ChaCha8Rng) -> Params {
        let mut obs: Vec<(u64, TrialId)> = self.ranked.iter().copied().collect();
        let mut n_good = ((self.settings.gamma * obs.len() as f64).ceil() as usize).clamp(1, MAX_GOOD);
        if self.goals.len() > 1 && !self.state.multi.is_empty() {
            // Good trials first, by Pareto rank; the order within each side does not matter.
            let n = ((self.settings.gamma * self.state.multi.len() as f64).ceil() as usize).clamp(1, MAX_GOOD);
            let good: std::collections::BTreeSet<TrialId> = self.good_by_fronts(n).into_iter().collect();
            obs.sort_by_key(|(_, t)| !good.contains(t));
            n_good = good.len();
        }
        let members = |range: &[(u64, TrialId)]| -> Vec<(TrialId, &Vec<f64>)> {
            range
                .iter()
                .filter_map(|(_, t)| self.coords.get(t).map(|c| (*t, c)))
                .collect()
        };
        let split = n_good.min(obs.len());
        let mut cache = self.cache.borrow_mut();
        let (good_cache, bad_cache) = &mut *cache;
        let conditional = self.space.is_conditional();
        let good = Mixture::new(&self.dims, &members(&obs[..split]), good_cache, true, conditional);
        let bad = Mixture::new(&self.dims, &members(&obs[split..]), bad_cache, false, conditional);
        let mut best: Option<(f64, Vec<f64>)> = None;
        for _ in 0..self.settings.n_ei_candidates.max(1) {
            let mut x = good.sample(&self.dims, rng);
            if conditional {
                // Score the candidate over the parameters its own values make active.
                let active = self.decode(&x);
                for ((name, _), v) in self.dims.iter().zip(x.iter_mut()) {
                    if !active.contains_key(name) {
                        *v = f64::NAN;
                    }
                }
            }
            let score = good.log_density(&self.dims, &x) - bad.log_density(&self.dims, &x);
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, x));
            }
        }
        self.decode(&best.expect("at least one candidate").1)
    }

    /// The parameters at internal coordinates `x` (NaN: left out), pruned to those their own
    /// values make active, parents first.
    fn decode(&self, x: &[f64]) -> Params {
        let mut params: Params = self
            .space
            .iter()
            .filter_map(|(k, p)| match p {
                Param::Constant { value } => Some((k.clone(), value.clone())),
                _ => None,
            })
            .collect();
        for ((name, dim), v) in self.dims.iter().zip(x) {
            if !v.is_nan() {
                params.insert(name.clone(), dim.decode(*v));
            }
        }
        self.space.retain_active(&mut params);
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
        if let SearchEvent::Completed { trial, objectives, .. } = event
            && self.goals.len() > 1
            && objectives.len() == self.goals.len()
            && self.state.params.contains_key(trial)
        {
            let losses = objectives.iter().zip(&self.goals).map(|(v, g)| loss(*g, *v)).collect();
            self.state.multi.insert(*trial, losses);
        }
        match event {
            SearchEvent::Reported { trial, value, .. } => {
                if self.state.params.contains_key(trial) && !self.state.finished.contains_key(trial) {
                    let l = loss(self.goal, *value);
                    let best = self.state.reported.entry(*trial).or_insert(l);
                    *best = best.min(l);
                }
            }
            SearchEvent::Completed { trial, value, .. } => {
                let reported = self.state.reported.remove(trial);
                let l = match (value.map(|v| loss(self.goal, v)), reported) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let (Some(l), Some(p)) = (l.filter(|l| !l.is_nan()), self.state.params.get(trial)) {
                    let c = self.encode(p);
                    self.record_finished(*trial, c, l);
                }
            }
            SearchEvent::Failed { trial } => {
                // Its parameters go too: a failure says nothing about its loss, and a late
                // event for it must not bring it back.
                self.state.reported.remove(trial);
                if !self.state.finished.contains_key(trial) {
                    self.state.params.remove(trial);
                }
            }
        }
        Vec::new()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("tpe state serialises")
    }

    /// The earlier trials become finished observations of this model: with enough of them it
    /// skips its random start-up draws. Their ids never meet this experiment's own trials.
    fn warm_start(&mut self, prior: &[crate::Prior]) -> bool {
        for p in prior.iter().filter(|p| !p.value.is_nan()) {
            let c = self.encode(&p.params);
            self.record_finished(p.trial, c, loss(self.goal, p.value));
            self.state.params.insert(p.trial, p.params.clone());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RandomSearcher;

    fn space() -> Space {
        let mut s = Space::new();
        s.insert("x".into(), Param::Uniform { min: -5.0, max: 10.0 });
        s.insert("lr".into(), Param::LogUniform { min: 1e-5, max: 1.0 });
        s.insert("k".into(), Param::IntUniform { min: 1, max: 9 });
        s.insert(
            "opt".into(),
            Param::Categorical {
                values: vec!["sgd".into(), "adam".into(), "adamw".into()],
            },
        );
        s.insert(
            "q".into(),
            Param::QUniform {
                min: 0.0,
                max: 1.0,
                q: 0.25,
            },
        );
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
        ((x - 2.0) / 15.0).powi(2)
            + ((lr + 3.0) / 5.0).powi(2)
            + ((k - 7.0) / 8.0).powi(2)
            + 0.3 * opt
            + (q - 0.75).powi(2)
    }

    fn run(s: &mut dyn Searcher, trials: u64, sign: f64) -> f64 {
        run_from(s, 1, trials, sign).0
    }

    /// Trials `first..first + count`, one at a time, each reporting twice (a worse value, then
    /// its own) before it completes. Returns the best value and every suggestion.
    fn run_from(s: &mut dyn Searcher, first: u64, count: u64, sign: f64) -> (f64, Vec<Suggestion>) {
        let mut best = f64::INFINITY;
        let mut seen = Vec::new();
        for t in first..first + count {
            let suggestion = s.suggest(TrialId(t));
            let Suggestion::Create(p) = &suggestion else {
                panic!("tpe always suggests")
            };
            let v = f(p);
            best = best.min(v);
            for (step, value) in [(1, v + 1.0), (2, v)] {
                s.observe(&SearchEvent::Reported {
                    trial: TrialId(t),
                    step: Some(step),
                    epoch: None,
                    value: sign * value,
                });
            }
            s.observe(&SearchEvent::Completed {
                trial: TrialId(t),
                value: Some(sign * v),
                objectives: Vec::new(),
            });
            seen.push(suggestion);
        }
        (best, seen)
    }

    fn suggest(s: &mut TpeSearcher, t: u64) -> Params {
        match s.suggest(TrialId(t)) {
            Suggestion::Create(p) => p,
            other => panic!("tpe always suggests, got {other:?}"),
        }
    }

    /// A warm start seeds the model with an earlier sweep's results: over many seeds, its
    /// first draws land near the old best far more often than a cold start's random start-up
    /// draws do. Deterministic (fixed seeds); the bound leaves a wide margin.
    #[test]
    fn a_warm_start_proposes_near_the_old_best_more_often_than_cold() {
        let mut line = Space::new();
        line.insert("x".into(), Param::Uniform { min: -5.0, max: 10.0 });
        let value = |p: &Params| (p["x"].as_f64().unwrap() - 2.0).powi(2);
        let (mut warm_near, mut cold_near) = (0, 0);
        for seed in 0..8u64 {
            // The earlier sweep: 30 random trials with their results; its best lies near x = 2.
            let old = RandomSearcher::new(line.clone(), 1000 + seed, None).unwrap();
            let prior: Vec<crate::Prior> = (0..30)
                .map(|i| {
                    let params = old.draw(i);
                    crate::Prior {
                        trial: TrialId(i + 1),
                        value: value(&params),
                        params,
                    }
                })
                .collect();
            let best = prior.iter().min_by(|a, b| a.value.total_cmp(&b.value)).unwrap().params["x"]
                .as_f64()
                .unwrap();
            let near = |p: &Params| (p["x"].as_f64().unwrap() - best).abs() < 1.5;
            let mut warm = TpeSearcher::new(line.clone(), seed, Goal::Minimize, settings(), None).unwrap();
            assert!(warm.warm_start(&prior));
            // What is saved includes the warm start.
            let saved = warm.save();
            let mut warm = TpeSearcher::new(line.clone(), seed, Goal::Minimize, settings(), Some(&saved)).unwrap();
            let mut cold = TpeSearcher::new(line.clone(), seed, Goal::Minimize, settings(), None).unwrap();
            for t in 0..10 {
                warm_near += near(&suggest(&mut warm, 100 + t)) as u32;
                cold_near += near(&suggest(&mut cold, 100 + t)) as u32;
            }
        }
        // Of 80 draws, a uniform x lands within 1.5 of a point a fifth of the time (about 16).
        assert!(
            warm_near >= cold_near * 2 && warm_near >= 40,
            "warm {warm_near} vs cold {cold_near} of 80 draws near the old best"
        );
    }

    #[test]
    fn values_respect_their_domains() {
        for seed in 0..5 {
            let mut s = TpeSearcher::new(space(), seed, Goal::Minimize, settings(), None).unwrap();
            run(&mut s, 60, 1.0);
            assert_eq!(s.state.params.len(), 60);
            for p in s.state.params.values() {
                assert!(p["x"].is_f64() && p["lr"].is_f64() && p["q"].is_f64(), "{p:?}");
                let x = p["x"].as_f64().unwrap();
                assert!((-5.0..=10.0).contains(&x));
                let lr = p["lr"].as_f64().unwrap();
                assert!((1e-5..=1.0).contains(&lr));
                let k = p["k"].as_i64().expect("integers stay integers");
                assert!((1..=9).contains(&k));
                assert!(["sgd", "adam", "adamw"].contains(&p["opt"].as_str().unwrap()));
                let q = p["q"].as_f64().unwrap();
                assert!(
                    (q / 0.25 - (q / 0.25).round()).abs() < 1e-9 && (0.0..=1.0).contains(&q),
                    "{q}"
                );
                assert_eq!(p["fixed"], "yes");
            }
        }
    }

    /// A batch size on a log scale, best at 16 within 1..=4096 (a loss in octaves from it), with
    /// a float beside it. Modelled in log space, the good trials' kernels are a fraction of an
    /// octave wide and the search settles on 8..=32. Modelled linearly, they would be hundreds
    /// of units wide and spread the draws over [1, 500] (7 of the last 30 in 8..=32); a random
    /// draw lands there one time in six.
    #[test]
    fn log_integers_are_modelled_in_log_space() {
        let mut space = Space::new();
        space.insert("batch".into(), Param::LogIntUniform { min: 1, max: 4096 });
        space.insert("x".into(), Param::Uniform { min: 0.0, max: 1.0 });
        let loss = |p: &Params| {
            let b = p["batch"].as_i64().expect("an integer") as f64;
            (b.log2() - 4.0).powi(2) + 0.1 * p["x"].as_f64().unwrap()
        };
        for seed in 0..3 {
            let mut s = TpeSearcher::new(space.clone(), seed, Goal::Minimize, settings(), None).unwrap();
            let mut near = 0;
            for t in 1..=80 {
                let p = suggest(&mut s, t);
                let b = p["batch"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("{p:?}: batch is an integer"));
                assert!((1..=4096).contains(&b), "{b}");
                if t > 50 && (8..=32).contains(&b) {
                    near += 1;
                }
                s.observe(&SearchEvent::Completed {
                    trial: TrialId(t),
                    value: Some(loss(&p)),
                    objectives: Vec::new(),
                });
            }
            assert!(near >= 18, "seed {seed}: {near} of the last 30 suggestions in 8..=32");
        }
    }

    /// Failed trials and trials without a result do not count; a trial that only reported
    /// counts with its best report once it ends.
    #[test]
    fn only_finished_results_count() {
        let mut s = TpeSearcher::new(space(), 1, Goal::Maximize, settings(), None).unwrap();
        for t in 1..=4 {
            suggest(&mut s, t);
        }
        let report = |s: &mut TpeSearcher, t: u64, value: f64| {
            s.observe(&SearchEvent::Reported {
                trial: TrialId(t),
                step: None,
                epoch: None,
                value,
            });
        };
        report(&mut s, 1, 0.7);
        s.observe(&SearchEvent::Failed { trial: TrialId(1) });
        s.observe(&SearchEvent::Completed {
            trial: TrialId(2),
            value: None,
            objectives: Vec::new(),
        });
        report(&mut s, 3, 0.2);
        report(&mut s, 3, 0.9);
        report(&mut s, 3, 0.5);
        report(&mut s, 4, 0.4);
        assert!(s.state.finished.is_empty(), "running trials do not count yet");
        s.observe(&SearchEvent::Completed {
            trial: TrialId(3),
            value: None,
            objectives: Vec::new(),
        });
        s.observe(&SearchEvent::Completed {
            trial: TrialId(4),
            value: Some(0.3),
            objectives: Vec::new(),
        });
        // A late event for the failed trial does not revive it.
        s.observe(&SearchEvent::Completed {
            trial: TrialId(1),
            value: Some(0.8),
            objectives: Vec::new(),
        });
        assert_eq!(
            s.state.finished,
            BTreeMap::from([(TrialId(3), -0.9), (TrialId(4), -0.4)]),
            "best reports, as losses"
        );
        assert!(s.state.reported.is_empty());
        assert!(!s.state.params.contains_key(&TrialId(1)));
    }

    /// Trials that lack a parameter (suggested before it existed, as a conditional parameter
    /// will be) leave it out of their kernels, and suggestions still cover it.
    #[test]
    fn parameters_missing_from_some_trials() {
        let mut old = TpeSearcher::new(space(), 6, Goal::Minimize, settings(), None).unwrap();
        run(&mut old, 20, 1.0);
        let mut wider = space();
        wider.insert("extra".into(), Param::Uniform { min: 3.0, max: 4.0 });
        wider.insert(
            "mode".into(),
            Param::Categorical {
                values: vec![true.into(), false.into()],
            },
        );
        let mut s = TpeSearcher::new(wider, 6, Goal::Minimize, settings(), Some(&old.save())).unwrap();
        for t in 21..=40 {
            let p = suggest(&mut s, t);
            let extra = p["extra"].as_f64().unwrap();
            assert!((3.0..=4.0).contains(&extra), "{extra}");
            assert!(p["mode"].is_boolean());
            s.observe(&SearchEvent::Completed {
                trial: TrialId(t),
                value: Some(f(&p) + (extra - 3.2).abs()),
                objectives: Vec::new(),
            });
        }
        assert_eq!(s.state.finished.len(), 40);
    }

    /// `optimizer` in {sgd, adam, rmsprop}; `momentum` for sgd and rmsprop, `nesterov` under a
    /// momentum above 0.5, `beta2` for adam; `lr` always.
    fn conditional_space() -> Space {
        let cond =
            |parent: &str, values: Vec<Value>| chorus_core::space::Condition::from([(parent.to_string(), values)]);
        let mut s = Space::new();
        s.insert(
            "optimizer".into(),
            Param::Categorical {
                values: vec!["sgd".into(), "adam".into(), "rmsprop".into()],
            },
        );
        s.insert_when(
            "momentum".into(),
            Param::Uniform { min: 0.0, max: 1.0 },
            cond("optimizer", vec!["sgd".into(), "rmsprop".into()]),
        );
        s.insert_when(
            "nesterov".into(),
            Param::Categorical {
                values: vec![true.into(), false.into()],
            },
            cond("optimizer", vec!["sgd".into()]),
        );
        s.insert_when(
            "beta2".into(),
            Param::Uniform { min: 0.9, max: 1.0 },
            cond("optimizer", vec!["adam".into()]),
        );
        s.insert("lr".into(), Param::LogUniform { min: 1e-5, max: 1.0 });
        s
    }

    /// Best (0) with sgd, momentum 0.9, nesterov and lr 1e-2; adam and rmsprop are worse
    /// whatever their own parameters.
    fn conditional_f(p: &Params) -> f64 {
        let lr = ((p["lr"].as_f64().unwrap().log10() + 2.0) / 5.0).powi(2);
        lr + match p["optimizer"].as_str().unwrap() {
            "sgd" => (p["momentum"].as_f64().unwrap() - 0.9).powi(2) + if p["nesterov"] == true { 0.0 } else { 0.2 },
            "adam" => 0.4 + (p["beta2"].as_f64().unwrap() - 0.99).powi(2),
            _ => 0.6 + (p["momentum"].as_f64().unwrap() - 0.5).powi(2),
        }
    }

    fn assert_consistent(p: &Params) {
        let opt = p["optimizer"].as_str().unwrap();
        assert!(p.contains_key("lr"), "{p:?}");
        assert_eq!(p.contains_key("momentum"), opt != "adam", "{p:?}");
        assert_eq!(p.contains_key("nesterov"), opt == "sgd", "{p:?}");
        assert_eq!(p.contains_key("beta2"), opt == "adam", "{p:?}");
    }

    /// On a conditional space every suggestion holds exactly its active parameters, the search
    /// settles in the best branch, and it beats random search there.
    #[test]
    fn conditional_space_converges_to_the_best_branch() {
        let (mut tpe, mut random, mut late_sgd) = (Vec::new(), Vec::new(), 0);
        for seed in 0..8 {
            let mut s = TpeSearcher::new(conditional_space(), seed, Goal::Minimize, settings(), None).unwrap();
            let mut best = f64::INFINITY;
            for t in 1..=60 {
                let p = suggest(&mut s, t);
                assert_consistent(&p);
                if t > 40 && p["optimizer"] == "sgd" {
                    late_sgd += 1;
                }
                let v = conditional_f(&p);
                best = best.min(v);
                s.observe(&SearchEvent::Completed {
                    trial: TrialId(t),
                    value: Some(v),
                    objectives: Vec::new(),
                });
            }
            tpe.push(best);
            let r = RandomSearcher::new(conditional_space(), seed, None).unwrap();
            random.push((0..60).map(|i| conditional_f(&r.draw(i))).fold(f64::INFINITY, f64::min));
        }
        // Random search would put a third of the last 20 trials of each run in sgd.
        assert!(
            late_sgd > 8 * 20 * 3 / 4,
            "{late_sgd} of 160 late trials in the best branch"
        );
        tpe.sort_by(f64::total_cmp);
        random.sort_by(f64::total_cmp);
        let (t, r) = (tpe[4], random[4]);
        assert!(t < r / 10.0, "median best: tpe {t}, random {r}");
    }

    /// A candidate lacking a parameter is scored by each kernel's marginal over the others: the
    /// same density as summing the one-dimensional truncated normals by hand.
    #[test]
    fn a_missing_coordinate_is_marginalised() {
        let dims = vec![
            (
                "x".to_string(),
                Dim::of(&Param::Uniform { min: 0.0, max: 10.0 }).unwrap(),
            ),
            (
                "y".to_string(),
                Dim::of(&Param::Uniform { min: -1.0, max: 1.0 }).unwrap(),
            ),
            (
                "c".to_string(),
                Dim::of(&Param::Categorical {
                    values: vec![1.into(), 2.into(), 3.into()],
                })
                .unwrap(),
            ),
        ];
        let coords = [vec![2.0, 0.5, 0.0], vec![3.0, f64::NAN, 2.0], vec![9.5, -0.9, f64::NAN]];
        let members: Vec<(TrialId, &Vec<f64>)> =
            coords.iter().enumerate().map(|(i, c)| (TrialId(i as u64), c)).collect();
        let m = Mixture::new(&dims, &members, &mut BaseCache::default(), true, true);
        let (lo, hi) = (0.0, 10.0);
        for a in [0.5, 2.5, 7.0] {
            let log_kernel = |c: f64, s: f64| -0.5 * ((a - c) / s).powi(2) - log_norm(c, s, lo, hi);
            let mut terms: Vec<f64> = coords.iter().map(|c| log_kernel(c[0], m.sigma[0])).collect();
            terms.push(log_kernel(5.0, hi - lo));
            let want = (terms.iter().map(|t| t.exp()).sum::<f64>() / terms.len() as f64).ln();
            let got = m.log_density(&dims, &[a, f64::NAN, f64::NAN]);
            assert!((got - want).abs() < 1e-6, "at {a}: {got} vs {want}");
        }
    }

    #[test]
    fn is_deterministic_and_restores() {
        let mut a = TpeSearcher::new(space(), 4, Goal::Minimize, settings(), None).unwrap();
        let mut b = TpeSearcher::new(space(), 4, Goal::Minimize, settings(), None).unwrap();
        assert_eq!(run_from(&mut a, 1, 25, 1.0), run_from(&mut b, 1, 25, 1.0));
        // A trial still running when the state is saved reports after the restore.
        let running = suggest(&mut a, 26);
        a.observe(&SearchEvent::Reported {
            trial: TrialId(26),
            step: Some(1),
            epoch: None,
            value: f(&running) - 0.5,
        });
        let saved = a.save();
        let mut r = TpeSearcher::new(space(), 4, Goal::Minimize, settings(), Some(&saved)).unwrap();
        assert_eq!(r.save(), saved, "restoring loses nothing");
        for s in [&mut a, &mut r] {
            s.observe(&SearchEvent::Completed {
                trial: TrialId(26),
                value: None,
                objectives: Vec::new(),
            });
        }
        let (ra, rr) = (run_from(&mut a, 27, 20, 1.0), run_from(&mut r, 27, 20, 1.0));
        assert_eq!(ra, rr);
        let mut same = TpeSearcher::new(space(), 4, Goal::Minimize, settings(), None).unwrap();
        let mut other = TpeSearcher::new(space(), 5, Goal::Minimize, settings(), None).unwrap();
        assert_ne!(
            run_from(&mut same, 1, 25, 1.0).1,
            run_from(&mut other, 1, 25, 1.0).1,
            "the seed matters"
        );
    }

    /// Over 10 seeds of 60 trials each, TPE's median best value is below random search's.
    #[test]
    fn beats_random_search() {
        let (mut tpe, mut random) = (Vec::new(), Vec::new());
        for seed in 0..10 {
            let mut t = TpeSearcher::new(space(), seed, Goal::Minimize, settings(), None).unwrap();
            tpe.push(run(&mut t, 60, 1.0));
            let mut r = RandomSearcher::new(space(), seed, None).unwrap();
            random.push(run(&mut r, 60, 1.0));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (t, r) = (median(&mut tpe), median(&mut random));
        // Kernels as wide as the old unscaled Scott's rule only reached about 0.7 of random's.
        assert!(t < r / 4.0, "median best: tpe {t}, random {r}");
    }

    #[test]
    fn maximising_prefers_high_values() {
        // Maximise -f: the same search as minimising f.
        let mut max = TpeSearcher::new(space(), 2, Goal::Maximize, settings(), None).unwrap();
        let mut min = TpeSearcher::new(space(), 2, Goal::Minimize, settings(), None).unwrap();
        assert_eq!(run(&mut max, 30, -1.0), run(&mut min, 30, 1.0));
    }

    /// Two objectives pulling apart (x near 2 against x near 8): MOTPE's good set is the
    /// Pareto front, spread along it by crowding distance.
    #[test]
    fn several_objectives_pick_the_pareto_front() {
        let mut s = TpeSearcher::new(space(), 3, Goal::Minimize, settings(), None)
            .unwrap()
            .with_objectives(vec![Goal::Minimize, Goal::Maximize]);
        for t in 1..=40 {
            let Suggestion::Create(p) = s.suggest(TrialId(t)) else {
                panic!("tpe always suggests")
            };
            let x = p["x"].as_f64().unwrap();
            let (a, b) = ((x - 2.0).powi(2), -(x - 8.0).powi(2));
            s.observe(&SearchEvent::Completed {
                trial: TrialId(t),
                value: Some(a),
                objectives: vec![a, b],
            });
        }
        let good = s.good_by_fronts(5);
        assert_eq!(good.len(), 5);
        // The first front, found here by brute force: the good set is inside it when it is
        // larger than five, and contains it otherwise.
        let m = &s.state.multi;
        let front: Vec<TrialId> = m
            .iter()
            .filter(|(_, p)| {
                !m.values()
                    .any(|q| q[0] <= p[0] && q[1] <= p[1] && (q[0] < p[0] || q[1] < p[1]))
            })
            .map(|(t, _)| *t)
            .collect();
        if front.len() >= 5 {
            assert!(good.iter().all(|t| front.contains(t)), "{good:?} not within {front:?}");
        } else {
            assert!(front.iter().all(|t| good.contains(t)), "{front:?} not within {good:?}");
        }
        let xs: Vec<f64> = good.iter().map(|t| s.state.params[t]["x"].as_f64().unwrap()).collect();
        let spread = xs.iter().copied().fold(f64::MIN, f64::max) - xs.iter().copied().fold(f64::MAX, f64::min);
        assert!(spread > 2.0, "the good set spreads along the front: {xs:?}");
        let restored = TpeSearcher::new(space(), 3, Goal::Minimize, settings(), Some(&s.save()))
            .unwrap()
            .with_objectives(vec![Goal::Minimize, Goal::Maximize]);
        assert_eq!(restored.good_by_fronts(5), good);
    }

    #[test]
    fn fast_exp_is_accurate() {
        for x in [0.0, -1e-9, -0.5, -1.0, -7.3, -50.0, -699.0] {
            let (got, want) = (fast_exp(x), x.exp());
            assert!(((got - want) / want).abs() < 1e-7, "e^{x}: {got} vs {want}");
        }
        assert_eq!(fast_exp(-1e6), fast_exp(-700.0));
    }

    #[test]
    fn erfc_is_accurate() {
        for (x, want) in [
            (0.0, 1.0),
            (1.0, 0.157_299_207),
            (-1.0, 1.842_700_793),
            (2.5, 0.000_406_952),
        ] {
            assert!((erfc(x) - want).abs() < 1e-7, "erfc({x}) = {}", erfc(x));
        }
    }
}
