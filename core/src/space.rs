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
    /// An integer in `min..=max` drawn on a log scale (batch sizes, widths); `min >= 1`. See
    /// [`log_int_draw`] for the exact rule.
    LogIntUniform { min: i64, max: i64 },
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
            Param::LogIntUniform { min, max } => {
                let (lo, hi) = log_int_bounds(*min, *max);
                Value::from(log_int_draw(uniform(rng, lo, hi), *min, *max))
            }
        }
    }

    /// Every value a grid search visits, or `None` when the domain is continuous. Builds them
    /// all: only for domains known to be small (use [`Param::grid_value`] otherwise).
    pub fn grid_values(&self) -> Option<Vec<Value>> {
        let len = u64::try_from(self.grid_len_exact()?).ok()?;
        (0..len).map(|i| self.grid_value(i)).collect()
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
                if index as u128 >= self.grid_len_exact()? {
                    return None;
                }
                // Validation keeps min/q and max/q within ±2^53, where f64 counts exactly.
                Some(float(tidy(((min / q).ceil() + index as f64) * q)))
            }
            // Sampled, not enumerated: a grid of every integer would defeat the log scale, and
            // grids take no point count to space a range by.
            Param::Uniform { .. } | Param::LogUniform { .. } | Param::LogIntUniform { .. } => None,
        }
    }

    /// Whether a draw of a discrete domain can be exactly `v` (what a condition on it tests);
    /// always false for floats, which conditions cannot test.
    pub fn can_take(&self, v: &Value) -> bool {
        match self {
            Param::Constant { value } => value == v,
            Param::Categorical { values } => values.contains(v),
            Param::IntUniform { min, max } | Param::LogIntUniform { min, max } => {
                v.as_i64().is_some_and(|x| (*min..=*max).contains(&x))
            }
            Param::Uniform { .. } | Param::LogUniform { .. } | Param::QUniform { .. } => false,
        }
    }

    /// Number of grid points without building them (saturating at `u64::MAX`).
    pub fn grid_len(&self) -> Option<u64> {
        self.grid_len_exact().map(|n| u64::try_from(n).unwrap_or(u64::MAX))
    }

    /// Number of grid points without building them: an integer range of the whole `i64` has
    /// 2^64, one more than a `u64` holds.
    pub fn grid_len_exact(&self) -> Option<u128> {
        match self {
            Param::Constant { .. } => Some(1),
            Param::Categorical { values } => Some(values.len() as u128),
            Param::IntUniform { min, max } => Some((*max as i128 - *min as i128 + 1).max(0) as u128),
            Param::QUniform { min, max, q } => {
                let (lo, hi) = ((min / q).ceil(), (max / q).floor());
                // Float casts saturate (and NaN gives 0), so a degenerate range counts as empty.
                Some(if hi >= lo { (hi - lo) as u128 + 1 } else { 0 })
            }
            Param::Uniform { .. } | Param::LogUniform { .. } | Param::LogIntUniform { .. } => None,
        }
    }
}

/// The log-space interval a `log_int_uniform` draw is uniform over: `[ln(min - 0.5),
/// ln(max + 0.5)]`, so each integer gets the log-width of its rounding interval (Optuna's
/// `IntDistribution(log=True)`). Searchers that model the parameter (TPE) use the same interval.
pub fn log_int_bounds(min: i64, max: i64) -> (f64, f64) {
    ((min as f64 - 0.5).ln(), (max as f64 + 0.5).ln())
}

