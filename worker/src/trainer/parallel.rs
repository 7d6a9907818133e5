//! Synchronous data-parallel training: every rank holds a replica, takes a step on its own
//! batch, and the ranks' gradients are summed by one bucketed all-reduce before each identical
//! optimiser step.
//!
//! The gradient of a step is that of the mean loss over all the samples the ranks trained on in
//! it: each rank contributes `n_r * grad(mean loss_r)`, the sum is divided by `N = sum n_r`. So
//! ranks may hold unequal batches (a rank whose part of the epoch ran out contributes nothing)
//! and no sample is dropped or padded. The sample count, the loss sum and a stop flag ride in
//! the same all-reduce as the gradients, so the end of the epoch (N = 0) and a pause asked of
//! any one rank are seen by all ranks at the same step without another round trip.
//!
//! Rank 0 speaks for the run: it alone emits reports and writes checkpoints. Validation is
//! split between the ranks and its confusion matrix summed.

use super::{MODEL_GROUP, StepResult, Trainer};
use crate::collective::buckets::GradientBuckets;
use crate::collective::{Collective, ReduceOp};
use crate::data::{Batch, BatchSource, DataCursor};
use crate::error::WorkerError;
use crate::models::layers::Ctx;
use crate::torch::{self, Draws};
use crate::trainer::metrics::Confusion;
use crate::trainer::precision::{Autocast, LossScaler};
use crate::trainer::{Control, EpochReport, Outcome, StopRequest, TrainerEvent, Validation};
use chorus_core::shards::{DataPosition, ShardSize, plan_epoch};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What a rank of a data-parallel run needs beyond a single-rank trainer.
pub struct DataParallel {
    pub collective: Box<dyn Collective>,
    /// Where this attempt starts reading, as the rendezvous decided.
    pub position: DataPosition,
    /// Gradients per all-reduce bucket.
    pub bucket_bytes: usize,
    /// Where to append, per trained step, the keys of the samples this rank trained on (a
    /// lineage for audits of exactly-once reading); `None` keeps none.
    pub sample_trace: Option<PathBuf>,
}

/// The slots of the scalars that ride with the gradients.
const SAMPLES: usize = 0;
const LOSS_SUM: usize = 1;
const PAUSE: usize = 2;

impl Trainer {
    /// Buckets planned over this model's trainable parameters.
    pub fn gradient_buckets(&self, bucket_bytes: usize) -> GradientBuckets {
        GradientBuckets::new(self.optimizer.params(), bucket_bytes)
    }

