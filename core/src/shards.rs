//! Which training samples each rank of a data-parallel trial reads in an epoch, and what is left
//! of an epoch after a failure or a change of world size.
//!
//! Pure and deterministic, so the coordinator (which assigns and records) and the workers (which
//! read) compute the same thing from the same inputs. An epoch's plan is the dataset's training
//! shards in a seeded shuffled order, dealt to the ranks as contiguous runs of samples
//! ([`ShardSpan`]) with equal counts (±1), so ranks take the same number of steps and at most
//! `world - 1` shards are split between two ranks. Samples are named by their position in the
//! shard's own order for the epoch (the reader shuffles a shard's samples from the seed, the
//! epoch and the shard's key), so a span names the same samples whatever the plan around it.
//!
//! All ranks step together and each takes `batch_size` samples a step from its spans in order,
//! so a [`DataPosition`] (plan plus steps taken) says exactly which samples each rank has
//! consumed. After a failure the trial resumes from a checkpoint's position: [`DataPosition::rest`]
//! deals what no rank consumed to the new world, and nothing is read twice or skipped.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A training shard and its number of samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSize {
    pub key: String,
    pub samples: u64,
}

/// Samples `start..end` of one shard, in the shard's order for the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpan {
    pub shard: String,
    pub start: u64,
    pub end: u64,
}

impl ShardSpan {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// What each rank reads in (the rest of) one epoch: `ranks[r]` is rank r's spans in reading order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochPlan {
    pub epoch: u64,
    pub ranks: Vec<Vec<ShardSpan>>,
}

impl EpochPlan {
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Samples rank `rank` reads under this plan.
    pub fn samples_of(&self, rank: usize) -> u64 {
        self.ranks.get(rank).map_or(0, |s| s.iter().map(ShardSpan::len).sum())
    }

    /// Synchronous steps the plan takes: the busiest rank's batches.
    pub fn steps(&self, batch_size: u64) -> u64 {
        (0..self.world_size())
            .map(|r| self.samples_of(r).div_ceil(batch_size.max(1)))
            .max()
            .unwrap_or(0)
    }
}

/// Where a data-parallel run stands within an epoch: its plan and the synchronous steps taken
/// under it. Checkpoints record it; a resumed attempt continues from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub plan: EpochPlan,
    pub steps: u64,
    pub batch_size: u64,
}

impl DataPosition {
    /// The start of a plan.
    pub fn start(plan: EpochPlan, batch_size: u64) -> Self {
        DataPosition {
            plan,
            steps: 0,
            batch_size,
        }
    }

    /// Samples rank `rank` has consumed: the first `steps * batch_size` of its spans.
    pub fn consumed_by(&self, rank: usize) -> u64 {
        self.plan
            .samples_of(rank)
            .min(self.steps.saturating_mul(self.batch_size))
    }

    /// Each rank's consumed spans, in reading order.
    pub fn consumed(&self) -> Vec<Vec<ShardSpan>> {
        (0..self.plan.world_size())
            .map(|r| split_at(&self.plan.ranks[r], self.consumed_by(r)).0)
            .collect()
    }

    /// The spans no rank has consumed yet, rank 0's first.
    pub fn unconsumed(&self) -> Vec<ShardSpan> {
        (0..self.plan.world_size())
            .flat_map(|r| split_at(&self.plan.ranks[r], self.consumed_by(r)).1)
            .collect()
    }

    /// The rest of the epoch dealt to `world` ranks: a fresh position over only the samples no
    /// rank consumed. Where nothing was consumed and the world is unchanged, the plan is kept.
    pub fn rest(&self, world: usize) -> DataPosition {
        if self.steps == 0 && self.plan.world_size() == world {
            return self.clone();
        }
        DataPosition::start(deal(self.plan.epoch, &self.unconsumed(), world), self.batch_size)
    }

    /// Every rank has consumed all of its spans: the epoch is over.
    pub fn is_finished(&self) -> bool {
        (0..self.plan.world_size()).all(|r| self.consumed_by(r) == self.plan.samples_of(r))
    }
}

/// The plan of a whole epoch: the shards in an order drawn from (`seed`, `epoch`), dealt to
/// `world` ranks. Empty shards are left out.
pub fn plan_epoch(shards: &[ShardSize], seed: u64, epoch: u64, world: usize) -> EpochPlan {
    let mut order: Vec<&ShardSize> = shards.iter().filter(|s| s.samples > 0).collect();
    // Sorted first so the plan does not depend on the order the caller listed the shards in.
    order.sort_by(|a, b| a.key.cmp(&b.key));
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5348_4152_4450_4c4e);
    rng.set_stream(epoch);
    order.shuffle(&mut rng);
    let spans: Vec<ShardSpan> = order
        .into_iter()
        .map(|s| ShardSpan {
            shard: s.key.clone(),
            start: 0,
            end: s.samples,
        })
        .collect();
    deal(epoch, &spans, world)
}

/// Deals `spans`, in order, to `world` ranks as contiguous runs of equal size (the first
/// `total % world` ranks get one more sample).
pub fn deal(epoch: u64, spans: &[ShardSpan], world: usize) -> EpochPlan {
    let world = world.max(1);
    let total: u64 = spans.iter().map(ShardSpan::len).sum();
    let (base, extra) = (total / world as u64, total % world as u64);
    let mut rest: Vec<ShardSpan> = spans.iter().filter(|s| !s.is_empty()).cloned().collect();
    let mut ranks = Vec::with_capacity(world);
    for r in 0..world as u64 {
        let quota = base + u64::from(r < extra);
        let (mine, others) = split_at(&rest, quota);
        ranks.push(mine);
        rest = others;
    }
    EpochPlan { epoch, ranks }
}