/// A `log_int_uniform` value from a point `x` in log space: `round(exp(x))`, clamped to
/// `[min, max]`. With `x` uniform over [`log_int_bounds`], integer `k` comes up with
/// probability `ln((k + 0.5) / (k - 0.5)) / ln((max + 0.5) / (min - 0.5))`: about `1/k`, so
/// each doubling of the value is about equally likely. The clamp only catches the upper end
/// (`max + 0.5` rounds up) and float error; a NaN lands on `min`.
pub fn log_int_draw(x: f64, min: i64, max: i64) -> i64 {
    let v = x.exp().round();
    if v.is_nan() {
        return min;
    }
    // `as` saturates, so a value past i64 clamps to max.
    (v as i64).clamp(min, max)
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

/// How many points the grid of a space has, as [`grid_count`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GridSize {
    /// Some domain is a continuous range: there is no grid.
    Continuous,
    /// Exactly this many points. A conditional parameter multiplies only the points where it is
    /// active: with `momentum` under `optimizer: sgd`, the grid is the sgd points times the
    /// momenta plus the other optimizers' points alone.
    Points(u128),
    /// More than `u128::MAX` points.
    Overflow,
    /// Counting would take more than the steps allowed: conditions tangled so that too many
    /// combinations of parent values lead to different subtrees. The grid has at least
    /// `at_least` points: the product of the parameters that are always active.
    TooIntricate { at_least: u128 },
}

/// Sizes the grid of `space` exactly, in at most `max_steps` steps: the cost does not depend on
/// how many values a domain has (an integer range of 10^15 values costs what a list of two
/// does), only on how many values conditions name.
pub fn grid_count(space: &Space, max_steps: u64) -> GridSize {
    let Some(mut grid) = Grid::new(space, max_steps) else {
        return GridSize::Continuous;
    };
    let n = grid.count(0, &mut vec![None; grid.axes.len()]);
    if grid.out_of_steps {
        let at_least = space
            .iter()
            .filter(|(name, _)| space.condition(name).is_none())
            .filter_map(|(_, p)| p.grid_len_exact())
            .fold(1u128, u128::saturating_mul);
        GridSize::TooIntricate { at_least }
    } else if n == u128::MAX {
        GridSize::Overflow
    } else {
        GridSize::Points(n)
    }
}

/// Number of points in the grid of `space` when it has at most
/// [`crate::limits::MAX_GRID_POINTS`] (what validation allows a grid search), or `None` when
/// some domain is continuous or the grid is larger than that.
pub fn grid_size(space: &Space) -> Option<u64> {
    match grid_count(space, crate::limits::MAX_GRID_STEPS) {
        GridSize::Points(n) if n <= crate::limits::MAX_GRID_POINTS as u128 => u64::try_from(n).ok(),
        _ => None,
    }
}

/// The `index`-th point of the grid: parameters in [`Space::order`] (name order without
/// conditions), the last varying fastest, inactive ones left out. Computing a point from its
/// index lets a searcher persist only a counter.
pub fn grid_point(space: &Space, index: u64) -> Option<Params> {
    // A searcher's space passed validation, so its grid was sized within the step limit; the
    // walk below visits no more subtrees than that sizing did.
    let mut grid = Grid::new(space, u64::MAX)?;
    let n = grid.axes.len();
    let mut chosen: Vec<Option<u64>> = vec![None; n];
    let mut rest = index as u128;
    if rest >= grid.count(0, &mut chosen) {
        return None;
    }
    let mut out = Params::new();
    for i in 0..n {
        if !grid.active(i, &chosen) {
            continue;
        }
        let pick = if grid.axes[i].tested {
            // Values of a parent lead to subtrees of different sizes: skip whole subtrees, in
            // value order, and whole runs of values no condition names (their subtrees are alike).
            let (len, marks, other) = {
                let a = &grid.axes[i];
                (a.len, a.marks.clone(), a.other)
            };
            let below_other = match other {
                Some(o) => {
                    chosen[i] = Some(o);
                    grid.count(i + 1, &mut chosen)
                }
                None => 0,
            };
            let mut pick = None;
            let mut from = 0u128;
            for m in marks.iter().map(|m| *m as u128).chain([len]) {
                let run = m - from;
                if run > 0 && below_other > 0 {
                    let span = run.saturating_mul(below_other);
                    if rest < span {
                        pick = Some((from + rest / below_other) as u64);
                        chosen[i] = other;
                        rest %= below_other;
                        break;
                    }
                    rest -= span;
                }
                if m == len {
                    break;
                }
                chosen[i] = Some(m as u64);
                let below = grid.count(i + 1, &mut chosen);
                if rest < below {
                    pick = Some(m as u64);
                    break;
                }
                rest -= below;
                from = m + 1;
            }
            pick?
        } else {
            let below = grid.count(i + 1, &mut chosen);
            if below == 0 {
                return None;
            }
            let v = u64::try_from(rest / below).ok()?;
            rest %= below;
            chosen[i] = Some(v);
            v
        };
        let axis = &grid.axes[i];
        out.insert(axis.name.to_string(), axis.param.grid_value(pick)?);
    }
    Some(out)
}

