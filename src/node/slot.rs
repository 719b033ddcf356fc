//! The filter slot of a served image: where `serve` inserts a backup job's
//! copy-before-write filter while clients keep writing (QEMU inserts its
//! copy-before-write node into a running graph the same way).
//!
//! Reads, flushes and block status go straight to the image. Every write
//! (write, write-zeroes, discard) holds the slot shared for its whole
//! duration and goes through the inserted filter, if any. Inserting or
//! removing a filter holds the slot exclusively: it waits until the writes
//! in flight have finished, and no write starts until the change is made —
//! so the moment a filter is inserted is a point in time at which every
//! earlier write is complete and no later one has begun.

use super::{BlockNode, Extent, Filter, WriteFlags};
use crate::error::Result;
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// A node whose writes pass an exchangeable filter (none by default).
pub struct FilterSlot {
    base: Arc<dyn BlockNode>,
    filter: RwLock<Option<Arc<dyn BlockNode>>>,
}

impl FilterSlot {
    /// A slot over `base`, empty.
    pub fn new(base: Arc<dyn BlockNode>) -> FilterSlot {
        FilterSlot {
            base,
            filter: RwLock::new(None),
        }
    }

    /// With every write drained and held off, run `make` and insert the
    /// filter it returns (which must pass writes on to the base node). What
    /// `make` returns besides is handed back; an error inserts nothing.
    pub fn insert_with<T, E>(
        &self,
        make: impl FnOnce() -> std::result::Result<(Arc<dyn BlockNode>, T), E>,
    ) -> std::result::Result<T, E> {
        let mut slot = match self.filter.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (filter, out) = make()?;
        *slot = Some(filter);
        Ok(out)
    }

    /// Run `f` with every write drained and held off (a point in time at
    /// which the image is not being written).
    pub fn drained<T>(&self, f: impl FnOnce() -> T) -> T {
        let _slot = match self.filter.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f()
    }

    /// Remove the filter once the writes in flight through it have finished.
    pub fn remove(&self) {
        let mut slot = match self.filter.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *slot = None;
    }

    /// Whether a filter is inserted.
    pub fn is_occupied(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> RwLockReadGuard<'_, Option<Arc<dyn BlockNode>>> {
        match self.filter.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Where a write goes while `guard` is held.
    fn target<'a>(&'a self, guard: &'a Option<Arc<dyn BlockNode>>) -> &'a dyn BlockNode {
        match guard {
            Some(f) => f.as_ref(),
            None => self.base.as_ref(),
        }
    }
}

impl Filter for FilterSlot {
    fn child(&self) -> &Arc<dyn BlockNode> {
        &self.base
    }
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let g = self.current();
        self.target(&g).write_with(offset, buf, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let g = self.current();
        self.target(&g).write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let g = self.current();
        self.target(&g).discard(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.base.block_status(offset, len)
    }
    fn copy_range_from(&self, _src: &std::fs::File, _offset: u64, _len: u64) -> Result<bool> {
        // A write must pass the filter: copy through memory.
        Ok(false)
    }
}

/// Counts and times the writes that pass it (the clients' writes during a
/// job on a served image, reported like the simulated guest's).
pub struct MeasuredNode {
    inner: Arc<dyn BlockNode>,
    stats: std::sync::Mutex<crate::guest::GuestStats>,
}

impl MeasuredNode {
    /// Measure the writes to `inner`.
    pub fn new(inner: Arc<dyn BlockNode>) -> MeasuredNode {
        MeasuredNode {
            inner,
            stats: Default::default(),
        }
    }

    /// What was measured so far.
    pub fn stats(&self) -> crate::guest::GuestStats {
        match self.stats.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn measure(&self, len: u64, zero: bool, op: impl FnOnce() -> Result<()>) -> Result<()> {
        let t = std::time::Instant::now();
        let r = op();
        let took = t.elapsed();
        let mut s = match self.stats.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match &r {
            Ok(()) => {
                s.writes += 1;
                s.bytes += len;
                if zero {
                    s.zero_writes += 1;
                }
                s.latency.record(took);
            }
            Err(e) => {
                s.failed += 1;
                if s.first_error.is_none() {
                    s.first_error = Some(e.to_string());
                }
            }
        }
        r
    }
}

impl Filter for MeasuredNode {
    fn child(&self) -> &Arc<dyn BlockNode> {
        &self.inner
    }
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.measure(buf.len() as u64, false, || {
            self.inner.write_with(offset, buf, flags)
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.measure(len, true, || self.inner.write_zeroes(offset, len))
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.measure(len, true, || self.inner.discard(offset, len))
    }
    fn copy_range_from(&self, _src: &std::fs::File, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::marking::MarkingNode;
    use crate::node::mem::MemNode;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn writes_pass_the_inserted_filter_and_only_while_it_is_there() {
        let base: Arc<dyn BlockNode> = Arc::new(MemNode::new("m", vec![0; 1 << 20], 65536));
        let slot = FilterSlot::new(base.clone());
        let seen = Arc::new(Mutex::new(Vec::new()));
        slot.write(0, &[1; 512]).unwrap();
        let s = seen.clone();
        slot.insert_with(|| {
            let f: Arc<dyn BlockNode> = Arc::new(MarkingNode::new(
                base.clone(),
                Arc::new(move |o, l| s.lock().unwrap().push((o, l))),
            ));
            Ok::<_, ()>((f, ()))
        })
        .unwrap();
        assert!(slot.is_occupied());
        slot.write(4096, &[2; 512]).unwrap();
        BlockNode::write_zeroes(&slot, 8192, 512).unwrap();
        slot.remove();
        slot.write(16384, &[3; 512]).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(4096, 512), (8192, 512)]);
        let mut b = [0u8; 512];
        base.read(4096, &mut b).unwrap();
        assert_eq!(b, [2; 512]);
        base.read(16384, &mut b).unwrap();
        assert_eq!(b, [3; 512]);
    }

    #[test]
    fn inserting_waits_for_writes_in_flight() {
        // A write stuck inside the filter holds off the next insertion.
        let base: Arc<dyn BlockNode> = Arc::new(MemNode::new("m", vec![0; 1 << 20], 65536));
        let slot = Arc::new(FilterSlot::new(base.clone()));
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        slot.insert_with(|| {
            let f: Arc<dyn BlockNode> = Arc::new(MarkingNode::new(
                base.clone(),
                Arc::new(move |_, _| {
                    while !r.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }),
            ));
            Ok::<_, ()>((f, ()))
        })
        .unwrap();
        let s2 = slot.clone();
        let writer = std::thread::spawn(move || s2.write(0, &[9; 512]).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        let done = Arc::new(AtomicBool::new(false));
        let (s3, d2) = (slot.clone(), done.clone());
        let remover = std::thread::spawn(move || {
            s3.remove();
            d2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "removed under a write in flight"
        );
        release.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        remover.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert!(!slot.is_occupied());
    }
}
