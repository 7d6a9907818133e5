//! Continuing an experiment: a new experiment with the old one's stored spec (overrides
//! applied, validated as a submit is), whose searcher learns from the old one's finished trials
//! where it can. The old experiment is left as it is.

use crate::Coordinator;
use crate::api::convert;
use crate::error::{CoordError, Result};
use chorus_core::{ExperimentId, spec};
use chorus_proto::pb;

/// Creates the continuation of `origin`; returns it and how its searcher started.
pub async fn continue_experiment(
    coord: &Coordinator,
    origin: ExperimentId,
    overrides: &[String],
    max_trials: Option<u64>,
) -> Result<(pb::Experiment, String)> {
    let old_yaml = {
        let st = coord.lock();
        let exp = st.experiment(origin)?;
        if exp.lifecycle.deleting.is_some() {
            return Err(CoordError::FailedPrecondition(format!(
                "experiment {origin} is being deleted; it cannot be continued"
            )));
        }
        exp.spec_yaml.clone()
    };
    let mut overrides = overrides.to_vec();
    if let Some(m) = max_trials {
        overrides.push(format!("max_trials={m}"));
    }
    let valid = spec::parse_with(&old_yaml, &overrides, &coord.budgets).map_err(CoordError::from)?;
    let stored = valid.to_stored_yaml().map_err(CoordError::from)?;
    let uri = coord.experiment_storage(valid.spec.storage.as_deref())?;
    let storage = coord.storage(&uri).await?;
    let id = coord.lock().reserve_experiment_id();
    // As at submit: the spec is in storage before the experiment exists.
    coord.store_spec(&storage, &uri, id, stored).await?;
    let (experiment, message) = coord
        .change(|st| {
            let message = st.add_continued_experiment(id, valid, uri, origin)?;
            Ok((convert::experiment(st, id), message))
        })
        .await?;
    let experiment = experiment.ok_or_else(|| CoordError::NotFound(format!("experiment {id} does not exist")))?;
    tracing::info!(experiment = %id, %origin, "{message}");
    Ok((experiment, message))
}
