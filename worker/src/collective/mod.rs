//! Collectives between the ranks of one data-parallel trial: all-reduce, broadcast and barrier.
//!
//! Three implementations sit behind [`Collective`]: [`ring`] (a ring over TCP for tensors on the
//! CPU), [`nccl`] (NCCL through `cudarc`, loaded at run time, for tensors on a GPU) and
//! [`SingleRank`] (world size 1: nothing to exchange). Every call has a timeout: a dead or cut-off
//! peer becomes an error on every surviving rank, never a hang, and a collective that failed once
//! stays failed (the trial restarts under a new attempt with a fresh one).
//!
//! This module knows nothing of trials, the coordinator or gRPC: it is given its rank, the peers'
//! addresses and a session token by the runner, which learns them at rendezvous.

pub mod buckets;
pub mod nccl;
pub mod ring;

use crate::error::WorkerError;
use tch::Tensor;

/// How an all-reduce combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Average,
}

/// The operations data-parallel training needs. Calls are collective: every rank makes the same
/// calls in the same order with tensors of the same shapes, or the calls fail (or time out).
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Reduces `t` across the ranks in place. `t` is a contiguous float32 tensor on the device this
    /// collective serves.
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<(), WorkerError>;
    /// Overwrites `t` on every rank with the root's `t`. Any dtype; contiguous.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<(), WorkerError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), WorkerError>;
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&mut self, _t: &mut Tensor, _op: ReduceOp) -> Result<(), WorkerError> {
        Ok(())
    }

    fn broadcast(&mut self, _t: &mut Tensor, root: usize) -> Result<(), WorkerError> {
        if root != 0 {
            return Err(WorkerError::Collective(format!(
                "broadcast from rank {root} in a world of size 1"
            )));
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), WorkerError> {
        Ok(())
    }
}
