//! Experiments and their trials as the coordinator holds them in memory, and the rules of
//! their lifecycles: when a searcher may create trials, when an experiment is done, what a
//! failure costs. The state module applies these rules under its lock and persists the result.

pub mod journal;

use crate::store::{ExperimentRow, SearcherRecord, SearcherWrite};
use chorus_core::checkpoint::CheckpointRef;
use chorus_core::convert::{ExperimentState, TrialState};
use chorus_core::space::Params;
use chorus_core::spec::{Goal, ValidSpec};
use chorus_core::{ExperimentId, TrialId, WorkerId};
use chorus_search::{self as search, SearchAction, SearchError, SearchEvent, Searcher, Suggestion};
use journal::Call;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// One experiment: its validated spec, budgets, searcher and best result so far.
#[derive(Debug)]
pub struct Experiment {
    pub id: ExperimentId,
    pub name: String,
    pub spec: ValidSpec,
    /// The normalised spec, as stored and described.
    pub spec_yaml: String,
    pub state: ExperimentState,
    pub storage: String,
    pub created_ms: i64,
    pub ended_ms: i64,
    pub message: String,
    pub max_trials: u64,
    pub parallel_trials: u32,
    pub max_failed_trials: Option<u64>,
    searcher: Box<dyn Searcher>,
    /// Set when the saved searcher state could not be read: the experiment fails rather than
    /// start its search over, and the stored state is left exactly as it was found.
    pub unreadable_searcher: Option<UnreadableSearcher>,
    /// Where the searcher's journal stands, and what is to be written of it.
    log: SearcherLog,
    /// The searcher said it has nothing more to try.
    pub exhausted: bool,
    /// Trials created so far; also the next trial's `seq`.
    pub created_trials: u64,
    /// Trials of this experiment, in creation order.
    pub trials: Vec<TrialId>,
}

/// The journal of one searcher, as far as the store knows it.
#[derive(Debug, Default)]
struct SearcherLog {
    /// The last journal entry made.
    seq: u64,
    /// Bytes of journal written since the last snapshot, and that snapshot's size.
    since_snapshot: usize,
    snapshot_bytes: usize,
    /// Not yet handed to the store.
    writes: Vec<SearcherWrite>,
}

impl Experiment {
    pub fn new(id: ExperimentId, spec: ValidSpec, storage: String, now_ms: i64) -> Self {
        let searcher = search::build(&spec);
        let state = searcher.save().to_string();
        let log = SearcherLog {
            seq: 0,
            since_snapshot: 0,
            snapshot_bytes: state.len(),
            writes: vec![SearcherWrite::Snapshot {
                experiment: id,
                seq: 0,
                state,
            }],
        };
        Experiment {
            log,
            id,
            name: spec.spec.name.clone(),
            spec_yaml: spec.to_yaml(),
            state: ExperimentState::Active,
            storage,
            created_ms: now_ms,
            ended_ms: 0,
            message: String::new(),
            max_trials: spec.max_trials,
            parallel_trials: spec.spec.parallel_trials,
            max_failed_trials: spec.spec.max_failed_trials,
            searcher,
            unreadable_searcher: None,
            exhausted: false,
            created_trials: 0,
            trials: Vec::new(),
            spec,
        }
    }

    /// Rebuilds an experiment from its row and its searcher's snapshot and journal; the stored
    /// spec was valid when it was written. A searcher state that cannot be read leaves
    /// [`Experiment::unreadable_searcher`] set.
    pub fn from_row(row: ExperimentRow, saved: SearcherRecord) -> Result<Self, chorus_core::CoreError> {
        let spec_yaml = row.spec_yaml.clone().unwrap_or_default();
        let spec = chorus_core::spec::parse_stored(&spec_yaml)?;
        let (snapshot_seq, snapshot) = saved.snapshot.clone().unwrap_or((0, String::new()));
        let unreadable = |reason: String| SearchError::State {
            searcher: spec.spec.searcher.name.as_str(),
            reason,
        };
        let restored = if saved.snapshot.is_none() {
            Err(unreadable("no saved state was found".into()))
        } else {
            serde_json::from_str(&snapshot)
                .map_err(|e| unreadable(format!("it is not JSON ({e})")))
                .and_then(|state| search::restore(&spec, &state))
                .and_then(|mut searcher| {
                    for (seq, entry) in &saved.journal {
                        let call: Call = serde_json::from_str(entry)
                            .map_err(|e| unreadable(format!("its journal entry {seq} does not parse ({e})")))?;
                        call.replay(searcher.as_mut());
                    }
                    Ok(searcher)
                })
        };
        let (searcher, unreadable_searcher) = match restored {
            Ok(s) => (s, None),
            Err(e) => (
                Box::new(chorus_search::Unreadable) as Box<dyn Searcher>,
                Some(UnreadableSearcher {
                    reason: format!(
                        "{e}; the experiment stopped rather than start its search over and run trials again"
                    ),
                }),
            ),
        };
        let log = SearcherLog {
            seq: saved.journal.last().map_or(snapshot_seq, |(s, _)| *s),
            since_snapshot: saved.journal.iter().map(|(_, e)| e.len()).sum(),
            snapshot_bytes: snapshot.len(),
            writes: Vec::new(),
        };
        Ok(Experiment {
            id: row.id,
            name: row.name,
            spec_yaml,
            state: row.state,
            storage: row.storage,
            created_ms: row.created_ms,
            ended_ms: row.ended_ms,
            message: row.message,
            max_trials: row.max_trials,
            parallel_trials: row.parallel_trials,
            max_failed_trials: row.max_failed_trials,
            searcher,
            unreadable_searcher,
            log,
            exhausted: false,
            created_trials: row.created_trials,
            trials: Vec::new(),
            spec,
        })
    }

