//! What can go wrong in a command, how it is told to the user, and which exit code it gets.
//!
//! Exit codes: 0 success; 1 any server or connection error (and an experiment that did not
//! complete under `--wait`); 2 usage errors (clap) and spec errors, local or `INVALID_ARGUMENT`
//! from the coordinator, so scripts can tell "fix your file" from "try again later". For
//! `chorus dataset`, a bad storage URI, impossible options, a bad row of a packed or imported CSV
//! and a corpus file that breaks its corpus's conventions are usage errors too; storage failures
//! and bad shards are 1.

use chorus_core::error::{FieldError, SpecErrors};
use chorus_dataset::DatasetError;
use std::fmt::Write as _;
use std::process::ExitCode;
use tonic::Code;
use tonic_types::StatusExt;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The experiment file failed local validation.
    #[error("invalid experiment spec")]
    Spec(SpecErrors),
    /// The coordinator answered with an error status.
    #[error("{}", status_line(.0))]
    Rpc(#[from] tonic::Status),
    #[error("cannot reach coordinator at {url}: {}", chain(.source))]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("unexpected response from the coordinator: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Dataset(#[from] chorus_dataset::DatasetError),
    /// A picture could not be drawn (`chorus plot`).
    #[error("{0}")]
    Plot(#[from] chorus_plot::PlotError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Spec(_) | CliError::Usage(_) => ExitCode::from(2),
            CliError::Rpc(s) if s.code() == Code::InvalidArgument => ExitCode::from(2),
            CliError::Dataset(
                DatasetError::InvalidArgument(_) | DatasetError::Csv { .. } | DatasetError::Input { .. },
            ) => ExitCode::from(2),
            // A file name or a request the picture cannot be made of is a usage error.
            CliError::Plot(chorus_plot::PlotError::Format(_) | chorus_plot::PlotError::Invalid(_)) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    }

    /// A reader of a closed pipe (`chorus trial list | head`) is not an error worth reporting.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The lines to print on stderr, each starting with `error: `.
    pub fn report(&self) -> String {
        let mut out = String::new();
        match self {
            CliError::Spec(SpecErrors(errs)) => {
                for e in errs {
                    let _ = writeln!(out, "error: {e}");
                }
            }
            CliError::Rpc(status) => {
                let violations = bad_request_lines(status);
                if violations.is_empty() {
                    let _ = writeln!(out, "error: {}", status_line(status));
                } else {
                    for v in violations {
                        let _ = writeln!(out, "error: {v}");
                    }
                }
            }
            other => {
                let _ = writeln!(out, "error: {other}");
            }
        }
        out
    }
}

/// `<code>: <message>`, e.g. `permission denied: token lacks the submit right`.
fn status_line(s: &tonic::Status) -> String {
    let mut line = format!("{}: {}", code_name(s.code()), s.message());
    // Client-side failures (connection refused, reset) carry the transport error as a source;
    // the message alone ("tcp connect error") hides the useful part.
    if let Some(src) = std::error::Error::source(s) {
        let _ = write!(line, ": {}", chain(src));
    }
    line
}

/// The field violations of an `INVALID_ARGUMENT` status, rendered like local spec errors.
fn bad_request_lines(s: &tonic::Status) -> Vec<String> {
    if s.code() != Code::InvalidArgument {
        return Vec::new();
    }
    let Some(br) = s.get_details_bad_request() else {
        return Vec::new();
    };
    br.field_violations
        .iter()
        .map(|v| violation_line(&v.field, &v.description))
        .collect()
}

/// Coordinators word a violation's description in several ways (location first, with or without
/// parentheses; the path repeated or not); all of them come out as local spec errors do:
/// `path (line L, column C): message`.
fn violation_line(field: &str, description: &str) -> String {
    let path = if field.is_empty() { "(document)" } else { field };
    if description.starts_with('(') {
        return format!("{path} {description}");
    }
    if let Some((loc, message)) = leading_location(description) {
        return format!("{path} ({loc}): {message}");
    }
    if !field.is_empty() && description.starts_with(field) {
        return description.to_string();
    }
    FieldError {
        path: path.to_string(),
        location: None,
        message: description.to_string(),
    }
    .to_string()
}

/// Splits `line 5, column 9: message` into the location and the message.
fn leading_location(description: &str) -> Option<(&str, &str)> {
    let (loc, message) = description.split_once(": ")?;
    let (line, column) = loc.strip_prefix("line ")?.split_once(", column ")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(line) && digits(column)).then_some((loc, message))
}

