//! A qcow2 image written in place (`serve`, `guest`): cluster and L2
//! allocation, refcounts and copy-on-write of partial clusters are done by
//! the `imago` crate, chosen over extending imgbackup's own writer (which
//! only creates new files) with the evidence in docs/qcow2.md: `qemu-img
//! check` clean after random workloads at every cluster size, and nothing
//! worse than leaked clusters after kill -9 at random moments.
//!
//! Before imago opens the image, imgbackup's own reader validates the whole
//! chain (the checks of `backup`), and images imgbackup does not write in
//! place are refused: version 2 (no dirty bit), internal snapshots (their
//! clusters are shared), zstd compression, an image already marked dirty.
//! Persistent bitmaps inside the image are invalidated as the qcow2
//! specification requires (imago clears the bitmaps autoclear bit when it
//! opens the image for writing), since nothing here updates them.
//!
//! imago is used with one fix (vendor/imago/IMGBACKUP.md): the refcount
//! block of a new L2 table is written before the L1 entry that references
//! it; without it a kill between the two left `refcount=0 reference=1`.
//! With it, a process killed at any moment leaves nothing worse than leaked
//! clusters (`qemu-img check` exit 3). Besides, while the image is written
//! its dirty bit (incompatible feature 0, QEMU's lazy-refcounts marker) is
//! set, durably before the first write, and cleared only after the last
//! flush at close, so QEMU rebuilds the refcounts (and drops those leaks)
//! when it next opens an image whose writer was killed.

use crate::error::{BlockError, Op, Result};
use crate::node::{BlockNode, Extent, Status};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate};
use std::path::{Path, PathBuf};

/// A qcow2 image open for reading and writing in place.
pub struct Qcow2InPlace {
    path: PathBuf,
    size: u64,
    cluster: u64,
    access: FormatAccess<ImagoFile>,
    /// Whether the dirty bit is set on disk; changed under `marking`.
    dirty: std::sync::atomic::AtomicBool,
    /// Serializes setting and clearing the dirty bit.
    marking: std::sync::Mutex<()>,
}

impl Qcow2InPlace {
    /// Validate `path` (and its backing chain) and open it for writing.
    pub fn open(path: &Path) -> Result<Qcow2InPlace> {
        let image = crate::node::probe::open_image(path, Some(crate::node::probe::Format::Qcow2))?;
        let header = read_header(path)?;
        let refuse = |why: String| BlockError::Unsupported {
            path: path.to_path_buf(),
            detail: format!(
                "{why}; imgbackup writes such images only read-only (serve --read-only) or through a backup"
            ),
        };
        if header.version < 3 {
            return Err(refuse(
                "it is a version 2 (compat=0.10) image, which has no dirty bit to protect its refcounts while written; `qemu-img amend -o compat=1.1` upgrades it".into(),
            ));
        }
        if header.nb_snapshots > 0 {
            return Err(refuse(format!(
                "it has {} internal snapshot(s), whose clusters it shares",
                header.nb_snapshots
            )));
        }
        if header.compression_type != 0 {
            return Err(refuse("it uses zstd compression".into()));
        }
        if header.incompatible_features & super::header::INCOMPAT_DIRTY != 0 {
            return Err(refuse(
                "it is marked dirty (lazy refcounts of a QEMU that stopped without closing it; `qemu-img check -r all` repairs it)".into(),
            ));
        }
        let size = image.node.size();
        let cluster = 1u64 << header.cluster_bits;
        drop(image);
        let q = Qcow2::<ImagoFile>::builder_path(path)
            .write(true)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
        Ok(Qcow2InPlace {
            path: path.to_path_buf(),
            size,
            cluster,
            access: FormatAccess::new(q),
            dirty: std::sync::atomic::AtomicBool::new(false),
            marking: std::sync::Mutex::new(()),
        })
    }

    /// Before a write: the dirty bit set and durable (one flag load once
    /// it is).
    fn dirty(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = match self.marking.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !self.dirty.load(Ordering::Acquire) {
            set_dirty(&self.path, true)?;
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        crate::node::check_range(&self.path, offset, len, self.size)
    }
}

/// Set or clear the dirty bit (incompatible feature 0) of the qcow2 file
/// at `path`, durably.
fn set_dirty(path: &Path, dirty: bool) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const INCOMPAT_OFFSET: u64 = 72;
    let io = |op, e| BlockError::io(op, path, INCOMPAT_OFFSET, 8, e);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io(Op::Open, e))?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, INCOMPAT_OFFSET)
        .map_err(|e| io(Op::Read, e))?;
    let v = u64::from_be_bytes(b);
    let v = if dirty {
        v | super::header::INCOMPAT_DIRTY
    } else {
        v & !super::header::INCOMPAT_DIRTY
    };
    f.write_all_at(&v.to_be_bytes(), INCOMPAT_OFFSET)
        .map_err(|e| io(Op::Write, e))?;
    f.sync_data().map_err(|e| io(Op::Flush, e))
}

impl Drop for Qcow2InPlace {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(
                "{} stays marked dirty (QEMU rebuilds its refcounts when it opens it): {e}",
                self.path.display()
            );
        }
    }
}

/// The header of the qcow2 file at `path`.
fn read_header(path: &Path) -> Result<super::Header> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
    let len = f
        .metadata()
        .map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?
        .len();
    let mut buf = vec![0u8; 65536.min(len as usize)];
    f.read_exact_at(&mut buf, 0)
        .map_err(|e| BlockError::io(Op::Read, path, 0, buf.len() as u64, e))?;
    super::Header::parse(path, &buf, len)
}

impl BlockNode for Qcow2InPlace {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        self.cluster
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        self.access
            .read(buf, offset)
            .map_err(|e| BlockError::io(Op::Read, &self.path, offset, len, e))
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.dirty()?;
        self.access
            .write(buf, offset)
            .map_err(|e| BlockError::io(Op::Write, &self.path, offset, buf.len() as u64, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.dirty()?;
        self.access
            .write_zeroes(offset, len)
            .map_err(|e| BlockError::io(Op::WriteZeroes, &self.path, offset, len, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Discarded ranges may read as anything: zeroes are the safe
        // choice (a discard never lets the backing file show through).
        self.write_zeroes(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.access
            .flush()
            .and_then(|_| self.access.sync())
            .map_err(|e| BlockError::io(Op::Flush, &self.path, 0, 0, e))
    }

    fn close(&self) -> Result<()> {
        // Clean: every cached table written and synced, then the dirty bit
        // cleared. Otherwise it stays set, and QEMU rebuilds the refcounts.
        use std::sync::atomic::Ordering;
        let _g = match self.marking.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        self.flush()?;
        if self.dirty.load(Ordering::Acquire) {
            set_dirty(&self.path, false)?;
            self.dirty.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check(offset, len)?;
        let (m, got) = self
            .access
            .get_mapping(offset, len)
            .map_err(|e| BlockError::io(Op::BlockStatus, &self.path, offset, len, e))?;
        let status = match m {
            Mapping::Zero { .. } | Mapping::Eof { .. } => Status::Zero,
            _ => Status::Data,
        };
        // Past the end of a shorter backing file: zeroes to the end.
        let got = if got == 0 { len } else { got.min(len) };
        Ok(Extent { status, len: got })
    }

    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        Some(crate::bitmap::Identity::of(&self.path))
    }
}
