//! Two metrics against each other: one point per trial, the Pareto front (the trials no other
//! trial beats on both metrics at once, by each metric's goal) highlighted and connected.

use crate::{Drawn, DrawnSeries, PlotError, Render, draw_err, extent, fmt_num, padded, render_to};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParetoPoint {
    pub trial: u64,
    pub a: f64,
    pub b: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParetoInput {
    pub title: String,
    pub a_name: String,
    pub b_name: String,
    pub maximize_a: bool,
    pub maximize_b: bool,
    pub points: Vec<ParetoPoint>,
}

/// The trials on the Pareto front, ordered by `a`: those that no other point dominates (at least
/// as good on both metrics and better on one). Equal points are all on the front.
pub fn pareto_front(points: &[ParetoPoint], maximize_a: bool, maximize_b: bool) -> Vec<u64> {
    let better_eq = |x: f64, y: f64, max: bool| if max { x >= y } else { x <= y };
    let dominates = |p: &ParetoPoint, q: &ParetoPoint| {
        better_eq(p.a, q.a, maximize_a) && better_eq(p.b, q.b, maximize_b) && (p.a != q.a || p.b != q.b)
    };
    let mut front: Vec<&ParetoPoint> = points
        .iter()
        .filter(|q| q.a.is_finite() && q.b.is_finite())
        .filter(|q| {
            !points
                .iter()
                .any(|p| p.a.is_finite() && p.b.is_finite() && dominates(p, q))
        })
        .collect();
    front.sort_by(|p, q| p.a.total_cmp(&q.a).then(p.trial.cmp(&q.trial)));
    front.into_iter().map(|p| p.trial).collect()
}

/// Draws `input` to `path` (.png or .svg).
pub fn pareto(input: &ParetoInput, path: &Path) -> Result<Drawn, PlotError> {
    if input.points.is_empty() {
        return Err(PlotError::Empty(format!(
            "no trial has values of both {:?} and {:?}",
            input.a_name, input.b_name
        )));
    }
    render_to("pareto", &input.title, path, input)
}

impl Render for ParetoInput {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, drawn: &mut Drawn) -> Result<(), PlotError> {
        let front = pareto_front(&self.points, self.maximize_a, self.maximize_b);
        let (a0, a1) = extent(self.points.iter().map(|p| p.a)).unwrap_or((0.0, 1.0));
        let (b0, b1) = extent(self.points.iter().map(|p| p.b)).unwrap_or((0.0, 1.0));
        let x = padded(a0, a1, 0.05);
        let y = padded(b0, b1, 0.05);
        drawn.x_range = x;
        drawn.y_range = y;
        let goal = |max: bool| if max { "max" } else { "min" };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(80)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(format!("{} ({})", self.a_name, goal(self.maximize_a)))
            .y_desc(format!("{} ({})", self.b_name, goal(self.maximize_b)))
            .x_label_formatter(&|v| fmt_num(*v))
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(draw_err)?;
        let grey = RGBColor(120, 120, 120);
        let red = RGBColor(214, 39, 40);
        let others: Vec<&ParetoPoint> = self.points.iter().filter(|p| !front.contains(&p.trial)).collect();
        chart
            .draw_series(others.iter().map(|p| Circle::new((p.a, p.b), 4, grey.filled())))
            .map_err(draw_err)?;
        let on: Vec<(f64, f64)> = front
            .iter()
            .filter_map(|t| self.points.iter().find(|p| p.trial == *t))
            .map(|p| (p.a, p.b))
            .collect();
        chart
            .draw_series(LineSeries::new(
                on.iter().copied(),
                ShapeStyle::from(&red).stroke_width(2),
            ))
            .map_err(draw_err)?
            .label("Pareto front")
            .legend(move |(lx, ly)| {
                PathElement::new([(lx, ly), (lx + 24, ly)], ShapeStyle::from(&red).stroke_width(2))
            });
        chart
            .draw_series(on.iter().map(|&p| Circle::new(p, 6, red.filled())))
            .map_err(draw_err)?;
        for (t, p) in front.iter().zip(&on) {
            // The trial id beside its point, offset in pixels so it does not cover it.
            let label = EmptyElement::at(*p) + Text::new(format!("trial {t}"), (8, -18), ("sans-serif", 13));
            chart.draw_series(std::iter::once(label)).map_err(draw_err)?;
        }
        // The legend goes in the corner that is better on both metrics: no trial can lie there
        // beyond the front, so it covers none.
        let corner = match (self.maximize_a, self.maximize_b) {
            (false, true) => SeriesLabelPosition::UpperLeft,
            (true, true) => SeriesLabelPosition::UpperRight,
            (false, false) => SeriesLabelPosition::LowerLeft,
            (true, false) => SeriesLabelPosition::LowerRight,
        };
        chart
            .configure_series_labels()
            .position(corner)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
        drawn.axes = vec![self.a_name.clone(), self.b_name.clone()];
        drawn.series = vec![
            DrawnSeries {
                label: "trials".into(),
                trial: None,
                points: others.iter().map(|p| (p.a, p.b)).collect(),
                highlighted: false,
                colour_value: None,
            },
            DrawnSeries {
                label: "Pareto front".into(),
                trial: None,
                points: on,
                highlighted: true,
                colour_value: None,
            },
        ];
        drawn.highlighted = front;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::check_file;

    fn pts(v: &[(u64, f64, f64)]) -> Vec<ParetoPoint> {
        v.iter().map(|&(trial, a, b)| ParetoPoint { trial, a, b }).collect()
    }

    #[test]
    fn front_on_a_hand_example() {
        // Minimise a (loss), maximise b (accuracy).
        let p = pts(&[
            (1, 0.5, 0.7),
            (2, 0.3, 0.6),
            (3, 0.6, 0.9),
            (4, 0.55, 0.65),
            (5, 0.3, 0.5),
            (6, 0.7, 0.9),
        ]);
        // 4 is beaten by 1 (lower loss, higher accuracy); 5 by 2 (same loss, higher accuracy);
        // 6 by 3 (same accuracy, lower loss).
        assert_eq!(pareto_front(&p, false, true), vec![2, 1, 3]);
        // Both minimised: lowest loss with lowest accuracy wins alone... and 1 (0.5, 0.7) is
        // beaten by 5 (0.3, 0.5).
        assert_eq!(pareto_front(&p, false, false), vec![5]);
        // Equal points share the front.
        assert_eq!(
            pareto_front(&pts(&[(1, 1.0, 1.0), (2, 1.0, 1.0)]), true, true),
            vec![1, 2]
        );
    }

    #[test]
    fn front_is_drawn_highlighted_and_the_rest_plain() {
        let dir = tempfile::tempdir().unwrap();
        let input = ParetoInput {
            title: "p".into(),
            a_name: "loss".into(),
            b_name: "accuracy".into(),
            maximize_a: false,
            maximize_b: true,
            points: pts(&[(1, 0.5, 0.7), (2, 0.3, 0.6), (3, 0.6, 0.9), (4, 0.55, 0.65)]),
        };
        let drawn = pareto(&input, &dir.path().join("p.svg")).unwrap();
        check_file(&drawn);
        assert_eq!(drawn.highlighted, vec![2, 1, 3]);
        assert_eq!(drawn.series[1].points, vec![(0.3, 0.6), (0.5, 0.7), (0.6, 0.9)]);
        assert_eq!(drawn.series[0].points, vec![(0.55, 0.65)]);
    }
}
