//! `--speed`: a token bucket on a virtual clock.
//!
//! Each request reserves its slot: it may start at `next` (or now, if the
//! bucket has refilled), and moves `next` on by `bytes / rate`. Idle time
//! refills at most one second's worth of bytes, so a pause does not turn
//! into an unthrottled burst.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A shared rate limit in bytes per second.
#[derive(Debug)]
pub struct Throttle {
    // set at creation
    rate: u64,
    burst: Duration,
    // behind a lock
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    /// A limit of `rate` bytes per second.
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate: rate.max(1),
            burst: Duration::from_secs(1),
            next: Mutex::new(None),
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Give back `bytes` reserved but not used.
    pub fn refund(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        let mut next = match self.next.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = *next {
            *next = Some(n.checked_sub(cost).unwrap_or(n));
        }
    }

    /// Reserve `bytes`; returns the instant at which the caller may start.
    pub fn reserve(&self, bytes: u64) -> Instant {
        let now = Instant::now();
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        let mut next = match self.next.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let floor = now.checked_sub(self.burst).unwrap_or(now);
        let start = match *next {
            Some(n) if n > floor => n,
            Some(_) => floor,
            None => now,
        };
        *next = Some(start + cost);
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_the_rate() {
        let t = Throttle::new(1000);
        let first = t.reserve(500);
        let second = t.reserve(500);
        let third = t.reserve(1);
        let gap = third.duration_since(first);
        assert!(
            gap >= Duration::from_millis(999) && gap <= Duration::from_millis(1001),
            "{gap:?}"
        );
        assert!(second > first);
    }
}
