//! What workers and the coordinator say to each other, as domain types. The state works on
//! these; `api::convert` turns `chorus.v1` messages into them and back at the edge.

use crate::scheduler::Resources;
use chorus_core::checkpoint::CheckpointRef;
use chorus_core::metric::MetricReport;
use chorus_core::{ExperimentId, TrialId, WorkerId};
use std::collections::BTreeMap;

/// A change clients may want to see, announced once durable: the experiment, and the trial if
/// one changed.
pub type Change = (ExperimentId, Option<TrialId>);

/// One rank of an attempt a worker says it runs (or is told to kill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunningAttempt {
    pub trial: TrialId,
    pub attempt: u32,
    pub rank: u32,
}

/// A worker joining, or joining again.
#[derive(Debug, Clone)]
pub struct Registration {
    pub worker: WorkerId,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
    /// Where its ranks can be reached by other workers.
    pub address: String,
    pub running: Vec<RunningAttempt>,
    /// Which process lineage registers (a pod's uid, a data directory's id); empty when the
    /// worker did not say, which counts as a stranger to every registration.
    pub instance: String,
}

/// A registration as accepted: its epoch, and the attempts the worker should kill.
#[derive(Debug, Clone)]
pub struct Registered {
    pub epoch: u64,
    pub kill: Vec<RunningAttempt>,
}

/// A batch of events from one rank of one attempt.
#[derive(Debug, Clone)]
pub struct Report {
    pub worker: WorkerId,
    /// The registration epoch the worker speaks for.
    pub epoch: u64,
    pub trial: TrialId,
    pub attempt: u32,
    pub rank: u32,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone)]
pub struct Event {
    /// Per attempt and rank, from 1: an event already applied is skipped.
    pub seq: u64,
    /// When it happened on the worker; 0 when it did not say.
    pub unix_ms: i64,
    pub kind: EventKind,
}

#[derive(Debug, Clone)]
pub enum EventKind {
    Started {
        /// The checkpoint restored into the attempt, if any.
        restored: Option<CheckpointRef>,
    },
    /// A metric line the worker stored. `Err` holds why a report from an older worker (sent
    /// as JSON text) did not parse: it still counts as a stored line.
    Metric(Result<MetricReport, String>),
    Checkpoint {
        step: i64,
        /// Where a data-parallel trial's data stands in it (JSON), or empty.
        data_position: String,
    },
    /// A line that looked like a metric report and was not one.
    Malformed,
    Exited {
        outcome: ExitOutcome,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    Succeeded,
    Failed,
    TimedOut,
    /// The worker went away politely (drain, shutdown).
    Interrupted,
    /// Killed on the worker, or an exit the worker did not classify.
    Killed,
}

/// What the coordinator tells a worker over its command stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Assign(Box<Assignment>),
    Kill {
        trial: TrialId,
        attempt: u32,
        reason: String,
    },
}

/// One rank of an attempt, placed on a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub experiment: ExperimentId,
    pub trial: TrialId,
    pub attempt: u32,
    pub params_json: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: u64,
    pub storage: String,
    pub resources: Resources,
    pub keep_checkpoints: u32,
    pub keep_best_checkpoints: u32,
    pub metric: String,
    pub maximize: bool,
    pub builtin_json: String,
    pub rank: u32,
    pub world_size: u32,
    pub local_rank: u32,
    pub local_world_size: u32,
    pub group_rank: u32,
    pub group_world_size: u32,
    pub restart_count: u32,
    pub data_parallel: bool,
    /// The trial whose checkpoint this attempt starts from, when not its own (exploitation).
    pub restore_from_trial: Option<TrialId>,
    pub restore: Option<CheckpointRef>,
    /// How many metric lines the coordinator acknowledged of each earlier attempt.
    pub acked_metrics: Vec<(u32, u64)>,
}

/// A rank joining its attempt's rendezvous.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub worker: WorkerId,
    /// The registration epoch the worker speaks for.
    pub epoch: u64,
    pub trial: TrialId,
    pub attempt: u32,
    pub rank: u32,
    pub address: String,
    /// Rank 0 on GPUs: the NCCL id the others join with.
    pub nccl_id: Vec<u8>,
    /// Rank 0 of a builtin trial: what the data plan is made from.
    pub data: Option<DataPlan>,
}

/// What rank 0 says the data plan is made from.
#[derive(Debug, Clone, Default)]
pub struct DataPlan {
    pub shards: Vec<chorus_core::shards::ShardSize>,
    pub seed: u64,
    pub batch_size: u64,
    /// Where the restored checkpoint stands within its epoch (JSON), or empty.
    pub position_json: String,
    pub epoch: u64,
}

/// What every rank learns once all have joined.
#[derive(Debug, Clone, PartialEq)]
pub struct Peers {
    pub world_size: u32,
    pub addresses: Vec<String>,
    pub nccl_id: Vec<u8>,
    pub session: u64,
    pub position_json: String,
}
