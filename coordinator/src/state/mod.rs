//! Everything the coordinator knows, behind one lock, and every state transition, one file
//! per concern: experiments, placement, trials and their attempts, workers and their leases,
//! reports, rendezvous, and the reconcile pass.
//!
//! Handlers and the reconcile loop lock [`State`], apply a change in memory, and call
//! [`State::flush`], which hands the touched records to the store's writer and returns a
//! [`Commit`]; they let go of the lock and wait on it before they answer. Worker commands and
//! change notifications go out only after the commit that made their change durable, so
//! nothing is acknowledged or acted on before the store holds it. When a commit fails (a full
//! disk), the writer puts the records in memory back to what the store holds ([`State::reload`])
//! and every caller whose change was lost gets the error. The lock is a std mutex because no
//! critical section awaits or touches the disk; each is short and bounded.
//!
//! The state speaks domain types ([`crate::protocol`]), never protobuf, and reads time from
//! its [`Clock`], never from the system directly.

mod experiments;
mod lifecycle;
mod placement;
mod reconcile;
mod rendezvous;
mod reports;
mod trials;
mod workers;

pub use lifecycle::DeletePlan;
pub use workers::WorkerSummary;

use crate::clock::Clock;
use crate::cluster::{Registry, WorkerEpoch};
use crate::error::{CoordError, Result};
use crate::experiment::Experiment;
use crate::protocol::{Command, RunningAttempt};
use crate::rendezvous::Rendezvous;
use crate::scheduler::Resources;
use crate::store::writer::{Commit, Writer};
use crate::store::{AttemptRow, Batch, Store};
use crate::telemetry::{Gauges, Telemetry};
use crate::trial::{AfterFailure, Live, TrialRecord, after_failure};
use chorus_core::convert::{ExperimentState, TrialState};
use chorus_core::{ExperimentId, TrialId, WorkerId};
use chorus_search::{SearchAction, SearchEvent, Suggestion};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Timing knobs of leases and reconciliation.
#[derive(Debug, Clone)]
pub struct Timing {
    /// A worker whose last heartbeat is older than this is gone.
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// An assignment the worker has not started after this long is placed again.
    pub start_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            start_timeout: Duration::from_secs(60),
        }
    }
}

pub use crate::protocol::Change;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub killed: u64,
    /// Held at a rung by successive halving: neither placed nor counted as active.
    pub paused: u64,
}

impl Counts {
    fn slot(&mut self, s: TrialState) -> &mut u64 {
        match s {
            TrialState::Pending => &mut self.pending,
            TrialState::Running => &mut self.running,
            TrialState::Completed => &mut self.completed,
            TrialState::Failed => &mut self.failed,
            TrialState::Killed => &mut self.killed,
            TrialState::Paused => &mut self.paused,
        }
    }

    pub fn active(&self) -> u64 {
        self.pending + self.running
    }
}

