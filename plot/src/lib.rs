//! Pictures of experiments, as PNG or SVG files: learning curves, parallel coordinates,
//! parameter importance, Pareto fronts and confusion matrices.
//!
//! A pure library: every renderer takes plain data (no protobuf, no coordinator), writes one
//! file whose format follows its extension, and returns a [`Drawn`] description of exactly what
//! it drew, so callers and tests can check the data in a picture without reading pixels.
//!
//! Text is drawn with a font shipped in this crate (DejaVu Sans, see `fonts/LICENSE`) through
//! `ab_glyph`, so rendering needs no system font library.

mod confusion;
mod curves;
mod error;
mod importance;
mod parallel;
mod pareto;
mod stats;

pub use confusion::{ConfusionInput, confusion};
pub use curves::{CurvesInput, Series, curves};
pub use error::PlotError;
pub use importance::{Importance, Measure, importance, importance_scores};
pub use parallel::{Axis, ParallelInput, Scale, TrialPoint, Value, parallel};
pub use pareto::{ParetoInput, ParetoPoint, pareto, pareto_front};

pub use stats::{correlation_ratio, spearman};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::sync::OnceLock;

/// Size of every picture, in pixels (SVG user units).
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 720;

/// The font family every text is drawn in; registered once per process.
const FONT: &str = "sans-serif";

/// The file formats a picture can be written in, chosen by the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    /// The format `path`'s extension names (case-insensitive).
    pub fn from_path(path: &Path) -> Result<Format, PlotError> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => Err(PlotError::Format(path.display().to_string())),
        }
    }
}

/// One line or polyline as drawn: its points in the chart's own coordinates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrawnSeries {
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trial: Option<u64>,
    pub points: Vec<(f64, f64)>,
    /// Drawn thicker (and in the legend): the best trial, or a Pareto-optimal one.
    pub highlighted: bool,
    /// The value its colour encodes (parallel coordinates: the metric).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub colour_value: Option<f64>,
}

/// One bar as drawn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrawnBar {
    pub label: String,
    pub value: f64,
}

/// What a renderer drew, for callers (`--describe`) and tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drawn {
    pub kind: &'static str,
    pub path: String,
    pub format: Format,
    pub width: u32,
    pub height: u32,
    pub title: String,
    /// The data ranges of the axes, after padding.
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub axes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<DrawnSeries>,
    /// Trials drawn highlighted: the best trial of a curves plot, the Pareto front's trials.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub highlighted: Vec<u64>,
    /// x positions of vertical marker lines (rung budgets).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bars: Vec<DrawnBar>,
    /// Heatmap cells, row by row.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<Vec<f64>>,
}

impl Drawn {
    fn new(kind: &'static str, path: &Path, format: Format, title: &str) -> Drawn {
        Drawn {
            kind,
            path: path.display().to_string(),
            format,
            width: WIDTH,
            height: HEIGHT,
            title: title.to_string(),
            x_range: (0.0, 1.0),
            y_range: (0.0, 1.0),
            axes: Vec::new(),
            series: Vec::new(),
            highlighted: Vec::new(),
            markers: Vec::new(),
            bars: Vec::new(),
            cells: Vec::new(),
        }
    }
}

fn register_font() -> Result<(), PlotError> {
    // Registered once per process; a font that failed to load fails every picture after too.
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED.get_or_init(|| {
        static BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, BYTES).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, BYTES).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// Any drawing failure of the backends, as text: their error types differ per backend.
fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// A renderer's body, generic over the backend so one function draws both PNG and SVG.
trait Render {
    fn render<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, drawn: &mut Drawn) -> Result<(), PlotError>;
}

/// Creates `path` in the format its extension names, lets `r` draw on it and writes it out.
fn render_to(kind: &'static str, title: &str, path: &Path, r: &impl Render) -> Result<Drawn, PlotError> {
    let format = Format::from_path(path)?;
    register_font()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| PlotError::Io(path.display().to_string(), e))?;
    }
    let mut drawn = Drawn::new(kind, path, format, title);
    match format {
        Format::Png => {
            let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
            root.fill(&WHITE).map_err(draw_err)?;
            r.render(&root, &mut drawn)?;
            root.present().map_err(draw_err)?;
        }
        Format::Svg => {
            let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
            root.fill(&WHITE).map_err(draw_err)?;
            r.render(&root, &mut drawn)?;
            root.present().map_err(draw_err)?;
        }
    }
    Ok(drawn)
}

/// `(lo, hi)` widened by `frac` of its span on each side; a single value gets a unit span.
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= f64::EPSILON * lo.abs().max(1.0) {
        return (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0));
    }
    (lo - frac * span, hi + frac * span)
}

/// Min and max of finite values; `None` when there are none.
fn extent(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// A colour for `t` in [0, 1] on a perceptually ordered ramp (dark blue, teal, yellow), close to
/// viridis, so low and high metric values stay distinguishable in grey too.
fn ramp(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Distinct colours for the lines of a curves plot.
fn palette(i: usize) -> RGBColor {
    const P: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(57, 59, 121),
    ];
    P[i % P.len()]
}

/// Short text for an axis tick or a label.
fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// Checks the file's magic bytes for its format and, for PNG, the dimensions in its IHDR.
    pub fn check_file(drawn: &Drawn) {
        let bytes = std::fs::read(&drawn.path).unwrap();
        match drawn.format {
            Format::Png => {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
                assert_eq!(&bytes[12..16], b"IHDR");
                let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
                let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
                assert_eq!((w, h), (WIDTH, HEIGHT));
                assert_eq!((drawn.width, drawn.height), (w, h));
            }
            Format::Svg => {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(100)]);
                assert!(text.contains(&format!("width=\"{WIDTH}\"")));
                assert!(text.trim_end().ends_with("</svg>"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(Format::from_path(Path::new("a/b.PNG")).unwrap(), Format::Png);
        assert_eq!(Format::from_path(Path::new("b.svg")).unwrap(), Format::Svg);
        assert!(matches!(
            Format::from_path(Path::new("b.jpg")),
            Err(PlotError::Format(_))
        ));
        assert!(matches!(Format::from_path(Path::new("b")), Err(PlotError::Format(_))));
    }

    #[test]
    fn ramp_runs_from_dark_to_bright() {
        let lum = |c: RGBColor| 0.3 * f64::from(c.0) + 0.59 * f64::from(c.1) + 0.11 * f64::from(c.2);
        let steps: Vec<f64> = (0..=10).map(|i| lum(ramp(f64::from(i) / 10.0))).collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    }

    #[test]
    fn padding_widens_and_handles_one_value() {
        assert_eq!(padded(0.0, 10.0, 0.1), (-1.0, 11.0));
        let (lo, hi) = padded(3.0, 3.0, 0.1);
        assert!(lo < 3.0 && hi > 3.0);
    }
}
