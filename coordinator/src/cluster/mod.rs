//! The worker registry: who is in the cluster, what each offers, and whose lease has lapsed.
//! Workers are not persisted: after a coordinator restart they re-register within one lease,
//! and until then the workers named by live attempts are held as unconfirmed entries. What is
//! persisted is each worker id's newest registration epoch: a registration fences every older
//! one of its id, across coordinator restarts too.

use crate::protocol::Command;
use crate::scheduler::Resources;
use chorus_core::WorkerId;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The channel that feeds one worker's `Assignments` stream. Unbounded: commands are made
/// under the state lock, which must never wait on a slow worker; their number is bounded by
/// the worker's slots plus kills.
pub type CommandSender = mpsc::UnboundedSender<Command>;

#[derive(Debug)]
pub struct WorkerEntry {
    pub id: WorkerId,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    pub address: String,
    pub last_seen: Instant,
    pub last_seen_ms: i64,
    /// False for an entry recreated from live attempts after a restart, until the worker
    /// registers again.
    pub registered: bool,
    /// The epoch of this registration (0 for an unconfirmed entry): a call carrying another
    /// one comes from a fenced registration.
    pub epoch: u64,
    /// Which process lineage registered; empty when the worker did not say.
    pub instance: String,
    pub stream: Option<CommandSender>,
    /// The worker said it is shutting down: nothing more is placed on it until it registers
    /// again, so the attempts it hands back go to other workers.
    pub leaving: bool,
}

impl WorkerEntry {
    /// Registered, with a command stream open: new work can be sent to it now.
    pub fn connected(&self) -> bool {
        self.registered && self.stream.as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

/// The newest registration of a worker id, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEpoch {
    pub worker: WorkerId,
    pub epoch: u64,
    pub instance: String,
    pub registered_ms: i64,
}

#[derive(Debug, Default)]
pub struct Registry {
    pub workers: HashMap<WorkerId, WorkerEntry>,
    /// The newest epoch of every worker id ever registered, lapsed ones included: a call of a
    /// lapsed registration is then told apart from one that a newer registration fenced.
    pub epochs: HashMap<WorkerId, WorkerEpoch>,
    /// The highest epoch handed out; a new one is above it, so above every earlier epoch of
    /// every worker id.
    pub last_epoch: u64,
}

impl Registry {
    /// Starts from the epochs the store holds.
    pub fn with_epochs(rows: Vec<WorkerEpoch>) -> Registry {
        let last_epoch = rows.iter().map(|r| r.epoch).max().unwrap_or(0);
        Registry {
            workers: HashMap::new(),
            epochs: rows.into_iter().map(|r| (r.worker.clone(), r)).collect(),
            last_epoch,
        }
    }

    /// The registration holding the worker id's lease at `now`, if any.
    pub fn holder(&self, id: &WorkerId, now: Instant, ttl: Duration) -> Option<&WorkerEntry> {
        self.workers
            .get(id)
            .filter(|e| e.registered && now.saturating_duration_since(e.last_seen) <= ttl)
    }

    /// Registers a worker under a new epoch, which fences every earlier one: the old
    /// registration's command stream is dropped (so it ends). Returns the new epoch's record,
    /// for the store.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        id: WorkerId,
        instance: String,
        capacity: Resources,
        labels: BTreeMap<String, String>,
        address: String,
        now: Instant,
        now_ms: i64,
    ) -> WorkerEpoch {
        self.last_epoch += 1;
        let epoch = self.last_epoch;
        let record = WorkerEpoch {
            worker: id.clone(),
            epoch,
            instance: instance.clone(),
            registered_ms: now_ms,
        };
        self.epochs.insert(id.clone(), record.clone());
        // Every field is this registration's: an earlier entry (and its stream) is replaced.
        self.workers.insert(
            id.clone(),
            WorkerEntry {
                id,
                capacity,
                labels,
                address,
                last_seen: now,
                last_seen_ms: now_ms,
                registered: true,
                epoch,
                instance,
                stream: None,
                leaving: false,
            },
        );
        record
    }

    /// The worker id's newest registration, when it has registered since the store began.
    pub fn epoch(&self, id: &WorkerId) -> Option<&WorkerEpoch> {
        self.epochs.get(id)
    }

    /// Holds a place for a worker named by a live attempt found at start-up.
    pub fn expect(&mut self, id: WorkerId, now: Instant, now_ms: i64) {
        self.workers.entry(id.clone()).or_insert(WorkerEntry {
            id,
            capacity: Resources::default(),
            labels: BTreeMap::new(),
            address: String::new(),
            last_seen: now,
            last_seen_ms: now_ms,
            registered: false,
            epoch: 0,
            instance: String::new(),
            stream: None,
            leaving: false,
        });
    }

    /// Renews a lease; false when the worker is unknown (it must register again). The caller
    /// has checked the epoch.
    pub fn touch(&mut self, id: &WorkerId, now: Instant, now_ms: i64) -> bool {
        match self.workers.get_mut(id) {
            Some(e) if e.registered => {
                e.last_seen = now;
                e.last_seen_ms = now_ms;
                true
            }
            _ => false,
        }
    }

    /// Removes and returns the workers whose lease lapsed.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> Vec<WorkerId> {
        let lapsed: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|e| now.duration_since(e.last_seen) > ttl)
            .map(|e| e.id.clone())
            .collect();
        for id in &lapsed {
            self.workers.remove(id);
        }
        lapsed
    }

    /// The stream commands for a worker go down, while it is connected (a command for one that
    /// is not is re-derived from the state when it connects again).
    pub fn sender(&self, id: &WorkerId) -> Option<CommandSender> {
        self.workers
            .get(id)?
            .stream
            .as_ref()
            .filter(|tx| !tx.is_closed())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_lapse_and_unknown_workers_must_register() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let a = WorkerId("a".into());
        r.register(
            a.clone(),
            "i1".into(),
            Resources { cpus: 2, gpus: 0 },
            BTreeMap::new(),
            String::new(),
            t0,
            0,
        );
        r.expect(WorkerId("b".into()), t0, 0);
        assert!(
            !r.touch(&WorkerId("b".into()), t0, 0),
            "an unconfirmed worker must register"
        );
        assert!(r.touch(&a, t0 + Duration::from_secs(2), 0));
        let gone = r.expire(t0 + Duration::from_secs(3), Duration::from_secs(2));
        assert_eq!(gone, vec![WorkerId("b".into())]);
        assert!(r.workers.contains_key(&a));
        assert!(!r.touch(&WorkerId("zzz".into()), t0, 0));
    }
}