/// The first `n` samples of `spans` and the rest, splitting a span where `n` falls inside it.
fn split_at(spans: &[ShardSpan], n: u64) -> (Vec<ShardSpan>, Vec<ShardSpan>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = n;
    for s in spans {
        if left >= s.len() {
            left -= s.len();
            head.push(s.clone());
        } else if left == 0 {
            tail.push(s.clone());
        } else {
            let cut = s.start + left;
            head.push(ShardSpan {
                shard: s.shard.clone(),
                start: s.start,
                end: cut,
            });
            tail.push(ShardSpan {
                shard: s.shard.clone(),
                start: cut,
                end: s.end,
            });
            left = 0;
        }
    }
    (head, tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn shards(sizes: &[u64]) -> Vec<ShardSize> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ShardSize {
                key: format!("shard-{i:05}.tar"),
                samples: n,
            })
            .collect()
    }

    /// How often each (shard, sample) appears in these spans.
    fn counts<'a>(spans: impl IntoIterator<Item = &'a ShardSpan>) -> BTreeMap<(String, u64), u32> {
        let mut c = BTreeMap::new();
        for s in spans {
            for i in s.start..s.end {
                *c.entry((s.shard.clone(), i)).or_default() += 1;
            }
        }
        c
    }

    fn every_sample_once(sizes: &[u64]) -> BTreeMap<(String, u64), u32> {
        let all: Vec<ShardSpan> = shards(sizes)
            .into_iter()
            .map(|s| ShardSpan {
                shard: s.key,
                start: 0,
                end: s.samples,
            })
            .collect();
        counts(&all)
    }

    #[test]
    fn an_epoch_is_balanced_and_covers_every_sample_once() {
        let sizes = [100, 37, 0, 64, 1, 250];
        let plan = plan_epoch(&shards(&sizes), 7, 3, 3);
        assert_eq!(plan.epoch, 3);
        let per_rank: Vec<u64> = (0..3).map(|r| plan.samples_of(r)).collect();
        assert_eq!(per_rank, vec![151, 151, 150]);
        assert_eq!(counts(plan.ranks.iter().flatten()), every_sample_once(&sizes));
        assert_eq!(plan.steps(32), 5);
    }

    #[test]
    fn the_order_depends_on_seed_and_epoch_only() {
        let s = shards(&[10, 20, 30, 40, 50, 60, 70, 80]);
        let mut reversed = s.clone();
        reversed.reverse();
        assert_eq!(plan_epoch(&s, 1, 0, 2), plan_epoch(&reversed, 1, 0, 2));
        assert_ne!(plan_epoch(&s, 1, 0, 2), plan_epoch(&s, 1, 1, 2));
        assert_ne!(plan_epoch(&s, 1, 0, 2), plan_epoch(&s, 2, 0, 2));
    }

    #[test]
    fn the_rest_after_a_failure_skips_exactly_what_was_consumed() {
        let sizes = [50, 50, 50, 50];
        let pos = DataPosition {
            plan: plan_epoch(&shards(&sizes), 1, 0, 2),
            steps: 3,
            batch_size: 16,
        };
        assert_eq!(pos.consumed_by(0), 48);
        let rest = pos.rest(3);
        assert_eq!(rest.steps, 0);
        assert_eq!(rest.plan.world_size(), 3);
        let mut seen = counts(pos.consumed().iter().flatten());
        for (k, v) in counts(rest.plan.ranks.iter().flatten()) {
            *seen.entry(k).or_default() += v;
        }
        assert_eq!(seen, every_sample_once(&sizes));
        // Nothing consumed, same world: the plan stands.
        let fresh = DataPosition::start(pos.plan.clone(), 16);
        assert_eq!(fresh.rest(2), fresh);
    }

    #[test]
    fn a_finished_position_leaves_nothing() {
        let plan = plan_epoch(&shards(&[10, 7]), 0, 0, 2);
        let pos = DataPosition {
            plan,
            steps: 3,
            batch_size: 4,
        };
        assert!(pos.is_finished());
        assert!(pos.unconsumed().is_empty());
        assert_eq!(pos.rest(2).plan.steps(4), 0);
    }

    proptest! {
        /// However often a run fails and resumes, at whatever step and with whatever world size,
        /// the samples consumed before each failure plus those of the final plan are every
        /// sample exactly once.
        #[test]
        fn failures_never_repeat_or_drop_a_sample(
            sizes in proptest::collection::vec(0u64..200, 1..8),
            seed in any::<u64>(),
            batch in 1u64..40,
            first_world in 1usize..6,
            failures in proptest::collection::vec((0u64..12, 1usize..6), 0..5),
        ) {
            let mut pos = DataPosition::start(plan_epoch(&shards(&sizes), seed, 0, first_world), batch);
            let mut seen: BTreeMap<(String, u64), u32> = BTreeMap::new();
            for (steps, world) in failures {
                pos.steps = steps.min(pos.plan.steps(batch));
                for (k, v) in counts(pos.consumed().iter().flatten()) {
                    *seen.entry(k).or_default() += v;
                }
                pos = pos.rest(world);
                let per_rank: Vec<u64> = (0..world).map(|r| pos.plan.samples_of(r)).collect();
                let (lo, hi) = (per_rank.iter().min().unwrap(), per_rank.iter().max().unwrap());
                prop_assert!(hi - lo <= 1, "unbalanced {per_rank:?}");
            }
            for (k, v) in counts(pos.plan.ranks.iter().flatten()) {
                *seen.entry(k).or_default() += v;
            }
            prop_assert_eq!(seen, every_sample_once(&sizes));
        }
    }
}
