//! A trial as the coordinator holds it: its parameters, state, best result, the attempt live on
//! workers, and the rules of what a failure costs. Held by the state, written whole by the store.

use chorus_core::checkpoint::CheckpointRef;
use chorus_core::convert::TrialState;
use chorus_core::space::Params;
use chorus_core::spec::Goal;
use chorus_core::{ExperimentId, TrialId, WorkerId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// One rank of a live attempt: where it runs and what its worker said of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankLive {
    pub worker: WorkerId,
    /// The worker reported that this rank's program started.
    pub started: bool,
    /// Highest report sequence number applied for this rank (each rank numbers its own).
    pub last_seq: u64,
    /// The rank ended successfully and waits for the others.
    #[serde(default)]
    pub finished: bool,
    /// When the worker first stopped listing this rank as running (not persisted: a restarted
    /// coordinator simply starts the grace period again).
    #[serde(skip)]
    pub missing_since: Option<Instant>,
}

impl RankLive {
    pub fn new(worker: WorkerId) -> Self {
        RankLive {
            worker,
            started: false,
            last_seq: 0,
            finished: false,
            missing_since: None,
        }
    }
}

/// The attempt of a trial currently placed on workers: one entry per rank, rank 0 first.
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub ranks: Vec<RankLive>,
    pub assigned_ms: i64,
    /// When the first rank started; 0 before.
    pub started_ms: i64,
}

impl Live {
    pub fn new(workers: Vec<WorkerId>, assigned_ms: i64) -> Self {
        Live {
            ranks: workers.into_iter().map(RankLive::new).collect(),
            assigned_ms,
            started_ms: 0,
        }
    }

    /// Some rank started.
    pub fn started(&self) -> bool {
        self.ranks.iter().any(|r| r.started)
    }

    /// Every rank started.
    pub fn all_started(&self) -> bool {
        self.ranks.iter().all(|r| r.started)
    }

    /// The workers holding ranks, each once, in rank order.
    pub fn workers(&self) -> Vec<WorkerId> {
        let mut out: Vec<WorkerId> = Vec::new();
        for r in &self.ranks {
            if !out.contains(&r.worker) {
                out.push(r.worker.clone());
            }
        }
        out
    }

    pub fn world_size(&self) -> u32 {
        self.ranks.len() as u32
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrialRecord {
    pub id: TrialId,
    pub experiment: ExperimentId,
    pub seq: u64,
    pub params: Params,
    pub state: TrialState,
    /// Number of the latest placement, from 1; 0 before the first.
    pub attempt: u32,
    pub restarts: u32,
    pub live: Option<Live>,
    pub best_value: Option<f64>,
    pub best_step: Option<i64>,
    pub last_metrics: String,
    pub started_ms: i64,
    pub ended_ms: i64,
    /// Milliseconds run by attempts that have ended.
    pub run_ms: i64,
    pub message: String,
    pub checkpoint_step: Option<i64>,
    /// The attempt that committed `checkpoint_step` (0: one committed before checkpoints were
    /// kept per attempt). Together they name the newest acknowledged checkpoint.
    pub checkpoint_attempt: u32,
    /// Metric reports acknowledged per attempt (only for open trials): a new attempt's history
    /// carries exactly these lines of the earlier ones.
    pub acked_metrics: BTreeMap<u32, u64>,
    pub malformed: u64,
    /// For a data-parallel builtin trial: where its data stood at the last checkpoint or
    /// rendezvous (core's `DataPosition` as JSON), i.e. which samples each rank has consumed.
    pub data_position: String,
    /// Population-based training: the next attempt continues from this trial's checkpoint.
    /// Cleared once an attempt has started from it.
    pub exploit_from: Option<TrialId>,
}

impl TrialRecord {
    pub fn new(id: TrialId, experiment: ExperimentId, seq: u64, params: Params) -> Self {
        TrialRecord {
            id,
            experiment,
            seq,
            params,
            state: TrialState::Pending,
            attempt: 0,
            restarts: 0,
            live: None,
            best_value: None,
            best_step: None,
            last_metrics: String::new(),
            started_ms: 0,
            ended_ms: 0,
            run_ms: 0,
            message: String::new(),
            checkpoint_step: None,
            checkpoint_attempt: 0,
            acked_metrics: BTreeMap::new(),
            malformed: 0,
            data_position: String::new(),
            exploit_from: None,
        }
    }

    /// The newest checkpoint the coordinator acknowledged, the one a new attempt resumes from.
    pub fn acknowledged_checkpoint(&self) -> Option<CheckpointRef> {
        self.checkpoint_step
            .map(|step| CheckpointRef::new(step, self.checkpoint_attempt))
    }

    /// Milliseconds run so far, counting the live attempt up to `now_ms`.
    pub fn run_ms_at(&self, now_ms: i64) -> i64 {
        let live = self
            .live
            .as_ref()
            .filter(|l| l.started())
            .map_or(0, |l| (now_ms - l.started_ms).max(0));
        self.run_ms + live
    }

    /// Ends the live attempt's clock; returns the workers it ran on.
    pub fn close_attempt(&mut self, now_ms: i64) -> Option<Vec<WorkerId>> {
        let live = self.live.take()?;
        if live.started() {
            self.run_ms += (now_ms - live.started_ms).max(0);
        }
        Some(live.workers())
    }

    /// Records a value of the experiment metric; returns true when it is a new best.
    pub fn observe(&mut self, goal: Goal, value: f64, step: Option<i64>) -> bool {
        let better = self.best_value.is_none_or(|b| goal.better(value, b));
        if better {
            self.best_value = Some(value);
            self.best_step = step;
        }
        better
    }
}

/// What a trial's attempt ending in failure leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Requeue with one more restart counted.
    Restart,
    /// The restart budget is spent.
    Fail,
}

pub fn after_failure(restarts: u32, max_restarts: u32) -> AfterFailure {
    if restarts < max_restarts {
        AfterFailure::Restart
    } else {
        AfterFailure::Fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_best_follows_goal() {
        let mut t = TrialRecord::new(TrialId(1), ExperimentId(1), 0, Params::new());
        assert!(t.observe(Goal::Minimize, 0.5, Some(1)));
        assert!(!t.observe(Goal::Minimize, 0.7, Some(2)));
        assert!(t.observe(Goal::Minimize, 0.2, Some(3)));
        assert_eq!((t.best_value, t.best_step), (Some(0.2), Some(3)));
        let mut m = TrialRecord::new(TrialId(2), ExperimentId(1), 1, Params::new());
        m.observe(Goal::Maximize, 0.5, None);
        assert!(!m.observe(Goal::Maximize, 0.4, None));
    }

    #[test]
    fn restart_budget() {
        assert_eq!(after_failure(0, 0), AfterFailure::Fail);
        assert_eq!(after_failure(0, 2), AfterFailure::Restart);
        assert_eq!(after_failure(2, 2), AfterFailure::Fail);
    }

    #[test]
    fn run_time_accumulates_over_attempts() {
        let mut t = TrialRecord::new(TrialId(1), ExperimentId(1), 0, Params::new());
        let mut live = Live::new(vec![WorkerId("w".into())], 0);
        live.ranks[0].started = true;
        live.started_ms = 1000;
        t.live = Some(live);
        assert_eq!(t.run_ms_at(1500), 500);
        assert_eq!(t.close_attempt(3000), Some(vec![WorkerId("w".into())]));
        assert_eq!(t.run_ms_at(9999), 2000);
    }
}
