//! The backup job: workers that drain the copy bitmap in offset order under
//! the error policies, cancellation, and the job's outcome.

pub mod backup;
pub mod cancel;
pub mod error;
pub mod nbd_source;
pub mod parent;
pub mod policy;
pub mod restore;
pub mod sync_bitmap;
pub mod sync_mode;
pub mod verify;

use crate::copy::{BlockCopy, Claim, CopyError};
use cancel::Cancel;
pub use error::JobError;
use policy::{Decision, Policies};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// One retry, for the summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetryEvent {
    /// Byte offset of the range.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which retry (from 1).
    pub attempt: u32,
    /// Wait before it, ms.
    pub delay_ms: u64,
    /// Why, with the causes.
    pub cause: String,
}

/// What the error policies did.
#[derive(Debug, Default)]
pub struct PolicyLog {
    /// Byte ranges skipped by `ignore` (sorted, merged at the end).
    pub skipped: Mutex<Vec<(u64, u64)>>,
    /// The first retries (at most 1000 are kept).
    pub retries: Mutex<Vec<RetryEvent>>,
}

impl PolicyLog {
    /// Count, log and record a retry of `c` after `err`.
    fn retry(
        &self,
        bc: &BlockCopy,
        c: Claim,
        attempt: u32,
        of: u32,
        delay: std::time::Duration,
        err: &CopyError,
    ) {
        bc.progress.retries.fetch_add(1, Ordering::Relaxed);
        let cause = crate::error::error_chain(err);
        tracing::warn!(
            "retry {attempt}/{of} of {} bytes at offset {} in {}: {cause}",
            c.end - c.start,
            c.start,
            humantime::format_duration(delay)
        );
        if let Ok(mut r) = self.retries.lock()
            && r.len() < 1000
        {
            r.push(RetryEvent {
                offset: c.start,
                length: c.end - c.start,
                attempt,
                delay_ms: delay.as_millis() as u64,
                cause,
            });
        }
    }

    /// Log and record that `c` was skipped after `err` (ignore policy).
    fn skip(&self, c: Claim, err: &CopyError) {
        tracing::warn!(
            "skipping {} bytes at offset {} (ignore policy): {}",
            c.end - c.start,
            c.start,
            crate::error::error_chain(err)
        );
        if let Ok(mut s) = self.skipped.lock() {
            s.push((c.start, c.end));
        }
    }

    /// Skipped ranges, sorted and merged.
    pub fn skipped_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = match self.skipped.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }
}

/// `bits` (of clusters of `cs` bytes) without the byte `ranges` an ignore
/// policy skipped.
pub fn without_skipped(
    mut bits: crate::bitmap::Bits,
    ranges: &[(u64, u64)],
    cs: u64,
) -> crate::bitmap::Bits {
    for &(s, e) in ranges {
        bits.clear_range(s / cs, e.div_ceil(cs));
    }
    bits
}

/// Run the background copy of `bc` on `jobs` workers until the copy bitmap
/// is drained, a failure stops it ([`BlockCopy::fail`], from a worker or
/// from the copy-before-write filter), or it is cancelled. In-flight copies
/// always finish (drain) before this returns.
pub fn run_background(
    bc: &BlockCopy,
    jobs: usize,
    cancel: &Cancel,
    policies: &Policies,
    plog: &PolicyLog,
) -> Result<(), JobError> {
    bc.map_holes();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs)
        .thread_name(|i| format!("imgbackup-copy-{i}"))
        .build()
        .map_err(JobError::context("cannot start the copy workers"))?;
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
                    let read = handle_claim(bc, claim, &mut buf, cancel, policies, plog);
                    if let Some(t) = bc.throttle() {
                        t.refund(chunk.saturating_sub(read));
                    }
                }
            });
        }
    });
    outcome(bc, cancel)
}

/// Copy, under the error policies, the clusters still to copy after the
/// workers finished that no policy skipped: those a failed
/// copy-before-write gave back after the workers had passed them. Call it
/// while the writers still go through the filter (or have stopped), so
/// what it copies is still the point-in-time data.
pub fn copy_left_behind(
    bc: &BlockCopy,
    cancel: &Cancel,
    policies: &Policies,
    plog: &PolicyLog,
) -> Result<(), JobError> {
    let cs = bc.cluster_size();
    let mut buf = Vec::new();
    loop {
        bc.wait_idle();
        let runs = without_skipped(bc.bitmap(), &plog.skipped_ranges(), cs).runs();
        if runs.is_empty() || bc.failed() || cancel.is_cancelled() {
            break;
        }
        tracing::debug!(
            "copying {} run(s) a failed copy-before-write gave back",
            runs.len()
        );
        for (s, e) in runs {
            let claims = match bc.claim_range(s * cs, (e - s) * cs, None) {
                Ok(c) => c,
                Err(err) => {
                    bc.fail(err);
                    break;
                }
            };
            for c in claims {
                handle_claim(bc, c, &mut buf, cancel, policies, plog);
            }
        }
    }
    outcome(bc, cancel)
}

