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

use crate::Coordinator;
use crate::error::CoordError;
use chorus_core::ExperimentId;
use chorus_proto::pb;
use tonic::{Response, Status};

/// Applies one state change to an experiment and answers, once it is durable, with the
/// experiment as the change left it.
async fn change_experiment(
    coord: &Coordinator,
    id: ExperimentId,
    apply: impl FnOnce(&mut crate::state::State) -> Result<(), CoordError>,
) -> Result<Response<pb::Experiment>, Status> {
    let exp = coord
        .change(|st| {
            apply(st)?;
            Ok(convert::experiment(st, id))
        })
        .await?;
    let exp = exp.ok_or_else(|| Status::not_found(format!("experiment {id} does not exist")))?;
    Ok(Response::new(exp))
}
