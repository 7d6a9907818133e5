//! The records an attempt leaves in object storage: log chunks, its metric lines, and
//! checkpoints. One recorder task per attempt does all of it, in the order jobs arrive, so
//! output is never blocked on storage and checkpoints are committed in step order.
//!
//! Every object the recorder writes carries its attempt in its name (see `chorus_core::history`
//! and `chorus_core::checkpoint`), so what it writes can never overwrite a newer attempt's
//! records; once the agent learns the attempt is stale, the recorder writes nothing more.
//!
//! A metric line is stored before it is reported: the coordinator acknowledges only lines
//! that are already in storage, which is what lets a later attempt's history carry exactly
//! the acknowledged lines.
//!
//! Memory is bounded: output not yet stored is counted in the attempt's [`Backlog`] (the
//! trial's pipes stop being read when it is full), log chunks and metric segments are capped,
//! and metric lines are only written as fast as the coordinator acknowledges their reports.

use super::{Backlog, Events};
use chorus_core::checkpoint::{self, CheckpointRef, PruneScope};
use chorus_core::history::MAX_SEGMENT_BYTES;
use chorus_core::metric::MetricReport;
use chorus_core::storage::Storage;
use chorus_core::{ExperimentId, TrialId};
use chorus_proto::pb::{self, trial_event::Kind};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::warn;

/// Object stores cannot append: the log goes out as one object per flush.
const LOG_FLUSH_EVERY: Duration = Duration::from_secs(1);
/// A chunk is cut at this size, far below the message limit, so any chunk is one page to read.
pub(super) const LOG_CHUNK_MAX_BYTES: usize = 1024 * 1024;
/// Metric lines are stored (and so reported) at most this long after they were printed.
const METRICS_WRITE_EVERY: Duration = Duration::from_millis(200);
/// At the end, how long to wait for the last checkpoint's acknowledgement before the final
/// retention pass (until then the previous one must be kept).
const FINAL_ACK_WAIT: Duration = Duration::from_secs(3);
const FINAL_STORE_RETRY: Duration = Duration::from_millis(500);

/// What an attempt's records came to once its recorder ended.
#[derive(Debug, Default)]
pub(super) struct Unstored {
    /// Metric lines the trial printed that never reached storage (so were never reported).
    pub metric_lines: usize,
    pub log_bytes: usize,
    /// The last storage error, to say why.
    pub error: Option<String>,
}

impl Unstored {
    /// Turns an exit that would claim success into a failure when the trial's history is
    /// missing lines: the trial then runs again from its acknowledged checkpoint instead of
    /// completing with a history that stops short. Lost log output is only noted.
    pub fn amend(&self, exited: &mut pb::Exited) {
        let why = self.error.as_deref().unwrap_or("storage refused the writes");
        if self.metric_lines > 0 && exited.kind() == pb::ExitKind::Succeeded {
            exited.kind = pb::ExitKind::Failed.into();
            exited.message = format!(
                "{} metric line(s) could not be stored ({why}); the trial's history would be incomplete",
                self.metric_lines
            );
        } else if self.metric_lines > 0 || self.log_bytes > 0 {
            let note = format!(
                "{} metric line(s) and {} bytes of log could not be stored ({why})",
                self.metric_lines, self.log_bytes
            );
            exited.message = if exited.message.is_empty() {
                note
            } else {
                format!("{}; {note}", exited.message)
            };
        }
    }
}

pub(super) enum Job {
    /// One output line, metric lines included.
    Log(String),
    /// A parsed metric report, and its weight in the backlog.
    Metric(MetricReport, usize),
    /// A metric named this step: commit the checkpoint directory if it changed. The string is
    /// where a data-parallel trial's data stands in it (JSON), or empty.
    Checkpoint(i64, String),
}

/// Where the recorder writes, and what it continues.
pub(super) struct RecorderSetup {
    pub storage: Storage,
    pub checkpoint_dir: PathBuf,
    /// The checkpoint the attempt started from: its lineage continues there.
    pub start: Option<CheckpointRef>,
    pub restored_fingerprint: Option<u64>,
    /// The experiment metric's value by step, from the history this attempt carries over.
    pub scores: BTreeMap<i64, f64>,
}

