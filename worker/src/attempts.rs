//! The attempts this worker holds and the resources they use.
//!
//! An attempt is held from its assignment until both its runner has ended and its reports are
//! delivered (or found stale). Holding it that long matters: the coordinator learns of its exit
//! only from the `Exited` report, so until that is delivered the attempt is still "running" in
//! every Register and Heartbeat, and a repeated assignment of it is still a duplicate.

use crate::runner::{ReportFlow, Stop};
use chorus_core::TrialId;
use chorus_proto::pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct AttemptKey {
    pub trial: TrialId,
    pub attempt: u32,
    /// Ranks of one multi-rank attempt may share a worker.
    pub rank: u32,
}

impl AttemptKey {
    pub fn new(trial_id: u64, attempt: u32, rank: u32) -> Self {
        AttemptKey {
            trial: TrialId(trial_id),
            attempt,
            rank,
        }
    }
}

impl From<AttemptKey> for pb::RunningAttempt {
    fn from(k: AttemptKey) -> Self {
        pb::RunningAttempt {
            trial_id: k.trial.0,
            attempt: k.attempt,
            rank: k.rank,
        }
    }
}

/// What an admitted attempt gets.
pub(crate) struct Admission {
    /// `CUDA_VISIBLE_DEVICES` names of the GPUs allotted to it.
    pub gpu_ids: Vec<String>,
    pub stop: watch::Receiver<Option<Stop>>,
    /// Set when the attempt does not fit what is free: it runs anyway, since the coordinator is
    /// the authority on placement, but someone should hear about it.
    pub overcommit: Option<String>,
}

/// Shared by the agent's tasks. A std mutex because every critical section is a few map
/// operations with no await inside; tasks that need to wait use [`Attempts::wait_until`].
pub(crate) struct Attempts {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    entries: BTreeMap<AttemptKey, Entry>,
    cpus: u32,
    cpus_used: u32,
    gpu_ids: Vec<String>,
    /// Attempts using each GPU; above 1 only when the coordinator overcommitted.
    gpu_load: Vec<u32>,
}

struct Entry {
    stop: watch::Sender<Option<Stop>>,
    /// Set once the attempt's reports flow; marks it stale when the coordinator says so.
    flow: Option<Arc<ReportFlow>>,
    cpus: u32,
    gpus: Vec<usize>,
    runner_done: bool,
    reports_done: bool,
}

/// What [`Attempts::usage`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// CPU slots allotted (above the worker's when the coordinator overcommitted).
    pub cpus_busy: u32,
    /// GPUs allotted to at least one attempt.
    pub gpus_busy: u32,
    /// Attempts whose program has not ended.
    pub running: u32,
    /// Attempts held: running, or ended with reports still to deliver.
    pub held: u32,
}

/// A condition on the held attempts, for [`Attempts::wait_until`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Held {
    /// No attempt's program is running any more.
    NoRunner,
    /// Nothing is held: every attempt ended and its reports were delivered.
    Nothing,
}

