//! The one error type of the searchers. A searcher never fails while it runs (its decisions are
//! total functions of its events); the only thing that can go wrong is reading back a state it
//! saved, which the coordinator reports instead of starting the search over.

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// A searcher's saved state cannot be read back.
    #[error("the saved state of the {searcher} searcher cannot be read: {reason}")]
    State { searcher: &'static str, reason: String },
}

pub type Result<T, E = SearchError> = std::result::Result<T, E>;
