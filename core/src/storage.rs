//! Object storage: opening a store from a URI, and the layout of Chorus's records in it.
//!
//! ```text
//! {root}/experiments/{exp}/spec.yaml
//! {root}/experiments/{exp}/trials/{trial}/metrics/{attempt:04}-lineage.json
//! {root}/experiments/{exp}/trials/{trial}/metrics/{attempt:04}-{segment:06}.jsonl
//! {root}/experiments/{exp}/trials/{trial}/logs/{attempt:04}-{chunk:06}.log
//! {root}/experiments/{exp}/trials/{trial}/checkpoints/{step:012}-a{attempt:04}/{files, MANIFEST.json}
//! ```
//!
//! Everything a trial's attempt writes is under names that carry its attempt number, so an
//! attempt the coordinator has given up on can never overwrite a newer attempt's records
//! (see [`crate::history`] and [`crate::checkpoint`] for how readers pick the live lineage).

use crate::error::CoreError;
use crate::ids::{ExperimentId, TrialId};
use object_store::ObjectStore;
use object_store::path::Path;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use url::Url;

/// A validated storage URI: `file:///abs/path`, `s3://bucket/prefix`, `gs://...`, `az://...`,
/// or `memory://name` (one store per name and process; for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageUri(Url);

impl StorageUri {
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let bad = |reason: &str| CoreError::StorageUri {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        let url = Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "file" => {
                if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                    return Err(bad("file URIs name a local absolute path, e.g. file:///var/lib/chorus"));
                }
            }
            "s3" | "gs" | "az" | "abfs" | "abfss" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(bad("the URI must name a bucket or container"));
                }
            }
            "memory" => {}
            other => {
                return Err(bad(&format!(
                    "unsupported scheme {other:?} (use file, s3, gs, az or memory)"
                )));
            }
        }
        Ok(StorageUri(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// A `file://` URI for a local directory.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, CoreError> {
        let url = Url::from_directory_path(dir).map_err(|_| CoreError::StorageUri {
            uri: dir.display().to_string(),
            reason: "not an absolute path".into(),
        })?;
        Ok(StorageUri(url))
    }
}

/// Settings that do not belong in a spec: endpoints and credentials come from the process
/// environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as object_store reads them) or from flags.
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000`; plain http is allowed when given.
    pub s3_endpoint: Option<String>,
}

/// An opened store and the root path of Chorus's records inside it.
#[derive(Clone, Debug)]
pub struct Storage {
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
}

/// Opens the store a URI names.
pub fn open(uri: &StorageUri, opts: &StorageOptions) -> Result<Storage, CoreError> {
    let url = &uri.0;
    let err = |e: object_store::Error| CoreError::StorageUri {
        uri: url.to_string(),
        reason: e.to_string(),
    };
    let root = Path::from(url.path().trim_start_matches('/'));
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "file" => {
            let dir = url.to_file_path().map_err(|_| CoreError::StorageUri {
                uri: url.to_string(),
                reason: "not a local path".into(),
            })?;
            std::fs::create_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(err)?;
            return Ok(Storage {
                store: Arc::new(fs.with_automatic_cleanup(true)),
                root: Path::default(),
            });
        }
        "memory" => {
            static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
            let name = url.host_str().unwrap_or_default().to_string();
            let mut m = STORES
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            m.entry(name)
                .or_insert_with(|| Arc::new(object_store::memory::InMemory::new()))
                .clone()
        }
        "s3" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str());
            if let Some(ep) = &opts.s3_endpoint {
                b = b.with_endpoint(ep).with_allow_http(ep.starts_with("http://"));
            }
            Arc::new(b.build().map_err(err)?)
        }
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(err)?,
        ),
        "az" | "abfs" | "abfss" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(err)?,
        ),
        other => {
            return Err(CoreError::StorageUri {
                uri: url.to_string(),
                reason: format!("unsupported scheme {other:?}"),
            });
        }
    };
    Ok(Storage { store, root })
}

fn join(base: &Path, parts: &[&str]) -> Path {
    let mut p = base.clone();
    for part in parts {
        p = p.join(*part);
    }
    p
}

impl Storage {
    pub fn experiment_prefix(&self, exp: ExperimentId) -> Path {
        join(&self.root, &["experiments", &exp.to_string()])
    }

    pub fn spec_key(&self, exp: ExperimentId) -> Path {
        self.experiment_prefix(exp).clone().join("spec.yaml")
    }

    pub fn trial_prefix(&self, exp: ExperimentId, trial: TrialId) -> Path {
        join(&self.experiment_prefix(exp), &["trials", &trial.to_string()])
    }

    /// Where trials kept their whole metric history before it was kept per attempt: one
    /// object every attempt rewrote. Read, never written.
    pub fn legacy_metrics_key(&self, exp: ExperimentId, trial: TrialId) -> Path {
        self.trial_prefix(exp, trial).clone().join("metrics.jsonl")
    }

    pub fn metrics_prefix(&self, exp: ExperimentId, trial: TrialId) -> Path {
        self.trial_prefix(exp, trial).clone().join("metrics")
    }

    /// An attempt's lineage (what its history carries over), beside its segments.
    pub fn metrics_lineage_key(&self, exp: ExperimentId, trial: TrialId, attempt: u32) -> Path {
        self.metrics_prefix(exp, trial)
            .clone()
            .join(format!("{attempt:04}-lineage.json"))
    }

    /// Segment `segment` of an attempt's own metric lines; names sort by attempt, then in order.
    pub fn metrics_segment_key(&self, exp: ExperimentId, trial: TrialId, attempt: u32, segment: u32) -> Path {
        self.metrics_prefix(exp, trial)
            .clone()
            .join(format!("{attempt:04}-{segment:06}.jsonl"))
    }

    pub fn logs_prefix(&self, exp: ExperimentId, trial: TrialId) -> Path {
        self.trial_prefix(exp, trial).clone().join("logs")
    }

    /// Logs are written in chunks because object stores cannot append; names sort in order.
    /// Rank 0's chunks are `AAAA-CCCCCC.log`; another rank's sit beside them as
    /// `AAAA-rR-CCCCCC.log`.
    pub fn log_chunk_key(&self, exp: ExperimentId, trial: TrialId, attempt: u32, rank: u32, chunk: u32) -> Path {
        let name = match rank {
            0 => format!("{attempt:04}-{chunk:06}.log"),
            r => format!("{attempt:04}-r{r}-{chunk:06}.log"),
        };
        self.logs_prefix(exp, trial).clone().join(name)
    }

    pub fn checkpoints_prefix(&self, exp: ExperimentId, trial: TrialId) -> Path {
        self.trial_prefix(exp, trial).clone().join("checkpoints")
    }
}

/// What an object under a trial's `metrics/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsObject {
    Lineage,
    Segment(u32),
}

