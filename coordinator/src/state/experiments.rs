//! Experiments: submit, pause, resume, kill, budgets, and creating their trials as the
//! searcher suggests them.

use super::*;
use chorus_core::spec::ValidSpec;

impl State {
    pub fn add_experiment(&mut self, id: ExperimentId, spec: ValidSpec, storage: String) -> ExperimentId {
        let exp = Experiment::new(id, spec, storage, self.clock.now_ms());
        self.insert_experiment(exp)
    }

    /// Adds an experiment that continues `origin`, its searcher warm-started with `origin`'s
    /// finished trials when it can use them; says how it started.
    pub fn add_continued_experiment(
        &mut self,
        id: ExperimentId,
        spec: ValidSpec,
        storage: String,
        origin: ExperimentId,
    ) -> Result<String> {
        let prior = self.finished_trials(origin)?;
        let mut exp = Experiment::new(id, spec, storage, self.clock.now_ms());
        exp.lifecycle.continued_from = Some(origin);
        let searcher = exp.spec.spec.searcher.name.as_str();
        let message = if prior.is_empty() {
            format!("experiment {origin} has no finished trial with a value: the {searcher} searcher starts fresh")
        } else if exp.warm_start(&prior) {
            format!(
                "the {searcher} searcher is warm-started with {} finished trial(s) of experiment {origin}",
                prior.len()
            )
        } else {
            format!("the {searcher} searcher cannot be warm-started: it starts fresh")
        };
        self.insert_experiment(exp);
        Ok(message)
    }

    /// An experiment's completed trials that have a value of its searcher metric, in creation
    /// order: what a continuation's searcher learns from.
    pub fn finished_trials(&self, id: ExperimentId) -> Result<Vec<chorus_search::Prior>> {
        let exp = self.experiment(id)?;
        Ok(exp
            .trials
            .iter()
            .filter_map(|t| self.trials.get(t))
            .filter(|t| t.state == TrialState::Completed)
            .filter_map(|t| {
                Some(chorus_search::Prior {
                    trial: t.id,
                    params: t.params.clone(),
                    value: t.best_value.filter(|v| !v.is_nan())?,
                })
            })
            .collect())
    }

    fn insert_experiment(&mut self, exp: Experiment) -> ExperimentId {
        let id = exp.id;
        self.experiments.insert(id, exp);
        self.counts.insert(id, Counts::default());
        self.created_experiments.insert(id);
        self.touch_experiment(id);
        self.pump();
        id
    }

    pub fn trial(&self, id: TrialId) -> Result<&TrialRecord> {
        self.trials
            .get(&id)
            .ok_or_else(|| CoordError::NotFound(format!("trial {id} does not exist")))
    }

    /// A trial's experiment and that experiment's storage URI: where its records live.
    pub fn trial_storage(&self, id: TrialId) -> Result<(ExperimentId, String)> {
        let t = self.trial(id)?;
        Ok((t.experiment, self.experiment(t.experiment)?.storage.clone()))
    }

    pub fn experiment(&self, id: ExperimentId) -> Result<&Experiment> {
        self.experiments
            .get(&id)
            .ok_or_else(|| CoordError::NotFound(format!("experiment {id} does not exist")))
    }

    pub(super) fn live_experiment(&mut self, id: ExperimentId, verb: &str) -> Result<&mut Experiment> {
        let exp = self
            .experiments
            .get_mut(&id)
            .ok_or_else(|| CoordError::NotFound(format!("experiment {id} does not exist")))?;
        if exp.state.is_terminal() {
            return Err(CoordError::FailedPrecondition(format!(
                "cannot {verb} experiment {id}: it has already ended ({})",
                exp.state
            )));
        }
        Ok(exp)
    }

    pub fn pause(&mut self, id: ExperimentId) -> Result<()> {
        if self.live_experiment(id, "pause")?.state == ExperimentState::Paused {
            return Ok(());
        }
        let exp = self.experiments.get_mut(&id).expect("checked above");
        exp.state = ExperimentState::Paused;
        let running: Vec<TrialId> = exp
            .trials
            .iter()
            .copied()
            .filter(|t| self.open.contains(t) && self.trials[t].state != TrialState::Paused)
            .collect();
        self.touch_experiment(id);
        // Running attempts stop now and resume from their last checkpoint later; a pause
        // costs no restart. Trials held at a rung stay held.
        for t in running {
            self.kill_live(t, "experiment paused");
            self.set_trial_state(t, TrialState::Pending);
        }
        Ok(())
    }

    pub fn resume(&mut self, id: ExperimentId) -> Result<()> {
        let exp = self.live_experiment(id, "resume")?;
        if exp.state == ExperimentState::Active {
            return Ok(());
        }
        exp.state = ExperimentState::Active;
        self.touch_experiment(id);
        self.placement_due = true;
        self.pump();
        Ok(())
    }

    pub fn kill(&mut self, id: ExperimentId) -> Result<()> {
        self.live_experiment(id, "kill")?;
        self.end_experiment(id, ExperimentState::Killed, "killed by user");
        Ok(())
    }

