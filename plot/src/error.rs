//! The one error type of chorus-plot.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("{0}: the picture's format follows its extension: .png or .svg")]
    Format(String),
    #[error("the shipped font could not be loaded")]
    Font,
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("nothing to draw: {0}")]
    Empty(String),
    #[error("{0}")]
    Invalid(String),
}
