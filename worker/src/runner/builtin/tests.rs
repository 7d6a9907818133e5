//! The trainer's events as typed reports, against the `chorus:metric` lines the trainer used to
//! print for them and the runner parsed back: the same records, events and commits.

use super::*;
use crate::runner::records::{Job, stored_line};
use crate::runner::{Backlog, Events};
use crate::trainer::{EpochReport, Validation};
use chorus_core::metric::{Line, PREFIX, parse_line};
use chorus_proto::pb::trial_event::Kind;
use std::sync::Arc;
use tokio::sync::mpsc;

const ATTEMPT: u32 = 2;

/// What reaches the recorder and the agent, in order, without the backlog weights.
#[derive(Debug, PartialEq)]
enum Seen {
    Stored(String),
    Commit(i64, String),
    /// A logged line that is a metric line, as the protocol reads it.
    MetricLog(Line),
    Log(String),
    Malformed(String),
}

/// An `Output` of rank 0 of an attempt, and what it sent.
struct Capture {
    out: Output,
    jobs: mpsc::UnboundedReceiver<Job>,
    events: mpsc::UnboundedReceiver<pb::TrialEvent>,
    logged_metric_lines: Vec<String>,
}

impl Capture {
    fn new() -> Self {
        let a = pb::Assignment {
            trial_id: 7,
            attempt: ATTEMPT,
            ..Default::default()
        };
        let (tx, events) = mpsc::unbounded_channel();
        let (jobs_tx, jobs) = mpsc::unbounded_channel();
        Capture {
            out: Output::new(&a, Events::new(tx), jobs_tx, Arc::new(Backlog::new())),
            jobs,
            events,
            logged_metric_lines: Vec::new(),
        }
    }

    fn seen(&mut self) -> Vec<Seen> {
        let mut seen = Vec::new();
        while let Ok(job) = self.jobs.try_recv() {
            seen.push(match job {
                Job::Metric(report, _) => Seen::Stored(stored_line(&report, ATTEMPT)),
                Job::Checkpoint(step, position) => Seen::Commit(step, position),
                Job::Log(line) if line.starts_with(PREFIX) => {
                    self.logged_metric_lines.push(line.clone());
                    Seen::MetricLog(parse_line(&line))
                }
                Job::Log(line) => Seen::Log(line),
            });
        }
        while let Ok(e) = self.events.try_recv() {
            if let Some(Kind::Malformed(m)) = e.kind {
                seen.push(Seen::Malformed(m.error));
            }
        }
        seen
    }
}

/// The metric lines the trainer printed for an event before its reports were typed, verbatim.
fn printed_before(ev: &TrainerEvent, classes: &[String]) -> Vec<String> {
    let metric_line = |fields: serde_json::Map<String, Value>| format!("{} {}", PREFIX, Value::Object(fields));
    match ev {
        TrainerEvent::TrainLoss { epoch, step, loss, lr } => {
            let m = json!({"step": step, "epoch": epoch, "train_loss": loss, "lr": lr});
            vec![metric_line(m.as_object().cloned().unwrap_or_default())]
        }
        TrainerEvent::GanLoss {
            epoch,
            step,
            generator,
            discriminator,
        } => {
            let m =
                json!({"step": step, "epoch": epoch, "generator_loss": generator, "discriminator_loss": discriminator});
            vec![metric_line(m.as_object().cloned().unwrap_or_default())]
        }
        TrainerEvent::Epoch(r) => {
            let v = &r.validation;
            let mut m = serde_json::Map::new();
            m.insert("step".into(), json!(r.step));
            m.insert("epoch".into(), json!(r.epoch));
            m.insert("train_loss".into(), json!(r.train_loss));
            m.insert("val_loss".into(), json!(v.loss));
            m.insert("val_accuracy".into(), json!(v.accuracy));
            m.insert("macro_f1".into(), json!(v.macro_f1));
            for (i, f1) in v.per_class_f1.iter().enumerate() {
                let name = classes.get(i).cloned().unwrap_or_else(|| i.to_string());
                m.insert(format!("f1_{name}"), json!(f1));
            }
            if let Some(g) = r.generator_loss {
                m.insert("generator_loss".into(), json!(g));
            }
            if let Some(d) = r.discriminator_loss {
                m.insert("discriminator_loss".into(), json!(d));
            }
            let name = |i: usize| classes.get(i).cloned().unwrap_or_else(|| i.to_string());
            let mut cm = serde_json::Map::new();
            cm.insert("step".into(), json!(r.step));
            for (t, row) in v.confusion.iter().enumerate() {
                for (p, count) in row.iter().enumerate() {
                    cm.insert(format!("confusion.{}.{}", name(t), name(p)), json!(count));
                }
            }
            vec![metric_line(cm), metric_line(m)]
        }
        _ => Vec::new(),
    }
}

