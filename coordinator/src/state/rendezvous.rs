//! Rendezvous of multi-rank attempts: every rank's address, and the data position the shard manager picks.

use super::*;
use crate::protocol::JoinRequest;
use crate::rendezvous::Joined;

impl State {
    /// A rank joins its attempt's rendezvous. When it is the last to join, the shard manager
    /// picks the data position, which is recorded on the trial before anyone hears of it.
    pub fn rendezvous(&mut self, req: &JoinRequest) -> Result<Joined> {
        let tid = req.trial;
        self.check_epoch(&req.worker, req.epoch)?;
        let t = self.trial(tid)?;
        let live = t.live.as_ref().filter(|_| t.attempt == req.attempt);
        let Some(live) = live.filter(|l| l.ranks.get(req.rank as usize).is_some_and(|r| r.worker == req.worker)) else {
            return Err(CoordError::Stale(format!(
                "attempt {} (rank {}) of trial {tid} on worker {} is no longer current (trial is {}, attempt {})",
                req.attempt, req.rank, req.worker, t.state, t.attempt
            )));
        };
        if req.address.is_empty() {
            return Err(CoordError::InvalidArgument(
                "rendezvous: address must not be empty".into(),
            ));
        }
        let world = live.ranks.len();
        let exp = t.experiment;
        let r = self
            .rendezvous
            .entry(tid)
            .and_modify(|r| {
                if r.attempt != req.attempt {
                    *r = Rendezvous::new(req.attempt, world, rand::random());
                }
            })
            .or_insert_with(|| Rendezvous::new(req.attempt, world, rand::random()));
        r.join(req);
        if let Joined::Wait(rx) = r.state() {
            if !r.missing().is_empty() {
                return Ok(Joined::Wait(rx));
            }
            let position = match r.data() {
                Some(d) => {
                    serde_json::to_string(&crate::shards::start_position(d, world)?).expect("positions serialise")
                }
                None => String::new(),
            };
            r.complete(position.clone());
            if !position.is_empty() {
                self.trials.get_mut(&tid).expect("checked").data_position = position;
                self.touch_trial(tid, exp);
            }
        }
        Ok(self.rendezvous[&tid].state())
    }

    /// Ranks of a trial's attempt that have not joined its rendezvous yet.
    pub fn rendezvous_missing(&self, tid: TrialId) -> Vec<usize> {
        self.rendezvous.get(&tid).map_or_else(Vec::new, Rendezvous::missing)
    }
}
