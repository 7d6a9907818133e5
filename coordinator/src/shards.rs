//! The shard manager: which training samples each rank of a data-parallel builtin trial reads.
//!
//! At every rendezvous the coordinator decides the attempt's starting [`DataPosition`]: a fresh
//! epoch is the seeded plan of `chorus_core::shards` dealt to the attempt's ranks; a resumed one
//! is what the checkpoint's position left unconsumed, dealt to the new world size (which differs
//! after an elastic trial lost a rank). The position is recorded on the trial, and replaced at
//! every checkpoint by the one rank 0 reports, so the store always says which samples each rank
//! consumed. Pure: the caller supplies rank 0's request and records the result.

use crate::error::{CoordError, Result};
use crate::protocol::DataPlan;
use chorus_core::shards::{DataPosition, plan_epoch};

/// Where the ranks of an attempt of `world` ranks start reading.
pub fn start_position(req: &DataPlan, world: usize) -> Result<DataPosition> {
    let bad = |m: String| CoordError::InvalidArgument(format!("rendezvous data plan: {m}"));
    if req.batch_size == 0 {
        return Err(bad("batch_size must be at least 1".into()));
    }
    if !req.position_json.is_empty() {
        let pos: DataPosition = serde_json::from_str(&req.position_json)
            .map_err(|e| bad(format!("the checkpoint's data position does not parse: {e}")))?;
        if pos.batch_size != req.batch_size {
            // The rest of the epoch is re-dealt anyway; the new batch size applies from here.
            return Ok(DataPosition::start(pos.rest(world).plan, req.batch_size));
        }
        return Ok(pos.rest(world));
    }
    if req.shards.is_empty() {
        return Err(bad("the dataset lists no training shards".into()));
    }
    Ok(DataPosition::start(
        plan_epoch(&req.shards, req.seed, req.epoch, world),
        req.batch_size,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(position_json: String) -> DataPlan {
        DataPlan {
            shards: (0..4)
                .map(|i| chorus_core::shards::ShardSize {
                    key: format!("shard-{i:05}.tar"),
                    samples: 30,
                })
                .collect(),
            seed: 3,
            batch_size: 8,
            position_json,
            epoch: 1,
        }
    }

    #[test]
    fn a_fresh_attempt_gets_the_epoch_plan() {
        let pos = start_position(&request(String::new()), 2).unwrap();
        assert_eq!((pos.plan.epoch, pos.steps), (1, 0));
        assert_eq!((pos.plan.samples_of(0), pos.plan.samples_of(1)), (60, 60));
    }

    #[test]
    fn a_resumed_attempt_gets_only_what_was_not_consumed() {
        let mut first = start_position(&request(String::new()), 2).unwrap();
        first.steps = 2;
        let resumed = start_position(&request(serde_json::to_string(&first).unwrap()), 1).unwrap();
        assert_eq!(resumed.plan.world_size(), 1);
        assert_eq!(resumed.plan.samples_of(0), 120 - 2 * 2 * 8);
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        let mut r = request("{not json".into());
        assert!(matches!(start_position(&r, 2), Err(CoordError::InvalidArgument(m)) if m.contains("does not parse")));
        r.position_json.clear();
        r.shards.clear();
        assert!(matches!(start_position(&r, 2), Err(CoordError::InvalidArgument(_))));
        r = request(String::new());
        r.batch_size = 0;
        assert!(start_position(&r, 2).is_err());
    }
}
