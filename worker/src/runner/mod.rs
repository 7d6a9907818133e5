//! One attempt of one command trial, from its assignment to its `Exited` event: restore the newest
//! checkpoint, run the program in its own process group and contained (no process of it outlives
//! the attempt, see [`containment`]), turn its output into metric events and log chunks, commit
//! the checkpoints it writes, and stop it on a timeout or a kill order.
//!
//! The runner knows nothing of gRPC or of the coordinator: it reports through [`Events`], a
//! channel the agent drains, so every path here can be tested with `memory://` storage.

mod builtin;
pub mod containment;
pub mod environment;
mod gpu_reports;
mod output;
mod process;
mod records;
pub mod rendezvous;
#[cfg(test)]
mod tests;

use crate::error::WorkerError;
use chorus_core::metric::{self, Line, MetricReport};
use chorus_core::storage::{self, Storage, StorageOptions, StorageUri};
use chorus_core::{ExperimentId, TrialId, checkpoint, history};
use chorus_proto::pb::{self, trial_event::Kind};
pub use gpu_reports::GpuSampling;
use records::{Job, Recorder, RecorderSetup};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

/// At most this many malformed metric lines are reported per attempt; all are counted.
const MAX_MALFORMED_REPORTED: u64 = 100;

/// Why a running attempt must stop early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The coordinator ordered it (or found the attempt stale); the string is its reason.
    Kill(String),
    /// This worker is shutting down.
    Shutdown,
}

/// The ordered event stream of one attempt. Sequence numbers are assigned here, under one lock
/// with the send, so the numbers and the channel order always agree even though the output loop
/// and the checkpoint uploader both emit.
#[derive(Clone)]
pub struct Events {
    seq: Arc<Mutex<Sequencer>>,
    flow: Arc<ReportFlow>,
}

struct Sequencer {
    last_seq: u64,
    tx: mpsc::UnboundedSender<pb::TrialEvent>,
}

impl Events {
    pub fn new(tx: mpsc::UnboundedSender<pb::TrialEvent>) -> Self {
        Events {
            seq: Arc::new(Mutex::new(Sequencer { last_seq: 0, tx })),
            flow: Arc::new(ReportFlow::new()),
        }
    }

    /// What the agent tells the attempt about its reports.
    pub fn flow(&self) -> &Arc<ReportFlow> {
        &self.flow
    }

