//! Search spaces: what each hyperparameter may be, when it exists, how to draw it, and how to
//! enumerate a grid.
//!
//! A parameter may be conditional: it exists only while its parents take certain values (a
//! momentum for `optimizer: sgd` only). Such a space is a tree, and every function here walks it
//! parents first, so an inactive parameter is never drawn, never enumerated and never appears
//! in a trial's [`Params`].
//!
//! Sampling is a pure function of a seeded RNG, so a searcher that records only its seed and
//! how many trials it created can be rebuilt exactly after a coordinator restart. A space
//! without conditions is walked in name order, as it was before conditions existed, so searches
//! saved then continue with the same draws.

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

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

/// When a conditional parameter exists: for each parent, the values that activate it. It is
/// active when every parent is active and takes one of its listed values.
pub type Condition = BTreeMap<String, Vec<Value>>;

/// A named set of parameter domains and the conditions under which some of them exist; ordered
/// by name so grids and draws are reproducible.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Space {
    params: BTreeMap<String, Param>,
    conditions: BTreeMap<String, Condition>,
}

impl Space {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a parameter that always exists.
    pub fn insert(&mut self, name: String, param: Param) -> Option<Param> {
        self.conditions.remove(&name);
        self.params.insert(name, param)
    }

    /// Adds (or replaces) a parameter that exists only when `when` holds. Validation (see
    /// [`crate::spec`]) guarantees known, discrete parents and no cycle; a space built by hand
    /// without that simply never activates a parameter whose parents cannot be satisfied.
    pub fn insert_when(&mut self, name: String, param: Param, when: Condition) -> Option<Param> {
        self.conditions.insert(name.clone(), when);
        self.params.insert(name, param)
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.get(name)
    }

    /// Every parameter, active or not, by name.
    pub fn iter(&self) -> std::collections::btree_map::Iter<'_, String, Param> {
        self.params.iter()
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The condition of `name`, when it has one.
    pub fn condition(&self, name: &str) -> Option<&Condition> {
        self.conditions.get(name)
    }

    /// True when some parameter exists only under a condition.
    pub fn is_conditional(&self) -> bool {
        !self.conditions.is_empty()
    }

    /// Parameter names with every parent before its children, and otherwise in name order (so a
    /// space without conditions is in plain name order). Names caught in a cycle come last.
    pub fn order(&self) -> Vec<&str> {
        if self.conditions.is_empty() {
            return self.params.keys().map(String::as_str).collect();
        }
        let mut waiting: HashMap<&str, usize> = HashMap::new();
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for (child, when) in &self.conditions {
            for parent in when.keys().filter(|p| self.params.contains_key(*p)) {
                *waiting.entry(child.as_str()).or_default() += 1;
                children.entry(parent.as_str()).or_default().push(child.as_str());
            }
        }
        let mut ready: BTreeSet<&str> = self
            .params
            .keys()
            .map(String::as_str)
            .filter(|n| !waiting.contains_key(n))
            .collect();
        let mut out = Vec::with_capacity(self.params.len());
        while let Some(name) = ready.pop_first() {
            out.push(name);
            for child in children.get(name).into_iter().flatten() {
                let n = waiting.get_mut(child).expect("counted above");
                *n -= 1;
                if *n == 0 {
                    ready.insert(child);
                }
            }
        }
        if out.len() < self.params.len() {
            let placed: BTreeSet<&str> = out.iter().copied().collect();
            let rest: Vec<&str> = self
                .params
                .keys()
                .map(String::as_str)
                .filter(|n| !placed.contains(n))
                .collect();
            out.extend(rest);
        }
        out
    }

    /// Whether `name` exists given the values of the parameters before it in [`Space::order`]:
    /// an absent parent is an inactive one, so its children are inactive too.
    pub fn is_active(&self, name: &str, params: &Params) -> bool {
        self.conditions.get(name).is_none_or(|when| {
            when.iter()
                .all(|(parent, values)| params.get(parent).is_some_and(|v| values.contains(v)))
        })
    }

