//! Learning curves: one line per trial (x = step), the best trial thicker and in the legend, and
//! vertical lines at the rung budgets of an ASHA or Hyperband search.

use crate::{Drawn, DrawnSeries, PlotError, Render, draw_err, extent, fmt_num, padded, palette, render_to};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One trial's history of the plotted metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub trial: u64,
    /// (step, value), in the order reported.
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CurvesInput {
    pub title: String,
    pub metric: String,
    pub series: Vec<Series>,
    /// The trial drawn highlighted.
    pub best: Option<u64>,
    /// Steps at which to draw vertical marker lines (rung budgets).
    pub rungs: Vec<f64>,
}

/// Draws `input` to `path` (.png or .svg). Series without points are left out.
pub fn curves(input: &CurvesInput, path: &Path) -> Result<Drawn, PlotError> {
    if input.series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::Empty(format!("no trial reported {:?}", input.metric)));
    }
    render_to("curves", &input.title, path, input)
}

impl Render for CurvesInput {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, drawn: &mut Drawn) -> Result<(), PlotError> {
        let series: Vec<&Series> = self.series.iter().filter(|s| !s.points.is_empty()).collect();
        let all = || series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = extent(all().map(|p| p.0).chain(self.rungs.iter().copied())).unwrap_or((0.0, 1.0));
        let (y0, y1) = extent(all().map(|p| p.1)).unwrap_or((0.0, 1.0));
        let x = if x0 == x1 { padded(x0, x1, 0.0) } else { (x0, x1) };
        let y = padded(y0, y1, 0.05);
        drawn.x_range = x;
        drawn.y_range = y;

        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(self.metric.as_str())
            .x_label_formatter(&|v| fmt_num(*v))
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(draw_err)?;

        for &r in &self.rungs {
            let style = ShapeStyle::from(&RGBColor(150, 150, 150)).stroke_width(1);
            chart
                .draw_series(LineSeries::new([(r, y.0), (r, y.1)], style))
                .map_err(draw_err)?;
            drawn.markers.push(r);
        }

        // The best trial goes last so it is drawn on top of the others.
        let mut order: Vec<(usize, &Series)> = series.iter().copied().enumerate().collect();
        order.sort_by_key(|(_, s)| Some(s.trial) == self.best);
        for (i, s) in order {
            let best = Some(s.trial) == self.best;
            let colour = if best { RGBColor(214, 39, 40) } else { palette(i) };
            let width = if best { 4 } else { 1 };
            let pts: Vec<(f64, f64)> = s.points.clone();
            let line = LineSeries::new(pts.iter().copied(), ShapeStyle::from(&colour).stroke_width(width));
            let ann = chart.draw_series(line).map_err(draw_err)?;
            if best {
                let label = format!("best: {}", s.label);
                ann.label(label).legend(move |(lx, ly)| {
                    PathElement::new([(lx, ly), (lx + 24, ly)], ShapeStyle::from(&colour).stroke_width(4))
                });
            }
            if pts.len() == 1 {
                // A lone report is invisible as a line.
                chart
                    .draw_series(std::iter::once(Circle::new(pts[0], 3, colour.filled())))
                    .map_err(draw_err)?;
            }
            drawn.series.push(DrawnSeries {
                label: s.label.clone(),
                trial: Some(s.trial),
                points: pts,
                highlighted: best,
                colour_value: None,
            });
        }
        if let Some(b) = self.best.filter(|b| drawn.series.iter().any(|s| s.trial == Some(*b))) {
            drawn.highlighted.push(b);
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(draw_err)?;
        }
        // Restore the input order, so callers find series where they gave them.
        drawn
            .series
            .sort_by_key(|d| self.series.iter().position(|s| Some(s.trial) == d.trial));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::check_file;
    use crate::{Format, PlotError};

    fn input() -> CurvesInput {
        let series = (0..4u64)
            .map(|t| Series {
                label: format!("trial {t}"),
                trial: t,
                points: (1..=5)
                    .map(|s| (f64::from(s), 1.0 / (f64::from(s) + t as f64)))
                    .collect(),
            })
            .collect();
        CurvesInput {
            title: "experiment 1: loss".into(),
            metric: "loss".into(),
            series,
            best: Some(3),
            rungs: vec![1.0, 3.0],
        }
    }

    #[test]
    fn png_has_every_series_with_exactly_its_points_and_the_best_highlighted() {
        let dir = tempfile::tempdir().unwrap();
        let input = input();
        let drawn = curves(&input, &dir.path().join("c.png")).unwrap();
        check_file(&drawn);
        assert_eq!(drawn.kind, "curves");
        assert_eq!(drawn.format, Format::Png);
        assert_eq!(drawn.series.len(), 4);
        for (d, s) in drawn.series.iter().zip(&input.series) {
            assert_eq!(d.trial, Some(s.trial));
            assert_eq!(d.points, s.points);
            assert_eq!(d.highlighted, s.trial == 3);
        }
        assert_eq!(drawn.highlighted, vec![3]);
        assert_eq!(drawn.markers, vec![1.0, 3.0]);
        assert_eq!(drawn.x_range, (1.0, 5.0));
        assert!(drawn.y_range.0 < 1.0 / 8.0 && drawn.y_range.1 > 1.0);
    }

    #[test]
    fn svg_is_written_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let drawn = curves(&input(), &dir.path().join("sub/c.svg")).unwrap();
        check_file(&drawn);
        assert_eq!(drawn.format, Format::Svg);
        let svg = std::fs::read_to_string(dir.path().join("sub/c.svg")).unwrap();
        assert!(svg.contains("best: trial 3"), "the legend names the best trial");
    }

    #[test]
    fn nothing_reported_is_an_error_not_an_empty_picture() {
        let dir = tempfile::tempdir().unwrap();
        let mut i = input();
        i.series.iter_mut().for_each(|s| s.points.clear());
        let p = dir.path().join("c.png");
        assert!(matches!(curves(&i, &p), Err(PlotError::Empty(_))));
        assert!(!p.exists());
    }

    #[test]
    fn empty_series_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut i = input();
        i.series[1].points.clear();
        let drawn = curves(&i, &dir.path().join("c.png")).unwrap();
        assert_eq!(
            drawn.series.iter().map(|s| s.trial.unwrap()).collect::<Vec<_>>(),
            vec![0, 2, 3]
        );
    }
}
