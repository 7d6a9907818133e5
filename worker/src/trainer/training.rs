//! The training itself, synchronous: one [`Trainer`] owns a model, its optimisers and its
//! counters, takes steps on batches, evaluates, and saves and restores checkpoints. [`super::spawn`]
//! runs it on its own thread; tests and the benchmark drive it directly.

use super::checkpoint::{self, Counters};
use super::config::{DeviceChoice, TrainConfig};
use super::metrics::Confusion;
use super::optim::{Optimizer, OptimizerSettings};
use super::precision::{Autocast, LossScaler};
use super::{Control, EpochReport, Outcome, StopRequest, TrainerEvent, Validation};
use crate::data::{Batch, BatchSource, DataCursor};
use crate::error::WorkerError;
use crate::models::gan::{self, DISCRIMINATOR_PREFIX, GENERATOR_PREFIX};
use crate::models::layers::Ctx;
use crate::models::{self, EmotionModel};
use crate::torch::{self, Draws};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};

#[path = "parallel.rs"]
mod parallel;
pub use parallel::DataParallel;

const MODEL_GROUP: &str = "model.";
const GENERATOR_GROUP: &str = "generator.";
const DISCRIMINATOR_GROUP: &str = "discriminator.";

/// Loss sums since the last report (`window`) and since the epoch began (`epoch`). They are part
/// of the checkpoint, so reports after a resume average exactly what the uninterrupted run did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sums {
    loss: f64,
    generator: f64,
    discriminator: f64,
    steps: u64,
}

impl Sums {
    const NAMES: [&'static str; 4] = ["loss", "generator", "discriminator", "steps"];

    fn add(&mut self, r: &StepResult) {
        self.loss += r.loss;
        if let Some((g, d)) = r.gan {
            self.generator += g;
            self.discriminator += d;
        }
        self.steps += 1;
    }

    fn mean(&self, x: f64) -> f64 {
        if self.steps == 0 { 0.0 } else { x / self.steps as f64 }
    }

    fn to_tensors(self, prefix: &str) -> Vec<(String, Tensor)> {
        let values = [self.loss, self.generator, self.discriminator, self.steps as f64];
        Self::NAMES
            .iter()
            .zip(values)
            .map(|(n, v)| (format!("{prefix}{n}"), Tensor::from_slice(&[v])))
            .collect()
    }

    fn from_tensors(t: &HashMap<String, Tensor>, prefix: &str) -> Result<Self, String> {
        let get = |n: &str| {
            t.get(&format!("{prefix}{n}"))
                .map(|x| x.double_value(&[0]))
                .ok_or_else(|| format!("state lacks {prefix}{n}"))
        };
        Ok(Sums {
            loss: get("loss")?,
            generator: get("generator")?,
            discriminator: get("discriminator")?,
            steps: get("steps")? as u64,
        })
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResult {
    pub loss: f64,
    pub lr: f64,
    /// Generator and discriminator losses, where the model has a GAN.
    pub gan: Option<(f64, f64)>,
}

pub struct Trainer {
    config: TrainConfig,
    device: Device,
    vs: VarStore,
    model: Box<dyn EmotionModel>,
    optimizer: Optimizer,
    /// Generator and discriminator optimisers, where the model has a GAN.
    gan_optimizers: Option<(Optimizer, Optimizer)>,
    /// fp16's loss scaling; `None` at other precisions.
    scaler: Option<LossScaler>,
    parameters: i64,
    epoch: u64,
    step: u64,
    /// Where the source stands within `epoch`, once the epoch has begun.
    cursor: Option<DataCursor>,
    window: Sums,
    epoch_sums: Sums,
    /// The step count and directory of the last checkpoint saved or resumed from, so the same
    /// state is not saved twice.
    last_saved: Option<(u64, PathBuf)>,
}

/// The device `choice` names: for CUDA, the GPU with ordinal `ordinal` in this process.
fn resolve_device(choice: DeviceChoice, ordinal: usize) -> Result<Device, WorkerError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda | DeviceChoice::Auto => {
            let loaded = torch::load_cuda();
            let count = if tch::Cuda::is_available() {
                tch::Cuda::device_count().max(0) as usize
            } else {
                0
            };
            if ordinal < count {
                Ok(Device::Cuda(ordinal))
            } else if count > 0 {
                Err(WorkerError::CudaUnavailable(format!(
                    "GPU {ordinal} was asked for; libtorch sees {count} GPU(s)"
                )))
            } else if choice == DeviceChoice::Auto {
                Ok(Device::Cpu)
            } else {
                Err(WorkerError::CudaUnavailable(match loaded {
                    Ok(()) => "libtorch_cuda.so loaded but libtorch finds no GPU".into(),
                    Err(e) => format!("cannot load libtorch_cuda.so: {e}"),
                }))
            }
        }
    }
}

/// The store's trainable variables whose names start with `prefix` (all when empty) and not with
/// any of `excluding`, sorted by name so the order never depends on a hash map.
fn trainable(vs: &VarStore, prefix: &str, excluding: &[&str]) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(n, t)| t.requires_grad() && n.starts_with(prefix) && !excluding.iter().any(|x| n.starts_with(x)))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

