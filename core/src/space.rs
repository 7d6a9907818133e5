//! Search spaces: what each hyperparameter may be, how to draw it, and how to enumerate a grid.
//!
//! Sampling is a pure function of a seeded RNG, so a searcher that records only its seed and
//! how many trials it created can be rebuilt exactly after a coordinator restart.

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use std::collections::BTreeMap;

/// One hyperparameter's domain, after validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Param {
    /// A fixed value.
    Constant { value: Value },
    /// One of a list, equally likely.
    Categorical { values: Vec<Value> },
    /// A float drawn uniformly from `[min, max]`.
    Uniform { min: f64, max: f64 },
    /// A float whose logarithm is uniform over `[ln min, ln max]`; `min > 0`.
    LogUniform { min: f64, max: f64 },
    /// An integer drawn uniformly from `min..=max`.
    IntUniform { min: i64, max: i64 },
    /// `round(uniform(min, max) / q) * q`, kept inside `[min, max]`.
    QUniform { min: f64, max: f64, q: f64 },
}

/// Hyperparameter values of one trial, by name.
pub type Params = BTreeMap<String, Value>;

/// A named set of parameter domains; ordered by name so grids and draws are reproducible.
pub type Space = BTreeMap<String, Param>;

impl Param {
    /// Draws one value.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Value {
        match self {
            Param::Constant { value } => value.clone(),
            Param::Categorical { values } => values[rng.random_range(0..values.len())].clone(),
            Param::Uniform { min, max } => float(uniform(rng, *min, *max)),
            Param::LogUniform { min, max } => float(uniform(rng, min.ln(), max.ln()).exp().clamp(*min, *max)),
            Param::IntUniform { min, max } => Value::from(rng.random_range(*min..=*max)),
            Param::QUniform { min, max, q } => float(quantize(uniform(rng, *min, *max), *min, *max, *q)),
        }
    }

    /// Every value a grid search visits, or `None` when the domain is continuous.
    pub fn grid_values(&self) -> Option<Vec<Value>> {
        match self {
            Param::Constant { value } => Some(vec![value.clone()]),
            Param::Categorical { values } => Some(values.clone()),
            Param::IntUniform { min, max } => Some((*min..=*max).map(Value::from).collect()),
            Param::QUniform { min, max, q } => {
                let lo = (min / q).ceil() as i64;
                let hi = (max / q).floor() as i64;
                Some((lo..=hi).map(|k| float(tidy(k as f64 * q))).collect())
            }
            Param::Uniform { .. } | Param::LogUniform { .. } => None,
        }
    }

    /// Number of grid points without building them (saturating).
    pub fn grid_len(&self) -> Option<u64> {
        match self {
            Param::Constant { .. } => Some(1),
            Param::Categorical { values } => Some(values.len() as u64),
            Param::IntUniform { min, max } => Some((*max as i128 - *min as i128 + 1).min(u64::MAX as i128) as u64),
            Param::QUniform { min, max, q } => {
                let lo = (min / q).ceil() as i64;
                let hi = (max / q).floor() as i64;
                Some((hi - lo + 1).max(0) as u64)
            }
            Param::Uniform { .. } | Param::LogUniform { .. } => None,
        }
    }
}

fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    if lo == hi { lo } else { rng.random_range(lo..=hi) }
}

fn quantize(x: f64, min: f64, max: f64, q: f64) -> f64 {
    let mut v = (x / q).round() * q;
    // Rounding may step just outside the range; step back inside by one quantum.
    if v > max {
        v -= q;
    }
    if v < min {
        v += q;
    }
    tidy(v)
}

/// Removes float noise such as `0.30000000000000004` so values print as users wrote them.
fn tidy(v: f64) -> f64 {
    let r = (v * 1e12).round() / 1e12;
    if (r - v).abs() < 1e-9 { r } else { v }
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map(Value::Number).unwrap_or(Value::Null)
}

/// Number of points in the full grid of `space`, or `None` when some domain is continuous.
pub fn grid_size(space: &Space) -> Option<u64> {
    space
        .values()
        .try_fold(1u64, |acc, p| p.grid_len().map(|n| acc.saturating_mul(n)))
}

