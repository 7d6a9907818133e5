//! An experiment as the coordinator holds it in memory: its spec, budgets and searcher (whose
//! calls it journals for the store), and the rules of its lifecycle: when its searcher may
//! create trials, when it is done. The state module applies these rules under its lock.

pub mod journal;
pub mod lifecycle;

use crate::store::{ExperimentRow, SearcherRecord, SearcherWrite};
use chorus_core::convert::ExperimentState;
use chorus_core::spec::{Goal, ValidSpec};
use chorus_core::{ExperimentId, TrialId};
use chorus_search::{self as search, SearchAction, SearchError, SearchEvent, Searcher, Suggestion};
use journal::Call;

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
    /// Labels, note, archival and deletion marks.
    pub lifecycle: lifecycle::Lifecycle,
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

impl SearcherLog {
    /// A new searcher's log: its first state, as the snapshot the store has yet to write.
    fn initial(experiment: ExperimentId, state: String) -> Self {
        SearcherLog {
            seq: 0,
            since_snapshot: 0,
            snapshot_bytes: state.len(),
            writes: vec![SearcherWrite::Snapshot {
                experiment,
                seq: 0,
                state,
            }],
        }
    }
}

impl Experiment {
    pub fn new(id: ExperimentId, spec: ValidSpec, storage: String, now_ms: i64) -> Self {
        let searcher = search::build(&spec);
        let log = SearcherLog::initial(id, searcher.save().to_string());
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
            lifecycle: Default::default(),
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
                        let calls = Call::parse_entry(entry)
                            .map_err(|e| unreadable(format!("its journal entry {seq} does not parse ({e})")))?;
                        for call in calls {
                            call.replay(searcher.as_mut());
                        }
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
            lifecycle: row.lifecycle,
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
        exp.lifecycle = row.lifecycle;
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
            lifecycle: self.lifecycle.clone(),
        }
    }

    /// Seeds a new experiment's searcher with an earlier experiment's finished trials; its
    /// first saved state (not yet written) then includes them. Whether the searcher used them.
    pub fn warm_start(&mut self, prior: &[search::Prior]) -> bool {
        if !self.searcher.warm_start(prior) {
            return false;
        }
        self.log = SearcherLog::initial(self.id, self.searcher.save().to_string());
        true
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