    /// Makes this replica identical to rank 0's: model weights, optimiser state, counters and
    /// (fp16) the loss scale, so every rank scales and unscales its gradients alike.
    pub fn sync_from_rank0(&mut self, c: &mut dyn Collective) -> Result<(), WorkerError> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| -> Result<(), WorkerError> {
            for (_, v) in vars.iter_mut() {
                let mut flat = v.detach().contiguous();
                c.broadcast(&mut flat, 0)?;
                v.copy_(&flat);
            }
            Ok(())
        })?;
        // Moved to the model's device: NCCL broadcasts device memory only.
        let mut state = self.optimizer.state_tensors(MODEL_GROUP);
        for (_, t) in state.iter_mut() {
            let mut flat = t.to_device(self.device).contiguous();
            c.broadcast(&mut flat, 0)?;
            *t = flat.to_device(Device::Cpu);
        }
        let state: std::collections::HashMap<String, Tensor> = state.into_iter().collect();
        self.optimizer
            .load_state(&state, MODEL_GROUP)
            .map_err(|e| WorkerError::Train(format!("optimiser state from rank 0: {e}")))?;
        let mut counters = Tensor::from_slice(&[self.epoch as i64, self.step as i64]).to_device(self.device);
        c.broadcast(&mut counters, 0)?;
        let v: Vec<i64> = Vec::try_from(counters.to_device(Device::Cpu))?;
        (self.epoch, self.step) = (v[0] as u64, v[1] as u64);
        if let Some(scaler) = &mut self.scaler {
            let (name, t) = scaler.to_tensors().remove(0);
            let mut flat = t.to_device(self.device);
            c.broadcast(&mut flat, 0)?;
            let from_rank0 = std::collections::HashMap::from([(name, flat.to_device(Device::Cpu))]);
            *scaler = LossScaler::from_tensors(&from_rank0)
                .map_err(|e| WorkerError::Train(format!("loss scale from rank 0: {e}")))?;
        }
        Ok(())
    }

    /// One synchronous step. `batch` is this rank's, or `None` once its part of the epoch is
    /// read. Returns `None`, without stepping, when no rank had a batch (the epoch is over),
    /// and whether any rank asked to pause.
    pub fn parallel_step(
        &mut self,
        batch: Option<&Batch>,
        steps_per_epoch: u64,
        pause: bool,
        buckets: &mut GradientBuckets,
        c: &mut dyn Collective,
    ) -> Result<(Option<StepResult>, bool), WorkerError> {
        let lr = self.config.learning_rate(self.step, self.epoch, steps_per_epoch);
        let mut extra = [0.0; 3];
        extra[PAUSE] = f64::from(u8::from(pause));
        let mut grads: Vec<Tensor> = match batch {
            Some(batch) => {
                self.check_labels(&batch.labels)?;
                let batch = batch.to_device(self.device);
                let draws = Draws::new(torch::mix(&[self.config.seed, self.epoch, self.step, c.rank() as u64]));
                let ctx = Ctx::train(&draws);
                let loss = {
                    let _autocast = Autocast::enter(self.config.precision, self.device);
                    let fused = self.model.embed(&batch, &ctx)?; // [B, D]
                    let logits = self.model.classify(&fused, &ctx); // [B, K]
                    logits.cross_entropy_for_logits(&batch.labels).to_kind(Kind::Float)
                };
                let n = batch.len() as f64;
                let grads = Tensor::run_backward(
                    &[&self.loss_to_differentiate(&loss)],
                    self.optimizer.params(),
                    false,
                    false,
                );
                extra[SAMPLES] = n;
                extra[LOSS_SUM] = loss.double_value(&[]) * n;
                // Weighted by the batch, so the sum over ranks is N times the global mean's gradient.
                tch::no_grad(|| grads.into_iter().map(|g| g * n).collect())
            }
            None => self.optimizer.params().iter().map(Tensor::zeros_like).collect(),
        };
        buckets.all_reduce(&mut grads, c, ReduceOp::Sum, &mut extra)?;
        let paused = extra[PAUSE] > 0.0;
        let total = extra[SAMPLES].round();
        if total < 1.0 {
            return Ok((None, paused));
        }
        // Every rank unscales the same reduced gradients, so all skip an overflowed step or none.
        if self.unscale(&mut grads, total)? {
            self.optimizer.step(&grads, lr);
        }
        let loss = extra[LOSS_SUM] / total;
        if !loss.is_finite() {
            return Err(WorkerError::Train(format!(
                "the loss became {loss} at step {}",
                self.step + 1
            )));
        }
        self.step += 1;
        let result = StepResult { loss, lr, gan: None };
        self.window.add(&result);
        self.epoch_sums.add(&result);
        Ok((Some(result), paused))
    }

    /// Validation split between the ranks (rank r takes batches r, r + world, ...), with the
    /// confusion matrix and loss summed over them: every rank gets the whole set's figures.
    fn evaluate_parallel(
        &self,
        source: &mut dyn BatchSource,
        c: &mut dyn Collective,
    ) -> Result<Validation, WorkerError> {
        let k = self.model.num_classes() as usize;
        let (rank, world) = (c.rank(), c.world_size());
        let mut confusion = Confusion::new(k);
        let mut loss_sum = 0.0;
        let ctx = Ctx::eval();
        {
            let _guard = tch::no_grad_guard();
            for (i, batch) in source.validation().enumerate() {
                if i % world == rank {
                    loss_sum += self.score_batch(&batch?, &ctx, &mut confusion)?;
                }
            }
        }
        // One all-reduce of the counts and the loss; counts stay exact in float32 up to 2^24
        // samples per cell.
        let mut local: Vec<f32> = confusion.counts().iter().map(|&x| x as f32).collect();
        local.push(loss_sum as f32);
        let mut summed = Tensor::from_slice(&local).to_device(self.device);
        c.all_reduce(&mut summed, ReduceOp::Sum)?;
        let summed: Vec<f32> = Vec::try_from(summed.to_device(Device::Cpu))?;
        let counts = summed[..k * k].iter().map(|x| x.round() as u64).collect();
        Ok(Validation::from_confusion(
            &Confusion::from_counts(k, counts),
            f64::from(summed[k * k]),
        ))
    }

    /// Trains as one rank of a data-parallel run until the configured epochs are done or a stop
    /// is asked. A kill stops this rank at once (its peers then fail on their next collective);
    /// a pause is agreed on by all ranks at the same step, after which rank 0 checkpoints.
    pub fn run_parallel(
        &mut self,
        source: &mut dyn BatchSource,
        control: &Control,
        checkpoint_root: &Path,
        dp: DataParallel,
        emit: &mut dyn FnMut(TrainerEvent),
    ) -> Result<Outcome, WorkerError> {
        let DataParallel {
            mut collective,
            position,
            bucket_bytes,
            sample_trace,
        } = dp;
        let c = collective.as_mut();
        if self.gan_optimizers.is_some() {
            return Err(WorkerError::Train(
                "GAN augmentation is not available for data-parallel trials; use workers: 1".into(),
            ));
        }
        let (rank, world) = (c.rank(), c.world_size());
        let lead = rank == 0;
        let mut emit = |e: TrainerEvent| {
            if lead {
                emit(e)
            }
        };
        let shards: Vec<ShardSize> = source.shard_sizes()?;
        let batch = self.config.batch_size as u64;
        let seed = self.config.seed;
        let mut trace = match &sample_trace {
            Some(path) => Some(SampleTrace::open(path, rank)?),
            None => None,
        };
        let mut buckets = self.gradient_buckets(bucket_bytes);
        // The steps of a whole epoch at this world size, for the learning-rate schedule.
        let steps_per_epoch = plan_epoch(&shards, seed, 0, world).steps(batch).max(1);
        let max_steps = self.config.max_steps.unwrap_or(u64::MAX);
        let mut position = Some(position);
        while self.epoch < self.config.epochs {
            let mut pos = match position.take() {
                Some(p) if p.plan.epoch == self.epoch => p,
                _ => DataPosition::start(plan_epoch(&shards, seed, self.epoch, world), batch),
            };
            if pos.plan.world_size() != world {
                return Err(WorkerError::Train(format!(
                    "the data plan is for {} ranks, this run has {world}",
                    pos.plan.world_size()
                )));
            }
            source.begin_spans(self.epoch, &pos.plan.ranks[rank])?;
            if self.epoch + 1 < self.config.epochs {
                // Plans are a function of (shards, seed, epoch, world): the next one is known now.
                let next = plan_epoch(&shards, seed, self.epoch + 1, world);
                source.prefetch_spans(self.epoch + 1, &next.ranks[rank]);
            }
            self.cursor = Some(cursor_of(&pos));
            loop {
                let stop = control.requested();
                if stop == Some(StopRequest::Kill) {
                    return Ok(Outcome::Killed { step: self.step });
                }
                if self.step >= max_steps {
                    return self.finish_parallel(checkpoint_root, lead, &mut emit);
                }
                let batch = source.next_train()?;
                let keys = batch.as_ref().map(|_| source.last_keys());
                let (result, paused) = self.parallel_step(
                    batch.as_ref(),
                    steps_per_epoch,
                    stop == Some(StopRequest::Pause),
                    &mut buckets,
                    c,
                )?;
                let Some(r) = result else {
                    if paused {
                        return self.pause_parallel(checkpoint_root, lead, &mut emit);
                    }
                    break;
                };
                pos.steps += 1;
                self.cursor = Some(cursor_of(&pos));
                if let (Some(t), Some(keys)) = (trace.as_mut(), keys) {
                    t.record(self.epoch, self.step, &keys)?;
                }
                if self.step.is_multiple_of(self.config.log_every) {
                    self.report_window(r.lr, &mut emit);
                }
                if paused {
                    return self.pause_parallel(checkpoint_root, lead, &mut emit);
                }
                if lead
                    && self
                        .config
                        .checkpoint_every
                        .is_some_and(|n| self.step.is_multiple_of(n))
                    && !pos.is_finished()
                {
                    self.checkpoint(checkpoint_root, &mut emit)?;
                }
            }
            let validation = self.evaluate_parallel(source, c)?;
            emit(TrainerEvent::Epoch(EpochReport {
                epoch: self.epoch + 1,
                step: self.step,
                train_loss: self.epoch_sums.mean(self.epoch_sums.loss),
                generator_loss: None,
                discriminator_loss: None,
                validation,
            }));
            self.epoch += 1;
            self.cursor = None;
            self.epoch_sums = Default::default();
            if lead {
                self.checkpoint(checkpoint_root, &mut emit)?;
            }
        }
        self.finish_parallel(checkpoint_root, lead, &mut emit)
    }

    fn finish_parallel(
        &mut self,
        root: &Path,
        lead: bool,
        emit: &mut dyn FnMut(TrainerEvent),
    ) -> Result<Outcome, WorkerError> {
        if self.saved_dir().is_none() && lead {
            self.checkpoint(root, emit)?;
        }
        Ok(Outcome::Completed {
            epoch: self.epoch,
            step: self.step,
        })
    }

    fn pause_parallel(
        &mut self,
        root: &Path,
        lead: bool,
        emit: &mut dyn FnMut(TrainerEvent),
    ) -> Result<Outcome, WorkerError> {
        let checkpoint = match self.saved_dir() {
            Some(dir) => dir,
            None if lead => self.checkpoint(root, emit)?,
            None => root.to_path_buf(),
        };
        Ok(Outcome::Paused {
            step: self.step,
            checkpoint,
        })
    }
}

