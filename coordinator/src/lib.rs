//! The Chorus coordinator: one gRPC server that runs hyperparameter sweeps. It owns the
//! durable store (experiments, trials, attempts, metric summaries, searcher state), the
//! scheduler, the worker registry and its leases, and the reconcile loop that repairs
//! whatever messages were lost; the searchers it drives live in `chorus-search`.
//!
//! It must not train anything, link tch, or move tensors and checkpoints: workers do that
//! and tell it object-store keys. Its searchers and scheduler stay pure (no I/O, no clock).
//!
//! Map: `api/` (one file per gRPC service, protobuf converted in `api/convert.rs`), `state/`
//! (every transition, one file per concern), `store/` (SQLite and its writer thread, the data
//! directory's lock, online backup), `protocol.rs` (what workers and the coordinator say, as
//! domain types), `tls.rs` (rustls, certificate reload, client certificates), `clock.rs`.
//!
//! Running in a pod: one coordinator per data directory (a second one refuses to start, naming
//! the holder of `DATA_DIR/LOCK`); every worker registration gets an epoch that fences the older
//! registrations of its worker id; gRPC is served over TLS (mutual TLS optional), which a
//! coordinator bound off loopback requires unless told `insecure`; health reports SERVING once
//! the store is loaded and NOT_SERVING from the start of a shutdown.

pub(crate) mod api;
pub mod clock;
pub(crate) mod cluster;
pub(crate) mod continuation;
pub mod error;
pub(crate) mod experiment;
pub(crate) mod history;
pub(crate) mod logs;
pub(crate) mod protocol;
pub(crate) mod purge;
pub(crate) mod rendezvous;
pub(crate) mod scheduler;
pub(crate) mod shards;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod telemetry;
pub mod tls;
pub(crate) mod trial;

pub use crate::api::auth::Tokens;
pub use crate::state::Timing;
pub use crate::store::backup::{BackupReport, backup};
pub use crate::store::lock::DataDirLock;
pub use crate::tls::TlsOptions;

use crate::api::auth::{AuthInterceptor, Role};
use crate::clock::Clock;
use crate::error::{CoordError, Result};
use crate::state::{Change, State};
use chorus_core::ExperimentId;
use chorus_core::limits::BudgetLimits;
use chorus_core::storage::{Storage, StorageOptions, StorageUri};
use chorus_core::storage_policy::{StorageLocation, StoragePolicy};
use chorus_proto::pb::experiment_lifecycle_service_server::ExperimentLifecycleServiceServer;
use chorus_proto::pb::experiment_service_server::ExperimentServiceServer;
use chorus_proto::pb::worker_service_server::WorkerServiceServer;
use object_store::ObjectStoreExt;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

/// Everything a coordinator is started with.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// Storage for experiments whose spec names none; `file://{data_dir}/storage` if unset.
    pub default_storage: Option<String>,
    pub storage: StorageOptions,
    pub tokens: Tokens,
    pub timing: Timing,
    pub reconcile_interval: Duration,
    /// Where to serve Prometheus `/metrics` over HTTP; not served when `None`.
    pub metrics_listener: Option<std::net::SocketAddr>,
    /// Where to serve `grpc.health.v1` alone in plain text (probes that cannot speak TLS);
    /// not served when `None`.
    pub health_listener: Option<std::net::SocketAddr>,
    /// Storage prefixes experiments may use, besides the default storage (always allowed).
    pub allowed_storage: Vec<String>,
    /// Accept `memory://` storage, which each process keeps to itself: for tests only.
    pub allow_memory_storage: bool,
    /// What one experiment may ask for (trials, trials at once, restarts per trial).
    pub budgets: BudgetLimits,
    /// Where the coordinator reads the time: the system clocks, or one a test moves.
    pub clock: Clock,
    /// Serve gRPC over TLS with these files; plain HTTP/2 when `None`.
    pub tls: Option<TlsOptions>,
    /// Serve without TLS on a non-loopback address (a private network, a mesh that encrypts).
    pub insecure: bool,
}

