//! `chorus plot` on a real sweep: the pictures are written in the format their name asks for,
//! and what they show (`--describe`) is the sweep's trials and their reports.

use super::*;
use std::collections::BTreeSet;
use std::path::Path;

/// Every trial reports four steps of `loss` and `acc`, both decided by its parameters, and at the
/// last step first a confusion matrix, as the builtin trainer does.
const SWEEP: &str = r#"
name: e2e-plot
metric: {name: loss, goal: minimize}
parameters:
  lr: {min: 0.0001, max: 0.1, distribution: log_uniform}
  optimizer: {values: [adam, sgd]}
  width: {min: 1, max: 8, distribution: int_uniform}
searcher: {name: random, seed: 7}
max_trials: 5
parallel_trials: 3
trial:
  command: [sh, -c, 'pen=0; [ "${params.optimizer}" = sgd ] && pen=5; for s in 1 2 3 4; do [ $s = 4 ] && echo "chorus:metric {\"step\": 4, \"confusion.cat.cat\": 3, \"confusion.cat.dog\": 1, \"confusion.dog.cat\": 0, \"confusion.dog.dog\": ${params.width}}"; echo "chorus:metric {\"step\": $s, \"loss\": $(( ${params.width} * 12 / s + pen )), \"acc\": $(( 50 + ${params.width} * 5 - pen ))}"; done']
"#;

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is no PNG", path.display());
    let be = |r: std::ops::Range<usize>| u32::from_be_bytes(b[r].try_into().unwrap());
    (be(16..20), be(20..24))
}

