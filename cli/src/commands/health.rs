//! `chorus health`: one grpc.health.v1 Check, for scripts and container health checks. The
//! status goes to stdout; the exit code is 0 only for SERVING.

use super::{Ctx, emit};
use crate::args::HealthArgs;
use crate::client::{AuthInterceptor, connect_channel};
use crate::error::CliError;
use std::process::ExitCode;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub async fn run(args: HealthArgs, ctx: &Ctx) -> Result<ExitCode, CliError> {
    let g = &ctx.global;
    let channel = connect_channel(&g.coordinator, g.ca.as_deref()).await?;
    // The coordinator may ask for a token on every call; a worker's health port never does.
    let mut client = HealthClient::with_interceptor(channel, AuthInterceptor::new(g.token.as_deref())?);
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    req.set_timeout(Duration::from_secs(g.timeout));
    let status = client.check(req).await?.into_inner().status;
    let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
    emit(&format!("{name}\n"))?;
    Ok(if status == ServingStatus::Serving as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
