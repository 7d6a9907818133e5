//! Grid search: every point of the (discrete) space once, in a fixed order.

use super::{SearchAction, SearchEvent, Searcher, Suggestion, read_state};
use crate::Result;
use chorus_core::TrialId;
use chorus_core::space::{Space, grid_point};
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct GridSearcher {
    space: Space,
    state: GridState,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct GridState {
    /// Index of the next grid point; the point itself is recomputed from the space.
    next: u64,
}

impl GridSearcher {
    pub fn new(space: Space, saved: Option<&serde_json::Value>) -> Result<Self> {
        let state = read_state("grid", saved)?;
        Ok(GridSearcher { space, state })
    }
}

impl Searcher for GridSearcher {
    fn suggest(&mut self, _trial: TrialId) -> Suggestion {
        match grid_point(&self.space, self.state.next) {
            Some(p) => {
                self.state.next += 1;
                Suggestion::Create(p)
            }
            None => Suggestion::Exhausted,
        }
    }

    fn observe(&mut self, _event: &SearchEvent) -> Vec<SearchAction> {
        Vec::new()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("grid state serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::space::Param;

    #[test]
    fn visits_each_point_then_stops() {
        let mut space = Space::new();
        space.insert(
            "x".into(),
            Param::Categorical {
                values: vec![1.into(), 2.into()],
            },
        );
        space.insert("y".into(), Param::IntUniform { min: 0, max: 2 });
        let mut g = GridSearcher::new(space, None).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            let Suggestion::Create(p) = g.suggest(TrialId(0)) else {
                panic!("grid ended early")
            };
            assert!(seen.insert(serde_json::to_string(&p).unwrap()));
        }
        assert_eq!(g.suggest(TrialId(0)), Suggestion::Exhausted);
        assert_eq!(g.suggest(TrialId(0)), Suggestion::Exhausted);
    }
}
