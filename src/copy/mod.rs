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
use crate::node::ranges::InFlight;
use crate::node::{BlockNode, Extent, Status, is_zero};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use throttle::Throttle;

/// Why one copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read the source image")]
    /// Reading the source failed.
    Source(#[source] BlockError),
    #[error("cannot write the target")]
    /// Writing the target failed.
    Target(#[source] BlockError),
    #[error("the copy was cancelled")]
    /// The job was cancelled.
    Cancelled,
    #[error("copy-before-write did not finish within {waited:?} (--cbw-timeout)")]
    /// A copy-before-write took longer than --cbw-timeout.
    Timeout {
        /// How long it waited.
        waited: std::time::Duration,
    },
    #[error("chunk {chunk} at offset {offset} does not match the manifest ({detail})")]
    /// Data does not match the manifest (restore).
    Mismatch {
        /// Byte offset of the chunk.
        offset: u64,
        /// Index of the chunk.
        chunk: u64,
        /// What differs.
        detail: String,
    },
    #[error("cannot write the manifest")]
    /// Writing the manifest failed.
    Manifest(#[source] std::io::Error),
    /// Reading a manifest's digests failed (a parent's, or the one a
    /// restore checks against).
    #[error("cannot read the manifest")]
    ManifestRead(#[source] crate::manifest::ManifestError),
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
            CopyError::ManifestRead(_) => None,
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
    /// A range was copied (or read as zeros).
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
    /// Bytes copied by copy-before-write.
    pub cbw_bytes: AtomicU64,
    /// Retries of failed copies (error policies).
    pub retries: AtomicU64,
    /// Bytes of `copied` that the kernel copied between the files
    /// (`copy_file_range`).
    pub copied_in_kernel: AtomicU64,
}

/// Settings of a block-copy state.
#[derive(Clone)]
pub struct Config {
    /// Bytes per copy unit (the backup granularity).
    pub cluster_size: u64,
    /// Largest single request, bytes.
    pub max_chunk: u64,
    /// The target does not read as zeros where it was not written (it has a
    /// backing file): zeros must be written explicitly.
    pub write_zeroes: bool,
    /// Rate limit of background copies, bytes per second.
    pub speed: Option<u64>,
    /// Write data compressed (a qcow2 target).
    pub compress: bool,
    /// Bytes of RAM for the copy-before-write cache (0: none).
    pub cbw_cache: u64,
    /// Copy data between plain raw files inside the kernel
    /// (`copy_file_range`) when nothing needs the bytes in memory (no
    /// observer, no compression, zeros not written explicitly).
    pub copy_range: bool,
}

/// What one claim did, credited to [`Progress`] only if it all succeeded.
#[derive(Default)]
struct Tally {
    copied: u64,
    zero: u64,
    read: u64,
    in_kernel: u64,
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
    inflight: InFlight,
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
    cache: Option<CbwCache>,
    /// Clusters given up on that must not be copied again (a cached
    /// copy-before-write an ignore policy dropped: the source has changed).
    lost: Mutex<Bits>,
    /// Clusters where the source held nothing when the copy started (a
    /// hint for claim sizes; see [`BlockCopy::map_holes`]).
    holes: std::sync::OnceLock<Bits>,
    // atomic
    /// Progress counters, read by the display.
    pub progress: Progress,
}

/// Old data a copy-before-write read into RAM, waiting to be written.
struct Cached {
    claim: Claim,
    data: Vec<u8>,
}

/// The copy-before-write cache: a guest write waits only until the old data
/// of its clusters is in RAM; a drain writes it to the target afterwards.
/// Bounded; when full, guest writes copy synchronously as without it.
struct CbwCache {
    cap: u64,
    // behind a lock
    state: Mutex<(u64, std::collections::VecDeque<Cached>)>,
    ready: Condvar,
    peak: AtomicU64,
}

/// The largest claim over a hole ([`BlockCopy::map_holes`]): 1 GiB, so a
/// 64 TiB image of holes is 65536 claims.
pub const HOLE_CLAIM: u64 = 1 << 30;

/// [`BlockCopy::map_holes`] walks the source this much at a time, looking
/// for a cancel in between.
const HOLE_MAP_SLICE: u64 = 64 << 30;

/// A claimed run of clusters `[start, end)` in bytes (end clamped to the
/// image size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// First byte.
    pub start: u64,
    /// End byte (exclusive, clamped to the image size).
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
        let cache = (cfg.cbw_cache > 0).then(|| CbwCache {
            cap: cfg.cbw_cache,
            state: Mutex::new((0, std::collections::VecDeque::new())),
            ready: Condvar::new(),
            peak: AtomicU64::new(0),
        });
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
                inflight: InFlight::default(),
                cursor: 0,
            }),
            changed: Condvar::new(),
            failure: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
            cache,
            lost: Mutex::new(Bits::new(0)),
            holes: std::sync::OnceLock::new(),
            progress,
        }
    }

    /// Bytes per copy unit.
    pub fn cluster_size(&self) -> u64 {
        self.cfg.cluster_size
    }

    /// The largest claim, in bytes.
    pub fn max_chunk(&self) -> u64 {
        (self.cfg.max_chunk / self.cfg.cluster_size).max(1) * self.cfg.cluster_size
    }

    /// Size of the image, bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty image.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The node copies read from.
    pub fn source(&self) -> &Arc<dyn BlockNode> {
        &self.source
    }

    /// The node copies write to.
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

    /// True once the job failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The failure recorded by [`BlockCopy::fail`], once.
    pub fn take_failure(&self) -> Option<CopyError> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    /// What the job did not copy: the copy bitmap, plus clusters given up
    /// on for good.
    pub fn not_copied(&self) -> Bits {
        let mut b = self.bitmap();
        if let Ok(l) = self.lost.lock()
            && !l.is_empty()
        {
            b.merge(&l);
        }
        b
    }

    /// A copy of the copy bitmap (what is still to copy).
    pub fn bitmap(&self) -> Bits {
        self.lock().bitmap.clone()
    }

    /// Map, before the workers start, the clusters still to copy where the
    /// source holds nothing (zero or unallocated through its chain),
    /// walking the source's extents over the runs of the copy bitmap. The
    /// map is a hint for [`BlockCopy::claim_next`]: a claim that starts in
    /// a hole may reach to the hole's end (up to [`HOLE_CLAIM`] bytes)
    /// instead of `max_chunk`, so an empty or sparse terabyte costs its
    /// extents rather than one claim per `max_chunk`, while claims still
    /// go in offset order (a failure stops the job where it would have
    /// stopped). Every claim checks the source again when it is copied. An
    /// error or a cancel leaves the map out; the copy is the same without
    /// it.
    pub fn map_holes(&self) {
        let cs = self.cfg.cluster_size;
        let max = (self.cfg.max_chunk / cs).max(1);
        let bits = self.bitmap();
        let mut holes = Bits::new(bits.len());
        // A run no longer than one claim is claimed whole either way: only
        // longer runs are worth their block-status calls (an incremental's
        // thousands of single dirty clusters would otherwise cost a serial
        // walk before the copy starts).
        for (s, e) in bits.runs().into_iter().filter(|&(s, e)| e - s > max) {
            let (mut pos, end) = (s * cs, (e * cs).min(self.len));
            // In slices, to stop soon after a cancel.
            while pos < end {
                if self.cancel.is_cancelled() {
                    return;
                }
                let to = end.min(pos.saturating_add(HOLE_MAP_SLICE));
                let res = crate::node::for_each_extent(self.source.as_ref(), pos, to, |at, ext| {
                    if ext.status == Status::Data {
                        return;
                    }
                    // Whole clusters only; the run's last may be short.
                    let ext_end = at + ext.len;
                    let first = at.div_ceil(cs);
                    let last = if ext_end == self.len {
                        ext_end.div_ceil(cs)
                    } else {
                        ext_end / cs
                    };
                    if last > first {
                        holes.set_range(first, last);
                    }
                });
                if let Err(e) = res {
                    tracing::debug!("no hole map: block status in {pos}..{to}: {e}");
                    return;
                }
                pos = to;
            }
        }
        let _ = self.holes.set(holes);
    }

    /// Claim the next run of clusters to copy at or after the job's cursor,
    /// at most `max_chunk` bytes. `None` when nothing is left ahead.
    pub fn claim_next(&self) -> Option<Claim> {
        let cs = self.cfg.cluster_size;
        let max = (self.cfg.max_chunk / cs).max(1);
        let mut g = self.lock();
        let start = g.bitmap.next_set(g.cursor)?;
        // The run ends at the first clear bit, looked for no further than
        // the largest claim: a full bitmap is not scanned to its end on
        // every claim. A claim that starts in a hole may cover the hole.
        let len = g.bitmap.len();
        let limit = match self.holes.get() {
            Some(h) if h.get(start) => {
                let far = (start + (HOLE_CLAIM / cs).max(max)).min(len);
                h.next_clear_in(start, far).unwrap_or(far)
            }
            _ => (start + max).min(len),
        };
        let end = g.bitmap.next_clear_in(start, limit).unwrap_or(limit);
        g.bitmap.clear_range(start, end);
        g.cursor = end;
        let claim = Claim {
            start: start * cs,
            end: (end * cs).min(self.len),
        };
        g.inflight.insert(claim.start, claim.end);
        tracing::trace!("claim {}..{}", claim.start, claim.end);
        Some(claim)
    }

    /// Wait until no claim is in flight (a copy-before-write still copying
    /// may yet give its clusters back), or the job is cancelled.
    pub fn wait_idle(&self) {
        let mut g = self.lock();
        while !g.inflight.is_empty() && !self.cancel.is_cancelled() {
            g = match self
                .changed
                .wait_timeout(g, std::time::Duration::from_millis(50))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Finish a claim: on failure its clusters become dirty again.
    pub fn release(&self, claim: Claim, ok: bool) {
        let cs = self.cfg.cluster_size;
        let mut g = self.lock();
        g.inflight.remove(claim.start, claim.end);
        if !ok {
            g.bitmap.set_range(claim.start / cs, claim.end.div_ceil(cs));
        }
        drop(g);
        self.changed.notify_all();
    }

    /// Split a held claim into claims of one cluster each, in offset order,
    /// keeping the in-flight list exact (each piece is released on its
    /// own).
    pub fn split_claim(&self, c: Claim) -> Vec<Claim> {
        let cs = self.cfg.cluster_size;
        let mut g = self.lock();
        g.inflight.remove(c.start, c.end);
        let mut out = Vec::new();
        let mut s = c.start;
        while s < c.end {
            let e = ((s / cs + 1) * cs).min(c.end);
            g.inflight.insert(s, e);
            out.push(Claim { start: s, end: e });
            s = e;
        }
        out
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
        while g.inflight.overlaps(s, e) {
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
        while let Some(s) = g.bitmap.next_set_in(i, last) {
            let e = g
                .bitmap
                .next_clear_in(s, last)
                .unwrap_or(last.min(g.bitmap.len()));
            g.bitmap.clear_range(s, e);
            let c = Claim {
                start: s * cs,
                end: (e * cs).min(self.len),
            };
            g.inflight.insert(c.start, c.end);
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
                match self.cache_claim(*c) {
                    Ok(true) => {
                        copied += c.end - c.start;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        for rest in &claims[k + 1..] {
                            self.release(*rest, false);
                        }
                        return Err(e);
                    }
                }
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

    /// With the cache: read the old data of a claimed range into RAM and
    /// settle the claim (its clusters are safe; nobody waits for them), or
    /// return false (no cache, cache full, or nothing to read) so the
    /// caller copies it directly. A failed read gives the claim back.
    fn cache_claim(&self, c: Claim) -> Result<bool, CopyError> {
        let Some(cache) = &self.cache else {
            return Ok(false);
        };
        let len = c.end - c.start;
        // Ranges without data copy without I/O: no need to cache them.
        let ext = match self.source.block_status(c.start, len) {
            Ok(e) => e,
            Err(e) => {
                self.release(c, false);
                return Err(CopyError::Source(e));
            }
        };
        if ext.status != Status::Data && ext.len == len {
            return Ok(false);
        }
        {
            let mut st = match cache.state.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if st.0 + len > cache.cap {
                return Ok(false);
            }
            st.0 += len;
            cache.peak.fetch_max(st.0, Ordering::Relaxed);
        }
        let mut data = vec![0u8; len as usize];
        if let Err(e) = self.source.read(c.start, &mut data) {
            if let Ok(mut st) = cache.state.lock() {
                st.0 -= len;
            }
            self.release(c, false);
            return Err(CopyError::Source(e));
        }
        if let Ok(mut st) = cache.state.lock() {
            st.1.push_back(Cached { claim: c, data });
        }
        cache.ready.notify_all();
        // Settle: the clusters leave the in-flight list with their bits
        // still clear; the job skips them and guest writes need not wait.
        let mut g = self.lock();
        g.inflight.remove(c.start, c.end);
        drop(g);
        self.changed.notify_all();
        Ok(true)
    }

    /// True when the copy-before-write cache is on.
    pub fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// True when the copy-before-write cache holds data to write.
    pub fn cache_pending(&self) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.state.lock().map(|s| !s.1.is_empty()).unwrap_or(false))
    }

    /// The most bytes the cache held at once.
    pub fn cache_peak(&self) -> u64 {
        self.cache
            .as_ref()
            .map(|c| c.peak.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Take the oldest cached range, waiting up to `wait` for one.
    fn cache_pop(&self, wait: std::time::Duration) -> Option<Cached> {
        let cache = self.cache.as_ref()?;
        let mut st = match cache.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if st.1.is_empty() {
            st = match cache.ready.wait_timeout(st, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        st.1.pop_front()
    }

    /// Write one cached range to the target. `Ok(false)` when there was
    /// nothing to write within `wait`. A failure keeps the data cached (the
    /// source may have changed since: the cache is the only copy) and is
    /// returned with the range, for the error policy to decide.
    pub fn drain_one(&self, wait: std::time::Duration) -> Result<bool, (Claim, CopyError)> {
        let Some(c) = self.cache_pop(wait) else {
            return Ok(false);
        };
        let mut tally = Tally::default();
        match self.write_data(c.claim.start, &c.data, &mut tally) {
            Ok(()) => {
                let len = c.claim.end - c.claim.start;
                if let Some(cache) = &self.cache
                    && let Ok(mut st) = cache.state.lock()
                {
                    st.0 -= len;
                }
                let p = &self.progress;
                p.copied.fetch_add(tally.copied, Ordering::Relaxed);
                p.zero.fetch_add(tally.zero, Ordering::Relaxed);
                p.done
                    .fetch_add(tally.copied + tally.zero, Ordering::Relaxed);
                p.cbw_copies.fetch_add(1, Ordering::Relaxed);
                p.cbw_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                let claim = c.claim;
                if let Some(cache) = &self.cache
                    && let Ok(mut st) = cache.state.lock()
                {
                    st.1.push_front(c);
                }
                Err((claim, e))
            }
        }
    }

    /// Drop a cached range the error policy gave up on (ignore): its bytes
    /// are freed and the range counts as not copied.
    pub fn cache_drop(&self, claim: Claim) {
        let cs = self.cfg.cluster_size;
        if let Ok(mut l) = self.lost.lock() {
            if l.is_empty() {
                *l = Bits::new(self.len.div_ceil(cs));
            }
            l.set_range(claim.start / cs, claim.end.div_ceil(cs));
        }
        if let Some(cache) = &self.cache
            && let Ok(mut st) = cache.state.lock()
            && let Some(i) = st.1.iter().position(|c| c.claim == claim)
            && let Some(c) = st.1.remove(i)
        {
            st.0 -= c.claim.end - c.claim.start;
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
        p.copied_in_kernel
            .fetch_add(tally.in_kernel, Ordering::Relaxed);
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
        // The status at `pos` when the data run before it already asked.
        let mut known: Option<Extent> = None;
        while pos < claim.end {
            ctx.check(&self.cancel)?;
            let ext = match known.take() {
                Some(e) => e,
                None => self
                    .source
                    .block_status(pos, claim.end - pos)
                    .map_err(CopyError::Source)?,
            };
            let ext_end = pos + ext.len;
            let aligned_end = if ext_end == claim.end {
                ext_end
            } else {
                ext_end / cs * cs
            };
            if ext.status != Status::Data && aligned_end > pos {
                tracing::trace!(
                    "{pos}..{aligned_end}: {:?} in the source: not read{}",
                    ext.status,
                    if self.cfg.write_zeroes {
                        ", written as zeroes"
                    } else {
                        ", not written"
                    }
                );
                self.zero_range(pos, aligned_end, ctx.tally)?;
                pos = aligned_end;
                continue;
            }
            // Data (or a zero extent smaller than a cluster): read whole
            // clusters, and the data extents right behind in one go (a
            // chain's layers cut its data into small extents; read through
            // the chain, they are one request).
            let end = (ext_end.div_ceil(cs) * cs).min(claim.end);
            let mut end = end.max((pos + cs).min(claim.end));
            // (Allocation, not status: data over a host hole behind is read
            // as zeros with the rest, at most to the claim's end. Its zero
            // and unallocated answers are exact: the next turn uses the one
            // that ends the run.)
            while end < claim.end {
                let next = self
                    .source
                    .allocation(end, claim.end - end)
                    .map_err(CopyError::Source)?;
                if next.status != Status::Data {
                    known = Some(next);
                    break;
                }
                end = ((end + next.len).div_ceil(cs) * cs).min(claim.end);
            }
            if self.kernel_copied(pos, end, ctx)? {
                tracing::trace!("{pos}..{end}: copied in the kernel");
            } else {
                self.copy_data(pos, end, buf, ctx)?;
            }
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
            self.write_data(pos, data, ctx.tally)?;
            pos += n;
        }
        Ok(())
    }

    /// Write data the copy holds (read from the source, or from the
    /// copy-before-write cache) to the target: runs of non-zero clusters as
    /// data, zero clusters left out (or written as zeroes over a backing
    /// file), every piece shown to the observer.
    fn write_data(&self, pos: u64, data: &[u8], tally: &mut Tally) -> Result<(), CopyError> {
        let cs = self.cfg.cluster_size;
        let n = data.len() as u64;
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
            tracing::trace!(
                "{}..{}: {}",
                pos + i,
                pos + j,
                if zero {
                    "read as zeros: not written as data"
                } else {
                    "data: written"
                }
            );
            if zero {
                if self.cfg.write_zeroes {
                    self.target
                        .write_zeroes(pos + i, j - i)
                        .map_err(CopyError::Target)?;
                }
                tally.zero += j - i;
            } else {
                let res = self.target.write_with(
                    pos + i,
                    piece,
                    crate::node::WriteFlags {
                        compress: self.cfg.compress,
                    },
                );
                res.map_err(CopyError::Target)?;
                tally.copied += j - i;
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
        Ok(())
    }

    /// Copy `[start, end)` inside the kernel (`copy_file_range`) in
    /// requests of at most `max_chunk`, when nothing needs the bytes in
    /// memory (no observer, no compression, zeros not written explicitly)
    /// and both nodes allow it. Every request passes the nodes' filters
    /// (fault injection) like a read and a write would; its errors go to the
    /// error policies like any copy's. `Ok(false)` when the bytes must be
    /// copied through memory instead (nothing was copied then).
    fn kernel_copied(&self, start: u64, end: u64, ctx: &mut Ctx<'_>) -> Result<bool, CopyError> {
        if !self.cfg.copy_range
            || self.observer.is_some()
            || self.cfg.compress
            || self.cfg.write_zeroes
        {
            return Ok(false);
        }
        let step = self.max_chunk();
        let mut pos = start;
        while pos < end {
            ctx.check(&self.cancel)?;
            let n = (end - pos).min(step);
            let copied = match self.source.copy_source(pos, n).map_err(CopyError::Source)? {
                Some(src) => self
                    .target
                    .copy_range_from(src, pos, n)
                    .map_err(CopyError::Target)?,
                None => false,
            };
            if !copied {
                if pos == start {
                    return Ok(false);
                }
                // The file systems stopped allowing it midway: copy the
                // rest through memory.
                let mut buf = Vec::new();
                self.copy_data(pos, end, &mut buf, ctx)?;
                return Ok(true);
            }
            ctx.tally.read += n;
            ctx.tally.copied += n;
            ctx.tally.in_kernel += n;
            pos += n;
        }
        Ok(true)
    }

    /// Flush the target.
    pub fn flush_target(&self) -> Result<(), CopyError> {
        self.target.flush().map_err(CopyError::Target)
    }
}

#[cfg(test)]
mod tests;
