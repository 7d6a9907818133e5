//! The rendezvous of a multi-rank attempt: every rank announces where it can be reached, and
//! once all have, each learns the others' addresses, the attempt's session token, the NCCL id
//! rank 0 made (on GPUs) and the data position the shard manager chose.
//!
//! Held in memory only: a rendezvous is short, and after a coordinator restart the ranks simply
//! call again. It belongs to one attempt; a call for an attempt the trial has moved past is
//! stale (ABORTED), and ending the attempt drops the rendezvous, which wakes its waiters.

use crate::protocol::{DataPlan, JoinRequest, Peers};
use tokio::sync::watch;

pub struct Rendezvous {
    pub attempt: u32,
    addresses: Vec<Option<String>>,
    nccl_id: Vec<u8>,
    data: Option<DataPlan>,
    session: u64,
    ready: Option<Peers>,
    /// Flips to true once every rank has joined.
    notify: watch::Sender<bool>,
}

/// What a joining rank gets: the answer, or something to wait on.
pub enum Joined {
    Ready(Peers),
    Wait(watch::Receiver<bool>),
}

impl Rendezvous {
    pub fn new(attempt: u32, world: usize, session: u64) -> Self {
        Rendezvous {
            attempt,
            addresses: vec![None; world],
            nccl_id: Vec::new(),
            data: None,
            session,
            ready: None,
            notify: watch::channel(false).0,
        }
    }

    /// Records a rank's call (a repeated call replaces what it said before, until all joined).
    pub fn join(&mut self, req: &JoinRequest) {
        if self.ready.is_some() {
            return;
        }
        self.addresses[req.rank as usize] = Some(req.address.clone());
        if req.rank == 0 {
            self.nccl_id = req.nccl_id.clone();
            self.data = req.data.clone();
        }
    }

    /// Ranks still missing.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.addresses.len())
            .filter(|&r| self.addresses[r].is_none())
            .collect()
    }

    /// Rank 0's data request, once every rank joined and before the answer is made.
    pub fn data(&self) -> Option<&DataPlan> {
        self.data.as_ref()
    }

    /// Completes the rendezvous with the data position chosen for it, and wakes the waiters.
    pub fn complete(&mut self, position_json: String) -> Peers {
        let resp = Peers {
            world_size: self.addresses.len() as u32,
            addresses: self.addresses.iter().map(|a| a.clone().unwrap_or_default()).collect(),
            nccl_id: self.nccl_id.clone(),
            session: self.session,
            position_json,
        };
        self.ready = Some(resp.clone());
        self.notify.send_replace(true);
        resp
    }

    pub fn state(&self) -> Joined {
        match &self.ready {
            Some(r) => Joined::Ready(r.clone()),
            None => Joined::Wait(self.notify.subscribe()),
        }
    }
}
