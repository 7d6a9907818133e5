//! The one error type of `chorus-core`.

use std::fmt;

/// A problem with one field of an experiment spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `parameters.lr.min`; empty for the document itself.
    pub path: String,
    /// 1-based line and column in the YAML text, when the field appears there.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() { "(document)" } else { &self.path };
        match self.location {
            Some((line, col)) => write!(f, "{path} (line {line}, column {col}): {}", self.message),
            None => write!(f, "{path}: {}", self.message),
        }
    }
}

/// Every problem found in one spec, so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<FieldError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("invalid experiment spec:\n{0}")]
    Spec(SpecErrors),
    #[error("invalid storage URI {uri:?}: {reason}")]
    StorageUri { uri: String, reason: String },
    #[error("object storage: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("record {key} cannot be read: {reason}")]
    CorruptRecord { key: String, reason: String },
    #[error("checkpoint {key}: {reason}")]
    CorruptCheckpoint { key: String, reason: String },
    #[error("local file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Conversion(String),
}

impl CoreError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
