//! Thin tonic handlers: convert the request, call into [`crate::state::State`] or storage,
//! map the error. No policy lives here.

pub mod auth;
pub mod convert;
mod experiment;
pub mod paging;
mod worker;

pub use experiment::ExperimentApi;
pub use worker::WorkerApi;