    fn emit(&self, kind: Kind) {
        let mut s = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        s.last_seq += 1;
        let event = pb::TrialEvent {
            seq: s.last_seq,
            unix_ms: unix_ms(),
            kind: Some(kind),
        };
        // A closed channel means nobody wants this attempt's reports any more (it went stale).
        if s.tx.send(event).is_ok() {
            self.flow.undelivered.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Emits once fewer than [`MAX_UNDELIVERED_EVENTS`] events wait for the coordinator, so a
    /// long coordinator outage holds the attempt's output back instead of growing a queue.
    async fn emit_waiting(&self, kind: Kind) {
        self.flow.room().await;
        self.emit(kind);
    }
}

/// Events of one attempt that may wait for the coordinator's acknowledgement at once. Beyond
/// it the recorder stops storing metric lines, its backlog fills, and the trial's pipes are
/// no longer read until the coordinator is back.
pub const MAX_UNDELIVERED_EVENTS: usize = 4096;

/// Shared by an attempt's runner and the agent that delivers its reports: how many reports are
/// in flight, which checkpoint the coordinator acknowledged last, and whether the attempt is
/// stale (the coordinator gave up on it), after which it writes nothing more.
pub struct ReportFlow {
    undelivered: AtomicUsize,
    stale: AtomicBool,
    closed: AtomicBool,
    acknowledged: Mutex<Option<checkpoint::CheckpointRef>>,
    changed: Notify,
}

impl ReportFlow {
    fn new() -> Self {
        ReportFlow {
            undelivered: AtomicUsize::new(0),
            stale: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            acknowledged: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// The coordinator acknowledged these events of attempt `attempt`.
    pub fn delivered(&self, attempt: u32, events: &[pb::TrialEvent]) {
        if let Some(step) = events.iter().rev().find_map(|e| match &e.kind {
            Some(Kind::Checkpoint(c)) => Some(c.step),
            _ => None,
        }) {
            *self.acknowledged.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(checkpoint::CheckpointRef::new(step, attempt));
        }
        let n = events.len();
        let _ = self
            .undelivered
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| Some(u.saturating_sub(n)));
        self.changed.notify_waiters();
    }

    /// The coordinator has moved on: nothing of this attempt is written from now on.
    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Nobody delivers this attempt's reports any more.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    pub fn acknowledged_checkpoint(&self) -> Option<checkpoint::CheckpointRef> {
        *self.acknowledged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (at most `limit`) until the coordinator has acknowledged checkpoint `at`.
    async fn acknowledges(&self, at: checkpoint::CheckpointRef, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if self.acknowledged_checkpoint() == Some(at) {
                    return true;
                }
                if self.is_stale() || self.closed.load(Ordering::SeqCst) {
                    return false;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }

    async fn room(&self) {
        loop {
            let notified = self.changed.notified();
            if self.undelivered.load(Ordering::SeqCst) < MAX_UNDELIVERED_EVENTS
                || self.stale.load(Ordering::SeqCst)
                || self.closed.load(Ordering::SeqCst)
            {
                return;
            }
            notified.await;
        }
    }
}

/// Bytes of an attempt's output read from its pipes but not yet stored. Past
/// [`MAX_BACKLOG_BYTES`] the runner stops reading the pipes, so a trial that prints faster than
/// storage takes it (or prints during a storage outage) blocks on its own writes instead of
/// growing the worker.
pub struct Backlog {
    bytes: AtomicUsize,
    freed: Notify,
}

/// The bound of one attempt's [`Backlog`].
pub const MAX_BACKLOG_BYTES: usize = 16 * 1024 * 1024;

impl Backlog {
    fn new() -> Self {
        Backlog {
            bytes: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::SeqCst);
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| Some(b.saturating_sub(n)));
        self.freed.notify_waiters();
    }

    fn has_room(&self) -> bool {
        self.bytes.load(Ordering::SeqCst) < MAX_BACKLOG_BYTES
    }

    /// Waits until there is room again.
    async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            if self.has_room() {
                return;
            }
            freed.await;
        }
    }
}

pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Opened stores by URI: opening builds a client (and for S3 reads credentials), which every
/// attempt of an experiment would otherwise repeat.
pub struct StorageCache {
    options: StorageOptions,
    opened: Mutex<HashMap<String, Storage>>,
}

impl StorageCache {
    pub fn new(options: StorageOptions) -> Self {
        StorageCache {
            options,
            opened: Mutex::new(HashMap::new()),
        }
    }

    pub fn open(&self, uri: &str) -> Result<Storage, WorkerError> {
        if let Some(s) = self.opened.lock().unwrap_or_else(|p| p.into_inner()).get(uri) {
            return Ok(s.clone());
        }
        let storage = storage::open(&StorageUri::parse(uri)?, &self.options)?;
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uri.to_string(), storage.clone());
        Ok(storage)
    }
}

/// What every attempt on this worker shares.
pub struct RunnerContext {
    pub worker_id: String,
    /// Holds `trials/{trial}/attempt-{n}/checkpoint` while an attempt runs.
    pub data_dir: PathBuf,
    pub stores: StorageCache,
    pub kill_grace: Duration,
    pub output_grace: Duration,
    /// See [`crate::config::Timings::store_retry`].
    pub store_retry: Duration,
    /// Where peers reach this worker (collectives; MASTER_ADDR of a command trial's rank 0).
    pub advertise_address: std::net::IpAddr,
    pub collective_timeout: Duration,
    pub rendezvous_timeout: Duration,
    /// Rendezvous requests of multi-rank attempts go here; the agent serves them.
    pub rendezvous: Option<rendezvous::RendezvousSender>,
    /// Keeps every process of a command trial within its attempt.
    pub containment: Arc<containment::Containment>,
    /// What command trials inherit of the worker's environment.
    pub trial_env: environment::TrialEnv,
    /// The worker's GPUs in this process's CUDA ordinal order: the position of an allotted id
    /// here is the device a builtin trainer in this process uses.
    pub gpus: Vec<String>,
    /// Reads the GPUs of attempts for their `gpu_util` and `gpu_mem_mb` metrics; `None` without
    /// NVML.
    pub gpu_sampling: Option<GpuSampling>,
}

