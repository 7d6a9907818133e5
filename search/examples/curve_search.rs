//! Searchers on recorded learning curves, in simulation: the quick, offline counterpart of
//! `bench/search_curves.sh` (which runs the same problems through a real coordinator and
//! workers against Optuna). Reads the tables `python bench/curves.py dump` writes, runs every
//! searcher given for `--seeds` seeds on each problem with a budget of `--budget` full
//! trainings and `--parallel` trials in flight (the simulator of `chorus search preview`,
//! reporting every epoch), and prints the mean and median regret of each, the share of runs
//! that beat random search, and the mean over problems.
//!
//! ```text
//! python bench/curves.py dump --to /tmp/curves
//! cargo run --release -p chorus-search --example curve_search -- /tmp/curves \
//!     --searcher '{name: asha}' --searcher '{name: hyperband}'
//! ```

use anyhow::{Context, Result};
use chorus_core::space::Params;
use chorus_search::preview::{Limits, run};
use clap::Parser;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// The folder of `<problem>.json` tables.
    tables: PathBuf,
    /// A searcher, as the spec's `searcher:` value (seed and max_resource are filled in),
    /// optionally after variants of successive halving to try, comma-separated, then `:`:
    /// `gN` (grace period N), `bN` (N brackets), `hb` (every bracket that fits, as Hyperband).
    #[arg(long)]
    searcher: Vec<String>,
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// The compute budget, in full trainings.
    #[arg(long, default_value_t = 100)]
    budget: u64,
    #[arg(long, default_value_t = 1)]
    parallel: u64,
    /// Only these problems (comma-separated).
    #[arg(long)]
    problems: Option<String>,
    /// Also the synthetic objectives of bench/search_regret.py (branin, hartmann6), whose
    /// curves all fall at one rate: early epochs rank them well.
    #[arg(long)]
    synthetic: bool,
    /// The budget in epochs instead of full trainings.
    #[arg(long)]
    budget_epochs: Option<u64>,
}

/// bench/search_regret.py's objectives: `final + scale * exp(-0.15 e)` plus noise shrinking as
/// `1/sqrt(e)`, 27 epochs; the searcher sees the noisy value, regret counts the clean one.
struct Synthetic {
    name: &'static str,
}

impl Synthetic {
    const EPOCHS: u64 = 27;

    fn space(&self) -> serde_json::Value {
        match self.name {
            "branin" => serde_json::json!({"x1": {"min": -5.0, "max": 10.0}, "x2": {"min": 0.0, "max": 15.0}}),
            _ => serde_json::Value::Object(
                (0..6)
                    .map(|i| (format!("x{i}"), serde_json::json!({"min": 0.0, "max": 1.0})))
                    .collect(),
            ),
        }
    }

    fn optimum(&self) -> f64 {
        if self.name == "branin" { 0.397887 } else { -3.32237 }
    }

