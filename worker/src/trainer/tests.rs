//! Trainer behaviour on tiny models and synthetic data, fast enough for debug builds.

use super::*;
use crate::data::synthetic::{SyntheticConfig, SyntheticSource};
use crate::data::{Batch, DataCursor};
use crate::models::ModelConfig;
use crate::models::fusion::{FusionConfig, FusionKind};
use crate::models::gan::GanConfig;
use crate::models::multimodal::{Augment, MultimodalConfig, tiny_config, tiny_data};
use std::path::Path;

fn data(train_batches: u64) -> SyntheticConfig {
    SyntheticConfig {
        batch_size: 8,
        train_batches,
        val_batches: 2,
        missing: 0.2,
        variable_lengths: true,
        ..tiny_data()
    }
}

fn config(model: MultimodalConfig) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::Multimodal(model),
        epochs: 3,
        lr: 3e-3,
        threads: 1,
        device: DeviceChoice::Cpu,
        log_every: 1,
        ..Default::default()
    }
}

/// Concatenation, AdamW with decay and a cosine schedule.
fn plain() -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerKind::AdamW,
        weight_decay: 0.01,
        lr_schedule: LrSchedule::Cosine,
        ..config(tiny_config())
    }
}

/// Gated attention, GAN augmentation from step 2, SGD with Nesterov momentum.
fn with_gan() -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerKind::Sgd,
        momentum: 0.9,
        nesterov: true,
        lr: 0.05,
        ..config(MultimodalConfig {
            fusion: FusionConfig {
                kind: FusionKind::GatedAttention,
                dim: 8,
                attention_dim: 4,
            },
            augment: Augment::Gan,
            gan: GanConfig {
                noise_dim: 4,
                hidden: 8,
                warmup_steps: 2,
                synthetic_fraction: 0.5,
                ..Default::default()
            },
            ..tiny_config()
        })
    }
}

struct Run {
    events: Vec<TrainerEvent>,
    outcome: Outcome,
}

