//! The writable overlay: the active disk a simulated guest writes into.
//!
//! Writes land in the overlay, never in the source; reads fall through to
//! the source (its whole chain) where the overlay holds nothing. The overlay
//! keeps 4 KiB granules, in memory for small images and in an unlinked
//! sparse temporary file otherwise. A write that covers a granule only
//! partly fills the rest from the source first (serialized per granule
//! range, so concurrent guest writes never lose each other's bytes).

use super::ranges::RangeLocks;
use super::{BlockNode, Extent, Status, check_range};
use crate::bitmap::Bits;
use crate::error::{BlockError, Op, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Overlay granule.
pub const GRANULE: u64 = 4096;
/// Images up to this size keep their overlay in memory.
pub const MEMORY_LIMIT: u64 = 32 << 20;

enum Store {
    Memory(Mutex<HashMap<u64, Box<[u8]>>>),
    File(File),
}

/// A writable overlay over a read-only base.
pub struct OverlayNode {
    // set at creation
    base: Arc<dyn BlockNode>,
    path: PathBuf,
    size: u64,
    store: Store,
    // behind locks
    map: RwLock<GranuleMap>,
    locks: RangeLocks,
}

/// Which granules the overlay holds, and which of those read as zeros
/// (written with write-zeroes; no bytes stored).
struct GranuleMap {
    allocated: Bits,
    zero: Bits,
}

/// What the overlay holds for one granule.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Held {
    Nothing,
    Zero,
    Data,
}

impl OverlayNode {
    /// An overlay over `base`; a temporary file, if needed, goes into `tmp_dir`.
    pub fn new(base: Arc<dyn BlockNode>, tmp_dir: &Path) -> Result<OverlayNode> {
        let size = base.size();
        let store = if size <= MEMORY_LIMIT {
            Store::Memory(Mutex::new(HashMap::new()))
        } else {
            let f = tempfile::tempfile_in(tmp_dir)
                .map_err(|e| BlockError::io(Op::Open, tmp_dir, 0, 0, e))?;
            f.set_len(size)
                .map_err(|e| BlockError::io(Op::Write, tmp_dir, 0, size, e))?;
            Store::File(f)
        };
        let mut path = base.path().as_os_str().to_owned();
        path.push(" (guest overlay)");
        Ok(OverlayNode {
            path: PathBuf::from(path),
            size,
            store,
            map: RwLock::new(GranuleMap {
                allocated: Bits::new(size.div_ceil(GRANULE)),
                zero: Bits::new(size.div_ceil(GRANULE)),
            }),
            locks: RangeLocks::default(),
            base,
        })
    }

    /// The read-only image below.
    pub fn base(&self) -> &Arc<dyn BlockNode> {
        &self.base
    }

    fn map_read(&self) -> std::sync::RwLockReadGuard<'_, GranuleMap> {
        match self.map.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    fn map_write(&self) -> std::sync::RwLockWriteGuard<'_, GranuleMap> {
        match self.map.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    fn held(&self, granule: u64) -> Held {
        let m = self.map_read();
        if !m.allocated.get(granule) {
            Held::Nothing
        } else if m.zero.get(granule) {
            Held::Zero
        } else {
            Held::Data
        }
    }

    /// The end of the run of granules from `pos` that hold the same as the
    /// granule at `pos`, capped at `end`.
    fn run_end(&self, pos: u64, end: u64) -> (Held, u64) {
        let held = self.held(pos / GRANULE);
        let mut next = ((pos / GRANULE + 1) * GRANULE).min(end);
        while next < end && self.held(next / GRANULE) == held {
            next = (next + GRANULE).min(end);
        }
        (held, next)
    }

