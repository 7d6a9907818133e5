//! The one error type of the coordinator, and its single mapping onto gRPC status codes.

use chorus_core::CoreError;
use chorus_core::error::SpecErrors;
use chorus_search::SearchError;
use std::path::{Path, PathBuf};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("invalid experiment spec:\n{0}")]
    Spec(SpecErrors),
    #[error("{0}")]
    InvalidArgument(String),
    /// A request field out of its bounds: INVALID_ARGUMENT with the field named in its details.
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A report or call from an attempt or worker incarnation the coordinator has moved past.
    #[error("{0}")]
    Stale(String),
    /// A worker id registered by another instance that still holds its lease.
    #[error("{0}")]
    AlreadyExists(String),
    /// A call of a worker registration that a newer registration of the same worker id has
    /// replaced: the worker process must stop (see [`FENCED_REASON`]).
    #[error("{message}")]
    Fenced {
        message: String,
        worker: String,
        epoch: u64,
        current: u64,
    },
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {} is in use by {holder}; stop that coordinator first (one coordinator per data directory)",
        dir.display()
    )]
    DataDirInUse { dir: PathBuf, holder: String },
    /// A local file or directory operation failed: what was being done, and why.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// TLS material that cannot be used: the file and why.
    #[error("{0}")]
    Tls(String),
    /// An online backup that failed: what failed and why.
    #[error("{0}")]
    Backup(String),
    /// Object storage failed; the message names the URI and the cause.
    #[error("{0}")]
    Storage(String),
    /// Object storage is out of space (a full disk under `file://` storage, or a quota).
    #[error("{0}")]
    StorageFull(String),
    #[error("coordinator store: {0}")]
    Store(#[from] rusqlite::Error),
    /// The store could not record a change, so nothing of it was kept or acknowledged.
    #[error("{}", store_write_message(.db, *.full, *.free, .source))]
    StoreWrite {
        db: PathBuf,
        /// The disk (or a quota) is full, as opposed to another I/O failure.
        full: bool,
        /// Bytes free on the store's filesystem, when known.
        free: Option<u64>,
        #[source]
        source: rusqlite::Error,
    },
    /// A searcher's saved state cannot be read back.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// A store commit that failed, as told to every change of its group (each gets the same
    /// words: the [`CoordError::StoreWrite`] they came from is logged once).
    #[error("{message}")]
    CommitFailed { full: bool, message: String },
    #[error("{0}")]
    Core(CoreError),
}

impl From<CoreError> for CoordError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Spec(s) => CoordError::Spec(s),
            CoreError::StorageUri { .. } => CoordError::InvalidArgument(e.to_string()),
            CoreError::ObjectStore(e) => CoordError::storage("", "", &e),
            other => CoordError::Core(other),
        }
    }
}

pub type Result<T, E = CoordError> = std::result::Result<T, E>;

/// The `google.rpc.ErrorInfo` reason an ABORTED status carries when the worker's registration
/// epoch is fenced (its domain is [`ERROR_DOMAIN`]): the worker must exit rather than retry,
/// which tells it apart from an ABORTED stale attempt (drop that attempt, keep working).
pub const FENCED_REASON: &str = "WORKER_EPOCH_FENCED";
/// The `google.rpc.ErrorInfo` domain of the coordinator's machine-readable errors.
pub const ERROR_DOMAIN: &str = "chorus.v1";

impl CoordError {
    /// An object-storage failure of `what` (e.g. `write experiments/3/spec.yaml`) on the store
    /// `uri` (empty when unknown), with every cause in the chain; out of space when an I/O error
    /// in the chain says so.
    pub fn storage(uri: &str, what: &str, e: &(dyn std::error::Error + 'static)) -> CoordError {
        let store = if uri.is_empty() {
            "object storage".to_string()
        } else {
            format!("storage {uri}")
        };
        let what = if what.is_empty() {
            String::new()
        } else {
            format!(" cannot {what}:")
        };
        let cause = chain(e);
        if io_errors(e).any(is_full) {
            CoordError::StorageFull(format!("{store} is full:{what} {cause}"))
        } else {
            CoordError::Storage(format!("{store}:{what} {cause}"))
        }
    }

    /// A failed write of the store at `db`: disk full when SQLite says so, or when the
    /// filesystem has no space left (some full disks surface as plain I/O errors).
    pub fn store_write(db: &Path, source: rusqlite::Error) -> CoordError {
        let free = free_bytes(db.parent().unwrap_or(db));
        let sqlite_full = matches!(
            &source,
            rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::DiskFull
        );
        CoordError::StoreWrite {
            db: db.to_path_buf(),
            full: sqlite_full || free.is_some_and(|f| f < NEARLY_FULL_BYTES),
            free,
            source,
        }
    }
}

/// Below this many free bytes a filesystem counts as full: SQLite writes whole pages and a
/// WAL frame is larger than one.
const NEARLY_FULL_BYTES: u64 = 64 * 1024;

/// Whether the filesystem holding `path` (a file or a directory) is full.
pub fn disk_full(path: &Path) -> bool {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(path)
    };
    free_bytes(dir).is_some_and(|f| f < NEARLY_FULL_BYTES)
}

