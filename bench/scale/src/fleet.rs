//! Simulated workers: each holds its own connection (its own tonic `Channel`), registers,
//! keeps an Assignments stream open, renews its lease at the interval the coordinator names,
//! and plays the trials it is assigned according to a [`Behaviour`]. They speak
//! `chorus.v1.WorkerService` the way `chorus-worker` does (same deadlines, same reactions to
//! NOT_FOUND and ABORTED), but run no process: a trial is a loop of ReportTrial calls.

use crate::stats::Stats;
use anyhow::Context;
use chorus_proto::pb;
use chorus_proto::pb::worker_service_client::WorkerServiceClient;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

/// The deadline `chorus-worker` puts on each call.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a failed call a simulated worker waits before it tries again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How metric events are encoded: older coordinators read only the JSON text, newer ones the
/// typed step and values (and the JSON text only when `values` is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Typed,
    Json,
    Both,
}

impl Encoding {
    fn metric(self, step: i64, loss: f64) -> pb::Metric {
        let typed = matches!(self, Encoding::Typed | Encoding::Both);
        let json = matches!(self, Encoding::Json | Encoding::Both);
        pb::Metric {
            json: if json {
                serde_json::json!({"step": step, "loss": loss}).to_string()
            } else {
                String::new()
            },
            step: typed.then_some(step),
            values: if typed {
                HashMap::from([("loss".to_string(), loss)])
            } else {
                HashMap::new()
            },
        }
    }
}

/// What a simulated worker does with an assignment.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Reports Started, then metric events back to back (each call awaits the previous
    /// answer), `events_per_call` per ReportTrial; after `steps` steps (if set) it exits
    /// succeeded and the slot takes the next assignment.
    Report { events_per_call: u32, steps: Option<u64> },
    /// Started, one metric and Exited succeeded in a single report: a trial that ends at once.
    Finish,
}

/// State every simulated worker shares.
pub struct Shared {
    pub url: String,
    pub encoding: Encoding,
    pub behaviour: Behaviour,
    pub stats: Stats,
    /// Set at the end of the run: trials stop reporting, heartbeats stop.
    stop: watch::Sender<bool>,
    /// When set, the fleet sends at most this many metric reports in all, then trials idle.
    report_budget: Option<u64>,
    reports_claimed: AtomicU64,
    /// Attempts held right now, across the fleet.
    pub held: AtomicU64,
}