/// A discrete space laid out for counting the points below a partial assignment without
/// enumerating them. An assignment holds, per axis, a value index (`None`: inactive or not yet
/// chosen); for an axis that conditions test, the values no condition names all lead to alike
/// subtrees, so they share one representative index and are counted together.
struct Grid<'a> {
    axes: Vec<Axis<'a>>,
    /// The count below axis `i` depends only on the values of the earlier axes that later
    /// conditions test, which keys the memo.
    memo: HashMap<(usize, Vec<Option<u64>>), u128>,
    steps_left: u64,
    out_of_steps: bool,
}

struct Axis<'a> {
    name: &'a str,
    param: &'a Param,
    len: u128,
    /// Per parent axis, the sorted indices of its values that activate this one; `None` when a
    /// parent is not in the space (the axis is never active).
    tests: Option<Vec<(usize, Vec<u64>)>>,
    /// A later axis tests this one, so its values must be told apart.
    tested: bool,
    /// Sorted indices of this axis's values that some condition names.
    marks: Vec<u64>,
    /// The smallest index no condition names, standing for all of them; `None` when every value
    /// is named.
    other: Option<u64>,
    /// Earlier axes tested by this axis or a later one: what the count below it depends on.
    needed: Vec<usize>,
}

impl<'a> Grid<'a> {
    fn new(space: &'a Space, max_steps: u64) -> Option<Self> {
        let order = space.order();
        let position: HashMap<&str, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut lookups: HashMap<&str, DomainIndex<'_>> = HashMap::new();
        let mut axes = Vec::with_capacity(order.len());
        for name in &order {
            let param = &space[name];
            let len = param.grid_len_exact()?;
            let tests = match space.condition(name) {
                None => Some(Vec::new()),
                Some(when) => when
                    .iter()
                    .map(|(parent, allowed)| {
                        let j = *position.get(parent.as_str())?;
                        let lookup = lookups
                            .entry(order[j])
                            .or_insert_with(|| DomainIndex::new(&space[order[j]]));
                        let mut indices: Vec<u64> = allowed.iter().filter_map(|v| lookup.index_of(v)).collect();
                        indices.sort_unstable();
                        indices.dedup();
                        Some((j, indices))
                    })
                    .collect(),
            };
            axes.push(Axis {
                name,
                param,
                len,
                tests,
                tested: false,
                marks: Vec::new(),
                other: None,
                needed: Vec::new(),
            });
        }
        let n = axes.len();
        let mut needed: BTreeSet<usize> = BTreeSet::new();
        for i in (0..n).rev() {
            let tests: Vec<(usize, Vec<u64>)> = axes[i].tests.iter().flatten().cloned().collect();
            needed.extend(tests.iter().map(|(j, _)| *j));
            needed.retain(|j| *j < i);
            axes[i].needed = needed.iter().copied().collect();
            for (j, indices) in tests {
                axes[j].tested = true;
                axes[j].marks.extend(indices);
            }
        }
        for axis in &mut axes {
            axis.marks.sort_unstable();
            axis.marks.dedup();
            // The first index missing from the sorted marks, if any is.
            let first_gap = axis
                .marks
                .iter()
                .enumerate()
                .find(|(k, m)| **m != *k as u64)
                .map_or(axis.marks.len() as u64, |(k, _)| k as u64);
            axis.other = ((first_gap as u128) < axis.len).then_some(first_gap);
        }
        Some(Grid {
            axes,
            memo: HashMap::new(),
            steps_left: max_steps,
            out_of_steps: false,
        })
    }