impl RunnerContext {
    pub fn attempt_dir(&self, trial: u64, attempt: u32, rank: u32) -> PathBuf {
        let name = match rank {
            0 => format!("attempt-{attempt}"),
            r => format!("attempt-{attempt}-rank-{r}"),
        };
        self.data_dir.join("trials").join(trial.to_string()).join(name)
    }
}

/// Runs one attempt to its end and returns what its `Exited` event said. `Exited` is always the
/// last event, emitted after the final checkpoint and log chunk are stored and the local attempt
/// directory is gone; a failure before the program starts yields `Exited` without `Started`.
pub async fn run_attempt(
    ctx: &RunnerContext,
    a: &pb::Assignment,
    gpu_ids: &[String],
    events: Events,
    mut stop: watch::Receiver<Option<Stop>>,
) -> pb::Exited {
    let attempt_dir = ctx.attempt_dir(a.trial_id, a.attempt, a.rank);
    let exited = match prepare(ctx, a, gpu_ids, &attempt_dir).await {
        Ok(prepared) if !a.builtin_json.is_empty() => builtin::run(ctx, a, gpu_ids, &events, &mut stop, prepared).await,
        Ok(prepared) => run_prepared(ctx, a, gpu_ids, &events, &mut stop, prepared).await,
        Err(message) => exited(pb::ExitKind::Failed, None, message),
    };
    if let Err(e) = tokio::fs::remove_dir_all(&attempt_dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %attempt_dir.display(), error = %e, "cannot remove the attempt directory");
    }
    // The trial directory is shared by attempts; it goes once the last one is gone.
    if let Some(trial_dir) = attempt_dir.parent() {
        let _ = tokio::fs::remove_dir(trial_dir).await;
    }
    events.emit(Kind::Exited(exited.clone()));
    exited
}

fn exited(kind: pb::ExitKind, code: Option<i32>, message: String) -> pb::Exited {
    pb::Exited {
        kind: kind.into(),
        code,
        message,
    }
}

/// Storage and local state an attempt needs before its program starts.
struct Prepared {
    storage: Storage,
    checkpoint_dir: PathBuf,
    /// The checkpoint restored into `checkpoint_dir`, if any.
    restored: Option<checkpoint::CheckpointRef>,
    /// Of the directory as restored, taken before the program can touch it: a checkpoint it
    /// writes before its first step report must count as a change.
    restored_fingerprint: Option<u64>,
    /// The experiment metric by step over the history this attempt carries over.
    scores: std::collections::BTreeMap<i64, f64>,
    /// The GPUs whose readings are reported as the trial's metrics, if any.
    gpus: Option<gpu_reports::AttemptGpus>,
}

impl Prepared {
    fn restored_step(&self) -> Option<i64> {
        self.restored.map(|r| r.step)
    }
}