impl Shared {
    pub fn new(url: String, encoding: Encoding, behaviour: Behaviour, report_budget: Option<u64>) -> Arc<Shared> {
        Arc::new(Shared {
            url,
            encoding,
            behaviour,
            stats: Stats::new(),
            stop: watch::channel(false).0,
            report_budget,
            reports_claimed: AtomicU64::new(0),
            held: AtomicU64::new(0),
        })
    }

    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Takes one report from the budget; false while it is spent.
    fn claim_report(&self) -> bool {
        match self.report_budget {
            None => true,
            Some(b) => self
                .reports_claimed
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| (c < b).then_some(c + 1))
                .is_ok(),
        }
    }

    /// Gives back a report taken from the budget that was never made (its trial was stopped),
    /// so the run still makes the number of reports it set out to.
    fn unclaim_report(&self) {
        if self.report_budget.is_some() {
            self.reports_claimed.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One simulated worker.
struct Worker {
    id: String,
    client: WorkerServiceClient<Channel>,
    shared: Arc<Shared>,
    /// Attempts this worker holds, with the flag that stops each.
    running: Mutex<BTreeMap<(u64, u32), Arc<AtomicBool>>>,
    /// Bumped on each registration, so the stream task knows to reopen.
    registered: watch::Sender<u64>,
    /// The epoch the newest registration answered; every later call carries it.
    epoch: AtomicU64,
}

/// The fleet as it came up.
pub struct Fleet {
    /// From the first connection to the last registration.
    pub connect_and_register: Duration,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Connects and registers `n` workers, at most `concurrency` at a time, then starts each
    /// one's heartbeats and Assignments stream. Worker ids are `{prefix}-{i}`.
    pub async fn start(shared: &Arc<Shared>, prefix: &str, n: usize, concurrency: usize) -> anyhow::Result<Fleet> {
        let start = Instant::now();
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut joining = JoinSet::new();
        for i in 0..n {
            let shared = shared.clone();
            let gate = gate.clone();
            let id = format!("{prefix}-{i:05}");
            joining.spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore stays open");
                Worker::join(id, shared).await
            });
        }
        let mut workers = Vec::with_capacity(n);
        while let Some(res) = joining.join_next().await {
            workers.push(res.context("a worker's start panicked")??);
        }
        let connect_and_register = start.elapsed();
        let mut tasks = JoinSet::new();
        for w in workers {
            let interval = w.1;
            let w = Arc::new(w.0);
            tasks.spawn(w.clone().heartbeats(interval));
            tasks.spawn(w.assignments());
        }
        Ok(Fleet {
            connect_and_register,
            tasks,
        })
    }

    /// Ends every worker's tasks (their connections close with them).
    pub async fn shutdown(mut self, shared: &Shared) {
        shared.stop();
        // Trials finish their call in flight; anything slower is cut.
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

fn call<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(RPC_TIMEOUT);
    r
}

impl Worker {
    async fn join(id: String, shared: Arc<Shared>) -> anyhow::Result<(Worker, Duration)> {
        let channel = Endpoint::from_shared(shared.url.clone())?
            .connect_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .with_context(|| format!("{id} cannot connect to {}", shared.url))?;
        let client = WorkerServiceClient::new(channel)
            .max_decoding_message_size(chorus_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(chorus_proto::MAX_MESSAGE_BYTES);
        let w = Worker {
            id,
            client,
            shared,
            running: Mutex::new(BTreeMap::new()),
            registered: watch::channel(0).0,
            epoch: AtomicU64::new(0),
        };
        let interval = w.register().await?;
        Ok((w, interval))
    }

    /// Registers (again), listing what it still runs; returns the heartbeat interval.
    async fn register(&self) -> anyhow::Result<Duration> {
        let req = pb::RegisterRequest {
            worker_id: self.id.clone(),
            capacity: Some(pb::Resources { cpus: 1, gpus: 0 }),
            labels: HashMap::new(),
            address: "127.0.0.1:0".into(),
            running: self.running_list(),
            // One instance per load generator process: a worker that re-registers after a
            // lapse is the same instance and takes its id back at once.
            instance: format!("scale-{}", std::process::id()),
        };
        let t = Instant::now();
        let resp = self
            .client
            .clone()
            .register(call(req))
            .await
            .with_context(|| format!("{} cannot register", self.id))?
            .into_inner();
        self.shared.stats.register.record(t.elapsed());
        self.shared.stats.registrations.inc();
        for k in &resp.kill {
            self.stop_attempt(k.trial_id, k.attempt);
        }
        // Before the others hear of the registration: every later call carries it.
        self.epoch.store(resp.epoch, Ordering::Relaxed);
        self.registered.send_modify(|n| *n += 1);
        Ok(match resp.heartbeat_interval_ms {
            0 => Duration::from_secs(2),
            ms => Duration::from_millis(ms),
        })
    }

    /// The epoch of this worker's newest registration.
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    fn running_list(&self) -> Vec<pb::RunningAttempt> {
        self.running
            .lock()
            .expect("running lock")
            .keys()
            .map(|&(trial_id, attempt)| pb::RunningAttempt {
                trial_id,
                attempt,
                rank: 0,
            })
            .collect()
    }

    fn stop_attempt(&self, trial: u64, attempt: u32) {
        if let Some(flag) = self.running.lock().expect("running lock").get(&(trial, attempt)) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Renews the lease until the run stops. Starts at a random phase within the interval, as
    /// workers started at different moments would.
    async fn heartbeats(self: Arc<Self>, every: Duration) {
        let phase = every.mul_f64(rand::random::<f64>());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = self.shared.stop.subscribe();
        let stats = &self.shared.stats;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            let req = pb::HeartbeatRequest {
                worker_id: self.id.clone(),
                running: self.running_list(),
                epoch: self.epoch(),
                leaving: false,
            };
            let t = Instant::now();
            let res = self.client.clone().heartbeat(call(req)).await;
            stats.heartbeat.record(t.elapsed());
            match res {
                Ok(r) => {
                    stats.heartbeats.inc();
                    for k in &r.into_inner().kill {
                        self.stop_attempt(k.trial_id, k.attempt);
                    }
                }
                Err(s) if s.code() == Code::NotFound => {
                    // The coordinator let the lease lapse: rejoin, as chorus-worker does.
                    stats.lapses.inc();
                    while !self.shared.stopped() && self.register().await.is_err() {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                Err(_) => stats.heartbeat_errors.inc(),
            }
        }
    }

    /// Keeps the Assignments stream open and plays each assignment it brings.
    async fn assignments(self: Arc<Self>) {
        let mut registered = self.registered.subscribe();
        let mut stop = self.shared.stop.subscribe();
        let mut trials = JoinSet::new();
        while !self.shared.stopped() {
            registered.mark_unchanged();
            let opened = self
                .client
                .clone()
                .assignments(call(pb::AssignmentsRequest {
                    worker_id: self.id.clone(),
                    epoch: self.epoch(),
                }))
                .await;
            let mut stream = match opened {
                Ok(s) => s.into_inner(),
                Err(_) => {
                    self.shared.stats.stream_breaks.inc();
                    // Not registered any more: wait for the heartbeat task to rejoin.
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = registered.changed() => {}
                        _ = tokio::time::sleep(RETRY_PAUSE * 4) => {}
                    }
                    continue;
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    // A new registration replaces the stream on the coordinator's side.
                    _ = registered.changed() => break,
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(cmd)) => match cmd.command {
                        Some(pb::worker_command::Command::Assign(a)) => {
                            let flag = Arc::new(AtomicBool::new(false));
                            let fresh = self
                                .running
                                .lock()
                                .expect("running lock")
                                .insert((a.trial_id, a.attempt), flag.clone())
                                .is_none();
                            if fresh {
                                self.shared.stats.assignments.inc();
                                self.shared.held.fetch_add(1, Ordering::Relaxed);
                                trials.spawn(self.clone().play(a.trial_id, a.attempt, flag));
                            }
                        }
                        Some(pb::worker_command::Command::Kill(k)) => {
                            self.shared.stats.kills.inc();
                            self.stop_attempt(k.trial_id, k.attempt);
                        }
                        None => {}
                    },
                    Ok(None) | Err(_) => {
                        if !self.shared.stopped() {
                            self.shared.stats.stream_breaks.inc();
                        }
                        break;
                    }
                }
            }
        }
        while trials.join_next().await.is_some() {}
    }

    /// One assignment, played until it ends, is stopped, or the run stops.
    async fn play(self: Arc<Self>, trial: u64, attempt: u32, killed: Arc<AtomicBool>) {
        let shared = self.shared.clone();
        let mut seq = 0u64;
        let mut event = |kind| {
            seq += 1;
            pb::TrialEvent {
                seq,
                unix_ms: unix_ms(),
                kind: Some(kind),
            }
        };
        use pb::trial_event::Kind;
        let exited = || {
            Kind::Exited(pb::Exited {
                kind: pb::ExitKind::Succeeded as i32,
                code: Some(0),
                message: String::new(),
            })
        };
        match shared.behaviour {
            Behaviour::Finish => {
                let events = vec![
                    event(Kind::Started(pb::Started::default())),
                    event(Kind::Metric(shared.encoding.metric(1, loss(trial, 1)))),
                    event(exited()),
                ];
                while !shared.stopped() {
                    match self.report(trial, attempt, events.clone(), 1).await {
                        Outcome::Retry => tokio::time::sleep(RETRY_PAUSE).await,
                        Outcome::Done | Outcome::Gone => break,
                    }
                }
                shared.stats.trials_finished.inc();
            }
            Behaviour::Report { events_per_call, steps } => {
                let started = vec![event(Kind::Started(pb::Started::default()))];
                let mut gone = matches!(self.report(trial, attempt, started, 0).await, Outcome::Gone);
                let mut step = 0i64;
                while !gone && !shared.stopped() && !killed.load(Ordering::Relaxed) {
                    if !shared.claim_report() {
                        // Budget spent for now: a report given back may still free one.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    let mut events = Vec::with_capacity(events_per_call as usize + 1);
                    for _ in 0..events_per_call {
                        step += 1;
                        events.push(event(Kind::Metric(shared.encoding.metric(step, loss(trial, step)))));
                    }
                    let last = steps.is_some_and(|s| step as u64 >= s);
                    if last {
                        events.push(event(exited()));
                    }
                    loop {
                        match self.report(trial, attempt, events.clone(), events_per_call).await {
                            Outcome::Done => break,
                            Outcome::Gone => {
                                shared.unclaim_report();
                                gone = true;
                                break;
                            }
                            // The same events again: the coordinator skips sequence numbers it
                            // has applied, as for a worker's resend.
                            Outcome::Retry if shared.stopped() => {
                                shared.unclaim_report();
                                break;
                            }
                            Outcome::Retry => tokio::time::sleep(RETRY_PAUSE).await,
                        }
                    }
                    if last {
                        shared.stats.trials_finished.inc();
                        break;
                    }
                }
            }
        }
        self.running.lock().expect("running lock").remove(&(trial, attempt));
        shared.held.fetch_sub(1, Ordering::Relaxed);
    }

    async fn report(&self, trial: u64, attempt: u32, events: Vec<pb::TrialEvent>, metrics: u32) -> Outcome {
        let req = pb::ReportTrialRequest {
            worker_id: self.id.clone(),
            trial_id: trial,
            attempt,
            events,
            rank: 0,
            epoch: self.epoch(),
        };
        let stats = &self.shared.stats;
        let t = Instant::now();
        let res = self.client.clone().report_trial(call(req)).await;
        stats.report.record(t.elapsed());
        match res {
            Ok(_) => {
                stats.reports.inc();
                stats.metric_events.add(u64::from(metrics));
                Outcome::Done
            }
            Err(s) if matches!(s.code(), Code::Aborted | Code::NotFound | Code::FailedPrecondition) => {
                stats.stale_reports.inc();
                Outcome::Gone
            }
            Err(_) => {
                stats.report_errors.inc();
                Outcome::Retry
            }
        }
    }
}

enum Outcome {
    Done,
    /// The attempt is no longer current: drop it.
    Gone,
    Retry,
}

/// A loss curve that falls with the step, scaled per trial by a factor in [1, 2): the median
/// stopping rule then has both trials to keep and trials to stop.
fn loss(trial: u64, step: i64) -> f64 {
    let scale = 1.0 + (trial.wrapping_mul(7919) % 100) as f64 / 100.0;
    scale / (1.0 + 0.01 * step as f64)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
