//! `chorus.v1.WorkerService`, for worker agents: each handler converts its request, applies it
//! to the state through [`Coordinator::change`] (durable before it answers), and converts the
//! answer back.

use super::auth::authorize_worker;
use super::convert;
use crate::Coordinator;
use crate::rendezvous::Joined;
use chorus_core::{TrialId, WorkerId};
use chorus_proto::pb;
use chorus_proto::pb::worker_service_server::WorkerService;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

pub struct WorkerApi {
    coord: Arc<Coordinator>,
}

impl WorkerApi {
    pub fn new(coord: Arc<Coordinator>) -> Self {
        WorkerApi { coord }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        authorize_worker(&req, &req.get_ref().worker_id)?;
        let reg = convert::registration(req.into_inner());
        let (worker, instance) = (reg.worker.clone(), reg.instance.clone());
        let (registered, timing) = self
            .coord
            .change(|st| Ok((st.register(reg)?, st.timing.clone())))
            .await?;
        tracing::info!(%worker, %instance, epoch = registered.epoch, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: timing.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: timing.lease_ttl.as_millis() as u64,
            kill: registered.kill.into_iter().map(convert::running_to_pb).collect(),
            epoch: registered.epoch,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        authorize_worker(&req, &req.get_ref().worker_id)?;
        let req = req.into_inner();
        let worker = WorkerId(req.worker_id);
        let running: Vec<_> = req.running.iter().map(convert::running).collect();
        // A renewal that kills nothing reports nothing of other changes: it need not wait for
        // their commits, so heartbeats stay fast however busy the store is.
        let (kill, commit) = {
            let mut st = self.coord.lock();
            let kill = st.heartbeat(&worker, req.epoch, &running);
            if req.leaving && kill.is_ok() {
                st.leaving(&worker);
            }
            let commit = match &kill {
                Ok(k) if k.is_empty() => st.flush_own(),
                _ => st.flush(),
            };
            (kill, commit)
        };
        let committed = commit.wait().await;
        let kill = kill?;
        committed?;
        Ok(Response::new(pb::HeartbeatResponse {
            kill: kill.into_iter().map(convert::running_to_pb).collect(),
        }))
    }

    type AssignmentsStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerCommand, Status>> + Send>>;

    async fn assignments(
        &self,
        req: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        authorize_worker(&req, &req.get_ref().worker_id)?;
        let req = req.into_inner();
        let (worker, epoch) = (WorkerId(req.worker_id), req.epoch);
        let (tx, rx) = mpsc::unbounded_channel();
        self.coord.change(|st| st.open_stream(&worker, epoch, tx)).await?;
        let commands = UnboundedReceiverStream::new(rx).map(|c| Ok(convert::command(c)));
        // The stream ends when its sender is dropped: the lease lapsed, or a newer registration
        // fenced this one. The fenced worker hears why, so it stops instead of reconnecting.
        let coord = self.coord.clone();
        let fenced = futures::stream::once(async move { coord.lock().check_epoch(&worker, epoch).err() })
            .filter_map(|e| e.map(|e| Err(Status::from(e))));
        Ok(Response::new(Box::pin(commands.chain(fenced))))
    }

    async fn report_trial(
        &self,
        req: Request<pb::ReportTrialRequest>,
    ) -> Result<Response<pb::ReportTrialResponse>, Status> {
        authorize_worker(&req, &req.get_ref().worker_id)?;
        let report = convert::report(req.into_inner());
        self.coord.change(|st| st.report(report)).await?;
        Ok(Response::new(pb::ReportTrialResponse {}))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        authorize_worker(&req, &req.get_ref().worker_id)?;
        let req = convert::join_request(req.into_inner());
        let deadline = tokio::time::Instant::now() + RENDEZVOUS_WAIT;
        loop {
            let mut rx = match self.coord.change(|st| st.rendezvous(&req)).await? {
                Joined::Ready(peers) => return Ok(Response::new(convert::peers(peers))),
                Joined::Wait(rx) => rx,
            };
            // Woken when the last rank joins, or (sender dropped) when the attempt ends; either
            // way the next pass through `rendezvous` says which.
            if tokio::time::timeout_at(deadline, rx.wait_for(|ready| *ready))
                .await
                .is_err()
            {
                let missing = self.coord.lock().rendezvous_missing(TrialId(req.trial.0));
                return Err(Status::deadline_exceeded(format!(
                    "rendezvous of trial {} attempt {}: ranks {missing:?} have not joined yet; call again",
                    req.trial, req.attempt
                )));
            }
        }
    }
}

/// How long one Rendezvous call waits for the other ranks before answering DEADLINE_EXCEEDED;
/// under the workers' call timeout, so the answer arrives rather than a transport timeout.
const RENDEZVOUS_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