impl Trainer {
    /// A fresh trainer: the model initialised from the seed alone, on the configured device.
    pub fn new(config: TrainConfig) -> Result<Self, WorkerError> {
        config.validate()?;
        let device = resolve_device(config.device, config.cuda_device())?;
        if config.precision == super::Precision::Fp16 && device == Device::Cpu {
            // oneDNN has no fp16 recurrent layers on most CPUs, and fp16 gains nothing there.
            return Err(WorkerError::Train(
                "precision fp16 needs a GPU; on the CPU use bf16 (or fp32)".into(),
            ));
        }
        let init_seed = torch::mix(&[config.seed, 0x696e_6974]);
        let build = |device| {
            torch::with_global_seed(init_seed, || {
                let vs = VarStore::new(device);
                let model = models::build(&config.model, &vs)?;
                Ok::<_, WorkerError>((vs, model))
            })
        };
        // Initial values are always drawn on the CPU, so a seed gives the same weights on every
        // device. A model for a GPU is built there (tch's LSTMs keep the device they were built
        // on, and cuDNN packs their weights then) and takes the CPU build's values.
        let (vs, model) = build(Device::Cpu)?;
        let (vs, model) = if device == Device::Cpu {
            (vs, model)
        } else {
            let initial = vs.variables();
            let (on_device, model) = build(device)?;
            tch::no_grad(|| {
                for (name, mut var) in on_device.variables() {
                    var.copy_(&initial[&name]);
                }
            });
            (on_device, model)
        };
        let optimizer = Optimizer::new(
            config.optimizer_settings(),
            trainable(&vs, "", &[GENERATOR_PREFIX, DISCRIMINATOR_PREFIX]),
        );
        let gan_optimizers = match (&config.model, model.gan()) {
            (models::ModelConfig::Multimodal(m), Some(_)) => {
                let s = OptimizerSettings::adam(m.gan.beta1, m.gan.beta2);
                s.validate()?;
                Some((
                    Optimizer::new(s, trainable(&vs, GENERATOR_PREFIX, &[])),
                    Optimizer::new(s, trainable(&vs, DISCRIMINATOR_PREFIX, &[])),
                ))
            }
            _ => None,
        };
        let parameters = models::layers::parameter_count(&vs);
        Ok(Trainer {
            scaler: LossScaler::for_precision(config.precision),
            config,
            device,
            vs,
            model,
            optimizer,
            gan_optimizers,
            parameters,
            epoch: 0,
            step: 0,
            cursor: None,
            window: Sums::default(),
            epoch_sums: Sums::default(),
            last_saved: None,
        })
    }