pub struct State {
    pub timing: Timing,
    pub clock: Clock,
    pub experiments: BTreeMap<ExperimentId, Experiment>,
    pub trials: BTreeMap<TrialId, TrialRecord>,
    /// Per experiment: trial counts by state, and the best trial so far.
    pub counts: BTreeMap<ExperimentId, Counts>,
    pub best: BTreeMap<ExperimentId, (TrialId, f64)>,
    pub registry: Registry,
    /// Trials not yet in a terminal state.
    open: BTreeSet<TrialId>,
    /// Trials with a live attempt, and by worker the trials with a rank there: what a
    /// heartbeat or a worker listing looks at, instead of every trial.
    live: BTreeSet<TrialId>,
    live_on: BTreeMap<WorkerId, BTreeSet<TrialId>>,
    /// Registered, undrained workers with a free CPU slot or GPU, most room first (then by
    /// id, the scheduler's own order): a placement pass offers the first of them, so a
    /// cluster of thousands of workers costs it little, busy or idle.
    with_room: BTreeSet<RoomKey>,
    /// Each worker's key in `with_room`.
    room_of: BTreeMap<WorkerId, RoomKey>,
    next_experiment: u64,
    next_trial: u64,
    /// Experiments created and not yet written (their row carries the spec).
    created_experiments: BTreeSet<ExperimentId>,
    dirty_experiments: BTreeSet<ExperimentId>,
    dirty_trials: BTreeSet<TrialId>,
    attempts: Vec<AttemptRow>,
    /// Registrations not yet written: each one's epoch is durable before Register answers it.
    epoch_writes: Vec<WorkerEpoch>,
    outbox: Vec<(WorkerId, Command)>,
    changed: Vec<Change>,
    pub telemetry: Arc<Telemetry>,
    /// Rendezvous of live multi-rank attempts, by trial (in memory: ranks call again after a
    /// coordinator restart).
    rendezvous: BTreeMap<TrialId, Rendezvous>,
    /// Workers drained of new trials: what runs there finishes, nothing new is placed.
    pub drained: BTreeSet<WorkerId>,
    drained_dirty: bool,
    /// Something changed that may let a pending trial be placed (a trial became pending, an
    /// attempt freed its slots, a worker connected, a budget grew): the next pump runs the
    /// scheduler. Without it, a pass has nothing new to place and costs no walk.
    placement_due: bool,
    /// The store's writer; absent until [`State::attach`] (a state being loaded writes nothing).
    writer: Option<Writer>,
    cluster_id: String,
    /// Experiments removed since the last flush, whose rows the next commit deletes.
    removed_experiments: Vec<ExperimentId>,
}

impl State {
    /// Rebuilds the state from the store. Live attempts are kept: their workers get one lease
    /// to re-register and claim them before the attempts are placed again. Nothing is written
    /// until a writer is attached.
    pub fn load(store: &Store, timing: Timing, clock: Clock, telemetry: Arc<Telemetry>) -> Result<State> {
        let mut st = State {
            timing,
            clock,
            experiments: BTreeMap::new(),
            trials: BTreeMap::new(),
            counts: BTreeMap::new(),
            best: BTreeMap::new(),
            registry: Registry::with_epochs(store.load_worker_epochs()?),
            open: BTreeSet::new(),
            live: BTreeSet::new(),
            live_on: BTreeMap::new(),
            with_room: BTreeSet::new(),
            room_of: BTreeMap::new(),
            next_experiment: 1,
            next_trial: 1,
            created_experiments: BTreeSet::new(),
            dirty_experiments: BTreeSet::new(),
            dirty_trials: BTreeSet::new(),
            attempts: Vec::new(),
            epoch_writes: Vec::new(),
            outbox: Vec::new(),
            changed: Vec::new(),
            telemetry,
            rendezvous: BTreeMap::new(),
            drained: BTreeSet::new(),
            drained_dirty: false,
            placement_due: true,
            writer: None,
            cluster_id: store.cluster_id().to_string(),
            removed_experiments: Vec::new(),
        };
        st.reload(store)?;
        Ok(st)
    }

    /// Hands the store to its writer thread; from now on every flush is committed there.
    pub fn attach(state: &Arc<std::sync::Mutex<State>>, store: Store, events: broadcast::Sender<Change>) {
        let telemetry = state.lock().unwrap_or_else(|p| p.into_inner()).telemetry.clone();
        let weak = Arc::downgrade(state);
        let reload = Box::new(move |store: &Store, under_lock: &mut dyn FnMut()| {
            let Some(state) = weak.upgrade() else {
                return Ok(());
            };
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            under_lock();
            st.reload(store)
        });
        let writer = Writer::start(store, reload, events, telemetry);
        state.lock().unwrap_or_else(|p| p.into_inner()).writer = Some(writer);
    }

