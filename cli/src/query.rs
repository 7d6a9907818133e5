//! `compare`'s small query language over trials: named columns, `--filter` expressions,
//! `--sort KEY[:asc|desc]`, and the aggregation of a metric history into one value. Pure
//! functions over wire types, so they are tested without a coordinator.
//!
//! A column's value is a JSON value (`Null` when the trial lacks it), because parameters come as
//! JSON: a number stays a number, a string a string, and every output format can show it as is.

use crate::args::Agg;
use chorus_core::convert::trial_state_name;
use chorus_proto::pb;
use serde_json::{Map, Value};
use std::cmp::Ordering;

/// The columns every trial has; anything else is a parameter or a field of the last metric line.
pub const FIXED_COLUMNS: &[&str] = &[
    "experiment",
    "trial",
    "id",
    "seq",
    "state",
    "status",
    "restarts",
    "attempt",
    "run_seconds",
    "best",
    "value",
];

/// One trial as `compare` sees it: the listing's record plus the value compared.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    pub experiment: u64,
    pub trial: &'a pb::Trial,
    pub params: Map<String, Value>,
    pub last: Map<String, Value>,
    /// The name of the compared metric, so it can be used as a column name.
    pub metric: &'a str,
    pub value: Option<f64>,
    pub best: bool,
}

impl<'a> Row<'a> {
    pub fn new(experiment: u64, trial: &'a pb::Trial, metric: &'a str, value: Option<f64>, best: bool) -> Self {
        Row {
            experiment,
            trial,
            params: crate::render::parse_object(&trial.params_json),
            last: crate::render::parse_object(&trial.last_metrics_json),
            metric,
            value,
            best,
        }
    }

    /// The value of a column; `Null` when the trial has none.
    pub fn cell(&self, key: &str) -> Value {
        let t = self.trial;
        let num = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
        match key {
            "experiment" => self.experiment.into(),
            "trial" | "id" => t.id.into(),
            "seq" => t.seq.into(),
            "state" | "status" => trial_state_name(t.state).into(),
            "restarts" => t.restarts.into(),
            "attempt" => t.attempt.into(),
            "run_seconds" => num(t.run_seconds),
            "best" => self.best.into(),
            "value" => self.value.map_or(Value::Null, num),
            k if k == self.metric => self.value.map_or(Value::Null, num),
            k => {
                if let Some(p) = k.strip_prefix("params.") {
                    return self.params.get(p).cloned().unwrap_or(Value::Null);
                }
                if let Some(m) = k.strip_prefix("last.") {
                    return self.last.get(m).cloned().unwrap_or(Value::Null);
                }
                self.params
                    .get(k)
                    .or_else(|| self.last.get(k))
                    .cloned()
                    .unwrap_or(Value::Null)
            }
        }
    }

    /// Whether the trial has this column at all (for warning about a likely typo).
    pub fn knows(&self, key: &str) -> bool {
        FIXED_COLUMNS.contains(&key) || key == self.metric || !self.cell(key).is_null()
    }
}

// ---------------------------------------------------------------------------------------------
// Filters

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// `KEY OP VALUE`, parsed from `--filter`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub key: String,
    pub op: Op,
    /// The right-hand side as written.
    pub text: String,
    /// The right-hand side as a number, when it reads as one.
    pub number: Option<f64>,
}

/// Operators, longest first so `<=` is not read as `<` followed by `=3`.
const OPS: &[(&str, Op)] = &[
    ("<=", Op::Le),
    (">=", Op::Ge),
    ("!=", Op::Ne),
    ("==", Op::Eq),
    ("=", Op::Eq),
    ("<", Op::Lt),
    (">", Op::Gt),
];