    /// Draws every active parameter, parents first; inactive ones are left out.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Params {
        let mut out = Params::new();
        for name in self.order() {
            if self.is_active(name, &out) {
                out.insert(name.to_string(), self.params[name].sample(rng));
            }
        }
        out
    }

    /// Removes the parameters that the values of their parents make inactive, parents first,
    /// so a parameter under a removed one goes too.
    pub fn retain_active(&self, params: &mut Params) {
        if self.conditions.is_empty() {
            return;
        }
        for name in self.order() {
            if params.contains_key(name) && !self.is_active(name, params) {
                params.remove(name);
            }
        }
    }
}

impl std::ops::Index<&str> for Space {
    type Output = Param;

    fn index(&self, name: &str) -> &Param {
        &self.params[name]
    }
}

impl<'a> IntoIterator for &'a Space {
    type Item = (&'a String, &'a Param);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Param>;

    fn into_iter(self) -> Self::IntoIter {
        self.params.iter()
    }
}

impl FromIterator<(String, Param)> for Space {
    /// A space without conditions.
    fn from_iter<I: IntoIterator<Item = (String, Param)>>(iter: I) -> Self {
        Space {
            params: iter.into_iter().collect(),
            conditions: BTreeMap::new(),
        }
    }
}

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

    /// The `index`-th of [`Param::grid_values`], without building them.
    pub fn grid_value(&self, index: u64) -> Option<Value> {
        match self {
            Param::Constant { value } => (index == 0).then(|| value.clone()),
            Param::Categorical { values } => values.get(usize::try_from(index).ok()?).cloned(),
            Param::IntUniform { min, max } => {
                let v = min.checked_add(i64::try_from(index).ok()?)?;
                (v <= *max).then(|| Value::from(v))
            }
            Param::QUniform { min, q, .. } => {
                if index >= self.grid_len()? {
                    return None;
                }
                Some(float(tidy(((min / q).ceil() as i64 + index as i64) as f64 * q)))
            }
            Param::Uniform { .. } | Param::LogUniform { .. } => None,
        }
    }

    /// Whether a draw of a discrete domain can be exactly `v` (what a condition on it tests);
    /// always false for floats, which conditions cannot test.
    pub fn can_take(&self, v: &Value) -> bool {
        match self {
            Param::Constant { value } => value == v,
            Param::Categorical { values } => values.contains(v),
            Param::IntUniform { min, max } => v.as_i64().is_some_and(|x| (*min..=*max).contains(&x)),
            Param::Uniform { .. } | Param::LogUniform { .. } | Param::QUniform { .. } => false,
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

/// Number of points in the grid of `space` (saturating), or `None` when some domain is
/// continuous. A conditional parameter multiplies only the points where it is active: with
/// `momentum` under `optimizer: sgd`, the grid is the sgd points times the momenta plus the
/// other optimizers' points alone.
pub fn grid_size(space: &Space) -> Option<u64> {
    Some(Grid::new(space)?.count(0, &mut vec![None; space.len()]))
}

/// The `index`-th point of the grid: parameters in [`Space::order`] (name order without
/// conditions), the last varying fastest, inactive ones left out. Computing a point from its
/// index lets a searcher persist only a counter.
pub fn grid_point(space: &Space, index: u64) -> Option<Params> {
    let mut grid = Grid::new(space)?;
    let n = grid.axes.len();
    let mut chosen: Vec<Option<usize>> = vec![None; n];
    let mut rest = index;
    if rest >= grid.count(0, &mut chosen) {
        return None;
    }
    let mut out = Params::new();
    for i in 0..n {
        if !grid.active(i, &chosen) {
            continue;
        }
        let axis = &grid.axes[i];
        let pick = if axis.tested {
            // Values of a parent lead to subtrees of different sizes: skip whole subtrees.
            let mut pick = None;
            for v in 0..axis.len as usize {
                chosen[i] = Some(v);
                let below = grid.count(i + 1, &mut chosen);
                if rest < below {
                    pick = Some(v);
                    break;
                }
                rest -= below;
            }
            pick?
        } else {
            let below = grid.count(i + 1, &mut chosen);
            if below == 0 {
                return None;
            }
            let v = rest / below;
            rest %= below;
            usize::try_from(v).ok()?
        };
        let axis = &grid.axes[i];
        chosen[i] = Some(pick);
        out.insert(axis.name.to_string(), axis.param.grid_value(pick as u64)?);
    }
    Some(out)
}

/// A discrete space laid out for counting the points below a partial assignment without
/// enumerating them. An assignment holds each axis's value index (`None`: inactive or not yet
/// chosen); the count below axis `i` depends only on the values of the earlier axes that later
/// conditions test, which keys the memo.
struct Grid<'a> {
    axes: Vec<Axis<'a>>,
    memo: HashMap<(usize, Vec<Option<usize>>), u64>,
}

struct Axis<'a> {
    name: &'a str,
    param: &'a Param,
    len: u64,
    /// Per parent axis, which of its value indices activate this one; `None` when a parent is
    /// not in the space (the axis is never active).
    tests: Option<Vec<(usize, Vec<bool>)>>,
    /// A later axis tests this one, so its values must be told apart.
    tested: bool,
    /// Earlier axes tested by this axis or a later one: what the count below it depends on.
    needed: Vec<usize>,
}

