//! The worker registry: who is in the cluster, what each offers, and whose lease has lapsed.
//! Workers are not persisted: after a coordinator restart they re-register within one lease,
//! and until then the workers named by live attempts are held as unconfirmed entries.

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
    pub stream: Option<CommandSender>,
}

impl WorkerEntry {
    /// Registered, with a command stream open: new work can be sent to it now.
    pub fn connected(&self) -> bool {
        self.registered && self.stream.as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    pub workers: HashMap<WorkerId, WorkerEntry>,
}

impl Registry {
    pub fn register(
        &mut self,
        id: WorkerId,
        capacity: Resources,
        labels: BTreeMap<String, String>,
        address: String,
        now: Instant,
        now_ms: i64,
    ) {
        let e = self.workers.entry(id.clone()).or_insert_with(|| WorkerEntry {
            id,
            capacity,
            labels: BTreeMap::new(),
            address: String::new(),
            last_seen: now,
            last_seen_ms: now_ms,
            registered: true,
            stream: None,
        });
        e.capacity = capacity;
        e.labels = labels;
        e.address = address;
        e.last_seen = now;
        e.last_seen_ms = now_ms;
        e.registered = true;
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
            stream: None,
        });
    }

    /// Renews a lease; false when the worker is unknown (it must register again).
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
