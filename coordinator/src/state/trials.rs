//! Trials and their attempts: ending an attempt, ending a trial, restarts, and the searcher's stop, pause and exploit decisions.

use super::*;

impl State {
    /// Stops a trial's live attempt (if any) and tells its worker to kill it.
    pub(super) fn kill_live(&mut self, tid: TrialId, reason: &str) {
        let now = self.clock.now_ms();
        let Some(t) = self.trials.get_mut(&tid) else {
            return;
        };
        let attempt = t.attempt;
        let exp = t.experiment;
        if let Some(workers) = t.close_attempt(now) {
            self.unindex_live(tid, &workers);
            self.rendezvous.remove(&tid);
            self.attempts.push(AttemptRow {
                trial: tid,
                attempt,
                worker: joined(&workers),
                assigned_ms: 0,
                ended_ms: now,
                outcome: format!("killed: {reason}"),
            });
            self.send_kills(tid, attempt, workers, reason);
            self.touch_trial(tid, exp);
        }
    }

    /// Tells each worker to kill its ranks of the attempt.
    pub(super) fn send_kills(&mut self, tid: TrialId, attempt: u32, workers: Vec<WorkerId>, reason: &str) {
        for worker in workers {
            let kill = Command::Kill {
                trial: tid,
                attempt,
                reason: reason.to_string(),
            };
            self.outbox.push((worker, kill));
        }
    }

    /// Ends a trial for good.
    pub(super) fn finish(&mut self, tid: TrialId, state: TrialState, message: &str) {
        let Some(t) = self.trials.get_mut(&tid) else {
            return;
        };
        t.ended_ms = self.clock.now_ms();
        t.message = message.to_string();
        let (exp_id, best) = (t.experiment, t.best_value);
        let last: serde_json::Value = serde_json::from_str(&t.last_metrics).unwrap_or_default();
        self.set_trial_state(tid, state);
        let objectives: Vec<f64> = match self.experiments.get(&exp_id).map(|e| e.spec.objectives()) {
            Some(o) if o.len() > 1 => o
                .iter()
                .map(|m| last.get(&m.name).and_then(serde_json::Value::as_f64))
                .collect::<Option<Vec<f64>>>()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let event = match state {
            TrialState::Completed => SearchEvent::Completed {
                trial: tid,
                value: best,
                objectives,
            },
            _ => SearchEvent::Failed { trial: tid },
        };
        if let Some(exp) = self.experiments.get_mut(&exp_id) {
            let actions = exp.observe(&event);
            self.touch_experiment(exp_id);
            self.apply_search_actions(actions);
        }
        if state == TrialState::Failed {
            self.check_failed_budget(exp_id);
        }
    }

    /// An attempt ended badly: restart the trial if its budget allows, else fail it.
    pub(super) fn fail_or_restart(&mut self, tid: TrialId, reason: &str) {
        let Some(t) = self.trials.get(&tid) else {
            return;
        };
        let max = self
            .experiments
            .get(&t.experiment)
            .map_or(0, |e| e.spec.spec.max_restarts);
        match after_failure(t.restarts, max) {
            AfterFailure::Restart => {
                let t = self.trials.get_mut(&tid).expect("checked");
                t.restarts += 1;
                t.message = format!("restart {} after: {reason}", t.restarts);
                self.set_trial_state(tid, TrialState::Pending);
                let exp = self.trials[&tid].experiment;
                self.touch_trial(tid, exp);
            }
            AfterFailure::Fail => {
                let msg = if max > 0 {
                    format!("{reason} (after {max} restarts)")
                } else {
                    reason.to_string()
                };
                self.finish(tid, TrialState::Failed, &msg);
            }
        }
    }

    /// The live attempt was lost (worker gone or attempt vanished): costs a restart.
    pub(super) fn lose_attempt(&mut self, tid: TrialId, reason: &str) {
        tracing::warn!(trial = %tid, reason, "attempt lost");
        self.telemetry.attempts_lost.inc();
        self.kill_live(tid, reason);
        self.fail_or_restart(tid, reason);
    }

    pub(super) fn apply_search_actions(&mut self, actions: Vec<SearchAction>) {
        for a in actions {
            match a {
                SearchAction::Stop { trial, reason } => {
                    if self.open.contains(&trial) {
                        self.kill_live(trial, &reason);
                        self.finish(trial, TrialState::Completed, &format!("stopped early: {reason}"));
                    }
                }
                SearchAction::Pause { trial, reason } => {
                    let held = self.trials.get(&trial).map(|t| t.state);
                    if matches!(held, Some(TrialState::Running | TrialState::Pending)) {
                        // Its newest checkpoint is where a promotion resumes it.
                        self.kill_live(trial, &reason);
                        let t = self.trials.get_mut(&trial).expect("checked");
                        t.message = reason;
                        self.set_trial_state(trial, TrialState::Paused);
                    }
                }
                SearchAction::Exploit {
                    trial,
                    donor,
                    params,
                    reason,
                } => {
                    if self.open.contains(&trial) && self.trials.contains_key(&donor) {
                        // Placed again at once with the donor's checkpoint: a decision of the
                        // search, not a failure, so it costs no restart.
                        self.kill_live(trial, &reason);
                        let t = self.trials.get_mut(&trial).expect("open trials exist");
                        t.params = params;
                        t.exploit_from = Some(donor);
                        t.message = reason;
                        let exp = t.experiment;
                        self.set_trial_state(trial, TrialState::Pending);
                        self.touch_trial(trial, exp);
                    }
                }
            }
        }
    }
}
