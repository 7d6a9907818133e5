//! A trainer checkpoint on local disk, one directory each:
//!
//! - `model.safetensors`: every variable of the model's store (parameters, BatchNorm statistics);
//! - `state.safetensors`: optimiser state (`{group}.updates`, `{group}.{variable}.first|second`)
//!   and the running loss sums (`trainer.*`, f64) that the next reports average;
//! - `trainer.json`: the counters, the data cursor and the full training config, written last,
//!   so a directory without it is not a checkpoint.
//!
//! Random state needs no file: every draw derives from (seed, epoch, step). Uploading, manifests
//! with checksums and retention are the runner's business (`chorus_core::checkpoint`).

use crate::data::DataCursor;
use crate::error::WorkerError;
use crate::trainer::config::TrainConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const MODEL_FILE: &str = "model.safetensors";
pub const STATE_FILE: &str = "state.safetensors";
pub const COUNTERS_FILE: &str = "trainer.json";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    pub format: u32,
    /// 0-based epoch in progress (or next to start).
    pub epoch: u64,
    /// Optimiser steps taken in all.
    pub step: u64,
    /// Where the source stands within `epoch`; `None` when the epoch has not begun.
    pub cursor: Option<DataCursor>,
    pub parameters: i64,
    pub config: TrainConfig,
}

pub struct Loaded {
    pub counters: Counters,
    pub model: HashMap<String, Tensor>,
    pub state: HashMap<String, Tensor>,
}

fn err(path: &Path, reason: impl std::fmt::Display) -> WorkerError {
    WorkerError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn to_cpu(named: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    named
        .into_iter()
        .map(|(n, t)| (n, t.to_device(tch::Device::Cpu).contiguous()))
        .collect()
}

/// Writes a checkpoint into `dir` (created; files of an earlier checkpoint there are replaced).
pub fn save(
    dir: &Path,
    model: Vec<(String, Tensor)>,
    state: Vec<(String, Tensor)>,
    counters: &Counters,
) -> Result<(), WorkerError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    // An interrupted save must not leave the old counters beside new tensors.
    let counters_path = dir.join(COUNTERS_FILE);
    match std::fs::remove_file(&counters_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(&counters_path, e)),
    }
    for (file, named) in [(MODEL_FILE, model), (STATE_FILE, state)] {
        let path = dir.join(file);
        Tensor::write_safetensors(&to_cpu(named), &path).map_err(|e| err(&path, e))?;
    }
    let json = serde_json::to_vec_pretty(counters).map_err(|e| err(&counters_path, e))?;
    let tmp = dir.join(format!("{COUNTERS_FILE}.tmp"));
    std::fs::write(&tmp, json).map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, &counters_path).map_err(|e| err(&counters_path, e))
}

/// The counters of the checkpoint in `dir`, without its tensors.
pub fn read_counters(dir: &Path) -> Result<Counters, WorkerError> {
    let counters_path = dir.join(COUNTERS_FILE);
    let json = std::fs::read(&counters_path).map_err(|e| err(&counters_path, e))?;
    let counters: Counters = serde_json::from_slice(&json).map_err(|e| err(&counters_path, e))?;
    if counters.format != FORMAT {
        return Err(err(
            &counters_path,
            format!("format {} is not {FORMAT}", counters.format),
        ));
    }
    Ok(counters)
}

pub fn load(dir: &Path) -> Result<Loaded, WorkerError> {
    let counters = read_counters(dir)?;
    let read = |file: &str| -> Result<HashMap<String, Tensor>, WorkerError> {
        let path = dir.join(file);
        Ok(Tensor::read_safetensors(&path)
            .map_err(|e| err(&path, e))?
            .into_iter()
            .collect())
    };
    Ok(Loaded {
        model: read(MODEL_FILE)?,
        state: read(STATE_FILE)?,
        counters,
    })
}

/// The directory of the checkpoint taken after `step` steps, under `root`.
pub fn dir_for(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:012}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Counters {
        Counters {
            format: FORMAT,
            epoch: 2,
            step: 17,
            cursor: Some(DataCursor {
                epoch: 2,
                batch: 3,
                detail: serde_json::Value::Null,
            }),
            parameters: 5,
            config: TrainConfig::default(),
        }
    }

    #[test]
    fn round_trips_tensors_and_counters_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_slice(&[0.1f32, f32::MIN_POSITIVE, -3.5]);
        let sum = Tensor::from_slice(&[1.0f64 / 3.0]);
        save(
            dir.path(),
            vec![("w".into(), w.shallow_clone())],
            vec![("trainer.sum".into(), sum.shallow_clone())],
            &counters(),
        )
        .unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.counters, counters());
        assert!(loaded.model["w"].equal(&w));
        assert_eq!(loaded.state["trainer.sum"].double_value(&[0]), 1.0 / 3.0);
    }

    #[test]
    fn a_directory_without_counters_is_not_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), vec![], vec![], &counters()).unwrap();
        std::fs::remove_file(dir.path().join(COUNTERS_FILE)).unwrap();
        let e = load(dir.path()).err().expect("must fail");
        assert!(matches!(e, WorkerError::Checkpoint { .. }), "{e}");
    }

    #[test]
    fn a_truncated_tensor_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::ones([100], (tch::Kind::Float, tch::Device::Cpu));
        save(dir.path(), vec![("w".into(), w)], vec![], &counters()).unwrap();
        let path = dir.path().join(MODEL_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(dir.path()).err().expect("must fail");
        assert!(e.to_string().contains(MODEL_FILE), "{e}");
    }
}
