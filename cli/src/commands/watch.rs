//! Following an experiment to its end over `WatchExperiment`, surviving coordinator restarts.
//!
//! The stream is a snapshot followed by changes, so reconnecting loses nothing that matters: the
//! first message after a reconnect is the current state.

use crate::client::Coordinator;
use crate::error::{CliError, code_name};
use crate::render::{self, best_summary, finished, fmt_value};
use chorus_core::convert::{ExperimentState, experiment_state_name, trial_state_name};
use chorus_proto::pb;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tonic::Code;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Plain progress lines go to logs (CI, `nohup`); one a second is enough to follow and keeps a
/// busy sweep from flooding them.
const PLAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Returns the experiment as it was when it reached a terminal state.
pub async fn watch(coord: &Coordinator, id: u64) -> Result<pb::Experiment, CliError> {
    let mut progress = Progress::new(id);
    let mut backoff = Backoff::default();
    let result = loop {
        match follow(coord, id, &mut progress, &mut backoff).await {
            Ok(Some(exp)) => break Ok(exp),
            Ok(None) => {
                let delay = backoff.next_delay();
                progress.note(&format!("watch stream ended early; reconnecting in {delay:.1?}"));
                tokio::time::sleep(delay).await;
            }
            Err(status) if retryable(status.code()) => {
                let delay = backoff.next_delay();
                let why = format!("{}: {}", code_name(status.code()), status.message());
                progress.note(&format!(
                    "lost the coordinator at {} ({why}); reconnecting in {delay:.1?}",
                    coord.url()
                ));
                tokio::time::sleep(delay).await;
            }
            Err(status) => break Err(CliError::Rpc(status)),
        }
    };
    progress.finish();
    result
}

/// One stream's life: `Some` once the experiment is terminal, `None` if the server closed the
/// stream before that.
async fn follow(
    coord: &Coordinator,
    id: u64,
    progress: &mut Progress,
    backoff: &mut Backoff,
) -> Result<Option<pb::Experiment>, tonic::Status> {
    let req = coord.streaming(pb::ExperimentRef { experiment_id: id });
    let mut stream = coord.api().watch_experiment(req).await?.into_inner();
    let mut tick = tokio::time::interval(PLAIN_INTERVAL);
    let mut received = 0u64;
    loop {
        tokio::select! {
            // `Streaming::message` is cancel-safe: its state lives in the stream, not the future.
            msg = stream.message() => {
                let Some(ev) = msg? else { return Ok(None) };
                received += 1;
                // Only a change after the snapshot proves the stream works; resetting on the
                // snapshot alone would let a server that keeps closing the stream be hammered.
                if received > 1 {
                    backoff.reset();
                }
                if let Some(t) = &ev.trial {
                    progress.trial(t, ev.experiment.as_ref().map_or("", |e| e.metric.as_str()));
                }
                if let Some(exp) = ev.experiment {
                    progress.update(&exp);
                    if is_terminal(exp.state) {
                        return Ok(Some(exp));
                    }
                }
            }
            _ = tick.tick() => progress.tick(),
        }
    }
}

/// Codes a restarting or overloaded coordinator produces; anything else (not found, denied)
/// will not get better by asking again.
pub(crate) fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
    )
}

fn is_terminal(state: i32) -> bool {
    pb::ExperimentState::try_from(state)
        .ok()
        .and_then(|s| ExperimentState::try_from(s).ok())
        .is_some_and(ExperimentState::is_terminal)
}

/// Exponential, without jitter: there is one watcher per terminal, not a fleet.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// `running N  done N  failed N  best <metric>=<value> (trial T)`, led by the state when it is
/// not the usual one.
pub fn progress_message(e: &pb::Experiment) -> String {
    let c = e.counts.unwrap_or_default();
    let mut s = String::new();
    if e.state != pb::ExperimentState::Active as i32 {
        s.push_str(experiment_state_name(e.state));
        s.push_str("  ");
    }
    s.push_str(&format!(
        "running {}  done {}  failed {}",
        c.running, c.completed, c.failed
    ));
    if c.killed > 0 {
        s.push_str(&format!("  killed {}", c.killed));
    }
    if c.paused > 0 {
        s.push_str(&format!("  paused {}", c.paused));
    }
    if e.best_value.is_some() {
        s.push_str(&format!("  best {}", best_summary(e)));
    }
    s
}

/// The line printed when the experiment has ended.
pub fn final_line(e: &pb::Experiment) -> String {
    let c = e.counts.unwrap_or_default();
    let mut s = format!(
        "experiment {} ({}) {}: {} trials ({} completed, {} failed, {} killed)",
        e.id,
        e.name,
        experiment_state_name(e.state),
        finished(&c),
        c.completed,
        c.failed,
        c.killed
    );
    if e.best_value.is_some() {
        s.push_str(&format!(", best {}", best_summary(e)));
    }
    if !e.message.is_empty() {
        s.push_str(&format!(": {}", e.message));
    }
    s
}

/// Where progress goes: a bar on a terminal, rate-limited lines otherwise.
enum View {
    Bar(ProgressBar),
    Plain {
        last_at: Option<Instant>,
        last: String,
        pending: Option<String>,
    },
}

struct Progress {
    id: u64,
    view: View,
    /// Trials already announced as ended, so a reconnect does not repeat them.
    announced: HashSet<u64>,
    ticking: bool,
}

