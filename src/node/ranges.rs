//! Byte ranges in flight: the one home for "does this request overlap one
//! that is running". [`InFlight`] is the bare set (the block-copy state
//! keeps it under the same lock as its copy bitmap); [`RangeLocks`] is a
//! blocking lock over it (the overlay serializes overlapping writes).

use std::sync::{Condvar, Mutex, MutexGuard};

/// Half-open byte ranges `[start, end)` currently held. The same range may
/// be held more than once; each [`InFlight::remove`] drops one.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    held: Vec<(u64, u64)>,
}

impl InFlight {
    /// True when `[start, end)` overlaps a held range.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.held.iter().any(|&(a, b)| a < end && start < b)
    }

    /// Hold `[start, end)`.
    pub fn insert(&mut self, start: u64, end: u64) {
        self.held.push((start, end));
    }

    /// Drop one hold of exactly `[start, end)`; false if none was held.
    pub fn remove(&mut self, start: u64, end: u64) -> bool {
        match self.held.iter().position(|&r| r == (start, end)) {
            Some(i) => {
                self.held.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Number of holds.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Serializes overlapping byte ranges.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<InFlight>,
    freed: Condvar,
}

/// A held range; released on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    fn held(&self) -> MutexGuard<'_, InFlight> {
        match self.held.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Lock `[start, end)` (bytes) until the guard is dropped, waiting for
    /// any overlapping holder to drop its guard first.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held();
        while held.overlaps(start, end) {
            held = match self.freed.wait(held) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        held.insert(start, end);
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held();
        held.remove(self.range.0, self.range.1);
        drop(held);
        self.locks.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn overlap_is_half_open() {
        let mut f = InFlight::default();
        f.insert(10, 20);
        assert!(!f.overlaps(0, 10));
        assert!(!f.overlaps(20, 30));
        assert!(f.overlaps(19, 21));
        assert!(f.overlaps(0, 100));
        f.insert(10, 20);
        assert!(f.remove(10, 20));
        assert!(f.overlaps(15, 16), "a second hold of the same range stays");
        assert!(f.remove(10, 20));
        assert!(!f.remove(10, 20));
        assert!(f.is_empty());
    }

    #[test]
    fn an_overlapping_lock_waits_for_the_guard() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 4096);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, entered) = (locks.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(4095, 8192);
                entered.store(true, Ordering::SeqCst);
            })
        };
        // A disjoint range does not wait.
        drop(locks.lock(4096, 8192 + 4096));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst));
        drop(g);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
