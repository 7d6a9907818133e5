//! The worker's side of `WorkerService`, and the only code that talks to the coordinator.
//!
//! One supervisor task owns the link: connect, Register (naming the attempts still held here),
//! open the Assignments stream, then heartbeat and apply commands until something breaks, and
//! start over with backoff. Trials never depend on the link: a lost coordinator only pauses
//! report delivery. Each attempt has its own delivery task holding its events in order until
//! the coordinator acknowledges them, so reports survive any outage the worker itself survives.
//!
//! Every Register answers an epoch, and every later call carries the latest one. A call refused
//! as fenced (ABORTED naming the epoch, see [`is_fenced`]) under the current epoch means a newer
//! registration of this worker id replaced this process: it kills its trials without reporting
//! them and exits. Refused under an older epoch, it only means this process registered again
//! meanwhile, and the call is retried under the new one.

use crate::attempts::{AttemptKey, Attempts, Held};
use crate::config::{Timings, WorkerConfig};
use crate::error::WorkerError;
use crate::runner::containment::{Containment, DataDirLock};
use crate::runner::environment::TrialEnv;
use crate::runner::rendezvous::RendezvousCall;
use crate::runner::{self, Events, ReportFlow, RunnerContext, Stop, StorageCache};
use chorus_core::TrialId;
use chorus_proto::MAX_MESSAGE_BYTES;
use chorus_proto::pb::{self, trial_event::Kind, worker_command::Command, worker_service_client::WorkerServiceClient};
use prost::Message;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status, Streaming};
use tracing::{debug, error, info, warn};

/// Most events in one ReportTrial; a batch this size is a few hundred KiB at most.
const MAX_BATCH_EVENTS: usize = 500;
/// Malformed lines carry up to 64 KiB each; keep a batch well inside the message limit.
const MAX_BATCH_BYTES: usize = MAX_MESSAGE_BYTES / 4;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Used when the coordinator names no heartbeat interval.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Deadline of one Rendezvous call: the coordinator holds it up to 20 s while ranks are missing.
const RENDEZVOUS_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a stopped attempt gets for its last checkpoint and records, beyond the kill grace.
const FINAL_UPLOAD_BUDGET: Duration = Duration::from_secs(30);
/// How long a shutting-down worker waits for the coordinator to acknowledge that it is leaving
/// before it stops its trials anyway (the grace period is the budget it comes out of).
const LEAVING_TIMEOUT: Duration = Duration::from_secs(3);

pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, BearerAuth>>;

/// Adds the worker token to every call.
#[derive(Clone)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>) -> Result<Self, WorkerError> {
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| WorkerError::Config("the worker token must be printable ASCII".into()))
            })
            .transpose()?;
        Ok(BearerAuth { header })
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// The coordinator as delivery tasks see it: `Some` only once Register succeeded and the stream
/// is open, so buffered reports go out after the coordinator knows this worker again.
type Link = Option<Linked>;

/// A registered connection and the epoch its Register answered, which every call carries.
#[derive(Clone)]
struct Linked {
    client: WorkerClient,
    epoch: u64,
}

/// Whether a refusal says the caller's registration was fenced by a newer one of its worker id.
/// The coordinator answers ABORTED with "epoch" and "fenced" in the message; a stale *attempt*
/// is ABORTED too but never names an epoch.
pub fn is_fenced(status: &Status) -> bool {
    if status.code() != Code::Aborted {
        return false;
    }
    let message = status.message().to_ascii_lowercase();
    message.contains("epoch") && message.contains("fenced")
}

struct Session {
    client: WorkerClient,
    epoch: u64,
    heartbeat_every: Duration,
    commands: Streaming<pb::WorkerCommand>,
}

/// How one report batch ended.
enum Delivery {
    Acknowledged,
    /// ABORTED (or NOT_FOUND: the trial is unknown): the coordinator has moved on from this
    /// attempt, and no retry will change its mind.
    Stale,
    /// The coordinator will never accept this batch; retrying would jam the attempt's queue.
    Rejected(Status),
    /// This process was replaced; nothing more of it is reported.
    Fenced,
}

