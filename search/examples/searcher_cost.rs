//! Searcher cost per suggestion: the TPE searcher fed N completed trials (random parameters over
//! a mixed space, values from a synthetic objective), then timed over further suggestions, each
//! followed by its completion as a live search would. `bench/searcher_cost.py` does the same with
//! Optuna's TPE sampler.
//!
//! cargo run --release -p chorus-search --example searcher_cost -- --history 1000 --suggestions 20

use chorus_core::TrialId;
use chorus_search::{SearchEvent, Searcher, Suggestion, preview};
use clap::Parser;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Completed trials before timing.
    #[arg(long, default_value_t = 1000)]
    history: u64,
    /// Suggestions timed.
    #[arg(long, default_value_t = 20)]
    suggestions: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

const SPEC: &str = r#"
name: cost
metric: {name: loss, goal: minimize}
searcher: {name: tpe, seed: 1}
max_trials: 1000000
parameters:
  lr: {min: 0.00001, max: 0.1, distribution: log_uniform}
  dropout: {min: 0.0, max: 0.5}
  layers: {min: 1, max: 8}
  width: {values: [64, 128, 256, 512]}
  momentum: {min: 0.5, max: 0.99}
  optimizer: {values: [sgd, adam, adamw]}
trial: {command: [x]}
"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = chorus_core::spec::parse(SPEC, &[])?;
    let mut s = chorus_search::build(&spec);
    let mut next = 1u64;
    let mut step = |s: &mut Box<dyn Searcher>| {
        let t = TrialId(next);
        next += 1;
        let Suggestion::Create(params) = s.suggest(t) else {
            unreachable!("tpe always suggests")
        };
        let v = preview::objective(&spec.space, &params, args.seed);
        s.observe(&SearchEvent::Completed {
            trial: t,
            value: Some(v),
            objectives: Vec::new(),
        });
    };
    for _ in 0..args.history {
        step(&mut s);
    }
    let mut times = Vec::new();
    for _ in 0..args.suggestions {
        let start = Instant::now();
        step(&mut s);
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!("ms_per_suggestion={:.4}", times[times.len() / 2]);
    Ok(())
}