impl Options {
    pub fn new(data_dir: PathBuf) -> Self {
        Options {
            data_dir,
            default_storage: None,
            storage: StorageOptions::default(),
            tokens: Tokens::default(),
            timing: Timing::default(),
            reconcile_interval: Duration::from_millis(500),
            metrics_listener: None,
            health_listener: None,
            allowed_storage: Vec::new(),
            allow_memory_storage: false,
            budgets: BudgetLimits::default(),
            clock: Clock::system(),
            tls: None,
            insecure: false,
        }
    }

    /// Whether serving on `addr` with these options is allowed: on loopback, anything; off it,
    /// a user token, a worker token (or client certificates under mutual TLS), and TLS unless
    /// `insecure`. The error says what to set.
    pub fn check_exposure(&self, addr: std::net::SocketAddr) -> std::result::Result<(), String> {
        if addr.ip().is_loopback() {
            return Ok(());
        }
        let mtls = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if self.tokens.user.is_empty() || (self.tokens.worker.is_empty() && !mtls) {
            return Err(format!(
                "refusing to listen on {addr} without authentication: set a user token (--token / CHORUS_TOKEN) \
                 and a worker token (--worker-token / CHORUS_WORKER_TOKEN, or client certificates with \
                 --tls-client-ca / CHORUS_TLS_CLIENT_CA), or bind to a loopback address"
            ));
        }
        if self.tls.is_none() && !self.insecure {
            return Err(format!(
                "refusing to listen on {addr} without TLS, which would send tokens in clear text: set \
                 --tls-cert and --tls-key (CHORUS_TLS_CERT / CHORUS_TLS_KEY), or pass --insecure \
                 (CHORUS_INSECURE=true) where the network itself is private"
            ));
        }
        Ok(())
    }
}

/// Shared by every handler and the reconcile loop.
pub(crate) struct Coordinator {
    state: Arc<Mutex<State>>,
    /// Changes, announced once durable.
    events: broadcast::Sender<Change>,
    /// Storage for experiments whose spec names none, normalised.
    pub default_storage: StorageLocation,
    policy: StoragePolicy,
    /// The store's cluster id, the last segment of every new experiment's storage.
    cluster_id: String,
    /// What one experiment may ask for (trials, trials at once, restarts per trial).
    pub budgets: BudgetLimits,
    storage_options: StorageOptions,
    /// Opened stores by URI: opening S3 or GCS clients is not free.
    stores: Mutex<HashMap<String, Storage>>,
}