async fn prepare(
    ctx: &RunnerContext,
    a: &pb::Assignment,
    gpu_ids: &[String],
    attempt_dir: &Path,
) -> Result<Prepared, String> {
    let storage = ctx
        .stores
        .open(&a.storage)
        .map_err(|e| format!("cannot open storage {}: {e}", a.storage))?;
    let (exp, trial) = (ExperimentId(a.experiment_id), TrialId(a.trial_id));
    // A leftover from an earlier run of this worker id must not leak into this attempt.
    match tokio::fs::remove_dir_all(attempt_dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot clear {}: {e}", attempt_dir.display())),
    }
    let checkpoint_dir = attempt_dir.join("checkpoint");
    tokio::fs::create_dir_all(&checkpoint_dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", checkpoint_dir.display()))?;
    let own = storage.checkpoints_prefix(exp, trial);
    let from = a.restore.map(|r| checkpoint::CheckpointRef::new(r.step, r.attempt));
    let restored = if a.restore_from_trial != 0 {
        exploit(&storage, a, TrialId(a.restore_from_trial), from, &own, &checkpoint_dir).await?
    } else {
        checkpoint::restore(&storage, &own, from, &checkpoint_dir)
            .await
            .map_err(|e| format!("cannot restore the acknowledged checkpoint from {}: {e}", a.storage))?
    };
    for (at, reason) in &restored.skipped {
        warn!(
            trial = a.trial_id,
            attempt = a.attempt,
            checkpoint = %at,
            reason,
            "skipped a checkpoint that cannot be restored"
        );
    }
    if let Some(at) = restored.restored {
        info!(trial = a.trial_id, attempt = a.attempt, checkpoint = %at, "restored checkpoint");
    }
    let mut scores = std::collections::BTreeMap::new();
    if a.rank == 0 {
        // Rank 0 keeps the metric history: first the lineage that says which lines of the
        // earlier attempts it carries (exactly those the coordinator acknowledged).
        let lineage = history::Lineage {
            attempt: a.attempt,
            inherits: a
                .acked_metrics
                .iter()
                .filter(|c| c.attempt < a.attempt && c.count > 0)
                .map(|c| history::Inherited {
                    attempt: c.attempt,
                    lines: c.count,
                })
                .collect(),
        };
        // A first attempt carries nothing over, and readers know it: one object fewer for the
        // common case.
        if a.attempt > 1 {
            history::write_lineage(&storage, exp, trial, &lineage)
                .await
                .map_err(|e| format!("cannot store the trial's metric lineage in {}: {e}", a.storage))?;
        }
        history::visit_lineage(&storage, exp, trial, &lineage, &mut |line| {
            if let Ok(m) = chorus_core::metric::MetricReport::from_json(line) {
                records::record_score(&mut scores, &a.metric, &m);
            }
        })
        .await
        .map_err(|e| format!("cannot read the trial's metrics from {}: {e}", a.storage))?;
    }
    let restored_fingerprint = checkpoint::fingerprint(&checkpoint_dir).ok().flatten();
    Ok(Prepared {
        storage,
        checkpoint_dir,
        restored: restored.restored,
        restored_fingerprint,
        scores,
        gpus: gpu_reports::AttemptGpus::of(ctx.gpu_sampling.as_ref(), a, gpu_ids),
    })
}

/// Population-based training: the trial continues from the donor's acknowledged checkpoint.
/// Its own earlier checkpoints belong to the lineage it abandons, so they are discarded, and
/// the donor's is committed in their place as this attempt's: a later restart of this trial
/// resumes from there, not from the abandoned lineage.
async fn exploit(
    storage: &Storage,
    a: &pb::Assignment,
    donor: TrialId,
    from: Option<checkpoint::CheckpointRef>,
    own: &object_store::path::Path,
    dir: &Path,
) -> Result<checkpoint::Restored, String> {
    let exp = ExperimentId(a.experiment_id);
    let mut restored = checkpoint::restore(storage, &storage.checkpoints_prefix(exp, donor), from, dir)
        .await
        .map_err(|e| format!("cannot restore trial {donor}'s checkpoint to exploit it: {e}"))?;
    checkpoint::discard_before(storage, own, a.attempt)
        .await
        .map_err(|e| format!("cannot discard the abandoned checkpoints: {e}"))?;
    if let Some(at) = restored.restored {
        let mine = checkpoint::CheckpointRef::new(at.step, a.attempt);
        checkpoint::commit(storage, own, mine, None, dir)
            .await
            .map_err(|e| format!("cannot commit trial {donor}'s checkpoint as this trial's: {e}"))?;
        info!(donor = %donor, checkpoint = %at, "continuing from the donor's checkpoint");
        restored.restored = Some(mine);
    }
    Ok(restored)
}

/// Reports the start, then starts the attempt's recorder; returns the line handler that feeds
/// it and the recorder's task, which finishes once the handler is dropped.
fn start_recording(
    a: &pb::Assignment,
    events: &Events,
    p: Prepared,
    store_retry: Duration,
) -> (Output, tokio::task::JoinHandle<records::Unstored>) {
    events.emit(Kind::Started(pb::Started {
        restored_step: p.restored_step(),
        restored_attempt: p.restored.map_or(0, |r| r.attempt),
    }));
    let gpus = p.gpus;
    let backlog = Arc::new(Backlog::new());
    let recorder = Recorder::new(
        a,
        RecorderSetup {
            storage: p.storage,
            checkpoint_dir: p.checkpoint_dir,
            // What this attempt continues: for an exploit, nothing before its own copy.
            start: p.restored,
            restored_fingerprint: p.restored_fingerprint,
            scores: p.scores,
        },
        events.clone(),
        backlog.clone(),
        store_retry,
    );
    let (jobs, jobs_rx) = mpsc::unbounded_channel();
    let mut output = Output::new(a, events.clone(), jobs, backlog);
    output.gpu_reports = gpus.map(|g| gpu_reports::Reporter::start(g, output.jobs.downgrade(), output.backlog.clone()));
    (output, tokio::spawn(recorder.run(jobs_rx)))
}

/// Why the runner itself ended the program, which decides the exit kind.
enum Ending {
    TimedOut(Duration),
    Killed(String),
    Shutdown,
}

async fn run_prepared(
    ctx: &RunnerContext,
    a: &pb::Assignment,
    gpu_ids: &[String],
    events: &Events,
    stop: &mut watch::Receiver<Option<Stop>>,
    p: Prepared,
) -> pb::Exited {
    // An order that arrived while restoring wins over starting the program at all.
    if let Some(s) = stop.borrow_and_update().clone() {
        return stopped_before_start(s);
    }
    let distributed = match torchrun_env(ctx, a, stop).await {
        Ok(env) => env,
        Err(rendezvous::Missed::Stopped(s)) => return stopped_before_start(s),
        Err(rendezvous::Missed::Failed(message)) => return exited(pb::ExitKind::Failed, None, message),
    };
    let spec = process::Spec {
        assignment: a,
        checkpoint_dir: &p.checkpoint_dir,
        restored_step: p.restored_step(),
        gpu_ids,
        worker_id: &ctx.worker_id,
        extra_env: &distributed,
    };
    let mut proc = match process::spawn(&spec, &ctx.containment, &ctx.trial_env).await {
        Ok(c) => c,
        Err(message) => return exited(pb::ExitKind::Failed, None, message),
    };
    let (mut lines, recorder) = start_recording(a, events, p, ctx.store_retry);

    // Lines are capped at 64 KiB, so this holds at most 4 MiB.
    let (line_tx, mut line_rx) = mpsc::channel(64);
    let readers = [
        proc.child
            .stdout
            .take()
            .map(|r| tokio::spawn(output::forward_lines(r, line_tx.clone()))),
        proc.child
            .stderr
            .take()
            .map(|r| tokio::spawn(output::forward_lines(r, line_tx.clone()))),
    ];
    drop(line_tx);

    let timeout = (a.timeout_ms > 0).then(|| Duration::from_millis(a.timeout_ms));
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut ending: Option<Ending> = None;
    let mut hard_kill_at: Option<Instant> = None;
    let mut stop_open = true;
    let status = loop {
        tokio::select! {
            // Not read while the backlog is full: the trial then blocks on its own writes.
            Some(line) = line_rx.recv(), if lines.has_room() => lines.handle(line),
            _ = lines.room(), if !lines.has_room() => {}
            status = proc.child.wait() => break status,
            _ = sleep_until(deadline), if ending.is_none() => {
                let t = timeout.unwrap_or_default();
                info!(trial = a.trial_id, attempt = a.attempt, timeout = ?t, "trial timed out; stopping its process group");
                ending = Some(Ending::TimedOut(t));
                proc.processes.terminate();
                hard_kill_at = Some(Instant::now() + ctx.kill_grace);
            }
            changed = stop.changed(), if ending.is_none() && stop_open => {
                if changed.is_err() {
                    stop_open = false;
                    continue;
                }
                let Some(s) = stop.borrow_and_update().clone() else { continue };
                info!(trial = a.trial_id, attempt = a.attempt, order = ?s, "stopping the trial's process group");
                ending = Some(match s {
                    Stop::Kill(reason) => Ending::Killed(reason),
                    Stop::Shutdown => Ending::Shutdown,
                });
                proc.processes.terminate();
                hard_kill_at = Some(Instant::now() + ctx.kill_grace);
            }
            _ = sleep_until(hard_kill_at) => {
                warn!(trial = a.trial_id, attempt = a.attempt, grace = ?ctx.kill_grace, "trial ignored SIGTERM; sending SIGKILL");
                proc.processes.kill_now();
                hard_kill_at = None;
            }
        }
    };
    // Whatever the main process left behind, in its group or out of it (setsid, daemons), would
    // outlive the attempt (and hold GPU memory, or the pipes we read): a finished attempt owns
    // no processes.
    let process::Running { child, mut processes } = proc;
    drop(child);
    processes.root_reaped();
    if let Err(e) = processes.kill_all().await {
        warn!(trial = a.trial_id, attempt = a.attempt, error = %e, "cannot kill every process of the trial; the next worker start will");
    }

    let grace = tokio::time::sleep(ctx.output_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            line = line_rx.recv() => match line {
                Some(line) => lines.handle(line),
                None => break,
            },
            _ = &mut grace => {
                warn!(trial = a.trial_id, attempt = a.attempt, "output pipes are still open after the trial's processes were killed; no longer reading them");
                break;
            }
        }
    }
    for r in readers.into_iter().flatten() {
        r.abort();
    }
    let malformed = lines.malformed;
    drop(lines);
    // The recorder drains its queue when the job sender is gone: final checkpoint, logs, metrics.
    let unstored = recorder.await.unwrap_or_else(|e| {
        warn!(trial = a.trial_id, attempt = a.attempt, error = %e, "the trial's recorder failed");
        records::Unstored {
            error: Some(format!("the recorder failed: {e}")),
            ..Default::default()
        }
    });

    let mut result = match (ending, status) {
        (_, Err(e)) => exited(
            pb::ExitKind::Failed,
            None,
            format!("cannot wait for the trial's process: {e}"),
        ),
        (Some(Ending::TimedOut(t)), Ok(s)) => {
            exited(pb::ExitKind::TimedOut, s.code(), format!("timed out after {t:?}"))
        }
        (Some(Ending::Killed(reason)), Ok(s)) => exited(pb::ExitKind::Killed, s.code(), kill_message(reason)),
        (Some(Ending::Shutdown), Ok(s)) => exited(
            pb::ExitKind::Interrupted,
            s.code(),
            "stopped because the worker shut down".into(),
        ),
        (None, Ok(s)) => process::classify(s),
    };
    if malformed > 0 {
        result.message = format!("{}; {malformed} malformed metric line(s) ignored", result.message);
    }
    unstored.amend(&mut result);
    result
}