impl<'a> Grid<'a> {
    fn new(space: &'a Space) -> Option<Self> {
        let order = space.order();
        let position: HashMap<&str, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut axes = Vec::with_capacity(order.len());
        for name in &order {
            let param = &space[name];
            let len = param.grid_len()?;
            let tests = match space.condition(name) {
                None => Some(Vec::new()),
                Some(when) => when
                    .iter()
                    .map(|(parent, allowed)| {
                        let j = *position.get(parent.as_str())?;
                        let values = space[parent.as_str()].grid_values()?;
                        Some((j, values.iter().map(|v| allowed.contains(v)).collect()))
                    })
                    .collect(),
            };
            axes.push(Axis {
                name,
                param,
                len,
                tests,
                tested: false,
                needed: Vec::new(),
            });
        }
        let n = axes.len();
        let mut needed: BTreeSet<usize> = BTreeSet::new();
        for i in (0..n).rev() {
            let parents: Vec<usize> = axes[i].tests.iter().flatten().map(|(j, _)| *j).collect();
            needed.extend(parents.iter().copied());
            needed.retain(|j| *j < i);
            axes[i].needed = needed.iter().copied().collect();
            for j in parents {
                axes[j].tested = true;
            }
        }
        Some(Grid {
            axes,
            memo: HashMap::new(),
        })
    }

    /// Whether axis `i` is active under the values chosen for the axes before it.
    fn active(&self, i: usize, chosen: &[Option<usize>]) -> bool {
        self.axes[i]
            .tests
            .as_ref()
            .is_some_and(|tests| tests.iter().all(|(j, allowed)| chosen[*j].is_some_and(|v| allowed[v])))
    }

    /// Points of the grid below axis `i` given the values `chosen` for the axes before it
    /// (saturating); `chosen[i..]` is scratch space, `None` on return.
    fn count(&mut self, i: usize, chosen: &mut Vec<Option<usize>>) -> u64 {
        if i == self.axes.len() {
            return 1;
        }
        let key = (i, self.axes[i].needed.iter().map(|j| chosen[*j]).collect::<Vec<_>>());
        if let Some(n) = self.memo.get(&key) {
            return *n;
        }
        let n = if !self.active(i, chosen) {
            self.count(i + 1, chosen)
        } else if !self.axes[i].tested {
            self.axes[i].len.saturating_mul(self.count(i + 1, chosen))
        } else {
            let mut sum = 0u64;
            for v in 0..self.axes[i].len as usize {
                chosen[i] = Some(v);
                sum = sum.saturating_add(self.count(i + 1, chosen));
            }
            chosen[i] = None;
            sum
        };
        self.memo.insert(key, n);
        n
    }
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