/// Bytes available to this process on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// The I/O errors in an error's chain.
fn io_errors<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a std::io::Error> {
    std::iter::successors(Some(e), |e| e.source()).filter_map(|e| e.downcast_ref::<std::io::Error>())
}

/// An error and its sources joined with `: `, skipping sources their parent already quotes.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

fn store_write_message(db: &Path, full: bool, free: Option<u64>, source: &rusqlite::Error) -> String {
    let dir = db.parent().unwrap_or(db).display();
    if full {
        let free = free.map_or(String::new(), |f| format!(", {f} bytes free"));
        format!(
            "disk full: the coordinator cannot write its store {} ({source}{free}); the change was not made. \
             Free space in {dir}; the coordinator resumes by itself, and reads work meanwhile",
            db.display()
        )
    } else {
        format!(
            "the coordinator cannot write its store {} ({source}); the change was not made. Retry later; \
             reads work meanwhile",
            db.display()
        )
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        match e {
            CoordError::Spec(errs) => {
                let mut details = ErrorDetails::new();
                for f in &errs.0 {
                    let field = if f.path.is_empty() {
                        "(document)".to_string()
                    } else {
                        f.path.clone()
                    };
                    let desc = match f.location {
                        Some((l, c)) => format!("line {l}, column {c}: {}", f.message),
                        None => f.message.clone(),
                    };
                    details.add_bad_request_violation(field, desc);
                }
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid experiment spec:\n{errs}"),
                    details,
                )
            }
            CoordError::InvalidArgument(m) => Status::invalid_argument(m),
            CoordError::InvalidField { field, message } => {
                let text = format!("{field}: {message}");
                Status::with_error_details(
                    Code::InvalidArgument,
                    text,
                    ErrorDetails::with_bad_request_violation(field, message),
                )
            }
            CoordError::NotFound(m) => Status::not_found(m),
            CoordError::FailedPrecondition(m) => Status::failed_precondition(m),
            CoordError::Stale(m) => Status::aborted(m),
            CoordError::AlreadyExists(m) => Status::already_exists(m),
            e @ (CoordError::DataDirInUse { .. } | CoordError::Tls(_)) => Status::failed_precondition(e.to_string()),
            e @ (CoordError::Io { .. } | CoordError::Backup(_)) => Status::internal(e.to_string()),
            CoordError::Fenced {
                message,
                worker,
                epoch,
                current,
            } => Status::with_error_details(
                Code::Aborted,
                message,
                ErrorDetails::with_error_info(
                    FENCED_REASON,
                    ERROR_DOMAIN,
                    [
                        ("worker_id".to_string(), worker),
                        ("epoch".to_string(), epoch.to_string()),
                        ("current_epoch".to_string(), current.to_string()),
                    ],
                ),
            ),
            CoordError::Storage(m) => Status::unavailable(m),
            CoordError::StorageFull(m) => Status::resource_exhausted(m),
            CoordError::Store(e) => Status::internal(format!("coordinator store: {e}")),
            e @ CoordError::StoreWrite { full: true, .. } => Status::resource_exhausted(e.to_string()),
            e @ CoordError::StoreWrite { .. } => Status::unavailable(e.to_string()),
            CoordError::Search(e) => Status::failed_precondition(e.to_string()),
            CoordError::CommitFailed { full: true, message } => Status::resource_exhausted(message),
            CoordError::CommitFailed { message, .. } => Status::unavailable(message),
            CoordError::Core(e) => Status::internal(e.to_string()),
        }
    }
}
