//! Domain types shared by every Chorus binary: typed ids, the experiment spec (YAML schema,
//! validation, `--set` overrides), search spaces, the metric line protocol, the object-storage
//! layout and checkpoint manifests, and the conversions between these types and `chorus.v1`.
//!
//! This crate must stay free of server code and of tch: the CLI links it, and so does every
//! binary. It may do object-storage I/O (checkpoints, logs) because that is shared by the worker,
//! the coordinator and the CLI, but it never spawns tasks or holds connections of its own.

pub mod builtin;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod history;
pub mod ids;
pub mod limits;
pub mod metric;
pub mod shards;
pub mod space;
pub mod spec;
pub mod storage;
pub mod storage_policy;
pub mod template;
mod yaml_locate;

pub use error::CoreError;
pub use ids::{ExperimentId, TrialId, WorkerId};
