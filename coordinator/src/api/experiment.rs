//! `chorus.v1.ExperimentService`, for the CLI.

use super::{convert, paging};
use crate::Coordinator;
use crate::error::CoordError;
use crate::history;
use chorus_core::limits::BudgetLimits;
use chorus_core::storage::parse_log_chunk_name;
use chorus_core::{ExperimentId, TrialId, spec};
use chorus_proto::pb;
use chorus_proto::pb::experiment_service_server::ExperimentService;
use futures::TryStreamExt;
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct ExperimentApi {
    coord: Arc<Coordinator>,
}

impl ExperimentApi {
    pub fn new(coord: Arc<Coordinator>) -> Self {
        ExperimentApi { coord }
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
impl ExperimentService for ExperimentApi {
    async fn submit_experiment(
        &self,
        req: Request<pb::SubmitExperimentRequest>,
    ) -> Result<Response<pb::SubmitExperimentResponse>, Status> {
        let req = req.into_inner();
        let valid = spec::parse_with(&req.spec_yaml, &req.overrides, &self.coord.budgets).map_err(CoordError::from)?;
        let warnings = chorus_search::warnings(&valid);
        // What is stored must read back: a spec that would not is refused here, never found
        // unreadable when the coordinator restarts.
        let stored = valid.to_stored_yaml().map_err(CoordError::from)?;
        let uri = self.coord.experiment_storage(valid.spec.storage.as_deref())?;
        let storage = self.coord.storage(&uri).await?;
        let id = self.coord.lock().reserve_experiment_id();
        // The spec goes to storage before the experiment exists, so an unreachable store
        // rejects the submission instead of leaving an experiment that cannot keep records.
        self.coord.store_spec(&storage, &uri, id, stored).await?;
        let experiment = self
            .coord
            .change(|st| {
                st.add_experiment(id, valid, uri);
                Ok(convert::experiment(st, id))
            })
            .await?;
        tracing::info!(experiment = %id, "experiment submitted");
        Ok(Response::new(pb::SubmitExperimentResponse { experiment, warnings }))
    }

    async fn validate_experiment(
        &self,
        req: Request<pb::ValidateExperimentRequest>,
    ) -> Result<Response<pb::ValidateExperimentResponse>, Status> {
        let req = req.into_inner();
        let valid = spec::parse_with(&req.spec_yaml, &req.overrides, &self.coord.budgets).map_err(CoordError::from)?;
        // What submit would refuse, validate refuses too.
        self.coord.experiment_storage(valid.spec.storage.as_deref())?;
        let normalized_yaml = valid.to_stored_yaml().map_err(CoordError::from)?;
        Ok(Response::new(pb::ValidateExperimentResponse {
            normalized_yaml,
            // Sized within the validation limits: 0 for a continuous space or one past them.
            grid_size: chorus_core::space::grid_size(&valid.space).unwrap_or(0),
            warnings: chorus_search::warnings(&valid),
        }))
    }

    async fn list_experiments(
        &self,
        req: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        let req = req.into_inner();
        let listing = paging::Listing::Experiments;
        let after = listing.parse_token(&req.page_token)?.map(ExperimentId);
        let size = paging::page_size(req.page_size);
        let labels: std::collections::BTreeMap<String, String> = req.labels.into_iter().collect();
        let archived = pb::ArchiveFilter::try_from(req.archived)
            .map_err(|_| CoordError::InvalidArgument(format!("archived: unknown filter {}", req.archived)))?;
        let st = self.coord.lock();
        // Filtered in the walk, so a page holds `size` matches and its token stays an id.
        let matching = paging::keys_after(&st.experiments, after).filter(|id| {
            st.experiments.get(id).is_some_and(|e| {
                let l = &e.lifecycle;
                let shown = match archived {
                    pb::ArchiveFilter::Unarchived => !l.archived,
                    pb::ArchiveFilter::Archived => l.archived,
                    pb::ArchiveFilter::All => true,
                };
                shown && l.matches(&labels)
            })
        });
        let page = paging::page(listing, matching, size, |id| id.0);
        let experiments = page.ids.iter().filter_map(|id| convert::experiment(&st, *id)).collect();
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments,
            next_page_token: page.next_page_token,
        }))
    }

    async fn describe_experiment(
        &self,
        req: Request<pb::DescribeExperimentRequest>,
    ) -> Result<Response<pb::DescribeExperimentResponse>, Status> {
        let id = ExperimentId(req.into_inner().experiment_id);
        let st = self.coord.lock();
        let spec_yaml = st.experiment(id)?.spec_yaml.clone();
        Ok(Response::new(pb::DescribeExperimentResponse {
            experiment: convert::experiment(&st, id),
            spec_yaml,
        }))
    }

    async fn list_trials(
        &self,
        req: Request<pb::ListTrialsRequest>,
    ) -> Result<Response<pb::ListTrialsResponse>, Status> {
        let req = req.into_inner();
        let id = ExperimentId(req.experiment_id);
        let listing = paging::Listing::Trials(id);
        let after = listing.parse_token(&req.page_token)?.map(TrialId);
        let size = paging::page_size(req.page_size);
        let st = self.coord.lock();
        let exp = st.experiment(id)?;
        // An experiment's trials are in creation order, which is id order: ids only grow.
        let page = paging::page(listing, paging::sorted_after(&exp.trials, after), size, |t| t.0);
        let trials = page.ids.iter().filter_map(|t| convert::trial(&st, *t)).collect();
        Ok(Response::new(pb::ListTrialsResponse {
            trials,
            next_page_token: page.next_page_token,
            metric: exp.metric().to_string(),
            maximize: exp.goal() == spec::Goal::Maximize,
            objectives: exp
                .spec
                .objectives()
                .into_iter()
                .map(|m| pb::Objective {
                    name: m.name.clone(),
                    maximize: m.goal == spec::Goal::Maximize,
                })
                .collect(),
        }))
    }

    async fn pause_experiment(&self, req: Request<pb::ExperimentRef>) -> Result<Response<pb::Experiment>, Status> {
        let id = ExperimentId(req.into_inner().experiment_id);
        self.change(id, |st| st.pause(id)).await
    }

    async fn resume_experiment(&self, req: Request<pb::ExperimentRef>) -> Result<Response<pb::Experiment>, Status> {
        let id = ExperimentId(req.into_inner().experiment_id);
        self.change(id, |st| st.resume(id)).await
    }

    async fn kill_experiment(&self, req: Request<pb::ExperimentRef>) -> Result<Response<pb::Experiment>, Status> {
        let id = ExperimentId(req.into_inner().experiment_id);
        self.change(id, |st| st.kill(id)).await
    }

    async fn update_experiment(
        &self,
        req: Request<pb::UpdateExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let req = req.into_inner();
        let id = ExperimentId(req.experiment_id);
        check_budget_update(&self.coord.budgets, req.max_trials, req.parallel_trials)?;
        self.change(id, |st| {
            st.update_budget(id, req.max_trials, req.parallel_trials, req.max_failed_trials)
        })
        .await
    }

    type WatchExperimentStream = ResponseStream<pb::ExperimentEvent>;

    async fn watch_experiment(
        &self,
        req: Request<pb::ExperimentRef>,
    ) -> Result<Response<Self::WatchExperimentStream>, Status> {
        let id = ExperimentId(req.into_inner().experiment_id);
        let mut changes = {
            let st = self.coord.lock();
            st.experiment(id)?;
            self.coord.subscribe()
        };
        let (tx, rx) = mpsc::channel(256);
        let coord = self.coord.clone();
        tokio::spawn(async move {
            let event = |trial: Option<TrialId>| {
                let st = coord.lock();
                let experiment = convert::experiment(&st, id);
                let done = st.experiments.get(&id).is_none_or(|e| e.state.is_terminal());
                (
                    pb::ExperimentEvent {
                        experiment,
                        trial: trial.and_then(|t| convert::trial(&st, t)),
                    },
                    done,
                )
            };
            let (snapshot, mut done) = event(None);
            if tx.send(Ok(snapshot)).await.is_err() {
                return;
            }
            while !done {
                let change = tokio::select! {
                    c = changes.recv() => c,
                    _ = tx.closed() => return,
                };
                let (ev, d) = match change {
                    Ok((e, t)) if e == id => event(t),
                    Ok(_) => continue,
                    // Missed some changes: a fresh snapshot says everything that matters.
                    Err(broadcast::error::RecvError::Lagged(_)) => event(None),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                done = d;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type TrialLogsStream = ResponseStream<pb::LogChunk>;

    async fn trial_logs(&self, req: Request<pb::TrialLogsRequest>) -> Result<Response<Self::TrialLogsStream>, Status> {
        let req = req.into_inner();
        let tid = TrialId(req.trial_id);
        let (exp, uri) = {
            let st = self.coord.lock();
            let t = st.trial(tid)?;
            let exp = st.experiment(t.experiment)?;
            let ranks = exp.spec.spec.resources.workers.max();
            if req.rank >= ranks {
                return Err(Status::invalid_argument(format!(
                    "trial {tid} has {ranks} rank(s); there is no rank {}",
                    req.rank
                )));
            }
            (t.experiment, exp.storage.clone())
        };
        let storage = self.coord.storage(&uri).await?;
        let prefix = storage.logs_prefix(exp, tid);
        let (tx, rx) = mpsc::channel(16);
        let coord = self.coord.clone();
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let cursor = crate::logs::Cursor::parse(&req.after);
            loop {
                // Read the trial's state before listing, so the last pass after it ends sees
                // every chunk its worker wrote.
                let ended = coord.lock().trials.get(&tid).is_none_or(|t| t.state.is_terminal());
                let listed: Result<Vec<_>, _> = storage.store.list(Some(&prefix)).try_collect().await;
                let mut objects = match listed {
                    Ok(o) => o,
                    Err(e) => {
                        let e = CoordError::storage(&uri, &format!("list the logs under {prefix}"), &e);
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                objects.sort_by(|a, b| a.location.cmp(&b.location));
                for o in objects {
                    let name = o.location.filename().unwrap_or_default().to_string();
                    let Some((attempt, rank, _)) = parse_log_chunk_name(&name) else {
                        continue;
                    };
                    let Some(start) = cursor.start_in(&name).filter(|_| rank == req.rank) else {
                        continue;
                    };
                    if !seen.insert(name.clone()) {
                        continue;
                    }
                    match crate::logs::send_chunk(&uri, &storage, &o.location, &name, attempt, start, &tx).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                }
                if !req.follow || ended {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type TrialMetricsStream = ResponseStream<pb::TrialMetricsPage>;

    async fn trial_metrics(
        &self,
        req: Request<pb::TrialMetricsRequest>,
    ) -> Result<Response<Self::TrialMetricsStream>, Status> {
        let req = req.into_inner();
        let tid = TrialId(req.trial_id);
        let query = history::Query::new(req.metrics, req.min_step, req.max_step, req.page_size, &req.after)?;
        let (exp, uri) = self.coord.lock().trial_storage(tid)?;
        let storage = self.coord.storage(&uri).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(history::send_history(storage, uri, exp, tid, query, tx));
        let pages = ReceiverStream::new(rx).map(|page| page.map(convert::metrics_page).map_err(Status::from));
        Ok(Response::new(Box::pin(pages)))
    }

    async fn list_workers(
        &self,
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.coord.lock().workers();
        let workers = workers.into_iter().map(convert::worker).collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn drain_worker(&self, req: Request<pb::DrainWorkerRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        let req = req.into_inner();
        let id = chorus_core::WorkerId(req.worker_id);
        let summary = self
            .coord
            .change(|st| {
                st.drain(&id, req.undo)?;
                Ok(st.worker(&id))
            })
            .await?;
        let info = match summary {
            Some(w) => convert::worker(w),
            // Undone for a worker that is gone: nothing to show but its id.
            None => pb::WorkerInfo {
                id: id.0,
                ..Default::default()
            },
        };
        Ok(Response::new(info))
    }
}

/// Refuses an `experiment update` past this coordinator's budget limits, as a submit would be.
fn check_budget_update(
    limits: &BudgetLimits,
    max_trials: Option<u64>,
    parallel_trials: Option<u32>,
) -> Result<(), CoordError> {
    if let Some(m) = max_trials.filter(|m| *m > limits.max_trials) {
        return Err(CoordError::InvalidArgument(format!(
            "max_trials: {m} is above this coordinator's limit of {} trials per experiment (--max-trials-per-experiment)",
            limits.max_trials
        )));
    }
    if let Some(p) = parallel_trials.filter(|p| *p > limits.max_parallel_trials) {
        return Err(CoordError::InvalidArgument(format!(
            "parallel_trials: {p} is above this coordinator's limit of {} (--max-parallel-trials)",
            limits.max_parallel_trials
        )));
    }
    Ok(())
}