impl Run {
    fn losses(&self) -> Vec<(u64, f64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                TrainerEvent::TrainLoss { step, loss, .. } => Some((*step, *loss)),
                _ => None,
            })
            .collect()
    }

    fn epochs(&self) -> Vec<EpochReport> {
        self.events
            .iter()
            .filter_map(|e| match e {
                TrainerEvent::Epoch(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn gan_losses(&self) -> Vec<(f64, f64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                TrainerEvent::GanLoss {
                    generator,
                    discriminator,
                    ..
                } => Some((*generator, *discriminator)),
                _ => None,
            })
            .collect()
    }
}

/// Runs `trainer` on the thread of the test, pausing once it reports step `pause_after`.
fn drive(trainer: &mut Trainer, data: SyntheticConfig, root: &Path, pause_after: Option<u64>) -> Run {
    crate::torch::prepare(1);
    let mut source = SyntheticSource::new(data).unwrap();
    let control = Control::new();
    let mut events = Vec::new();
    let outcome = trainer
        .run(&mut source, &control, root, &mut |e| {
            if let TrainerEvent::TrainLoss { step, .. } = &e
                && Some(*step) == pause_after
            {
                control.pause();
            }
            events.push(e);
        })
        .unwrap();
    Run { events, outcome }
}

fn bits(losses: &[(u64, f64)]) -> Vec<(u64, u64)> {
    losses.iter().map(|(s, l)| (*s, l.to_bits())).collect()
}

fn model_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = tch::Tensor::read_safetensors(dir.join(checkpoint::MODEL_FILE))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn final_checkpoint(run: &Run) -> PathBuf {
    run.events
        .iter()
        .rev()
        .find_map(|e| match e {
            TrainerEvent::Checkpoint { dir, .. } => Some(dir.clone()),
            _ => None,
        })
        .expect("a checkpoint")
}

/// Train uninterrupted; train again, pausing after `pause_after` steps, and resume from the
/// pause's checkpoint in a fresh trainer: the losses, epoch metrics and final weights after the
/// pause must be bit for bit those of the uninterrupted run.
fn assert_resume_is_exact(config: TrainConfig, pause_after: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(3);
    let full = drive(
        &mut Trainer::new(config.clone()).unwrap(),
        data.clone(),
        &tmp.path().join("full"),
        None,
    );
    assert_eq!(full.losses().len(), 9);
    assert!(matches!(full.outcome, Outcome::Completed { epoch: 3, step: 9 }));

    let first = drive(
        &mut Trainer::new(config.clone()).unwrap(),
        data.clone(),
        &tmp.path().join("first"),
        Some(pause_after),
    );
    let Outcome::Paused { step, checkpoint } = &first.outcome else {
        panic!("expected a pause, got {:?}", first.outcome)
    };
    assert_eq!(*step, pause_after);
    assert_eq!(bits(&first.losses()), bits(&full.losses()[..pause_after as usize]));

    let mut resumed_trainer = Trainer::resume(config, checkpoint).unwrap();
    assert_eq!(resumed_trainer.step(), pause_after);
    let resumed = drive(&mut resumed_trainer, data, &tmp.path().join("second"), None);
    assert!(matches!(resumed.outcome, Outcome::Completed { epoch: 3, step: 9 }));
    assert_eq!(
        bits(&resumed.losses()),
        bits(&full.losses()[pause_after as usize..]),
        "losses after the resume differ"
    );
    let epochs_after = full.epochs().len() - resumed.epochs().len();
    assert_eq!(resumed.epochs(), full.epochs()[epochs_after..].to_vec());
    let gan_after = full.gan_losses().len().saturating_sub(pause_after as usize);
    assert_eq!(
        resumed.gan_losses(),
        full.gan_losses()[full.gan_losses().len() - gan_after..].to_vec()
    );
    assert_eq!(
        model_tensors(&final_checkpoint(&resumed)),
        model_tensors(&final_checkpoint(&full))
    );
}

#[test]
fn resuming_mid_epoch_continues_with_identical_losses() {
    assert_resume_is_exact(plain(), 4);
}

#[test]
fn resuming_before_validation_continues_with_identical_losses() {
    // Paused after the last step of epoch 1, before its validation ran.
    assert_resume_is_exact(plain(), 3);
}

#[test]
fn resuming_a_gan_run_continues_with_identical_losses() {
    assert_resume_is_exact(with_gan(), 5);
}

/// Mixed precision keeps the resume guarantee: the weights and optimiser stay fp32 and
/// autocast's casts are functions of them; fp16's loss scale is in the checkpoint.
#[test]
fn resuming_a_bf16_run_continues_with_identical_losses() {
    assert_resume_is_exact(
        TrainConfig {
            precision: Precision::Bf16,
            ..plain()
        },
        4,
    );
}

#[test]
fn fp16_on_the_cpu_is_refused_with_the_alternative() {
    let e = Trainer::new(TrainConfig {
        precision: Precision::Fp16,
        ..plain()
    })
    .err()
    .expect("fp16 needs a GPU");
    assert!(e.to_string().contains("fp16 needs a GPU; on the CPU use bf16"), "{e}");
}

#[test]
fn bf16_on_the_cpu_learns_as_fp32_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = SyntheticConfig {
        batch_size: 16,
        val_batches: 4,
        ..data(50)
    };
    let run = |precision, dir: &str| {
        let c = TrainConfig {
            epochs: 2,
            log_every: 5,
            lr: 1e-2,
            precision,
            ..config(tiny_config())
        };
        drive(&mut Trainer::new(c).unwrap(), data.clone(), &tmp.path().join(dir), None)
    };
    let (bf16, fp32) = (run(Precision::Bf16, "bf16"), run(Precision::Fp32, "fp32"));
    let last = &bf16.epochs()[1].validation;
    assert!(last.accuracy > 0.6, "bf16 validation accuracy {}", last.accuracy);
    assert!(bf16.epochs()[1].train_loss < bf16.epochs()[0].train_loss);
    // It really ran in bf16: the losses are close to fp32's, not equal to them.
    let (a, b) = (bf16.losses(), fp32.losses());
    assert_ne!(bits(&a), bits(&b));
    let (fa, fb) = (a.last().unwrap().1, b.last().unwrap().1);
    assert!((fa - fb).abs() < 0.25 * fb.max(0.05), "bf16 {fa} against fp32 {fb}");
    // The checkpoint holds fp32 weights whatever the precision.
    let ckpt = crate::trainer::checkpoint::load(&final_checkpoint(&bf16)).unwrap();
    assert!(ckpt.model.values().all(|t| t.kind() == tch::Kind::Float));
}

#[test]
fn the_seed_decides_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |seed, dir: &str| {
        let c = TrainConfig {
            seed,
            epochs: 1,
            ..plain()
        };
        drive(&mut Trainer::new(c).unwrap(), data(3), &tmp.path().join(dir), None).losses()
    };
    let (a, b, c) = (run(1, "a"), run(1, "b"), run(2, "c"));
    assert_eq!(bits(&a), bits(&b));
    assert_ne!(bits(&a), bits(&c));
}

