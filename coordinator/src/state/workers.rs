//! Workers and their leases: registration, heartbeats, drains, command streams, and what each worker says it runs.

use super::*;
use crate::cluster::WorkerEpoch;
use crate::protocol::{Registered, Registration};

/// One worker as `ListWorkers` shows it.
#[derive(Debug, Clone)]
pub struct WorkerSummary {
    pub id: WorkerId,
    pub capacity: Resources,
    pub used: Resources,
    pub labels: BTreeMap<String, String>,
    pub address: String,
    pub last_seen_ms: i64,
    pub registered: bool,
    pub drained: bool,
    pub running: Vec<RunningAttempt>,
}

impl State {
    /// Drains a worker of new trials (its running attempts go on to their end), or with `undo`
    /// makes it eligible again. Kept across coordinator restarts and worker re-registrations.
    pub fn drain(&mut self, id: &WorkerId, undo: bool) -> Result<()> {
        if !undo && !self.registry.workers.contains_key(id) {
            return Err(CoordError::NotFound(format!(
                "worker {id} is not known to this coordinator"
            )));
        }
        let changed = if undo {
            self.drained.remove(id)
        } else {
            self.drained.insert(id.clone())
        };
        if changed {
            self.drained_dirty = true;
            self.placement_due = true;
            self.refresh_room(id);
            tracing::info!(worker = %id, drained = !undo, "worker drain changed");
            self.pump();
        }
        Ok(())
    }

    /// A worker joins or rejoins under a new epoch, which fences every earlier registration of
    /// its id at once. Refused (ALREADY_EXISTS, nothing changed) while another instance, or one
    /// that did not say which it is, holds the id's lease: two pods given one worker id must
    /// not take each other's attempts. Returns the epoch and the attempts it should kill.
    pub fn register(&mut self, r: Registration) -> Result<Registered> {
        if r.worker.0.trim().is_empty() {
            return Err(CoordError::InvalidArgument("worker_id must not be empty".into()));
        }
        let (now, now_ms) = (self.clock.now(), self.clock.now_ms());
        let ttl = self.timing.lease_ttl;
        if let Some(holder) = self.registry.holder(&r.worker, now, ttl)
            && (r.instance.is_empty() || r.instance != holder.instance)
        {
            let left = ttl.saturating_sub(now.saturating_duration_since(holder.last_seen));
            let lapses_ms = holder.last_seen_ms + ttl.as_millis() as i64;
            return Err(CoordError::AlreadyExists(format!(
                "worker id {} is registered by another instance ({}, epoch {}) whose lease lapses at {} \
                 (in {} ms) unless it renews it; give each worker its own id (the pod name), or wait",
                r.worker,
                if holder.instance.is_empty() {
                    "unnamed".to_string()
                } else {
                    format!("instance {}", holder.instance)
                },
                holder.epoch,
                format_ms(lapses_ms),
                left.as_millis(),
            )));
        }
        let record = self.registry.register(
            r.worker.clone(),
            r.instance,
            r.capacity,
            r.labels,
            r.address,
            now,
            now_ms,
        );
        let epoch = record.epoch;
        self.epoch_writes.push(record);
        self.refresh_room(&r.worker);
        let kill = self.claim(&r.worker, &r.running, true);
        self.placement_due = true;
        self.pump();
        Ok(Registered { epoch, kill })
    }

    /// Refuses a call of a registration that is not the worker id's newest (ABORTED with the
    /// fenced reason, so the worker exits). Epoch 0 (a worker that predates epochs, or never
    /// registered) is always refused. A worker id with no epoch on record (its registration
    /// predates the store's epochs) has nothing to be fenced by.
    pub fn check_epoch(&self, worker: &WorkerId, epoch: u64) -> Result<()> {
        // The hot path (a registered worker's heartbeat or report): one compare on its entry.
        if epoch != 0
            && self
                .registry
                .workers
                .get(worker)
                .is_some_and(|e| e.registered && e.epoch == epoch)
        {
            return Ok(());
        }
        match self.registry.epoch(worker) {
            Some(current) if current.epoch == epoch && epoch != 0 => Ok(()),
            None if epoch != 0 => Ok(()),
            current => Err(fenced(worker, epoch, current)),
        }
    }

