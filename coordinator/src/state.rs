//! Everything the coordinator knows, behind one lock, and every state transition.
//!
//! Handlers and the reconcile loop lock [`State`], apply a change, and call [`State::flush`]
//! before they answer: flush writes every touched record in one durable transaction, and only
//! then sends worker commands and change notifications. When the commit fails (a full disk),
//! the records in memory are read back from the store, so nothing the store does not hold is
//! ever seen, sent or acknowledged, and the caller gets the error. The lock is a std mutex
//! because no critical section awaits; each is short and bounded (one SQLite commit at most).

use crate::cluster::Registry;
use crate::error::{CoordError, Result};
use crate::experiment::{AfterFailure, Experiment, Live, TrialRecord, after_failure};
use crate::rendezvous::{Joined, Rendezvous};
use crate::scheduler::{self, PendingTrial, Quotas, Resources, WorkerView};
use crate::store::{AttemptRow, Batch, MetricRow, Store};
use chorus_core::convert::{ExperimentState, TrialState};
use chorus_core::metric::MetricReport;
use chorus_core::spec::ValidSpec;
use chorus_core::{ExperimentId, TrialId, WorkerId};
use chorus_proto::pb;
use chorus_search::{SearchAction, SearchEvent, Suggestion};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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

/// A change clients may want to see: the experiment, and the trial if one changed.
pub type Change = (ExperimentId, Option<TrialId>);

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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub struct State {
    store: Store,
    pub timing: Timing,
    pub experiments: BTreeMap<ExperimentId, Experiment>,
    pub trials: BTreeMap<TrialId, TrialRecord>,
    /// Per experiment: trial counts by state, and the best trial so far.
    pub counts: BTreeMap<ExperimentId, Counts>,
    pub best: BTreeMap<ExperimentId, (TrialId, f64)>,
    pub registry: Registry,
    /// Trials not yet in a terminal state.
    open: BTreeSet<TrialId>,
    next_experiment: u64,
    next_trial: u64,
    dirty_experiments: BTreeSet<ExperimentId>,
    dirty_trials: BTreeSet<TrialId>,
    metrics: Vec<MetricRow>,
    attempts: Vec<AttemptRow>,
    outbox: Vec<(WorkerId, pb::WorkerCommand)>,
    changed: Vec<Change>,
    events: broadcast::Sender<Change>,
    pub telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
    /// Rendezvous of live multi-rank attempts, by trial (in memory: ranks call again after a
    /// coordinator restart).
    rendezvous: BTreeMap<TrialId, Rendezvous>,
    /// Workers drained of new trials: what runs there finishes, nothing new is placed.
    pub drained: BTreeSet<WorkerId>,
    drained_dirty: bool,
    /// Since when commits have been failing, and when that was last logged.
    store_failing: Option<(Instant, Instant)>,
}

/// How often a store that keeps failing is logged again.
const STORE_FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

impl State {
    /// Rebuilds the state from the store. Live attempts are kept: their workers get one lease
    /// to re-register and claim them before the attempts are placed again.
    pub fn load(store: Store, timing: Timing, events: broadcast::Sender<Change>) -> Result<State> {
        let mut st = State {
            store,
            timing,
            experiments: BTreeMap::new(),
            trials: BTreeMap::new(),
            counts: BTreeMap::new(),
            best: BTreeMap::new(),
            registry: Registry::default(),
            open: BTreeSet::new(),
            next_experiment: 1,
            next_trial: 1,
            dirty_experiments: BTreeSet::new(),
            dirty_trials: BTreeSet::new(),
            metrics: Vec::new(),
            attempts: Vec::new(),
            outbox: Vec::new(),
            changed: Vec::new(),
            events,
            telemetry: Default::default(),
            rendezvous: BTreeMap::new(),
            drained: BTreeSet::new(),
            drained_dirty: false,
            store_failing: None,
        };
        st.read_store()?;
        Ok(st)
    }

    /// This coordinator's cluster id (kept in its store).
    pub fn cluster_id(&self) -> &str {
        self.store.cluster_id()
    }

    /// The directory holding the store.
    pub fn store_path(&self) -> &std::path::Path {
        self.store.path()
    }