/// Copy one claim under the error policies. Returns the bytes read.
fn handle_claim(
    bc: &BlockCopy,
    claim: Claim,
    buf: &mut Vec<u8>,
    cancel: &Cancel,
    policies: &Policies,
    plog: &PolicyLog,
) -> u64 {
    let cs = bc.cluster_size();
    let mut read = 0;
    let mut attempt = 0u32;
    let mut pending = vec![claim];
    while let Some(c) = pending.pop() {
        let res = bc.copy_claimed(c, buf);
        bc.release(c, res.is_ok());
        let err = match res {
            Ok(n) => {
                read += n;
                continue;
            }
            Err(e) => e,
        };
        if cancel.is_cancelled() || bc.failed() {
            if !matches!(err, CopyError::Cancelled) {
                bc.fail(err);
            }
            return read;
        }
        let decision = policies.decide(&err, attempt);
        tracing::debug!(
            "policy: {} bytes at offset {} failed (attempt {}): {}; decision: {:?}",
            c.end - c.start,
            c.start,
            attempt + 1,
            crate::error::error_chain(&err),
            decision
        );
        match decision {
            Decision::Fail => {
                bc.fail(err);
                return read;
            }
            Decision::RetryAfter(delay) => {
                attempt += 1;
                plog.retry(bc, c, attempt, policies.retries, delay, &err);
                if !cancel.sleep_until(Instant::now() + delay) {
                    return read;
                }
                match bc.claim_range(c.start, c.end - c.start, None) {
                    Ok(again) => pending.extend(again.into_iter().rev()),
                    Err(e) => {
                        bc.fail(e);
                        return read;
                    }
                }
            }
            Decision::Ignore => {
                if c.end - c.start > cs {
                    // Find the clusters that fail: copy them one by one.
                    match bc.claim_range(c.start, c.end - c.start, None) {
                        Ok(again) => {
                            for a in again.into_iter().rev() {
                                pending.extend(bc.split_claim(a).into_iter().rev());
                            }
                        }
                        Err(e) => {
                            bc.fail(e);
                            return read;
                        }
                    }
                } else {
                    plog.skip(c, &err);
                }
            }
        }
    }
    read
}

/// Write the copy-before-write cache to the target until `stop` is set and
/// the cache is empty, under the target's error policy. A range that cannot
/// be written stays cached (the source may have changed: it is the only
/// copy) until the policy gives up: then the job fails, or with `ignore`
/// the range is listed as skipped.
pub fn run_drain(
    bc: &BlockCopy,
    stop: &AtomicBool,
    cancel: &Cancel,
    policies: &Policies,
    plog: &PolicyLog,
) {
    if !bc.has_cache() {
        return;
    }
    let mut attempts: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    while !cancel.is_cancelled() && !bc.failed() {
        match bc.drain_one(std::time::Duration::from_millis(20)) {
            Ok(true) => {}
            Ok(false) => {
                if stop.load(Ordering::Relaxed) && !bc.cache_pending() {
                    return;
                }
            }
            Err((claim, err)) => {
                let attempt = attempts.entry(claim.start).or_insert(0);
                match policies.decide(&err, *attempt) {
                    Decision::Fail => {
                        bc.fail(err);
                        return;
                    }
                    Decision::Ignore => {
                        bc.cache_drop(claim);
                        plog.skip(claim, &err);
                    }
                    Decision::RetryAfter(delay) => {
                        *attempt += 1;
                        plog.retry(bc, claim, *attempt, policies.retries, delay, &err);
                        if !cancel.sleep_until(Instant::now() + delay) {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// The job's result once its workers (and guest) have stopped.
pub fn outcome(bc: &BlockCopy, cancel: &Cancel) -> Result<(), JobError> {
    if let Some(reason) = cancel.reason() {
        return Err(JobError::Cancelled(reason));
    }
    match bc.take_failure() {
        Some(CopyError::Cancelled) => {
            Err(JobError::Internal("the copy stopped unexpectedly".into()))
        }
        Some(e) => Err(e.into()),
        None if bc.failed() => Err(JobError::Internal("the job failed without a cause".into())),
        None => Ok(()),
    }
}