    /// Matches what a worker says it runs against the live attempts placed on it: what it
    /// runs that is not placed there is to be killed, and what is placed there and it no longer
    /// lists is missing (lost once missing for a lease).
    pub(super) fn claim(
        &mut self,
        worker: &WorkerId,
        running: &[RunningAttempt],
        registering: bool,
    ) -> Vec<RunningAttempt> {
        let mut kill = Vec::new();
        let mut listed = BTreeSet::new();
        let now_ms = self.clock.now_ms();
        for r in running {
            let here = |t: &TrialRecord| {
                t.attempt == r.attempt
                    && t.live
                        .as_ref()
                        .and_then(|l| l.ranks.get(r.rank as usize))
                        .is_some_and(|x| &x.worker == worker)
            };
            match self.trials.get_mut(&r.trial) {
                Some(t) if here(t) => {
                    listed.insert((r.trial, r.rank));
                    let l = t.live.as_mut().expect("checked");
                    let rank = &mut l.ranks[r.rank as usize];
                    rank.missing_since = None;
                    if registering && !rank.started {
                        // It runs there, so it started; the Started report may still be buffered.
                        rank.started = true;
                        if l.started_ms == 0 {
                            l.started_ms = now_ms;
                        }
                        let exp = t.experiment;
                        self.touch_trial(r.trial, exp);
                    } else if !rank.started {
                        // The worker holds it (e.g. still restoring a large checkpoint): the
                        // start timeout counts from its latest word, not from the assignment.
                        l.assigned_ms = now_ms;
                    }
                }
                _ => kill.push(*r),
            }
        }
        let now = self.clock.now();
        for tid in self.live_on.get(worker).into_iter().flatten() {
            let Some(l) = self.trials.get_mut(tid).and_then(|t| t.live.as_mut()) else {
                continue;
            };
            for (i, rank) in l.ranks.iter_mut().enumerate() {
                if &rank.worker == worker
                    && rank.started
                    && !rank.finished
                    && !listed.contains(&(*tid, i as u32))
                    && rank.missing_since.is_none()
                {
                    rank.missing_since = Some(now);
                }
            }
        }
        kill
    }

    /// A worker renews its lease and says what it runs. Returns the attempts it should kill.
    pub fn heartbeat(
        &mut self,
        worker: &WorkerId,
        epoch: u64,
        running: &[RunningAttempt],
    ) -> Result<Vec<RunningAttempt>> {
        self.check_epoch(worker, epoch)?;
        if !self.registry.touch(worker, self.clock.now(), self.clock.now_ms()) {
            return Err(CoordError::NotFound(format!(
                "worker {worker} is not registered; register again"
            )));
        }
        Ok(self.claim(worker, running, false))
    }

    /// The worker is shutting down (it said so in a heartbeat): nothing more is placed on it
    /// until it registers again, so what it hands back runs elsewhere. Not kept in the store: a
    /// worker that comes back registers, and one that does not loses its lease.
    pub fn leaving(&mut self, worker: &WorkerId) {
        let Some(e) = self.registry.workers.get_mut(worker) else {
            return;
        };
        if !e.leaving {
            e.leaving = true;
            tracing::info!(worker = %worker, "worker shutting down: no more placements on it");
            self.refresh_room(worker);
        }
    }

