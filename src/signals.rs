//! SIGINT, SIGTERM and SIGHUP for the command line.
//!
//! Signals are received by a dedicated thread (not in a signal handler): the
//! first cancels the job's [`Cancel`] token, so the job stops cleanly and
//! the command exits with the signal's code; a second ends the process at
//! once, after one line naming what stopping now leaves behind
//! ([`crate::leftovers`]).

use crate::exit::Exit;
use crate::job::cancel::{Cancel, Reason};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, Ordering};

/// Route SIGINT, SIGTERM and SIGHUP to `cancel` (once per process; later
/// calls do nothing).
pub fn install(cancel: &Cancel) -> std::io::Result<()> {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let cancel = cancel.clone();
    std::thread::Builder::new()
        .name("imgbackup-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                let (reason, name) = match sig {
                    SIGINT => (Reason::Interrupt, "SIGINT"),
                    SIGTERM => (Reason::Terminate, "SIGTERM"),
                    _ => (Reason::Hangup, "SIGHUP"),
                };
                seen += 1;
                if seen == 1 {
                    cancel.cancel(reason);
                    continue;
                }
                crate::leftovers::report_and_exit(
                    &format!("imgbackup: a second signal ({name}): stopping at once; "),
                    Exit::from(reason).code(),
                );
            }
        })?;
    Ok(())
}