/// Parses a name under a trial's `metrics/` back into its attempt and what it is.
pub fn parse_metrics_name(name: &str) -> Option<(u32, MetricsObject)> {
    let (attempt, rest) = name.split_once('-')?;
    let attempt = attempt.parse().ok()?;
    if rest == "lineage.json" {
        return Some((attempt, MetricsObject::Lineage));
    }
    let segment = rest.strip_suffix(".jsonl")?;
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((attempt, MetricsObject::Segment(segment.parse().ok()?)))
}

/// Parses a log chunk name back into `(attempt, rank, chunk)`.
pub fn parse_log_chunk_name(name: &str) -> Option<(u32, u32, u32)> {
    let stem = name.strip_suffix(".log")?;
    let (a, rest) = stem.split_once('-')?;
    let (rank, c) = match rest.strip_prefix('r') {
        Some(rest) => {
            let (r, c) = rest.split_once('-')?;
            (r.parse().ok()?, c)
        }
        None => (0, rest),
    };
    Some((a.parse().ok()?, rank, c.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_checked() {
        assert!(StorageUri::parse("file:///tmp/x").is_ok());
        assert!(StorageUri::parse("s3://bucket/prefix").is_ok());
        assert!(StorageUri::parse("memory://t").is_ok());
        assert!(StorageUri::parse("s3:///nobucket").is_err());
        assert!(StorageUri::parse("ftp://x/y").is_err());
        assert!(StorageUri::parse("relative/path").is_err());
    }

    #[test]
    fn layout_matches_the_design() {
        let s = open(&StorageUri::parse("memory://layout").unwrap(), &Default::default()).unwrap();
        let (e, t) = (ExperimentId(3), TrialId(12));
        assert_eq!(s.spec_key(e).as_ref(), "experiments/3/spec.yaml");
        assert_eq!(
            s.metrics_segment_key(e, t, 2, 5).as_ref(),
            "experiments/3/trials/12/metrics/0002-000005.jsonl"
        );
        assert_eq!(
            s.metrics_lineage_key(e, t, 2).as_ref(),
            "experiments/3/trials/12/metrics/0002-lineage.json"
        );
        assert_eq!(
            parse_metrics_name("0002-000005.jsonl"),
            Some((2, MetricsObject::Segment(5)))
        );
        assert_eq!(
            parse_metrics_name("0002-lineage.json"),
            Some((2, MetricsObject::Lineage))
        );
        for bad in [
            "0002.jsonl",
            "x-000005.jsonl",
            "0002-.jsonl",
            "0002-5x.jsonl",
            "0002-lineage",
        ] {
            assert_eq!(parse_metrics_name(bad), None, "{bad}");
        }
        assert_eq!(
            s.log_chunk_key(e, t, 2, 0, 7).as_ref(),
            "experiments/3/trials/12/logs/0002-000007.log"
        );
        assert_eq!(parse_log_chunk_name("0002-000007.log"), Some((2, 0, 7)));
        assert_eq!(
            s.log_chunk_key(e, t, 2, 3, 7).as_ref(),
            "experiments/3/trials/12/logs/0002-r3-000007.log"
        );
        assert_eq!(parse_log_chunk_name("0002-r3-000007.log"), Some((2, 3, 7)));
        for bad in [
            "0002.log",
            "0002-rx-000007.log",
            "0002-r3.log",
            "x-000007.log",
            "0002-000007.txt",
        ] {
            assert_eq!(parse_log_chunk_name(bad), None, "{bad}");
        }
        assert_eq!(
            s.checkpoints_prefix(e, t).as_ref(),
            "experiments/3/trials/12/checkpoints"
        );
    }

    #[test]
    fn s3_uri_root_is_the_prefix() {
        let s = open(
            &StorageUri::parse("s3://bucket/some/prefix").unwrap(),
            &StorageOptions {
                s3_endpoint: Some("http://127.0.0.1:1".into()),
            },
        )
        .unwrap();
        assert_eq!(
            s.spec_key(ExperimentId(1)).as_ref(),
            "some/prefix/experiments/1/spec.yaml"
        );
    }
}
