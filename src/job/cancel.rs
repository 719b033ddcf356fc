//! Cancellation: SIGINT, SIGTERM, SIGHUP and `--timeout` set one shared
//! reason; every worker, every wait and every phase (copy, manifest,
//! verification, overlay export, restore) checks it between requests.
//!
//! The command line routes signals here (`crate::signals`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why a job was cancelled (`crate::exit` maps each to its exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// SIGINT.
    Interrupt,
    /// SIGTERM.
    Terminate,
    /// SIGHUP.
    Hangup,
    /// --timeout expired.
    Timeout,
}

impl Reason {
    const ALL: [Reason; 4] = [
        Reason::Interrupt,
        Reason::Terminate,
        Reason::Hangup,
        Reason::Timeout,
    ];

    /// The value stored in a [`Cancel`] (0 means not cancelled).
    fn index(self) -> usize {
        self as usize + 1
    }

    fn from_index(i: usize) -> Option<Reason> {
        i.checked_sub(1).and_then(|i| Reason::ALL.get(i).copied())
    }

    /// What happened, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Interrupt => "interrupted by SIGINT",
            Reason::Terminate => "terminated by SIGTERM",
            Reason::Hangup => "stopped by SIGHUP",
            Reason::Timeout => "timed out (--timeout)",
        }
    }
}

/// A cancellation token shared by the job, its workers and signal handlers.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    reason: Arc<AtomicUsize>,
    /// `--timeout`: checked by every poll, so a deadline that passed while
    /// the process was stopped is seen at once.
    deadline: Arc<std::sync::OnceLock<Instant>>,
}

impl Cancel {
    /// A token nothing has cancelled yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Cancel with `reason` unless already cancelled.
    pub fn cancel(&self, reason: Reason) {
        let _ = self
            .reason
            .compare_exchange(0, reason.index(), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why it was cancelled, if it was (the --timeout deadline included).
    pub fn reason(&self) -> Option<Reason> {
        self.poll_deadline();
        Reason::from_index(self.reason.load(Ordering::SeqCst))
    }

    /// True once cancelled (or past the --timeout deadline).
    pub fn is_cancelled(&self) -> bool {
        self.poll_deadline();
        self.reason.load(Ordering::Relaxed) != 0
    }

    fn poll_deadline(&self) {
        if let Some(d) = self.deadline.get()
            && Instant::now() >= *d
        {
            self.cancel(Reason::Timeout);
        }
    }

    /// Cancel with [`Reason::Timeout`] after `after`, from a watcher thread.
    /// Only the first call arms a deadline.
    pub fn arm_timeout(&self, after: Duration) {
        let me = self.clone();
        let deadline = Instant::now() + after;
        if self.deadline.set(deadline).is_err() {
            return;
        }
        std::thread::spawn(move || {
            while Instant::now() < deadline {
                if me.is_cancelled() {
                    return;
                }
                std::thread::sleep((deadline - Instant::now()).min(Duration::from_millis(50)));
            }
            me.cancel(Reason::Timeout);
        });
    }

    /// Sleep until `until`, waking early if cancelled. Returns false when
    /// cancelled.
    pub fn sleep_until(&self, until: Instant) -> bool {
        loop {
            if self.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(20)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_is_kept() {
        let c = Cancel::new();
        assert_eq!(c.reason(), None);
        assert!(!c.is_cancelled());
        for r in Reason::ALL {
            assert_eq!(Reason::from_index(r.index()), Some(r));
        }
        c.cancel(Reason::Hangup);
        c.cancel(Reason::Interrupt);
        assert_eq!(c.reason(), Some(Reason::Hangup));
        assert!(c.is_cancelled());
    }
}
