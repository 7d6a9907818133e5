//! Latency histograms and event counters shared by every simulated worker.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Highest latency kept exactly: one hour, in microseconds. Anything slower is clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// Latencies of one kind of call, in microseconds with three significant digits.
///
/// A std mutex: a record is a few nanoseconds of work and never awaits, and even 10,000
/// heartbeats a second leave it uncontended next to the RPCs they time.
pub struct Latency(Mutex<Histogram<u64>>);

impl Latency {
    pub fn new() -> Self {
        Latency(Mutex::new(empty()))
    }

    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(MAX_MICROS).clamp(1, MAX_MICROS);
        self.0.lock().expect("histogram lock").saturating_record(us);
    }

    /// The latencies recorded since the last take, which starts a new window.
    pub fn take(&self) -> Summary {
        let h = std::mem::replace(&mut *self.0.lock().expect("histogram lock"), empty());
        Summary::of(&h)
    }
}

fn empty() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// Percentiles of one window, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }

    /// `p50/p99/max` for the human summary.
    pub fn brief(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything the fleet measures. Latency windows are cut by [`Latency::take`]; counters only
/// grow, so a window's count is the difference of two [`Stats::counts`].
pub struct Stats {
    pub register: Latency,
    pub heartbeat: Latency,
    pub report: Latency,
    pub registrations: Counter,
    pub heartbeats: Counter,
    /// Heartbeats that failed other than by a lapsed lease (timeouts, transport errors).
    pub heartbeat_errors: Counter,
    /// Heartbeats answered NOT_FOUND: the coordinator had let the lease lapse.
    pub lapses: Counter,
    /// Successful ReportTrial calls, and the metric events they carried.
    pub reports: Counter,
    pub metric_events: Counter,
    pub report_errors: Counter,
    /// Reports refused because the attempt was no longer current (stopped, killed, requeued).
    pub stale_reports: Counter,
    pub assignments: Counter,
    pub kills: Counter,
    pub trials_finished: Counter,
    /// Assignment streams that ended or failed while the run went on.
    pub stream_breaks: Counter,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Counts {
    pub registrations: u64,
    pub heartbeats: u64,
    pub heartbeat_errors: u64,
    pub lapses: u64,
    pub reports: u64,
    pub metric_events: u64,
    pub report_errors: u64,
    pub stale_reports: u64,
    pub assignments: u64,
    pub kills: u64,
    pub trials_finished: u64,
    pub stream_breaks: u64,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            register: Latency::new(),
            heartbeat: Latency::new(),
            report: Latency::new(),
            registrations: Counter::default(),
            heartbeats: Counter::default(),
            heartbeat_errors: Counter::default(),
            lapses: Counter::default(),
            reports: Counter::default(),
            metric_events: Counter::default(),
            report_errors: Counter::default(),
            stale_reports: Counter::default(),
            assignments: Counter::default(),
            kills: Counter::default(),
            trials_finished: Counter::default(),
            stream_breaks: Counter::default(),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            registrations: self.registrations.get(),
            heartbeats: self.heartbeats.get(),
            heartbeat_errors: self.heartbeat_errors.get(),
            lapses: self.lapses.get(),
            reports: self.reports.get(),
            metric_events: self.metric_events.get(),
            report_errors: self.report_errors.get(),
            stale_reports: self.stale_reports.get(),
            assignments: self.assignments.get(),
            kills: self.kills.get(),
            trials_finished: self.trials_finished.get(),
            stream_breaks: self.stream_breaks.get(),
        }
    }
}

impl Counts {
    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            registrations: self.registrations - earlier.registrations,
            heartbeats: self.heartbeats - earlier.heartbeats,
            heartbeat_errors: self.heartbeat_errors - earlier.heartbeat_errors,
            lapses: self.lapses - earlier.lapses,
            reports: self.reports - earlier.reports,
            metric_events: self.metric_events - earlier.metric_events,
            report_errors: self.report_errors - earlier.report_errors,
            stale_reports: self.stale_reports - earlier.stale_reports,
            assignments: self.assignments - earlier.assignments,
            kills: self.kills - earlier.kills,
            trials_finished: self.trials_finished - earlier.trials_finished,
            stream_breaks: self.stream_breaks - earlier.stream_breaks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_summarises_and_starts_a_new_window() {
        let l = Latency::new();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.take();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max_ms - 100.0).abs() < 0.1, "{s:?}");
        assert_eq!(l.take().count, 0);
    }
}
