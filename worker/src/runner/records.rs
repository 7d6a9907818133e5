//! The records an attempt leaves in object storage: log chunks, the trial's `metrics.jsonl`, and
//! checkpoints. One recorder task per attempt does all of it, in the order jobs arrive, so output
//! is never blocked on storage and checkpoints are committed in step order.

use super::Events;
use chorus_core::checkpoint::{self, MANIFEST};
use chorus_core::storage::Storage;
use chorus_core::{CoreError, ExperimentId, TrialId};
use chorus_proto::pb::{self, trial_event::Kind};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tracing::warn;

/// Object stores cannot append: the log goes out as one object per flush.
const LOG_FLUSH_EVERY: Duration = Duration::from_secs(1);
/// A chatty trial should not build one huge chunk between two flushes.
const LOG_CHUNK_MAX_BYTES: usize = 8 * 1024 * 1024;
/// `metrics.jsonl` is rewritten whole each time, so not on every line.
const METRICS_WRITE_EVERY: Duration = Duration::from_secs(2);

pub(super) enum Job {
    /// One output line, metric lines included.
    Log(String),
    /// A metric report as `MetricReport::to_json` gives it.
    Metric(Map<String, Value>),
    /// A metric named this step: commit the checkpoint directory if it changed. The string is
    /// where a data-parallel trial's data stands in it (JSON), or empty.
    Checkpoint(i64, String),
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
    /// The metric's value by step, over every attempt of the trial.
    scores: std::collections::BTreeMap<i64, f64>,
    checkpoint_dir: PathBuf,
    checkpoints_prefix: Path,
    metrics_key: Path,
    events: Events,
    log: Vec<u8>,
    next_chunk: u32,
    /// The whole `metrics.jsonl`: earlier attempts' lines, then this attempt's.
    metrics: String,
    metrics_dirty: bool,
    /// Of the directory as last committed (or restored), so an unchanged one is not re-uploaded.
    committed_fingerprint: Option<u64>,
}

impl Recorder {
    pub fn new(
        storage: Storage,
        a: &pb::Assignment,
        checkpoint_dir: PathBuf,
        restored_fingerprint: Option<u64>,
        earlier_metrics: String,
        events: Events,
    ) -> Self {
        let (exp, trial) = (ExperimentId(a.experiment_id), TrialId(a.trial_id));
        let mut scores = std::collections::BTreeMap::new();
        for line in earlier_metrics.lines() {
            if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(line) {
                record_score(&mut scores, &a.metric, &m);
            }
        }
        Recorder {
            checkpoints_prefix: storage.checkpoints_prefix(exp, trial),
            metrics_key: storage.metrics_key(exp, trial),
            storage,
            exp,
            trial,
            attempt: a.attempt,
            rank: a.rank,
            keep_checkpoints: a.keep_checkpoints as usize,
            keep_best: a.keep_best_checkpoints as usize,
            metric: a.metric.clone(),
            maximize: a.maximize,
            scores,
            checkpoint_dir,
            events,
            log: Vec::new(),
            next_chunk: 0,
            metrics: earlier_metrics,
            metrics_dirty: false,
            committed_fingerprint: restored_fingerprint,
        }
    }