    /// A trainer continuing from the checkpoint in `dir`. The model config must be the one the
    /// checkpoint was taken with; the rest of `config` (epochs, schedule...) may differ.
    pub fn resume(config: TrainConfig, dir: &Path) -> Result<Self, WorkerError> {
        let loaded = checkpoint::load(dir)?;
        let bad = |reason: String| WorkerError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        if loaded.counters.config.model != config.model {
            return Err(bad("it was taken with another model config".into()));
        }
        let mut t = Trainer::new(config)?;
        let mut vars = t.vs.variables();
        if vars.len() != loaded.model.len() {
            return Err(bad(format!(
                "it holds {} model tensors, the model has {}",
                loaded.model.len(),
                vars.len()
            )));
        }
        tch::no_grad(|| {
            for (name, var) in vars.iter_mut() {
                let src = loaded.model.get(name).ok_or_else(|| format!("it lacks {name}"))?;
                super::optim::copy_checked(var, src, name)?;
            }
            Ok(())
        })
        .map_err(bad)?;
        t.optimizer.load_state(&loaded.state, MODEL_GROUP).map_err(bad)?;
        if let Some((g, d)) = &mut t.gan_optimizers {
            g.load_state(&loaded.state, GENERATOR_GROUP).map_err(bad)?;
            d.load_state(&loaded.state, DISCRIMINATOR_GROUP).map_err(bad)?;
        }
        if t.scaler.is_some() {
            t.scaler = Some(LossScaler::from_tensors(&loaded.state).map_err(bad)?);
        }
        t.window = Sums::from_tensors(&loaded.state, "trainer.window.").map_err(bad)?;
        t.epoch_sums = Sums::from_tensors(&loaded.state, "trainer.epoch.").map_err(bad)?;
        t.epoch = loaded.counters.epoch;
        t.step = loaded.counters.step;
        t.cursor = loaded.counters.cursor;
        t.last_saved = Some((t.step, dir.to_path_buf()));
        Ok(t)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Trainable values in the model, the GAN's included.
    pub fn parameters(&self) -> i64 {
        self.parameters
    }

    /// Optimiser steps taken in all.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The 0-based epoch in progress (or next to start).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    fn check_labels(&self, labels: &Tensor) -> Result<(), WorkerError> {
        let k = self.model.num_classes();
        if labels.numel() == 0 {
            return Err(WorkerError::Data("an empty batch".into()));
        }
        // One read back (a device sync on a GPU) when all is well.
        let bad = labels.lt(0).logical_or(&labels.ge(k));
        if bad.any().int64_value(&[]) == 0 {
            return Ok(());
        }
        let first = labels.masked_select(&bad).get(0).int64_value(&[]);
        Err(WorkerError::Data(format!("a label {first} is not a class of 0..{k}")))
    }

    /// One optimiser step of the classifier (and, with a GAN, one of its discriminator and one
    /// of its generator) on `batch`, with learning rate `lr`.
    pub fn train_step(&mut self, batch: &Batch, steps_per_epoch: u64) -> Result<StepResult, WorkerError> {
        self.check_labels(&batch.labels)?;
        let batch = batch.to_device(self.device);
        let lr = self.config.learning_rate(self.step, self.epoch, steps_per_epoch);
        let draws = Draws::new(torch::mix(&[self.config.seed, self.epoch, self.step]));
        let ctx = Ctx::train(&draws);
        let labels = &batch.labels;

        // The forward pass at the trial's precision; the backward pass follows autocast's casts.
        let (fused, loss) = {
            let _autocast = Autocast::enter(self.config.precision, self.device);
            let fused = self.model.embed(&batch, &ctx)?; // [B, D]
            let (fused_all, targets) = match self.synthetic(labels, &ctx)? {
                Some((synth, classes)) => (
                    Tensor::cat(&[&fused, &synth.to_kind(fused.kind())], 0),
                    Tensor::cat(&[labels, &classes], 0),
                ),
                None => (fused.shallow_clone(), labels.shallow_clone()),
            };
            let logits = self.model.classify(&fused_all, &ctx);
            (fused, logits.cross_entropy_for_logits(&targets).to_kind(Kind::Float))
        };
        let grads = self.backward(&loss)?;
        if let Some(grads) = grads {
            self.optimizer.step(&grads, lr);
        }
        let loss = loss.double_value(&[]);
        if !loss.is_finite() {
            return Err(WorkerError::Train(format!(
                "the loss became {loss} at step {}",
                self.step + 1
            )));
        }

        let gan = match (self.model.gan(), &mut self.gan_optimizers) {
            (Some(g), Some((gen_opt, disc_opt))) => {
                let lr = match &self.config.model {
                    models::ModelConfig::Multimodal(m) => m.gan.lr,
                    models::ModelConfig::EmotionBench(_) => unreachable!("emotion-bench has no GAN"),
                };
                // The GAN is small and trains in fp32 whatever the classifier's precision.
                Some(gan_step(
                    g,
                    gen_opt,
                    disc_opt,
                    &fused.detach().to_kind(Kind::Float),
                    labels,
                    &ctx,
                    lr,
                ))
            }
            _ => None,
        };

        self.step += 1;
        let result = StepResult { loss, lr, gan };
        self.window.add(&result);
        self.epoch_sums.add(&result);
        Ok(result)
    }