pub(crate) struct Agent {
    worker_id: String,
    instance: String,
    coordinator: String,
    capacity: pb::Resources,
    labels: HashMap<String, String>,
    timings: Timings,
    endpoint: Endpoint,
    auth: BearerAuth,
    has_token: bool,
    attempts: Attempts,
    runner: RunnerContext,
    link: watch::Sender<Link>,
    /// The epoch of this process's latest registration.
    epoch: AtomicU64,
    /// Set (to the coordinator's words) once a newer registration of this worker id fenced this
    /// process.
    fenced: watch::Sender<Option<String>>,
    /// Shutting down: no new attempt starts, and health says NOT_SERVING.
    draining: watch::Sender<bool>,
    health: Option<tonic_health::server::HealthReporter>,
    /// Runners' rendezvous requests, taken by the task that serves them.
    rendezvous_calls: std::sync::Mutex<Option<mpsc::UnboundedReceiver<RendezvousCall>>>,
    /// Held for the worker's lifetime; the kernel drops it when the process dies, however it dies.
    _data_dir_lock: DataDirLock,
}

impl Agent {
    /// `lock` is the data directory's: the start kills whatever the directory's records name,
    /// which must never be a live worker's trials. The advertise address must be resolved.
    pub fn new(
        config: WorkerConfig,
        lock: DataDirLock,
        health: Option<tonic_health::server::HealthReporter>,
        gpu_sampler: Option<Arc<dyn crate::gpu::telemetry::GpuSampler>>,
    ) -> Result<Arc<Self>, WorkerError> {
        let url = crate::config::coordinator_url(&config.coordinator)?;
        let advertise_address = config
            .advertise_address
            .ok_or_else(|| WorkerError::Config("the advertise address was not resolved".into()))?;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|source| WorkerError::CoordinatorUrl {
                url: url.clone(),
                source,
            })?
            .connect_timeout(config.timings.connect_timeout)
            .tcp_nodelay(true)
            // A coordinator that vanished without closing the connection (host lost, partition)
            // must still end the stream, or this worker would wait on it forever.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            tls = match &config.tls.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(&ca.pem)),
                None => tls.with_native_roots(),
            };
            if let Some((cert, key)) = &config.tls.identity {
                tls = tls.identity(Identity::from_pem(&cert.pem, &key.pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| WorkerError::CoordinatorUrl { url, source })?;
        } else if config.tls.is_set() {
            return Err(WorkerError::Config(format!(
                "TLS files are set but the coordinator {url} is plain http"
            )));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(WorkerError::io(&config.data_dir))?;
        // Under the data directory's lock, so two processes never race to create it.
        let instance = match config.instance {
            Some(i) => i,
            None => crate::config::load_or_create_instance(&config.data_dir)?,
        };
        let containment = Arc::new(Containment::for_worker(config.containment, &config.data_dir)?);
        let gpus = u32::try_from(config.gpu_ids.len()).unwrap_or(u32::MAX);
        let (rendezvous_tx, rendezvous_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Agent {
            auth: BearerAuth::new(config.token.as_deref())?,
            has_token: config.token.is_some(),
            capacity: pb::Resources {
                cpus: config.slots,
                gpus,
            },
            labels: config.labels.into_iter().collect(),
            attempts: Attempts::new(config.slots, config.gpu_ids.clone()),
            runner: RunnerContext {
                worker_id: config.worker_id.clone(),
                data_dir: config.data_dir,
                stores: StorageCache::new(config.storage),
                kill_grace: config.timings.kill_grace,
                output_grace: config.timings.output_grace,
                store_retry: config.timings.store_retry,
                advertise_address,
                collective_timeout: config.timings.collective_timeout,
                rendezvous_timeout: config.timings.rendezvous_timeout,
                rendezvous: Some(rendezvous_tx),
                containment,
                trial_env: TrialEnv::from_worker(&config.trial_env),
                gpus: config.gpu_ids,
                gpu_sampling: gpu_sampler.map(|sampler| crate::runner::GpuSampling {
                    sampler,
                    every: config.timings.gpu_sample_every,
                }),
            },
            rendezvous_calls: std::sync::Mutex::new(Some(rendezvous_rx)),
            worker_id: config.worker_id,
            instance,
            coordinator: config.coordinator,
            timings: config.timings,
            endpoint,
            link: watch::channel(None).0,
            epoch: AtomicU64::new(0),
            fenced: watch::channel(None).0,
            draining: watch::channel(false).0,
            health,
            _data_dir_lock: lock,
        }))
    }

    /// What the worker's `/metrics` shows of it; short lock sections only, so it may run on the
    /// async runtime.
    pub fn gauges(&self) -> crate::metrics::WorkerGauges {
        let usage = self.attempts.usage();
        crate::metrics::WorkerGauges {
            registered: self.link.borrow().is_some(),
            slots: self.capacity.cpus,
            slots_busy: usage.cpus_busy,
            gpus: self.capacity.gpus,
            gpus_busy: usage.gpus_busy,
            attempts_running: usage.running,
            attempts_held: usage.held,
        }
    }

    /// Serves until `shutdown` completes, then stops every trial, delivers what it can of their
    /// reports and returns. Returns early only when the very first registration is refused for
    /// a reason retrying cannot fix (a bad token, say).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        info!(
            worker_id = %self.worker_id,
            instance = %self.instance,
            coordinator = %self.coordinator,
            advertise_address = %self.runner.advertise_address,
            slots = self.capacity.cpus,
            gpus = self.capacity.gpus,
            data_dir = %self.runner.data_dir.display(),
            containment = %self.runner.containment.describe(),
            "worker starting"
        );
        // Before registering: an attempt the coordinator hands out next must not run beside
        // what an earlier run of this worker left.
        let leftovers = self.runner.containment.kill_leftovers().await?;
        if leftovers > 0 {
            info!(
                attempts = leftovers,
                "killed the processes an earlier run of this worker left behind"
            );
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let calls = self.rendezvous_calls.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Ends with this call: the task holds the agent (and so the data directory's lock),
        // which a worker started again in the same process must be able to take.
        let _rendezvous = calls.map(|mut calls| {
            let agent = self.clone();
            AbortOnDrop(tokio::spawn(async move {
                while let Some(call) = calls.recv().await {
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        let answer = agent.rendezvous(call.request).await;
                        let _ = call.reply.send(answer);
                    });
                }
            }))
        });
        if let Some(reporter) = self.health.clone() {
            tokio::spawn(report_health(
                reporter,
                self.link.subscribe(),
                self.draining.subscribe(),
            ));
        }
        let mut supervisor = tokio::spawn(self.clone().supervise(stop_rx));
        let mut fenced = self.fenced.subscribe();
        tokio::pin!(shutdown);
        tokio::select! {
            _ = &mut shutdown => {}
            () = async { let _ = fenced.wait_for(Option::is_some).await; } => {
                supervisor.abort();
                return Err(self.replaced().await);
            }
            r = &mut supervisor => {
                let r = r.unwrap_or_else(|e| Err(WorkerError::Task(e.to_string())));
                if let Err(WorkerError::Fenced { .. }) = r {
                    return Err(self.replaced().await);
                }
                self.attempts.stop_all(Stop::Shutdown);
                return r;
            }
        }

        self.draining.send_replace(true);
        info!(
            attempts = self.attempts.running().len(),
            "shutting down: stopping trials, flushing their reports"
        );
        self.announce_leaving().await;
        self.attempts.stop_all(Stop::Shutdown);
        let drain = async {
            let stopping =
                self.timings.kill_grace + self.timings.output_grace + self.timings.store_retry + FINAL_UPLOAD_BUDGET;
            if tokio::time::timeout(stopping, self.attempts.wait_until(Held::NoRunner))
                .await
                .is_err()
            {
                warn!(budget = ?stopping, "some trials had not finished stopping; leaving them");
            }
            if tokio::time::timeout(self.timings.shutdown_flush, self.attempts.wait_until(Held::Nothing))
                .await
                .is_err()
            {
                warn!(
                    attempts = self.attempts.running().len(),
                    "exiting with undelivered reports; the coordinator's lease handling covers those attempts"
                );
            }
        };
        // Replaced while draining: what the trials would still write belongs to the instance
        // that replaced this one.
        tokio::select! {
            () = drain => {}
            () = async { let _ = fenced.wait_for(Option::is_some).await; } => {
                supervisor.abort();
                return Err(self.replaced().await);
            }
        }
        let _ = stop_tx.send(true);
        supervisor
            .await
            .unwrap_or_else(|e| Err(WorkerError::Task(e.to_string())))
    }

    /// Tells the coordinator this worker is going, before its trials are stopped: the attempts
    /// it hands back must be placed elsewhere, not on it again in the moment before it leaves.
    /// Best effort and brief: without a link the lease handling covers it.
    async fn announce_leaving(&self) {
        let Some(Linked { client, epoch }) = self.link.borrow().clone() else {
            return;
        };
        let beat = pb::HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            running: self.attempts.running(),
            epoch,
            leaving: true,
        };
        let mut req = self.request(beat);
        req.set_timeout(LEAVING_TIMEOUT);
        match tokio::time::timeout(LEAVING_TIMEOUT, client.clone().heartbeat(req)).await {
            Ok(Ok(_)) => debug!("the coordinator knows this worker is leaving"),
            Ok(Err(s)) => warn!(status = %s, "cannot tell the coordinator this worker is leaving"),
            Err(_) => warn!("the coordinator did not answer the leaving heartbeat in time"),
        }
    }

    /// This process was replaced by a newer registration of its worker id: its attempts now
    /// belong to the coordinator's other placements, so they are killed without a word to the
    /// coordinator and write nothing more to storage.
    async fn replaced(&self) -> WorkerError {
        let message = self.fenced.borrow().clone().unwrap_or_default();
        self.draining.send_replace(true);
        self.link.send_replace(None);
        self.attempts.mark_all_stale();
        error!(
            worker_id = %self.worker_id,
            instance = %self.instance,
            attempts = self.attempts.running().len(),
            message,
            "replaced by a newer registration of this worker id: killing every trial and exiting"
        );
        self.attempts.stop_all(Stop::Kill(
            "the worker was replaced by a newer registration of its id".into(),
        ));
        let stopping = self.timings.kill_grace + self.timings.output_grace;
        if tokio::time::timeout(stopping, self.attempts.wait_until(Held::NoRunner))
            .await
            .is_err()
        {
            warn!(budget = ?stopping, "some trials had not finished stopping; leaving them to the guardian");
        }
        self.fenced_error()
    }

    /// Called with the refusal of a call made under `epoch`: true when it means this process
    /// was replaced (and records so, which ends [`Agent::run`]). A fence under an older epoch
    /// is this process's own newer registration: the call is simply made again.
    fn fenced_by(&self, status: &Status, epoch: u64) -> bool {
        if !is_fenced(status) || epoch < self.epoch.load(Ordering::SeqCst) {
            return false;
        }
        self.fenced.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            *f = Some(status.message().to_string());
            true
        });
        true
    }

    fn fenced_error(&self) -> WorkerError {
        WorkerError::Fenced {
            worker_id: self.worker_id.clone(),
            message: self.fenced.borrow().clone().unwrap_or_default(),
        }
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(self.timings.rpc_timeout);
        r
    }

    /// Keeps the link up until told to stop.
    async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> Result<(), WorkerError> {
        let mut backoff = Backoff::new();
        let mut ever_registered = false;
        let mut failures = 0u32;
        loop {
            let established = tokio::select! {
                r = self.establish() => r,
                _ = stopped(&mut stop) => return Ok(()),
            };
            match established {
                Ok(session) => {
                    if failures > 0 || ever_registered {
                        info!(failed_tries = failures, "registered with the coordinator again");
                    } else {
                        info!("registered with the coordinator");
                    }
                    ever_registered = true;
                    failures = 0;
                    backoff.reset();
                    self.link.send_replace(Some(Linked {
                        client: session.client.clone(),
                        epoch: session.epoch,
                    }));
                    let ended = tokio::select! {
                        e = self.session(session) => e,
                        _ = stopped(&mut stop) => return Ok(()),
                    };
                    self.link.send_replace(None);
                    if let WorkerError::Fenced { .. } = ended {
                        return Err(ended);
                    }
                    warn!(error = %ended, attempts = self.attempts.running().len(), "lost the coordinator; trials keep running while reconnecting");
                }
                Err(e @ WorkerError::Fenced { .. }) => return Err(e),
                Err(e) if !ever_registered && e.is_permanent() => {
                    error!(error = %e, "the coordinator refused this worker");
                    return Err(e);
                }
                // Once registered, a refusal because another live instance holds the id means
                // the coordinator gave this worker's id (and its attempts) to that instance:
                // this process was replaced, as surely as if a call had been fenced.
                Err(WorkerError::IdHeld { message, .. }) if ever_registered => {
                    self.fenced.send_replace(Some(message));
                    return Err(self.fenced_error());
                }
                Err(e @ WorkerError::IdHeld { .. }) => {
                    failures += 1;
                    // Said at every try while it lasts: a person watching a rollout needs to see
                    // why this pod is not taking work. The backoff keeps it to one line per 5 s.
                    warn!(error = %e, failed_tries = failures, "cannot register");
                }
                Err(e) => {
                    failures += 1;
                    // Every retry of a long outage would flood the log; the first and every 20th do.
                    if failures == 1 || failures.is_multiple_of(20) {
                        warn!(error = %e, failed_tries = failures, "cannot reach the coordinator; retrying");
                    } else {
                        debug!(error = %e, failed_tries = failures, "cannot reach the coordinator; retrying");
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut stop) => return Ok(()),
            }
        }
    }

    async fn establish(&self) -> Result<Session, WorkerError> {
        let channel = self.endpoint.connect().await.map_err(WorkerError::connect)?;
        let client = WorkerServiceClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let register = pb::RegisterRequest {
            worker_id: self.worker_id.clone(),
            capacity: Some(self.capacity),
            labels: self.labels.clone(),
            address: self.runner.advertise_address.to_string(),
            // A restarted coordinator re-attaches these instead of placing them again.
            running: self.attempts.running(),
            instance: self.instance.clone(),
        };
        let terms = client
            .clone()
            .register(self.request(register))
            .await
            .map_err(|status| match status.code() {
                Code::Unauthenticated => WorkerError::Unauthenticated {
                    has_token: self.has_token,
                    status: Box::new(status),
                },
                Code::AlreadyExists => WorkerError::IdHeld {
                    worker_id: self.worker_id.clone(),
                    message: status.message().to_string(),
                },
                _ => WorkerError::rpc("Register")(status),
            })?
            .into_inner();
        let epoch = terms.epoch;
        self.epoch.store(epoch, Ordering::SeqCst);
        self.apply_kills(&terms.kill, "the coordinator no longer wants this attempt");
        // No deadline on the call itself: it lives as long as the session. Only its opening is bounded.
        let mut opener = client.clone();
        let open = opener.assignments(pb::AssignmentsRequest {
            worker_id: self.worker_id.clone(),
            epoch,
        });
        let commands = tokio::time::timeout(self.timings.rpc_timeout, open)
            .await
            .map_err(|_| WorkerError::Timeout {
                rpc: "Assignments",
                after: self.timings.rpc_timeout,
            })?
            .map_err(|s| {
                if self.fenced_by(&s, epoch) {
                    self.fenced_error()
                } else {
                    WorkerError::rpc("Assignments")(s)
                }
            })?
            .into_inner();
        let heartbeat_every = match terms.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms),
        };
        debug!(heartbeat_every = ?heartbeat_every, lease_ttl_ms = terms.lease_ttl_ms, epoch, "lease terms");
        Ok(Session {
            client,
            epoch,
            heartbeat_every,
            commands,
        })
    }

    /// Heartbeats and applies commands until the link breaks; returns why it did.
    async fn session(self: &Arc<Self>, s: Session) -> WorkerError {
        let Session {
            client,
            epoch,
            heartbeat_every,
            mut commands,
        } = s;
        let heartbeats = async {
            let mut tick = tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let beat = pb::HeartbeatRequest {
                    worker_id: self.worker_id.clone(),
                    running: self.attempts.running(),
                    epoch,
                    leaving: *self.draining.borrow(),
                };
                match client.clone().heartbeat(self.request(beat)).await {
                    Ok(r) => self.apply_kills(&r.into_inner().kill, "the coordinator no longer wants this attempt"),
                    Err(s) if self.fenced_by(&s, epoch) => return self.fenced_error(),
                    Err(s) if s.code() == Code::NotFound => return WorkerError::Forgotten,
                    Err(s) if link_lost(&s) => return WorkerError::rpc("Heartbeat")(s),
                    Err(s) => warn!(status = %s, "heartbeat failed"),
                }
            }
        };
        let assignments = async {
            loop {
                match commands.message().await {
                    Ok(Some(cmd)) => self.handle_command(cmd),
                    Ok(None) => return WorkerError::StreamEnded,
                    Err(s) if self.fenced_by(&s, epoch) => return self.fenced_error(),
                    Err(s) => return WorkerError::rpc("Assignments")(s),
                }
            }
        };
        tokio::select! {
            e = heartbeats => e,
            e = assignments => e,
        }
    }

    fn apply_kills(&self, kills: &[pb::RunningAttempt], reason: &str) {
        for k in kills {
            let key = AttemptKey::new(k.trial_id, k.attempt, k.rank);
            // Listed as not wanted: another attempt may already run it elsewhere.
            self.attempts.mark_stale(key);
            if self.attempts.stop(key, Stop::Kill(reason.to_string())) {
                info!(trial = k.trial_id, attempt = k.attempt, reason, "killing attempt");
            }
        }
    }

    fn handle_command(self: &Arc<Self>, cmd: pb::WorkerCommand) {
        match cmd.command {
            Some(Command::Assign(a)) => self.start_attempt(a),
            Some(Command::Kill(k)) => {
                let reason = if k.reason.is_empty() {
                    "killed by the coordinator".to_string()
                } else {
                    k.reason
                };
                if self
                    .attempts
                    .stop_attempt(TrialId(k.trial_id), k.attempt, Stop::Kill(reason.clone()))
                    > 0
                {
                    info!(trial = k.trial_id, attempt = k.attempt, reason, "killing attempt");
                } else {
                    debug!(
                        trial = k.trial_id,
                        attempt = k.attempt,
                        "kill order for an attempt not running here"
                    );
                }
            }
            None => debug!("ignoring an empty command (from a newer coordinator?)"),
        }
    }

    fn start_attempt(self: &Arc<Self>, a: pb::Assignment) {
        let key = AttemptKey::new(a.trial_id, a.attempt, a.rank);
        if *self.draining.borrow() {
            warn!(
                trial = a.trial_id,
                attempt = a.attempt,
                "shutting down; not starting the assigned attempt"
            );
            return;
        }
        let Some(admission) = self.attempts.admit(key, a.resources.unwrap_or_default()) else {
            debug!(
                trial = a.trial_id,
                attempt = a.attempt,
                "ignoring a repeated assignment"
            );
            return;
        };
        if let Some(why) = &admission.overcommit {
            warn!(
                trial = a.trial_id,
                attempt = a.attempt,
                why,
                "the assignment does not fit the free resources; running it anyway"
            );
        }
        info!(
            experiment = a.experiment_id,
            trial = a.trial_id,
            attempt = a.attempt,
            command = ?a.command,
            gpus = ?admission.gpu_ids,
            "starting attempt"
        );
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let events = Events::new(events_tx);
        let flow = events.flow().clone();
        self.attempts.set_flow(key, flow.clone());
        let agent = self.clone();
        tokio::spawn(async move {
            let _release = Release {
                attempts: &agent.attempts,
                key,
                runner: true,
            };
            let exited = runner::run_attempt(&agent.runner, &a, &admission.gpu_ids, events, admission.stop).await;
            let kind = pb::ExitKind::try_from(exited.kind).map_or("unknown", |k| k.as_str_name());
            info!(trial = a.trial_id, attempt = a.attempt, kind, message = %exited.message, "attempt ended");
        });
        let agent = self.clone();
        tokio::spawn(async move {
            let _release = Release {
                attempts: &agent.attempts,
                key,
                runner: false,
            };
            agent.deliver_reports(key, events_rx, &flow).await;
            flow.close();
        });
    }

    /// Sends one attempt's events in order, in batches of whatever has queued, until `Exited`
    /// is acknowledged or the attempt turns out stale.
    async fn deliver_reports(
        &self,
        key: AttemptKey,
        mut events: mpsc::UnboundedReceiver<pb::TrialEvent>,
        flow: &ReportFlow,
    ) {
        let mut queue: VecDeque<pb::TrialEvent> = VecDeque::new();
        let mut link = self.link.subscribe();
        loop {
            if queue.is_empty() {
                match events.recv().await {
                    Some(e) => queue.push_back(e),
                    // The runner is gone without an `Exited` (it panicked); nothing more will come.
                    None => return,
                }
            }
            while let Ok(e) = events.try_recv() {
                queue.push_back(e);
            }
            let batch = front_batch(&queue);
            let n = batch.len();
            let ends = batch.iter().any(|e| matches!(e.kind, Some(Kind::Exited(_))));
            match self.report(key, batch, &mut link).await {
                Delivery::Acknowledged => {
                    flow.delivered(key.attempt, queue.make_contiguous().get(..n).unwrap_or_default());
                    queue.drain(..n);
                    if ends {
                        return;
                    }
                }
                Delivery::Stale => {
                    info!(trial = %key.trial, attempt = key.attempt, "the coordinator says this attempt is stale; dropping its reports");
                    // Before the kill: from here on the attempt writes nothing to storage.
                    flow.mark_stale();
                    self.attempts
                        .stop(key, Stop::Kill("stale attempt: the coordinator has moved on".into()));
                    return;
                }
                // The process is on its way out; the coordinator hears nothing more of it.
                Delivery::Fenced => return,
                Delivery::Rejected(status) => {
                    error!(trial = %key.trial, attempt = key.attempt, events = n, status = %status, "the coordinator rejected reports; dropping them");
                    flow.delivered(key.attempt, queue.make_contiguous().get(..n).unwrap_or_default());
                    queue.drain(..n);
                    if ends {
                        return;
                    }
                }
            }
        }
    }

    /// Joins a rendezvous, calling again while the coordinator says the other ranks are still
    /// missing or cannot be reached; the runner bounds the whole wait.
    async fn rendezvous(&self, req: pb::RendezvousRequest) -> Result<pb::RendezvousResponse, String> {
        let mut link = self.link.subscribe();
        let mut backoff = Backoff::new();
        loop {
            let Linked { client, epoch } = connected(&mut link).await;
            let mut call = Request::new(pb::RendezvousRequest { epoch, ..req.clone() });
            // Longer than the coordinator holds the call before answering DEADLINE_EXCEEDED.
            call.set_timeout(RENDEZVOUS_CALL_TIMEOUT);
            let status = match client.clone().rendezvous(call).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) => s,
            };
            if self.fenced_by(&status, epoch) {
                return Err("this worker was replaced by a newer registration of its id".into());
            }
            if is_fenced(&status) {
                // This process registered again since the call went out: call under the new epoch.
                backoff.reset();
                continue;
            }
            match status.code() {
                Code::DeadlineExceeded => {
                    debug!(
                        trial = req.trial_id,
                        rank = req.rank,
                        message = status.message(),
                        "waiting for the other ranks"
                    );
                    backoff.reset();
                    continue;
                }
                Code::Aborted | Code::NotFound => {
                    return Err(format!("the attempt is stale: {}", status.message()));
                }
                Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented | Code::PermissionDenied => {
                    return Err(status.message().to_string());
                }
                _ => {}
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = link.changed() => backoff.reset(),
            }
        }
    }

    /// One batch, retried until the coordinator answers for it.
    async fn report(&self, key: AttemptKey, events: Vec<pb::TrialEvent>, link: &mut watch::Receiver<Link>) -> Delivery {
        let mut backoff = Backoff::new();
        loop {
            let Linked { client, epoch } = connected(link).await;
            let req = pb::ReportTrialRequest {
                worker_id: self.worker_id.clone(),
                trial_id: key.trial.0,
                attempt: key.attempt,
                rank: key.rank,
                events: events.clone(),
                epoch,
            };
            let status = match client.clone().report_trial(self.request(req)).await {
                Ok(_) => return Delivery::Acknowledged,
                Err(s) => s,
            };
            if self.fenced_by(&status, epoch) {
                return Delivery::Fenced;
            }
            // Fenced under an older epoch: this process registered again meanwhile; resend
            // under the new one rather than take the ABORTED for a stale attempt.
            if is_fenced(&status) {
                backoff.reset();
                continue;
            }
            match status.code() {
                Code::Aborted | Code::NotFound => return Delivery::Stale,
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::Unimplemented => {
                    return Delivery::Rejected(status);
                }
                _ => {}
            }
            let delay = backoff.next_delay();
            debug!(trial = %key.trial, attempt = key.attempt, status = %status, retry_in = ?delay, "report not delivered");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // A new session (or a lost one) is news worth acting on at once.
                _ = link.changed() => backoff.reset(),
            }
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks its half of an attempt done even if the task ends by panic, so resources and the
/// attempt's place in the running list are not held forever.
struct Release<'a> {
    attempts: &'a Attempts,
    key: AttemptKey,
    runner: bool,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.runner {
            self.attempts.runner_done(self.key);
        } else {
            self.attempts.reports_done(self.key);
        }
    }
}

