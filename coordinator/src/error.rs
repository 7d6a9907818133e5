//! The one error type of the coordinator, and its single mapping onto gRPC status codes.

use chorus_core::CoreError;
use chorus_core::error::SpecErrors;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("invalid experiment spec:\n{0}")]
    Spec(SpecErrors),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A report or call from an attempt or worker incarnation the coordinator has moved past.
    #[error("{0}")]
    Stale(String),
    #[error("object storage: {0}")]
    Storage(String),
    #[error("coordinator store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("{0}")]
    Core(CoreError),
}

impl From<CoreError> for CoordError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Spec(s) => CoordError::Spec(s),
            CoreError::StorageUri { .. } => CoordError::InvalidArgument(e.to_string()),
            CoreError::ObjectStore(e) => CoordError::Storage(e.to_string()),
            other => CoordError::Core(other),
        }
    }
}

pub type Result<T, E = CoordError> = std::result::Result<T, E>;

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        match e {
            CoordError::Spec(errs) => {
                let mut details = ErrorDetails::new();
                for f in &errs.0 {
                    let field = if f.path.is_empty() {
                        "(document)".to_string()
                    } else {
                        f.path.clone()
                    };
                    let desc = match f.location {
                        Some((l, c)) => format!("line {l}, column {c}: {}", f.message),
                        None => f.message.clone(),
                    };
                    details.add_bad_request_violation(field, desc);
                }
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid experiment spec:\n{errs}"),
                    details,
                )
            }
            CoordError::InvalidArgument(m) => Status::invalid_argument(m),
            CoordError::NotFound(m) => Status::not_found(m),
            CoordError::FailedPrecondition(m) => Status::failed_precondition(m),
            CoordError::Stale(m) => Status::aborted(m),
            CoordError::Storage(m) => Status::unavailable(format!("object storage: {m}")),
            CoordError::Store(e) => Status::internal(format!("coordinator store: {e}")),
            CoordError::Core(e) => Status::internal(e.to_string()),
        }
    }
}
