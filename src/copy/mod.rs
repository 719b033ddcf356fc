//! The block-copy state: what QEMU's block/block-copy.c owns.
//!
//! * the **copy bitmap** at the job's cluster size: a set bit means "still
//!   to copy". A cluster's bit is cleared when its copy *starts* (claim) and
//!   set again if that copy fails;
//! * the **in-flight ranges**: a request that overlaps a copy in flight
//!   waits for it and then re-checks the bitmap, so no cluster is copied
//!   twice and none is lost;
//! * chunking (`max_chunk`), zero detection, the rate limit, and the
//!   progress counters (plain atomics, rendered at the edge).
//!
//! The background job ([`crate::job`]) claims runs in offset order through
//! [`BlockCopy::claim_next`]; a copy-before-write filter calls
//! [`BlockCopy::copy_before_write`] for the clusters a guest write is about
//! to touch. Both copy through [`BlockCopy::copy_claimed`], reading the
//! source node they were given (the active disk), never around it.

pub mod throttle;

use crate::bitmap::Bits;
use crate::error::BlockError;
use crate::job::cancel::Cancel;
use crate::node::{BlockNode, Status, is_zero};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use throttle::Throttle;

/// Why one copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read the source image")]
    Source(#[source] BlockError),
    #[error("cannot write the target")]
    Target(#[source] BlockError),
    #[error("the copy was cancelled")]
    Cancelled,
    #[error("copy-before-write did not finish within {waited:?} (--cbw-timeout)")]
    Timeout { waited: std::time::Duration },
    #[error("chunk {chunk} at offset {offset} does not match the manifest ({detail})")]
    Mismatch {
        offset: u64,
        chunk: u64,
        detail: String,
    },
    #[error("cannot write the manifest")]
    Manifest(#[source] std::io::Error),
}

impl CopyError {
    /// The errno behind the failure, if it was an I/O error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CopyError::Source(e) | CopyError::Target(e) => e.errno(),
            CopyError::Cancelled => None,
            CopyError::Timeout { .. } => Some(libc::ETIMEDOUT),
            CopyError::Mismatch { .. } => None,
            CopyError::Manifest(e) => e.raw_os_error(),
        }
    }
}

/// Where a chunk's content came from, for observers (manifest hashing).
pub enum ChunkData<'a> {
    /// These bytes were read (and written unless all zero).
    Bytes(&'a [u8]),
    /// This many bytes read as zeros without I/O.
    Zeroes(u64),
}

/// Sees every cluster-aligned range the copy completes, in any order and
/// from any thread: the bytes it read, or that it read as zeros without
/// I/O. An error fails that copy (for example a digest mismatch while
/// restoring).
pub trait ChunkObserver: Send + Sync {
    fn copied(&self, offset: u64, data: ChunkData<'_>) -> Result<(), CopyError>;
}

/// Progress counters. Bytes unless noted.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the job has to account for.
    pub total: AtomicU64,
    /// Bytes done: copied, or skipped as zero/unallocated.
    pub done: AtomicU64,
    /// Bytes written to the target as data.
    pub copied: AtomicU64,
    /// Bytes that read as zero (unallocated, zero clusters, or all-zero
    /// data) and were not written as data.
    pub zero: AtomicU64,
    /// Copy-before-write operations (count) and their bytes.
    pub cbw_copies: AtomicU64,
    pub cbw_bytes: AtomicU64,
    /// Retries of failed copies (error policies).
    pub retries: AtomicU64,
}

/// Settings of a block-copy state.
#[derive(Clone)]
pub struct Config {
    pub cluster_size: u64,
    pub max_chunk: u64,
    /// The target does not read as zeros where it was not written (it has a
    /// backing file): zeros must be written explicitly.
    pub write_zeroes: bool,
    pub speed: Option<u64>,
    /// Write data compressed (a qcow2 target).
    pub compress: bool,
}

/// What one claim did, credited to [`Progress`] only if it all succeeded.
#[derive(Default)]
struct Tally {
    copied: u64,
    zero: u64,
    read: u64,
}