impl Coordinator {
    /// Opens (or creates) the data directory and rebuilds the state from its store.
    pub fn open(opts: &Options) -> Result<Coordinator> {
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|e| CoordError::FailedPrecondition(format!("cannot create {}: {e}", opts.data_dir.display())))?;
        let data_dir = opts
            .data_dir
            .canonicalize()
            .map_err(|e| CoordError::FailedPrecondition(format!("{}: {e}", opts.data_dir.display())))?;
        let default_storage = match &opts.default_storage {
            Some(s) => s.clone(),
            None => StorageUri::from_dir(&data_dir.join("storage"))?.as_str().to_string(),
        };
        let policy = StoragePolicy::new(
            opts.allowed_storage
                .iter()
                .map(String::as_str)
                .chain([default_storage.as_str()]),
            opts.allow_memory_storage,
        )?;
        let default_storage = policy.check(&default_storage)?;
        let db = data_dir.join(store::DB_FILE);
        let store = store::Store::open(&db).map_err(|e| match CoordError::store_write(&db, e) {
            CoordError::StoreWrite { full, free, source, .. } => CoordError::FailedPrecondition(format!(
                "cannot open the coordinator store {}: {source}{}",
                db.display(),
                if full {
                    format!(
                        " (disk full: {} bytes free in {})",
                        free.unwrap_or(0),
                        data_dir.display()
                    )
                } else {
                    String::new()
                }
            )),
            other => other,
        })?;
        let (events, _) = broadcast::channel(4096);
        let state = State::load(&store, opts.timing.clone(), opts.clock.clone(), Default::default())?;
        let cluster_id = state.cluster_id().to_string();
        let state = Arc::new(Mutex::new(state));
        State::attach(&state, store, events.clone());
        Ok(Coordinator {
            cluster_id,
            state,
            events,
            default_storage,
            policy,
            budgets: opts.budgets,
            storage_options: opts.storage.clone(),
            stores: Mutex::new(HashMap::new()),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as it was at the last flush plus
        // partial changes; continuing is no worse than the restart that would follow.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change under the lock, lets go of it, and waits until the change is durable
    /// (and its commands sent) before answering. What the change touched is committed even
    /// when it then fails (a rejected report may still have renewed a lease); its own error
    /// comes first.
    pub async fn change<T>(&self, apply: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let (out, commit) = {
            let mut st = self.lock();
            let out = apply(&mut st);
            (out, st.flush())
        };
        let committed = commit.wait().await;
        let out = out?;
        committed?;
        Ok(out)
    }

    /// Changes of experiments and trials, announced once durable.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.events.subscribe()
    }

    /// The storage a new experiment uses: what its spec names (or the default), normalised,
    /// refused outside the allowed prefixes, and with this store's cluster id as its last
    /// segment, so that a fresh store never meets another store's experiments.
    pub fn experiment_storage(&self, requested: Option<&str>) -> Result<String> {
        let loc = match requested {
            Some(uri) => self.policy.check(uri).map_err(|e| {
                CoordError::Spec(chorus_core::error::SpecErrors(vec![chorus_core::error::FieldError {
                    path: "storage".into(),
                    location: None,
                    message: match e {
                        chorus_core::CoreError::StorageUri { reason, .. } => reason,
                        other => other.to_string(),
                    },
                }]))
            })?,
            None => self.default_storage.clone(),
        };
        Ok(loc.join(&self.cluster_id).to_uri())
    }

    /// Writes an experiment's spec to its storage, before the experiment exists: an unreachable
    /// or stalled store refuses the experiment instead of leaving one that cannot keep records.
    pub async fn store_spec(&self, storage: &Storage, uri: &str, id: ExperimentId, stored: String) -> Result<()> {
        const STORAGE_TIMEOUT: Duration = Duration::from_secs(30);
        let key = storage.spec_key(id);
        let put = storage
            .store
            .put(&key, object_store::PutPayload::from(stored.into_bytes()));
        match tokio::time::timeout(STORAGE_TIMEOUT, put).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(CoordError::storage(uri, &format!("write {key}"), &e)),
            Err(_) => Err(CoordError::Storage(format!(
                "storage {uri}: writing {key} got no answer within {STORAGE_TIMEOUT:?}"
            ))),
        }
    }

    /// The store a URI names, opened once. Opening may touch the file system (a `file://`
    /// root is created), so it runs off the async threads.
    pub async fn storage(&self, uri: &str) -> Result<Storage> {
        if let Some(s) = self.stores.lock().unwrap_or_else(|p| p.into_inner()).get(uri) {
            return Ok(s.clone());
        }
        let parsed = StorageUri::parse(uri)?;
        let options = self.storage_options.clone();
        let opened = tokio::task::spawn_blocking(move || chorus_core::storage::open(&parsed, &options))
            .await
            .map_err(|e| CoordError::Storage(format!("storage {uri}: cannot open it: {e}")))?;
        let s = opened.map_err(|e| match e {
            e @ (chorus_core::CoreError::Io { .. } | chorus_core::CoreError::ObjectStore(_)) => {
                CoordError::storage(uri, "open it", &e)
            }
            other => other.into(),
        })?;
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        Ok(stores.entry(uri.to_string()).or_insert(s).clone())
    }
}