    /// Whether axis `i` is active under the values chosen for the axes before it.
    fn active(&self, i: usize, chosen: &[Option<u64>]) -> bool {
        self.axes[i].tests.as_ref().is_some_and(|tests| {
            tests
                .iter()
                .all(|(j, allowed)| chosen[*j].is_some_and(|v| allowed.binary_search(&v).is_ok()))
        })
    }

    fn step(&mut self) -> bool {
        if self.steps_left == 0 {
            self.out_of_steps = true;
            return false;
        }
        self.steps_left -= 1;
        true
    }

    /// Points of the grid below axis `i` given the values `chosen` for the axes before it
    /// (saturating at `u128::MAX`); `chosen[i..]` is scratch space, `None` on return. Returns 0
    /// once out of steps.
    fn count(&mut self, i: usize, chosen: &mut Vec<Option<u64>>) -> u128 {
        if i == self.axes.len() {
            return 1;
        }
        let key = (i, self.axes[i].needed.iter().map(|j| chosen[*j]).collect::<Vec<_>>());
        if let Some(n) = self.memo.get(&key) {
            return *n;
        }
        if !self.step() {
            return 0;
        }
        let n = if !self.active(i, chosen) {
            self.count(i + 1, chosen)
        } else if !self.axes[i].tested {
            self.axes[i].len.saturating_mul(self.count(i + 1, chosen))
        } else {
            let (len, other) = (self.axes[i].len, self.axes[i].other);
            let marks = std::mem::take(&mut self.axes[i].marks);
            let mut sum = 0u128;
            for m in &marks {
                if !self.step() {
                    break;
                }
                chosen[i] = Some(*m);
                sum = sum.saturating_add(self.count(i + 1, chosen));
            }
            if let Some(o) = other {
                chosen[i] = Some(o);
                let unnamed = len - marks.len() as u128;
                sum = sum.saturating_add(unnamed.saturating_mul(self.count(i + 1, chosen)));
            }
            self.axes[i].marks = marks;
            chosen[i] = None;
            sum
        };
        if self.out_of_steps {
            return 0;
        }
        self.memo.insert(key, n);
        n
    }
}

/// Finds a value among the grid values of a discrete domain in constant time (a list is
/// hashed once), so checking conditions costs what they name, not what their parents hold.
pub struct DomainIndex<'a> {
    param: &'a Param,
    listed: HashMap<String, u64>,
}

impl<'a> DomainIndex<'a> {
    pub fn new(param: &'a Param) -> Self {
        let mut listed = HashMap::new();
        if let Param::Categorical { values } = param {
            for (i, v) in values.iter().enumerate() {
                listed.entry(value_key(v)).or_insert(i as u64);
            }
        }
        DomainIndex { param, listed }
    }

    /// Index of `v` among the domain's grid values, when a draw can be exactly `v`; always
    /// `None` for floats, which conditions cannot test.
    pub fn index_of(&self, v: &Value) -> Option<u64> {
        match self.param {
            Param::Constant { value } => (value == v).then_some(0),
            Param::Categorical { .. } => self.listed.get(&value_key(v)).copied(),
            Param::IntUniform { min, max } | Param::LogIntUniform { min, max } => {
                let x = v.as_i64().filter(|x| (*min..=*max).contains(x))?;
                u64::try_from(x as i128 - *min as i128).ok()
            }
            Param::Uniform { .. } | Param::LogUniform { .. } | Param::QUniform { .. } => None,
        }
    }
}