/// The context of one claimed copy.
struct Ctx<'a> {
    tally: &'a mut Tally,
    /// (deadline, start) of a copy-before-write with `--cbw-timeout`.
    deadline: Option<(std::time::Instant, std::time::Instant)>,
}

impl Ctx<'_> {
    fn check(&self, cancel: &Cancel) -> Result<(), CopyError> {
        if cancel.is_cancelled() {
            return Err(CopyError::Cancelled);
        }
        if let Some((d, started)) = self.deadline
            && std::time::Instant::now() >= d
        {
            return Err(CopyError::Timeout {
                waited: started.elapsed(),
            });
        }
        Ok(())
    }
}

struct Inner {
    bitmap: Bits,
    inflight: Vec<(u64, u64)>,
    cursor: u64,
}

/// The shared block-copy state. See the module documentation.
pub struct BlockCopy {
    // set at creation
    source: Arc<dyn BlockNode>,
    target: Arc<dyn BlockNode>,
    cfg: Config,
    len: u64,
    throttle: Option<Throttle>,
    cancel: Cancel,
    observer: Option<Arc<dyn ChunkObserver>>,
    // behind a lock
    inner: Mutex<Inner>,
    changed: Condvar,
    failure: Mutex<Option<CopyError>>,
    failed: std::sync::atomic::AtomicBool,
    // atomic
    pub progress: Progress,
}

/// A claimed run of clusters `[start, end)` in bytes (end clamped to the
/// image size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub start: u64,
    pub end: u64,
}