    /// (clean, noisy) at `epoch`.
    fn value(&self, p: &Params, epoch: u64) -> (f64, f64) {
        use rand::{Rng, SeedableRng};
        use std::hash::{Hash, Hasher};
        let x = |k: &str| p[k].as_f64().unwrap_or(0.0);
        let (last, scale) = if self.name == "branin" {
            let (x1, x2) = (x("x1"), x("x2"));
            let pi = std::f64::consts::PI;
            let (b, c, t) = (5.1 / (4.0 * pi * pi), 5.0 / pi, 1.0 / (8.0 * pi));
            (
                (x2 - b * x1 * x1 + c * x1 - 6.0).powi(2) + 10.0 * (1.0 - t) * x1.cos() + 10.0,
                20.0,
            )
        } else {
            const A: [[f64; 6]; 4] = [
                [10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
                [0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
                [3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
                [17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
            ];
            const P: [[f64; 6]; 4] = [
                [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
                [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
                [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
                [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
            ];
            const ALPHA: [f64; 4] = [1.0, 1.2, 3.0, 3.2];
            let v = -(0..4)
                .map(|i| {
                    ALPHA[i]
                        * (-(0..6)
                            .map(|j| A[i][j] * (x(&format!("x{j}")) - P[i][j]).powi(2))
                            .sum::<f64>())
                        .exp()
                })
                .sum::<f64>();
            (v, 2.0)
        };
        let clean = last + scale * (-0.15 * epoch as f64).exp();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.name, serde_json::to_string(p).unwrap_or_default(), epoch).hash(&mut h);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(h.finish());
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
        let gauss = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (clean, clean + gauss * 0.05 * scale / (epoch as f64).sqrt())
    }
}

enum Problem {
    Table(Table),
    Synthetic(Synthetic),
}

impl Problem {
    fn name(&self) -> &str {
        match self {
            Problem::Table(t) => &t.problem,
            Problem::Synthetic(s) => s.name,
        }
    }
    fn epochs(&self) -> u64 {
        match self {
            Problem::Table(t) => t.epochs,
            Problem::Synthetic(_) => Synthetic::EPOCHS,
        }
    }
    fn space(&self) -> serde_json::Value {
        match self {
            Problem::Table(t) => serde_json::Value::Object(t.space.clone()),
            Problem::Synthetic(s) => s.space(),
        }
    }
    fn optimum(&self) -> f64 {
        match self {
            Problem::Table(t) => t.optimum(),
            Problem::Synthetic(s) => s.optimum(),
        }
    }
    /// (clean, noisy) at every epoch, first epoch first.
    fn curve(&self, p: &Params) -> Vec<(f64, f64)> {
        match self {
            Problem::Table(t) => t.curve(p).into_iter().map(|v| (v, v)).collect(),
            Problem::Synthetic(s) => (1..=Synthetic::EPOCHS).map(|e| s.value(p, e)).collect(),
        }
    }
}

#[derive(Deserialize)]
struct Table {
    problem: String,
    epochs: u64,
    space: serde_json::Map<String, serde_json::Value>,
    /// The parameters in the order of `points` and `scales`.
    names: Vec<String>,
    /// Each configuration's place in the unit cube, in the order of `space`.
    points: Vec<Vec<f64>>,
    curves: Vec<Vec<f64>>,
    /// How a parameter maps onto [0, 1]: (min, max, log).
    scales: Vec<(f64, f64, bool)>,
}

impl Table {
    fn optimum(&self) -> f64 {
        self.curves.iter().flatten().copied().fold(f64::INFINITY, f64::min)
    }

    /// The surrogate of bench/curves.py: inverse-distance weighting of the 4 nearest, for
    /// every epoch at once (one neighbour search per configuration).
    fn curve(&self, params: &Params) -> Vec<f64> {
        let x: Vec<f64> = self
            .names
            .iter()
            .zip(&self.scales)
            .map(|(k, &(lo, hi, log))| {
                let v = params.get(k).and_then(|v| v.as_f64()).unwrap_or(lo);
                let (v, lo, hi) = if log { (v.ln(), lo.ln(), hi.ln()) } else { (v, lo, hi) };
                ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
            })
            .collect();
        let mut near: Vec<(f64, usize)> = self
            .points
            .iter()
            .enumerate()
            .map(|(i, q)| (x.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum(), i))
            .collect();
        near.sort_by(|a, b| a.0.total_cmp(&b.0));
        near.truncate(4);
        if near[0].0 < 1e-12 {
            return self.curves[near[0].1].clone();
        }
        let total: f64 = near.iter().map(|(d, _)| 1.0 / d).sum();
        (0..self.epochs as usize)
            .map(|e| near.iter().map(|(d, i)| self.curves[*i][e] / d).sum::<f64>() / total)
            .collect()
    }
}

/// The spec's searcher with `variants` applied (see `--searcher`).
fn variant(spec: &chorus_core::spec::ValidSpec, variants: &str) -> Result<Box<dyn chorus_search::Searcher>> {
    use chorus_search::{AshaSearcher, AshaSettings};
    if variants.is_empty() {
        return Ok(chorus_search::build(spec));
    }
    let s = &spec.spec.searcher;
    let mut settings = AshaSettings::from_spec(s);
    for v in variants.split(',') {
        match v {
            "hb" => {
                let mut n = 1;
                let mut r = settings.grace_period;
                while r * u64::from(settings.reduction_factor) <= settings.max_resource {
                    r *= u64::from(settings.reduction_factor);
                    n += 1;
                }
                settings.brackets = n;
            }
            g if g.starts_with('g') => settings.grace_period = g[1..].parse()?,
            b if b.starts_with('b') => settings.brackets = b[1..].parse()?,
            other => anyhow::bail!("unknown variant {other}"),
        }
    }
    Ok(Box::new(AshaSearcher::new(
        spec.space.clone(),
        s.seed,
        chorus_core::spec::Goal::Minimize,
        settings,
        None,
    )?))
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut searchers = vec!["{name: random}".to_string()];
    searchers.extend(args.searcher.iter().cloned());
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&args.tables)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    paths.sort();
    let wanted: Option<Vec<&str>> = args.problems.as_deref().map(|p| p.split(',').collect());
    // Per searcher: each problem's mean regret, and runs that beat random search.
    let mut means = vec![Vec::new(); searchers.len()];
    let mut beats = vec![(0u32, 0u32); searchers.len()];
    println!(
        "budget {} full trainings, {} in flight, {} seeds; regret mean / median",
        args.budget, args.parallel, args.seeds
    );
    let mut problems = Vec::new();
    for path in paths.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let table: Table =
            serde_json::from_slice(&std::fs::read(path)?).with_context(|| format!("reading {}", path.display()))?;
        problems.push(Problem::Table(table));
    }
    if args.synthetic {
        problems.extend(["branin", "hartmann6"].map(|name| Problem::Synthetic(Synthetic { name })));
    }
    for table in &problems {
        if wanted.as_ref().is_some_and(|w| !w.contains(&table.name())) {
            continue;
        }
        let optimum = table.optimum();
        let mut random = Vec::new();
        let mut line = format!("{:<16}", table.name());
        for (k, searcher) in searchers.iter().enumerate() {
            let mut regrets = Vec::new();
            for seed in 0..args.seeds {
                let (variants, searcher) = searcher
                    .split_once(':')
                    .filter(|(v, _)| !v.contains('{'))
                    .unwrap_or(("", searcher));
                let adaptive = searcher.contains("asha") || searcher.contains("hyperband");
                let fill = match adaptive {
                    true => format!("{{seed: {seed}, max_resource: {}, ", table.epochs()),
                    false => format!("{{seed: {seed}, "),
                };
                let searcher = searcher.replacen('{', &fill, 1);
                let yaml = format!(
                    "name: sim\nmetric: {{name: loss, goal: minimize}}\nsearcher: {searcher}\nmax_trials: 100000\n\
                     parallel_trials: {}\nparameters: {}\ntrial: {{command: [x]}}\n",
                    args.parallel,
                    table.space()
                );
                let spec = chorus_core::spec::parse(&yaml, &[]).with_context(|| yaml.clone())?;
                let limits = Limits {
                    max_trials: 100_000,
                    steps: table.epochs(),
                    budget: args.budget_epochs.unwrap_or(args.budget * table.epochs()),
                };
                // Regret counts the best clean value reported (bench/search_regret.py's rule).
                let mut best = f64::INFINITY;
                // A trial asks for each of its epochs in turn: its curve is worked out once.
                let mut curves: std::collections::HashMap<String, Vec<(f64, f64)>> = Default::default();
                let mut source = |p: &Params, e: u64| {
                    let key = serde_json::to_string(p).unwrap_or_default();
                    let curve = curves.entry(key).or_insert_with(|| table.curve(p));
                    let (clean, noisy) = curve[(e.clamp(1, curve.len() as u64) - 1) as usize];
                    best = best.min(clean);
                    noisy
                };
                run(variant(&spec, variants)?, &spec, limits, &mut source);
                regrets.push(best - optimum);
            }
            if k == 0 {
                random = regrets.clone();
            } else {
                let won = regrets.iter().zip(&random).filter(|(a, b)| a < b).count() as u32;
                beats[k].0 += won;
                beats[k].1 += regrets.len() as u32;
            }
            let mean = regrets.iter().sum::<f64>() / regrets.len() as f64;
            means[k].push(mean);
            line += &format!(" | {mean:.4} / {:.4}", median(&regrets));
        }
        println!("{line}");
    }
    for (k, s) in searchers.iter().enumerate() {
        let m = means[k].iter().sum::<f64>() / means[k].len().max(1) as f64;
        println!(
            "{s}: mean over problems {m:.4}, beats random in {} of {} runs",
            beats[k].0, beats[k].1
        );
    }
    Ok(())
}
