//! Parameter importance: how strongly each parameter alone goes with the metric.
//!
//! For a numeric parameter, the absolute Spearman rank correlation between its values and the
//! metric (monotone relations count, whatever their shape); for a categorical one, the
//! correlation ratio eta of the metric by level. Both lie in [0, 1]. Each parameter is measured
//! alone, over the trials that have it: interactions between parameters, and non-monotone
//! effects of a numeric one (best in the middle of its range), are not seen.

use crate::parallel::level_name;
use crate::{
    Drawn, DrawnBar, ParallelInput, PlotError, Render, Scale, Value, correlation_ratio, draw_err, fmt_num, render_to,
    spearman,
};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// |Spearman's rho| of a numeric parameter and the metric.
    AbsSpearman,
    /// The correlation ratio eta of the metric by a categorical parameter's level.
    Eta,
}

/// One parameter's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Importance {
    pub param: String,
    pub measure: Measure,
    /// `None` when it cannot be measured: fewer than 3 trials have it, it took one value, or the
    /// metric was the same for all of them.
    pub value: Option<f64>,
    /// Trials that have the parameter (and the metric).
    pub trials: usize,
}

/// Every axis's score, highest first, the unmeasurable last (by name).
pub fn importance_scores(input: &ParallelInput) -> Vec<Importance> {
    let mut out: Vec<Importance> = input
        .axes
        .iter()
        .map(|axis| {
            let have: Vec<(&Value, f64)> = input
                .trials
                .iter()
                .filter(|t| t.metric.is_finite())
                .filter_map(|t| Some((t.params.get(&axis.name)?, t.metric)))
                .collect();
            let ys: Vec<f64> = have.iter().map(|h| h.1).collect();
            let (measure, value) = match axis.scale {
                Scale::Levels(_) => {
                    let levels: Vec<String> = have.iter().map(|h| level_name(h.0)).collect();
                    (Measure::Eta, correlation_ratio(&levels, &ys))
                }
                Scale::Linear | Scale::Log => {
                    // Spearman is rank-based, so a log scale changes nothing.
                    let pairs: Vec<(f64, f64)> = have
                        .iter()
                        .filter_map(|(v, y)| match v {
                            Value::Num(n) => Some((*n, *y)),
                            Value::Cat(_) => None,
                        })
                        .collect();
                    let xs: Vec<f64> = pairs.iter().map(|p| p.0).collect();
                    let ys: Vec<f64> = pairs.iter().map(|p| p.1).collect();
                    (Measure::AbsSpearman, spearman(&xs, &ys).map(f64::abs))
                }
            };
            Importance {
                param: axis.name.clone(),
                measure,
                value,
                trials: have.len(),
            }
        })
        .collect();
    out.sort_by(|a, b| match (a.value, b.value) {
        (Some(x), Some(y)) => y.total_cmp(&x).then_with(|| a.param.cmp(&b.param)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.param.cmp(&b.param),
    });
    out
}

struct Bars<'a> {
    scores: &'a [Importance],
    metric: &'a str,
}

/// Draws the measurable scores of `input`'s parameters as bars, highest first, to `path`.
pub fn importance(input: &ParallelInput, path: &Path) -> Result<(Drawn, Vec<Importance>), PlotError> {
    let scores = importance_scores(input);
    if scores.iter().all(|s| s.value.is_none()) {
        return Err(PlotError::Empty(format!(
            "no parameter's importance can be measured: it needs at least 3 trials with {:?}, a parameter that varies and a metric that does",
            input.metric
        )));
    }
    let drawn = render_to(
        "importance",
        &input.title,
        path,
        &Bars {
            scores: &scores,
            metric: &input.metric,
        },
    )?;
    Ok((drawn, scores))
}