/// Serves the coordinator on `listener` until `shutdown` resolves. `ready` is called once the
/// data directory is locked, the store loaded, the tokens checked and the server accepts calls:
/// a supervisor watching for it knows the coordinator started, and one that never sees it knows
/// it did not.
pub async fn run(
    listener: TcpListener,
    opts: Options,
    ready: impl FnOnce(std::net::SocketAddr) + Send + 'static,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    opts.check_exposure(addr).map_err(anyhow::Error::msg)?;
    // Read before anything is locked or opened: a bad certificate is a start-up error.
    let tls = opts.tls.as_ref().map(tls::acceptor).transpose()?;
    // Before the store is touched: a second coordinator on the directory stops here.
    let lock = {
        let dir = opts.data_dir.clone();
        tokio::task::spawn_blocking(move || DataDirLock::acquire(&dir)).await??
    };
    // Opening reads the whole store: off the async threads.
    let coord = {
        let opts = opts.clone();
        Arc::new(tokio::task::spawn_blocking(move || Coordinator::open(&opts)).await??)
    };
    // Attempts found live at start get one lease to be claimed; schedule what can run.
    if let Err(e) = coord
        .change(|st| {
            st.pump();
            Ok(())
        })
        .await
    {
        // Serve anyway: reads work, and the reconcile loop retries until the disk has room.
        tracing::error!(error = %e, "cannot record the start-up pass");
    }
    // Deletions a previous run began and did not end are finished in the background.
    let unfinished = {
        let coord = coord.clone();
        tokio::spawn(async move { purge::resume_unfinished(&coord).await })
    };
    let reconcile = {
        let coord = coord.clone();
        let every = opts.reconcile_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A failure is logged by the store's writer and the pass retried next tick.
                let _ = coord
                    .change(|st| {
                        st.reconcile();
                        Ok(())
                    })
                    .await;
            }
        })
    };

    let metrics = match opts.metrics_listener {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics on /metrics");
            let coord = coord.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let coord = coord.clone();
                    async move {
                        let body = {
                            let st = coord.lock();
                            let gauges = st.gauges();
                            st.telemetry.clone().render(&gauges)
                        };
                        (
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                    }
                }),
            );
            Some(tokio::spawn(async move { axum::serve(listener, app).await }))
        }
        None => None,
    };
    let tokens = Arc::new(opts.tokens.clone());
    let max = chorus_proto::MAX_MESSAGE_BYTES;
    let experiments = InterceptedService::new(
        ExperimentServiceServer::new(api::ExperimentApi::new(coord.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        AuthInterceptor::new(tokens.clone(), Role::User),
    );
    let lifecycle = InterceptedService::new(
        ExperimentLifecycleServiceServer::new(api::LifecycleApi::new(coord.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        AuthInterceptor::new(tokens.clone(), Role::User),
    );
    let workers = InterceptedService::new(
        WorkerServiceServer::new(api::WorkerApi::new(coord.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        AuthInterceptor::new(tokens, Role::Worker),
    );
    // Only now, with the store loaded and the start-up pass run, is anything SERVING.
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in HEALTH_NAMES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    // From the first moment of a shutdown, probes say NOT_SERVING, so no new work is routed
    // here while calls in flight drain.
    let shutdown = async move {
        shutdown.await;
        for name in HEALTH_NAMES {
            health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        tracing::info!("shutting down: draining calls in flight");
    };
    // The same health reports on a plain port of their own: a Kubernetes gRPC probe speaks
    // neither TLS nor tokens, and health is all that port serves.
    let health_only = match opts.health_listener {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, "serving grpc.health.v1 in plain text");
            let service = health_service.clone();
            Some(tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
            }))
        }
        None => None,
    };
    // Both reflection versions, each listing both: grpcurl speaks v1, many tools v1alpha only.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(chorus_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(experiments)
        .add_service(lifecycle)
        .add_service(workers);
    let mut ready = Some(ready);
    let mode = tls_mode(&opts);
    let announce = move || {
        if let Some(ready) = ready.take() {
            tracing::info!(%addr, tls = mode, "coordinator serving");
            ready(addr);
        }
    };
    let result = match tls {
        Some(acceptor) => {
            let incoming = announce_first_poll(tls::incoming(listener, acceptor), announce);
            server.serve_with_incoming_shutdown(incoming, shutdown).await
        }
        None => {
            // With a listener of our own, the server's TCP settings do not reach accepted
            // sockets: without TCP_NODELAY, small replies wait out the peer's delayed ACK.
            let accepted = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            });
            server
                .serve_with_incoming_shutdown(announce_first_poll(accepted, announce), shutdown)
                .await
        }
    };
    reconcile.abort();
    unfinished.abort();
    // Changes already queued (a reconcile pass) are written before the process exits.
    let writer = coord.lock().writer().clone();
    writer.sync().await;
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(h) = health_only {
        h.abort();
    }
    // Held to the end: the next coordinator may open the store once this one wrote its last.
    drop(lock);
    result?;
    Ok(())
}

