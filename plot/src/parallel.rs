//! Parallel coordinates: one vertical axis per parameter and one for the metric, each trial a
//! polyline across them, coloured by its metric value (with a colour bar).
//!
//! Every axis is scaled to [0, 1]: numeric parameters linearly between the values seen (log
//! parameters on a log scale), categorical ones as evenly spaced levels. A trial without a
//! parameter (a conditional one that was inactive) has no point on that axis; its line joins the
//! axes it has.

use crate::{Drawn, DrawnSeries, PlotError, Render, draw_err, extent, fmt_num, ramp, render_to};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// One parameter value of a trial.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Num(f64),
    Cat(String),
}

/// How a parameter's axis is scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum Scale {
    Linear,
    Log,
    /// Categorical: these levels, evenly spaced in this order.
    Levels(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub name: String,
    pub scale: Scale,
}

impl Axis {
    /// Axes for every parameter the trials have, by name, when the search space is not known: a
    /// parameter with a non-numeric value is categorical (levels in sorted order), any other
    /// linear.
    pub fn infer(trials: &[TrialPoint]) -> Vec<Axis> {
        let mut seen: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
        for t in trials {
            for (k, v) in &t.params {
                seen.entry(k).or_default().push(v);
            }
        }
        seen.into_iter()
            .map(|(name, vals)| {
                let scale = if vals.iter().all(|v| matches!(v, Value::Num(_))) {
                    Scale::Linear
                } else {
                    let mut levels: Vec<String> = vals.iter().map(|v| level_name(v)).collect();
                    levels.sort();
                    levels.dedup();
                    Scale::Levels(levels)
                };
                Axis {
                    name: name.to_string(),
                    scale,
                }
            })
            .collect()
    }
}

/// The level a value stands for on a categorical axis.
pub(crate) fn level_name(v: &Value) -> String {
    match v {
        Value::Num(n) => fmt_num(*n),
        Value::Cat(s) => s.clone(),
    }
}

/// One trial: its parameters and its metric value.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialPoint {
    pub trial: u64,
    pub params: BTreeMap<String, Value>,
    pub metric: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParallelInput {
    pub title: String,
    pub metric: String,
    pub axes: Vec<Axis>,
    pub trials: Vec<TrialPoint>,
}

/// Draws `input` to `path` (.png or .svg).
pub fn parallel(input: &ParallelInput, path: &Path) -> Result<Drawn, PlotError> {
    if input.trials.is_empty() {
        return Err(PlotError::Empty(format!("no trial has a value of {:?}", input.metric)));
    }
    render_to("parallel", &input.title, path, input)
}

/// Maps one axis's values to [0, 1].
struct Scaler {
    lo: f64,
    hi: f64,
    log: bool,
    levels: Option<Vec<String>>,
}

impl Scaler {
    fn new(axis: &Axis, trials: &[TrialPoint]) -> Scaler {
        let nums = || {
            trials.iter().filter_map(|t| match t.params.get(&axis.name) {
                Some(Value::Num(n)) => Some(*n),
                _ => None,
            })
        };
        match &axis.scale {
            Scale::Levels(l) => Scaler {
                lo: 0.0,
                hi: 1.0,
                log: false,
                levels: Some(l.clone()),
            },
            Scale::Log => {
                let (lo, hi) = extent(nums().filter(|n| *n > 0.0).map(f64::ln)).unwrap_or((0.0, 1.0));
                Scaler {
                    lo,
                    hi,
                    log: true,
                    levels: None,
                }
            }
            Scale::Linear => {
                let (lo, hi) = extent(nums()).unwrap_or((0.0, 1.0));
                Scaler {
                    lo,
                    hi,
                    log: false,
                    levels: None,
                }
            }
        }
    }

    fn metric(trials: &[TrialPoint]) -> Scaler {
        let (lo, hi) = extent(trials.iter().map(|t| t.metric)).unwrap_or((0.0, 1.0));
        Scaler {
            lo,
            hi,
            log: false,
            levels: None,
        }
    }

    fn scale_num(&self, v: f64) -> Option<f64> {
        let v = if self.log { (v > 0.0).then(|| v.ln())? } else { v };
        if !v.is_finite() {
            return None;
        }
        Some(if self.hi > self.lo {
            (v - self.lo) / (self.hi - self.lo)
        } else {
            0.5
        })
    }