impl Attempts {
    pub fn new(cpus: u32, gpu_ids: Vec<String>) -> Self {
        let gpu_load = vec![0; gpu_ids.len()];
        Attempts {
            state: Mutex::new(State {
                entries: BTreeMap::new(),
                cpus,
                cpus_used: 0,
                gpu_ids,
                gpu_load,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_flow(&self, key: AttemptKey, flow: Arc<ReportFlow>) {
        if let Some(e) = self.lock().entries.get_mut(&key) {
            e.flow = Some(flow);
        }
    }

    /// The coordinator no longer counts this attempt as current: it must write nothing more.
    pub fn mark_stale(&self, key: AttemptKey) {
        if let Some(flow) = self.lock().entries.get(&key).and_then(|e| e.flow.clone()) {
            flow.mark_stale();
        }
    }

    /// This worker was replaced: none of its attempts may write anything more.
    pub fn mark_all_stale(&self) {
        let flows: Vec<_> = self.lock().entries.values().filter_map(|e| e.flow.clone()).collect();
        for flow in flows {
            flow.mark_stale();
        }
    }

    /// Takes the attempt in, or returns `None` if it is already held here.
    pub fn admit(&self, key: AttemptKey, wants: pb::Resources) -> Option<Admission> {
        let mut s = self.lock();
        if s.entries.contains_key(&key) {
            return None;
        }
        let mut short = Vec::new();
        let cpus_free = s.cpus.saturating_sub(s.cpus_used);
        if wants.cpus > cpus_free {
            short.push(format!(
                "{} CPU slot(s) wanted, {cpus_free} free of {}",
                wants.cpus, s.cpus
            ));
        }
        s.cpus_used += wants.cpus;

        let want_gpus = wants.gpus as usize;
        let mut gpus: Vec<usize> = (0..s.gpu_load.len())
            .filter(|&i| s.gpu_load[i] == 0)
            .take(want_gpus)
            .collect();
        if gpus.len() < want_gpus {
            short.push(format!(
                "{want_gpus} GPU(s) wanted, {} free of {}",
                gpus.len(),
                s.gpu_ids.len()
            ));
            // Share the least loaded ones rather than hide GPUs from a trial that asked for them.
            let mut busy: Vec<usize> = (0..s.gpu_load.len()).filter(|i| !gpus.contains(i)).collect();
            busy.sort_by_key(|&i| (s.gpu_load[i], i));
            gpus.extend(busy.into_iter().take(want_gpus - gpus.len()));
            gpus.sort_unstable();
        }
        for &g in &gpus {
            s.gpu_load[g] += 1;
        }
        let gpu_ids = gpus.iter().map(|&g| s.gpu_ids[g].clone()).collect();

        let (stop, stop_rx) = watch::channel(None);
        s.entries.insert(
            key,
            Entry {
                stop,
                flow: None,
                cpus: wants.cpus,
                gpus,
                runner_done: false,
                reports_done: false,
            },
        );
        drop(s);
        self.changed.notify_waiters();
        Some(Admission {
            gpu_ids,
            stop: stop_rx,
            overcommit: (!short.is_empty()).then(|| short.join("; ")),
        })
    }

    /// Orders a held attempt's runner to stop; the first order wins. Returns false when the
    /// attempt is not held or its program already ended.
    pub fn stop(&self, key: AttemptKey, order: Stop) -> bool {
        let s = self.lock();
        match s.entries.get(&key) {
            Some(e) if !e.runner_done => {
                e.stop.send_if_modified(|cur| {
                    if cur.is_some() {
                        return false;
                    }
                    *cur = Some(order);
                    true
                });
                true
            }
            _ => false,
        }
    }

    /// Orders every rank of an attempt held here to stop; returns how many were told.
    pub fn stop_attempt(&self, trial: TrialId, attempt: u32, order: Stop) -> usize {
        let keys: Vec<AttemptKey> = self
            .lock()
            .entries
            .keys()
            .filter(|k| k.trial == trial && k.attempt == attempt)
            .copied()
            .collect();
        keys.into_iter().filter(|k| self.stop(*k, order.clone())).count()
    }

    pub fn stop_all(&self, order: Stop) {
        let keys: Vec<AttemptKey> = self.lock().entries.keys().copied().collect();
        for k in keys {
            self.stop(k, order.clone());
        }
    }

    /// The program ended: its resources are free again.
    pub fn runner_done(&self, key: AttemptKey) {
        let mut s = self.lock();
        let Some(e) = s.entries.get_mut(&key) else { return };
        if e.runner_done {
            return;
        }
        e.runner_done = true;
        let (cpus, gpus) = (e.cpus, std::mem::take(&mut e.gpus));
        s.cpus_used = s.cpus_used.saturating_sub(cpus);
        for g in gpus {
            s.gpu_load[g] = s.gpu_load[g].saturating_sub(1);
        }
        Self::forget_if_done(&mut s, key);
        drop(s);
        self.changed.notify_waiters();
    }

    /// Its reports are delivered (or no longer wanted).
    pub fn reports_done(&self, key: AttemptKey) {
        let mut s = self.lock();
        let Some(e) = s.entries.get_mut(&key) else { return };
        e.reports_done = true;
        Self::forget_if_done(&mut s, key);
        drop(s);
        self.changed.notify_waiters();
    }

    fn forget_if_done(s: &mut State, key: AttemptKey) {
        if s.entries.get(&key).is_some_and(|e| e.runner_done && e.reports_done) {
            s.entries.remove(&key);
        }
    }

    /// What is in use now, for the worker's metrics.
    pub fn usage(&self) -> Usage {
        let s = self.lock();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Usage {
            cpus_busy: s.cpus_used,
            gpus_busy: count(s.gpu_load.iter().filter(|&&l| l > 0).count()),
            running: count(s.entries.values().filter(|e| !e.runner_done).count()),
            held: count(s.entries.len()),
        }
    }

    /// What Register and Heartbeat tell the coordinator is running here.
    pub fn running(&self) -> Vec<pb::RunningAttempt> {
        self.lock().entries.keys().map(|&k| k.into()).collect()
    }

    #[cfg(test)]
    pub fn is_held(&self, key: AttemptKey) -> bool {
        self.lock().entries.contains_key(&key)
    }

    fn holds(&self, cond: Held) -> bool {
        let s = self.lock();
        match cond {
            Held::NoRunner => s.entries.values().all(|e| e.runner_done),
            Held::Nothing => s.entries.is_empty(),
        }
    }

    pub async fn wait_until(&self, cond: Held) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the check and the await wakes us.
            changed.as_mut().enable();
            if self.holds(cond) {
                return;
            }
            changed.await;
        }
    }

    #[cfg(test)]
    fn used(&self) -> (u32, Vec<u32>) {
        let s = self.lock();
        (s.cpus_used, s.gpu_load.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpus: u32, gpus: u32) -> pb::Resources {
        pb::Resources { cpus, gpus }
    }

    fn gpus(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{}", i + 4)).collect()
    }

    #[test]
    fn duplicates_are_refused_until_the_attempt_is_forgotten() {
        let a = Attempts::new(4, vec![]);
        let k = AttemptKey::new(7, 1, 0);
        assert!(a.admit(k, res(1, 0)).is_some());
        assert!(a.admit(k, res(1, 0)).is_none());
        assert!(a.admit(AttemptKey::new(7, 2, 0), res(1, 0)).is_some());
        a.runner_done(k);
        assert!(a.admit(k, res(1, 0)).is_none(), "reports still pending: still held");
        assert_eq!(a.running().len(), 2);
        a.reports_done(k);
        assert!(!a.is_held(k));
        assert_eq!(
            a.running(),
            vec![pb::RunningAttempt {
                trial_id: 7,
                attempt: 2,
                rank: 0,
            }]
        );
    }

    #[test]
    fn gpus_are_allotted_free_first_and_freed_on_exit() {
        let a = Attempts::new(8, gpus(3));
        let x = a.admit(AttemptKey::new(1, 1, 0), res(1, 2)).unwrap();
        assert_eq!(x.gpu_ids, vec!["4", "5"]);
        assert!(x.overcommit.is_none());
        let y = a.admit(AttemptKey::new(2, 1, 0), res(1, 1)).unwrap();
        assert_eq!(y.gpu_ids, vec!["6"]);
        assert_eq!(a.used(), (2, vec![1, 1, 1]));
        a.runner_done(AttemptKey::new(1, 1, 0));
        assert_eq!(a.used(), (1, vec![0, 0, 1]));
        let z = a.admit(AttemptKey::new(3, 1, 0), res(1, 1)).unwrap();
        assert_eq!(z.gpu_ids, vec!["4"]);
    }

    #[test]
    fn usage_counts_what_is_allotted_and_what_is_held() {
        let a = Attempts::new(4, gpus(2));
        let idle = Usage {
            cpus_busy: 0,
            gpus_busy: 0,
            running: 0,
            held: 0,
        };
        assert_eq!(a.usage(), idle);
        a.admit(AttemptKey::new(1, 1, 0), res(2, 1)).unwrap();
        a.admit(AttemptKey::new(2, 1, 0), res(1, 0)).unwrap();
        assert_eq!(
            a.usage(),
            Usage {
                cpus_busy: 3,
                gpus_busy: 1,
                running: 2,
                held: 2,
            }
        );
        // Ended but not yet delivered: no longer running or using anything, still held.
        a.runner_done(AttemptKey::new(1, 1, 0));
        assert_eq!(
            a.usage(),
            Usage {
                cpus_busy: 1,
                gpus_busy: 0,
                running: 1,
                held: 2,
            }
        );
        a.reports_done(AttemptKey::new(1, 1, 0));
        a.runner_done(AttemptKey::new(2, 1, 0));
        a.reports_done(AttemptKey::new(2, 1, 0));
        assert_eq!(a.usage(), idle);
    }

    #[test]
    fn an_attempt_that_does_not_fit_still_runs_with_a_warning() {
        let a = Attempts::new(2, gpus(2));
        a.admit(AttemptKey::new(1, 1, 0), res(2, 1)).unwrap();
        let over = a.admit(AttemptKey::new(2, 1, 0), res(1, 2)).unwrap();
        let why = over.overcommit.unwrap();
        assert!(why.contains("CPU") && why.contains("GPU"), "{why}");
        assert_eq!(over.gpu_ids, vec!["4", "5"]);
        assert_eq!(a.used(), (3, vec![2, 1]));
        a.runner_done(AttemptKey::new(2, 1, 0));
        assert_eq!(a.used(), (2, vec![1, 0]));
        let none = Attempts::new(1, vec![])
            .admit(AttemptKey::new(1, 1, 0), res(1, 1))
            .unwrap();
        assert!(none.gpu_ids.is_empty() && none.overcommit.is_some());
    }

    #[test]
    fn the_first_stop_order_wins_and_ended_runners_ignore_orders() {
        let a = Attempts::new(1, vec![]);
        let k = AttemptKey::new(1, 1, 0);
        let adm = a.admit(k, res(1, 0)).unwrap();
        assert!(a.stop(k, Stop::Kill("first".into())));
        assert!(a.stop(k, Stop::Shutdown));
        assert_eq!(*adm.stop.borrow(), Some(Stop::Kill("first".into())));
        a.runner_done(k);
        assert!(!a.stop(k, Stop::Shutdown));
        assert!(!a.stop(AttemptKey::new(9, 9, 0), Stop::Shutdown));
    }

    #[tokio::test]
    async fn waiting_for_an_empty_worker_ends_when_the_last_attempt_is_forgotten() {
        let a = std::sync::Arc::new(Attempts::new(1, vec![]));
        let k = AttemptKey::new(1, 1, 0);
        a.admit(k, res(1, 0)).unwrap();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.wait_until(Held::Nothing).await }
        });
        tokio::task::yield_now().await;
        a.runner_done(k);
        a.wait_until(Held::NoRunner).await;
        assert!(!waiter.is_finished());
        a.reports_done(k);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
