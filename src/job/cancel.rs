//! Cancellation: SIGINT, SIGTERM, SIGHUP and `--timeout` set one shared
//! reason; every worker, every wait and every phase (copy, manifest,
//! verification, overlay export, restore) checks it between requests.
//!
//! Signals are received by a dedicated thread (not in a signal handler), so
//! the second signal can say what stopping at once leaves behind
//! ([`crate::leftovers`]) before the process ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why a job was cancelled; the value is the exit code it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// SIGINT (exit 130).
    Interrupt,
    /// SIGTERM (exit 143).
    Terminate,
    /// SIGHUP (exit 129).
    Hangup,
    /// --timeout expired (exit 9).
    Timeout,
}

impl Reason {
    /// The exit code this cancellation leads to.
    pub fn exit_code(self) -> i32 {
        match self {
            Reason::Interrupt => 130,
            Reason::Terminate => 143,
            Reason::Hangup => 129,
            Reason::Timeout => 9,
        }
    }

    fn from_code(c: usize) -> Option<Reason> {
        match c {
            130 => Some(Reason::Interrupt),
            143 => Some(Reason::Terminate),
            129 => Some(Reason::Hangup),
            9 => Some(Reason::Timeout),
            _ => None,
        }
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
    code: Arc<AtomicUsize>,
    /// `--timeout`: checked by every poll, so a deadline that passed while
    /// the process was stopped is seen at once.
    deadline: Arc<std::sync::OnceLock<Instant>>,
}

impl Cancel {
    /// A token nothing has cancelled yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Route SIGINT, SIGTERM and SIGHUP to this token (once per process).
    /// A second signal ends the process at once (exit 130/143/129), after
    /// one line on stderr naming what it leaves behind and how to recover.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        use std::sync::atomic::AtomicBool;
        static INSTALLED: AtomicBool = AtomicBool::new(false);
        if INSTALLED.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("imgbackup-signals".into())
            .spawn(move || {
                let mut seen = 0;
                for sig in signals.forever() {
                    let reason = match sig {
                        SIGINT => Reason::Interrupt,
                        SIGTERM => Reason::Terminate,
                        _ => Reason::Hangup,
                    };
                    seen += 1;
                    if seen == 1 {
                        me.cancel(reason);
                        continue;
                    }
                    crate::errln!(
                        "imgbackup: a second signal ({}): stopping at once; {}",
                        match sig {
                            SIGINT => "SIGINT",
                            SIGTERM => "SIGTERM",
                            _ => "SIGHUP",
                        },
                        crate::leftovers::describe()
                    );
                    std::process::exit(reason.exit_code());
                }
            })?;
        Ok(())
    }

    /// Cancel with `reason` unless already cancelled.
    pub fn cancel(&self, reason: Reason) {
        let _ = self.code.compare_exchange(
            0,
            reason.exit_code() as usize,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Why it was cancelled, if it was (the --timeout deadline included).
    pub fn reason(&self) -> Option<Reason> {
        self.poll_deadline();
        Reason::from_code(self.code.load(Ordering::SeqCst))
    }

    /// True once cancelled (or past the --timeout deadline).
    pub fn is_cancelled(&self) -> bool {
        self.poll_deadline();
        self.code.load(Ordering::Relaxed) != 0
    }

    fn poll_deadline(&self) {
        if let Some(d) = self.deadline.get()
            && Instant::now() >= *d
        {
            self.cancel(Reason::Timeout);
        }
    }

    /// Cancel with [`Reason::Timeout`] after `after`, from a watcher thread.
    pub fn arm_timeout(&self, after: Duration) {
        let me = self.clone();
        let deadline = Instant::now() + after;
        let _ = self.deadline.set(deadline);
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
