//! Thin tonic handlers: convert the request, call into [`crate::state::State`] or storage,
//! map the error. No policy lives here.

pub mod auth;
pub mod convert;
mod experiment;
mod lifecycle;
pub mod paging;
mod worker;

pub use experiment::ExperimentApi;
pub use lifecycle::LifecycleApi;
pub use worker::WorkerApi;