pub(super) struct Recorder {
    storage: Storage,
    exp: ExperimentId,
    trial: TrialId,
    attempt: u32,
    rank: u32,
    keep_checkpoints: usize,
    keep_best: usize,
    /// The experiment's metric and whether it is maximised, for keeping the best checkpoints.
    metric: String,
    maximize: bool,
    /// The metric's value by step, over the trial's history.
    scores: BTreeMap<i64, f64>,
    checkpoint_dir: PathBuf,
    checkpoints_prefix: Path,
    start: Option<CheckpointRef>,
    events: Events,
    backlog: Arc<Backlog>,
    /// The chunk being filled, and whole chunks whose upload failed, oldest first.
    log: Vec<u8>,
    unsent_chunks: VecDeque<bytes::Bytes>,
    next_chunk: u32,
    /// The open segment of this attempt's metric lines, rewritten whole until it is full.
    segment: String,
    segment_index: u32,
    /// Lines in `segment` not yet stored, to report once they are, and their backlog weight.
    unstored: Vec<pb::Metric>,
    unstored_weight: usize,
    last_metrics_write: Option<Instant>,
    /// Of the directory as last committed (or restored), so an unchanged one is not re-uploaded.
    committed_fingerprint: Option<u64>,
    /// The newest checkpoint this attempt committed.
    last_committed: Option<CheckpointRef>,
    /// The last storage error, for the attempt's exit message.
    last_error: Option<String>,
    /// How long to keep retrying at the end.
    store_retry: Duration,
}

impl Recorder {
    pub fn new(
        a: &pb::Assignment,
        setup: RecorderSetup,
        events: Events,
        backlog: Arc<Backlog>,
        store_retry: Duration,
    ) -> Self {
        let (exp, trial) = (ExperimentId(a.experiment_id), TrialId(a.trial_id));
        Recorder {
            checkpoints_prefix: setup.storage.checkpoints_prefix(exp, trial),
            storage: setup.storage,
            exp,
            trial,
            attempt: a.attempt,
            rank: a.rank,
            keep_checkpoints: a.keep_checkpoints as usize,
            keep_best: a.keep_best_checkpoints as usize,
            metric: a.metric.clone(),
            maximize: a.maximize,
            scores: setup.scores,
            checkpoint_dir: setup.checkpoint_dir,
            start: setup.start,
            events,
            backlog,
            log: Vec::new(),
            unsent_chunks: VecDeque::new(),
            next_chunk: 0,
            segment: String::new(),
            segment_index: 0,
            unstored: Vec::new(),
            unstored_weight: 0,
            last_metrics_write: None,
            committed_fingerprint: setup.restored_fingerprint,
            last_committed: None,
            last_error: None,
            store_retry,
        }
    }

