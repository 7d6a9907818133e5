//! The scheduler: a pure function from a view of the cluster and the pending trials to
//! placements. No I/O and no clock, so every policy decision is testable without a server.
//!
//! Policy: trials are considered oldest first. A trial needs `ranks` placements of `needs`
//! each; it is placed whole or not at all (gang placement), so two trials that each fit only
//! partially never hold resources while waiting for each other. A trial that does not fit
//! does not block younger trials that do (backfill). Single-rank trials go to the worker with
//! the most free room (spreading load); the ranks of one multi-rank trial are packed onto as
//! few workers as possible. Only workers carrying every label of a trial's selector take its
//! ranks. Each experiment runs at most `limit` trials at once. An elastic trial (`min_ranks` <
//! `ranks`) is placed with as many ranks as fit, up to `ranks`, once at least `min_ranks` fit.

use chorus_core::{ExperimentId, TrialId, WorkerId};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub cpus: u32,
    pub gpus: u32,
}

impl Resources {
    fn take(&mut self, need: &Resources) {
        self.cpus -= need.cpus;
        self.gpus -= need.gpus;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub id: WorkerId,
    pub free: Resources,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTrial {
    pub trial: TrialId,
    pub experiment: ExperimentId,
    /// Resources of each rank.
    pub needs: Resources,
    /// The most ranks to place.
    pub ranks: u32,
    /// The fewest ranks the trial can run with (equal to `ranks` unless elastic).
    pub min_ranks: u32,
    /// Labels a worker must carry (with these values) to take a rank.
    pub selector: BTreeMap<String, String>,
}

/// How many more trials of an experiment may start now.
pub type Quotas = BTreeMap<ExperimentId, u32>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub trial: TrialId,
    /// One entry per rank, rank 0 first.
    pub workers: Vec<WorkerId>,
}

pub fn schedule(workers: &[WorkerView], pending: &[PendingTrial], quotas: &Quotas) -> Vec<Placement> {
    let mut free: Vec<WorkerView> = workers.to_vec();
    let mut quotas = quotas.clone();
    let mut order: Vec<&PendingTrial> = pending.iter().collect();
    order.sort_by_key(|p| p.trial);
    let mut out = Vec::new();
    for p in order {
        let quota = quotas.get(&p.experiment).copied().unwrap_or(0);
        if quota == 0 || p.ranks == 0 {
            continue;
        }
        if let Some(ranks) = place(&free, p) {
            for &i in &ranks {
                free[i].free.take(&p.needs);
            }
            quotas.insert(p.experiment, quota - 1);
            out.push(Placement {
                trial: p.trial,
                workers: ranks.iter().map(|&i| free[i].id.clone()).collect(),
            });
        }
    }
    out
}

/// Indices of the workers for each rank, or `None` when the trial does not fit whole.
fn place(free: &[WorkerView], p: &PendingTrial) -> Option<Vec<usize>> {
    // How many ranks each worker could take.
    let capacity = |w: &WorkerView| -> u32 {
        // A resource the trial does not need never limits it.
        let by_cpu = w.free.cpus.checked_div(p.needs.cpus).unwrap_or(u32::MAX);
        let by_gpu = w.free.gpus.checked_div(p.needs.gpus).unwrap_or(u32::MAX);
        by_cpu.min(by_gpu)
    };
    let selected = |w: &WorkerView| p.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v));
    let mut candidates: Vec<(usize, u32)> = free
        .iter()
        .enumerate()
        .filter(|(_, w)| selected(w))
        .map(|(i, w)| (i, capacity(w)))
        .filter(|(_, c)| *c > 0)
        .collect();
    // Most room first: spreads single-rank trials, packs a gang onto the fewest workers.
    // Ties go to the worker listed first, so the result is deterministic.
    candidates.sort_by(|a, b| {
        let (wa, wb) = (&free[a.0].free, &free[b.0].free);
        b.1.min(p.ranks)
            .cmp(&a.1.min(p.ranks))
            .then((wb.gpus, wb.cpus).cmp(&(wa.gpus, wa.cpus)))
            .then(a.0.cmp(&b.0))
    });
    let mut ranks = Vec::with_capacity(p.ranks as usize);
    for (i, c) in candidates {
        for _ in 0..c.min(p.ranks - ranks.len() as u32) {
            ranks.push(i);
        }
        if ranks.len() as u32 == p.ranks {
            return Some(ranks);
        }
    }
    (ranks.len() as u32 >= p.min_ranks.max(1)).then_some(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(id: &str, cpus: u32, gpus: u32) -> WorkerView {
        WorkerView {
            id: WorkerId(id.into()),
            free: Resources { cpus, gpus },
            labels: BTreeMap::new(),
        }
    }

    fn t(id: u64, exp: u64, cpus: u32, gpus: u32, ranks: u32) -> PendingTrial {
        PendingTrial {
            trial: TrialId(id),
            experiment: ExperimentId(exp),
            needs: Resources { cpus, gpus },
            ranks,
            min_ranks: ranks,
            selector: BTreeMap::new(),
        }
    }

    fn elastic(id: u64, min: u32, max: u32) -> PendingTrial {
        PendingTrial {
            min_ranks: min,
            ..t(id, 1, 1, 0, max)
        }
    }

    #[test]
    fn selectors_pick_labelled_workers() {
        let mut big = w("big", 4, 0);
        big.labels.insert("pool".into(), "highmem".into());
        let ws = [w("small", 4, 0), big];
        let mut p = t(1, 1, 1, 0, 1);
        p.selector.insert("pool".into(), "highmem".into());
        let out = schedule(&ws, std::slice::from_ref(&p), &q(&[(1, 5)]));
        assert_eq!(out[0].workers, vec![WorkerId("big".into())]);
        p.selector.insert("zone".into(), "b".into());
        assert!(schedule(&ws, &[p], &q(&[(1, 5)])).is_empty());
    }

    fn q(pairs: &[(u64, u32)]) -> Quotas {
        pairs.iter().map(|(e, n)| (ExperimentId(*e), *n)).collect()
    }

    #[test]
    fn honours_slots_and_spreads() {
        let ws = [w("a", 2, 0), w("b", 2, 0)];
        let ps: Vec<_> = (1..=5).map(|i| t(i, 1, 1, 0, 1)).collect();
        let out = schedule(&ws, &ps, &q(&[(1, 10)]));
        assert_eq!(out.len(), 4);
        let on_a = out.iter().filter(|p| p.workers[0].0 == "a").count();
        assert_eq!(on_a, 2);
        assert_eq!(out.iter().map(|p| p.trial.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn honours_parallel_quota_per_experiment() {
        let ws = [w("a", 8, 0)];
        let ps = vec![t(1, 1, 1, 0, 1), t(2, 1, 1, 0, 1), t(3, 2, 1, 0, 1)];
        let out = schedule(&ws, &ps, &q(&[(1, 1), (2, 1)]));
        assert_eq!(out.iter().map(|p| p.trial.0).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn gpus_are_respected() {
        let ws = [w("cpu", 8, 0), w("gpu", 8, 1)];
        let out = schedule(&ws, &[t(1, 1, 1, 1, 1), t(2, 1, 1, 1, 1)], &q(&[(1, 5)]));
        assert_eq!(
            out,
            vec![Placement {
                trial: TrialId(1),
                workers: vec![WorkerId("gpu".into())]
            }]
        );
    }

    /// Two gangs that each fit only partially: one is placed whole, the other waits whole.
    #[test]
    fn gangs_never_half_place() {
        let ws = [w("a", 1, 0), w("b", 1, 0), w("c", 1, 0)];
        let out = schedule(&ws, &[t(1, 1, 1, 0, 2), t(2, 2, 1, 0, 2)], &q(&[(1, 1), (2, 1)]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].trial, TrialId(1));
        assert_eq!(out[0].workers.len(), 2);
    }

    #[test]
    fn gang_packs_onto_fewest_workers() {
        let ws = [w("a", 1, 0), w("b", 4, 0), w("c", 2, 0)];
        let out = schedule(&ws, &[t(1, 1, 1, 0, 4)], &q(&[(1, 1)]));
        assert_eq!(out[0].workers, vec![WorkerId("b".into()); 4]);
    }

    #[test]
    fn elastic_gangs_take_what_fits_within_bounds() {
        let ws = [w("a", 1, 0), w("b", 2, 0)];
        let out = schedule(&ws, &[elastic(1, 2, 8)], &q(&[(1, 1)]));
        assert_eq!(out[0].workers.len(), 3);
        let out = schedule(&ws, &[elastic(1, 2, 2)], &q(&[(1, 1)]));
        assert_eq!(out[0].workers, vec![WorkerId("b".into()); 2]);
        assert!(schedule(&ws, &[elastic(1, 4, 8)], &q(&[(1, 1)])).is_empty());
        // An elastic trial that cannot reach its minimum does not block a smaller one behind it.
        let out = schedule(&ws, &[elastic(1, 4, 8), t(2, 1, 1, 0, 1)], &q(&[(1, 2)]));
        assert_eq!(out.iter().map(|p| p.trial.0).collect::<Vec<_>>(), vec![2]);
    }

    proptest! {
        /// Whatever the input, placements never overcommit a worker, never exceed a quota,
        /// and always give a trial between its minimum and maximum of ranks.
        #[test]
        fn never_overcommits(
            caps in prop::collection::vec((0u32..6, 0u32..3), 1..5),
            trials in prop::collection::vec((1u64..4, 0u32..3, 0u32..2, 1u32..4, 0u32..3), 0..12),
            quota in 0u32..6,
        ) {
            let ws: Vec<_> = caps.iter().enumerate().map(|(i, (c, g))| w(&format!("w{i}"), *c, *g)).collect();
            let ps: Vec<_> = trials.iter().enumerate()
                .map(|(i, (e, c, g, r, slack))| PendingTrial {
                    min_ranks: r.saturating_sub(*slack).max(1),
                    ..t(i as u64 + 1, *e, (*c).max(u32::from(*g == 0)), *g, *r)
                })
                .collect();
            let quotas: Quotas = (1..4).map(|e| (ExperimentId(e), quota)).collect();
            let out = schedule(&ws, &ps, &quotas);
            let mut used: BTreeMap<String, (u32, u32)> = BTreeMap::new();
            let mut per_exp: BTreeMap<ExperimentId, u32> = BTreeMap::new();
            for pl in &out {
                let p = ps.iter().find(|p| p.trial == pl.trial).unwrap();
                let n = pl.workers.len() as u32;
                prop_assert!(n >= p.min_ranks && n <= p.ranks, "{} ranks for {:?}", n, p);
                *per_exp.entry(p.experiment).or_default() += 1;
                for wid in &pl.workers {
                    let e = used.entry(wid.0.clone()).or_default();
                    e.0 += p.needs.cpus;
                    e.1 += p.needs.gpus;
                }
            }
            for wv in &ws {
                let (c, g) = used.get(&wv.id.0).copied().unwrap_or_default();
                prop_assert!(c <= wv.free.cpus && g <= wv.free.gpus);
            }
            for n in per_exp.values() { prop_assert!(*n <= quota); }
        }
    }
}
