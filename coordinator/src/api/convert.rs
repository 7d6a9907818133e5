//! Domain records to `chorus.v1` messages, at the edge of the API.

use crate::state::{State, now_ms};
use chorus_core::{ExperimentId, TrialId};
use chorus_proto::pb;

pub fn experiment(st: &State, id: ExperimentId) -> Option<pb::Experiment> {
    let e = st.experiments.get(&id)?;
    let c = st.counts.get(&id).copied().unwrap_or_default();
    let best = st.best.get(&id);
    Some(pb::Experiment {
        id: id.0,
        name: e.name.clone(),
        state: pb::ExperimentState::from(e.state) as i32,
        metric: e.metric().to_string(),
        maximize: e.goal() == chorus_core::spec::Goal::Maximize,
        searcher: e.spec.spec.searcher.name.as_str().to_string(),
        max_trials: e.max_trials,
        parallel_trials: e.parallel_trials,
        max_failed_trials: e.max_failed_trials,
        counts: Some(pb::TrialCounts {
            pending: c.pending,
            running: c.running,
            completed: c.completed,
            failed: c.failed,
            killed: c.killed,
            paused: c.paused,
        }),
        best_trial_id: best.map(|b| b.0.0),
        best_value: best.map(|b| b.1),
        created_unix_ms: e.created_ms,
        ended_unix_ms: e.ended_ms,
        storage: e.storage.clone(),
        message: e.message.clone(),
    })
}

pub fn trial(st: &State, id: TrialId) -> Option<pb::Trial> {
    let t = st.trials.get(&id)?;
    let now = now_ms();
    Some(pb::Trial {
        id: id.0,
        experiment_id: t.experiment.0,
        seq: t.seq,
        state: pb::TrialState::from(t.state) as i32,
        params_json: serde_json::to_string(&t.params).unwrap_or_default(),
        attempt: t.attempt,
        restarts: t.restarts,
        best_value: t.best_value,
        best_step: t.best_step,
        last_metrics_json: t.last_metrics.clone(),
        worker_id: t
            .live
            .as_ref()
            .map(|l| l.workers().iter().map(|w| w.0.as_str()).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        world_size: t.live.as_ref().map_or(0, |l| l.world_size()),
        data_position_json: t.data_position.clone(),
        started_unix_ms: t.started_ms,
        ended_unix_ms: t.ended_ms,
        message: t.message.clone(),
        checkpoint_step: t.checkpoint_step,
        malformed_metric_lines: t.malformed,
        run_seconds: t.run_ms_at(now) as f64 / 1000.0,
    })
}

pub fn metrics_page(page: crate::history::Page) -> pb::TrialMetricsPage {
    pb::TrialMetricsPage {
        points: page
            .points
            .into_iter()
            .map(|p| pb::MetricPoint {
                step: p.step,
                attempt: p.attempt,
                values: p.values.into_iter().collect(),
            })
            .collect(),
        cursor: page.cursor,
    }
}