fn epoch(step: u64, loss: f64, validation: Validation, gan: Option<(f64, f64)>) -> TrainerEvent {
    TrainerEvent::Epoch(EpochReport {
        epoch: 3,
        step,
        train_loss: loss,
        generator_loss: gan.map(|g| g.0),
        discriminator_loss: gan.map(|g| g.1),
        validation,
    })
}

/// Values whose text form is easy to get wrong: from f32, not the nearest double of their
/// shortest decimal, at the ends of the range, integral, negative zero, counts beyond 2^53.
fn events() -> Vec<TrainerEvent> {
    let validation = Validation {
        samples: 9,
        loss: 0.1 + 0.2,
        accuracy: 7.0 / 9.0,
        macro_f1: f64::from(0.7f32),
        per_class_f1: vec![1.0, 5e-324, 0.5],
        confusion: vec![vec![3, 0, 0], vec![1, (1 << 53) + 1, 1], vec![0, 0, u64::MAX]],
    };
    vec![
        TrainerEvent::TrainLoss {
            epoch: 1,
            step: 2,
            loss: f64::from(1.9459f32),
            lr: 3e-3,
        },
        TrainerEvent::TrainLoss {
            epoch: 1,
            step: 4,
            loss: 1.7976931348623157e308,
            lr: 2.2250738585072014e-308,
        },
        TrainerEvent::GanLoss {
            epoch: 2,
            step: 6,
            generator: 123456789.0,
            discriminator: -0.0,
        },
        epoch(
            9,
            0.4054651081081644,
            validation.clone(),
            Some((1.0000000000000002, 0.9999999999999999)),
        ),
        // Classes beyond the manifest's are named by index.
        epoch(
            10,
            1.0 / 3.0,
            Validation {
                per_class_f1: vec![0.25; 4],
                confusion: vec![vec![1; 4]; 4],
                ..validation.clone()
            },
            None,
        ),
        // Not finite: what the parser called malformed, with the same reason.
        TrainerEvent::TrainLoss {
            epoch: 4,
            step: 12,
            loss: f64::NAN,
            lr: 1e-3,
        },
        TrainerEvent::GanLoss {
            epoch: 4,
            step: 12,
            generator: f64::INFINITY,
            discriminator: f64::NEG_INFINITY,
        },
        epoch(
            14,
            0.5,
            Validation {
                loss: f64::NAN,
                ..validation
            },
            None,
        ),
    ]
}

#[tokio::test]
async fn reports_are_recorded_as_the_lines_printed_before_were() {
    let classes: Vec<String> = ["anger", "joy", "neutral"].map(String::from).into();
    let dir = Path::new("/nonexistent");
    let (mut typed, mut printed) = (Capture::new(), Capture::new());
    let mut all = Vec::new();
    for ev in events() {
        handle_event(ev.clone(), &classes, dir, &mut typed.out).await;
        for line in printed_before(&ev, &classes) {
            printed.out.handle(line);
        }
        let (mut seen, before) = (typed.seen(), printed.seen());
        if let TrainerEvent::Epoch(_) = ev {
            // The validation summary, logged before the reports, is not a metric line.
            let summary = seen.remove(0);
            assert!(matches!(&summary, Seen::Log(l) if l.starts_with("epoch 3: validation on 9 samples")));
        }
        assert_eq!(seen, before, "{ev:?}");
        all.extend(seen);
    }
    let stored: Vec<&String> = all
        .iter()
        .filter_map(|s| match s {
            Seen::Stored(l) => Some(l),
            _ => None,
        })
        .collect();
    let commits = all
        .iter()
        .filter(|s| matches!(s, Seen::Commit(_, p) if p.is_empty()))
        .count();
    assert_eq!((stored.len(), commits, typed.out.malformed), (8, 8, 3));
    assert_eq!(
        stored[0],
        r#"{"attempt":2,"epoch":1.0,"lr":0.003,"step":2,"train_loss":1.9458999633789062}"#
    );

    // Integral values read as numbers with a fraction in the log, as in the stored history.
    assert_eq!(
        typed.logged_metric_lines[2],
        r#"chorus:metric {"discriminator_loss":-0.0,"epoch":2.0,"generator_loss":123456789.0,"step":6}"#
    );
    assert_eq!(
        printed.logged_metric_lines[2],
        r#"chorus:metric {"discriminator_loss":-0.0,"epoch":2,"generator_loss":123456789.0,"step":6}"#
    );
}

#[tokio::test]
async fn a_report_that_is_not_finite_is_malformed_in_the_parsers_words() {
    let mut c = Capture::new();
    let classes = Vec::new();
    for ev in events().into_iter().skip(5) {
        handle_event(ev, &classes, Path::new("/nonexistent"), &mut c.out).await;
    }
    let seen = c.seen();
    // Logged, never stored, no commit asked for at their steps; the last epoch's confusion
    // counts are fine, and stored on their own, as before.
    let stored: Vec<&Seen> = seen
        .iter()
        .filter(|s| matches!(s, Seen::Stored(_) | Seen::Commit(..)))
        .collect();
    assert!(
        matches!(stored[..], [Seen::Stored(l), Seen::Commit(14, _)] if l.contains("confusion.0.0")),
        "{stored:?}"
    );
    let errors: Vec<&str> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Malformed(e) => Some(e.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        [
            r#"metric "train_loss" must be a finite number, got null"#,
            r#"metric "discriminator_loss" must be a finite number, got null"#,
            r#"metric "val_loss" must be a finite number, got null"#,
        ]
    );
    assert_eq!(c.logged_metric_lines.len(), 4);
}