fn cursor_of(pos: &DataPosition) -> DataCursor {
    DataCursor {
        epoch: pos.plan.epoch,
        batch: pos.steps,
        detail: serde_json::to_value(pos).expect("positions serialise"),
    }
}

/// Appends one JSON line per trained step: epoch, step, rank and the sample keys.
struct SampleTrace {
    file: std::io::BufWriter<std::fs::File>,
    rank: usize,
}

impl SampleTrace {
    fn open(dir: &Path, rank: usize) -> Result<Self, WorkerError> {
        std::fs::create_dir_all(dir).map_err(WorkerError::io(dir))?;
        let path = dir.join(format!("rank-{rank}-{}.jsonl", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(WorkerError::io(&path))?;
        Ok(SampleTrace {
            file: std::io::BufWriter::new(file),
            rank,
        })
    }

    fn record(&mut self, epoch: u64, step: u64, keys: &[String]) -> Result<(), WorkerError> {
        let line = serde_json::json!({"epoch": epoch, "step": step, "rank": self.rank, "keys": keys});
        // Flushed per step: a rank killed right after a step must leave that step on record.
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| WorkerError::Data(format!("sample trace: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::{RingCollective, RingConfig, RingListener};
    use crate::data::synthetic::{SyntheticConfig, SyntheticSource};
    use crate::models::ModelConfig;
    use crate::models::emotion_bench::EmotionBenchConfig;
    use crate::trainer::{DeviceChoice, OptimizerKind, TrainConfig};
    use std::time::Duration;

    const STEPS: u64 = 5;
    const PER_RANK: i64 = 8;

    fn config(batch: usize) -> TrainConfig {
        TrainConfig {
            // Without batch statistics and dropout a sample's gradient does not depend on which
            // rank's batch it is in; the two runs must then agree.
            model: ModelConfig::EmotionBench(EmotionBenchConfig {
                batch_stats: false,
                dropout: 0.0,
            }),
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            batch_size: batch,
            seed: 11,
            threads: 1,
            device: DeviceChoice::Cpu,
            ..Default::default()
        }
    }

    fn batches() -> Vec<Batch> {
        let source = SyntheticSource::new(SyntheticConfig {
            batch_size: 2 * PER_RANK,
            seed: 4,
            ..Default::default()
        })
        .unwrap();
        (0..STEPS).map(|i| source.make_batch(0, 0, i)).collect()
    }

    fn weights(t: &Trainer) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = t.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Two ranks over a real TCP ring, each on half of every batch, against one rank on the
    /// whole batches: after five Adam steps every parameter agrees to a relative 1e-4.
    #[test]
    fn two_ranks_match_one_rank_on_the_doubled_batch() {
        crate::torch::prepare(1);
        let mut single = Trainer::new(config(2 * PER_RANK as usize)).unwrap();
        for b in &batches() {
            single.train_step(b, STEPS).unwrap();
        }

        let listeners: Vec<RingListener> = (0..2)
            .map(|_| RingListener::bind(std::net::Ipv4Addr::LOCALHOST.into()).unwrap())
            .collect();
        let peers: Vec<_> = listeners.iter().map(RingListener::local_addr).collect();
        let ranks: Vec<Vec<(String, Tensor)>> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let peers = peers.clone();
                    s.spawn(move || {
                        let data = batches();
                        let ring_config = RingConfig {
                            timeout: Duration::from_secs(20),
                            ..RingConfig::default()
                        };
                        let mut ring = RingCollective::connect(listener, rank, &peers, 9, ring_config).unwrap();
                        let mut t = Trainer::new(config(PER_RANK as usize)).unwrap();
                        if rank == 1 {
                            // Different starting weights: rank 0's broadcast must replace them.
                            tch::no_grad(|| {
                                for (_, mut v) in t.vs.variables() {
                                    let _ = v.fill_(0.5);
                                }
                            });
                        }
                        t.sync_from_rank0(&mut ring).unwrap();
                        let mut buckets = GradientBuckets::new(t.optimizer.params(), 64 * 1024);
                        let mut losses = Vec::new();
                        for b in &data {
                            let half = b.narrow(rank as i64 * PER_RANK, PER_RANK);
                            let (r, paused) = t
                                .parallel_step(Some(&half), STEPS, false, &mut buckets, &mut ring)
                                .unwrap();
                            assert!(!paused);
                            losses.push(r.unwrap().loss);
                        }
                        // The end of an epoch: no rank has a batch, so no step is taken.
                        let (r, _) = t.parallel_step(None, STEPS, false, &mut buckets, &mut ring).unwrap();
                        assert!(r.is_none());
                        assert_eq!(t.step(), STEPS);
                        weights(&t)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let reference = weights(&single);
        for replica in &ranks {
            assert_eq!(replica.len(), reference.len());
            for ((name, a), (_, b)) in reference.iter().zip(replica) {
                let diff = (a - b).norm().double_value(&[]);
                let scale = a.norm().double_value(&[]).max(1e-12);
                assert!(diff / scale <= 1e-4, "{name}: relative difference {}", diff / scale);
            }
        }
    }
}