#[test]
fn learns_a_learnable_signal() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        epochs: 2,
        log_every: 5,
        lr: 1e-2,
        ..config(tiny_config())
    };
    let mut t = Trainer::new(c).unwrap();
    let data = SyntheticConfig {
        batch_size: 16,
        val_batches: 4,
        ..data(50)
    };
    let run = drive(&mut t, data, tmp.path(), None);
    let epochs = run.epochs();
    assert_eq!(epochs.len(), 2);
    let last = &epochs[1].validation;
    assert_eq!(last.samples, 64);
    assert!(
        last.accuracy > 0.6,
        "validation accuracy {} after 2 epochs",
        last.accuracy
    );
    assert!(last.macro_f1 > 0.5, "macro-F1 {}", last.macro_f1);
    assert!(epochs[1].train_loss < epochs[0].train_loss);
    assert_eq!(last.confusion.iter().flatten().sum::<u64>(), 64);
    assert_eq!(last.per_class_f1.len(), 7);
    let losses = run.losses();
    assert_eq!(losses.len(), 20, "one report per 5 of 100 steps");
}

#[test]
fn gan_augmentation_adds_rare_classes_and_reports_both_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        epochs: 1,
        class_counts: Some(vec![10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ..with_gan()
    };
    let mut t = Trainer::new(c).unwrap();
    let labels = tch::Tensor::from_slice(&[0i64, 0, 0, 0, 1, 2, 0, 0]);
    let draws = crate::torch::Draws::new(1);
    let ctx = crate::models::layers::Ctx::train(&draws);
    assert!(
        t.synthetic(&labels, &ctx).unwrap().is_none(),
        "nothing before the warm-up"
    );
    let run = drive(&mut t, data(3), tmp.path(), None);
    let (_, classes) = t
        .synthetic(&labels, &ctx)
        .unwrap()
        .expect("rare classes after the warm-up");
    let classes: Vec<i64> = Vec::try_from(&classes).unwrap();
    assert_eq!(classes.len(), 4, "half a batch of 8");
    assert!(classes.iter().all(|&c| c > 0), "never the frequent class: {classes:?}");

    let gan = run.gan_losses();
    assert_eq!(gan.len(), 3);
    assert!(
        gan.iter()
            .all(|(g, d)| g.is_finite() && d.is_finite() && *g > 0.0 && *d > 0.0)
    );
    let epoch = &run.epochs()[0];
    assert!(epoch.generator_loss.is_some() && epoch.discriminator_loss.is_some());
}

/// Batches whose labels fall outside the model's classes.
struct BadLabels(SyntheticSource);

impl crate::data::BatchSource for BadLabels {
    fn steps_per_epoch(&self) -> u64 {
        self.0.steps_per_epoch()
    }
    fn begin_epoch(&mut self, epoch: u64) -> Result<(), WorkerError> {
        self.0.begin_epoch(epoch)
    }
    fn next_train(&mut self) -> Result<Option<Batch>, WorkerError> {
        Ok(self.0.next_train()?.map(|mut b| {
            b.labels = b.labels.full_like(9);
            b
        }))
    }
    fn cursor(&self) -> DataCursor {
        self.0.cursor()
    }
    fn seek(&mut self, cursor: &DataCursor) -> Result<(), WorkerError> {
        self.0.seek(cursor)
    }
    fn validation(&mut self) -> Box<dyn Iterator<Item = Result<Batch, WorkerError>> + '_> {
        self.0.validation()
    }
}

fn collect(
    mut handle: TrainerHandle,
    on_event: impl Fn(&TrainerEvent, &Control),
) -> (Vec<TrainerEvent>, Result<Outcome, WorkerError>) {
    let control = handle.control();
    let mut events = Vec::new();
    while let Some(e) = handle.events.blocking_recv() {
        on_event(&e, &control);
        events.push(e);
    }
    (events, handle.join())
}