/// The `index`-th point of the grid, in row-major order over parameter names (the last name
/// varies fastest). Computing a point from its index lets a searcher persist only a counter.
pub fn grid_point(space: &Space, index: u64) -> Option<Params> {
    let axes: Vec<(&String, Vec<Value>)> = space
        .iter()
        .map(|(k, p)| p.grid_values().map(|v| (k, v)))
        .collect::<Option<_>>()?;
    let total = axes
        .iter()
        .try_fold(1u64, |acc, (_, v)| acc.checked_mul(v.len() as u64))?;
    if index >= total {
        return None;
    }
    let mut rest = index;
    let mut out = Params::new();
    for (name, values) in axes.iter().rev() {
        let n = values.len() as u64;
        out.insert((*name).clone(), values[(rest % n) as usize].clone());
        rest /= n;
    }
    Some(out)
}

/// Renders a parameter value the way it is substituted into a command line: strings bare,
/// everything else as JSON.
pub fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn space() -> Space {
        let mut s = Space::new();
        s.insert(
            "a".into(),
            Param::Categorical {
                values: vec![1.into(), 2.into(), 3.into()],
            },
        );
        s.insert("b".into(), Param::IntUniform { min: 0, max: 1 });
        s.insert("c".into(), Param::Constant { value: "x".into() });
        s
    }

    #[test]
    fn grid_enumerates_every_point_once() {
        let s = space();
        assert_eq!(grid_size(&s), Some(6));
        let pts: Vec<Params> = (0..6).map(|i| grid_point(&s, i).unwrap()).collect();
        for i in 0..6 {
            for j in (i + 1)..6 {
                assert_ne!(pts[i], pts[j]);
            }
        }
        assert!(grid_point(&s, 6).is_none());
        assert_eq!(pts[0]["a"], Value::from(1));
        assert_eq!(pts[1]["b"], Value::from(1));
    }

    #[test]
    fn q_uniform_grid_is_tidy() {
        let p = Param::QUniform {
            min: 0.0,
            max: 0.5,
            q: 0.1,
        };
        let v = p.grid_values().unwrap();
        assert_eq!(v.len(), 6);
        assert_eq!(v[3], serde_json::json!(0.3));
        assert_eq!(p.grid_len(), Some(6));
    }

    #[test]
    fn continuous_space_has_no_grid() {
        let mut s = space();
        s.insert("lr".into(), Param::Uniform { min: 0.0, max: 1.0 });
        assert_eq!(grid_size(&s), None);
        assert!(grid_point(&s, 0).is_none());
    }

    proptest! {
        #[test]
        fn samples_stay_in_range(seed in any::<u64>(), lo in -1e3f64..1e3, width in 0f64..1e3, q in 0.01f64..10.0) {
            let hi = lo + width;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let u = Param::Uniform { min: lo, max: hi }.sample(&mut rng).as_f64().unwrap();
            prop_assert!(u >= lo && u <= hi);
            let qv = Param::QUniform { min: lo, max: hi, q }.sample(&mut rng);
            if let Some(x) = qv.as_f64() {
                // A range narrower than q may hold no multiple of q; then the value sits at an edge quantum.
                if width >= q { prop_assert!(x >= lo - 1e-6 && x <= hi + 1e-6, "{x} not in [{lo},{hi}]"); }
            }
            let l = Param::LogUniform { min: lo.abs() + 1e-6, max: lo.abs() + 1e-6 + width }.sample(&mut rng).as_f64().unwrap();
            prop_assert!(l >= lo.abs() + 1e-6 - 1e-9 && l <= lo.abs() + 1e-6 + width + 1e-9);
            let i = Param::IntUniform { min: lo as i64, max: hi as i64 }.sample(&mut rng).as_i64().unwrap();
            prop_assert!(i >= lo as i64 && i <= hi as i64);
        }

        #[test]
        fn grid_points_are_distinct(n1 in 1usize..5, n2 in 1i64..5) {
            let mut s = Space::new();
            s.insert("x".into(), Param::Categorical { values: (0..n1).map(Value::from).collect() });
            s.insert("y".into(), Param::IntUniform { min: 0, max: n2 - 1 });
            let total = grid_size(&s).unwrap();
            prop_assert_eq!(total, n1 as u64 * n2 as u64);
            let mut seen = std::collections::HashSet::new();
            for i in 0..total {
                prop_assert!(seen.insert(serde_json::to_string(&grid_point(&s, i).unwrap()).unwrap()));
            }
        }
    }
}