fn stopped_before_start(s: Stop) -> pb::Exited {
    match s {
        Stop::Kill(reason) => exited(pb::ExitKind::Killed, None, kill_message(reason)),
        Stop::Shutdown => exited(
            pb::ExitKind::Interrupted,
            None,
            "the worker shut down before the trial started".into(),
        ),
    }
}

/// For a rank of a multi-rank command trial: meets the other ranks, then returns the
/// environment torchrun would give the program, so an unchanged PyTorch DDP script runs.
/// Rank 0 announces a free port on this worker as `MASTER_PORT`, where its program's
/// `init_process_group` will listen. Empty for a single-rank trial.
async fn torchrun_env(
    ctx: &RunnerContext,
    a: &pb::Assignment,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Result<Vec<(String, String)>, rendezvous::Missed> {
    if a.world_size <= 1 {
        return Ok(Vec::new());
    }
    let address = if a.rank == 0 {
        let probe = std::net::TcpListener::bind((ctx.advertise_address, 0))
            .map_err(|e| rendezvous::Missed::Failed(format!("cannot find a free port for MASTER_PORT: {e}")))?;
        probe
            .local_addr()
            .map_err(|e| rendezvous::Missed::Failed(format!("cannot find a free port for MASTER_PORT: {e}")))?
            .to_string()
    } else {
        std::net::SocketAddr::from((ctx.advertise_address, 0)).to_string()
    };
    let request = pb::RendezvousRequest {
        worker_id: ctx.worker_id.clone(),
        trial_id: a.trial_id,
        attempt: a.attempt,
        rank: a.rank,
        address,
        nccl_id: Vec::new(),
        data: None,
        // The agent stamps the epoch of the registration it calls under.
        epoch: 0,
    };
    let met = rendezvous::meet(ctx.rendezvous.as_ref(), request, ctx.rendezvous_timeout, stop).await?;
    let master: std::net::SocketAddr = met.addresses.first().and_then(|m| m.parse().ok()).ok_or_else(|| {
        rendezvous::Missed::Failed(format!("rendezvous gave no usable rank 0 address: {:?}", met.addresses))
    })?;
    Ok([
        ("MASTER_ADDR", master.ip().to_string()),
        ("MASTER_PORT", master.port().to_string()),
        ("WORLD_SIZE", met.world_size.to_string()),
        ("RANK", a.rank.to_string()),
        ("LOCAL_RANK", a.local_rank.to_string()),
        ("LOCAL_WORLD_SIZE", a.local_world_size.to_string()),
        ("GROUP_RANK", a.group_rank.to_string()),
        ("GROUP_WORLD_SIZE", a.group_world_size.to_string()),
        ("ROLE_RANK", a.rank.to_string()),
        ("ROLE_WORLD_SIZE", met.world_size.to_string()),
        ("TORCHELASTIC_RESTART_COUNT", a.restart_count.to_string()),
        ("TORCHELASTIC_RUN_ID", format!("chorus-{}-{}", a.trial_id, a.attempt)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect())
}

fn kill_message(reason: String) -> String {
    if reason.is_empty() {
        "killed by the coordinator".into()
    } else {
        reason
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Turns output lines, and reports made in this process, into events and recorder jobs.
struct Output {
    trial: u64,
    attempt: u32,
    events: Events,
    jobs: mpsc::UnboundedSender<Job>,
    backlog: Arc<Backlog>,
    malformed: u64,
    /// A rank other than 0 of a multi-rank attempt.
    follower: bool,
    /// Reports the attempt's GPU readings while the attempt's output is taken.
    gpu_reports: Option<gpu_reports::Reporter>,
}

impl Output {
    fn new(a: &pb::Assignment, events: Events, jobs: mpsc::UnboundedSender<Job>, backlog: Arc<Backlog>) -> Self {
        Output {
            trial: a.trial_id,
            attempt: a.attempt,
            events,
            jobs,
            backlog,
            malformed: 0,
            follower: a.rank > 0,
            gpu_reports: None,
        }
    }

    /// Whether more output may be taken now; see [`Backlog`].
    fn has_room(&self) -> bool {
        self.backlog.has_room()
    }

    /// Waits until more output may be taken.
    async fn room(&self) {
        self.backlog.room().await
    }

    /// Asks the recorder to commit the checkpoint directory as `step` (builtin trials, whose
    /// checkpoints do not come from output lines).
    fn checkpoint(&mut self, step: u64, data_position: String) {
        if self.follower {
            return;
        }
        let _ = self.jobs.send(Job::Checkpoint(step as i64, data_position));
    }

    fn log(&mut self, line: String) {
        let weight = line.len() + 1;
        if self.jobs.send(Job::Log(line)).is_ok() {
            self.backlog.add(weight);
        }
    }

    /// One line a trial printed: a metric line is recorded (and logged), anything else logged.
    fn handle(&mut self, line: String) {
        if self.follower {
            // Rank 0 speaks for a multi-rank attempt; the others' output is only logged.
            self.log(line);
            return;
        }
        match metric::parse_line(&line) {
            Line::Log => {}
            Line::Metric(report) => self.metric(report, line.len() + 1),
            Line::Malformed(error) => self.malformed(&line, error),
        }
        self.log(line);
    }

    /// A report made in this process (a builtin trial's trainer), typed from the start: recorded
    /// as the `chorus:metric` line that a trial printing it would be, and logged as that line.
    fn report(&mut self, report: MetricReport) {
        let line = report.to_line();
        if self.follower {
            self.log(line);
            return;
        }
        // Held to the rules the same line printed by a trial meets, in the parser's words.
        match report.check() {
            Ok(()) => self.metric(report, line.len() + 1),
            Err(error) => self.malformed(&line, error),
        }
        self.log(line);
    }

    /// Sends a well-formed report to the recorder; `weight` is its line's share of the backlog.
    fn metric(&mut self, report: MetricReport, weight: usize) {
        // Stored first and reported by the recorder once stored.
        let step = report.step;
        if self.jobs.send(Job::Metric(report, weight)).is_ok() {
            self.backlog.add(weight);
        }
        if let Some(step) = step {
            let _ = self.jobs.send(Job::Checkpoint(step, String::new()));
        }
    }

    fn malformed(&mut self, line: &str, error: String) {
        self.malformed += 1;
        if self.malformed <= MAX_MALFORMED_REPORTED {
            warn!(trial = self.trial, attempt = self.attempt, line = %line, error = %error, "malformed metric line");
            self.events.emit(Kind::Malformed(pb::MalformedMetric {
                line: line.to_string(),
                error,
            }));
        }
        if self.malformed == MAX_MALFORMED_REPORTED {
            warn!(
                trial = self.trial,
                attempt = self.attempt,
                "further malformed metric lines are counted but not reported"
            );
        }
    }
}