    /// The gradients of `loss` for the classifier's parameters, scaled and checked at fp16.
    /// `None`: they overflowed, and the step is skipped (the scale has been lowered).
    fn backward(&mut self, loss: &Tensor) -> Result<Option<Vec<Tensor>>, WorkerError> {
        let grads = Tensor::run_backward(
            &[&self.loss_to_differentiate(loss)],
            self.optimizer.params(),
            false,
            false,
        );
        match &mut self.scaler {
            Some(scaler) => Ok(scaler.unscale(&grads, 1.0)?.then_some(grads)),
            None => Ok(Some(grads)),
        }
    }

    /// The loss whose gradients are taken: scaled at fp16.
    pub(super) fn loss_to_differentiate(&self, loss: &Tensor) -> Tensor {
        match &self.scaler {
            Some(s) => s.scale_loss(loss),
            None => loss.shallow_clone(),
        }
    }

    /// Turns gradients of [`Self::loss_to_differentiate`] times `total` into those of the loss,
    /// in place. `false`: they overflowed (fp16), and the step is to be skipped.
    pub(super) fn unscale(&mut self, grads: &mut Vec<Tensor>, total: f64) -> Result<bool, WorkerError> {
        match &mut self.scaler {
            Some(s) => s.unscale(grads, total),
            None => {
                *grads = tch::no_grad(|| grads.iter().map(|g| g / total).collect());
                Ok(true)
            }
        }
    }

    /// Generated embeddings of the rarer classes to add to this batch, once the GAN warmed up.
    pub(super) fn synthetic(&self, labels: &Tensor, ctx: &Ctx) -> Result<Option<(Tensor, Tensor)>, WorkerError> {
        let (Some(g), models::ModelConfig::Multimodal(m)) = (self.model.gan(), &self.config.model) else {
            return Ok(None);
        };
        if !self.model.augments_with_gan() || self.step < m.gan.warmup_steps {
            return Ok(None);
        }
        let k = self.model.num_classes() as usize;
        let shares = match &self.config.class_counts {
            Some(c) if c.len() == k => c.clone(),
            Some(c) => {
                return Err(WorkerError::Train(format!(
                    "class_counts has {} entries for {k} classes",
                    c.len()
                )));
            }
            None => {
                let counts = labels.bincount::<Tensor>(None, k as i64).to_device(Device::Cpu);
                Vec::<i64>::try_from(&counts)
                    .map_err(WorkerError::Torch)?
                    .into_iter()
                    .map(|c| c as f64)
                    .collect()
            }
        };
        let classes = gan::synthetic_classes(&shares, labels.size()[0] as usize, m.gan.synthetic_fraction);
        if classes.is_empty() {
            return Ok(None);
        }
        let classes = Tensor::from_slice(&classes).to_device(self.device);
        Ok(Some((g.generate(&classes, ctx).detach(), classes)))
    }

    /// Loss and metrics over the source's validation set, or `None` if `control` asked to stop
    /// meanwhile.
    pub fn evaluate(&self, source: &mut dyn BatchSource, control: &Control) -> Result<Option<Validation>, WorkerError> {
        let k = self.model.num_classes();
        let mut confusion = Confusion::new(k as usize);
        let mut loss_sum = 0.0;
        let ctx = Ctx::eval();
        let _guard = tch::no_grad_guard();
        for batch in source.validation() {
            if control.requested().is_some() {
                return Ok(None);
            }
            loss_sum += self.score_batch(&batch?, &ctx, &mut confusion)?;
        }
        Ok(Some(Validation::from_confusion(&confusion, loss_sum)))
    }

