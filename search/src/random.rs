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
    /// Points an earlier experiment already tried (as canonical JSON), when warm-started.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    tried: std::collections::BTreeSet<String>,
}

/// Draws skipped in a row for repeating a point already tried before one is taken anyway (a
/// small discrete space may hold nothing new).
const MAX_SKIPPED: u32 = 1_000;

fn point_key(p: &Params) -> String {
    serde_json::to_string(p).expect("params serialise")
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
        let mut p = self.draw(self.state.drawn);
        self.state.drawn += 1;
        let mut skipped = 0;
        while skipped < MAX_SKIPPED && self.state.tried.contains(&point_key(&p)) {
            p = self.draw(self.state.drawn);
            self.state.drawn += 1;
            skipped += 1;
        }
        Suggestion::Create(p)
    }

    fn warm_start(&mut self, prior: &[crate::Prior]) -> bool {
        self.state.tried.extend(prior.iter().map(|p| point_key(&p.params)));
        true
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
    fn warm_started_draws_skip_points_already_tried() {
        use serde_json::json;
        let mut space = Space::new();
        space.insert(
            "k".into(),
            Param::Categorical {
                values: (0..4).map(|i| json!(i)).collect(),
            },
        );
        let cold = RandomSearcher::new(space.clone(), 3, None).unwrap();
        let prior: Vec<crate::Prior> = (0..3)
            .map(|i| crate::Prior {
                trial: TrialId(i + 1),
                params: [("k".to_string(), json!(i))].into_iter().collect(),
                value: 0.0,
            })
            .collect();
        // A cold searcher draws the tried points too.
        assert!((0..20).any(|i| cold.draw(i)["k"] != json!(3)));
        let mut cold = cold;
        assert!(!(0..20).all(|t| matches!(cold.suggest(TrialId(t)), Suggestion::Create(p) if p["k"] == json!(3))));
        let mut warm = RandomSearcher::new(space.clone(), 3, None).unwrap();
        assert!(warm.warm_start(&prior));
        let saved = warm.save();
        let mut warm = RandomSearcher::new(space, 3, Some(&saved)).unwrap();
        for t in 0..10 {
            let Suggestion::Create(p) = warm.suggest(TrialId(100 + t)) else {
                panic!("random always creates")
            };
            assert_eq!(p["k"], json!(3), "draw {t} repeats a tried point");
        }
    }

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