/// Lower-case gRPC code names, as users read them in `error:` lines.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// An error and its sources joined with `: `, skipping sources that repeat their parent.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, FieldViolation};

    #[test]
    fn exit_codes() {
        let spec = CliError::Spec(SpecErrors(vec![]));
        assert_eq!(spec.exit_code(), ExitCode::from(2));
        assert_eq!(
            CliError::Rpc(tonic::Status::invalid_argument("x")).exit_code(),
            ExitCode::from(2)
        );
        assert_eq!(
            CliError::Rpc(tonic::Status::not_found("x")).exit_code(),
            ExitCode::from(1)
        );
        assert_eq!(
            CliError::Rpc(tonic::Status::unavailable("x")).exit_code(),
            ExitCode::from(1)
        );
    }

    #[test]
    fn dataset_exit_codes() {
        let usage = CliError::Dataset(DatasetError::InvalidArgument("too few shards".into()));
        assert_eq!(usage.exit_code(), ExitCode::from(2));
        let csv = CliError::Dataset(DatasetError::Csv {
            path: "d.csv".into(),
            line: 3,
            reason: "bad label".into(),
        });
        assert_eq!(csv.exit_code(), ExitCode::from(2));
        assert_eq!(csv.report(), "error: d.csv line 3: bad label\n");
        let shard = CliError::Dataset(DatasetError::Shard {
            shard: "shard-00001.tar".into(),
            reason: "checksum mismatch".into(),
        });
        assert_eq!(shard.exit_code(), ExitCode::from(1));
    }

    #[test]
    fn status_names_code_and_message() {
        let e = CliError::Rpc(tonic::Status::permission_denied("token lacks the submit right"));
        assert_eq!(e.report(), "error: permission denied: token lacks the submit right\n");
    }

    /// A coordinator that cannot record a change says why; the CLI passes it on whole, as a
    /// failure to retry (exit 1), not a usage error.
    #[test]
    fn store_and_storage_failures_are_told_whole() {
        let full = "disk full: the coordinator cannot write its store /var/lib/chorus/chorus.db (database or disk \
                    is full, 0 bytes free); the change was not made. Free space in /var/lib/chorus";
        let e = CliError::Rpc(tonic::Status::resource_exhausted(full));
        assert_eq!(e.exit_code(), ExitCode::from(1));
        assert_eq!(e.report(), format!("error: resource exhausted: {full}\n"));
        let io = "storage s3://b/runs/: cannot write experiments/3/spec.yaml: connection refused";
        let e = CliError::Rpc(tonic::Status::unavailable(io));
        assert_eq!(e.exit_code(), ExitCode::from(1));
        assert_eq!(e.report(), format!("error: unavailable: {io}\n"));
    }

    #[test]
    fn spec_errors_one_line_each() {
        let e = CliError::Spec(SpecErrors(vec![
            FieldError {
                path: "parallel_trials".into(),
                location: Some((10, 18)),
                message: "must be at least 1".into(),
            },
            FieldError {
                path: "".into(),
                location: None,
                message: "the experiment file is empty".into(),
            },
        ]));
        assert_eq!(
            e.report(),
            "error: parallel_trials (line 10, column 18): must be at least 1\n\
             error: (document): the experiment file is empty\n"
        );
    }

    #[test]
    fn bad_request_details_are_listed() {
        let details = ErrorDetails::with_bad_request(vec![
            FieldViolation::new(
                "parameters.lr.min",
                "(line 5, column 9): min (0.5) is greater than max (0.1)",
            ),
            FieldViolation::new("trial.timeout", "trial.timeout (line 12, column 12): bad duration"),
            FieldViolation::new("max_trials", "random search needs max_trials"),
            // chorus-coordinator's own wording.
            FieldViolation::new("parallel_trials", "line 10, column 18: must be at least 1"),
            FieldViolation::new("(document)", "the experiment file is empty"),
            FieldViolation::new("name", "line one: not a location"),
        ]);
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "invalid experiment spec", details);
        let e = CliError::Rpc(status);
        assert_eq!(e.exit_code(), ExitCode::from(2));
        assert_eq!(
            e.report(),
            "error: parameters.lr.min (line 5, column 9): min (0.5) is greater than max (0.1)\n\
             error: trial.timeout (line 12, column 12): bad duration\n\
             error: max_trials: random search needs max_trials\n\
             error: parallel_trials (line 10, column 18): must be at least 1\n\
             error: (document): the experiment file is empty\n\
             error: name: line one: not a location\n"
        );
    }
}
