//! Placement: the scheduler's decisions applied, and the assignment each placed rank is sent.

use super::*;
use crate::protocol::Assignment;
use crate::scheduler::{self, PendingTrial, Quotas, WorkerView};

/// Workers offered to a placement pass beyond the ranks pending, so that the spread of trials
/// over the most room is the scheduler's choice, not a cut.
const OFFER_SPARE: usize = 16;

impl State {
    /// Runs the scheduler over connected workers and pending trials and applies its placements.
    pub(super) fn place(&mut self) {
        // Most passes (a report, a heartbeat) have nothing new to place: they cost no walk.
        if !std::mem::take(&mut self.placement_due) {
            return;
        }
        let mut pending = Vec::new();
        for tid in &self.open {
            let t = &self.trials[tid];
            let exp = &self.experiments[&t.experiment];
            let r = &exp.spec.spec.resources;
            if t.live.is_none() && t.state == TrialState::Pending && exp.state == ExperimentState::Active {
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
        // A trial runs exactly while it is in the running state with a live attempt.
        let quotas: Quotas = self
            .experiments
            .iter()
            .filter(|(_, e)| e.state == ExperimentState::Active)
            .map(|(id, e)| {
                let running = self.counts.get(id).map_or(0, |c| c.running);
                (
                    *id,
                    e.parallel_trials.saturating_sub(running.min(u32::MAX as u64) as u32),
                )
            })
            .collect();
        // Workers with room, most room first: the first few suffice for what is pending (the
        // scheduler spreads trials onto the most room), so a pass over a cluster of thousands
        // of idle workers copies a handful. Only when that leaves a trial unplaced (a label or a
        // GPU it needs lies further down) is every worker with room offered.
        let wanted: usize = pending.iter().map(|p| p.ranks as usize).sum::<usize>() + OFFER_SPARE;
        let mut placements = scheduler::schedule(&self.room_view(Some(wanted)), &pending, &quotas);
        if placements.len() < pending.len() && self.with_room.len() > wanted {
            placements = scheduler::schedule(&self.room_view(None), &pending, &quotas);
        }
        let now = self.clock.now_ms();
        for pl in placements {
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
            self.index_live(pl.trial);
            for (rank, worker) in pl.workers.into_iter().enumerate() {
                let cmd = self.assignment(pl.trial, rank as u32);
                self.outbox.push((worker, cmd));
            }
            self.set_trial_state(pl.trial, TrialState::Running);
            self.telemetry.attempts_placed.inc();
        }
    }

    /// Connected workers with room and what is free on each, in the scheduler's order (id),
    /// the `limit` with most room (or all).
    fn room_view(&self, limit: Option<usize>) -> Vec<WorkerView> {
        let mut out: Vec<WorkerView> = self
            .with_room
            .iter()
            .filter_map(|key| {
                let w = self.registry.workers.get(&key.worker).filter(|w| w.connected())?;
                Some(WorkerView {
                    id: key.worker.clone(),
                    labels: w.labels.clone(),
                    free: Resources {
                        cpus: key.cpus.0,
                        gpus: key.gpus.0,
                    },
                })
            })
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The assignment for one rank of a trial's live attempt.
    pub(super) fn assignment(&self, tid: TrialId, rank: u32) -> Command {
        let t = &self.trials[&tid];
        let exp = &self.experiments[&t.experiment];
        let spec = &exp.spec;
        let r = &spec.spec.resources;
        let ranks = t.live.as_ref().map_or(&[][..], |l| &l.ranks[..]);
        let worker = ranks.get(rank as usize).map(|x| &x.worker);
        let local: Vec<usize> = (0..ranks.len()).filter(|&i| Some(&ranks[i].worker) == worker).collect();
        let groups = t.live.as_ref().map_or_else(Vec::new, Live::workers);
        Command::Assign(Box::new(Assignment {
            experiment: exp.id,
            trial: tid,
            attempt: t.attempt,
            params_json: serde_json::to_string(&t.params).expect("params serialise"),
            command: spec.command_for(&t.params),
            env: spec.env_for(&t.params).into_iter().collect(),
            timeout_ms: spec.timeout.map_or(0, |d| d.as_millis() as u64),
            storage: exp.storage.clone(),
            resources: Resources {
                cpus: r.cpus,
                gpus: r.gpus,
            },
            keep_checkpoints: spec.spec.checkpoint.keep_last,
            keep_best_checkpoints: spec.spec.checkpoint.keep_best,
            metric: exp.metric().to_string(),
            maximize: exp.goal() == chorus_core::spec::Goal::Maximize,
            builtin_json: spec.builtin_for(&t.params).map(|b| b.to_string()).unwrap_or_default(),
            rank,
            world_size: ranks.len().max(1) as u32,
            local_rank: local.iter().position(|&i| i == rank as usize).unwrap_or(0) as u32,
            local_world_size: local.len().max(1) as u32,
            group_rank: groups.iter().position(|w| Some(w) == worker).unwrap_or(0) as u32,
            group_world_size: groups.len().max(1) as u32,
            restart_count: t.attempt.saturating_sub(1),
            data_parallel: r.workers.is_distributed(),
            restore_from_trial: t.exploit_from,
            restore: match t.exploit_from {
                Some(donor) => self.trials.get(&donor).and_then(TrialRecord::acknowledged_checkpoint),
                None => t.acknowledged_checkpoint(),
            },
            acked_metrics: t
                .acked_metrics
                .range(..t.attempt)
                .map(|(&attempt, &count)| (attempt, count))
                .collect(),
        }))
    }
}
