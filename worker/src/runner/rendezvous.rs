//! Meeting the other ranks of a multi-rank attempt. The runner asks through a channel the agent
//! serves (the runner never calls the coordinator itself); the agent retries the coordinator's
//! long-poll until every rank has joined, and the runner bounds the whole wait and gives way to
//! a kill or shutdown order meanwhile.

use super::Stop;
use chorus_proto::pb;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// One rendezvous request and where its answer goes.
pub struct RendezvousCall {
    pub request: pb::RendezvousRequest,
    pub reply: oneshot::Sender<Result<pb::RendezvousResponse, String>>,
}

pub type RendezvousSender = mpsc::UnboundedSender<RendezvousCall>;

/// Why a rank could not meet its peers.
pub enum Missed {
    /// A stop order came first.
    Stopped(Stop),
    Failed(String),
}

/// Joins the rendezvous; returns the peers' answer, or why there is none.
pub async fn meet(
    sender: Option<&RendezvousSender>,
    request: pb::RendezvousRequest,
    timeout: Duration,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Result<pb::RendezvousResponse, Missed> {
    let Some(sender) = sender else {
        return Err(Missed::Failed(
            "this worker has no coordinator to meet the other ranks at".into(),
        ));
    };
    let (reply, answer) = oneshot::channel();
    let (rank, attempt) = (request.rank, request.attempt);
    if sender.send(RendezvousCall { request, reply }).is_err() {
        return Err(Missed::Failed("the worker's agent is gone".into()));
    }
    let stopped = async {
        loop {
            if let Some(s) = stop.borrow_and_update().clone() {
                return s;
            }
            if stop.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    tokio::select! {
        s = stopped => Err(Missed::Stopped(s)),
        r = tokio::time::timeout(timeout, answer) => match r {
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(e))) => Err(Missed::Failed(format!("rendezvous (rank {rank}): {e}"))),
            Ok(Err(_)) => Err(Missed::Failed("the worker's agent dropped the rendezvous".into())),
            Err(_) => Err(Missed::Failed(format!(
                "rendezvous (rank {rank}, attempt {attempt}): the other ranks did not all join within {timeout:?}"
            ))),
        },
    }
}