#[test]
fn a_spawned_run_reports_in_order_and_checkpoints_every_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let handle = spawn(TrainerJob {
        config: TrainConfig {
            epochs: 2,
            checkpoint_every: Some(2),
            ..plain()
        },
        source: Box::new(SyntheticSource::new(data(3)).unwrap()),
        checkpoint_root: tmp.path().to_path_buf(),
        resume_from: None,
        parallel: None,
    })
    .unwrap();
    let (events, outcome) = collect(handle, |_, _| {});
    assert_eq!(outcome.unwrap(), Outcome::Completed { epoch: 2, step: 6 });
    assert!(
        matches!(&events[0], TrainerEvent::Started { threads: 1, device, resumed_at_step: None, .. } if device == "Cpu")
    );
    assert!(matches!(events.last(), Some(TrainerEvent::Finished(_))));
    let checkpoints: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TrainerEvent::Checkpoint { step, dir, .. } => {
                assert!(dir.join(checkpoint::COUNTERS_FILE).exists());
                Some(*step)
            }
            _ => None,
        })
        .collect();
    // Steps 2 and 4 by checkpoint_every, 3 and 6 at the epochs' ends (6 only once).
    assert_eq!(checkpoints, [2, 3, 4, 6]);
    let epochs: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TrainerEvent::Epoch(r) => Some(r.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, [1, 2]);
}

#[test]
fn a_kill_stops_at_the_next_step_without_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let handle = spawn(TrainerJob {
        config: TrainConfig {
            epochs: 1000,
            ..plain()
        },
        source: Box::new(SyntheticSource::new(data(3)).unwrap()),
        checkpoint_root: tmp.path().to_path_buf(),
        resume_from: None,
        parallel: None,
    })
    .unwrap();
    let (events, outcome) = collect(handle, |e, control| {
        if matches!(e, TrainerEvent::TrainLoss { step: 2, .. }) {
            control.kill();
        }
    });
    let Outcome::Killed { step } = outcome.unwrap() else {
        panic!("expected a kill")
    };
    assert!(step < 3000, "stopped early, at step {step}");
    assert!(!events.iter().any(|e| matches!(e, TrainerEvent::Checkpoint { .. })));
    assert!(matches!(
        events.last(),
        Some(TrainerEvent::Finished(Outcome::Killed { .. }))
    ));
}

#[test]
fn a_spawned_run_resumes_from_a_pause() {
    let tmp = tempfile::tempdir().unwrap();
    let job = |resume_from| TrainerJob {
        config: plain(),
        source: Box::new(SyntheticSource::new(data(3)).unwrap()),
        checkpoint_root: tmp.path().to_path_buf(),
        resume_from,
        parallel: None,
    };
    let (_, paused) = collect(spawn(job(None)).unwrap(), |e, control| {
        if matches!(e, TrainerEvent::TrainLoss { step: 5, .. }) {
            control.pause();
        }
    });
    let Outcome::Paused { step, checkpoint } = paused.unwrap() else {
        panic!("expected a pause")
    };
    assert!(step >= 5);
    let (events, done) = collect(spawn(job(Some(checkpoint))).unwrap(), |_, _| {});
    assert_eq!(done.unwrap(), Outcome::Completed { epoch: 3, step: 9 });
    assert!(matches!(&events[0], TrainerEvent::Started { resumed_at_step: Some(s), .. } if *s == step));
}

#[test]
fn bad_labels_fail_the_run_with_a_clear_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let handle = spawn(TrainerJob {
        config: plain(),
        source: Box::new(BadLabels(SyntheticSource::new(data(3)).unwrap())),
        checkpoint_root: tmp.path().to_path_buf(),
        resume_from: None,
        parallel: None,
    })
    .unwrap();
    let (events, outcome) = collect(handle, |_, _| {});
    assert!(matches!(outcome, Err(WorkerError::Data(_))), "{outcome:?}");
    let Some(TrainerEvent::Failed { error }) = events.last() else {
        panic!("the last event must be Failed")
    };
    assert!(error.contains("label 9"), "{error}");
}

#[test]
fn resuming_with_another_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(1),
        ..plain()
    })
    .unwrap();
    let run = drive(&mut t, data(3), tmp.path(), None);
    let dir = final_checkpoint(&run);
    let other = TrainConfig {
        model: ModelConfig::Multimodal(MultimodalConfig {
            fusion: FusionConfig {
                kind: FusionKind::GatedAttention,
                ..Default::default()
            },
            ..tiny_config()
        }),
        ..plain()
    };
    let e = Trainer::resume(other, &dir).err().expect("must refuse");
    assert!(matches!(e, WorkerError::Checkpoint { .. }), "{e}");
    // The same model with a longer schedule is fine.
    Trainer::resume(TrainConfig { epochs: 5, ..plain() }, &dir).unwrap();
}

