//! The one error type of `chorus-worker`.
//!
//! Failures of a trial itself (a non-zero exit, a program that cannot start, storage that cannot
//! be read) are not errors of the worker: the runner turns them into an `Exited` event. This enum
//! covers what stops or disturbs the worker: bad settings and a lost coordinator. The built-in
//! trainer uses it too; its failures end that one trial, and the runner reports them as such.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid setting: {0}")]
    Config(String),
    #[error("invalid coordinator address {url:?}: {source}")]
    CoordinatorUrl {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The whole source chain is in the message: tonic's own says only "transport error".
    #[error("cannot connect to the coordinator: {}", chain(.0))]
    Connect(#[source] tonic::transport::Error),
    /// Boxed because `tonic::Status` is large and this enum travels in every `Result`.
    #[error("{rpc} failed: {status}")]
    Rpc {
        rpc: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("{rpc} got no answer within {after:?}")]
    Timeout {
        rpc: &'static str,
        after: std::time::Duration,
    },
    /// The coordinator could not be reached over TLS because a certificate was refused (ours or
    /// its): retrying will not help until someone changes a certificate or `--ca`.
    #[error("TLS with the coordinator failed (check --ca, --tls-cert and --tls-key): {0}")]
    Tls(String),
    /// Register was refused with ALREADY_EXISTS: another instance holds this worker id and its
    /// lease. Retried: the other is often a pod on its way out.
    #[error("worker id {worker_id} is held by another live instance; retrying until its lease lapses ({message})")]
    IdHeld { worker_id: String, message: String },
    /// A newer registration of this worker id fenced this process: it has been replaced, and
    /// must stop its trials and exit instead of registering again.
    #[error("worker {worker_id} was replaced by a newer registration of its id; stopped its trials ({message})")]
    Fenced { worker_id: String, message: String },
    #[error("the coordinator closed the assignment stream")]
    StreamEnded,
    #[error("the coordinator no longer knows this worker (its lease lapsed)")]
    Forgotten,
    #[error(transparent)]
    Core(#[from] chorus_core::CoreError),
    #[error("local file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Trial processes cannot be contained or killed (see `runner::containment`).
    #[error("trial containment: {0}")]
    Containment(String),
    #[error("the data directory {0} is in use by another worker (each worker needs its own)")]
    DataDirInUse(PathBuf),
    /// The coordinator wants a worker token this worker lacks or it does not accept. Its own
    /// message is meant for either kind of client, so this one names the worker's setting.
    #[error("{}", unauthenticated_message(*.has_token, .status.message()))]
    Unauthenticated {
        has_token: bool,
        status: Box<tonic::Status>,
    },
    #[error("internal task failed: {0}")]
    Task(String),
    /// A built-in model or trainer setting that cannot work (shapes, names, values).
    #[error("invalid training setting: {0}")]
    Train(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("CUDA was requested but is not available: {0}")]
    CudaUnavailable(String),
    /// Bad or unreadable training data; the message names the shard and sample where known.
    #[error("data: {0}")]
    Data(String),
    /// A collective between the ranks of a data-parallel trial failed: a peer died, timed out,
    /// belongs to another attempt, or sent something malformed. The message names the peer.
    #[error("collective: {0}")]
    Collective(String),
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    let mut last = out.clone();
    while let Some(s) = source {
        // hyper wraps errors in layers that repeat the same words.
        let text = s.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
        last = text;
    }
    out
}

fn unauthenticated_message(has_token: bool, detail: &str) -> String {
    if has_token {
        format!("the coordinator refused the worker token (set with CHORUS_WORKER_TOKEN or --token): {detail}")
    } else {
        "the coordinator requires a worker token: set CHORUS_WORKER_TOKEN (or pass --token)".into()
    }
}

impl WorkerError {
    pub(crate) fn rpc(rpc: &'static str) -> impl FnOnce(tonic::Status) -> WorkerError {
        move |status| WorkerError::Rpc {
            rpc,
            status: Box::new(status),
        }
    }

    /// A failed connection; a refused certificate is told apart from an unreachable host.
    pub(crate) fn connect(e: tonic::transport::Error) -> WorkerError {
        let text = chain(&e);
        // rustls says "invalid peer certificate: ..." for the coordinator's, and the coordinator's
        // alert ("... BadCertificate", "... CertificateRequired") for ours.
        if text.to_ascii_lowercase().contains("certificate") {
            WorkerError::Tls(text)
        } else {
            WorkerError::Connect(e)
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let path = path.into();
        move |source| WorkerError::Io { path, source }
    }

    /// Errors that retrying cannot fix without a person changing something (a token, the
    /// address). They end the worker only at its first registration: once trials run, a
    /// coordinator misconfigured mid-flight is waited out rather than allowed to kill them.
    pub fn is_permanent(&self) -> bool {
        match self {
            WorkerError::Config(_)
            | WorkerError::CoordinatorUrl { .. }
            | WorkerError::Unauthenticated { .. }
            | WorkerError::DataDirInUse(_)
            | WorkerError::Tls(_)
            | WorkerError::Fenced { .. }
            | WorkerError::Containment(_) => true,
            WorkerError::Rpc { status, .. } => matches!(
                status.code(),
                tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::InvalidArgument
                    | tonic::Code::Unimplemented
            ),
            _ => false,
        }
    }
}
