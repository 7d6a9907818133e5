//! A searcher's saved state as a snapshot plus the journal of calls made on it since.
//!
//! Searchers are deterministic: the same calls on the same state give the same state. So
//! instead of saving the whole state after every report (whose size grows with the sweep for
//! rules that remember every report), each call that can change it is written as one small
//! journal entry, and the state is rebuilt by replaying the journal over the snapshot. A new
//! snapshot is taken once the journal since the last one outweighs it (and at least
//! [`MIN_SNAPSHOT_EVERY`] bytes), so replay stays short and the bytes written per report stay
//! flat: snapshot writes grow geometrically apart, their cost amortised over the entries.
//!
//! Calls that answer "nothing" (a `suggest` that says wait, a `promote` with nothing to
//! promote) change no searcher's state and are not written; a test replays every searcher to
//! hold them to that.

use chorus_core::TrialId;
use chorus_search::{SearchEvent, Searcher, Suggestion};
use serde::{Deserialize, Serialize};

/// Journal bytes that always fit before a snapshot is due.
pub const MIN_SNAPSHOT_EVERY: usize = 64 * 1024;

/// One call made on a searcher, as journalled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    Suggest {
        trial: TrialId,
    },
    Promote,
    Reported {
        trial: TrialId,
        step: Option<i64>,
        epoch: Option<f64>,
        value: f64,
    },
    Completed {
        trial: TrialId,
        value: Option<f64>,
        objectives: Vec<f64>,
    },
    Failed {
        trial: TrialId,
    },
}

impl Call {
    pub fn observed(event: &SearchEvent) -> Call {
        match event.clone() {
            SearchEvent::Reported {
                trial,
                step,
                epoch,
                value,
            } => Call::Reported {
                trial,
                step,
                epoch,
                value,
            },
            SearchEvent::Completed {
                trial,
                value,
                objectives,
            } => Call::Completed {
                trial,
                value,
                objectives,
            },
            SearchEvent::Failed { trial } => Call::Failed { trial },
        }
    }

    /// Makes the call again on a restored searcher; what it answers was acted on long ago.
    pub fn replay(&self, searcher: &mut dyn Searcher) {
        match self.clone() {
            Call::Suggest { trial } => {
                searcher.suggest(trial);
            }
            Call::Promote => {
                searcher.promote();
            }
            Call::Reported {
                trial,
                step,
                epoch,
                value,
            } => {
                searcher.observe(&SearchEvent::Reported {
                    trial,
                    step,
                    epoch,
                    value,
                });
            }
            Call::Completed {
                trial,
                value,
                objectives,
            } => {
                searcher.observe(&SearchEvent::Completed {
                    trial,
                    value,
                    objectives,
                });
            }
            Call::Failed { trial } => {
                searcher.observe(&SearchEvent::Failed { trial });
            }
        }
    }

    /// The calls of one stored journal entry: one call, or several written together (a JSON
    /// array, in order).
    pub fn parse_entry(entry: &str) -> serde_json::Result<Vec<Call>> {
        if entry.trim_start().starts_with('[') {
            serde_json::from_str(entry)
        } else {
            serde_json::from_str(entry).map(|c| vec![c])
        }
    }

    /// Whether a suggestion's call must be journalled: only one that changed the searcher.
    pub fn suggestion_counts(s: &Suggestion) -> bool {
        !matches!(s, Suggestion::Wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_core::spec::ValidSpec;
    use rand::{Rng, SeedableRng};

    fn spec(searcher: &str, extra: &str) -> ValidSpec {
        let (extra, scheduler) = extra.split_once(" | ").unwrap_or((extra, ""));
        // A grid needs discrete values; the others get a continuous range.
        let lr = if searcher == "grid" {
            "{values: [0.0001, 0.001, 0.01]}"
        } else {
            "{min: 0.0001, max: 0.1, distribution: log_uniform}"
        };
        let yaml = format!(
            "name: j\nmetric: {{name: loss, goal: minimize}}\nsearcher: {{name: {searcher}{extra}}}\n{scheduler}\n\
             max_trials: 40\nparallel_trials: 4\n\
             parameters:\n  lr: {lr}\n  width: {{values: [8, 16, 32]}}\n\
             trial: {{command: [\"true\"]}}\n"
        );
        chorus_core::spec::parse(&yaml, &[]).unwrap()
    }

    /// Drives a searcher with random calls, journalling as the experiment does, then rebuilds
    /// it from its first snapshot and the journal: the rebuilt state equals the live one, and
    /// both answer the next calls alike. This holds the "nothing answered, nothing changed"
    /// rule to every searcher.
    #[test]
    fn replaying_the_journal_rebuilds_every_searcher_exactly() {
        let cases = [
            spec("random", ""),
            spec("grid", ""),
            spec("tpe", ", n_startup_trials: 3"),
            spec("asha", ", max_resource: 9, grace_period: 1, reduction_factor: 3"),
            spec("hyperband", ", max_resource: 9, reduction_factor: 3"),
            spec("random", " | scheduler: {name: median, grace_period: 1, min_trials: 2}"),
            spec("pbt", ", population_size: 4, perturbation_interval: 2"),
        ];
        for (n, spec) in cases.iter().enumerate() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
            let mut live = chorus_search::build(spec);
            let first = live.save();
            let mut journal: Vec<String> = Vec::new();
            let mut created: Vec<TrialId> = Vec::new();
            let mut next = 1u64;
            for _ in 0..400 {
                match rng.random_range(0..10) {
                    0..=1 => {
                        let s = live.suggest(TrialId(next));
                        if Call::suggestion_counts(&s) {
                            journal.push(serde_json::to_string(&Call::Suggest { trial: TrialId(next) }).unwrap());
                        }
                        if matches!(s, Suggestion::Create(_)) {
                            created.push(TrialId(next));
                            next += 1;
                        }
                    }
                    2 => {
                        if live.promote().is_some() {
                            journal.push(serde_json::to_string(&Call::Promote).unwrap());
                        }
                    }
                    _ if created.is_empty() => {}
                    3 => {
                        let trial = created[rng.random_range(0..created.len())];
                        let event = SearchEvent::Completed {
                            trial,
                            value: Some(rng.random()),
                            objectives: Vec::new(),
                        };
                        live.observe(&event);
                        journal.push(serde_json::to_string(&Call::observed(&event)).unwrap());
                    }
                    _ => {
                        let trial = created[rng.random_range(0..created.len())];
                        let step = rng.random_range(1..12);
                        let event = SearchEvent::Reported {
                            trial,
                            step: Some(step),
                            epoch: Some(step as f64),
                            value: rng.random(),
                        };
                        live.observe(&event);
                        journal.push(serde_json::to_string(&Call::observed(&event)).unwrap());
                    }
                }
            }
            // Stored as the writer folds them: runs of calls in one entry.
            let mut stored = Vec::new();
            let mut rest = &journal[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=4).min(rest.len());
                let (run, tail) = rest.split_at(n);
                stored.push(if n == 1 {
                    run[0].clone()
                } else {
                    format!("[{}]", run.join(","))
                });
                rest = tail;
            }
            let mut rebuilt = chorus_search::restore(spec, &first).unwrap();
            for entry in &stored {
                for call in Call::parse_entry(entry).unwrap() {
                    call.replay(rebuilt.as_mut());
                }
            }
            assert_eq!(rebuilt.save(), live.save(), "case {n}: {:?}", spec.spec.searcher.name);
            assert_eq!(rebuilt.suggest(TrialId(next)), live.suggest(TrialId(next)), "case {n}");
        }
    }
}
