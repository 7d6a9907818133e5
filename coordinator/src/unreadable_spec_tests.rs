//! A stored spec the coordinator cannot read back must never keep it from starting.
//!
//! Before specs refused NaN, `value: .nan` was stored as `value: null`, which no longer parses:
//! the coordinator then refused to start on that store, for good. Now such an experiment is kept
//! with its trials and records and ends as failed, saying why.

use crate::store::{Batch, ExperimentRow, SearcherWrite, Store};
use crate::trial::TrialRecord;
use crate::{Coordinator, Options};
use chorus_core::convert::{ExperimentState, TrialState};
use chorus_core::space::Params;
use chorus_core::{ExperimentId, TrialId};

/// What an older coordinator stored for `parameters: {lr: {value: .nan}}`.
const NAN_ERA_SPEC: &str = "name: nan-era
metric:
  name: val_loss
  goal: maximize
parameters:
  lr:
    value: null
searcher:
  name: random
  seed: 0
max_trials: 3
parallel_trials: 1
max_restarts: 0
trial:
  command:
  - train
";

/// The random searcher's saved state as that coordinator stored it.
const SAVED: &str = r#"{"seed": 0, "drawn": 2}"#;

fn row(id: u64, state: ExperimentState, message: &str) -> ExperimentRow {
    ExperimentRow {
        id: ExperimentId(id),
        name: format!("exp-{id}"),
        spec_yaml: Some(NAN_ERA_SPEC.to_string()),
        state,
        storage: "memory://".to_string(),
        created_ms: 1,
        ended_ms: 0,
        message: message.to_string(),
        max_trials: 3,
        parallel_trials: 1,
        max_failed_trials: None,
        created_trials: 2,
        lifecycle: Default::default(),
    }
}

fn trial(id: u64, exp: u64, seq: u64, state: TrialState, best: Option<f64>) -> TrialRecord {
    let mut t = TrialRecord::new(TrialId(id), ExperimentId(exp), seq, Params::new());
    t.state = state;
    t.best_value = best;
    t
}

#[test]
fn an_unreadable_stored_spec_fails_its_experiment_instead_of_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    std::fs::create_dir_all(&data).unwrap();
    {
        let mut store = Store::open(&data.join("chorus.db")).unwrap();
        store
            .commit(&Batch {
                experiments: vec![
                    row(1, ExperimentState::Active, ""),
                    row(2, ExperimentState::Completed, "all trials done"),
                ],
                trials: vec![
                    trial(1, 1, 0, TrialState::Completed, Some(0.5)),
                    trial(2, 1, 1, TrialState::Pending, None),
                    trial(3, 2, 0, TrialState::Completed, Some(0.7)),
                ],
                searchers: [1, 2]
                    .map(|id| SearcherWrite::Snapshot {
                        experiment: ExperimentId(id),
                        seq: 0,
                        state: SAVED.to_string(),
                    })
                    .to_vec(),
                attempts: Vec::new(),
                epochs: Vec::new(),
                drained: None,
                removed_experiments: Vec::new(),
            })
            .unwrap();
    }
    let coord = Coordinator::open(&Options::new(data.clone())).expect("the coordinator starts");
    let st = coord.lock();
    let live = &st.experiments[&ExperimentId(1)];
    assert_eq!(live.state, ExperimentState::Failed);
    assert!(
        live.message.contains("its stored spec can no longer be read") && live.message.contains("parameters.lr"),
        "{}",
        live.message
    );
    assert_eq!(live.spec_yaml, NAN_ERA_SPEC, "shown as stored");
    assert_eq!(
        (live.metric(), live.goal()),
        ("val_loss", chorus_core::spec::Goal::Maximize)
    );
    assert!(live.unreadable_searcher.is_some(), "its search does not start over");
    assert_eq!(st.trials[&TrialId(1)].state, TrialState::Completed, "records kept");
    assert_eq!(st.trials[&TrialId(2)].state, TrialState::Killed, "nothing left open");
    assert_eq!(st.best[&ExperimentId(1)], (TrialId(1), 0.5));
    // An experiment that had already ended keeps its state and message.
    let ended = &st.experiments[&ExperimentId(2)];
    assert_eq!(
        (ended.state, ended.message.as_str()),
        (ExperimentState::Completed, "all trials done")
    );
    drop(st);
    drop(coord);
    let store = Store::open(&data.join("chorus.db")).unwrap();
    let saved = store.load_searchers().unwrap();
    assert_eq!(
        saved[&ExperimentId(1)].snapshot,
        Some((0, SAVED.to_string())),
        "its searcher state is left as it was"
    );
}