/// The health names reported: the whole server ("") and each service.
const HEALTH_NAMES: [&str; 4] = [
    "",
    "chorus.v1.ExperimentService",
    "chorus.v1.ExperimentLifecycleService",
    "chorus.v1.WorkerService",
];

fn tls_mode(opts: &Options) -> &'static str {
    match &opts.tls {
        None => "off",
        Some(t) if t.client_ca.is_some() => "mutual",
        Some(_) => "on",
    }
}

/// Calls `announce` when the server first polls for a connection, which it does once it is
/// serving.
fn announce_first_poll<S: futures::Stream + Unpin>(
    mut inner: S,
    mut announce: impl FnMut() + Send + 'static,
) -> impl futures::Stream<Item = S::Item> {
    futures::stream::poll_fn(move |cx| {
        announce();
        futures::Stream::poll_next(std::pin::Pin::new(&mut inner), cx)
    })
}

#[cfg(test)]
mod unreadable_spec_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn open(dir: &std::path::Path, allowed: &[&str], default: Option<&str>, memory: bool) -> Result<Coordinator> {
        let mut opts = Options::new(dir.to_path_buf());
        opts.allowed_storage = allowed.iter().map(|s| s.to_string()).collect();
        opts.default_storage = default.map(str::to_string);
        opts.allow_memory_storage = memory;
        Coordinator::open(&opts)
    }

    /// Experiment storage lies under an allowed prefix however it is spelled, and ends in the
    /// store's cluster id.
    #[test]
    fn experiment_storage_is_checked_normalised_and_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &[], None, false).unwrap();
        let root = format!("file://{}/storage/", dir.path().canonicalize().unwrap().display());
        let cid = c.cluster_id.clone();
        assert_eq!(c.experiment_storage(None).unwrap(), format!("{root}{cid}/"));
        assert_eq!(
            c.experiment_storage(Some(&format!("{root}team/./a//"))).unwrap(),
            format!("{root}team/a/{cid}/")
        );
        for bad in [
            "file:///anywhere".to_string(),
            format!("{root}../../x"),
            format!("{root}%2e%2e/%2e%2e/x"),
            format!("{root}..%2F..%2Fx"),
            format!("{}/storage-other", root.trim_end_matches("/storage/")),
            "s3://bucket/x".to_string(),
        ] {
            let s = Status::from(c.experiment_storage(Some(&bad)).unwrap_err());
            assert_eq!(s.code(), Code::InvalidArgument, "{bad}");
            assert!(
                s.message().contains(&root),
                "{bad}: names what is allowed: {}",
                s.message()
            );
        }
        let mem = Status::from(c.experiment_storage(Some("memory://t")).unwrap_err());
        assert_eq!(mem.code(), Code::InvalidArgument);
        assert!(mem.message().contains("tests only"), "{}", mem.message());

        // A fresh store under the same storage gets paths of its own.
        let other = tempfile::tempdir().unwrap();
        let shared = format!("{root}shared");
        let c2 = open(other.path(), &[&root], Some(&shared), false).unwrap();
        assert_ne!(
            c2.experiment_storage(None).unwrap(),
            c.experiment_storage(Some(&shared)).unwrap()
        );
    }

    #[test]
    fn allowed_storage_adds_prefixes_on_segment_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path(), &["s3://bucket/sweeps"], None, false).unwrap();
        let cid = c.cluster_id.clone();
        assert_eq!(
            c.experiment_storage(Some("s3://bucket/sweeps/a")).unwrap(),
            format!("s3://bucket/sweeps/a/{cid}/")
        );
        for bad in [
            "s3://bucket/sweeps2",
            "s3://bucket",
            "s3://other/sweeps",
            "gs://bucket/sweeps",
        ] {
            let s = Status::from(c.experiment_storage(Some(bad)).unwrap_err());
            assert!(s.message().contains("s3://bucket/sweeps/"), "{bad}: {}", s.message());
        }
    }

    #[test]
    fn memory_storage_needs_the_test_flag() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path(), &[], Some("memory://x"), false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("tests only"), "{err}");
        let c = open(dir.path(), &[], Some("memory://x"), true).unwrap();
        assert!(c.experiment_storage(Some("memory://y")).is_ok());
    }
}
