//! The backup job: workers that drain the copy bitmap in offset order,
//! cancellation, and the job's outcome.

pub mod cancel;

use crate::copy::{BlockCopy, CopyError};
use crate::exit::AppError;
use cancel::Cancel;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Run the background copy of `bc` on `jobs` workers until the copy bitmap
/// is drained, an error stops it, or it is cancelled. In-flight copies
/// always finish (drain) before this returns.
pub fn run_background(bc: &BlockCopy, jobs: usize, cancel: &Cancel) -> anyhow::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .thread_name(|i| format!("imgbackup-copy-{i}"))
        .build()?;
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<CopyError>> = Mutex::new(None);
    pool.scope(|s| {
        for _ in 0..jobs {
            s.spawn(|_| {
                let mut buf = Vec::new();
                while !stop.load(Ordering::Relaxed) && !cancel.is_cancelled() {
                    let Some(claim) = bc.claim_next() else { break };
                    let res = bc.copy_claimed(claim, &mut buf);
                    bc.release(claim, res.is_ok());
                    if let Err(e) = res {
                        stop.store(true, Ordering::Relaxed);
                        if let Ok(mut slot) = first_error.lock()
                            && slot.is_none()
                        {
                            *slot = Some(e);
                        }
                        break;
                    }
                }
            });
        }
    });
    if let Some(reason) = cancel.reason() {
        return Err(AppError::Cancelled(reason).into());
    }
    let err = match first_error.into_inner() {
        Ok(e) => e,
        Err(p) => p.into_inner(),
    };
    match err {
        Some(CopyError::Cancelled) => Err(anyhow::anyhow!("the copy stopped unexpectedly")),
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
