//! `chorus.v1.WorkerService`, for worker agents.

use crate::Coordinator;
use crate::rendezvous::Joined;
use chorus_core::WorkerId;
use chorus_proto::pb;
use chorus_proto::pb::worker_service_server::WorkerService;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
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
        let req = req.into_inner();
        let worker = req.worker_id.clone();
        let mut st = self.coord.lock();
        let kill = st.register(req)?;
        st.flush()?;
        tracing::info!(%worker, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: st.timing.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: st.timing.lease_ttl.as_millis() as u64,
            kill,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let mut st = self.coord.lock();
        let kill = st.heartbeat(req.get_ref())?;
        st.flush()?;
        Ok(Response::new(pb::HeartbeatResponse { kill }))
    }

    type AssignmentsStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerCommand, Status>> + Send>>;

    async fn assignments(
        &self,
        req: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let worker = WorkerId(req.into_inner().worker_id);
        // Unbounded: commands are produced under the state lock, which must never wait on a
        // slow worker; their number is bounded by the worker's slots plus kills.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.coord.lock();
        st.open_stream(&worker, tx)?;
        st.flush()?;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn report_trial(
        &self,
        req: Request<pb::ReportTrialRequest>,
    ) -> Result<Response<pb::ReportTrialResponse>, Status> {
        let mut st = self.coord.lock();
        let res = st.report(req.into_inner());
        // Even a rejected report may have renewed the lease; keep what changed.
        let flushed = st.flush();
        res?;
        flushed?;
        Ok(Response::new(pb::ReportTrialResponse {}))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let req = req.into_inner();
        let deadline = tokio::time::Instant::now() + RENDEZVOUS_WAIT;
        loop {
            let joined = {
                let mut st = self.coord.lock();
                let res = st.rendezvous(&req);
                let flushed = st.flush();
                let joined = res?;
                flushed?;
                joined
            };
            let mut rx = match joined {
                Joined::Ready(resp) => return Ok(Response::new(resp)),
                Joined::Wait(rx) => rx,
            };
            // Woken when the last rank joins, or (sender dropped) when the attempt ends; either
            // way the next pass through `rendezvous` says which.
            if tokio::time::timeout_at(deadline, rx.wait_for(|ready| *ready))
                .await
                .is_err()
            {
                let missing = self.coord.lock().rendezvous_missing(chorus_core::TrialId(req.trial_id));
                return Err(Status::deadline_exceeded(format!(
                    "rendezvous of trial {} attempt {}: ranks {missing:?} have not joined yet; call again",
                    req.trial_id, req.attempt
                )));
            }
        }
    }
}

/// How long one Rendezvous call waits for the other ranks before answering DEADLINE_EXCEEDED;
/// under the workers' call timeout, so the answer arrives rather than a transport timeout.
const RENDEZVOUS_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
