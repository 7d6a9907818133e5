//! A confusion matrix as a heatmap: rows the true class, columns the predicted one, each cell
//! shaded by its share of its row and labelled with its count.

use crate::{Drawn, PlotError, Render, draw_err, fmt_num, ramp, render_to};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionInput {
    pub title: String,
    pub classes: Vec<String>,
    /// `counts[true][predicted]`.
    pub counts: Vec<Vec<f64>>,
}

/// Draws `input` to `path` (.png or .svg).
pub fn confusion(input: &ConfusionInput, path: &Path) -> Result<Drawn, PlotError> {
    let n = input.classes.len();
    if n == 0 {
        return Err(PlotError::Empty("the confusion matrix has no class".into()));
    }
    if input.counts.len() != n || input.counts.iter().any(|r| r.len() != n) {
        return Err(PlotError::Invalid(format!(
            "a confusion matrix of {n} classes needs {n} rows of {n} counts"
        )));
    }
    render_to("confusion", &input.title, path, input)
}

impl Render for ConfusionInput {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, drawn: &mut Drawn) -> Result<(), PlotError> {
        let n = self.classes.len();
        let x = (0.0, n as f64);
        let y = (0.0, n as f64);
        drawn.x_range = x;
        drawn.y_range = y;
        let names = self.classes.clone();
        // Row 0 at the top: the y coordinate of row r is n - 1 - r.
        let label = |v: f64, flip: bool| {
            let i = v.floor();
            if v - i < 0.45 || v - i > 0.55 || i < 0.0 {
                return String::new();
            }
            let i = i as usize;
            let i = if flip { n.saturating_sub(1 + i) } else { i };
            names.get(i).cloned().unwrap_or_default()
        };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(110)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(2 * n + 1)
            .y_labels(2 * n + 1)
            .x_label_formatter(&|v| label(*v, false))
            .y_label_formatter(&|v| label(*v, true))
            .x_desc("predicted")
            .y_desc("true")
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(draw_err)?;
        for (r, row) in self.counts.iter().enumerate() {
            let total: f64 = row.iter().sum();
            let yr = (n - 1 - r) as f64;
            for (c, count) in row.iter().enumerate() {
                let share = if total > 0.0 { count / total } else { 0.0 };
                let xc = c as f64;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(xc, yr), (xc + 1.0, yr + 1.0)],
                        ramp(share).filled(),
                    )))
                    .map_err(draw_err)?;
                let ink = if share > 0.6 { BLACK } else { WHITE };
                let style = TextStyle::from(("sans-serif", 18).into_font()).color(&ink).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Center,
                    ),
                );
                chart
                    .draw_series(std::iter::once(Text::new(fmt_num(*count), (xc + 0.5, yr + 0.5), style)))
                    .map_err(draw_err)?;
            }
        }
        drawn.axes = self.classes.clone();
        drawn.cells = self.counts.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::check_file;

    #[test]
    fn cells_are_the_counts_given() {
        let dir = tempfile::tempdir().unwrap();
        let input = ConfusionInput {
            title: "c".into(),
            classes: vec!["angry".into(), "happy".into(), "sad".into()],
            counts: vec![vec![5.0, 1.0, 0.0], vec![2.0, 7.0, 1.0], vec![0.0, 0.0, 4.0]],
        };
        for ext in ["png", "svg"] {
            let drawn = confusion(&input, &dir.path().join(format!("c.{ext}"))).unwrap();
            check_file(&drawn);
            assert_eq!(drawn.cells, input.counts);
            assert_eq!(drawn.axes, input.classes);
        }
        let svg = std::fs::read_to_string(dir.path().join("c.svg")).unwrap();
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        assert!(
            texts.contains(&"7") && texts.contains(&"happy"),
            "the counts and classes are written"
        );
    }

    #[test]
    fn a_ragged_matrix_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = ConfusionInput {
            title: "c".into(),
            classes: vec!["a".into(), "b".into()],
            counts: vec![vec![1.0, 2.0]],
        };
        assert!(matches!(
            confusion(&input, &dir.path().join("c.png")),
            Err(PlotError::Invalid(_))
        ));
    }
}
