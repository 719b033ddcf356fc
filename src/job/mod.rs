//! The backup job: workers that drain the copy bitmap in offset order,
//! cancellation, and the job's outcome.

pub mod cancel;

use crate::copy::{BlockCopy, CopyError};
use crate::exit::AppError;
use cancel::Cancel;

/// Run the background copy of `bc` on `jobs` workers until the copy bitmap
/// is drained, a failure stops it ([`BlockCopy::fail`], from a worker or
/// from the copy-before-write filter), or it is cancelled. In-flight copies
/// always finish (drain) before this returns.
pub fn run_background(bc: &BlockCopy, jobs: usize, cancel: &Cancel) -> anyhow::Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .thread_name(|i| format!("imgbackup-copy-{i}"))
        .build()?;
    pool.scope(|s| {
        for _ in 0..jobs {
            s.spawn(|_| {
                let mut buf = Vec::new();
                let chunk = bc.max_chunk();
                while !bc.failed() && !cancel.is_cancelled() {
                    // Wait for the rate limit before claiming, so no claim
                    // is held while waiting.
                    if let Some(t) = bc.throttle()
                        && !cancel.sleep_until(t.reserve(chunk))
                    {
                        break;
                    }
                    let Some(claim) = bc.claim_next() else {
                        if let Some(t) = bc.throttle() {
                            t.refund(chunk);
                        }
                        break;
                    };
                    let res = bc.copy_claimed(claim, &mut buf);
                    bc.release(claim, res.is_ok());
                    match res {
                        Ok(read) => {
                            if let Some(t) = bc.throttle() {
                                t.refund(chunk.saturating_sub(read));
                            }
                        }
                        Err(e) => {
                            bc.fail(e);
                            break;
                        }
                    }
                }
            });
        }
    });
    outcome(bc, cancel)
}

/// The job's result once its workers (and guest) have stopped.
pub fn outcome(bc: &BlockCopy, cancel: &Cancel) -> anyhow::Result<()> {
    if let Some(reason) = cancel.reason() {
        return Err(AppError::Cancelled(reason).into());
    }
    match bc.take_failure() {
        Some(CopyError::Cancelled) => Err(anyhow::anyhow!("the copy stopped unexpectedly")),
        Some(e) => Err(e.into()),
        None if bc.failed() => Err(anyhow::anyhow!("the job failed")),
        None => Ok(()),
    }
}