    fn scale(&self, v: &Value) -> Option<f64> {
        match &self.levels {
            Some(levels) => {
                let i = levels.iter().position(|l| *l == level_name(v))?;
                Some(if levels.len() > 1 {
                    i as f64 / (levels.len() - 1) as f64
                } else {
                    0.5
                })
            }
            None => match v {
                Value::Num(n) => self.scale_num(*n),
                Value::Cat(_) => None,
            },
        }
    }

    /// Labels at the bottom and top of the axis (every level for a categorical one), with their
    /// positions.
    fn ticks(&self) -> Vec<(f64, String)> {
        match &self.levels {
            Some(levels) => levels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        if levels.len() > 1 {
                            i as f64 / (levels.len() - 1) as f64
                        } else {
                            0.5
                        },
                        l.clone(),
                    )
                })
                .collect(),
            None => {
                let un = |v: f64| if self.log { v.exp() } else { v };
                if self.hi > self.lo {
                    vec![(0.0, fmt_num(un(self.lo))), (1.0, fmt_num(un(self.hi)))]
                } else {
                    vec![(0.5, fmt_num(un(self.lo)))]
                }
            }
        }
    }
}

impl Render for ParallelInput {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, drawn: &mut Drawn) -> Result<(), PlotError> {
        let n_axes = self.axes.len() + 1;
        let scalers: Vec<Scaler> = self.axes.iter().map(|a| Scaler::new(a, &self.trials)).collect();
        let metric = Scaler::metric(&self.trials);
        let x = (-0.3, (n_axes - 1) as f64 + 0.3);
        let y = (-0.08, 1.08);
        drawn.x_range = x;
        drawn.y_range = y;
        drawn.axes = self
            .axes
            .iter()
            .map(|a| a.name.clone())
            .chain([self.metric.clone()])
            .collect();

        let (main, bar) = root.split_horizontally(WIDTH_MAIN);
        let mut chart = ChartBuilder::on(&main)
            .caption(&self.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(10)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(draw_err)?;
        let names = drawn.axes.clone();
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_y_axis()
            .x_labels(n_axes)
            .x_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(draw_err)?;

        // The lines first, worst first, so the best are on top.
        let mut order: Vec<&TrialPoint> = self.trials.iter().collect();
        order.sort_by(|a, b| a.metric.total_cmp(&b.metric));
        for t in order {
            let m = metric.scale_num(t.metric);
            let mut points: Vec<(f64, f64)> = self
                .axes
                .iter()
                .zip(&scalers)
                .enumerate()
                .filter_map(|(i, (a, s))| Some((i as f64, s.scale(t.params.get(&a.name)?)?)))
                .collect();
            if let Some(m) = m {
                points.push(((n_axes - 1) as f64, m));
            }
            let colour = ramp(m.unwrap_or(0.0));
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    ShapeStyle::from(&colour.mix(0.8)).stroke_width(2),
                ))
                .map_err(draw_err)?;
            drawn.series.push(DrawnSeries {
                label: format!("trial {}", t.trial),
                trial: Some(t.trial),
                points,
                highlighted: false,
                colour_value: Some(t.metric),
            });
        }
        drawn
            .series
            .sort_by_key(|s| self.trials.iter().position(|t| Some(t.trial) == s.trial));

        // The axes and their labels over the lines.
        let axis_style = ShapeStyle::from(&BLACK).stroke_width(2);
        for (i, s) in scalers.iter().chain([&metric]).enumerate() {
            let xi = i as f64;
            chart
                .draw_series(LineSeries::new([(xi, 0.0), (xi, 1.0)], axis_style))
                .map_err(draw_err)?;
            let ticks = s.ticks();
            for (pos, label) in ticks {
                chart
                    .draw_series(std::iter::once(Text::new(label, (xi + 0.03, pos), ("sans-serif", 14))))
                    .map_err(draw_err)?;
            }
        }

        colour_bar(&bar, &self.metric, metric.lo, metric.hi)
    }
}

/// Width of the chart beside the colour bar.
const WIDTH_MAIN: u32 = crate::WIDTH - 130;