    /// `optimizer` in {sgd, adam}; `momentum` only for sgd, `beta2` only for adam; `lr` always.
    fn conditional() -> Space {
        let cat = |v: &[Value]| Param::Categorical { values: v.to_vec() };
        let mut s = Space::new();
        s.insert("optimizer".into(), cat(&["sgd".into(), "adam".into()]));
        s.insert_when(
            "momentum".into(),
            cat(&[0.9.into(), 0.99.into()]),
            Condition::from([("optimizer".into(), vec!["sgd".into()])]),
        );
        s.insert_when(
            "beta2".into(),
            cat(&[0.999.into()]),
            Condition::from([("optimizer".into(), vec!["adam".into()])]),
        );
        s.insert("lr".into(), cat(&[0.1.into(), 0.01.into()]));
        s
    }

    #[test]
    fn conditional_grid_is_the_tree() {
        let s = conditional();
        assert_eq!(s.order(), vec!["lr", "optimizer", "beta2", "momentum"]);
        let pts: Vec<Value> = (0..)
            .map_while(|i| grid_point(&s, i))
            .map(|p| serde_json::to_value(p).unwrap())
            .collect();
        let want = serde_json::json!([
            {"lr": 0.1, "optimizer": "sgd", "momentum": 0.9},
            {"lr": 0.1, "optimizer": "sgd", "momentum": 0.99},
            {"lr": 0.1, "optimizer": "adam", "beta2": 0.999},
            {"lr": 0.01, "optimizer": "sgd", "momentum": 0.9},
            {"lr": 0.01, "optimizer": "sgd", "momentum": 0.99},
            {"lr": 0.01, "optimizer": "adam", "beta2": 0.999},
        ]);
        assert_eq!(Value::Array(pts), want);
        assert_eq!(grid_size(&s), Some(6), "not the 16 of the full product");
    }

    #[test]
    fn conditions_chain_and_a_list_means_any_of() {
        let mut s = Space::new();
        s.insert("z_model".into(), Param::IntUniform { min: 1, max: 3 });
        // `a_depth` sorts first but must be drawn after its parent.
        s.insert_when(
            "a_depth".into(),
            Param::IntUniform { min: 1, max: 2 },
            Condition::from([("z_model".into(), vec![2.into(), 3.into()])]),
        );
        s.insert_when(
            "a_width".into(),
            Param::Categorical {
                values: vec!["s".into(), "m".into(), "l".into()],
            },
            Condition::from([("a_depth".into(), vec![2.into()])]),
        );
        assert_eq!(s.order(), vec!["z_model", "a_depth", "a_width"]);
        // model 1: 1 point; models 2 and 3: depth 1 (1 point) or depth 2 (3 widths).
        assert_eq!(grid_size(&s), Some(1 + 2 * (1 + 3)));
        let mut p = Params::from([
            ("z_model".into(), 1.into()),
            ("a_depth".into(), 2.into()),
            ("a_width".into(), "m".into()),
        ]);
        s.retain_active(&mut p);
        assert_eq!(
            p,
            Params::from([("z_model".into(), 1.into())]),
            "the grandchild goes with its parent"
        );
    }