#[test]
fn cuda_requested_without_a_gpu_is_a_clear_error() {
    crate::torch::prepare(1);
    if tch::Cuda::is_available() {
        return; // a GPU host: nothing to refuse
    }
    let e = Trainer::new(TrainConfig {
        device: DeviceChoice::Cuda,
        ..plain()
    })
    .err()
    .expect("no GPU here");
    assert!(matches!(e, WorkerError::CudaUnavailable(_)), "{e}");
    // Auto falls back to the CPU.
    let t = Trainer::new(TrainConfig {
        device: DeviceChoice::Auto,
        ..plain()
    })
    .unwrap();
    assert_eq!(t.device(), tch::Device::Cpu);
}

#[test]
fn events_serialise_as_tagged_json() {
    let finished = serde_json::to_value(TrainerEvent::Finished(Outcome::Killed { step: 3 })).unwrap();
    assert_eq!(
        finished,
        serde_json::json!({"event": "finished", "outcome": "killed", "step": 3})
    );
    let loss = serde_json::to_value(TrainerEvent::TrainLoss {
        epoch: 1,
        step: 10,
        loss: 0.5,
        lr: 0.001,
    })
    .unwrap();
    assert_eq!(loss["event"], "train_loss");
    assert_eq!(loss["loss"], 0.5);
}

/// Needs a GPU: `cargo test -p chorus-worker -- --ignored cuda`. Trains and learns on CUDA,
/// checkpoints there and resumes from it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn trains_checkpoints_and_resumes_on_cuda() {
    crate::torch::prepare(1);
    assert!(tch::Cuda::is_available(), "no CUDA GPU here");
    let tmp = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        epochs: 2,
        log_every: 5,
        lr: 1e-2,
        device: DeviceChoice::Cuda,
        ..config(tiny_config())
    };
    let mut t = Trainer::new(c.clone()).unwrap();
    assert_eq!(t.device(), tch::Device::Cuda(0));
    let data = SyntheticConfig {
        batch_size: 16,
        val_batches: 4,
        ..data(50)
    };
    let run = drive(&mut t, data.clone(), tmp.path(), None);
    let last = &run.epochs()[1].validation;
    assert!(last.accuracy > 0.6, "validation accuracy {} on CUDA", last.accuracy);
    let mut resumed = Trainer::resume(TrainConfig { epochs: 3, ..c }, &final_checkpoint(&run)).unwrap();
    assert_eq!(resumed.step(), 100);
    let more = drive(&mut resumed, data, &tmp.path().join("more"), None);
    assert_eq!(more.epochs().len(), 1);
}

/// Needs a GPU: mixed precision on CUDA learns (bf16, and fp16 with loss scaling), and a
/// trainer given ordinal N trains on GPU N.
#[test]
#[ignore = "needs a CUDA GPU"]
fn mixed_precision_learns_on_cuda() {
    crate::torch::prepare(1);
    assert!(tch::Cuda::is_available(), "no CUDA GPU here");
    let tmp = tempfile::tempdir().unwrap();
    let last_gpu = (tch::Cuda::device_count() - 1) as usize;
    let data = SyntheticConfig {
        batch_size: 16,
        val_batches: 4,
        ..data(50)
    };
    for precision in [Precision::Bf16, Precision::Fp16] {
        let c = TrainConfig {
            epochs: 2,
            log_every: 5,
            lr: 1e-2,
            device: DeviceChoice::Cuda,
            cuda_devices: vec![last_gpu],
            precision,
            ..config(tiny_config())
        };
        let mut t = Trainer::new(c).unwrap();
        assert_eq!(t.device(), tch::Device::Cuda(last_gpu));
        let run = drive(&mut t, data.clone(), &tmp.path().join(format!("{precision:?}")), None);
        let last = &run.epochs()[1].validation;
        assert!(
            last.accuracy > 0.6,
            "{precision:?} validation accuracy {} on CUDA",
            last.accuracy
        );
    }
}

/// Needs a GPU: fp16's loss scale is kept in checkpoints, so a resumed fp16 run continues
/// exactly as an uninterrupted one.
#[test]
#[ignore = "needs a CUDA GPU"]
fn resuming_an_fp16_run_on_cuda_continues_with_identical_losses() {
    crate::torch::prepare(1);
    assert!(tch::Cuda::is_available(), "no CUDA GPU here");
    assert_resume_is_exact(
        TrainConfig {
            precision: Precision::Fp16,
            device: DeviceChoice::Cuda,
            ..with_gan()
        },
        5,
    );
}