impl Filter {
    /// Parses `KEY OP VALUE`; the error says what is wrong, for a usage error naming the filter.
    pub fn parse(expr: &str) -> Result<Filter, String> {
        let Some(at) = expr.find(['<', '>', '=', '!']) else {
            return Err("no operator (one of = != < <= > >=)".into());
        };
        let (key, rest) = expr.split_at(at);
        let key = key.trim();
        if key.is_empty() {
            return Err("no column before the operator".into());
        }
        if !key
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
        {
            return Err(format!("{key:?} is not a column name"));
        }
        let (sym, op) = OPS
            .iter()
            .find(|(sym, _)| rest.starts_with(sym))
            .copied()
            .ok_or_else(|| format!("{:?} is not an operator", &rest[..1]))?;
        let text = rest[sym.len()..].trim();
        if text.is_empty() {
            return Err("no value after the operator".into());
        }
        if text.starts_with(['<', '>', '=', '!']) {
            return Err(format!("{sym}{text} is not an operator followed by a value"));
        }
        let number = text.parse::<f64>().ok().filter(|v| v.is_finite());
        if number.is_none() && !matches!(op, Op::Eq | Op::Ne) {
            return Err(format!("{sym} needs a number, not {text:?}"));
        }
        Ok(Filter {
            key: key.to_string(),
            op,
            text: text.to_string(),
            number,
        })
    }

    /// Numbers compare as numbers; strings and booleans by equality with the text. A trial that
    /// lacks the column never matches, not even `!=` (as SQL's NULL).
    pub fn matches(&self, row: &Row) -> bool {
        let cell = row.cell(&self.key);
        let ord = match (&cell, self.number) {
            (Value::Null, _) => return false,
            (Value::Number(n), Some(want)) => match n.as_f64() {
                Some(v) => v.partial_cmp(&want),
                None => return false,
            },
            (Value::String(s), _) => Some(if *s == self.text {
                Ordering::Equal
            } else {
                Ordering::Less
            }),
            (Value::Bool(b), _) => Some(if b.to_string() == self.text {
                Ordering::Equal
            } else {
                Ordering::Less
            }),
            // A number against a word (`lr=high`), or an array or object: never equal.
            _ => Some(Ordering::Less),
        };
        let Some(ord) = ord else { return false };
        let textual = !matches!(cell, Value::Number(_));
        match self.op {
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
            // Order only means something between numbers.
            _ if textual => false,
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
        }
    }

    /// Whether the filter reads the compared value (so it must wait until that is known).
    pub fn reads_value(&self, metric: &str) -> bool {
        self.key == "value" || self.key == metric || self.key == "best"
    }
}

// ---------------------------------------------------------------------------------------------
// Sorting

/// `KEY[:asc|desc]`; the direction is `None` when left to the key's default.
#[derive(Debug, Clone, PartialEq)]
pub struct Sort {
    pub key: String,
    pub descending: Option<bool>,
}

impl Sort {
    pub fn parse(s: &str) -> Result<Sort, String> {
        let (key, dir) = match s.rsplit_once(':') {
            Some((k, "asc")) => (k, Some(false)),
            Some((k, "desc")) => (k, Some(true)),
            Some((_, d)) => return Err(format!("{d:?} is not a direction (asc or desc)")),
            None => (s, None),
        };
        let key = key.trim();
        if key.is_empty() {
            return Err("no column to sort by".into());
        }
        Ok(Sort {
            key: key.to_string(),
            descending: dir,
        })
    }

    /// The compared metric sorts best first by the goal; every other column ascending.
    pub fn descending(&self, metric: &str, maximize: bool) -> bool {
        self.descending
            .unwrap_or_else(|| (self.key == "value" || self.key == metric) && maximize)
    }
}

/// Orders two cells: numbers before text, text before booleans, missing always last
/// (whatever the direction, so "no value yet" never claims first place).
pub fn cmp_cells(a: &Value, b: &Value, descending: bool) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Number(_) => 0,
            Value::String(_) => 1,
            Value::Bool(_) => 2,
            Value::Null => 4,
            _ => 3,
        }
    }
    let (ra, rb) = (rank(a), rank(b));
    if ra == 4 || rb == 4 || ra != rb {
        return ra.cmp(&rb);
    }
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let x = x.as_f64().unwrap_or(f64::NAN);
            let y = y.as_f64().unwrap_or(f64::NAN);
            x.total_cmp(&y)
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => a.to_string().cmp(&b.to_string()),
    };
    if descending { ord.reverse() } else { ord }
}