    /// An experiment whose stored spec can no longer be read (written by a version that stored
    /// what it could not read back, or made invalid by a later one): kept with its row, its
    /// trials and its records so the coordinator starts and nothing is lost, but it cannot run.
    /// Its spec is a stand-in naming its metric, when that can still be found, so its trials
    /// still rank; its stored YAML is shown as it is.
    pub fn unreadable(row: ExperimentRow, reason: &str) -> Self {
        let spec_yaml = row.spec_yaml.clone().unwrap_or_default();
        let doc: serde_json::Value = serde_yaml_ng::from_str(&spec_yaml).unwrap_or_default();
        let metric = doc
            .pointer("/metric")
            .or_else(|| doc.pointer("/metrics/0"))
            .cloned()
            .unwrap_or_default();
        let name = metric["name"].as_str().unwrap_or("unknown").to_string();
        let goal = match metric["goal"].as_str() {
            Some("maximize") => "maximize",
            _ => "minimize",
        };
        let stand_in: chorus_core::spec::ExperimentSpec = serde_json::from_value(serde_json::json!({
            "name": row.name,
            "metric": {"name": name, "goal": goal},
            "searcher": {"name": "grid"},
            "trial": {"command": ["(unreadable spec)"]},
        }))
        .expect("a fixed stand-in spec deserializes");
        let spec = ValidSpec {
            spec: stand_in,
            space: Default::default(),
            max_trials: row.max_trials,
            timeout: None,
        };
        let mut exp = Experiment::new(row.id, spec, row.storage, row.created_ms);
        exp.spec_yaml = spec_yaml;
        // Its stored searcher state is left as it was found.
        exp.log = SearcherLog::default();
        exp.state = row.state;
        exp.ended_ms = row.ended_ms;
        exp.message = if row.state.is_terminal() {
            row.message
        } else {
            reason.to_string()
        };
        exp.max_trials = row.max_trials;
        exp.parallel_trials = row.parallel_trials;
        exp.max_failed_trials = row.max_failed_trials;
        exp.exhausted = true;
        exp.created_trials = row.created_trials;
        exp.searcher = Box::new(search::Unreadable);
        // The experiment fails with the reason when its state loads.
        exp.unreadable_searcher = Some(UnreadableSearcher {
            reason: reason.to_string(),
        });
        exp
    }

    /// The experiment's row; with its spec only when it is being created (a spec never
    /// changes, so it is written once).
    pub fn row(&self, created: bool) -> ExperimentRow {
        ExperimentRow {
            id: self.id,
            name: self.name.clone(),
            spec_yaml: created.then(|| self.spec_yaml.clone()),
            state: self.state,
            storage: self.storage.clone(),
            created_ms: self.created_ms,
            ended_ms: self.ended_ms,
            message: self.message.clone(),
            max_trials: self.max_trials,
            parallel_trials: self.parallel_trials,
            max_failed_trials: self.max_failed_trials,
            created_trials: self.created_trials,
        }
    }

    /// Asks the searcher for a new trial's parameters.
    pub fn suggest(&mut self, trial: TrialId) -> Suggestion {
        let s = self.searcher.suggest(trial);
        if Call::suggestion_counts(&s) {
            self.journal(Call::Suggest { trial });
        }
        s
    }

    /// Asks the searcher for a paused trial to resume.
    pub fn promote(&mut self) -> Option<(TrialId, String)> {
        let p = self.searcher.promote();
        if p.is_some() {
            self.journal(Call::Promote);
        }
        p
    }

    /// Tells the searcher what happened.
    pub fn observe(&mut self, event: &SearchEvent) -> Vec<SearchAction> {
        let actions = self.searcher.observe(event);
        self.journal(Call::observed(event));
        actions
    }

    fn journal(&mut self, call: Call) {
        if self.unreadable_searcher.is_some() {
            return;
        }
        let entry = serde_json::to_string(&call).expect("calls serialise");
        self.log.seq += 1;
        self.log.since_snapshot += entry.len();
        self.log.writes.push(SearcherWrite::Journal {
            experiment: self.id,
            seq: self.log.seq,
            call: entry,
        });
        if self.log.since_snapshot >= self.log.snapshot_bytes.max(journal::MIN_SNAPSHOT_EVERY) {
            let state = self.searcher.save().to_string();
            self.log.snapshot_bytes = state.len();
            self.log.since_snapshot = 0;
            // The entries this snapshot includes need not be written at all.
            self.log.writes.retain(|w| matches!(w, SearcherWrite::Snapshot { .. }));
            self.log.writes.push(SearcherWrite::Snapshot {
                experiment: self.id,
                seq: self.log.seq,
                state,
            });
        }
    }

    /// What the store has yet to be told of the searcher.
    pub fn take_searcher_writes(&mut self) -> Vec<SearcherWrite> {
        std::mem::take(&mut self.log.writes)
    }

    /// The searcher's state as it would be saved now.
    pub fn searcher_state(&self) -> serde_json::Value {
        self.searcher.save()
    }

    pub fn metric(&self) -> &str {
        &self.spec.metric().name
    }

    pub fn goal(&self) -> Goal {
        self.spec.metric().goal
    }

    /// No trial will ever be created again.
    pub fn creation_finished(&self) -> bool {
        self.exhausted || self.created_trials >= self.max_trials
    }
}

/// A saved searcher state that could not be read (or whose spec could not), and the message the
/// experiment fails with.
#[derive(Debug, Clone)]
pub struct UnreadableSearcher {
    pub reason: String,
}

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

    pub fn on(&self, worker: &WorkerId) -> bool {
        self.ranks.iter().any(|r| &r.worker == worker)
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
