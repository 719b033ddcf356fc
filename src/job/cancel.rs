//! Cancellation: SIGINT, SIGTERM and `--timeout` set one shared reason; every
//! worker and every wait checks it between requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why a job was cancelled; the value is the exit code it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Interrupt,
    Terminate,
    Timeout,
}

impl Reason {
    pub fn exit_code(self) -> i32 {
        match self {
            Reason::Interrupt => 130,
            Reason::Terminate => 143,
            Reason::Timeout => 9,
        }
    }

    fn from_code(c: usize) -> Option<Reason> {
        match c {
            130 => Some(Reason::Interrupt),
            143 => Some(Reason::Terminate),
            9 => Some(Reason::Timeout),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Reason::Interrupt => "interrupted by SIGINT",
            Reason::Terminate => "terminated by SIGTERM",
            Reason::Timeout => "timed out (--timeout)",
        }
    }
}

/// A cancellation token shared by the job, its workers and signal handlers.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    code: Arc<AtomicUsize>,
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Route SIGINT and SIGTERM to this token. A second signal of the same
    /// kind ends the process at once (exit 130/143) without cleanup.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        for (sig, code) in [(SIGINT, 130usize), (SIGTERM, 143usize)] {
            let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            flag::register_conditional_shutdown(sig, code as i32, armed.clone())?;
            flag::register(sig, armed)?;
            flag::register_usize(sig, self.code.clone(), code)?;
        }
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

    pub fn reason(&self) -> Option<Reason> {
        Reason::from_code(self.code.load(Ordering::SeqCst))
    }

    pub fn is_cancelled(&self) -> bool {
        self.code.load(Ordering::Relaxed) != 0
    }

    /// Cancel with [`Reason::Timeout`] after `after`, from a watcher thread.
    pub fn arm_timeout(&self, after: Duration) {
        let me = self.clone();
        let deadline = Instant::now() + after;
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