    /// This coordinator's cluster id (kept in its store).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Replaces every record held in memory with what the store holds: at start, and after a
    /// commit failed, so that memory is never ahead of what is durable. What only ever lives in
    /// memory stays (worker leases and streams, telemetry), rendezvous start again (their ranks
    /// call again), and ids already handed out are not handed out again.
    pub fn reload(&mut self, store: &Store) -> Result<()> {
        let drained: BTreeSet<WorkerId> = store.load_drained()?.into_iter().collect();
        let mut searchers = store.load_searchers()?;
        let mut experiments = BTreeMap::new();
        let mut counts: BTreeMap<ExperimentId, Counts> = BTreeMap::new();
        let mut next_experiment = self.next_experiment;
        for row in store.load_experiments()? {
            next_experiment = next_experiment.max(row.id.0 + 1);
            let id = row.id;
            // A stored spec that can no longer be read must not keep the coordinator from
            // starting: its experiment is kept (records, trials) and ends as failed, saying why.
            let saved = searchers.remove(&id).unwrap_or_default();
            let exp = match Experiment::from_row(row.clone(), saved) {
                Ok(exp) => exp,
                Err(e) => {
                    let reason = format!("its stored spec can no longer be read: {}", one_line(&e));
                    tracing::error!(experiment = %id, "{reason}");
                    Experiment::unreadable(row, &reason)
                }
            };
            counts.insert(id, Counts::default());
            experiments.insert(id, exp);
        }
        let mut trials = BTreeMap::new();
        let mut open = BTreeSet::new();
        let mut best: BTreeMap<ExperimentId, (TrialId, f64)> = BTreeMap::new();
        let mut next_trial = self.next_trial;
        for t in store.load_trials()? {
            next_trial = next_trial.max(t.id.0 + 1);
            let Some(exp) = experiments.get_mut(&t.experiment) else {
                continue;
            };
            exp.trials.push(t.id);
            *counts.entry(t.experiment).or_default().slot(t.state) += 1;
            if !t.state.is_terminal() {
                open.insert(t.id);
            }
            if let Some(v) = t.best_value {
                let goal = exp.goal();
                let entry = best.entry(t.experiment).or_insert((t.id, v));
                if goal.better(v, entry.1) {
                    *entry = (t.id, v);
                }
            }
            trials.insert(t.id, t);
        }
        let (now, now_ms) = (self.clock.now(), self.clock.now_ms());
        for t in trials.values() {
            if let Some(live) = &t.live {
                for w in live.workers() {
                    // A worker the registry already knows keeps its lease.
                    self.registry.expect(w, now, now_ms);
                }
            }
        }
        self.live.clear();
        self.live_on.clear();
        for (id, t) in &trials {
            if let Some(l) = &t.live {
                self.live.insert(*id);
                for w in l.workers() {
                    self.live_on.entry(w).or_default().insert(*id);
                }
            }
        }
        self.experiments = experiments;
        self.trials = trials;
        self.drained = drained;
        let known: Vec<WorkerId> = self.registry.workers.keys().cloned().collect();
        self.with_room.clear();
        self.room_of.clear();
        for w in &known {
            self.refresh_room(w);
        }
        self.counts = counts;
        self.best = best;
        self.open = open;
        self.next_experiment = next_experiment;
        self.next_trial = next_trial;
        self.created_experiments.clear();
        self.dirty_experiments.clear();
        self.dirty_trials.clear();
        self.attempts.clear();
        self.epoch_writes.clear();
        self.removed_experiments.clear();
        self.outbox.clear();
        self.changed.clear();
        self.drained_dirty = false;
        self.placement_due = true;
        self.rendezvous.clear();
        self.fail_unreadable_searchers();
        Ok(())
    }

    /// An experiment whose searcher state cannot be read fails, saying why: starting its search
    /// over would run its trials again.
    fn fail_unreadable_searchers(&mut self) {
        let broken: Vec<(ExperimentId, String)> = self
            .experiments
            .iter()
            .filter_map(|(id, e)| Some((*id, e.unreadable_searcher.as_ref()?.reason.clone())))
            .collect();
        for (id, reason) in broken {
            if self.experiments[&id].state.is_terminal() {
                tracing::warn!(experiment = %id, %reason, "ended experiment's searcher state cannot be read");
                continue;
            }
            tracing::error!(experiment = %id, %reason, "failing the experiment: its searcher state cannot be read");
            self.end_experiment(id, ExperimentState::Failed, &reason);
        }
    }

    /// Reserves an experiment id before its spec is written to storage.
    pub fn reserve_experiment_id(&mut self) -> ExperimentId {
        let id = ExperimentId(self.next_experiment);
        self.next_experiment += 1;
        id
    }