#[test]
fn curves_parallel_importance_pareto_and_confusion_of_a_sweep() {
    let c = TestCluster::start(Default::default()).unwrap();
    let id = submit_and_wait(&c, "plot.yaml", SWEEP);
    let exp = id.to_string();
    let ts = trials(&c, id);
    assert_eq!(ts.len(), 5);
    let ids: BTreeSet<u64> = ts.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    // Curves: one line per trial with exactly its four reports; the best trial highlighted.
    let png = file("curves.png");
    let d = c
        .chorus_json(&["plot", "curves", &exp, "--metric", "loss", "--out", &png, "--describe"])
        .unwrap();
    assert_eq!(
        png_size(Path::new(&png)),
        (
            d["width"].as_u64().unwrap() as u32,
            d["height"].as_u64().unwrap() as u32
        )
    );
    let series = d["series"].as_array().unwrap();
    assert_eq!(series.len(), ts.len(), "{d}");
    for (s, t) in series.iter().zip(&ts) {
        let w = t["params"]["width"].as_i64().unwrap();
        let pen = if t["params"]["optimizer"] == "sgd" { 5 } else { 0 };
        let expected: Vec<(f64, f64)> = (1..=4).map(|s| (s as f64, (w * 12 / s + pen) as f64)).collect();
        let got: Vec<(f64, f64)> = s["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        assert_eq!(s["trial"], t["id"]);
        assert_eq!(got, expected, "trial {}", t["id"]);
    }
    let best = ts
        .iter()
        .min_by(|a, b| {
            a["best_value"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["best_value"].as_f64().unwrap())
        })
        .unwrap();
    let best_value = best["best_value"].as_f64().unwrap();
    let highlighted = d["highlighted"].as_array().unwrap();
    assert_eq!(highlighted.len(), 1, "{d}");
    let h = ts.iter().find(|t| t["id"] == highlighted[0]).unwrap();
    assert_eq!(
        h["best_value"].as_f64(),
        Some(best_value),
        "a best trial is highlighted"
    );

    // Parallel coordinates, as SVG: an axis per parameter plus the metric, a line per trial
    // coloured by its best loss.
    let svg = file("parallel.svg");
    let d = c
        .chorus_json(&["plot", "parallel", &exp, "--out", &svg, "--describe"])
        .unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    assert_eq!(d["axes"], serde_json::json!(["lr", "optimizer", "width", "loss"]));
    let series = d["series"].as_array().unwrap();
    assert_eq!(series.len(), ts.len());
    let drawn: BTreeSet<u64> = series.iter().map(|s| s["trial"].as_u64().unwrap()).collect();
    assert_eq!(drawn, ids);
    for (s, t) in series.iter().zip(&ts) {
        assert_eq!(s["colour_value"].as_f64(), t["best_value"].as_f64());
        assert_eq!(s["points"].as_array().unwrap().len(), 4);
        // adam is the first level, sgd the second: 0 and 1 on the optimizer axis.
        let y = s["points"][1][1].as_f64().unwrap();
        assert_eq!(y, if t["params"]["optimizer"] == "sgd" { 1.0 } else { 0.0 });
    }

    // Importance: one score per parameter, each in [0, 1], bars sorted.
    let png = file("importance.png");
    let d = c
        .chorus_json(&["plot", "importance", &exp, "--out", &png, "--describe"])
        .unwrap();
    png_size(Path::new(&png));
    let scores = d["importance"].as_array().unwrap();
    let names: BTreeSet<&str> = scores.iter().map(|s| s["param"].as_str().unwrap()).collect();
    assert_eq!(names, BTreeSet::from(["lr", "optimizer", "width"]));
    let measure = |p: &str| scores.iter().find(|s| s["param"] == p).unwrap()["measure"].clone();
    assert_eq!(measure("optimizer"), "eta");
    assert_eq!(measure("width"), "abs_spearman");
    let bars: Vec<f64> = d["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["value"].as_f64().unwrap())
        .collect();
    assert!(!bars.is_empty());
    assert!(bars.iter().all(|v| (0.0..=1.0).contains(v)), "{bars:?}");
    assert!(bars.windows(2).all(|w| w[0] >= w[1]), "{bars:?}");

    // Pareto: loss (the objective, minimised) against acc (maximised); the front is the trials
    // no other trial beats on both.
    let png = file("pareto.png");
    let d = c
        .chorus_json(&[
            "plot",
            "pareto",
            &exp,
            "--metrics",
            "loss,acc:max",
            "--out",
            &png,
            "--describe",
        ])
        .unwrap();
    png_size(Path::new(&png));
    let front: Vec<u64> = d["highlighted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let point = |t: &serde_json::Value| (t["best_value"].as_f64().unwrap(), t["last_metrics"]["acc"].as_f64());
    for t in &ts {
        let (l, a) = point(t);
        let Some(a) = a else { continue };
        let dominated = ts.iter().any(|o| {
            let (ol, oa) = point(o);
            oa.is_some_and(|oa| ol <= l && oa >= a && (ol < l || oa > a))
        });
        assert_eq!(
            front.contains(&t["id"].as_u64().unwrap()),
            !dominated,
            "trial {} in {front:?}",
            t["id"]
        );
    }
    // Without a goal for a metric that is no objective, the CLI asks for one.
    let out = c.chorus(&["plot", "pareto", &exp, "--metrics", "loss,acc", "--out", &png]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("acc:max"), "{out:?}");

    // The confusion matrix of a trial's last report of one.
    let t = &ts[0];
    let png = file("confusion.png");
    let d = c
        .chorus_json(&["plot", "confusion", &t["id"].to_string(), "--out", &png, "--describe"])
        .unwrap();
    png_size(Path::new(&png));
    assert_eq!(d["axes"], serde_json::json!(["cat", "dog"]));
    let w = t["params"]["width"].as_f64().unwrap();
    assert_eq!(d["cells"], serde_json::json!([[3.0, 1.0], [0.0, w]]));

    // A picture format the name does not name is refused before anything is drawn.
    let out = c.chorus(&["plot", "curves", &exp, "--out", &file("curves.jpg")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(".png or .svg"), "{out:?}");
}

/// An ASHA sweep that decides once at each rung: trials report nine steps (a stopped trial
/// fewer).
const ASHA: &str = r#"
name: e2e-plot-asha
metric: {name: loss, goal: minimize}
parameters:
  width: {min: 1, max: 8, distribution: int_uniform}
searcher: {name: asha, max_resource: 9, grace_period: 1, reduction_factor: 3, stop_once: true, sampler: random, seed: 3}
max_trials: 4
parallel_trials: 2
trial:
  command: [sh, -c, 'for s in 1 2 3 4 5 6 7 8 9; do echo "chorus:metric {\"step\": $s, \"loss\": $(( ${params.width} * 12 / s ))}"; sleep 0.05; done']
"#;

#[test]
fn curves_of_an_asha_sweep_mark_its_rungs() {
    let c = TestCluster::start(Default::default()).unwrap();
    let id = submit_and_wait(&c, "asha.yaml", ASHA);
    let ts = trials(&c, id);
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("asha.svg");
    let d = c
        .chorus_json(&[
            "plot",
            "curves",
            &id.to_string(),
            "--out",
            svg.to_str().unwrap(),
            "--describe",
        ])
        .unwrap();
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    // Rungs at 1 and 3 (grace 1, factor 3, below the maximum 9).
    assert_eq!(d["markers"], serde_json::json!([1.0, 3.0]), "{d}");
    assert_eq!(d["series"].as_array().unwrap().len(), ts.len());
    for (s, t) in d["series"].as_array().unwrap().iter().zip(&ts) {
        let steps: Vec<f64> = s["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_f64().unwrap())
            .collect();
        let last = steps.last().copied().unwrap();
        assert_eq!(
            steps,
            (1..=last as i64).map(|s| s as f64).collect::<Vec<_>>(),
            "trial {}",
            t["id"]
        );
    }
}
