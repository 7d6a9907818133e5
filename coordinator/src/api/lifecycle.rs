//! `chorus.v1.ExperimentLifecycleService`, for the CLI: labels, notes, archival, deletion,
//! continuing an experiment, and listing a trial's checkpoints.

use super::convert;
use crate::Coordinator;
use crate::error::CoordError;
use crate::experiment::lifecycle::Deletion;
use chorus_core::{ExperimentId, TrialId, checkpoint};
use chorus_proto::pb;
use chorus_proto::pb::experiment_lifecycle_service_server::ExperimentLifecycleService;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct LifecycleApi {
    coord: Arc<Coordinator>,
}

impl LifecycleApi {
    pub fn new(coord: Arc<Coordinator>) -> Self {
        LifecycleApi { coord }
    }

    async fn change(
        &self,
        id: ExperimentId,
        apply: impl FnOnce(&mut crate::state::State) -> Result<(), CoordError>,
    ) -> Result<Response<pb::Experiment>, Status> {
        super::change_experiment(&self.coord, id, apply).await
    }
}

#[tonic::async_trait]
impl ExperimentLifecycleService for LifecycleApi {
    async fn label_experiment(
        &self,
        req: Request<pb::LabelExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let req = req.into_inner();
        let id = ExperimentId(req.experiment_id);
        let add = req.add.into_iter().collect();
        self.change(id, |st| st.label(id, &add, &req.remove)).await
    }

    async fn set_experiment_note(
        &self,
        req: Request<pb::SetExperimentNoteRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let req = req.into_inner();
        let id = ExperimentId(req.experiment_id);
        self.change(id, |st| st.set_note(id, &req.note)).await
    }

    async fn archive_experiment(
        &self,
        req: Request<pb::ArchiveExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let req = req.into_inner();
        let id = ExperimentId(req.experiment_id);
        self.change(id, |st| st.archive(id, req.undo)).await
    }

    async fn delete_experiment(
        &self,
        req: Request<pb::DeleteExperimentRequest>,
    ) -> Result<Response<pb::DeleteExperimentResponse>, Status> {
        let req = req.into_inner();
        let id = ExperimentId(req.experiment_id);
        let how = req.keep_best.map_or(Deletion::All, Deletion::KeepBest);
        let (plan, purged) = crate::purge::delete(&self.coord, id, how).await?;
        let experiment = convert::experiment(&self.coord.lock(), id);
        Ok(Response::new(pb::DeleteExperimentResponse {
            objects_deleted: purged.objects_deleted,
            experiment,
            kept_trials: plan.keep.iter().map(|t| t.0).collect(),
        }))
    }

    async fn continue_experiment(
        &self,
        req: Request<pb::ContinueExperimentRequest>,
    ) -> Result<Response<pb::ContinueExperimentResponse>, Status> {
        let req = req.into_inner();
        let (experiment, message) = crate::continuation::continue_experiment(
            &self.coord,
            ExperimentId(req.experiment_id),
            &req.overrides,
            req.max_trials,
        )
        .await?;
        Ok(Response::new(pb::ContinueExperimentResponse {
            experiment: Some(experiment),
            message,
        }))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let tid = TrialId(req.into_inner().trial_id);
        let (exp, uri) = self.coord.lock().trial_storage(tid)?;
        let storage = self.coord.storage(&uri).await?;
        let prefix = storage.checkpoints_prefix(exp, tid);
        let refs = checkpoint::list(&storage, &prefix).await.map_err(CoordError::from)?;
        let mut checkpoints = Vec::new();
        // Bounded by the trial's retention (each checkpoint is one manifest read).
        for at in refs {
            let key = checkpoint::manifest_key(&prefix, at);
            // A directory without a readable manifest is no committed checkpoint: not listed.
            let Ok(Some(m)) = checkpoint::read_manifest(&storage, &key).await else {
                continue;
            };
            checkpoints.push(pb::CheckpointInfo {
                step: m.step,
                attempt: m.attempt,
                size_bytes: m.files.iter().map(|f| f.size).sum(),
                files: m.files.len() as u32,
                created_unix_ms: m.created_unix_ms,
                manifest_key: key.to_string(),
            });
        }
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints,
            storage: uri,
            prefix: prefix.to_string(),
            experiment_id: exp.0,
        }))
    }
}
