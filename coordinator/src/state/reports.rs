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
                t.last_metrics = latest_metrics(&t.last_metrics, &report);
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

/// Names the latest values of a trial may hold once step-less reports are merged in; past
/// this a report replaces them, so a program printing ever new names cannot grow the record.
pub(crate) const MAX_LATEST_METRICS: usize = 256;

/// A trial's latest values after `report`: a report with a step replaces them (it is the
/// trial's own view at that step); one without a step updates them name by name, so a reading
/// that arrives on its own (the worker's `gpu_util` and `gpu_mem_mb` every few seconds, or a
/// program printing values as they come) does not hide the trial's last metrics, which the
/// CLI shows and multi-objective completion reads.
pub(crate) fn latest_metrics(previous: &str, report: &MetricReport) -> String {
    let fresh = report.to_json();
    if report.step.is_some() {
        return serde_json::Value::Object(fresh).to_string();
    }
    let mut merged = match serde_json::from_str::<serde_json::Value>(previous) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for (k, v) in fresh {
        merged.insert(k, v);
    }
    if merged.len() > MAX_LATEST_METRICS {
        return serde_json::Value::Object(report.to_json()).to_string();
    }
    serde_json::Value::Object(merged).to_string()
}

#[cfg(test)]
mod latest_tests {
    use super::*;

    fn report(step: Option<i64>, values: &[(&str, f64)]) -> MetricReport {
        MetricReport {
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn a_reading_without_a_step_keeps_the_trials_last_metrics() {
        let last = latest_metrics("", &report(Some(9), &[("val_loss", 0.4), ("acc", 0.8)]));
        let last = latest_metrics(&last, &report(None, &[("gpu_util", 71.0), ("gpu_mem_mb", 2048.0)]));
        let v: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["step"], 9);
        assert_eq!(v["val_loss"], 0.4);
        assert_eq!(v["gpu_util"], 71.0);
        // A report with a step is the trial's view at that step, whole.
        let last = latest_metrics(&last, &report(Some(10), &[("val_loss", 0.3)]));
        let v: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v, serde_json::json!({"step": 10, "val_loss": 0.3}));
        // Step-less reports with ever new names cannot grow the record past its bound.
        let mut last = last;
        for i in 0..2 * MAX_LATEST_METRICS {
            last = latest_metrics(&last, &report(None, &[(&format!("m{i}"), 1.0)]));
            let n = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&last)
                .unwrap()
                .len();
            assert!(n <= MAX_LATEST_METRICS, "{n} names");
        }
    }
}
