//! What a command trial inherits from the worker's environment: the variables on an allow-list,
//! never the whole. A worker holds secrets a trial has no business seeing (its token, object
//! store credentials); a trial reads and writes its checkpoints through a local directory and
//! gets the variables its own spec names, so it needs none of them.
//!
//! Allowed: [`ALLOWED`] by name, [`ALLOWED_PREFIXES`] by prefix (locale, CUDA, NCCL, PyTorch,
//! the OpenMP and BLAS thread settings), and whatever the worker's `--trial-env` adds.
//! Never: `CHORUS_*` (Chorus sets its own for the trial). The trial's own `env` and Chorus's
//! variables are added on top by the runner.

use std::ffi::OsString;

/// Inherited by name: what finding programs and libraries, the locale, the user and temporary
/// files need, and the Python environment a training script runs in.
pub const ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "HOSTNAME",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "CONDA_DEFAULT_ENV",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Inherited by prefix: the locale, and the settings GPU training reads (CUDA, cuDNN, cuBLAS,
/// NCCL, Gloo, PyTorch and its compiler, Triton, OpenMP, MKL and OpenBLAS threads).
pub const ALLOWED_PREFIXES: &[&str] = &[
    "LC_",
    "CUDA_",
    "CUDNN_",
    "CUBLAS_",
    "NVIDIA_",
    "NCCL_",
    "GLOO_",
    "TORCH_",
    "PYTORCH_",
    "TRITON_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
];

/// Never inherited, whatever the allow-list says.
const RESERVED_PREFIX: &str = "CHORUS_";

/// The variables of the worker's environment a trial gets.
#[derive(Debug, Clone, Default)]
pub struct TrialEnv {
    vars: Vec<(OsString, OsString)>,
}

impl TrialEnv {
    /// From this process's environment, with `extra` names (or `PREFIX*` patterns) allowed
    /// beyond the defaults.
    pub fn from_worker(extra: &[String]) -> Self {
        Self::from_vars(std::env::vars_os(), extra)
    }

    pub fn from_vars(vars: impl IntoIterator<Item = (OsString, OsString)>, extra: &[String]) -> Self {
        TrialEnv {
            vars: vars
                .into_iter()
                .filter(|(k, _)| k.to_str().is_some_and(|k| allowed(k, extra)))
                .collect(),
        }
    }

    pub fn vars(&self) -> &[(OsString, OsString)] {
        &self.vars
    }
}

fn allowed(name: &str, extra: &[String]) -> bool {
    if name.starts_with(RESERVED_PREFIX) {
        return false;
    }
    ALLOWED.contains(&name)
        || ALLOWED_PREFIXES.iter().any(|p| name.starts_with(p))
        || extra.iter().any(|pattern| matches(pattern, name))
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Checks a `--trial-env` entry: a variable name, or a prefix ending in `*`.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_suffix('*').unwrap_or(pattern);
    if name.is_empty() {
        return Err(format!(
            "--trial-env {pattern:?}: name a variable or a prefix ending in `*` (an empty prefix would pass everything)"
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "--trial-env {pattern:?}: a variable name holds only letters, digits and `_`"
        ));
    }
    if name.starts_with(RESERVED_PREFIX) || RESERVED_PREFIX.starts_with(name) {
        return Err(format!(
            "--trial-env {pattern:?}: CHORUS_* variables are never passed to trials"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    fn names(e: &TrialEnv) -> Vec<String> {
        e.vars().iter().map(|(k, _)| k.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn worker_secrets_stay_with_the_worker() {
        let worker = env(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("LC_ALL", "C.UTF-8"),
            ("CUDA_HOME", "/usr/local/cuda"),
            ("NCCL_DEBUG", "INFO"),
            ("OMP_NUM_THREADS", "4"),
            ("CHORUS_WORKER_TOKEN", "worker-secret"),
            ("CHORUS_TOKEN", "user-secret"),
            ("CHORUS_S3_ENDPOINT", "http://s3"),
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
            ("AWS_SESSION_TOKEN", "aws-session"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/key.json"),
            ("AZURE_STORAGE_ACCOUNT_KEY", "az"),
            ("HF_TOKEN", "hf"),
            ("WANDB_API_KEY", "wandb"),
            ("HTTPS_PROXY", "http://user:pw@proxy"),
        ]);
        let e = TrialEnv::from_vars(worker, &[]);
        assert_eq!(
            names(&e),
            ["PATH", "HOME", "LC_ALL", "CUDA_HOME", "NCCL_DEBUG", "OMP_NUM_THREADS"]
        );
        assert!(e.vars().iter().all(|(_, v)| !v.to_string_lossy().contains("secret")));
    }

    #[test]
    fn the_operator_can_pass_more_by_name_or_prefix_but_never_chorus_variables() {
        let worker = env(&[
            ("WANDB_API_KEY", "k"),
            ("WANDB_PROJECT", "p"),
            ("MY_DATA", "/data"),
            ("MY_DATA_2", "/data2"),
            ("CHORUS_WORKER_TOKEN", "secret"),
        ]);
        let extra = vec!["WANDB_*".to_string(), "MY_DATA".to_string(), "CHORUS_*".to_string()];
        let e = TrialEnv::from_vars(worker, &extra);
        assert_eq!(names(&e), ["WANDB_API_KEY", "WANDB_PROJECT", "MY_DATA"]);
    }

    #[test]
    fn trial_env_patterns_are_checked() {
        assert!(check_pattern("WANDB_API_KEY").is_ok());
        assert!(check_pattern("WANDB_*").is_ok());
        for bad in ["", "*", "A-B", "A*B", "CHORUS_WORKER_TOKEN", "CHORUS_*", "CHOR*"] {
            assert!(check_pattern(bad).is_err(), "{bad:?}");
        }
    }
}
