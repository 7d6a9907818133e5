//! Ranking trials: `trial list --sort` and `compare`. Pure functions over wire types, so they
//! are tested without a coordinator.

use crate::args::Agg;
use crate::query::{Filter, Row, Sort, cmp_cells};
use chorus_proto::pb;
use std::cmp::Ordering;
use std::collections::HashMap;

/// What `trial list --sort METRIC` orders by.
#[derive(Debug, Clone, PartialEq)]
pub enum SortKey {
    /// The experiment's own metric: each trial's best value, best first by the goal.
    Best { maximize: bool },
    /// Any other metric: the trial's last reported value, ascending (there is no goal to
    /// say which end is better, and ascending is what `sort` does everywhere else).
    Last { name: String },
}

impl SortKey {
    /// The experiment metric sorts by goal; every other name by its last value.
    pub fn for_metric(name: &str, experiment_metric: &str, maximize: bool) -> Self {
        if name == experiment_metric {
            SortKey::Best { maximize }
        } else {
            SortKey::Last { name: name.to_string() }
        }
    }

    /// The trial's value for this key; NaN counts as missing so it cannot claim first place.
    pub fn value(&self, t: &pb::Trial) -> Option<f64> {
        let v = match self {
            SortKey::Best { .. } => t.best_value,
            SortKey::Last { name } => last_metric(t, name),
        };
        v.filter(|v| !v.is_nan())
    }

    fn maximize(&self) -> bool {
        matches!(self, SortKey::Best { maximize: true })
    }
}

/// A numeric field of the trial's last metric line.
pub fn last_metric(t: &pb::Trial, name: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(&t.last_metrics_json).ok()?;
    v.get(name)?.as_f64()
}

/// Sorts in place by `key`; trials without a value go last, in sequence order. Stable, so
/// ties keep sequence order too (callers pass trials ordered by `seq`).
pub fn sort_trials(trials: &mut [pb::Trial], key: &SortKey) {
    trials.sort_by(|a, b| compare(key.value(a), key.value(b), key.maximize()));
}

/// Orders values best first: descending when maximizing, ascending otherwise; `None` last.
fn compare(a: Option<f64>, b: Option<f64>, maximize: bool) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) if maximize => b.total_cmp(&a),
        (Some(a), Some(b)) => a.total_cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// One experiment's side of a comparison.
#[derive(Debug, Clone)]
pub struct CompareGroup {
    pub experiment: u64,
    pub metric: String,
    pub maximize: bool,
    /// Best first (see [`CompareGroup::new`]).
    pub trials: Vec<pb::Trial>,
    /// The objectives of a multi-objective experiment (name, maximise); empty otherwise.
    pub objectives: Vec<(String, bool)>,
    /// Completed trials no other completed trial dominates on every objective (multi-objective
    /// experiments only), by id.
    pub pareto: std::collections::BTreeSet<u64>,
    /// How `values` were reduced from the trials' histories.
    pub agg: Agg,
    /// The value compared, by trial id: the trial's best value unless `compare` was asked for
    /// another metric or aggregation. Absent when the trial has not reported it (or it is NaN).
    pub values: HashMap<u64, f64>,
}

impl CompareGroup {
    /// Ranks the trials by best value, best first by the experiment's goal; `limit` keeps the
    /// top N.
    pub fn new(experiment: u64, resp: pb::ListTrialsResponse, limit: Option<usize>) -> Self {
        let mut trials = resp.trials;
        trials.sort_by_key(|t| t.seq);
        let objectives: Vec<(String, bool)> = match resp.objectives.len() {
            0 | 1 => Vec::new(),
            _ => resp.objectives.iter().map(|o| (o.name.clone(), o.maximize)).collect(),
        };
        let pareto = if objectives.is_empty() {
            Default::default()
        } else {
            let points: Vec<(u64, Vec<f64>)> = trials
                .iter()
                .filter(|t| t.state == pb::TrialState::Completed as i32)
                .filter_map(|t| {
                    let last: serde_json::Value = serde_json::from_str(&t.last_metrics_json).ok()?;
                    let v: Option<Vec<f64>> = objectives.iter().map(|(n, _)| last.get(n)?.as_f64()).collect();
                    Some((t.id, v?))
                })
                .collect();
            let maximize: Vec<bool> = objectives.iter().map(|(_, m)| *m).collect();
            pareto_front(&points, &maximize).into_iter().collect()
        };
        sort_trials(
            &mut trials,
            &SortKey::Best {
                maximize: resp.maximize,
            },
        );
        if let Some(n) = limit {
            trials.truncate(n);
        }
        let values = trials
            .iter()
            .filter_map(|t| Some((t.id, t.best_value.filter(|v| !v.is_nan())?)))
            .collect();
        CompareGroup {
            experiment,
            metric: resp.metric,
            maximize: resp.maximize,
            trials,
            objectives,
            pareto,
            agg: Agg::Best,
            values,
        }
    }