    /// Hands every touched record to the store's writer, with the commands and notifications
    /// to send once they are durable. The caller lets go of the lock, then waits on the
    /// returned [`Commit`] before it answers; with nothing to write and nothing in flight it
    /// resolves at once.
    pub fn flush(&mut self) -> Commit {
        self.flush_with(true)
    }

    /// Flushes a change whose answer says nothing that other changes made (a heartbeat that
    /// renews a lease and kills nothing): when it touched nothing itself, it does not wait for
    /// commits of others in flight.
    pub fn flush_own(&mut self) -> Commit {
        self.flush_with(false)
    }

    fn flush_with(&mut self, depends: bool) -> Commit {
        let mut searchers = Vec::new();
        for id in &self.dirty_experiments {
            if let Some(e) = self.experiments.get_mut(id) {
                searchers.extend(e.take_searcher_writes());
            }
        }
        let batch = Batch {
            experiments: self
                .dirty_experiments
                .iter()
                .filter_map(|id| {
                    let e = self.experiments.get(id)?;
                    Some(e.row(self.created_experiments.contains(id)))
                })
                .collect(),
            trials: self
                .dirty_trials
                .iter()
                .filter_map(|id| self.trials.get(id).cloned())
                .collect(),
            searchers,
            attempts: std::mem::take(&mut self.attempts),
            epochs: std::mem::take(&mut self.epoch_writes),
            drained: std::mem::take(&mut self.drained_dirty).then(|| self.drained.iter().cloned().collect()),
            removed_experiments: std::mem::take(&mut self.removed_experiments),
        };
        self.created_experiments.clear();
        self.dirty_experiments.clear();
        self.dirty_trials.clear();
        let commands = std::mem::take(&mut self.outbox)
            .into_iter()
            .filter_map(|(worker, cmd)| Some((self.registry.sender(&worker)?, cmd)))
            .collect();
        let changes = std::mem::take(&mut self.changed);
        match &self.writer {
            Some(w) => w.submit(batch, commands, changes, depends),
            None => {
                debug_assert!(batch.is_empty(), "a state without a writer changed records");
                Commit::done()
            }
        }
    }

    /// The store's writer.
    pub(crate) fn writer(&self) -> &Writer {
        self.writer.as_ref().expect("a writer is attached")
    }

    /// The gauges the Prometheus endpoint shows.
    pub fn gauges(&self) -> Gauges {
        let experiments = [
            ExperimentState::Active,
            ExperimentState::Paused,
            ExperimentState::Completed,
            ExperimentState::Failed,
            ExperimentState::Killed,
        ]
        .into_iter()
        .map(|s| {
            (
                s.as_str(),
                self.experiments.values().filter(|e| e.state == s).count() as u64,
            )
        })
        .collect();
        let mut t = Counts::default();
        for c in self.counts.values() {
            t.pending += c.pending;
            t.running += c.running;
            t.completed += c.completed;
            t.failed += c.failed;
            t.killed += c.killed;
            t.paused += c.paused;
        }
        let registered: Vec<_> = self.registry.workers.values().filter(|w| w.registered).collect();
        Gauges {
            experiments,
            trials: vec![
                ("pending", t.pending),
                ("running", t.running),
                ("completed", t.completed),
                ("failed", t.failed),
                ("killed", t.killed),
                ("paused", t.paused),
            ],
            workers: registered.len() as u64,
            ranks_waiting: self.ranks_waiting(),
            cpu_capacity: registered.iter().map(|w| w.capacity.cpus as u64).sum(),
            cpu_busy: self.busy_cpu_slots(),
        }
    }

    /// Ranks the scheduler would place if it had room: every rank (at the most a trial asks
    /// for) of each pending trial of an active experiment with no live attempt, the same trials
    /// a placement pass considers.
    pub fn ranks_waiting(&self) -> u64 {
        self.open
            .iter()
            .filter_map(|tid| {
                let t = &self.trials[tid];
                let exp = &self.experiments[&t.experiment];
                (t.live.is_none() && t.state == TrialState::Pending && exp.state == ExperimentState::Active)
                    .then(|| exp.spec.spec.resources.workers.max() as u64)
            })
            .sum()
    }

