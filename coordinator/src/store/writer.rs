//! The store's one writer: a thread that owns the SQLite connection and commits what the
//! state hands it in groups.
//!
//! A change is made in memory under the state lock, then queued here as a [`Pending`] batch
//! (its rows, the worker commands it makes, the notifications it raises) and the lock is let
//! go. The writer takes every batch waiting, writes them in one transaction with one fsync,
//! and only then sends their commands and notifications and answers their callers, in the
//! order they were queued: "acknowledged ⇒ durable" holds, while one fsync serves many
//! changes and no async thread ever waits on the disk.
//!
//! When a commit fails (a full disk), every batch of the group fails, and so does every batch
//! queued behind it, which was made on top of changes that are now lost; the writer then puts
//! the state back to what the store holds (under the state lock, so nothing new is queued on
//! the lost changes meanwhile).

use super::{Batch, SearcherWrite, Store};
use crate::cluster::CommandSender;
use crate::error::{CoordError, Result};
use crate::protocol::Change;
use crate::protocol::Command;
use crate::telemetry::Telemetry;
use crate::trial::TrialRecord;
use chorus_core::{ExperimentId, TrialId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot};

/// Most batches written in one transaction: a bound on how long one commit holds its callers.
const MAX_GROUP: usize = 4096;

/// How often a store that keeps failing is logged again.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// One change waiting for its commit.
pub struct Pending {
    pub batch: Batch,
    /// Sent once the batch is durable.
    pub commands: Vec<(CommandSender, Command)>,
    pub changes: Vec<Change>,
    pub done: Option<oneshot::Sender<Result<()>>>,
}

/// What the writer thread is asked to do, in order.
enum Job {
    // Boxed: a pending batch is far larger than the other jobs.
    Commit(Box<Pending>),
    /// Answered once every job before it is done (and a failed commit's reload with it).
    Sync(oneshot::Sender<()>),
    /// Runs on the store: for tests that make it fail.
    #[cfg(test)]
    Store(Box<dyn FnOnce(&mut Store) + Send>),
}

/// Puts the records in memory back to what the store holds, after a failed commit. It takes
/// the state's lock, runs the given step under it (failing what was queued on the lost
/// changes), then reloads; an error means memory could not be put back.
pub type Reload = Box<dyn Fn(&Store, &mut dyn FnMut()) -> Result<()> + Send>;

/// The handle the state queues batches on.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Job>,
    /// Batches queued and not yet answered: when none is, a change with nothing to write needs
    /// no trip through the writer.
    in_flight: Arc<AtomicU64>,
}

/// The answer to one change: resolves once its batch (and every batch before it) is durable.
pub struct Commit(Option<oneshot::Receiver<Result<()>>>);

impl Commit {
    /// A change that waits for nothing.
    pub fn done() -> Self {
        Commit(None)
    }

    pub async fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or_else(|_| {
                Err(CoordError::CommitFailed {
                    full: false,
                    message: "the coordinator is shutting down; the change was not made".into(),
                })
            }),
        }
    }

    /// Waits on a thread that is not an async runtime's.
    #[cfg(test)]
    pub fn wait_blocking(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.blocking_recv().unwrap_or_else(|_| {
                Err(CoordError::CommitFailed {
                    full: false,
                    message: "the store's writer stopped".into(),
                })
            }),
        }
    }
}

impl Writer {
    /// Starts the writer thread on `store`. `reload` puts the state back to what the store
    /// holds after a failed commit.
    pub fn start(store: Store, reload: Reload, events: broadcast::Sender<Change>, telemetry: Arc<Telemetry>) -> Writer {
        let (tx, rx) = std::sync::mpsc::channel();
        let in_flight = Arc::new(AtomicU64::new(0));
        let thread = WriterThread {
            store,
            rx,
            reload,
            events,
            telemetry,
            in_flight: in_flight.clone(),
            failing: None,
        };
        std::thread::Builder::new()
            .name("chorus-store".into())
            .spawn(move || thread.run())
            .expect("the store's writer thread starts");
        Writer { tx, in_flight }
    }

