//! `chorus.v1` messages to domain types and back, at the edge of the API: nothing inside the
//! state sees protobuf.

use crate::protocol::{
    Command, DataPlan, Event, EventKind, ExitOutcome, JoinRequest, Peers, Registration, Report, RunningAttempt,
};
use crate::scheduler::Resources;
use crate::state::{State, WorkerSummary};
use chorus_core::checkpoint::CheckpointRef;
use chorus_core::metric::MetricReport;
use chorus_core::{ExperimentId, TrialId, WorkerId};
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
        labels: e.lifecycle.labels.clone().into_iter().collect(),
        note: e.lifecycle.note.clone(),
        archived: e.lifecycle.archived,
        deleting: e.lifecycle.deleting.is_some(),
        continued_from: e.lifecycle.continued_from.map(|o| o.0),
    })
}

pub fn trial(st: &State, id: TrialId) -> Option<pb::Trial> {
    let t = st.trials.get(&id)?;
    let now = st.clock.now_ms();
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

pub fn running(r: &pb::RunningAttempt) -> RunningAttempt {
    RunningAttempt {
        trial: TrialId(r.trial_id),
        attempt: r.attempt,
        rank: r.rank,
    }
}

pub fn running_to_pb(r: RunningAttempt) -> pb::RunningAttempt {
    pb::RunningAttempt {
        trial_id: r.trial.0,
        attempt: r.attempt,
        rank: r.rank,
    }
}

pub fn registration(req: pb::RegisterRequest) -> Registration {
    let cap = req.capacity.unwrap_or_default();
    Registration {
        worker: WorkerId(req.worker_id),
        capacity: Resources {
            cpus: cap.cpus,
            gpus: cap.gpus,
        },
        labels: req.labels.into_iter().collect(),
        address: req.address,
        running: req.running.iter().map(running).collect(),
        instance: req.instance,
    }
}

pub fn report(req: pb::ReportTrialRequest) -> Report {
    Report {
        worker: WorkerId(req.worker_id),
        epoch: req.epoch,
        trial: TrialId(req.trial_id),
        attempt: req.attempt,
        rank: req.rank,
        events: req.events.into_iter().filter_map(event).collect(),
    }
}

/// One event; an event of no kind (a newer worker's, unknown here) is dropped.
fn event(ev: pb::TrialEvent) -> Option<Event> {
    use pb::trial_event::Kind;
    let kind = match ev.kind? {
        Kind::Started(s) => EventKind::Started {
            restored: s.restored_step.map(|step| CheckpointRef {
                step,
                attempt: s.restored_attempt,
            }),
        },
        Kind::Metric(m) => EventKind::Metric(metric(m)),
        Kind::Checkpoint(c) => EventKind::Checkpoint {
            step: c.step,
            data_position: c.data_position_json,
        },
        Kind::Malformed(_) => EventKind::Malformed,
        Kind::Exited(x) => EventKind::Exited {
            outcome: match x.kind() {
                pb::ExitKind::Succeeded => ExitOutcome::Succeeded,
                pb::ExitKind::Failed => ExitOutcome::Failed,
                pb::ExitKind::TimedOut => ExitOutcome::TimedOut,
                pb::ExitKind::Interrupted => ExitOutcome::Interrupted,
                pb::ExitKind::Killed | pb::ExitKind::Unspecified => ExitOutcome::Killed,
            },
            message: x.message,
        },
    };
    Some(Event {
        seq: ev.seq,
        unix_ms: ev.unix_ms,
        kind,
    })
}

/// A metric report: typed, or as JSON text from a worker older than typed reports. A typed
/// report is held to the same rules as a parsed line.
fn metric(m: pb::Metric) -> Result<MetricReport, String> {
    if m.values.is_empty() && m.step.is_none() && !m.json.is_empty() {
        return MetricReport::from_json(&m.json);
    }
    let report = MetricReport {
        step: m.step,
        values: m.values.into_iter().collect(),
    };
    report.check()?;
    Ok(report)
}

pub fn command(c: Command) -> pb::WorkerCommand {
    use pb::worker_command::Command as C;
    let command = match c {
        Command::Kill { trial, attempt, reason } => C::Kill(pb::KillAttempt {
            trial_id: trial.0,
            attempt,
            reason,
        }),
        Command::Assign(a) => C::Assign(pb::Assignment {
            experiment_id: a.experiment.0,
            trial_id: a.trial.0,
            attempt: a.attempt,
            params_json: a.params_json,
            command: a.command,
            env: a.env.into_iter().collect(),
            timeout_ms: a.timeout_ms,
            storage: a.storage,
            resources: Some(pb::Resources {
                cpus: a.resources.cpus,
                gpus: a.resources.gpus,
            }),
            keep_checkpoints: a.keep_checkpoints,
            metric: a.metric,
            builtin_json: a.builtin_json,
            keep_best_checkpoints: a.keep_best_checkpoints,
            maximize: a.maximize,
            rank: a.rank,
            world_size: a.world_size,
            local_world_size: a.local_world_size,
            local_rank: a.local_rank,
            restart_count: a.restart_count,
            group_rank: a.group_rank,
            group_world_size: a.group_world_size,
            data_parallel: a.data_parallel,
            restore_from_trial: a.restore_from_trial.map_or(0, |t| t.0),
            restore: a.restore.map(|c| pb::CheckpointRef {
                step: c.step,
                attempt: c.attempt,
            }),
            acked_metrics: a
                .acked_metrics
                .into_iter()
                .map(|(attempt, count)| pb::AttemptMetricCount { attempt, count })
                .collect(),
        }),
    };
    pb::WorkerCommand { command: Some(command) }
}

pub fn join_request(req: pb::RendezvousRequest) -> JoinRequest {
    JoinRequest {
        worker: WorkerId(req.worker_id),
        epoch: req.epoch,
        trial: TrialId(req.trial_id),
        attempt: req.attempt,
        rank: req.rank,
        address: req.address,
        nccl_id: req.nccl_id,
        data: req.data.map(|d| DataPlan {
            shards: d
                .shards
                .into_iter()
                .map(|s| chorus_core::shards::ShardSize {
                    key: s.key,
                    samples: s.samples,
                })
                .collect(),
            seed: d.seed,
            batch_size: d.batch_size,
            position_json: d.position_json,
            epoch: d.epoch,
        }),
    }
}

pub fn peers(p: Peers) -> pb::RendezvousResponse {
    pb::RendezvousResponse {
        world_size: p.world_size,
        addresses: p.addresses,
        nccl_id: p.nccl_id,
        session: p.session,
        position_json: p.position_json,
    }
}

/// What `ListWorkers` and `DrainWorker` say of one worker.
pub fn worker(w: WorkerSummary) -> pb::WorkerInfo {
    let mut trials: Vec<u64> = w.running.iter().map(|r| r.trial.0).collect();
    trials.dedup();
    pb::WorkerInfo {
        id: w.id.0,
        address: w.address,
        capacity: Some(pb::Resources {
            cpus: w.capacity.cpus,
            gpus: w.capacity.gpus,
        }),
        used: Some(pb::Resources {
            cpus: w.used.cpus,
            gpus: w.used.gpus,
        }),
        labels: w.labels.into_iter().collect(),
        alive: w.registered,
        last_seen_unix_ms: w.last_seen_ms,
        running_trials: trials,
        draining: w.drained,
    }
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