    #[test]
    fn a_cycle_built_by_hand_never_activates() {
        let mut s = Space::new();
        let p = Param::Categorical { values: vec![1.into()] };
        s.insert_when("a".into(), p.clone(), Condition::from([("b".into(), vec![1.into()])]));
        s.insert_when("b".into(), p.clone(), Condition::from([("a".into(), vec![1.into()])]));
        s.insert("c".into(), p);
        assert_eq!(s.order(), vec!["c", "a", "b"]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(s.sample(&mut rng), Params::from([("c".into(), 1.into())]));
        assert_eq!(grid_size(&s), Some(1));
    }

    #[test]
    fn grid_value_is_grid_values_at_an_index() {
        let params = [
            Param::QUniform {
                min: 0.05,
                max: 0.5,
                q: 0.1,
            },
            Param::IntUniform { min: -2, max: 3 },
            Param::Categorical {
                values: vec!["a".into(), 1.into()],
            },
            Param::Constant { value: true.into() },
        ];
        for p in params {
            let all = p.grid_values().unwrap();
            for (i, v) in all.iter().enumerate() {
                assert_eq!(p.grid_value(i as u64).as_ref(), Some(v), "{p:?}");
            }
            assert_eq!(p.grid_value(all.len() as u64), None);
        }
    }

    /// A small random conditional space: parameter `i` (named so that names sort against the
    /// draw order) has 1 to 3 integer values and may depend on one or two earlier ones.
    fn random_space(shape: &[(u8, u64)]) -> Space {
        let n = shape.len();
        let name = |i: usize| format!("p{}", n - i);
        let mut s = Space::new();
        for (i, (k, bits)) in shape.iter().enumerate() {
            let param = Param::Categorical {
                values: (0..*k as i64).map(Value::from).collect(),
            };
            let mut when = Condition::new();
            for pick in [bits % 4, (bits >> 8) % 8] {
                let j = pick as usize;
                if j < i {
                    let kj = shape[j].0 as u64;
                    let allowed: Vec<Value> = (0..kj)
                        .filter(|v| bits >> (16 + v + 3 * j as u64) & 1 == 1)
                        .map(Value::from)
                        .collect();
                    let allowed = if allowed.is_empty() {
                        vec![Value::from(0)]
                    } else {
                        allowed
                    };
                    when.insert(name(j), allowed);
                }
            }
            if when.is_empty() {
                s.insert(name(i), param);
            } else {
                s.insert_when(name(i), param, when);
            }
        }
        s
    }

    fn full_product(s: &Space) -> Vec<Params> {
        let mut out = vec![Params::new()];
        for (name, p) in s {
            out = out
                .into_iter()
                .flat_map(|pt| {
                    p.grid_values().unwrap().into_iter().map(move |v| {
                        let mut pt = pt.clone();
                        pt.insert(name.clone(), v);
                        pt
                    })
                })
                .collect();
        }
        out
    }

    proptest! {
        /// The grid is exactly the distinct active parts of the full product, each once.
        #[test]
        fn conditional_grid_matches_brute_force(shape in proptest::collection::vec((1u8..4, any::<u64>()), 1..6)) {
            let s = random_space(&shape);
            let want: std::collections::BTreeSet<String> = full_product(&s)
                .into_iter()
                .map(|mut p| { s.retain_active(&mut p); serde_json::to_string(&p).unwrap() })
                .collect();
            let total = grid_size(&s).unwrap();
            prop_assert_eq!(total, want.len() as u64);
            let got: Vec<String> = (0..total).map(|i| serde_json::to_string(&grid_point(&s, i).unwrap()).unwrap()).collect();
            let distinct: std::collections::BTreeSet<String> = got.iter().cloned().collect();
            prop_assert_eq!(distinct.len(), got.len(), "no point twice");
            prop_assert_eq!(distinct, want);
            prop_assert!(grid_point(&s, total).is_none());
        }

        /// A draw holds exactly the parameters its own values make active.
        #[test]
        fn samples_hold_exactly_the_active_parameters(shape in proptest::collection::vec((1u8..4, any::<u64>()), 1..6), seed in any::<u64>()) {
            let s = random_space(&shape);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for _ in 0..20 {
                let p = s.sample(&mut rng);
                for (name, param) in &s {
                    prop_assert_eq!(p.contains_key(name), s.is_active(name, &p), "{} in {:?}", name, p);
                    if let Some(v) = p.get(name) {
                        prop_assert!(param.can_take(v));
                    }
                }
                let mut kept = p.clone();
                s.retain_active(&mut kept);
                prop_assert_eq!(kept, p);
            }
        }

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