    /// Replaces every record held in memory with what the store holds: at start, and after a
    /// commit failed, so that memory is never ahead of what is durable. What only ever lives in
    /// memory stays (worker leases and streams, telemetry), rendezvous start again (their ranks
    /// call again), and ids already handed out are not handed out again.
    fn read_store(&mut self) -> Result<()> {
        let drained: BTreeSet<WorkerId> = self.store.load_drained()?.into_iter().collect();
        let mut experiments = BTreeMap::new();
        let mut counts: BTreeMap<ExperimentId, Counts> = BTreeMap::new();
        let mut next_experiment = self.next_experiment;
        for row in self.store.load_experiments()? {
            next_experiment = next_experiment.max(row.id.0 + 1);
            let id = row.id;
            // A stored spec that can no longer be read must not keep the coordinator from
            // starting: its experiment is kept (records, trials) and ends as failed, saying why.
            let exp = match Experiment::from_row(row.clone()) {
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
        for t in self.store.load_trials()? {
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
        let (now, now_ms) = (Instant::now(), now_ms());
        for t in trials.values() {
            if let Some(live) = &t.live {
                for w in live.workers() {
                    // A worker the registry already knows keeps its lease.
                    self.registry.expect(w, now, now_ms);
                }
            }
        }
        for (tid, attempt, n) in self.store.open_metric_counts()? {
            if let Some(t) = trials.get_mut(&tid) {
                t.acked_metrics.insert(attempt, n);
            }
        }
        self.experiments = experiments;
        self.trials = trials;
        self.counts = counts;
        self.best = best;
        self.open = open;
        self.drained = drained;
        self.next_experiment = next_experiment;
        self.next_trial = next_trial;
        self.dirty_experiments.clear();
        self.dirty_trials.clear();
        self.metrics.clear();
        self.attempts.clear();
        self.outbox.clear();
        self.changed.clear();
        self.drained_dirty = false;
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

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.events.subscribe()
    }

    /// Reserves an experiment id before its spec is written to storage.
    pub fn reserve_experiment_id(&mut self) -> ExperimentId {
        let id = ExperimentId(self.next_experiment);
        self.next_experiment += 1;
        id
    }

    /// Writes every touched record in one transaction, then sends commands and notifications.
    ///
    /// When the commit fails, nothing of the change is kept: the records are read back from
    /// the store (which rolled the transaction back), nothing is sent, and the error says why
    /// (a full disk is `RESOURCE_EXHAUSTED`). Reads go on working; the next commit that
    /// succeeds is the recovery.
    pub fn flush(&mut self) -> Result<()> {
        let batch = Batch {
            experiments: self
                .dirty_experiments
                .iter()
                .filter_map(|id| self.experiments.get(id).map(Experiment::row))
                .collect(),
            trials: self
                .dirty_trials
                .iter()
                .filter_map(|id| self.trials.get(id).cloned())
                .collect(),
            metrics: std::mem::take(&mut self.metrics),
            attempts: std::mem::take(&mut self.attempts),
            drained: std::mem::take(&mut self.drained_dirty).then(|| self.drained.iter().cloned().collect()),
        };
        let started = Instant::now();
        let committed = self.store.commit(&batch);
        if !batch.is_empty() {
            self.telemetry
                .store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if let Err(e) = committed {
            let err = CoordError::store_write(self.store.path(), e);
            self.telemetry.store_commit_failures.inc();
            let now = Instant::now();
            match &mut self.store_failing {
                None => {
                    tracing::error!(error = %err, "a store commit failed; the change was dropped");
                    self.store_failing = Some((now, now));
                }
                Some((_, logged)) if now.duration_since(*logged) >= STORE_FAILURE_LOG_EVERY => {
                    tracing::error!(error = %err, "store commits are still failing");
                    *logged = now;
                }
                Some(_) => {}
            }
            if let Err(read) = self.read_store() {
                // Memory now holds changes the store does not: acting on them could lose or
                // repeat work. A restart rebuilds from what was committed.
                tracing::error!(error = %read, "cannot read the store back after a failed commit; exiting");
                std::process::exit(70);
            }
            return Err(err);
        }
        if let Some((since, _)) = self.store_failing.take() {
            tracing::info!(failing_for = ?since.elapsed(), "store commits succeed again");
        }
        self.dirty_experiments.clear();
        self.dirty_trials.clear();
        for (worker, cmd) in std::mem::take(&mut self.outbox) {
            self.registry.send(&worker, cmd);
        }
        for c in std::mem::take(&mut self.changed) {
            let _ = self.events.send(c);
        }
        Ok(())
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
        self.touch_trial(id, exp);
    }

    // ---- experiments -------------------------------------------------------------------

    pub fn add_experiment(&mut self, id: ExperimentId, spec: ValidSpec, storage: String) -> ExperimentId {
        let exp = Experiment::new(id, spec, storage, now_ms());
        self.experiments.insert(id, exp);
        self.counts.insert(id, Counts::default());
        self.touch_experiment(id);
        self.pump();
        id
    }

    pub fn experiment(&self, id: ExperimentId) -> Result<&Experiment> {
        self.experiments
            .get(&id)
            .ok_or_else(|| CoordError::NotFound(format!("experiment {id} does not exist")))
    }

    fn live_experiment(&mut self, id: ExperimentId, verb: &str) -> Result<&mut Experiment> {
        let exp = self
            .experiments
            .get_mut(&id)
            .ok_or_else(|| CoordError::NotFound(format!("experiment {id} does not exist")))?;
        if exp.state.is_terminal() {
            return Err(CoordError::FailedPrecondition(format!(
                "cannot {verb} experiment {id}: it has already ended ({})",
                exp.state
            )));
        }
        Ok(exp)
    }

    pub fn pause(&mut self, id: ExperimentId) -> Result<()> {
        if self.live_experiment(id, "pause")?.state == ExperimentState::Paused {
            return Ok(());
        }
        let exp = self.experiments.get_mut(&id).expect("checked above");
        exp.state = ExperimentState::Paused;
        let running: Vec<TrialId> = exp
            .trials
            .iter()
            .copied()
            .filter(|t| self.open.contains(t) && self.trials[t].state != TrialState::Paused)
            .collect();
        self.touch_experiment(id);
        // Running attempts stop now and resume from their last checkpoint later; a pause
        // costs no restart. Trials held at a rung stay held.
        for t in running {
            self.kill_live(t, "experiment paused");
            self.set_trial_state(t, TrialState::Pending);
        }
        Ok(())
    }

    pub fn resume(&mut self, id: ExperimentId) -> Result<()> {
        let exp = self.live_experiment(id, "resume")?;
        if exp.state == ExperimentState::Active {
            return Ok(());
        }
        exp.state = ExperimentState::Active;
        self.touch_experiment(id);
        self.pump();
        Ok(())
    }

    pub fn kill(&mut self, id: ExperimentId) -> Result<()> {
        self.live_experiment(id, "kill")?;
        self.end_experiment(id, ExperimentState::Killed, "killed by user");
        Ok(())
    }

    pub fn update_budget(
        &mut self,
        id: ExperimentId,
        max_trials: Option<u64>,
        parallel_trials: Option<u32>,
        max_failed_trials: Option<u64>,
    ) -> Result<()> {
        let exp = self.live_experiment(id, "update")?;
        if let Some(m) = max_trials {
            if m < exp.created_trials {
                return Err(CoordError::InvalidArgument(format!(
                    "max_trials: {m} is below the {} trials already created",
                    exp.created_trials
                )));
            }
            if m == 0 {
                return Err(CoordError::InvalidArgument("max_trials: must be at least 1".into()));
            }
        }
        if parallel_trials == Some(0) {
            return Err(CoordError::InvalidArgument(
                "parallel_trials: must be at least 1".into(),
            ));
        }
        if let Some(m) = max_trials {
            exp.max_trials = m;
        }
        if let Some(p) = parallel_trials {
            exp.parallel_trials = p;
        }
        if let Some(f) = max_failed_trials {
            exp.max_failed_trials = Some(f);
        }
        self.touch_experiment(id);
        self.check_failed_budget(id);
        self.pump();
        Ok(())
    }

    /// Ends an experiment: every open trial is killed with `reason`.
    fn end_experiment(&mut self, id: ExperimentId, state: ExperimentState, reason: &str) {
        let Some(exp) = self.experiments.get_mut(&id) else {
            return;
        };
        exp.state = state;
        exp.ended_ms = now_ms();
        exp.message = reason.to_string();
        let open: Vec<TrialId> = exp.trials.iter().copied().filter(|t| self.open.contains(t)).collect();
        self.touch_experiment(id);
        for t in open {
            self.kill_live(t, reason);
            if let Some(tr) = self.trials.get_mut(&t) {
                tr.message = reason.to_string();
                tr.ended_ms = now_ms();
            }
            self.set_trial_state(t, TrialState::Killed);
        }
    }

    fn check_failed_budget(&mut self, id: ExperimentId) {
        let (Some(exp), Some(c)) = (self.experiments.get(&id), self.counts.get(&id)) else {
            return;
        };
        if let Some(max) = exp.max_failed_trials
            && c.failed > max
            && !exp.state.is_terminal()
        {
            let reason = format!("{} trials failed, more than max_failed_trials ({max})", c.failed);
            self.end_experiment(id, ExperimentState::Failed, &reason);
        }
    }

    /// Creates trials while the experiment has room, completes finished experiments, and
    /// places pending trials on workers.
    pub fn pump(&mut self) {
        let ids: Vec<ExperimentId> = self
            .experiments
            .iter()
            .filter(|(_, e)| e.state == ExperimentState::Active)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.fill(*id);
            let done = {
                let exp = &self.experiments[id];
                exp.creation_finished() && self.counts.get(id).is_none_or(|c| c.active() == 0)
            };
            if done {
                // Nothing runs and nothing more will be created or promoted: trials still
                // held at a rung end where they are.
                let held: Vec<TrialId> = self.experiments[id]
                    .trials
                    .iter()
                    .copied()
                    .filter(|t| self.trials[t].state == TrialState::Paused)
                    .collect();
                for t in held {
                    let why = format!("stopped early, never promoted: {}", self.trials[&t].message);
                    self.finish(t, TrialState::Completed, &why);
                }
                let exp = self.experiments.get_mut(id).expect("listed above");
                exp.state = ExperimentState::Completed;
                exp.ended_ms = now_ms();
                self.touch_experiment(*id);
            }
        }
        self.place();
    }

    fn fill(&mut self, id: ExperimentId) {
        loop {
            let active = self.counts.get(&id).map_or(0, Counts::active);
            let exp = self.experiments.get_mut(&id).expect("caller checked");
            if exp.state != ExperimentState::Active || active >= exp.parallel_trials as u64 {
                return;
            }
            // A trial held at a rung and now promoted comes before any new one.
            if let Some((tid, reason)) = exp.searcher.promote() {
                self.touch_experiment(id);
                if self.trials.get(&tid).is_some_and(|t| t.state == TrialState::Paused) {
                    self.trials.get_mut(&tid).expect("checked").message = reason;
                    self.set_trial_state(tid, TrialState::Pending);
                }
                continue;
            }
            if exp.creation_finished() {
                return;
            }
            match exp.searcher.suggest(TrialId(self.next_trial)) {
                Suggestion::Create(params) => {
                    let tid = TrialId(self.next_trial);
                    self.next_trial += 1;
                    let seq = exp.created_trials;
                    exp.created_trials += 1;
                    exp.trials.push(tid);
                    self.trials.insert(tid, TrialRecord::new(tid, id, seq, params));
                    self.open.insert(tid);
                    self.counts.entry(id).or_default().pending += 1;
                    self.touch_trial(tid, id);
                    self.touch_experiment(id);
                }
                Suggestion::Exhausted => {
                    exp.exhausted = true;
                    return;
                }
                Suggestion::Wait => return,
            }
        }
    }

    /// Runs the scheduler over connected workers and pending trials and applies its placements.
    fn place(&mut self) {
        let mut used: BTreeMap<WorkerId, Resources> = BTreeMap::new();
        let mut running: BTreeMap<ExperimentId, u32> = BTreeMap::new();
        let mut pending = Vec::new();
        for tid in &self.open {
            let t = &self.trials[tid];
            let exp = &self.experiments[&t.experiment];
            let r = &exp.spec.spec.resources;
            if let Some(l) = &t.live {
                for rank in &l.ranks {
                    let u = used.entry(rank.worker.clone()).or_default();
                    u.cpus += r.cpus;
                    u.gpus += r.gpus;
                }
                *running.entry(t.experiment).or_default() += 1;
            } else if t.state == TrialState::Pending && exp.state == ExperimentState::Active {
                pending.push(PendingTrial {
                    trial: *tid,
                    experiment: t.experiment,
                    needs: Resources {
                        cpus: r.cpus,
                        gpus: r.gpus,
                    },
                    ranks: r.workers.max(),
                    min_ranks: r.workers.min(),
                    selector: r.labels.clone(),
                });
            }
        }
        if pending.is_empty() {
            return;
        }
        let mut workers: Vec<WorkerView> = self
            .registry
            .workers
            .values()
            .filter(|w| w.registered && w.stream.is_some() && !self.drained.contains(&w.id))
            .map(|w| {
                let u = used.get(&w.id).copied().unwrap_or_default();
                WorkerView {
                    id: w.id.clone(),
                    labels: w.labels.clone(),
                    free: Resources {
                        cpus: w.capacity.cpus.saturating_sub(u.cpus),
                        gpus: w.capacity.gpus.saturating_sub(u.gpus),
                    },
                }
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let quotas: Quotas = self
            .experiments
            .iter()
            .filter(|(_, e)| e.state == ExperimentState::Active)
            .map(|(id, e)| {
                (
                    *id,
                    e.parallel_trials.saturating_sub(running.get(id).copied().unwrap_or(0)),
                )
            })
            .collect();
        let now = now_ms();
        for pl in scheduler::schedule(&workers, &pending, &quotas) {
            let t = self.trials.get_mut(&pl.trial).expect("pending trial exists");
            t.attempt += 1;
            let live = Live::new(pl.workers.clone(), now);
            self.attempts.push(AttemptRow {
                trial: pl.trial,
                attempt: t.attempt,
                worker: joined(&live.workers()),
                assigned_ms: now,
                ended_ms: 0,
                outcome: String::new(),
            });
            t.live = Some(live);
            for (rank, worker) in pl.workers.into_iter().enumerate() {
                let cmd = self.assignment(pl.trial, rank as u32);
                self.outbox.push((worker, cmd));
            }
            self.set_trial_state(pl.trial, TrialState::Running);
            self.telemetry.attempts_placed.inc();
        }
    }

    /// The assignment message for one rank of a trial's live attempt.
    fn assignment(&self, tid: TrialId, rank: u32) -> pb::WorkerCommand {
        let t = &self.trials[&tid];
        let exp = &self.experiments[&t.experiment];
        let spec = &exp.spec;
        let r = &spec.spec.resources;
        let ranks = t.live.as_ref().map_or(&[][..], |l| &l.ranks[..]);
        let worker = ranks.get(rank as usize).map(|x| &x.worker);
        let local: Vec<usize> = (0..ranks.len()).filter(|&i| Some(&ranks[i].worker) == worker).collect();
        let groups = t.live.as_ref().map_or_else(Vec::new, Live::workers);
        pb::WorkerCommand {
            command: Some(pb::worker_command::Command::Assign(pb::Assignment {
                experiment_id: exp.id.0,
                trial_id: tid.0,
                attempt: t.attempt,
                params_json: serde_json::to_string(&t.params).expect("params serialise"),
                command: spec.command_for(&t.params),
                env: spec.env_for(&t.params).into_iter().collect(),
                timeout_ms: spec.timeout.map_or(0, |d| d.as_millis() as u64),
                storage: exp.storage.clone(),
                resources: Some(pb::Resources {
                    cpus: r.cpus,
                    gpus: r.gpus,
                }),
                keep_checkpoints: spec.spec.checkpoint.keep_last,
                metric: exp.metric().to_string(),
                builtin_json: spec.builtin_for(&t.params).map(|b| b.to_string()).unwrap_or_default(),
                keep_best_checkpoints: spec.spec.checkpoint.keep_best,
                maximize: exp.goal() == chorus_core::spec::Goal::Maximize,
                rank,
                world_size: ranks.len().max(1) as u32,
                local_world_size: local.len().max(1) as u32,
                local_rank: local.iter().position(|&i| i == rank as usize).unwrap_or(0) as u32,
                restart_count: t.attempt.saturating_sub(1),
                group_rank: groups.iter().position(|w| Some(w) == worker).unwrap_or(0) as u32,
                group_world_size: groups.len().max(1) as u32,
                data_parallel: r.workers.is_distributed(),
                restore_from_trial: t.exploit_from.map_or(0, |d| d.0),
                restore: match t.exploit_from {
                    Some(donor) => self.trials.get(&donor).and_then(TrialRecord::acknowledged_checkpoint),
                    None => t.acknowledged_checkpoint(),
                }
                .map(|c| pb::CheckpointRef {
                    step: c.step,
                    attempt: c.attempt,
                }),
                acked_metrics: t
                    .acked_metrics
                    .range(..t.attempt)
                    .map(|(&attempt, &count)| pb::AttemptMetricCount { attempt, count })
                    .collect(),
            })),
        }
    }

    // ---- trials ------------------------------------------------------------------------

    /// Stops a trial's live attempt (if any) and tells its worker to kill it.
    fn kill_live(&mut self, tid: TrialId, reason: &str) {
        let now = now_ms();
        let Some(t) = self.trials.get_mut(&tid) else {
            return;
        };
        let attempt = t.attempt;
        let exp = t.experiment;
        if let Some(workers) = t.close_attempt(now) {
            self.rendezvous.remove(&tid);
            self.attempts.push(AttemptRow {
                trial: tid,
                attempt,
                worker: joined(&workers),
                assigned_ms: 0,
                ended_ms: now,
                outcome: format!("killed: {reason}"),
            });
            self.send_kills(tid, attempt, workers, reason);
            self.touch_trial(tid, exp);
        }
    }

    /// Tells each worker to kill its ranks of the attempt.
    fn send_kills(&mut self, tid: TrialId, attempt: u32, workers: Vec<WorkerId>, reason: &str) {
        for worker in workers {
            let kill = pb::KillAttempt {
                trial_id: tid.0,
                attempt,
                reason: reason.to_string(),
            };
            self.outbox.push((
                worker,
                pb::WorkerCommand {
                    command: Some(pb::worker_command::Command::Kill(kill)),
                },
            ));
        }
    }

    /// Ends a trial for good.
    fn finish(&mut self, tid: TrialId, state: TrialState, message: &str) {
        let Some(t) = self.trials.get_mut(&tid) else {
            return;
        };
        t.ended_ms = now_ms();
        t.message = message.to_string();
        let (exp_id, best) = (t.experiment, t.best_value);
        let last: serde_json::Value = serde_json::from_str(&t.last_metrics).unwrap_or_default();
        self.set_trial_state(tid, state);
        let objectives: Vec<f64> = match self.experiments.get(&exp_id).map(|e| e.spec.objectives()) {
            Some(o) if o.len() > 1 => o
                .iter()
                .map(|m| last.get(&m.name).and_then(serde_json::Value::as_f64))
                .collect::<Option<Vec<f64>>>()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let event = match state {
            TrialState::Completed => SearchEvent::Completed {
                trial: tid,
                value: best,
                objectives,
            },
            _ => SearchEvent::Failed { trial: tid },
        };
        if let Some(exp) = self.experiments.get_mut(&exp_id) {
            let actions = exp.searcher.observe(&event);
            self.touch_experiment(exp_id);
            self.apply_search_actions(actions);
        }
        if state == TrialState::Failed {
            self.check_failed_budget(exp_id);
        }
    }

    /// An attempt ended badly: restart the trial if its budget allows, else fail it.
    fn fail_or_restart(&mut self, tid: TrialId, reason: &str) {
        let Some(t) = self.trials.get(&tid) else {
            return;
        };
        let max = self
            .experiments
            .get(&t.experiment)
            .map_or(0, |e| e.spec.spec.max_restarts);
        match after_failure(t.restarts, max) {
            AfterFailure::Restart => {
                let t = self.trials.get_mut(&tid).expect("checked");
                t.restarts += 1;
                t.message = format!("restart {} after: {reason}", t.restarts);
                self.set_trial_state(tid, TrialState::Pending);
                let exp = self.trials[&tid].experiment;
                self.touch_trial(tid, exp);
            }
            AfterFailure::Fail => {
                let msg = if max > 0 {
                    format!("{reason} (after {max} restarts)")
                } else {
                    reason.to_string()
                };
                self.finish(tid, TrialState::Failed, &msg);
            }
        }
    }

    /// The live attempt was lost (worker gone or attempt vanished): costs a restart.
    fn lose_attempt(&mut self, tid: TrialId, reason: &str) {
        tracing::warn!(trial = %tid, reason, "attempt lost");
        self.telemetry.attempts_lost.inc();
        self.kill_live(tid, reason);
        self.fail_or_restart(tid, reason);
    }

    fn apply_search_actions(&mut self, actions: Vec<SearchAction>) {
        for a in actions {
            match a {
                SearchAction::Stop { trial, reason } => {
                    if self.open.contains(&trial) {
                        self.kill_live(trial, &reason);
                        self.finish(trial, TrialState::Completed, &format!("stopped early: {reason}"));
                    }
                }
                SearchAction::Pause { trial, reason } => {
                    let held = self.trials.get(&trial).map(|t| t.state);
                    if matches!(held, Some(TrialState::Running | TrialState::Pending)) {
                        // Its newest checkpoint is where a promotion resumes it.
                        self.kill_live(trial, &reason);
                        let t = self.trials.get_mut(&trial).expect("checked");
                        t.message = reason;
                        self.set_trial_state(trial, TrialState::Paused);
                    }
                }
                SearchAction::Exploit {
                    trial,
                    donor,
                    params,
                    reason,
                } => {
                    if self.open.contains(&trial) && self.trials.contains_key(&donor) {
                        // Placed again at once with the donor's checkpoint: a decision of the
                        // search, not a failure, so it costs no restart.
                        self.kill_live(trial, &reason);
                        let t = self.trials.get_mut(&trial).expect("open trials exist");
                        t.params = params;
                        t.exploit_from = Some(donor);
                        t.message = reason;
                        let exp = t.experiment;
                        self.set_trial_state(trial, TrialState::Pending);
                        self.touch_trial(trial, exp);
                    }
                }
            }
        }
    }

    // ---- workers -----------------------------------------------------------------------

    /// Drains a worker of new trials (its running attempts go on to their end), or with `undo`
    /// makes it eligible again. Kept across coordinator restarts and worker re-registrations.
    pub fn drain(&mut self, id: &WorkerId, undo: bool) -> Result<()> {
        if !undo && !self.registry.workers.contains_key(id) {
            return Err(CoordError::NotFound(format!(
                "worker {id} is not known to this coordinator"
            )));
        }
        let changed = if undo {
            self.drained.remove(id)
        } else {
            self.drained.insert(id.clone())
        };
        if changed {
            self.drained_dirty = true;
            tracing::info!(worker = %id, drained = !undo, "worker drain changed");
            self.pump();
        }
        Ok(())
    }

    /// A worker joins or rejoins. Returns the attempts it should kill.
    pub fn register(&mut self, req: pb::RegisterRequest) -> Result<Vec<pb::RunningAttempt>> {
        if req.worker_id.trim().is_empty() {
            return Err(CoordError::InvalidArgument("worker_id must not be empty".into()));
        }
        let id = WorkerId(req.worker_id.clone());
        let cap = req.capacity.unwrap_or_default();
        self.registry.register(
            id.clone(),
            Resources {
                cpus: cap.cpus,
                gpus: cap.gpus,
            },
            req.labels.into_iter().collect(),
            req.address,
            Instant::now(),
            now_ms(),
        );
        let kill = self.claim(&id, &req.running, true);
        self.pump();
        Ok(kill)
    }

    /// Matches what a worker says it runs against the live attempts placed on it.
    fn claim(
        &mut self,
        worker: &WorkerId,
        running: &[pb::RunningAttempt],
        registering: bool,
    ) -> Vec<pb::RunningAttempt> {
        let mut kill = Vec::new();
        let mut listed = BTreeSet::new();
        for r in running {
            let tid = TrialId(r.trial_id);
            let here = |t: &TrialRecord| {
                t.attempt == r.attempt
                    && t.live
                        .as_ref()
                        .and_then(|l| l.ranks.get(r.rank as usize))
                        .is_some_and(|x| &x.worker == worker)
            };
            match self.trials.get_mut(&tid) {
                Some(t) if here(t) => {
                    listed.insert((tid, r.rank));
                    let l = t.live.as_mut().expect("checked");
                    let rank = &mut l.ranks[r.rank as usize];
                    rank.missing_since = None;
                    if registering && !rank.started {
                        // It runs there, so it started; the Started report may still be buffered.
                        rank.started = true;
                        if l.started_ms == 0 {
                            l.started_ms = now_ms();
                        }
                        let exp = t.experiment;
                        self.touch_trial(tid, exp);
                    } else if !rank.started {
                        // The worker holds it (e.g. still restoring a large checkpoint): the
                        // start timeout counts from its latest word, not from the assignment.
                        l.assigned_ms = now_ms();
                    }
                }
                _ => kill.push(*r),
            }
        }
        let now = Instant::now();
        for tid in &self.open {
            let t = self.trials.get_mut(tid).expect("open trials exist");
            let Some(l) = t.live.as_mut() else { continue };
            for (i, rank) in l.ranks.iter_mut().enumerate() {
                if &rank.worker == worker
                    && rank.started
                    && !rank.finished
                    && !listed.contains(&(*tid, i as u32))
                    && rank.missing_since.is_none()
                {
                    rank.missing_since = Some(now);
                }
            }
        }
        kill
    }

    pub fn heartbeat(&mut self, req: &pb::HeartbeatRequest) -> Result<Vec<pb::RunningAttempt>> {
        let id = WorkerId(req.worker_id.clone());
        if !self.registry.touch(&id, Instant::now(), now_ms()) {
            return Err(CoordError::NotFound(format!(
                "worker {id} is not registered; register again"
            )));
        }
        Ok(self.claim(&id, &req.running, false))
    }

    /// Attaches a worker's command stream and re-sends the assignments it has not started.
    pub fn open_stream(&mut self, worker: &WorkerId, tx: crate::cluster::CommandSender) -> Result<()> {
        let entry = self
            .registry
            .workers
            .get_mut(worker)
            .filter(|e| e.registered)
            .ok_or_else(|| CoordError::NotFound(format!("worker {worker} is not registered; register first")))?;
        entry.stream = Some(tx);
        let mut unstarted: Vec<(TrialId, u32)> = Vec::new();
        for tid in &self.open {
            if let Some(l) = &self.trials[tid].live {
                for (i, rank) in l.ranks.iter().enumerate() {
                    if &rank.worker == worker && !rank.started {
                        unstarted.push((*tid, i as u32));
                    }
                }
            }
        }
        for (t, rank) in unstarted {
            let cmd = self.assignment(t, rank);
            self.outbox.push((worker.clone(), cmd));
        }
        self.pump();
        Ok(())
    }

    /// Applies one attempt's report. Events already applied (by sequence number) are skipped,
    /// so a report resent after a lost answer changes nothing.
    pub fn report(&mut self, req: pb::ReportTrialRequest) -> Result<()> {
        let tid = TrialId(req.trial_id);
        let worker = WorkerId(req.worker_id.clone());
        let t = self
            .trials
            .get(&tid)
            .ok_or_else(|| CoordError::NotFound(format!("trial {tid} does not exist")))?;
        let live_here = t
            .live
            .as_ref()
            .and_then(|l| l.ranks.get(req.rank as usize))
            .is_some_and(|r| r.worker == worker)
            && t.attempt == req.attempt;
        if !live_here {
            return Err(CoordError::Stale(format!(
                "attempt {} (rank {}) of trial {tid} on worker {worker} is no longer current (trial is {}, attempt {})",
                req.attempt, req.rank, t.state, t.attempt
            )));
        }
        self.registry.touch(&worker, Instant::now(), now_ms());
        self.telemetry.reports.inc();
        let mut events = req.events;
        events.sort_by_key(|e| e.seq);
        for ev in events {
            let t = self.trials.get_mut(&tid).expect("checked");
            // The attempt may have ended on an earlier event of this batch.
            let Some(rank) = t
                .live
                .as_mut()
                .filter(|_| t.attempt == req.attempt)
                .and_then(|l| l.ranks.get_mut(req.rank as usize))
            else {
                continue;
            };
            if ev.seq <= rank.last_seq {
                continue;
            }
            rank.last_seq = ev.seq;
            let exp_id = t.experiment;
            self.touch_trial(tid, exp_id);
            self.apply_event(tid, req.attempt, req.rank, ev);
        }
        self.pump();
        Ok(())
    }

    fn apply_event(&mut self, tid: TrialId, attempt: u32, rank: u32, ev: pb::TrialEvent) {
        use pb::trial_event::Kind;
        let at_ms = if ev.unix_ms > 0 { ev.unix_ms } else { now_ms() };
        let Some(kind) = ev.kind else { return };
        let t = self.trials.get_mut(&tid).expect("caller checked");
        let exp_id = t.experiment;
        match kind {
            Kind::Started(s) => {
                // The attempt holds the donor's checkpoint now; later ones restore their own.
                t.exploit_from = None;
                if let Some(l) = t.live.as_mut() {
                    if l.started_ms == 0 {
                        l.started_ms = at_ms;
                    }
                    if let Some(r) = l.ranks.get_mut(rank as usize) {
                        r.started = true;
                    }
                }
                if t.started_ms == 0 {
                    t.started_ms = at_ms;
                }
                if let Some(step) = s.restored_step {
                    t.checkpoint_step = Some(step);
                    t.checkpoint_attempt = s.restored_attempt;
                }
            }
            Kind::Metric(m) => {
                // Counted before parsing: the worker stored this line, so a later attempt's
                // history must carry it whatever it holds.
                *t.acked_metrics.entry(attempt).or_default() += 1;
                let report = match MetricReport::from_json(&m.json) {
                    Ok(r) => r,
                    Err(e) => {
                        t.malformed += 1;
                        tracing::warn!(trial = %tid, error = %e, "malformed metric report");
                        // Kept all the same: the row count per attempt is what a later
                        // attempt's history carries of this one after a restart.
                        self.metrics.push(MetricRow {
                            trial: tid,
                            attempt,
                            seq: ev.seq,
                            step: None,
                            unix_ms: at_ms,
                            json: m.json,
                        });
                        return;
                    }
                };
                t.last_metrics = m.json.clone();
                self.metrics.push(MetricRow {
                    trial: tid,
                    attempt,
                    seq: ev.seq,
                    step: report.step,
                    unix_ms: at_ms,
                    json: m.json,
                });
                let exp = self.experiments.get_mut(&exp_id).expect("trial's experiment exists");
                let Some(&value) = report.values.get(exp.metric()) else {
                    return;
                };
                let goal = exp.goal();
                t.observe(goal, value, report.step);
                let improved = self.best.get(&exp_id).is_none_or(|(_, b)| goal.better(value, *b));
                if improved {
                    self.best.insert(exp_id, (tid, value));
                }
                let actions = exp.searcher.observe(&SearchEvent::Reported {
                    trial: tid,
                    step: report.step,
                    epoch: report.values.get("epoch").copied(),
                    value,
                });
                let target = exp.spec.metric().target;
                self.touch_experiment(exp_id);
                self.apply_search_actions(actions);
                if let Some(target) = target
                    && goal.reached(value, target)
                {
                    // The remaining trials are stopped: the experiment's question is answered.
                    let reason = format!("target {target} reached by trial {tid} ({value})");
                    self.kill_live(tid, "the experiment reached its target");
                    self.finish(tid, TrialState::Completed, "reached the target");
                    self.end_experiment(exp_id, ExperimentState::Completed, &reason);
                }
            }
            Kind::Checkpoint(c) => {
                t.checkpoint_step = Some(c.step);
                t.checkpoint_attempt = attempt;
                if !c.data_position_json.is_empty() {
                    t.data_position = c.data_position_json;
                }
            }
            Kind::Malformed(_) => {
                t.malformed += 1;
            }
            Kind::Exited(x) => {
                let world = t.live.as_ref().map_or(1, |l| l.ranks.len());
                if world > 1 && rank > 0 && x.kind() == pb::ExitKind::Succeeded {
                    // Rank 0 holds the final checkpoint and decides the outcome; this rank waits.
                    if let Some(r) = t.live.as_mut().and_then(|l| l.ranks.get_mut(rank as usize)) {
                        r.finished = true;
                    }
                    return;
                }
                let message = if world > 1 {
                    format!("rank {rank} of {world}: {}", x.message)
                } else {
                    x.message.clone()
                };
                let x = pb::Exited { message, ..x };
                // Every other rank of the attempt stops with it.
                let others: Vec<WorkerId> = t.live.as_ref().map_or_else(Vec::new, |l| {
                    let mut w = Vec::new();
                    for (i, r) in l.ranks.iter().enumerate() {
                        if i != rank as usize && !w.contains(&r.worker) {
                            w.push(r.worker.clone());
                        }
                    }
                    w
                });
                let workers = t.close_attempt(now_ms());
                self.rendezvous.remove(&tid);
                self.send_kills(tid, attempt, others, &format!("another rank ended: {}", x.message));
                self.attempts.push(AttemptRow {
                    trial: tid,
                    attempt,
                    worker: joined(&workers.unwrap_or_default()),
                    assigned_ms: 0,
                    ended_ms: now_ms(),
                    outcome: format!("{:?}: {}", x.kind(), x.message),
                });
                match x.kind() {
                    pb::ExitKind::Succeeded => self.finish(tid, TrialState::Completed, ""),
                    pb::ExitKind::TimedOut => {
                        self.finish(tid, TrialState::Failed, &format!("timed out: {}", x.message))
                    }
                    pb::ExitKind::Failed => self.fail_or_restart(tid, &x.message),
                    pb::ExitKind::Interrupted => {
                        // The worker went away politely: place the trial again, at no cost.
                        let t = self.trials.get_mut(&tid).expect("exists");
                        t.message = format!("interrupted: {}", x.message);
                        self.set_trial_state(tid, TrialState::Pending);
                    }
                    pb::ExitKind::Killed | pb::ExitKind::Unspecified => {
                        self.fail_or_restart(tid, &format!("killed on the worker: {}", x.message))
                    }
                }
            }
        }
    }

    /// A rank joins its attempt's rendezvous. When it is the last to join, the shard manager
    /// picks the data position, which is recorded on the trial before anyone hears of it.
    pub fn rendezvous(&mut self, req: &pb::RendezvousRequest) -> Result<Joined> {
        let tid = TrialId(req.trial_id);
        let t = self
            .trials
            .get(&tid)
            .ok_or_else(|| CoordError::NotFound(format!("trial {tid} does not exist")))?;
        let live = t.live.as_ref().filter(|_| t.attempt == req.attempt);
        let Some(live) = live.filter(|l| {
            l.ranks
                .get(req.rank as usize)
                .is_some_and(|r| r.worker.0 == req.worker_id)
        }) else {
            return Err(CoordError::Stale(format!(
                "attempt {} (rank {}) of trial {tid} on worker {} is no longer current (trial is {}, attempt {})",
                req.attempt, req.rank, req.worker_id, t.state, t.attempt
            )));
        };
        if req.address.is_empty() {
            return Err(CoordError::InvalidArgument(
                "rendezvous: address must not be empty".into(),
            ));
        }
        let world = live.ranks.len();
        let exp = t.experiment;
        let r = self
            .rendezvous
            .entry(tid)
            .and_modify(|r| {
                if r.attempt != req.attempt {
                    *r = Rendezvous::new(req.attempt, world, rand::random());
                }
            })
            .or_insert_with(|| Rendezvous::new(req.attempt, world, rand::random()));
        r.join(req);
        if let Joined::Wait(rx) = r.state() {
            if !r.missing().is_empty() {
                return Ok(Joined::Wait(rx));
            }
            let position = match r.data() {
                Some(d) => {
                    serde_json::to_string(&crate::shards::start_position(d, world)?).expect("positions serialise")
                }
                None => String::new(),
            };
            r.complete(position.clone());
            if !position.is_empty() {
                self.trials.get_mut(&tid).expect("checked").data_position = position;
                self.touch_trial(tid, exp);
            }
        }
        Ok(self.rendezvous[&tid].state())
    }

    /// Ranks of a trial's attempt that have not joined its rendezvous yet.
    pub fn rendezvous_missing(&self, tid: TrialId) -> Vec<usize> {
        self.rendezvous.get(&tid).map_or_else(Vec::new, Rendezvous::missing)
    }

    /// CPU slots taken by live attempts, over all workers.
    pub fn busy_cpu_slots(&self) -> u64 {
        self.open
            .iter()
            .filter_map(|t| {
                let t = &self.trials[t];
                let ranks = t.live.as_ref()?.ranks.len() as u64;
                Some(ranks * self.experiments[&t.experiment].spec.spec.resources.cpus as u64)
            })
            .sum()
    }

    // ---- reconcile ---------------------------------------------------------------------

    /// One level-triggered pass: expire leases, requeue attempts that vanished or never
    /// started, then create and place what can run. A lost message costs a delay here, never
    /// a trial.
    pub fn reconcile(&mut self) {
        let now = Instant::now();
        let now_ms = now_ms();
        let ttl = self.timing.lease_ttl;
        let lapsed = self.registry.expire(now, ttl);
        let mut lost: Vec<(TrialId, String)> = Vec::new();
        let mut unstarted: Vec<TrialId> = Vec::new();
        for tid in &self.open {
            let t = &self.trials[tid];
            let Some(l) = &t.live else { continue };
            let of = |i: usize| match l.ranks.len() {
                1 => String::new(),
                n => format!(" (rank {i} of {n})"),
            };
            let gone = l.ranks.iter().enumerate().find_map(|(i, r)| {
                if lapsed.contains(&r.worker) {
                    Some(format!("worker {}{} stopped renewing its lease", r.worker, of(i)))
                } else if r.missing_since.is_some_and(|m| now.duration_since(m) > ttl) {
                    Some(format!(
                        "attempt {}{} is no longer running on worker {}",
                        t.attempt,
                        of(i),
                        r.worker
                    ))
                } else {
                    None
                }
            });
            if let Some(reason) = gone {
                lost.push((*tid, reason));
            } else if !l.all_started() && now_ms - l.assigned_ms > self.timing.start_timeout.as_millis() as i64 {
                unstarted.push(*tid);
            }
        }
        for w in &lapsed {
            tracing::warn!(worker = %w, "worker lease lapsed");
        }
        for (tid, reason) in lost {
            self.lose_attempt(tid, &reason);
        }
        for tid in unstarted {
            // Never started, so it costs no restart.
            self.kill_live(tid, "assignment was not started in time");
            self.set_trial_state(tid, TrialState::Pending);
        }
        self.pump();
    }
}

/// Workers as one attempt-row field.
/// A spec error on one line, for a message.
fn one_line(e: &chorus_core::CoreError) -> String {
    match e {
        chorus_core::CoreError::Spec(errs) => errs.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        other => other.to_string(),
    }
}

fn joined(workers: &[WorkerId]) -> WorkerId {
    WorkerId(workers.iter().map(|w| w.0.as_str()).collect::<Vec<_>>().join(","))
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
