//! A stored spec the coordinator cannot read back must never keep it from starting.
//!
//! Before specs refused NaN, `value: .nan` was stored as `value: null`, which no longer parses:
//! the coordinator then refused to start on that store, for good. Now such an experiment is kept
//! with its trials and records and ends as failed, saying why.

use chorus_coordinator::experiment::TrialRecord;
use chorus_coordinator::store::{Batch, ExperimentRow, Store};
use chorus_coordinator::{Coordinator, Options};
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

fn row(id: u64, state: ExperimentState, message: &str) -> ExperimentRow {
    ExperimentRow {
        id: ExperimentId(id),
        name: format!("exp-{id}"),
        spec_yaml: NAN_ERA_SPEC.to_string(),
        state,
        storage: "memory://".to_string(),
        created_ms: 1,
        ended_ms: 0,
        message: message.to_string(),
        max_trials: 3,
        parallel_trials: 1,
        max_failed_trials: None,
        searcher_state: serde_json::json!({"seed": 0, "drawn": 2}).to_string(),
        created_trials: 2,
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
                metrics: Vec::new(),
                attempts: Vec::new(),
                drained: None,
            })
            .unwrap();
    }
    let coord = Coordinator::open(&Options::new(data)).expect("the coordinator starts");
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
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&live.row().searcher_state).unwrap(),
        serde_json::json!({"seed": 0, "drawn": 2}),
        "its searcher state is written back as it was"
    );
    assert_eq!(st.trials[&TrialId(1)].state, TrialState::Completed, "records kept");
    assert_eq!(st.trials[&TrialId(2)].state, TrialState::Killed, "nothing left open");
    assert_eq!(st.best[&ExperimentId(1)], (TrialId(1), 0.5));
    // An experiment that had already ended keeps its state and message.
    let ended = &st.experiments[&ExperimentId(2)];
    assert_eq!(
        (ended.state, ended.message.as_str()),
        (ExperimentState::Completed, "all trials done")
    );
}