    /// The compared value of one of this group's trials.
    pub fn value(&self, t: &pb::Trial) -> Option<f64> {
        self.values.get(&t.id).copied()
    }

    /// The group's best trial by its compared value and goal (the first in sequence on a tie).
    pub fn best(&self) -> Option<&pb::Trial> {
        let mut ts: Vec<&pb::Trial> = self.trials.iter().filter(|t| self.value(t).is_some()).collect();
        ts.sort_by_key(|t| t.seq);
        ts.into_iter()
            .min_by(|a, b| compare(self.value(a), self.value(b), self.maximize))
    }

    /// Keeps the trials every filter holds for, orders them (by `sort`, else by value best
    /// first) and keeps the first `limit`. Ties keep sequence order.
    pub fn arrange(&mut self, filters: &[Filter], sort: Option<&Sort>, limit: Option<usize>) {
        let mut trials = std::mem::take(&mut self.trials);
        trials.sort_by_key(|t| t.seq);
        if !filters.is_empty() {
            trials.retain(|t| {
                let row = Row::new(self.experiment, t, &self.metric, self.value(t), false);
                filters.iter().all(|f| f.matches(&row))
            });
        }
        match sort {
            Some(s) => {
                let desc = s.descending(&self.metric, self.maximize);
                let mut keyed: Vec<(serde_json::Value, pb::Trial)> = trials
                    .into_iter()
                    .map(|t| {
                        (
                            Row::new(self.experiment, &t, &self.metric, self.value(&t), false).cell(&s.key),
                            t,
                        )
                    })
                    .collect();
                keyed.sort_by(|a, b| cmp_cells(&a.0, &b.0, desc));
                trials = keyed.into_iter().map(|(_, t)| t).collect();
            }
            None => trials.sort_by(|a, b| compare(self.value(a), self.value(b), self.maximize)),
        }
        if let Some(n) = limit {
            trials.truncate(n);
        }
        self.trials = trials;
    }
}

/// The ids of the points no other point dominates (at least as good on every objective and
/// better on one), in input order.
pub fn pareto_front(points: &[(u64, Vec<f64>)], maximize: &[bool]) -> Vec<u64> {
    let better = |a: f64, b: f64, max: bool| if max { a > b } else { a < b };
    let dominates = |a: &[f64], b: &[f64]| {
        let mut strictly = false;
        for ((x, y), max) in a.iter().zip(b).zip(maximize) {
            if better(*y, *x, *max) {
                return false;
            }
            strictly |= better(*x, *y, *max);
        }
        strictly
    };
    points
        .iter()
        .filter(|(_, p)| !points.iter().any(|(_, q)| dominates(q, p)))
        .map(|(id, _)| *id)
        .collect()
}

/// The metric name every group shares, or `None` when they differ.
pub fn shared_metric(groups: &[CompareGroup]) -> Option<&str> {
    let first = groups.first()?;
    groups
        .iter()
        .all(|g| g.metric == first.metric)
        .then_some(first.metric.as_str())
}

