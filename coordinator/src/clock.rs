//! The coordinator's one source of time. Leases, start timeouts and record timestamps read it,
//! never the system clock directly, so tests move time forward instead of sleeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Monotonic time for leases and timeouts, and wall-clock milliseconds for records.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None`: the system clocks. `Some`: a clock that moves only when told to.
    manual: Option<Arc<Mutex<Manual>>>,
}

#[derive(Debug)]
struct Manual {
    instant: Instant,
    unix_ms: i64,
}

impl Clock {
    /// The system clocks.
    pub fn system() -> Self {
        Clock::default()
    }

    /// A clock that starts now and stands still until [`Clock::advance`] moves it.
    pub fn manual() -> Self {
        Clock {
            manual: Some(Arc::new(Mutex::new(Manual {
                instant: Instant::now(),
                unix_ms: system_ms(),
            }))),
        }
    }

    pub fn now(&self) -> Instant {
        match &self.manual {
            Some(m) => m.lock().unwrap_or_else(|p| p.into_inner()).instant,
            None => Instant::now(),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(m) => m.lock().unwrap_or_else(|p| p.into_inner()).unix_ms,
            None => system_ms(),
        }
    }

    /// Moves a manual clock forward. The system clock cannot be moved: calling this on it is a
    /// bug in the caller.
    pub fn advance(&self, by: Duration) {
        let m = self.manual.as_ref().expect("only a manual clock can be advanced");
        let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
        m.instant += by;
        m.unix_ms += by.as_millis() as i64;
    }
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let c = Clock::manual();
        let (t, ms) = (c.now(), c.now_ms());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!((c.now(), c.now_ms()), (t, ms));
        let shared = c.clone();
        shared.advance(Duration::from_secs(3));
        assert_eq!(c.now() - t, Duration::from_secs(3));
        assert_eq!(c.now_ms() - ms, 3000);
        let s = Clock::system();
        assert!(s.now_ms() >= ms);
    }
}