    fn touch_trial(&mut self, t: TrialId, exp: ExperimentId) {
        self.dirty_trials.insert(t);
        self.changed.push((exp, Some(t)));
    }

    fn touch_experiment(&mut self, e: ExperimentId) {
        self.dirty_experiments.insert(e);
        self.changed.push((e, None));
    }

    fn set_trial_state(&mut self, id: TrialId, new: TrialState) {
        let Some(t) = self.trials.get_mut(&id) else {
            return;
        };
        let (old, exp) = (t.state, t.experiment);
        if old == new {
            return;
        }
        t.state = new;
        let c = self.counts.entry(exp).or_default();
        *c.slot(old) -= 1;
        *c.slot(new) += 1;
        if new.is_terminal() {
            self.open.remove(&id);
        }
        if new == TrialState::Pending {
            self.placement_due = true;
        }
        self.touch_trial(id, exp);
    }
}

impl State {
    /// Records that a trial's attempt now lives on its workers.
    fn index_live(&mut self, tid: TrialId) {
        let Some(l) = self.trials.get(&tid).and_then(|t| t.live.as_ref()) else {
            return;
        };
        self.live.insert(tid);
        let workers = l.workers();
        for w in &workers {
            self.live_on.entry(w.clone()).or_default().insert(tid);
            self.refresh_room(w);
        }
    }

    /// Records that a trial's attempt on `workers` ended.
    fn unindex_live(&mut self, tid: TrialId, workers: &[WorkerId]) {
        self.live.remove(&tid);
        self.placement_due = true;
        for w in workers {
            if let Some(s) = self.live_on.get_mut(w) {
                s.remove(&tid);
                if s.is_empty() {
                    self.live_on.remove(w);
                }
            }
            self.refresh_room(w);
        }
    }

    /// What the live attempts on a worker take of it.
    fn used_on(&self, worker: &WorkerId) -> Resources {
        let mut used = Resources::default();
        for tid in self.live_on.get(worker).into_iter().flatten() {
            let Some(t) = self.trials.get(tid) else { continue };
            let Some(l) = &t.live else { continue };
            let r = &self.experiments[&t.experiment].spec.spec.resources;
            let here = l.ranks.iter().filter(|x| &x.worker == worker).count() as u32;
            used.cpus += r.cpus * here;
            used.gpus += r.gpus * here;
        }
        used
    }

    /// Puts a worker in or out of the set of those with room, after its registration, drain
    /// or live attempts changed.
    fn refresh_room(&mut self, worker: &WorkerId) {
        let room = self.registry.workers.get(worker).and_then(|e| {
            let used = self.used_on(worker);
            let free = Resources {
                cpus: e.capacity.cpus.saturating_sub(used.cpus),
                gpus: e.capacity.gpus.saturating_sub(used.gpus),
            };
            (e.registered && !e.leaving && !self.drained.contains(worker) && free != Resources::default())
                .then_some(free)
        });
        self.forget_room(worker);
        if let Some(free) = room {
            let key = RoomKey {
                gpus: std::cmp::Reverse(free.gpus),
                cpus: std::cmp::Reverse(free.cpus),
                worker: worker.clone(),
            };
            self.with_room.insert(key.clone());
            self.room_of.insert(worker.clone(), key);
        }
    }

    /// Takes a worker out of the set of those with room.
    fn forget_room(&mut self, worker: &WorkerId) {
        if let Some(key) = self.room_of.remove(worker) {
            self.with_room.remove(&key);
        }
    }
}

/// A worker's place among those with room: most free GPUs, then most free CPU slots, then id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RoomKey {
    gpus: std::cmp::Reverse<u32>,
    cpus: std::cmp::Reverse<u32>,
    worker: WorkerId,
}

/// A spec error on one line, for a message.
fn one_line(e: &chorus_core::CoreError) -> String {
    match e {
        chorus_core::CoreError::Spec(errs) => errs.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        other => other.to_string(),
    }
}

/// Workers as one attempt-row field.
fn joined(workers: &[WorkerId]) -> WorkerId {
    WorkerId(workers.iter().map(|w| w.0.as_str()).collect::<Vec<_>>().join(","))
}

#[cfg(test)]
mod tests;