    /// Runs until the job sender is dropped, then stores what is left (the pending checkpoint,
    /// the last log chunk and the metrics), retrying for a while what storage refuses; says
    /// what could not be stored.
    pub async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) -> Unstored {
        let mut log_tick = tokio::time::interval(LOG_FLUSH_EVERY);
        log_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut metrics_tick = tokio::time::interval(METRICS_WRITE_EVERY);
        metrics_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                job = jobs.recv() => {
                    let Some(job) = job else { break };
                    let mut batch = vec![job];
                    while let Ok(job) = jobs.try_recv() {
                        batch.push(job);
                    }
                    self.apply(batch).await;
                }
                _ = log_tick.tick() => self.flush_log().await,
                _ = metrics_tick.tick() => self.write_metrics().await,
            }
        }
        let give_up = Instant::now() + self.store_retry;
        loop {
            self.write_metrics().await;
            self.flush_log().await;
            if self.stale() || !self.holds_unstored() || Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(FINAL_STORE_RETRY).await;
        }
        if let Some(last) = self.last_committed
            && self.keep_checkpoints > 0
            && self.events.flow().acknowledges(last, FINAL_ACK_WAIT).await
        {
            self.prune().await;
        }
        let left = Unstored {
            metric_lines: self.unstored.len(),
            log_bytes: self.log.len() + self.unsent_chunks.iter().map(|c| c.len()).sum::<usize>(),
            error: self.last_error.clone(),
        };
        if (left.metric_lines > 0 || left.log_bytes > 0) && !self.stale() {
            warn!(
                trial = %self.trial,
                attempt = self.attempt,
                log_bytes = left.log_bytes,
                metric_lines = left.metric_lines,
                error = ?left.error,
                "the attempt ended with records that could not be stored"
            );
        }
        // Whatever could not be stored is given up: release its weight so nothing waits on it.
        self.drop_unstored();
        left
    }

    fn holds_unstored(&self) -> bool {
        !self.unstored.is_empty() || !self.log.is_empty() || !self.unsent_chunks.is_empty()
    }

    fn stale(&self) -> bool {
        self.events.flow().is_stale()
    }

    /// A stale attempt writes nothing more; what it held is dropped, and its weight released.
    fn drop_unstored(&mut self) {
        let log = self.log.len() + self.unsent_chunks.iter().map(|c| c.len()).sum::<usize>();
        self.log.clear();
        self.unsent_chunks.clear();
        self.backlog.release(log + self.unstored_weight);
        self.unstored.clear();
        self.unstored_weight = 0;
    }

    async fn apply(&mut self, batch: Vec<Job>) {
        // While an upload ran, several steps may have queued; the directory now holds the newest
        // state, so committing it under an older step would mislabel it.
        let mut checkpoint_step = None;
        for job in batch {
            match job {
                Job::Log(line) => {
                    self.log.extend_from_slice(line.as_bytes());
                    self.log.push(b'\n');
                    if self.log.len() >= LOG_CHUNK_MAX_BYTES {
                        self.seal_chunk();
                    }
                }
                Job::Metric(report, weight) => {
                    record_score(&mut self.scores, &self.metric, &report);
                    // Stored with the attempt that printed it; reported typed, as parsed.
                    self.segment.push_str(&stored_line(&report, self.attempt));
                    self.segment.push('\n');
                    self.unstored.push(pb::Metric {
                        json: String::new(),
                        step: report.step,
                        values: report.values.into_iter().collect(),
                    });
                    self.unstored_weight += weight;
                }
                Job::Checkpoint(step, position) => checkpoint_step = Some((step, position)),
            }
        }
        if !self.unsent_chunks.is_empty() {
            self.flush_log().await;
        }
        let due = self
            .last_metrics_write
            .is_none_or(|t| t.elapsed() >= METRICS_WRITE_EVERY);
        if checkpoint_step.is_some() || due {
            // A checkpoint's step is reported after the metric that named it.
            self.write_metrics().await;
        }
        if let Some((step, position)) = checkpoint_step {
            self.commit_checkpoint(step, position).await;
        }
    }

    async fn commit_checkpoint(&mut self, step: i64, data_position_json: String) {
        if self.stale() {
            return;
        }
        let fingerprint = match checkpoint::fingerprint(&self.checkpoint_dir) {
            Ok(f) => f,
            Err(e) => {
                warn!(trial = %self.trial, attempt = self.attempt, error = %e, "cannot scan the checkpoint directory");
                return;
            }
        };
        if fingerprint.is_none() || fingerprint == self.committed_fingerprint {
            return;
        }
        let at = CheckpointRef::new(step, self.attempt);
        match checkpoint::commit(
            &self.storage,
            &self.checkpoints_prefix,
            at,
            self.start,
            &self.checkpoint_dir,
        )
        .await
        {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                // The next step retries: the fingerprint still differs.
                warn!(trial = %self.trial, attempt = self.attempt, step, error = %e, "cannot commit checkpoint");
                return;
            }
        }
        self.committed_fingerprint = fingerprint;
        self.last_committed = Some(at);
        // 0 means the spec set no limit; pruning to zero would delete what was just committed.
        if self.keep_checkpoints > 0 {
            self.prune().await;
        }
        self.events
            .emit_waiting(Kind::Checkpoint(pb::CheckpointCommitted {
                step,
                manifest_key: checkpoint::manifest_key(&self.checkpoints_prefix, at).to_string(),
                data_position_json,
            }))
            .await;
    }

    async fn prune(&self) {
        if self.stale() {
            return;
        }
        let scores = &self.scores;
        let retention = checkpoint::Retention {
            keep_last: self.keep_checkpoints,
            keep_best: self.keep_best,
            maximize: self.maximize,
            score: &|step| scores.get(&step).copied(),
        };
        let scope = PruneScope {
            attempt: self.attempt,
            start: self.start,
            acknowledged: self.events.flow().acknowledged_checkpoint().or(self.start),
        };
        if let Err(e) = checkpoint::prune(&self.storage, &self.checkpoints_prefix, &scope, &retention).await {
            warn!(trial = %self.trial, attempt = self.attempt, error = %e, "cannot prune old checkpoints");
        }
    }

    /// Moves the chunk being filled to the upload queue.
    fn seal_chunk(&mut self) {
        if !self.log.is_empty() {
            self.unsent_chunks
                .push_back(bytes::Bytes::from(std::mem::take(&mut self.log)));
        }
    }

    async fn flush_log(&mut self) {
        if self.stale() {
            self.drop_unstored();
            return;
        }
        self.seal_chunk();
        while let Some(chunk) = self.unsent_chunks.front().cloned() {
            let key = self
                .storage
                .log_chunk_key(self.exp, self.trial, self.attempt, self.rank, self.next_chunk);
            let len = chunk.len();
            match self.storage.store.put(&key, PutPayload::from(chunk)).await {
                Ok(_) => {
                    self.unsent_chunks.pop_front();
                    self.next_chunk += 1;
                    self.backlog.release(len);
                }
                Err(e) => {
                    self.last_error = Some(e.to_string());
                    // Kept, in order, under the same name: the next flush retries. The backlog
                    // holds the trial's output back meanwhile.
                    warn!(trial = %self.trial, attempt = self.attempt, key = %key, error = %e, "cannot store a log chunk; will retry");
                    return;
                }
            }
        }
    }

    /// Stores the open metric segment, then reports the lines it newly holds.
    async fn write_metrics(&mut self) {
        if self.unstored.is_empty() {
            return;
        }
        if self.stale() {
            self.drop_unstored();
            return;
        }
        let key = self
            .storage
            .metrics_segment_key(self.exp, self.trial, self.attempt, self.segment_index);
        let body = PutPayload::from(self.segment.clone().into_bytes());
        if let Err(e) = self.storage.store.put(&key, body).await {
            self.last_error = Some(e.to_string());
            warn!(trial = %self.trial, attempt = self.attempt, key = %key, error = %e, "cannot store metrics; will retry");
            return;
        }
        self.last_metrics_write = Some(Instant::now());
        for metric in std::mem::take(&mut self.unstored) {
            self.events.emit_waiting(Kind::Metric(metric)).await;
        }
        self.backlog.release(std::mem::take(&mut self.unstored_weight));
        if self.segment.len() >= MAX_SEGMENT_BYTES {
            self.segment.clear();
            self.segment_index += 1;
        }
    }
}

/// A report as its line in a metrics segment: the report's JSON object and the attempt that made it.
pub(super) fn stored_line(report: &MetricReport, attempt: u32) -> String {
    let mut m = report.to_json();
    m.insert("attempt".into(), Value::from(attempt));
    Value::Object(m).to_string()
}

/// Notes the value of `metric` at the report's step, if it has both.
pub(super) fn record_score(scores: &mut BTreeMap<i64, f64>, metric: &str, m: &MetricReport) {
    if let (Some(step), Some(&v)) = (m.step, m.values.get(metric)) {
        scores.insert(step, v);
    }
}