    /// One validation batch: its predictions go into `confusion`; returns its summed loss.
    /// Call under `no_grad`.
    pub(super) fn score_batch(&self, batch: &Batch, ctx: &Ctx, confusion: &mut Confusion) -> Result<f64, WorkerError> {
        self.check_labels(&batch.labels)?;
        let batch = batch.to_device(self.device);
        let logits = {
            let _autocast = Autocast::enter(self.config.precision, self.device);
            self.model
                .classify(&self.model.embed(&batch, ctx)?, ctx)
                .to_kind(Kind::Float)
        };
        let loss = logits
            .log_softmax(-1, Kind::Float)
            .g_nll_loss::<Tensor>(&batch.labels, None, Reduction::Sum, -100);
        let predicted: Vec<i64> = Vec::try_from(logits.argmax(-1, false).to_device(Device::Cpu))?;
        let truth: Vec<i64> = Vec::try_from(batch.labels.to_device(Device::Cpu))?;
        for (t, p) in truth.into_iter().zip(predicted) {
            confusion.add(t as usize, p as usize);
        }
        Ok(loss.double_value(&[]))
    }

    /// Saves the state as of the last step into `dir`.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<(), WorkerError> {
        let mut model: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        model.sort_by(|a, b| a.0.cmp(&b.0));
        let mut state = self.optimizer.state_tensors(MODEL_GROUP);
        if let Some((g, d)) = &self.gan_optimizers {
            state.extend(g.state_tensors(GENERATOR_GROUP));
            state.extend(d.state_tensors(DISCRIMINATOR_GROUP));
        }
        if let Some(s) = &self.scaler {
            state.extend(s.to_tensors());
        }
        state.extend(self.window.to_tensors("trainer.window."));
        state.extend(self.epoch_sums.to_tensors("trainer.epoch."));
        let counters = Counters {
            format: 1,
            epoch: self.epoch,
            step: self.step,
            cursor: self.cursor.clone(),
            parameters: self.parameters,
            config: self.config.clone(),
        };
        checkpoint::save(dir, model, state, &counters)?;
        self.last_saved = Some((self.step, dir.to_path_buf()));
        Ok(())
    }

    fn checkpoint(&mut self, root: &Path, emit: &mut dyn FnMut(TrainerEvent)) -> Result<PathBuf, WorkerError> {
        let dir = checkpoint::dir_for(root, self.step);
        self.save_checkpoint(&dir)?;
        emit(TrainerEvent::Checkpoint {
            epoch: self.epoch + 1,
            step: self.step,
            dir: dir.clone(),
            data_position: self
                .cursor
                .as_ref()
                .filter(|c| !c.detail.is_null())
                .map(|c| c.detail.to_string()),
        });
        Ok(dir)
    }

    /// Trains until the configured epochs (or `max_steps`) are done, or `control` asks to stop;
    /// checks `control` before every step and every validation batch. Checkpoints go under
    /// `checkpoint_root` (one directory per step count), events to `emit`.
    pub fn run(
        &mut self,
        source: &mut dyn BatchSource,
        control: &Control,
        checkpoint_root: &Path,
        emit: &mut dyn FnMut(TrainerEvent),
    ) -> Result<Outcome, WorkerError> {
        let steps_per_epoch = source.steps_per_epoch();
        let max_steps = self.config.max_steps.unwrap_or(u64::MAX);
        while self.epoch < self.config.epochs {
            match &self.cursor {
                Some(c) => source.seek(c)?,
                None => {
                    source.begin_epoch(self.epoch)?;
                    self.cursor = Some(source.cursor());
                }
            }
            // The source may prepare the next epoch's first batches while this one ends.
            if self.epoch + 1 < self.config.epochs {
                source.prefetch_epoch(self.epoch + 1);
            }
            loop {
                if let Some(stop) = control.requested() {
                    return self.stop(stop, checkpoint_root, source, emit);
                }
                if self.step >= max_steps {
                    return self.finish(checkpoint_root, source, emit);
                }
                let before = source.cursor();
                let Some(batch) = source.next_train()? else { break };
                // A periodic checkpoint falls due after a step but is taken only once another
                // batch shows the epoch goes on: at an epoch's end, the epoch's own checkpoint
                // (after validation) replaces it.
                if self
                    .config
                    .checkpoint_every
                    .is_some_and(|n| self.step > 0 && self.step.is_multiple_of(n))
                    && self.saved_dir().is_none()
                {
                    self.cursor = Some(before);
                    self.checkpoint(checkpoint_root, emit)?;
                }
                let r = self.train_step(&batch, steps_per_epoch)?;
                if self.step.is_multiple_of(self.config.log_every) {
                    self.report_window(r.lr, emit);
                }
            }
            let Some(validation) = self.evaluate(source, control)? else {
                let stop = control.requested().expect("evaluation stops only when asked");
                return self.stop(stop, checkpoint_root, source, emit);
            };
            let gan = self.gan_optimizers.is_some();
            emit(TrainerEvent::Epoch(EpochReport {
                epoch: self.epoch + 1,
                step: self.step,
                train_loss: self.epoch_sums.mean(self.epoch_sums.loss),
                generator_loss: gan.then(|| self.epoch_sums.mean(self.epoch_sums.generator)),
                discriminator_loss: gan.then(|| self.epoch_sums.mean(self.epoch_sums.discriminator)),
                validation,
            }));
            self.epoch += 1;
            self.cursor = None;
            self.epoch_sums = Sums::default();
            self.checkpoint(checkpoint_root, emit)?;
        }
        self.finish(checkpoint_root, source, emit)
    }

    /// Within an epoch, records where the source now stands (the next batch to train on).
    fn sync_cursor(&mut self, source: &dyn BatchSource) {
        if self.cursor.is_some() {
            self.cursor = Some(source.cursor());
        }
    }

    /// The directory of a checkpoint of exactly the current state, if one was saved.
    fn saved_dir(&self) -> Option<PathBuf> {
        self.last_saved
            .as_ref()
            .filter(|(step, _)| *step == self.step)
            .map(|(_, dir)| dir.clone())
    }

    fn report_window(&mut self, lr: f64, emit: &mut dyn FnMut(TrainerEvent)) {
        let w = std::mem::take(&mut self.window);
        emit(TrainerEvent::TrainLoss {
            epoch: self.epoch + 1,
            step: self.step,
            loss: w.mean(w.loss),
            lr,
        });
        if self.gan_optimizers.is_some() {
            emit(TrainerEvent::GanLoss {
                epoch: self.epoch + 1,
                step: self.step,
                generator: w.mean(w.generator),
                discriminator: w.mean(w.discriminator),
            });
        }
    }

    fn finish(
        &mut self,
        root: &Path,
        source: &dyn BatchSource,
        emit: &mut dyn FnMut(TrainerEvent),
    ) -> Result<Outcome, WorkerError> {
        if self.saved_dir().is_none() {
            self.sync_cursor(source);
            self.checkpoint(root, emit)?;
        }
        Ok(Outcome::Completed {
            epoch: self.epoch,
            step: self.step,
        })
    }

    fn stop(
        &mut self,
        stop: StopRequest,
        root: &Path,
        source: &dyn BatchSource,
        emit: &mut dyn FnMut(TrainerEvent),
    ) -> Result<Outcome, WorkerError> {
        match stop {
            StopRequest::Kill => Ok(Outcome::Killed { step: self.step }),
            StopRequest::Pause => {
                let checkpoint = match self.saved_dir() {
                    Some(dir) => dir,
                    None => {
                        self.sync_cursor(source);
                        self.checkpoint(root, emit)?
                    }
                };
                Ok(Outcome::Paused {
                    step: self.step,
                    checkpoint,
                })
            }
        }
    }
}