/// The trial id of the best trial across all groups, when they share metric name and goal (a
/// loss and an accuracy, or two losses one maximized, cannot be ranked against each other).
/// Ties go to the earlier experiment on the command line.
pub fn best_overall(groups: &[CompareGroup]) -> Option<u64> {
    let first = groups.first()?;
    if !groups
        .iter()
        .all(|g| g.metric == first.metric && g.maximize == first.maximize)
    {
        return None;
    }
    groups
        .iter()
        .flat_map(|g| g.trials.iter().map(move |t| g.value(t)).zip(&g.trials))
        .filter(|(v, _)| v.is_some())
        .min_by(|a, b| compare(a.0, b.0, first.maximize))
        .map(|(_, t)| t.id)
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn the_pareto_front_keeps_the_undominated() {
        // Minimise the first, maximise the second.
        let points = vec![
            (1, vec![1.0, 0.5]),
            (2, vec![2.0, 0.9]),
            (3, vec![2.0, 0.4]), // dominated by 1
            (4, vec![0.5, 0.1]),
            (5, vec![1.0, 0.5]), // equal to 1: neither dominates
        ];
        assert_eq!(pareto_front(&points, &[false, true]), vec![1, 2, 4, 5]);
        assert_eq!(pareto_front(&[], &[false, true]), Vec::<u64>::new());
    }

    use super::*;

    pub fn trial(id: u64, seq: u64, best: Option<f64>, last: &str) -> pb::Trial {
        pb::Trial {
            id,
            seq,
            best_value: best,
            last_metrics_json: last.to_string(),
            ..Default::default()
        }
    }

    fn ids(ts: &[pb::Trial]) -> Vec<u64> {
        ts.iter().map(|t| t.id).collect()
    }

    #[test]
    fn experiment_metric_sorts_by_goal_missing_last() {
        let base = vec![
            trial(1, 0, Some(0.5), "{}"),
            trial(2, 1, None, "{}"),
            trial(3, 2, Some(0.1), "{}"),
            trial(4, 3, Some(0.9), "{}"),
            trial(5, 4, Some(f64::NAN), "{}"),
        ];
        let mut ts = base.clone();
        sort_trials(&mut ts, &SortKey::for_metric("loss", "loss", false));
        assert_eq!(ids(&ts), [3, 1, 4, 2, 5]);
        let mut ts = base;
        sort_trials(&mut ts, &SortKey::for_metric("acc", "acc", true));
        assert_eq!(ids(&ts), [4, 1, 3, 2, 5]);
    }

    #[test]
    fn other_metrics_sort_ascending_by_last_value() {
        let mut ts = vec![
            trial(1, 0, Some(0.1), r#"{"step": 10, "lr": 0.3}"#),
            trial(2, 1, Some(0.2), r#"{"step": 10}"#),
            trial(3, 2, Some(0.3), r#"{"step": 10, "lr": 0.01}"#),
            trial(4, 3, Some(0.4), "not json"),
            trial(5, 4, Some(0.5), r#"{"lr": "high"}"#),
            trial(6, 5, Some(0.6), r#"{"lr": 2}"#),
        ];
        // The experiment maximizes, but `lr` is not its metric: ascending regardless.
        sort_trials(&mut ts, &SortKey::for_metric("lr", "acc", true));
        assert_eq!(ids(&ts), [3, 1, 6, 2, 4, 5]);
    }

    fn group(exp: u64, metric: &str, maximize: bool, trials: Vec<pb::Trial>) -> CompareGroup {
        CompareGroup::new(
            exp,
            pb::ListTrialsResponse {
                trials,
                metric: metric.into(),
                maximize,
                ..Default::default()
            },
            None,
        )
    }

    #[test]
    fn compare_groups_rank_best_first_and_limit() {
        let resp = pb::ListTrialsResponse {
            trials: vec![
                trial(9, 2, Some(0.3), "{}"),
                trial(7, 0, None, "{}"),
                trial(8, 1, Some(0.2), "{}"),
            ],
            metric: "loss".into(),
            maximize: false,
            ..Default::default()
        };
        let g = CompareGroup::new(1, resp.clone(), None);
        assert_eq!(ids(&g.trials), [8, 9, 7]);
        let g = CompareGroup::new(1, resp, Some(1));
        assert_eq!(ids(&g.trials), [8]);
    }

    #[test]
    fn best_overall_across_experiments() {
        let a = group(
            1,
            "loss",
            false,
            vec![trial(1, 0, Some(0.4), "{}"), trial(2, 1, Some(0.3), "{}")],
        );
        let b = group(
            2,
            "loss",
            false,
            vec![trial(3, 0, Some(0.2), "{}"), trial(4, 1, None, "{}")],
        );
        assert_eq!(best_overall(&[a.clone(), b.clone()]), Some(3));
        // Ties go to the experiment named first.
        let c = group(3, "loss", false, vec![trial(5, 0, Some(0.3), "{}")]);
        assert_eq!(best_overall(&[a.clone(), c.clone()]), Some(2));
        assert_eq!(best_overall(&[c, a.clone()]), Some(5));
        let max = group(
            2,
            "acc",
            true,
            vec![trial(6, 0, Some(0.1), "{}"), trial(7, 1, Some(0.9), "{}")],
        );
        assert_eq!(best_overall(std::slice::from_ref(&max)), Some(7));
    }

    #[test]
    fn no_best_when_metrics_or_goals_differ_or_nothing_reported() {
        let a = group(1, "loss", false, vec![trial(1, 0, Some(0.4), "{}")]);
        let other_name = group(2, "val_loss", false, vec![trial(2, 0, Some(0.1), "{}")]);
        let other_goal = group(3, "loss", true, vec![trial(3, 0, Some(0.1), "{}")]);
        assert_eq!(best_overall(&[a.clone(), other_name.clone()]), None);
        assert_eq!(shared_metric(&[a.clone(), other_name]), None);
        assert_eq!(best_overall(&[a.clone(), other_goal.clone()]), None);
        assert_eq!(shared_metric(&[a, other_goal]), Some("loss"));
        let empty = group(4, "loss", false, vec![trial(4, 0, None, "{}")]);
        assert_eq!(best_overall(&[empty]), None);
    }
}