    pub fn update_budget(
        &mut self,
        id: ExperimentId,
        max_trials: Option<u64>,
        parallel_trials: Option<u32>,
        max_failed_trials: Option<u64>,
    ) -> Result<()> {
        let exp = self.live_experiment(id, "update")?;
        if let Some(m) = max_trials {
            if m < exp.created_trials {
                return Err(CoordError::InvalidArgument(format!(
                    "max_trials: {m} is below the {} trials already created",
                    exp.created_trials
                )));
            }
            if m == 0 {
                return Err(CoordError::InvalidArgument("max_trials: must be at least 1".into()));
            }
        }
        if parallel_trials == Some(0) {
            return Err(CoordError::InvalidArgument(
                "parallel_trials: must be at least 1".into(),
            ));
        }
        if let Some(m) = max_trials {
            exp.max_trials = m;
        }
        if let Some(p) = parallel_trials {
            exp.parallel_trials = p;
        }
        if let Some(f) = max_failed_trials {
            exp.max_failed_trials = Some(f);
        }
        self.touch_experiment(id);
        self.placement_due = true;
        self.check_failed_budget(id);
        self.pump();
        Ok(())
    }

    /// Ends an experiment: every open trial is killed with `reason`.
    pub(super) fn end_experiment(&mut self, id: ExperimentId, state: ExperimentState, reason: &str) {
        let Some(exp) = self.experiments.get_mut(&id) else {
            return;
        };
        exp.state = state;
        exp.ended_ms = self.clock.now_ms();
        exp.message = reason.to_string();
        let open: Vec<TrialId> = exp.trials.iter().copied().filter(|t| self.open.contains(t)).collect();
        self.touch_experiment(id);
        for t in open {
            self.kill_live(t, reason);
            if let Some(tr) = self.trials.get_mut(&t) {
                tr.message = reason.to_string();
                tr.ended_ms = self.clock.now_ms();
            }
            self.set_trial_state(t, TrialState::Killed);
        }
    }

    pub(super) fn check_failed_budget(&mut self, id: ExperimentId) {
        let (Some(exp), Some(c)) = (self.experiments.get(&id), self.counts.get(&id)) else {
            return;
        };
        if let Some(max) = exp.max_failed_trials
            && c.failed > max
            && !exp.state.is_terminal()
        {
            let reason = format!("{} trials failed, more than max_failed_trials ({max})", c.failed);
            self.end_experiment(id, ExperimentState::Failed, &reason);
        }
    }

    /// Creates trials while the experiment has room, completes finished experiments, and
    /// places pending trials on workers.
    pub fn pump(&mut self) {
        let ids: Vec<ExperimentId> = self
            .experiments
            .iter()
            .filter(|(_, e)| e.state == ExperimentState::Active)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.fill(*id);
            let done = {
                let exp = &self.experiments[id];
                exp.creation_finished() && self.counts.get(id).is_none_or(|c| c.active() == 0)
            };
            if done {
                // Nothing runs and nothing more will be created or promoted: trials still
                // held at a rung end where they are.
                let held: Vec<TrialId> = self.experiments[id]
                    .trials
                    .iter()
                    .copied()
                    .filter(|t| self.trials[t].state == TrialState::Paused)
                    .collect();
                for t in held {
                    let why = format!("stopped early, never promoted: {}", self.trials[&t].message);
                    self.finish(t, TrialState::Completed, &why);
                }
                let exp = self.experiments.get_mut(id).expect("listed above");
                exp.state = ExperimentState::Completed;
                exp.ended_ms = self.clock.now_ms();
                self.touch_experiment(*id);
            }
        }
        self.place();
    }

    pub(super) fn fill(&mut self, id: ExperimentId) {
        loop {
            let active = self.counts.get(&id).map_or(0, Counts::active);
            let exp = self.experiments.get_mut(&id).expect("caller checked");
            if exp.state != ExperimentState::Active || active >= exp.parallel_trials as u64 {
                return;
            }
            // A trial held at a rung and now promoted comes before any new one.
            if let Some((tid, reason)) = exp.promote() {
                self.touch_experiment(id);
                if self.trials.get(&tid).is_some_and(|t| t.state == TrialState::Paused) {
                    self.trials.get_mut(&tid).expect("checked").message = reason;
                    self.set_trial_state(tid, TrialState::Pending);
                }
                continue;
            }
            if exp.creation_finished() {
                return;
            }
            match exp.suggest(TrialId(self.next_trial)) {
                Suggestion::Create(params) => {
                    let tid = TrialId(self.next_trial);
                    self.next_trial += 1;
                    let seq = exp.created_trials;
                    exp.created_trials += 1;
                    exp.trials.push(tid);
                    self.trials.insert(tid, TrialRecord::new(tid, id, seq, params));
                    self.open.insert(tid);
                    self.counts.entry(id).or_default().pending += 1;
                    self.placement_due = true;
                    self.touch_trial(tid, id);
                    self.touch_experiment(id);
                }
                Suggestion::Exhausted => {
                    exp.exhausted = true;
                    self.touch_experiment(id);
                    return;
                }
                Suggestion::Wait => return,
            }
        }
    }
}
