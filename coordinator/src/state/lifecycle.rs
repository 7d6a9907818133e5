//! An experiment's lifecycle around and after its run: labels, notes, archival, and the two
//! ends of a deletion (marking it begun, and forgetting the experiment once its storage is
//! clean). The storage work in between runs off the lock ([`crate::purge`]).

use super::*;
use crate::experiment::lifecycle::Deletion;

/// What a deletion must do in storage, read under the lock and done off it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletePlan {
    pub experiment: ExperimentId,
    pub storage: String,
    pub how: Deletion,
    /// Every trial of the experiment, in creation order.
    pub trials: Vec<TrialId>,
    /// The trials whose checkpoints stay (the best ones, best first); empty for a full deletion.
    pub keep: Vec<TrialId>,
}

impl State {
    pub fn label(&mut self, id: ExperimentId, add: &BTreeMap<String, String>, remove: &[String]) -> Result<()> {
        let exp = self.known_experiment(id)?;
        exp.lifecycle.relabel(add, remove)?;
        self.touch_experiment(id);
        Ok(())
    }

    pub fn set_note(&mut self, id: ExperimentId, note: &str) -> Result<()> {
        self.known_experiment(id)?.lifecycle.set_note(note)?;
        self.touch_experiment(id);
        Ok(())
    }

    /// Archives an ended experiment, or with `undo` unarchives any.
    pub fn archive(&mut self, id: ExperimentId, undo: bool) -> Result<()> {
        let exp = self.known_experiment(id)?;
        if !undo && !exp.state.is_terminal() {
            return Err(CoordError::FailedPrecondition(format!(
                "cannot archive experiment {id}: it is {}; only an ended experiment can be archived (kill it first)",
                exp.state
            )));
        }
        if exp.lifecycle.archived != undo {
            return Ok(());
        }
        exp.lifecycle.archived = !undo;
        self.touch_experiment(id);
        Ok(())
    }

    /// Marks a deletion begun (durably, with the flush) and says what to delete. Refused while
    /// the experiment runs or any of its trials has a live attempt, whose worker could still
    /// write under the prefix being deleted. A deletion already begun is finished as begun,
    /// except that a full deletion may take over from a partial one.
    pub fn begin_delete(&mut self, id: ExperimentId, asked: Deletion) -> Result<DeletePlan> {
        let exp = self.experiment(id)?;
        if !exp.state.is_terminal() {
            return Err(CoordError::FailedPrecondition(format!(
                "cannot delete experiment {id}: it is {}; kill it first",
                exp.state
            )));
        }
        if let Some(t) = exp
            .trials
            .iter()
            .find(|t| self.trials.get(t).is_some_and(|t| t.live.is_some()))
        {
            return Err(CoordError::FailedPrecondition(format!(
                "cannot delete experiment {id}: trial {t} still has a live attempt; retry once its worker has stopped it"
            )));
        }
        let how = match (exp.lifecycle.deleting, asked) {
            (Some(Deletion::All), Deletion::KeepBest(_)) => {
                return Err(CoordError::FailedPrecondition(format!(
                    "experiment {id} is being deleted entirely; delete it again without --keep-best to finish"
                )));
            }
            (Some(Deletion::KeepBest(n)), Deletion::KeepBest(m)) if n != m => {
                return Err(CoordError::FailedPrecondition(format!(
                    "a deletion keeping the {n} best trials of experiment {id} is in progress; repeat it with --keep-best {n}"
                )));
            }
            (_, asked) => asked,
        };
        let keep = match how {
            Deletion::All => Vec::new(),
            Deletion::KeepBest(n) => {
                let goal = exp.goal();
                let mut ranked: Vec<(TrialId, f64)> = exp
                    .trials
                    .iter()
                    .filter_map(|t| Some((*t, self.trials.get(t)?.best_value?)))
                    .filter(|(_, v)| !v.is_nan())
                    .collect();
                // Best first; equal values by trial id, so the choice is deterministic.
                ranked.sort_by(|a, b| {
                    let (la, lb) = (chorus_search::loss(goal, a.1), chorus_search::loss(goal, b.1));
                    la.total_cmp(&lb).then(a.0.cmp(&b.0))
                });
                ranked.into_iter().take(n as usize).map(|(t, _)| t).collect()
            }
        };
        let plan = DeletePlan {
            experiment: id,
            storage: exp.storage.clone(),
            how,
            trials: exp.trials.clone(),
            keep,
        };
        let exp = self.experiments.get_mut(&id).expect("checked above");
        if exp.lifecycle.deleting != Some(how) {
            exp.lifecycle.deleting = Some(how);
            self.touch_experiment(id);
        }
        Ok(plan)
    }

    /// Ends a deletion whose storage work is done: a full one forgets the experiment and its
    /// trials (their rows go with the flush); a partial one clears its mark.
    pub fn finish_delete(&mut self, id: ExperimentId, how: Deletion) -> Result<()> {
        let exp = self.experiment(id)?;
        if exp.lifecycle.deleting != Some(how) {
            // Another request changed the deletion meanwhile; it finishes it.
            return Ok(());
        }
        match how {
            Deletion::KeepBest(_) => {
                self.experiments.get_mut(&id).expect("checked above").lifecycle.deleting = None;
                self.touch_experiment(id);
            }
            Deletion::All => {
                let exp = self.experiments.remove(&id).expect("checked above");
                for t in &exp.trials {
                    self.trials.remove(t);
                    self.open.remove(t);
                    self.dirty_trials.remove(t);
                }
                self.counts.remove(&id);
                self.best.remove(&id);
                self.dirty_experiments.remove(&id);
                self.created_experiments.remove(&id);
                self.removed_experiments.push(id);
                self.changed.push((id, None));
            }
        }
        Ok(())
    }

    /// Experiments whose deletion was begun and not finished (a crash, a storage failure).
    pub fn unfinished_deletions(&self) -> Vec<(ExperimentId, Deletion)> {
        self.experiments
            .iter()
            .filter_map(|(id, e)| Some((*id, e.lifecycle.deleting?)))
            .collect()
    }

    fn known_experiment(&mut self, id: ExperimentId) -> Result<&mut crate::experiment::Experiment> {
        self.experiments
            .get_mut(&id)
            .ok_or_else(|| CoordError::NotFound(format!("experiment {id} does not exist")))
    }
}
