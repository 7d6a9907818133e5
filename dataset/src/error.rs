//! The one error type of `chorus-dataset`.

/// Everything that can go wrong with a dataset. Errors about stored data name the object (the
/// manifest, or the shard and the sample key) so a failed trial says which file to look at.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// No `manifest.json`: nothing was written there, or a writer stopped before committing.
    #[error("no dataset at {key}: manifest.json is missing (nothing was written there, or the upload did not finish)")]
    NoManifest { key: String },
    /// The manifest cannot be parsed, or contradicts itself.
    #[error("manifest {key}: {reason}")]
    Manifest { key: String, reason: String },
    /// A whole shard is bad: missing, wrong size or checksum, not a tar, or its contents do not
    /// add up to what the manifest says.
    #[error("shard {shard}: {reason}")]
    Shard { shard: String, reason: String },
    /// One sample of a shard is bad.
    #[error("shard {shard}, sample {key}: {reason}")]
    Sample { shard: String, key: String, reason: String },
    /// A row of a CSV being packed or imported.
    #[error("{path} line {line}: {reason}")]
    Csv { path: String, line: u64, reason: String },
    /// A file of a corpus being imported that does not follow the corpus's conventions (a
    /// RAVDESS file name with a bad field, a clip that cannot be decoded).
    #[error("{path}: {reason}")]
    Input { path: String, reason: String },
    /// The writer would replace a committed dataset.
    #[error("a dataset already exists at {key} (pass --force to replace it)")]
    AlreadyExists { key: String },
    /// Options that cannot produce a dataset (too few shards, fractions over 1, ...).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("object storage {key}: {source}")]
    ObjectStore {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl DatasetError {
    pub(crate) fn store(key: &object_store::path::Path, source: object_store::Error) -> Self {
        DatasetError::ObjectStore {
            key: key.to_string(),
            source,
        }
    }

    pub(crate) fn shard(shard: &str, reason: impl Into<String>) -> Self {
        DatasetError::Shard {
            shard: shard.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn sample(shard: &str, key: &str, reason: impl Into<String>) -> Self {
        DatasetError::Sample {
            shard: shard.to_string(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