/// One discriminator step on real fused embeddings against generated ones, then one generator
/// step, both conditioned on the batch's labels. Returns (generator loss, discriminator loss).
fn gan_step(
    g: &gan::ConditionalGan,
    gen_opt: &mut Optimizer,
    disc_opt: &mut Optimizer,
    real: &Tensor,
    labels: &Tensor,
    ctx: &Ctx,
    lr: f64,
) -> (f64, f64) {
    let bce = |logits: &Tensor, target: f64| {
        logits.binary_cross_entropy_with_logits::<Tensor>(&logits.full_like(target), None, None, Reduction::Mean)
    };
    let fake = g.generate(labels, ctx).detach(); // [B, D]
    let d_loss = bce(&g.discriminate(real, labels), 1.0) + bce(&g.discriminate(&fake, labels), 0.0);
    let grads = Tensor::run_backward(&[&d_loss], disc_opt.params(), false, false);
    disc_opt.step(&grads, lr);

    let fake = g.generate(labels, ctx); // [B, D]
    let g_loss = bce(&g.discriminate(&fake, labels), 1.0);
    let grads = Tensor::run_backward(&[&g_loss], gen_opt.params(), false, false);
    gen_opt.step(&grads, lr);
    (g_loss.double_value(&[]), d_loss.double_value(&[]))
}