    /// Runs of granules the overlay holds, as byte ranges.
    pub fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        let bits = self.map_read().allocated.clone();
        bits.runs()
            .into_iter()
            .map(|(s, e)| (s * GRANULE, (e * GRANULE).min(self.size)))
            .collect()
    }

    fn store_read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        match &self.store {
            Store::File(f) => f
                .read_exact_at(out, offset)
                .map_err(|e| BlockError::io(Op::Read, &self.path, offset, out.len() as u64, e)),
            Store::Memory(m) => {
                let m = match m.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                let mut pos = offset;
                let end = offset + out.len() as u64;
                while pos < end {
                    let g = pos / GRANULE;
                    let n = ((g + 1) * GRANULE).min(end) - pos;
                    let dst = &mut out[(pos - offset) as usize..(pos - offset + n) as usize];
                    match m.get(&g) {
                        Some(b) => {
                            let s = (pos - g * GRANULE) as usize;
                            dst.copy_from_slice(&b[s..s + n as usize]);
                        }
                        None => dst.fill(0),
                    }
                    pos += n;
                }
                Ok(())
            }
        }
    }

    fn store_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        match &self.store {
            Store::File(f) => f
                .write_all_at(data, offset)
                .map_err(|e| BlockError::io(Op::Write, &self.path, offset, data.len() as u64, e)),
            Store::Memory(m) => {
                let mut m = match m.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                let mut pos = offset;
                let end = offset + data.len() as u64;
                while pos < end {
                    let g = pos / GRANULE;
                    let n = ((g + 1) * GRANULE).min(end) - pos;
                    let b = m
                        .entry(g)
                        .or_insert_with(|| vec![0u8; GRANULE as usize].into_boxed_slice());
                    let s = (pos - g * GRANULE) as usize;
                    b[s..s + n as usize].copy_from_slice(
                        &data[(pos - offset) as usize..(pos - offset + n) as usize],
                    );
                    pos += n;
                }
                Ok(())
            }
        }
    }

    /// Write `data` (or zeros, when `None`) at `offset`, filling partly
    /// covered granules from the current content first.
    fn put(&self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        check_range(&self.path, offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if data.is_none() {
            // Whole granules become zero granules; partial ones are written.
            let end = offset + len;
            let fs = offset.div_ceil(GRANULE) * GRANULE;
            let fe = if end == self.size {
                end
            } else {
                end / GRANULE * GRANULE
            };
            if fs < fe {
                let zeros = vec![0u8; GRANULE as usize];
                if offset < fs {
                    self.put(offset, fs - offset, Some(&zeros[..(fs - offset) as usize]))?;
                }
                {
                    let _guard = self.locks.lock(fs, fe.div_ceil(GRANULE) * GRANULE);
                    let mut m = self.map_write();
                    let (a, b) = (fs / GRANULE, fe.div_ceil(GRANULE));
                    m.allocated.set_range(a, b);
                    m.zero.set_range(a, b);
                }
                if fe < end {
                    self.put(fe, end - fe, Some(&zeros[..(end - fe) as usize]))?;
                }
                return Ok(());
            }
        }
        let gs = offset / GRANULE * GRANULE;
        let ge = (offset + len).div_ceil(GRANULE) * GRANULE;
        let ge_c = ge.min(self.size);
        let _guard = self.locks.lock(gs, ge);
        // Build the whole granule span, then store it.
        let mut span = vec![0u8; (ge_c - gs) as usize];
        let head_partial = offset != gs;
        let tail_partial = offset + len != ge_c;
        if head_partial || tail_partial {
            // Only the first and last granules need their old content.
            let first = gs;
            let last = (ge_c - 1) / GRANULE * GRANULE;
            for g in [first, last] {
                let n = (g + GRANULE).min(ge_c) - g;
                let dst = &mut span[(g - gs) as usize..(g - gs + n) as usize];
                self.read(g, dst)?;
            }
        }
        let dst = &mut span[(offset - gs) as usize..(offset - gs + len) as usize];
        match data {
            Some(d) => dst.copy_from_slice(d),
            None => dst.fill(0),
        }
        self.store_write(gs, &span)?;
        let mut m = self.map_write();
        let (a, b) = (gs / GRANULE, ge_c.div_ceil(GRANULE));
        m.allocated.set_range(a, b);
        m.zero.clear_range(a, b);
        Ok(())
    }
}

impl BlockNode for OverlayNode {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        self.base.cluster_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let (held, next) = self.run_end(pos, end);
            let out = &mut buf[(pos - offset) as usize..(next - offset) as usize];
            match held {
                Held::Data => self.store_read(pos, out)?,
                Held::Zero => out.fill(0),
                Held::Nothing => self.base.read(pos, out)?,
            }
            pos = next;
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.put(offset, buf.len() as u64, Some(buf))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.put(offset, len, None)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.put(offset, len, None)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, offset, len, self.size)?;
        let (held, next) = self.run_end(offset, offset + len);
        match held {
            Held::Data => Ok(Extent {
                status: Status::Data,
                len: next - offset,
            }),
            Held::Zero => Ok(Extent {
                status: Status::Zero,
                len: next - offset,
            }),
            Held::Nothing => self.base.block_status(offset, next - offset),
        }
    }
}