#[test]
fn protocol_breaches_of_typed_reports() {
    let r = |step: Option<i64>, values: &[(&str, f64)]| MetricReport {
        step,
        values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    assert_eq!(r(Some(0), &[("loss", 0.5)]).check().err(), None);
    for (report, why) in [
        (
            r(Some(-1), &[("loss", 0.5)]),
            "step must be a non-negative integer, got -1",
        ),
        (r(Some(1), &[]), "the object holds no metric besides step"),
        (r(None, &[("", 1.0)]), "metric names must not be empty"),
        (r(Some(1), &[("step", 2.0)]), "a metric must not be named step"),
        (
            r(None, &[("a", 1.0), ("b", f64::NAN), ("c", f64::INFINITY)]),
            r#"metric "b" must be a finite number, got null"#,
        ),
    ] {
        assert_eq!(report.check().err().as_deref(), Some(why), "{report:?}");
        // The line it is logged as is malformed too, for the same reason where the parser can
        // see it (a `step` metric reads as the step itself).
        if why != "a metric must not be named step" {
            let line = report.to_line();
            assert_eq!(parse_line(&line), Line::Malformed(why.into()), "{line}");
        }
    }
}

/// The seam between the worker's GPU ledger and the trainer: two attempts admitted at once on a
/// worker whose GPUs are "2" and "5" (say, `CUDA_VISIBLE_DEVICES=2,5`: CUDA ordinals 0 and 1 in
/// this process) are each handed the ordinal of the GPU the ledger allotted to it, and nothing
/// process-wide changes.
#[test]
fn each_attempt_trains_on_the_gpu_it_was_allotted() {
    use crate::attempts::{AttemptKey, Attempts};
    let before = std::env::var_os("CUDA_VISIBLE_DEVICES");
    let worker_gpus = vec!["2".to_string(), "5".to_string()];
    let ledger = Attempts::new(8, worker_gpus.clone());
    let assignment = |trial: u64| pb::Assignment {
        trial_id: trial,
        attempt: 1,
        builtin_json: json!({"data": "memory://d", "epochs": 1, "precision": "bf16"}).to_string(),
        resources: Some(pb::Resources { cpus: 4, gpus: 1 }),
        ..Default::default()
    };
    let mut seen = Vec::new();
    for trial in [1, 2] {
        let a = assignment(trial);
        let admitted = ledger
            .admit(AttemptKey::new(trial, 1, 0), a.resources.unwrap())
            .expect("room for both");
        let s = settings(&a, &admitted.gpu_ids, &worker_gpus).unwrap();
        assert_eq!(s.config.device, DeviceChoice::Cuda);
        assert_eq!(s.config.precision, crate::trainer::Precision::Bf16);
        let ordinal = worker_gpus.iter().position(|g| *g == admitted.gpu_ids[0]).unwrap();
        assert_eq!(
            s.config.cuda_devices,
            vec![ordinal],
            "trial {trial} got {:?}",
            admitted.gpu_ids
        );
        assert_eq!(s.config.cuda_device(), ordinal);
        // A GPU trial's spare CPUs featurise: 4 CPUs, one feeds the GPU.
        assert_eq!(s.data_threads, 3);
        seen.push(ordinal);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1], "the two attempts share no GPU");
    assert_eq!(std::env::var_os("CUDA_VISIBLE_DEVICES"), before);

    // An allotment naming a GPU the worker does not have is refused, not run on GPU 0.
    let e = settings(&assignment(3), &["7".to_string()], &worker_gpus).unwrap_err();
    assert!(e.contains("GPU 7") && e.contains("not one of the worker's"), "{e}");
    // Without GPUs the trial runs on the CPU with one data thread unless it asks for more.
    let cpu = settings(&assignment(4), &[], &worker_gpus).unwrap();
    assert_eq!(
        (cpu.config.device, cpu.config.cuda_devices.len(), cpu.data_threads),
        (DeviceChoice::Cpu, 0, 1)
    );
    let mut asked = assignment(5);
    asked.builtin_json = json!({"data": "memory://d", "data_threads": 2}).to_string();
    assert_eq!(settings(&asked, &[], &worker_gpus).unwrap().data_threads, 2);
    asked.builtin_json = json!({"data": "memory://d", "data_threads": 0}).to_string();
    assert!(
        settings(&asked, &[], &worker_gpus)
            .unwrap_err()
            .contains("data_threads must be 1 to 32")
    );
}