// ---------------------------------------------------------------------------------------------
// Aggregation

/// Reduces one metric's history (oldest first) to one value; NaN and infinities are skipped, so
/// a diverged step cannot become a trial's "best".
pub fn aggregate(history: &[f64], agg: Agg, maximize: bool) -> Option<f64> {
    let mut vals = history.iter().copied().filter(|v| v.is_finite());
    match agg {
        Agg::Last => vals.next_back(),
        Agg::Min => vals.reduce(f64::min),
        Agg::Max => vals.reduce(f64::max),
        Agg::Best if maximize => vals.reduce(f64::max),
        Agg::Best => vals.reduce(f64::min),
    }
}

pub fn agg_name(agg: Agg) -> &'static str {
    match agg {
        Agg::Best => "best",
        Agg::Last => "last",
        Agg::Min => "min",
        Agg::Max => "max",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(params: &str, last: &str, state: pb::TrialState) -> pb::Trial {
        pb::Trial {
            id: 7,
            seq: 2,
            state: state as i32,
            params_json: params.into(),
            last_metrics_json: last.into(),
            restarts: 1,
            ..Default::default()
        }
    }

    fn f(expr: &str) -> Filter {
        Filter::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    #[test]
    fn filters_parse_every_operator() {
        let cases = [
            ("lr<0.01", "lr", Op::Lt, "0.01"),
            ("lr <= 0.01", "lr", Op::Le, "0.01"),
            ("layers>=2", "layers", Op::Ge, "2"),
            ("layers>2", "layers", Op::Gt, "2"),
            ("optimizer!=sgd", "optimizer", Op::Ne, "sgd"),
            ("state=completed", "state", Op::Eq, "completed"),
            ("state==completed", "state", Op::Eq, "completed"),
            ("params.lr=1e-3", "params.lr", Op::Eq, "1e-3"),
        ];
        for (expr, key, op, text) in cases {
            let p = f(expr);
            assert_eq!((p.key.as_str(), p.op, p.text.as_str()), (key, op, text), "{expr}");
        }
        assert_eq!(f("lr=1e-3").number, Some(0.001));
        assert_eq!(f("opt=adam").number, None);
    }

    #[test]
    fn malformed_filters_say_why() {
        for (expr, why) in [
            ("lr", "no operator"),
            ("<3", "no column"),
            ("lr<", "no value"),
            ("lr=<3", "not an operator followed by a value"),
            ("lr<abc", "needs a number"),
            ("lr>=nan", "needs a number"),
            ("l r=3", "not a column name"),
            ("lr!3", "not an operator"),
        ] {
            let err = Filter::parse(expr).unwrap_err();
            assert!(err.contains(why), "{expr}: {err}");
        }
    }

    #[test]
    fn filters_compare_numbers_numerically_and_strings_by_equality() {
        let t = trial(
            r#"{"lr": 0.005, "layers": 2, "optimizer": "adam", "fused": true}"#,
            r#"{"acc": 0.9, "step": 10}"#,
            pb::TrialState::Completed,
        );
        let row = Row::new(3, &t, "loss", Some(0.25), false);
        let yes = [
            "lr<0.01",
            "lr<=0.005",
            "lr>=5e-3",
            "layers>=2",
            "layers=2",
            "layers=2.0",
            "layers!=3",
            "optimizer!=sgd",
            "optimizer=adam",
            "state=completed",
            "status!=failed",
            "loss<0.3",
            "value=0.25",
            "acc>0.5",
            "last.step=10",
            "params.layers<10",
            "fused=true",
            "experiment=3",
            "trial=7",
            "restarts>=1",
        ];
        for e in yes {
            assert!(f(e).matches(&row), "{e} should hold");
        }
        let no = [
            "lr>0.01",
            "lr<0.005",
            "layers>2",
            "layers!=2",
            "optimizer=sgd",
            "optimizer!=adam",
            // Order means nothing between words and numbers.
            "optimizer>1",
            "state=failed",
            "loss>=0.3",
            "lr=high",
            // Missing columns never match, `!=` included.
            "momentum=0.9",
            "momentum!=0.9",
            "last.lr<1",
            "params.acc>0",
            "fused=false",
        ];
        for e in no {
            assert!(!f(e).matches(&row), "{e} should not hold");
        }
        let unreported = Row::new(3, &t, "loss", None, false);
        assert!(!f("loss<1").matches(&unreported) && !f("loss!=1").matches(&unreported));
        assert!(f("loss<1").reads_value("loss") && f("value>0").reads_value("x") && !f("lr<1").reads_value("loss"));
    }

    #[test]
    fn sorts_parse_and_default_by_goal_for_the_metric_only() {
        assert_eq!(
            Sort::parse("lr").unwrap(),
            Sort {
                key: "lr".into(),
                descending: None
            }
        );
        assert_eq!(Sort::parse("lr:desc").unwrap().descending, Some(true));
        assert_eq!(Sort::parse("params.lr:asc").unwrap().key, "params.lr");
        assert!(Sort::parse("lr:up").unwrap_err().contains("up"));
        assert!(Sort::parse(":asc").is_err());
        assert!(Sort::parse("acc").unwrap().descending("acc", true));
        assert!(Sort::parse("value").unwrap().descending("acc", true));
        assert!(!Sort::parse("loss").unwrap().descending("loss", false));
        assert!(!Sort::parse("lr").unwrap().descending("acc", true));
        assert!(!Sort::parse("acc:asc").unwrap().descending("acc", true));
    }

    #[test]
    fn missing_cells_sort_last_in_both_directions() {
        use serde_json::json;
        let mut vals = vec![json!(2), Value::Null, json!(10), json!("b"), json!(1.5), json!("a")];
        vals.sort_by(|a, b| cmp_cells(a, b, false));
        assert_eq!(
            vals,
            [json!(1.5), json!(2), json!(10), json!("a"), json!("b"), Value::Null]
        );
        vals.sort_by(|a, b| cmp_cells(a, b, true));
        assert_eq!(
            vals,
            [json!(10), json!(2), json!(1.5), json!("b"), json!("a"), Value::Null]
        );
    }

    #[test]
    fn aggregation_of_a_history() {
        let h = [0.9, 0.4, f64::NAN, 0.6, f64::INFINITY];
        assert_eq!(aggregate(&h, Agg::Last, false), Some(0.6));
        assert_eq!(aggregate(&h, Agg::Min, true), Some(0.4));
        assert_eq!(aggregate(&h, Agg::Max, false), Some(0.9));
        assert_eq!(aggregate(&h, Agg::Best, false), Some(0.4));
        assert_eq!(aggregate(&h, Agg::Best, true), Some(0.9));
        assert_eq!(aggregate(&[], Agg::Last, true), None);
        assert_eq!(aggregate(&[f64::NAN], Agg::Best, true), None);
    }

    #[test]
    fn columns_resolve_fixed_then_params_then_last_metrics() {
        use serde_json::json;
        let t = trial(
            r#"{"lr": 0.1, "step": 3}"#,
            r#"{"step": 10, "acc": 0.5}"#,
            pb::TrialState::Failed,
        );
        let row = Row::new(1, &t, "acc", Some(0.75), true);
        assert_eq!(row.cell("state"), json!("failed"));
        assert_eq!(row.cell("acc"), json!(0.75), "the metric column is the compared value");
        assert_eq!(row.cell("last.acc"), json!(0.5));
        assert_eq!(row.cell("step"), json!(3), "a parameter shadows a metric field");
        assert_eq!(row.cell("last.step"), json!(10));
        assert_eq!(row.cell("best"), json!(true));
        assert_eq!(row.cell("nope"), Value::Null);
        assert!(row.knows("seq") && row.knows("lr") && !row.knows("nope"));
    }
}