impl BlockCopy {
    /// A state copying the clusters set in `bitmap` from `source` to `target`.
    pub fn new(
        source: Arc<dyn BlockNode>,
        target: Arc<dyn BlockNode>,
        cfg: Config,
        bitmap: Bits,
        cancel: Cancel,
        observer: Option<Arc<dyn ChunkObserver>>,
    ) -> BlockCopy {
        let len = source.size();
        let cs = cfg.cluster_size;
        let total = bitmap
            .runs()
            .iter()
            .map(|&(s, e)| (e * cs).min(len) - s * cs)
            .sum::<u64>();
        let progress = Progress::default();
        progress.total.store(total, Ordering::Relaxed);
        BlockCopy {
            throttle: cfg.speed.map(Throttle::new),
            source,
            target,
            cfg,
            len,
            cancel,
            observer,
            inner: Mutex::new(Inner {
                bitmap,
                inflight: Vec::new(),
                cursor: 0,
            }),
            changed: Condvar::new(),
            failure: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
            progress,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        self.cfg.cluster_size
    }

    /// The largest claim, in bytes.
    pub fn max_chunk(&self) -> u64 {
        (self.cfg.max_chunk / self.cfg.cluster_size).max(1) * self.cfg.cluster_size
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn source(&self) -> &Arc<dyn BlockNode> {
        &self.source
    }

    pub fn target(&self) -> &Arc<dyn BlockNode> {
        &self.target
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Fail the job with `err` (the first failure wins). Workers stop
    /// claiming; a copy-before-write filter passes writes through.
    pub fn fail(&self, err: CopyError) {
        if let Ok(mut f) = self.failure.lock()
            && f.is_none()
        {
            *f = Some(err);
        }
        self.failed.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The failure recorded by [`BlockCopy::fail`], once.
    pub fn take_failure(&self) -> Option<CopyError> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    /// A copy of the copy bitmap (what is still to copy).
    pub fn bitmap(&self) -> Bits {
        self.lock().bitmap.clone()
    }

    /// Claim the next run of clusters to copy at or after the job's cursor,
    /// at most `max_chunk` bytes. `None` when nothing is left ahead.
    pub fn claim_next(&self) -> Option<Claim> {
        let cs = self.cfg.cluster_size;
        let max = (self.cfg.max_chunk / cs).max(1);
        let mut g = self.lock();
        let start = g.bitmap.next_set(g.cursor)?;
        let end = g
            .bitmap
            .next_clear(start)
            .unwrap_or(g.bitmap.len())
            .min(start + max);
        g.bitmap.clear_range(start, end);
        g.cursor = end;
        let claim = Claim {
            start: start * cs,
            end: (end * cs).min(self.len),
        };
        g.inflight.push((claim.start, claim.end));
        Some(claim)
    }

    /// Finish a claim: on failure its clusters become dirty again.
    pub fn release(&self, claim: Claim, ok: bool) {
        let cs = self.cfg.cluster_size;
        let mut g = self.lock();
        if let Some(i) = g
            .inflight
            .iter()
            .position(|&r| r == (claim.start, claim.end))
        {
            g.inflight.swap_remove(i);
        }
        if !ok {
            g.bitmap.set_range(claim.start / cs, claim.end.div_ceil(cs));
        }
        drop(g);
        self.changed.notify_all();
    }

    /// Claim every cluster of `[offset, offset+len)` that is still to copy,
    /// after waiting for copies in flight over the range (which may copy
    /// or give back some of it). `None` for `deadline` waits as long as it
    /// takes; cancellation always ends the wait.
    pub fn claim_range(
        &self,
        offset: u64,
        len: u64,
        deadline: Option<std::time::Instant>,
    ) -> Result<Vec<Claim>, CopyError> {
        let cs = self.cfg.cluster_size;
        let started = std::time::Instant::now();
        let first = offset / cs;
        let last = (offset + len).div_ceil(cs);
        let (s, e) = (first * cs, (last * cs).min(self.len));
        let mut g = self.lock();
        while g.inflight.iter().any(|&(a, b)| a < e && s < b) {
            if self.cancel.is_cancelled() {
                return Err(CopyError::Cancelled);
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Err(CopyError::Timeout {
                    waited: started.elapsed(),
                });
            }
            g = match self
                .changed
                .wait_timeout(g, std::time::Duration::from_millis(50))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        let mut claims = Vec::new();
        let mut i = first;
        while let Some(s) = g.bitmap.next_set(i).filter(|&s| s < last) {
            let e = g.bitmap.next_clear(s).unwrap_or(g.bitmap.len()).min(last);
            g.bitmap.clear_range(s, e);
            let c = Claim {
                start: s * cs,
                end: (e * cs).min(self.len),
            };
            g.inflight.push((c.start, c.end));
            claims.push(c);
            i = e;
        }
        Ok(claims)
    }

    /// Copy-before-write: make sure every cluster of `[offset, offset+len)`
    /// that is still to copy is in the target before the caller overwrites
    /// it. Waits for copies in flight over the range, then claims and copies
    /// what is still marked. Returns the number of bytes this call copied.
    /// A `deadline` bounds the wait and the copy (`--cbw-timeout`).
    /// Copy-before-write is not rate limited.
    pub fn copy_before_write(
        &self,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        deadline: Option<std::time::Instant>,
    ) -> Result<u64, CopyError> {
        let started = std::time::Instant::now();
        let mut copied = 0;
        loop {
            let claims = self.claim_range(offset, len, deadline)?;
            if claims.is_empty() {
                return Ok(copied);
            }
            for (k, c) in claims.iter().enumerate() {
                let res = self.copy_claimed_with(*c, buf, deadline.map(|d| (d, started)));
                self.release(*c, res.is_ok());
                if let Err(e) = res {
                    for rest in &claims[k + 1..] {
                        self.release(*rest, false);
                    }
                    return Err(e);
                }
                self.progress.cbw_copies.fetch_add(1, Ordering::Relaxed);
                self.progress
                    .cbw_bytes
                    .fetch_add(c.end - c.start, Ordering::Relaxed);
                copied += c.end - c.start;
            }
        }
    }

    /// Copy a claimed range. The caller releases the claim afterwards.
    /// Progress is credited only for what completed.
    /// Returns the bytes read from the source (what a rate limit charges).
    pub fn copy_claimed(&self, claim: Claim, buf: &mut Vec<u8>) -> Result<u64, CopyError> {
        self.copy_claimed_with(claim, buf, None)
    }

    /// The rate limit of background copies (`--speed`), if any. Callers
    /// reserve before they claim and refund what they did not read, so no
    /// claim is held while waiting (a guest write never waits for a
    /// throttled copy).
    pub fn throttle(&self) -> Option<&Throttle> {
        self.throttle.as_ref()
    }

    fn copy_claimed_with(
        &self,
        claim: Claim,
        buf: &mut Vec<u8>,
        deadline: Option<(std::time::Instant, std::time::Instant)>,
    ) -> Result<u64, CopyError> {
        let mut tally = Tally::default();
        let mut ctx = Ctx {
            tally: &mut tally,
            deadline,
        };
        self.copy_claimed_inner(claim, buf, &mut ctx)?;
        let p = &self.progress;
        p.copied.fetch_add(tally.copied, Ordering::Relaxed);
        p.zero.fetch_add(tally.zero, Ordering::Relaxed);
        p.done
            .fetch_add(tally.copied + tally.zero, Ordering::Relaxed);
        Ok(tally.read)
    }

    fn copy_claimed_inner(
        &self,
        claim: Claim,
        buf: &mut Vec<u8>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), CopyError> {
        let cs = self.cfg.cluster_size;
        let mut pos = claim.start;
        while pos < claim.end {
            ctx.check(&self.cancel)?;
            let ext = self
                .source
                .block_status(pos, claim.end - pos)
                .map_err(CopyError::Source)?;
            let ext_end = pos + ext.len;
            let aligned_end = if ext_end == claim.end {
                ext_end
            } else {
                ext_end / cs * cs
            };
            if ext.status != Status::Data && aligned_end > pos {
                self.zero_range(pos, aligned_end, ctx.tally)?;
                pos = aligned_end;
                continue;
            }
            // Data (or a zero extent smaller than a cluster): read whole
            // clusters.
            let end = (ext_end.div_ceil(cs) * cs).min(claim.end);
            let end = end.max((pos + cs).min(claim.end));
            self.copy_data(pos, end, buf, ctx)?;
            pos = end;
        }
        Ok(())
    }

    fn zero_range(&self, start: u64, end: u64, tally: &mut Tally) -> Result<(), CopyError> {
        if self.cfg.write_zeroes {
            self.target
                .write_zeroes(start, end - start)
                .map_err(CopyError::Target)?;
        }
        if let Some(o) = &self.observer {
            o.copied(start, ChunkData::Zeroes(end - start))?;
        }
        tally.zero += end - start;
        Ok(())
    }

    fn copy_data(
        &self,
        start: u64,
        end: u64,
        buf: &mut Vec<u8>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), CopyError> {
        let cs = self.cfg.cluster_size;
        let step = (self.cfg.max_chunk / cs).max(1) * cs;
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(step);
            if buf.len() < n as usize {
                buf.resize(n as usize, 0);
            }
            let data = &mut buf[..n as usize];
            ctx.check(&self.cancel)?;
            self.source.read(pos, data).map_err(CopyError::Source)?;
            ctx.tally.read += n;
            // Write runs of non-zero clusters; leave zero clusters out.
            let zeros: Vec<bool> = data.chunks(cs as usize).map(is_zero).collect();
            let mut i = 0u64;
            while i < n {
                let zero = zeros[(i / cs) as usize];
                let mut j = (i + cs).min(n);
                while j < n && zeros[(j / cs) as usize] == zero {
                    j = (j + cs).min(n);
                }
                let piece = &data[i as usize..j as usize];
                if zero {
                    if self.cfg.write_zeroes {
                        self.target
                            .write_zeroes(pos + i, j - i)
                            .map_err(CopyError::Target)?;
                    }
                    ctx.tally.zero += j - i;
                } else {
                    let res = if self.cfg.compress {
                        self.target.write_compressed(pos + i, piece)
                    } else {
                        self.target.write(pos + i, piece)
                    };
                    res.map_err(CopyError::Target)?;
                    ctx.tally.copied += j - i;
                }
                if let Some(o) = &self.observer {
                    let d = if zero {
                        ChunkData::Zeroes(j - i)
                    } else {
                        ChunkData::Bytes(piece)
                    };
                    o.copied(pos + i, d)?;
                }
                i = j;
            }
            pos += n;
        }
        Ok(())
    }

    /// Flush the target.
    pub fn flush_target(&self) -> Result<(), CopyError> {
        self.target.flush().map_err(CopyError::Target)
    }
}