impl Progress {
    fn new(id: u64) -> Self {
        let view = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template("[{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len}  {msg}")
                .expect("the template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            View::Bar(bar)
        } else {
            View::Plain {
                last_at: None,
                last: String::new(),
                pending: None,
            }
        };
        Progress {
            id,
            view,
            announced: HashSet::new(),
            ticking: false,
        }
    }

    fn update(&mut self, e: &pb::Experiment) {
        let c = e.counts.unwrap_or_default();
        let done = finished(&c);
        match &mut self.view {
            View::Bar(bar) => {
                if !self.ticking {
                    // Ticking from the start would draw a full bar of 0/0 until the snapshot came.
                    bar.enable_steady_tick(Duration::from_millis(500));
                    self.ticking = true;
                }
                // `update` can raise max_trials mid-sweep, and a budget of 0 means "unknown".
                bar.set_length(e.max_trials.max(done));
                bar.set_position(done);
                bar.set_message(progress_message(e));
            }
            View::Plain { pending, .. } => {
                *pending = Some(format!(
                    "experiment {}: {done}/{}  {}",
                    self.id,
                    e.max_trials,
                    progress_message(e)
                ));
                self.tick();
            }
        }
    }

    /// Announces a trial that has just ended (bar mode only: plain mode keeps to one line a second).
    fn trial(&mut self, t: &pb::Trial, metric: &str) {
        let ended = [
            pb::TrialState::Completed,
            pb::TrialState::Failed,
            pb::TrialState::Killed,
        ]
        .iter()
        .any(|s| *s as i32 == t.state);
        let View::Bar(bar) = &self.view else {
            return;
        };
        if !ended || !self.announced.insert(t.id) {
            return;
        }
        let mut line = format!("trial {} {}", t.id, trial_state_name(t.state));
        if let Some(v) = t.best_value {
            line.push_str(&format!("  {metric}={}", fmt_value(v)));
        }
        line.push_str(&format!(
            "  {}  ({})",
            render::params_compact(&t.params_json),
            render::fmt_duration(t.run_seconds)
        ));
        if !t.message.is_empty() {
            line.push_str(&format!(": {}", t.message));
        }
        bar.println(line);
    }

    /// Prints the latest plain line once the rate limit allows.
    fn tick(&mut self) {
        if let View::Plain { last_at, last, pending } = &mut self.view {
            if last_at.is_some_and(|t| t.elapsed() < PLAIN_INTERVAL) {
                return;
            }
            if let Some(line) = pending.take()
                && line != *last
            {
                eprintln!("{line}");
                *last = line;
                *last_at = Some(Instant::now());
            }
        }
    }

    fn note(&self, msg: &str) {
        match &self.view {
            View::Bar(bar) => bar.println(msg),
            View::Plain { .. } => eprintln!("{msg}"),
        }
    }

    /// The caller prints the final line; a bar would only repeat it.
    fn finish(&self) {
        if let View::Bar(bar) = &self.view {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(state: pb::ExperimentState, best: Option<(f64, u64)>) -> pb::Experiment {
        pb::Experiment {
            id: 3,
            name: "demo".into(),
            state: state as i32,
            metric: "val_loss".into(),
            max_trials: 10,
            counts: Some(pb::TrialCounts {
                pending: 1,
                running: 2,
                completed: 4,
                failed: 1,
                killed: 0,
                paused: 0,
            }),
            best_value: best.map(|b| b.0),
            best_trial_id: best.map(|b| b.1),
            ..Default::default()
        }
    }

    #[test]
    fn progress_message_shows_counts_and_best() {
        assert_eq!(
            progress_message(&exp(pb::ExperimentState::Active, Some((0.123456789, 7)))),
            "running 2  done 4  failed 1  best val_loss=0.123457 (trial 7)"
        );
        assert_eq!(
            progress_message(&exp(pb::ExperimentState::Paused, None)),
            "paused  running 2  done 4  failed 1"
        );
    }

    #[test]
    fn final_line_says_how_it_ended() {
        let mut e = exp(pb::ExperimentState::Failed, Some((0.5, 2)));
        e.message = "2 trials failed, more than max_failed_trials (1)".into();
        assert_eq!(
            final_line(&e),
            "experiment 3 (demo) failed: 5 trials (4 completed, 1 failed, 0 killed), best val_loss=0.5 (trial 2): \
             2 trials failed, more than max_failed_trials (1)"
        );
    }

    #[test]
    fn terminal_states() {
        use pb::ExperimentState as S;
        let t: Vec<bool> = [S::Unspecified, S::Active, S::Paused, S::Completed, S::Failed, S::Killed]
            .iter()
            .map(|s| is_terminal(*s as i32))
            .collect();
        assert_eq!(t, [false, false, false, true, true, true]);
        assert!(!is_terminal(99));
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::default();
        let ds: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(ds[0], BACKOFF_MIN);
        assert_eq!(ds[1], BACKOFF_MIN * 2);
        assert_eq!(*ds.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }

    #[test]
    fn restarts_are_retried_refusals_are_not() {
        assert!(retryable(Code::Unavailable) && retryable(Code::Internal));
        assert!(!retryable(Code::NotFound) && !retryable(Code::PermissionDenied) && !retryable(Code::Unauthenticated));
    }
}