/// A string equal for two values exactly when the values are equal (`serde_json::Value`'s
/// equality: `1` and `1.0` differ, `0.0` and `-0.0` do not).
fn value_key(v: &Value) -> String {
    match v {
        Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => "0.0".to_string(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(value_key).collect();
            format!("[{}]", parts.join(","))
        }
        Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), value_key(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        other => other.to_string(),
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

    /// With min 1 and max 1024, [1, 32) and [32, 1024] are about equally wide in log space
    /// (ln(31.5/0.5) against ln(1024.5/31.5): 4.14 and 3.48), so about 54 % of draws fall in the
    /// first. A uniform integer draw would put 3 % there.
    #[test]
    fn log_int_draws_are_log_uniform() {
        let p = Param::LogIntUniform { min: 1, max: 1024 };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let n = 20_000;
        let mut low = 0;
        let mut octaves = [0u32; 11];
        for _ in 0..n {
            let x = p.sample(&mut rng).as_i64().unwrap();
            assert!((1..=1024).contains(&x));
            if x < 32 {
                low += 1;
            }
            octaves[x.ilog2() as usize] += 1;
        }
        let share = low as f64 / n as f64;
        assert!((0.48..0.60).contains(&share), "{share} of draws below 32");
        // Every doubling from 4 up gets about a tenth of the draws (ln 2 / ln 2049 = 0.091).
        for (k, c) in octaves.iter().enumerate().take(10).skip(2) {
            let f = *c as f64 / n as f64;
            assert!((0.07..0.11).contains(&f), "[{}, {}) got {f}", 1 << k, 1 << (k + 1));
        }
        // Each integer gets the log-width of its rounding interval: 1 takes [0.5, 1.5), ln 3.
        let ones = {
            let mut rng = ChaCha8Rng::seed_from_u64(12);
            (0..n).filter(|_| p.sample(&mut rng) == 1).count() as f64 / n as f64
        };
        let want = 3f64.ln() / (1024.5f64 / 0.5).ln();
        assert!((ones - want).abs() < 0.02, "{ones} ones, want {want}");
    }

    #[test]
    fn log_int_draw_rounds_and_clamps() {
        let (lo, hi) = log_int_bounds(16, 1024);
        assert_eq!(log_int_draw(lo, 16, 1024), 16);
        assert_eq!(log_int_draw(hi, 16, 1024), 1024, "max + 0.5 rounds up, then clamps");
        assert_eq!(log_int_draw(64f64.ln(), 16, 1024), 64);
        assert_eq!(log_int_draw(f64::NAN, 16, 1024), 16);
        assert_eq!(log_int_draw(1e6, 16, 1024), 1024);
        let p = Param::LogIntUniform { min: 5, max: 5 };
        assert_eq!(p.sample(&mut ChaCha8Rng::seed_from_u64(0)), Value::from(5));
        // Sampled, not enumerated: a grid refuses it as it refuses continuous ranges.
        assert_eq!(p.grid_len(), None);
        let mut s = Space::new();
        s.insert("batch".into(), Param::LogIntUniform { min: 16, max: 1024 });
        assert_eq!(grid_count(&s, 100), GridSize::Continuous);
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

        /// A log-integer draw is a JSON integer (so `${params.batch}` reads `64`, not `64.0`)
        /// within its bounds, whatever the bounds, up to the largest an i64 holds.
        #[test]
        fn log_int_samples_are_integers_in_range(
            seed in any::<u64>(),
            min in prop_oneof![1i64..4, 1i64..100_000, Just(i64::MAX - 1)],
            width in prop_oneof![0i64..4, 0i64..1_000_000, Just(i64::MAX)],
        ) {
            let max = min.saturating_add(width);
            let p = Param::LogIntUniform { min, max };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for _ in 0..50 {
                let v = p.sample(&mut rng);
                prop_assert!(v.is_i64(), "{v} is not an integer");
                let x = v.as_i64().unwrap();
                prop_assert!((min..=max).contains(&x), "{x} not in [{min}, {max}]");
                prop_assert!(p.can_take(&v));
                prop_assert_eq!(render_value(&v), x.to_string());
            }
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