    /// Attaches a worker's command stream and re-sends the assignments it has not started.
    pub fn open_stream(&mut self, worker: &WorkerId, epoch: u64, tx: crate::cluster::CommandSender) -> Result<()> {
        self.check_epoch(worker, epoch)?;
        let entry = self
            .registry
            .workers
            .get_mut(worker)
            .filter(|e| e.registered)
            .ok_or_else(|| CoordError::NotFound(format!("worker {worker} is not registered; register first")))?;
        entry.stream = Some(tx);
        let mut unstarted: Vec<(TrialId, u32)> = Vec::new();
        for tid in self.live_on.get(worker).into_iter().flatten() {
            if let Some(l) = self.trials.get(tid).and_then(|t| t.live.as_ref()) {
                for (i, rank) in l.ranks.iter().enumerate() {
                    if &rank.worker == worker && !rank.started {
                        unstarted.push((*tid, i as u32));
                    }
                }
            }
        }
        for (t, rank) in unstarted {
            let cmd = self.assignment(t, rank);
            self.outbox.push((worker.clone(), cmd));
        }
        self.placement_due = true;
        self.pump();
        Ok(())
    }

    /// Every known worker with what runs there, in id order: one pass over the workers and
    /// their live attempts, never over every trial.
    pub fn workers(&self) -> Vec<WorkerSummary> {
        let mut out: Vec<WorkerSummary> = self.registry.workers.keys().filter_map(|id| self.worker(id)).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One known worker with what runs there.
    pub fn worker(&self, id: &WorkerId) -> Option<WorkerSummary> {
        let w = self.registry.workers.get(id)?;
        Some({
            {
                let mut used = Resources::default();
                let mut running = Vec::new();
                for tid in self.live_on.get(&w.id).into_iter().flatten() {
                    let Some(t) = self.trials.get(tid) else { continue };
                    let Some(l) = &t.live else { continue };
                    let r = &self.experiments[&t.experiment].spec.spec.resources;
                    for (i, rank) in l.ranks.iter().enumerate() {
                        if rank.worker == w.id {
                            used.cpus += r.cpus;
                            used.gpus += r.gpus;
                            running.push(RunningAttempt {
                                trial: *tid,
                                attempt: t.attempt,
                                rank: i as u32,
                            });
                        }
                    }
                }
                WorkerSummary {
                    id: w.id.clone(),
                    capacity: w.capacity,
                    used,
                    labels: w.labels.clone(),
                    address: w.address.clone(),
                    last_seen_ms: w.last_seen_ms,
                    registered: w.registered,
                    // A worker shutting down drains itself.
                    drained: self.drained.contains(&w.id) || w.leaving,
                    running,
                }
            }
        })
    }

    /// CPU slots taken by live attempts, over all workers.
    pub fn busy_cpu_slots(&self) -> u64 {
        self.live
            .iter()
            .filter_map(|t| {
                let t = &self.trials[t];
                let ranks = t.live.as_ref()?.ranks.len() as u64;
                Some(ranks * self.experiments[&t.experiment].spec.spec.resources.cpus as u64)
            })
            .sum()
    }
}

/// The refusal of a call from a fenced registration, naming the registration that fenced it.
fn fenced(worker: &WorkerId, epoch: u64, current: Option<&WorkerEpoch>) -> CoordError {
    let now = match current {
        Some(c) => format!(
            "epoch {} registered at {}{}",
            c.epoch,
            format_ms(c.registered_ms),
            if c.instance.is_empty() {
                String::new()
            } else {
                format!(" by instance {}", c.instance)
            }
        ),
        None => "no epoch registered".to_string(),
    };
    let message = if epoch == 0 {
        format!(
            "worker {worker} epoch 0 is fenced: {now}; every call must carry the epoch Register answered \
             (a worker that sends none predates registration epochs: upgrade it)"
        )
    } else {
        format!("worker {worker} epoch {epoch} is fenced: {now}; this process must stop")
    };
    CoordError::Fenced {
        message,
        worker: worker.0.clone(),
        epoch,
        current: current.map_or(0, |c| c.epoch),
    }
}

/// A wall-clock time in milliseconds since the epoch, as RFC 3339 (UTC).
fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
