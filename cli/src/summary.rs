//! The summary printed when an experiment ends under `submit --wait` or `experiment watch`:
//! its best trial, how its trials ended, the restarts they took and the compute they used.
//! Computed client-side from `ListTrials` and the stored spec, so it is pure and tested here.

use crate::render::{fmt_duration, fmt_value, params_compact, parse_object};
use chorus_core::spec::{ResourceSpec, WorkerCount};
use chorus_proto::pb;
use serde_json::{Value, json};

/// The message prefix the coordinator gives a trial its searcher stopped (it ends `completed`).
const STOPPED_EARLY: &str = "stopped early";

/// What one trial asks for: cpus and gpus per rank, and ranks (a lower bound when elastic).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrialResources {
    pub cpus: u32,
    pub gpus: u32,
    pub ranks: u32,
    pub elastic: bool,
}

impl From<&ResourceSpec> for TrialResources {
    fn from(r: &ResourceSpec) -> Self {
        let (ranks, elastic) = match r.workers {
            WorkerCount::Fixed(n) => (n, false),
            WorkerCount::Elastic { min, .. } => (min, true),
        };
        TrialResources {
            cpus: r.cpus,
            gpus: r.gpus,
            ranks: ranks.max(1),
            elastic,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub experiment: u64,
    pub metric: String,
    pub maximize: bool,
    pub best: Option<(u64, f64, String)>,
    /// Completed trials the searcher did not stop early.
    pub completed: u64,
    pub stopped_early: u64,
    pub failed: u64,
    pub killed: u64,
    /// Trials that had not ended (an experiment killed or failed while they were pending).
    pub unfinished: u64,
    pub restarts: u64,
    /// Run time summed over trials and their attempts.
    pub run_seconds: f64,
    /// Run time × ranks × cpus (gpus); `None` when the spec could not be read.
    pub cpu_seconds: Option<f64>,
    pub gpu_seconds: Option<f64>,
    pub resources: Option<TrialResources>,
    /// From submission to the end.
    pub wall_seconds: Option<f64>,
}

pub fn summarize(exp: &pb::Experiment, trials: &[pb::Trial], resources: Option<TrialResources>) -> Summary {
    use pb::TrialState as S;
    let count = |f: &dyn Fn(&pb::Trial) -> bool| trials.iter().filter(|t| f(t)).count() as u64;
    let is = |t: &pb::Trial, s: S| t.state == s as i32;
    let stopped_early = count(&|t| is(t, S::Completed) && t.message.starts_with(STOPPED_EARLY));
    let run_seconds = trials.iter().map(|t| t.run_seconds.max(0.0)).fold(0.0, |a, b| a + b);
    let per_rank = |n: u32| resources.map(|r| run_seconds * f64::from(r.ranks) * f64::from(n));
    let best = exp.best_trial_id.zip(exp.best_value).map(|(id, v)| {
        let params = trials
            .iter()
            .find(|t| t.id == id)
            .map(|t| params_compact(&t.params_json))
            .unwrap_or_default();
        (id, v, params)
    });
    Summary {
        experiment: exp.id,
        metric: exp.metric.clone(),
        maximize: exp.maximize,
        best,
        completed: count(&|t| is(t, S::Completed)) - stopped_early,
        stopped_early,
        failed: count(&|t| is(t, S::Failed)),
        killed: count(&|t| is(t, S::Killed)),
        unfinished: count(&|t| !is(t, S::Completed) && !is(t, S::Failed) && !is(t, S::Killed)),
        restarts: trials.iter().map(|t| u64::from(t.restarts)).sum(),
        run_seconds,
        cpu_seconds: resources.and_then(|r| per_rank(r.cpus)),
        gpu_seconds: resources.and_then(|r| per_rank(r.gpus)),
        resources,
        wall_seconds: (exp.created_unix_ms > 0 && exp.ended_unix_ms >= exp.created_unix_ms)
            .then(|| (exp.ended_unix_ms - exp.created_unix_ms) as f64 / 1000.0),
    }
}

impl Summary {
    /// The block printed under the final line, one `label  value` line each.
    pub fn text(&self) -> String {
        let goal = if self.maximize { "maximize" } else { "minimize" };
        let mut lines: Vec<(&str, String)> = Vec::new();
        lines.push((
            "best trial",
            match &self.best {
                Some((id, v, params)) if params.is_empty() => {
                    format!("{id}  {}={} ({goal})", self.metric, fmt_value(*v))
                }
                Some((id, v, params)) => format!("{id}  {}={} ({goal})  {params}", self.metric, fmt_value(*v)),
                None => "none (no trial reported the metric)".into(),
            },
        ));
        let mut ended = format!(
            "{} completed, {} stopped early by the searcher, {} failed, {} killed",
            self.completed, self.stopped_early, self.failed, self.killed
        );
        if self.unfinished > 0 {
            ended.push_str(&format!(", {} never finished", self.unfinished));
        }
        lines.push(("trials", ended));
        lines.push(("restarts", self.restarts.to_string()));
        let mut time = format!("{} of trials", fmt_duration(self.run_seconds));
        if let Some(w) = self.wall_seconds {
            time.push_str(&format!(", {} wall", fmt_duration(w)));
        }
        lines.push(("run time", time));
        lines.push((
            "compute",
            match (self.resources, self.cpu_seconds, self.gpu_seconds) {
                (Some(r), Some(cpu), Some(gpu)) => {
                    let at_least = if r.elastic { "at least " } else { "" };
                    let mut s = format!("{at_least}{} cpu", fmt_duration(cpu));
                    if r.gpus > 0 {
                        s.push_str(&format!(", {at_least}{} gpu", fmt_duration(gpu)));
                    }
                    s.push_str(&format!(
                        " ({} cpus, {} gpus × {}{} rank(s) per trial)",
                        r.cpus,
                        r.gpus,
                        if r.elastic { "≥" } else { "" },
                        r.ranks
                    ));
                    s
                }
                _ => "unknown (the experiment's resources could not be read)".into(),
            },
        ));
        let mut out = format!("summary of experiment {}:\n", self.experiment);
        for (label, value) in lines {
            out.push_str(&format!("  {label:<11} {value}\n"));
        }
        out
    }

    pub fn json(&self, trials: &[pb::Trial]) -> Value {
        let best = self.best.as_ref().map(|(id, v, _)| {
            let params = trials
                .iter()
                .find(|t| t.id == *id)
                .map(|t| Value::Object(parse_object(&t.params_json)))
                .unwrap_or(Value::Null);
            json!({"trial": id, "value": v, "params": params})
        });
        json!({
            "metric": self.metric,
            "goal": if self.maximize { "maximize" } else { "minimize" },
            "best": best,
            "trials": {
                "completed": self.completed,
                "stopped_early": self.stopped_early,
                "failed": self.failed,
                "killed": self.killed,
                "unfinished": self.unfinished,
            },
            "restarts": self.restarts,
            "run_seconds": self.run_seconds,
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "gpu_seconds": self.gpu_seconds,
            "resources": self.resources.map(|r| json!({
                "cpus": r.cpus, "gpus": r.gpus, "ranks": r.ranks, "elastic": r.elastic,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(id: u64, state: pb::TrialState, secs: f64, restarts: u32, message: &str) -> pb::Trial {
        pb::Trial {
            id,
            state: state as i32,
            run_seconds: secs,
            restarts,
            message: message.into(),
            params_json: format!(r#"{{"lr": 0.{id}}}"#),
            ..Default::default()
        }
    }

    fn experiment() -> pb::Experiment {
        pb::Experiment {
            id: 3,
            metric: "loss".into(),
            best_trial_id: Some(2),
            best_value: Some(0.25),
            created_unix_ms: 1_000,
            ended_unix_ms: 91_000,
            ..Default::default()
        }
    }

    fn trials() -> Vec<pb::Trial> {
        use pb::TrialState as S;
        vec![
            trial(1, S::Completed, 30.0, 0, ""),
            trial(2, S::Completed, 60.0, 1, ""),
            trial(3, S::Completed, 10.0, 0, "stopped early: below the median at step 2"),
            trial(4, S::Failed, 5.0, 2, "exit status 1"),
            trial(5, S::Killed, 0.0, 0, ""),
            trial(6, S::Pending, 0.0, 0, ""),
        ]
    }

    #[test]
    fn the_summary_counts_end_states_restarts_and_compute() {
        let res = TrialResources {
            cpus: 2,
            gpus: 1,
            ranks: 2,
            elastic: false,
        };
        let s = summarize(&experiment(), &trials(), Some(res));
        assert_eq!(
            (
                s.completed,
                s.stopped_early,
                s.failed,
                s.killed,
                s.unfinished,
                s.restarts
            ),
            (2, 1, 1, 1, 1, 3)
        );
        assert_eq!(s.run_seconds, 105.0);
        assert_eq!((s.cpu_seconds, s.gpu_seconds), (Some(420.0), Some(210.0)));
        assert_eq!(s.wall_seconds, Some(90.0));
        assert_eq!(
            s.text(),
            "summary of experiment 3:\n  \
             best trial  2  loss=0.25 (minimize)  lr=0.2\n  \
             trials      2 completed, 1 stopped early by the searcher, 1 failed, 1 killed, 1 never finished\n  \
             restarts    3\n  \
             run time    1m45s of trials, 1m30s wall\n  \
             compute     7m00s cpu, 3m30s gpu (2 cpus, 1 gpus × 2 rank(s) per trial)\n"
        );
        let j = s.json(&trials());
        assert_eq!(j["best"], json!({"trial": 2, "value": 0.25, "params": {"lr": 0.2}}));
        assert_eq!(j["trials"]["stopped_early"], 1);
        assert_eq!(j["cpu_seconds"], 420.0);
    }

    #[test]
    fn without_resources_or_a_best_it_says_so() {
        let mut e = experiment();
        e.best_trial_id = None;
        e.best_value = None;
        e.ended_unix_ms = 0;
        let s = summarize(&e, &[], None);
        let text = s.text();
        assert!(
            text.contains("best trial  none (no trial reported the metric)"),
            "{text}"
        );
        assert!(text.contains("run time    0.0s of trials\n"), "{text}");
        assert!(text.contains("compute     unknown"), "{text}");
        let elastic = TrialResources::from(&ResourceSpec {
            workers: WorkerCount::Elastic { min: 2, max: 4 },
            cpus: 1,
            gpus: 0,
            labels: Default::default(),
        });
        let s = summarize(&experiment(), &trials()[..1], Some(elastic));
        assert!(
            s.text()
                .contains("compute     at least 1m00s cpu (1 cpus, 0 gpus × ≥2 rank(s) per trial)"),
            "{}",
            s.text()
        );
    }
}
