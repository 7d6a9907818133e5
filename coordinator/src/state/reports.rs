//! Reports: the events an attempt's ranks send (started, metrics, checkpoints, exits), applied once each.

use super::*;
use crate::protocol::{Event, EventKind, ExitOutcome, Report};
use chorus_core::metric::MetricReport;

impl State {
    /// Applies one attempt's report. Events already applied (by sequence number) are skipped,
    /// so a report resent after a lost answer changes nothing.
    pub fn report(&mut self, req: Report) -> Result<()> {
        let tid = req.trial;
        let worker = req.worker.clone();
        self.check_epoch(&worker, req.epoch)?;
        let t = self.trial(tid)?;
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
        self.registry.touch(&worker, self.clock.now(), self.clock.now_ms());
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

    pub(super) fn apply_event(&mut self, tid: TrialId, attempt: u32, rank: u32, ev: Event) {
        let at_ms = if ev.unix_ms > 0 {
            ev.unix_ms
        } else {
            self.clock.now_ms()
        };
        let t = self.trials.get_mut(&tid).expect("caller checked");
        let exp_id = t.experiment;
        match ev.kind {
            EventKind::Started { restored } => {
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
                if let Some(c) = restored {
                    t.checkpoint_step = Some(c.step);
                    t.checkpoint_attempt = c.attempt;
                }
            }
            EventKind::Metric(report) => {
                // Counted whatever it holds: the worker stored this line, so a later attempt's
                // history must carry it.
                *t.acked_metrics.entry(attempt).or_default() += 1;
                let report: MetricReport = match report {
                    Ok(r) => r,
                    Err(e) => {
                        t.malformed += 1;
                        tracing::warn!(trial = %tid, error = %e, "malformed metric report");
                        return;
                    }
                };
                // A worker's GPU reading may land after the trial's last report: the trial's
                // latest metrics stay what the trial itself reported last.
                if !report.is_device_reading() {
                    t.last_metrics = serde_json::Value::Object(report.to_json()).to_string();
                }
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
                let actions = exp.observe(&SearchEvent::Reported {
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
            EventKind::Checkpoint { step, data_position } => {
                t.checkpoint_step = Some(step);
                t.checkpoint_attempt = attempt;
                if !data_position.is_empty() {
                    t.data_position = data_position;
                }
            }
            EventKind::Malformed => {
                t.malformed += 1;
            }
            EventKind::Exited { outcome, message } => {
                let world = t.live.as_ref().map_or(1, |l| l.ranks.len());
                if world > 1 && rank > 0 && outcome == ExitOutcome::Succeeded {
                    // Rank 0 holds the final checkpoint and decides the outcome; this rank waits.
                    if let Some(r) = t.live.as_mut().and_then(|l| l.ranks.get_mut(rank as usize)) {
                        r.finished = true;
                    }
                    return;
                }
                let message = if world > 1 {
                    format!("rank {rank} of {world}: {message}")
                } else {
                    message
                };
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
                let workers = t.close_attempt(self.clock.now_ms()).unwrap_or_default();
                self.unindex_live(tid, &workers);
                self.rendezvous.remove(&tid);
                self.send_kills(tid, attempt, others, &format!("another rank ended: {message}"));
                self.attempts.push(AttemptRow {
                    trial: tid,
                    attempt,
                    worker: joined(&workers),
                    assigned_ms: 0,
                    ended_ms: self.clock.now_ms(),
                    outcome: format!("{outcome:?}: {message}"),
                });
                match outcome {
                    ExitOutcome::Succeeded => self.finish(tid, TrialState::Completed, ""),
                    ExitOutcome::TimedOut => self.finish(tid, TrialState::Failed, &format!("timed out: {message}")),
                    ExitOutcome::Failed => self.fail_or_restart(tid, &message),
                    ExitOutcome::Interrupted => {
                        // The worker went away politely: place the trial again, at no cost.
                        let t = self.trials.get_mut(&tid).expect("exists");
                        t.message = format!("interrupted: {message}");
                        self.set_trial_state(tid, TrialState::Pending);
                    }
                    ExitOutcome::Killed => self.fail_or_restart(tid, &format!("killed on the worker: {message}")),
                }
            }
        }
    }
}