    /// Queues a change. Its answer comes after the commit that holds it and everything queued
    /// before it, so an answer never reports what is not yet durable. A change with nothing to
    /// write, send or announce is answered at once when nothing is queued, or when its answer
    /// `depends` on nothing else (a lease renewal that kills nothing).
    pub fn submit(
        &self,
        batch: Batch,
        commands: Vec<(CommandSender, Command)>,
        changes: Vec<Change>,
        depends: bool,
    ) -> Commit {
        if batch.is_empty()
            && commands.is_empty()
            && changes.is_empty()
            && (!depends || self.in_flight.load(Ordering::Acquire) == 0)
        {
            return Commit::done();
        }
        let (done, rx) = oneshot::channel();
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let pending = Pending {
            batch,
            commands,
            changes,
            done: Some(done),
        };
        if self.tx.send(Job::Commit(Box::new(pending))).is_err() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(CoordError::CommitFailed {
                full: false,
                message: "the store's writer stopped; the change was not made".into(),
            }));
            return Commit(Some(rx));
        }
        Commit(Some(rx))
    }

    /// Waits until everything queued so far is done: at shutdown, so that no change queued
    /// before it is left unwritten.
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Sync(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Waits until everything queued so far is done, on a thread that may block.
    #[cfg(test)]
    pub fn sync_blocking(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Sync(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
    }

    /// Runs `f` on the store, in order with the commits, and waits for it.
    #[cfg(test)]
    pub fn with_store(&self, f: impl FnOnce(&mut Store) + Send + 'static) {
        let _ = self.tx.send(Job::Store(Box::new(f)));
        self.sync_blocking();
    }
}

struct WriterThread {
    store: Store,
    rx: Receiver<Job>,
    reload: Reload,
    events: broadcast::Sender<Change>,
    telemetry: Arc<Telemetry>,
    in_flight: Arc<AtomicU64>,
    /// Since when commits have been failing, and when that was last logged.
    failing: Option<(Instant, Instant)>,
}

impl WriterThread {
    fn run(mut self) {
        let mut next = None;
        loop {
            let job = match next.take() {
                Some(j) => j,
                None => match self.rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            let first = match job {
                Job::Commit(p) => *p,
                Job::Sync(done) => {
                    let _ = done.send(());
                    continue;
                }
                #[cfg(test)]
                Job::Store(f) => {
                    f(&mut self.store);
                    continue;
                }
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match self.rx.try_recv() {
                    Ok(Job::Commit(p)) => group.push(*p),
                    // Anything else waits for this group's commit.
                    Ok(other) => {
                        next = Some(other);
                        break;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.commit(group);
        }
    }

    fn commit(&mut self, mut group: Vec<Pending>) {
        let merged = merge(group.iter_mut().map(|p| std::mem::take(&mut p.batch)));
        let started = Instant::now();
        let result = self.store.commit(&merged);
        if !merged.is_empty() {
            self.telemetry
                .store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            self.telemetry.store_group_batches.observe(group.len() as f64);
        }
        match result {
            Ok(()) => {
                if let Some((since, _)) = self.failing.take() {
                    tracing::info!(failing_for = ?since.elapsed(), "store commits succeed again");
                }
                for p in group {
                    for (tx, cmd) in p.commands {
                        // A worker gone since is sent its commands again when it reconnects.
                        let _ = tx.send(cmd);
                    }
                    for c in p.changes {
                        let _ = self.events.send(c);
                    }
                    self.answer(p.done, Ok(()));
                }
            }
            Err(e) => self.fail(group, e),
        }
    }

    fn answer(&self, done: Option<oneshot::Sender<Result<()>>>, result: Result<()>) {
        if let Some(done) = done {
            let _ = done.send(result);
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn fail(&mut self, group: Vec<Pending>, e: rusqlite::Error) {
        let err = CoordError::store_write(self.store.path(), e);
        self.telemetry.store_commit_failures.inc();
        let now = Instant::now();
        match &mut self.failing {
            None => {
                tracing::error!(error = %err, "a store commit failed; the changes were dropped");
                self.failing = Some((now, now));
            }
            Some((_, logged)) if now.duration_since(*logged) >= FAILURE_LOG_EVERY => {
                tracing::error!(error = %err, "store commits are still failing");
                *logged = now;
            }
            Some(_) => {}
        }
        let told = || CoordError::CommitFailed {
            full: matches!(err, CoordError::StoreWrite { full: true, .. }),
            message: err.to_string(),
        };
        for p in group {
            self.answer(p.done, Err(told()));
        }
        // Under the state's lock nothing new is queued: what is queued now was made on the lost
        // changes, and fails with them.
        let mut later = Vec::new();
        let (rx, in_flight) = (&self.rx, &self.in_flight);
        let mut fail_queued = || {
            while let Ok(job) = rx.try_recv() {
                match job {
                    Job::Commit(p) => {
                        if let Some(done) = p.done {
                            let _ = done.send(Err(told()));
                        }
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                    }
                    other => later.push(other),
                }
            }
        };
        if let Err(read) = (self.reload)(&self.store, &mut fail_queued) {
            // Memory now holds changes the store does not: acting on them could lose or
            // repeat work. A restart rebuilds from what was committed.
            tracing::error!(error = %read, "cannot read the store back after a failed commit; exiting");
            std::process::exit(70);
        }
        for job in later {
            match job {
                Job::Commit(_) => unreachable!("failed above"),
                Job::Sync(done) => {
                    let _ = done.send(());
                }
                #[cfg(test)]
                Job::Store(f) => f(&mut self.store),
            }
        }
    }
}

/// Batches queued one after another, as one: each record keeps only its newest row, ordered
/// writes (searcher journals, attempts, deletions) keep their order.
fn merge(batches: impl Iterator<Item = Batch>) -> Batch {
    let mut experiments: BTreeMap<ExperimentId, super::ExperimentRow> = BTreeMap::new();
    let mut trials: BTreeMap<TrialId, TrialRecord> = BTreeMap::new();
    let mut out = Batch::default();
    for b in batches {
        for e in b.experiments {
            match experiments.get_mut(&e.id) {
                Some(x) => {
                    // A spec is written with the row that creates its experiment.
                    let spec = x.spec_yaml.take();
                    *x = e;
                    if x.spec_yaml.is_none() {
                        x.spec_yaml = spec;
                    }
                }
                None => {
                    experiments.insert(e.id, e);
                }
            }
        }
        for t in b.trials {
            trials.insert(t.id, t);
        }
        out.searchers.extend(b.searchers);
        out.attempts.extend(b.attempts);
        out.epochs.extend(b.epochs);
        out.removed_experiments.extend(b.removed_experiments);
        if b.drained.is_some() {
            out.drained = b.drained;
        }
    }
    out.experiments = experiments.into_values().collect();
    out.trials = trials.into_values().collect();
    out.searchers = fold_journals(std::mem::take(&mut out.searchers));
    out
}

/// A group's searcher writes with each experiment's journal entries folded into one row (a
/// JSON array of calls, keyed by the last one's number): under load, one row per experiment
/// per commit rather than one per report. A snapshot supersedes the entries before it.
fn fold_journals(writes: Vec<SearcherWrite>) -> Vec<SearcherWrite> {
    let mut out = Vec::new();
    let mut open: BTreeMap<ExperimentId, (u64, Vec<String>)> = BTreeMap::new();
    for w in writes {
        match w {
            SearcherWrite::Journal { experiment, seq, call } => {
                let entry = open.entry(experiment).or_default();
                entry.0 = seq;
                entry.1.push(call);
            }
            snapshot @ SearcherWrite::Snapshot { experiment, .. } => {
                // Its state includes every call journalled before it.
                open.remove(&experiment);
                out.push(snapshot);
            }
        }
    }
    for (experiment, (seq, calls)) in open {
        let call = if calls.len() == 1 {
            calls.into_iter().next().expect("one call")
        } else {
            format!("[{}]", calls.join(","))
        };
        out.push(SearcherWrite::Journal { experiment, seq, call });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(e: u64, seq: u64) -> SearcherWrite {
        SearcherWrite::Journal {
            experiment: ExperimentId(e),
            seq,
            call: format!("{{\"n\":{seq}}}"),
        }
    }

    /// Each experiment's journal entries of a group become one row holding them in order; a
    /// snapshot drops the entries it includes and keeps its place.
    #[test]
    fn journal_entries_fold_per_experiment_and_snapshots_supersede_them() {
        let snapshot = SearcherWrite::Snapshot {
            experiment: ExperimentId(2),
            seq: 5,
            state: "{}".into(),
        };
        let folded = fold_journals(vec![
            journal(1, 1),
            journal(2, 4),
            journal(1, 2),
            journal(2, 5),
            snapshot,
            journal(2, 6),
            journal(1, 3),
        ]);
        let rows: Vec<(u64, u64, String)> = folded
            .iter()
            .map(|w| match w {
                SearcherWrite::Snapshot { experiment, seq, .. } => (experiment.0, *seq, "snapshot".to_string()),
                SearcherWrite::Journal { experiment, seq, call } => (experiment.0, *seq, call.clone()),
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (2, 5, "snapshot".to_string()),
                (1, 3, r#"[{"n":1},{"n":2},{"n":3}]"#.to_string()),
                (2, 6, r#"{"n":6}"#.to_string()),
            ]
        );
    }
}