/// The events at the front of the queue that fit in one ReportTrial (always at least one).
fn front_batch(queue: &VecDeque<pb::TrialEvent>) -> Vec<pb::TrialEvent> {
    let mut bytes = 0;
    let mut batch = Vec::new();
    for e in queue.iter().take(MAX_BATCH_EVENTS) {
        bytes += e.encoded_len();
        if !batch.is_empty() && bytes > MAX_BATCH_BYTES {
            break;
        }
        batch.push(e.clone());
    }
    batch
}

/// Errors that mean the connection (or the coordinator behind it) is gone.
fn link_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Keeps the health endpoint's overall status in step: SERVING while registered and not
/// draining. Ends with the agent.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut link: watch::Receiver<Link>,
    mut draining: watch::Receiver<bool>,
) {
    loop {
        let serving = link.borrow_and_update().is_some() && !*draining.borrow_and_update();
        crate::health::report(&reporter, serving).await;
        tokio::select! {
            r = link.changed() => if r.is_err() { return },
            r = draining.changed() => if r.is_err() { return },
        }
    }
}

async fn connected(link: &mut watch::Receiver<Link>) -> Linked {
    loop {
        let up = link.borrow_and_update().clone();
        if let Some(client) = up {
            return client;
        }
        if link.changed().await.is_err() {
            // The agent is gone; so is any reason to deliver.
            std::future::pending::<()>().await;
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Exponential backoff from 100 ms doubling to 5 s, each delay drawn from its upper half so
/// workers that lost the same coordinator do not all come back in the same instant.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(BACKOFF_MAX);
        base.mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds_with_jitter() {
        let mut b = Backoff::new();
        let mut bases = Vec::new();
        for _ in 0..10 {
            let base = b.next;
            let d = b.next_delay();
            assert!(d >= base / 2 && d <= base, "{d:?} outside [{:?}, {base:?}]", base / 2);
            bases.push(base.as_millis());
        }
        assert_eq!(bases, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn batches_respect_count_and_size_limits() {
        let small = |seq| pb::TrialEvent {
            seq,
            unix_ms: 0,
            kind: Some(Kind::Metric(pb::Metric {
                step: Some(seq as i64),
                values: [("x".to_string(), 1.0)].into(),
                ..Default::default()
            })),
        };
        let q: VecDeque<_> = (1..=1200).map(small).collect();
        let b = front_batch(&q);
        assert_eq!(b.len(), MAX_BATCH_EVENTS);
        assert_eq!(b[0].seq, 1);

        let big = |seq| pb::TrialEvent {
            seq,
            unix_ms: 0,
            kind: Some(Kind::Malformed(pb::MalformedMetric {
                line: "x".repeat(MAX_BATCH_BYTES / 3),
                error: String::new(),
            })),
        };
        let q: VecDeque<_> = (1..=10).map(big).collect();
        assert_eq!(front_batch(&q).len(), 2);
        let huge = pb::TrialEvent {
            seq: 1,
            unix_ms: 0,
            kind: Some(Kind::Malformed(pb::MalformedMetric {
                line: "x".repeat(MAX_BATCH_BYTES * 2),
                error: String::new(),
            })),
        };
        assert_eq!(front_batch(&VecDeque::from([huge])).len(), 1);
    }

    #[test]
    fn only_an_epoch_fence_counts_as_replaced() {
        assert!(is_fenced(&Status::aborted(
            "worker w1: epoch 3 is fenced by a newer registration (epoch 4)"
        )));
        assert!(is_fenced(&Status::aborted("Worker w1 FENCED: stale Epoch 3")));
        // A stale attempt is ABORTED too, without an epoch.
        assert!(!is_fenced(&Status::aborted("attempt 2 of trial 7 is stale")));
        assert!(!is_fenced(&Status::aborted("epoch 3 is older")));
        assert!(!is_fenced(&Status::failed_precondition("epoch 3 is fenced")));
    }

    #[test]
    fn the_token_goes_in_a_bearer_header() {
        let mut auth = BearerAuth::new(Some("s3cret")).unwrap();
        let req = auth.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer s3cret");
        let mut none = BearerAuth::new(None).unwrap();
        assert!(
            none.call(Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .is_none()
        );
        assert!(BearerAuth::new(Some("bad\ntoken")).is_err());
    }
}