/// A vertical colour bar from `lo` (bottom) to `hi` (top).
fn colour_bar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    name: &str,
    lo: f64,
    hi: f64,
) -> Result<(), PlotError> {
    let (_, h) = area.dim_in_pixel();
    let (top, bottom) = (70i32, h as i32 - 70);
    let steps = 64;
    for k in 0..steps {
        let t0 = f64::from(k) / f64::from(steps);
        let y1 = bottom - ((f64::from(bottom - top)) * t0) as i32;
        let y0 = bottom - ((f64::from(bottom - top)) * (t0 + 1.0 / f64::from(steps))) as i32;
        area.draw(&Rectangle::new([(20, y0), (50, y1 + 1)], ramp(t0).filled()))
            .map_err(draw_err)?;
    }
    let font = ("sans-serif", 14).into_font();
    area.draw(&Text::new(fmt_num(hi), (56, top - 7), font.clone()))
        .map_err(draw_err)?;
    area.draw(&Text::new(fmt_num(lo), (56, bottom - 7), font.clone()))
        .map_err(draw_err)?;
    area.draw(&Text::new(name.to_string(), (10, top - 36), font))
        .map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::check_file;

    pub(crate) fn trials() -> Vec<TrialPoint> {
        let lrs = [1e-4, 1e-3, 1e-2, 1e-1];
        let opts = ["adam", "sgd", "adam", "sgd"];
        lrs.iter()
            .zip(opts)
            .enumerate()
            .map(|(i, (lr, o))| TrialPoint {
                trial: i as u64 + 10,
                params: BTreeMap::from([
                    ("lr".to_string(), Value::Num(*lr)),
                    ("optimizer".to_string(), Value::Cat(o.to_string())),
                ]),
                metric: i as f64,
            })
            .collect()
    }

    #[test]
    fn polylines_are_scaled_per_axis_log_and_levels() {
        let dir = tempfile::tempdir().unwrap();
        let input = ParallelInput {
            title: "t".into(),
            metric: "accuracy".into(),
            axes: vec![
                Axis {
                    name: "lr".into(),
                    scale: Scale::Log,
                },
                Axis {
                    name: "optimizer".into(),
                    scale: Scale::Levels(vec!["adam".into(), "sgd".into(), "rmsprop".into()]),
                },
            ],
            trials: trials(),
        };
        let drawn = parallel(&input, &dir.path().join("p.png")).unwrap();
        check_file(&drawn);
        assert_eq!(drawn.axes, vec!["lr", "optimizer", "accuracy"]);
        assert_eq!(drawn.series.len(), 4);
        let close = |a: &[(f64, f64)], b: &[(f64, f64)]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(p, q)| (p.0 - q.0).abs() < 1e-9 && (p.1 - q.1).abs() < 1e-9)
        };
        // lr 1e-3 is a third of the way on the log axis; sgd the middle of three levels; metric 1
        // of 0..3.
        let s = &drawn.series[1];
        assert_eq!(s.trial, Some(11));
        assert_eq!(s.colour_value, Some(1.0));
        assert!(
            close(&s.points, &[(0.0, 1.0 / 3.0), (1.0, 0.5), (2.0, 1.0 / 3.0)]),
            "{:?}",
            s.points
        );
        assert!(close(&drawn.series[3].points, &[(0.0, 1.0), (1.0, 0.5), (2.0, 1.0)]));
    }

    #[test]
    fn inferred_axes_and_missing_params() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = trials();
        t[0].params.remove("optimizer");
        let axes = Axis::infer(&t);
        assert_eq!(
            axes[0],
            Axis {
                name: "lr".into(),
                scale: Scale::Linear
            }
        );
        assert_eq!(
            axes[1],
            Axis {
                name: "optimizer".into(),
                scale: Scale::Levels(vec!["adam".into(), "sgd".into()])
            }
        );
        let input = ParallelInput {
            title: "t".into(),
            metric: "m".into(),
            axes,
            trials: t,
        };
        let drawn = parallel(&input, &dir.path().join("p.svg")).unwrap();
        check_file(&drawn);
        // The trial without an optimizer has points on lr and the metric only.
        let xs: Vec<f64> = drawn.series[0].points.iter().map(|p| p.0).collect();
        assert_eq!(xs, vec![0.0, 2.0]);
        assert_eq!(drawn.series[1].points.len(), 3);
    }
}
