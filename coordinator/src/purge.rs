//! Deleting an experiment's records from object storage, off the state lock.
//!
//! A deletion is marked in the store before anything is deleted and cleared (or the
//! experiment's rows removed) only after everything is, so one cut short by a crash or a
//! storage failure is found at the next start, or on the next request, and finished. Every
//! step is idempotent: an object already gone counts as deleted. Within each prefix the
//! checkpoint manifests go first, so a half-deleted checkpoint is never taken for a committed
//! one.

use crate::Coordinator;
use crate::error::{CoordError, Result};
use crate::experiment::lifecycle::Deletion;
use crate::state::DeletePlan;
use chorus_core::checkpoint::MANIFEST;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;

/// What a finished deletion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub objects_deleted: u64,
}

/// Begins (or resumes) a deletion, does its storage work, and ends it.
pub async fn delete(coord: &Coordinator, id: chorus_core::ExperimentId, how: Deletion) -> Result<(DeletePlan, Purged)> {
    let plan = coord.change(|st| st.begin_delete(id, how)).await?;
    let purged = purge_storage(coord, &plan).await?;
    coord.change(|st| st.finish_delete(id, plan.how)).await?;
    tracing::info!(experiment = %id, deletion = %plan.how.as_stored(), objects = purged.objects_deleted, "experiment deleted");
    Ok((plan, purged))
}

/// Deletes what `plan` says from the experiment's storage.
async fn purge_storage(coord: &Coordinator, plan: &DeletePlan) -> Result<Purged> {
    let storage = coord.storage(&plan.storage).await?;
    let exp = plan.experiment;
    let prefixes: Vec<Path> = match plan.how {
        Deletion::All => vec![storage.experiment_prefix(exp)],
        Deletion::KeepBest(_) => plan
            .trials
            .iter()
            .filter(|t| !plan.keep.contains(t))
            .map(|t| storage.checkpoints_prefix(exp, *t))
            .collect(),
    };
    let mut purged = Purged::default();
    for prefix in prefixes {
        let listed: Vec<Path> = storage
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| CoordError::storage(&plan.storage, &format!("list {prefix}"), &e))?;
        let (manifests, rest): (Vec<Path>, Vec<Path>) =
            listed.into_iter().partition(|p| p.filename() == Some(MANIFEST));
        for batch in [manifests, rest] {
            let paths = futures::stream::iter(batch.into_iter().map(Ok)).boxed();
            let mut results = storage.store.delete_stream(paths);
            while let Some(r) = results.next().await {
                match r {
                    Ok(_) => purged.objects_deleted += 1,
                    // Deleted by an earlier, interrupted run, or a concurrent one.
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        return Err(CoordError::storage(
                            &plan.storage,
                            &format!("delete under {prefix}"),
                            &e,
                        ));
                    }
                }
            }
        }
    }
    Ok(purged)
}

/// Finishes every deletion that a previous run began and did not end; a failure is logged
/// and left for the next start or request.
pub async fn resume_unfinished(coord: &Coordinator) {
    let unfinished = coord.lock().unfinished_deletions();
    for (id, how) in unfinished {
        tracing::info!(experiment = %id, deletion = %how.as_stored(), "finishing an interrupted deletion");
        if let Err(e) = delete(coord, id, how).await {
            tracing::warn!(experiment = %id, error = %e, "cannot finish the deletion yet; the next start or request retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Options;
    use chorus_core::ExperimentId;
    use object_store::{ObjectStoreExt, PutPayload};

    const SPEC: &str = "name: d\nmetric: {name: loss, goal: minimize}\nsearcher: {name: grid}\n\
                        parameters:\n  k: {values: [1]}\ntrial: {command: [train]}\n";
    const KEYS: [&str; 4] = [
        "spec.yaml",
        "trials/1/metrics/0001-000000.jsonl",
        "trials/1/checkpoints/000000000001-a0001/model.bin",
        "trials/1/checkpoints/000000000001-a0001/MANIFEST.json",
    ];

    async fn objects(coord: &Coordinator, uri: &str, exp: ExperimentId) -> usize {
        let storage = coord.storage(uri).await.unwrap();
        let listed: Vec<_> = storage
            .store
            .list(Some(&storage.experiment_prefix(exp)))
            .try_collect()
            .await
            .unwrap();
        listed.len()
    }

    /// A coordinator that stops after marking a deletion and before deleting anything (a crash
    /// mid-delete) finishes it at its next start: the storage prefix is emptied, the rows go,
    /// and another experiment under the same storage keeps everything.
    #[tokio::test]
    async fn an_interrupted_deletion_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("coordinator");
        let (a, b, uri);
        {
            let coord = Coordinator::open(&Options::new(data.clone())).unwrap();
            uri = coord.experiment_storage(None).unwrap();
            let storage = coord.storage(&uri).await.unwrap();
            let spec = chorus_core::spec::parse(SPEC, &[]).unwrap();
            (a, b) = {
                let mut st = coord.lock();
                (st.reserve_experiment_id(), st.reserve_experiment_id())
            };
            coord
                .change(|st| {
                    for id in [a, b] {
                        st.add_experiment(id, spec.clone(), uri.clone());
                        st.kill(id)?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
            for id in [a, b] {
                let trial = coord.lock().experiment(id).unwrap().trials[0];
                for key in KEYS {
                    let key = key.replace("trials/1/", &format!("trials/{trial}/"));
                    let path = Path::from(format!("{}/{key}", storage.experiment_prefix(id)));
                    storage.store.put(&path, PutPayload::from_static(b"x")).await.unwrap();
                }
            }
            let plan = coord.change(|st| st.begin_delete(a, Deletion::All)).await.unwrap();
            assert_eq!(plan.how, Deletion::All);
            assert_eq!(objects(&coord, &uri, a).await, KEYS.len(), "nothing deleted yet");
        }
        let coord = Coordinator::open(&Options::new(data.clone())).unwrap();
        assert_eq!(coord.lock().unfinished_deletions(), vec![(a, Deletion::All)]);
        resume_unfinished(&coord).await;
        assert_eq!(objects(&coord, &uri, a).await, 0);
        assert_eq!(objects(&coord, &uri, b).await, KEYS.len());
        {
            let st = coord.lock();
            assert!(st.experiment(a).is_err());
            assert!(st.experiment(b).is_ok());
            assert!(st.unfinished_deletions().is_empty());
        }
        // Deleting it again finds nothing to do.
        let e = delete(&coord, a, Deletion::All).await.unwrap_err();
        assert!(matches!(e, CoordError::NotFound(_)), "{e}");
        // A partial deletion of the other keeps its records and drops its checkpoints.
        let (plan, purged) = delete(&coord, b, Deletion::KeepBest(0)).await.unwrap();
        assert!(plan.keep.is_empty());
        assert_eq!(purged.objects_deleted, 2);
        assert_eq!(objects(&coord, &uri, b).await, 2);
    }
}