impl Render for Bars<'_> {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, drawn: &mut Drawn) -> Result<(), PlotError> {
        let bars: Vec<(String, f64, Measure)> = self
            .scores
            .iter()
            .filter_map(|s| Some((s.param.clone(), s.value?, s.measure)))
            .collect();
        let n = bars.len();
        let x = (-0.5, n as f64 - 0.5);
        let y = (0.0, 1.05);
        drawn.x_range = x;
        drawn.y_range = y;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(&drawn.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1))
            .x_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(format!("importance for {} (|Spearman| or eta)", self.metric))
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(draw_err)?;
        for (i, (name, v, measure)) in bars.iter().enumerate() {
            let xi = i as f64;
            let colour = match measure {
                Measure::AbsSpearman => RGBColor(31, 119, 180),
                Measure::Eta => RGBColor(255, 127, 14),
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(xi - 0.35, 0.0), (xi + 0.35, *v)],
                    colour.filled(),
                )))
                .map_err(draw_err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    fmt_num(*v),
                    (xi - 0.1, *v + 0.03),
                    ("sans-serif", 14),
                )))
                .map_err(draw_err)?;
            drawn.bars.push(DrawnBar {
                label: name.clone(),
                value: *v,
            });
        }
        drawn.axes = names.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::check_file;
    use crate::{Axis, TrialPoint};
    use std::collections::BTreeMap;

    fn input() -> ParallelInput {
        // lr decides the metric monotonically (rank correlation -1); the optimizer partly
        // (adam trials better on average); `seed` is constant.
        let rows = [
            (1e-4, "adam", 0.9),
            (1e-3, "adam", 0.8),
            (1e-2, "sgd", 0.5),
            (1e-1, "sgd", 0.45),
        ];
        let trials = rows
            .iter()
            .enumerate()
            .map(|(i, (lr, o, m))| TrialPoint {
                trial: i as u64,
                params: BTreeMap::from([
                    ("lr".to_string(), Value::Num(*lr)),
                    ("optimizer".to_string(), Value::Cat(o.to_string())),
                    ("seed".to_string(), Value::Num(7.0)),
                ]),
                metric: *m,
            })
            .collect();
        ParallelInput {
            title: "importance".into(),
            metric: "accuracy".into(),
            axes: vec![
                Axis {
                    name: "lr".into(),
                    scale: Scale::Log,
                },
                Axis {
                    name: "optimizer".into(),
                    scale: Scale::Levels(vec!["adam".into(), "sgd".into()]),
                },
                Axis {
                    name: "seed".into(),
                    scale: Scale::Linear,
                },
            ],
            trials,
        }
    }

    #[test]
    fn scores_are_sorted_and_the_constant_parameter_is_unmeasured() {
        let s = importance_scores(&input());
        assert_eq!(
            s.iter().map(|i| i.param.as_str()).collect::<Vec<_>>(),
            vec!["lr", "optimizer", "seed"]
        );
        assert_eq!(s[0].measure, Measure::AbsSpearman);
        assert!((s[0].value.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(s[1].measure, Measure::Eta);
        // adam 0.9, 0.8 (mean 0.85); sgd 0.5, 0.45 (mean 0.475); grand mean 0.6625.
        let total: f64 = [0.9, 0.8, 0.5, 0.45].iter().map(|v: &f64| (v - 0.6625).powi(2)).sum();
        let between = 2.0 * (0.85f64 - 0.6625).powi(2) + 2.0 * (0.475f64 - 0.6625).powi(2);
        assert!((s[1].value.unwrap() - (between / total).sqrt()).abs() < 1e-12);
        assert_eq!(s[2].value, None);
        assert_eq!(s[2].trials, 4);
    }

    #[test]
    fn bars_are_drawn_for_the_measured_only() {
        let dir = tempfile::tempdir().unwrap();
        let (drawn, scores) = importance(&input(), &dir.path().join("i.png")).unwrap();
        check_file(&drawn);
        assert_eq!(drawn.bars.len(), 2);
        assert_eq!(drawn.bars[0].label, "lr");
        assert_eq!(Some(drawn.bars[1].value), scores[1].value);
    }
}
