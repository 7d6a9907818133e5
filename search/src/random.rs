//! Random search: each trial's parameters are drawn independently.
//!
//! Draw `i` uses its own ChaCha stream `i` of the spec's seed, so the state is just a counter
//! and the sequence of trials is the same however often the coordinator restarts.

use super::{SearchAction, SearchEvent, Searcher, Suggestion, read_state};
use crate::Result;
use chorus_core::TrialId;
use chorus_core::space::{Params, Space};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct RandomSearcher {
    space: Space,
    seed: u64,
    state: RandomState,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RandomState {
    drawn: u64,
}

impl RandomSearcher {
    pub fn new(space: Space, seed: u64, saved: Option<&serde_json::Value>) -> Result<Self> {
        let state = read_state("random", saved)?;
        Ok(RandomSearcher { space, seed, state })
    }

    /// The parameters of draw `index`.
    pub fn draw(&self, index: u64) -> Params {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        self.space.sample(&mut rng)
    }
}

impl Searcher for RandomSearcher {
    fn suggest(&mut self, _trial: TrialId) -> Suggestion {
        let p = self.draw(self.state.drawn);
        self.state.drawn += 1;
        Suggestion::Create(p)
    }

    fn observe(&mut self, _event: &SearchEvent) -> Vec<SearchAction> {
        Vec::new()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("random state serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::space::Param;

    #[test]
    fn draws_differ_and_depend_on_seed() {
        let mut space = Space::new();
        space.insert("lr".into(), Param::LogUniform { min: 1e-5, max: 1.0 });
        let a = RandomSearcher::new(space.clone(), 1, None).unwrap();
        let b = RandomSearcher::new(space, 2, None).unwrap();
        assert_ne!(a.draw(0), a.draw(1));
        assert_ne!(a.draw(0), b.draw(0));
        assert_eq!(a.draw(5), a.draw(5));
    }
}