    /// Runs until the job sender is dropped, then stores what is left: the pending checkpoint,
    /// the last log chunk and the metrics.
    pub async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
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
                _ = metrics_tick.tick() => {
                    if self.metrics_dirty {
                        self.write_metrics().await;
                    }
                }
            }
        }
        self.flush_log().await;
        if self.metrics_dirty {
            self.write_metrics().await;
        }
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
                }
                Job::Metric(mut m) => {
                    record_score(&mut self.scores, &self.metric, &m);
                    m.insert("attempt".into(), Value::from(self.attempt));
                    self.metrics.push_str(&Value::Object(m).to_string());
                    self.metrics.push('\n');
                    self.metrics_dirty = true;
                }
                Job::Checkpoint(step, position) => checkpoint_step = Some((step, position)),
            }
        }
        if self.log.len() >= LOG_CHUNK_MAX_BYTES {
            self.flush_log().await;
        }
        if let Some((step, position)) = checkpoint_step {
            self.commit_checkpoint(step, position).await;
        }
    }

    async fn commit_checkpoint(&mut self, step: i64, data_position_json: String) {
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
        match checkpoint::commit(&self.storage, &self.checkpoints_prefix, step, &self.checkpoint_dir).await {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                // The next step retries: the fingerprint still differs.
                warn!(trial = %self.trial, attempt = self.attempt, step, error = %e, "cannot commit checkpoint");
                return;
            }
        }
        self.committed_fingerprint = fingerprint;
        if self.metrics_dirty {
            self.write_metrics().await;
        }
        // 0 means the spec set no limit; pruning to zero would delete what was just committed.
        let scores = &self.scores;
        let retention = checkpoint::Retention {
            keep_last: self.keep_checkpoints,
            keep_best: self.keep_best,
            maximize: self.maximize,
            score: &|step| scores.get(&step).copied(),
        };
        if self.keep_checkpoints > 0
            && let Err(e) = checkpoint::prune(&self.storage, &self.checkpoints_prefix, &retention).await
        {
            warn!(trial = %self.trial, attempt = self.attempt, error = %e, "cannot prune old checkpoints");
        }
        let manifest_key = self
            .checkpoints_prefix
            .clone()
            .join(checkpoint::step_dir(step))
            .join(MANIFEST);
        self.events.emit(Kind::Checkpoint(pb::CheckpointCommitted {
            step,
            manifest_key: manifest_key.to_string(),
            data_position_json,
        }));
    }

    async fn flush_log(&mut self) {
        if self.log.is_empty() {
            return;
        }
        let key = self
            .storage
            .log_chunk_key(self.exp, self.trial, self.attempt, self.rank, self.next_chunk);
        let data = bytes::Bytes::from(std::mem::take(&mut self.log));
        match self.storage.store.put(&key, PutPayload::from(data.clone())).await {
            Ok(_) => self.next_chunk += 1,
            Err(e) => {
                warn!(trial = %self.trial, attempt = self.attempt, key = %key, error = %e, "cannot store a log chunk; will retry");
                let mut retry = data.to_vec();
                retry.append(&mut self.log);
                self.log = retry;
            }
        }
    }

    async fn write_metrics(&mut self) {
        let body = PutPayload::from(self.metrics.clone().into_bytes());
        match self.storage.store.put(&self.metrics_key, body).await {
            Ok(_) => self.metrics_dirty = false,
            Err(e) => {
                warn!(trial = %self.trial, attempt = self.attempt, error = %e, "cannot store metrics; will retry")
            }
        }
    }
}

/// Notes the value of `metric` at the report's step, if it has both.
fn record_score(scores: &mut std::collections::BTreeMap<i64, f64>, metric: &str, m: &Map<String, Value>) {
    if let (Some(step), Some(v)) = (
        m.get("step").and_then(Value::as_i64),
        m.get(metric).and_then(Value::as_f64),
    ) {
        scores.insert(step, v);
    }
}

/// The trial's `metrics.jsonl` as earlier attempts left it. Lines of this same attempt (from an
/// earlier run of it that was cut short) are dropped, since this run reports them again.
pub(super) async fn read_earlier_metrics(storage: &Storage, key: &Path, attempt: u32) -> Result<String, CoreError> {
    let bytes = match storage.store.get(key).await {
        Ok(r) => r.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return Ok(String::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = String::with_capacity(bytes.len() + 1);
    for line in String::from_utf8_lossy(&bytes).lines() {
        if line.trim().is_empty() {
            continue;
        }
        let same_attempt = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v.get("attempt").and_then(Value::as_u64))
            == Some(u64::from(attempt));
        if !same_attempt {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}
