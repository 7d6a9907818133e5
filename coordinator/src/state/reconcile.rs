//! The reconcile pass, run on a timer: expire leases, requeue attempts that vanished or never
//! started, then create and place what can run.

use super::*;

impl State {
    /// One level-triggered pass: expire leases, requeue attempts that vanished or never
    /// started, then create and place what can run. A lost message costs a delay here, never
    /// a trial.
    pub fn reconcile(&mut self) {
        let now = self.clock.now();
        let now_ms = self.clock.now_ms();
        let ttl = self.timing.lease_ttl;
        let lapsed = self.registry.expire(now, ttl);
        for w in &lapsed {
            self.forget_room(w);
        }
        let mut lost: Vec<(TrialId, String)> = Vec::new();
        let mut unstarted: Vec<TrialId> = Vec::new();
        for tid in &self.live {
            let t = &self.trials[tid];
            let Some(l) = &t.live else { continue };
            let of = |i: usize| match l.ranks.len() {
                1 => String::new(),
                n => format!(" (rank {i} of {n})"),
            };
            let gone = l.ranks.iter().enumerate().find_map(|(i, r)| {
                if lapsed.contains(&r.worker) {
                    Some(format!("worker {}{} stopped renewing its lease", r.worker, of(i)))
                } else if r.missing_since.is_some_and(|m| now.duration_since(m) > ttl) {
                    Some(format!(
                        "attempt {}{} is no longer running on worker {}",
                        t.attempt,
                        of(i),
                        r.worker
                    ))
                } else {
                    None
                }
            });
            if let Some(reason) = gone {
                lost.push((*tid, reason));
            } else if !l.all_started() && now_ms - l.assigned_ms > self.timing.start_timeout.as_millis() as i64 {
                unstarted.push(*tid);
            }
        }
        for w in &lapsed {
            tracing::warn!(worker = %w, "worker lease lapsed");
        }
        for (tid, reason) in lost {
            self.lose_attempt(tid, &reason);
        }
        for tid in unstarted {
            // Never started, so it costs no restart.
            self.kill_live(tid, "assignment was not started in time");
            self.set_trial_state(tid, TrialState::Pending);
        }
        self.pump();
    }
}
