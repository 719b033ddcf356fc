//! Block nodes: every image, filter and target is a node behind one trait.
//!
//! # Contract of [`BlockNode`]
//!
//! * Synchronous and `&self`: rayon copy workers and the simulated guest call
//!   a node from many threads at once. Nodes keep fixed facts (size, cluster
//!   size, path) outside any lock.
//! * Offsets and lengths are in bytes. A request must lie inside
//!   `[0, size())`; a request past the end fails with
//!   [`BlockError::OutOfRange`]. No alignment is required by the trait, but a
//!   node may refuse a shape it cannot serve (the new-qcow2 writer takes
//!   cluster-aligned writes only) with [`BlockError::Unaligned`].
//! * `read` fills the whole buffer or fails: there are no short reads.
//! * `block_status` answers for **this layer only** and may cover less than
//!   was asked: it returns the status of a prefix `[offset, offset + len')`
//!   with `0 < len' <= len`. `Unallocated` means "this layer holds nothing
//!   here; ask the layer below" (for a whole image, nothing below either, so
//!   it reads as zeros).
//! * Writes (`write`, `write_zeroes`, `discard`) fail with
//!   [`BlockError::ReadOnly`] on read-only nodes; `flush` makes every
//!   completed write durable.

pub mod cbw;
pub mod chain;
pub mod fault;
pub mod frozen;
pub mod graph;
pub mod marking;
pub mod mem;
pub mod nbd;
pub mod overlay;
pub mod probe;
pub mod qcow2;
pub mod ranges;
pub mod raw;
pub mod slot;

use crate::error::{BlockError, Op, Result};
use std::path::Path;
use std::sync::Arc;

/// What a range of a node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Data is stored here (it may still happen to be zeros).
    Data,
    /// This layer knows the range reads as zeros.
    Zero,
    /// This layer holds nothing; the layer below decides.
    Unallocated,
}

/// The answer of [`BlockNode::block_status`]: a status for `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// What the range holds.
    pub status: Status,
    /// How many bytes the answer covers.
    pub len: u64,
}

/// How a write is to be stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Store the data compressed where the node can.
    pub compress: bool,
}

/// One node of the block graph. See the module documentation for the contract.
pub trait BlockNode: Send + Sync {
    /// The file (or a description) this node stands for, used in messages.
    fn path(&self) -> &Path;

    /// Virtual size in bytes. Fixed for the life of the node.
    fn size(&self) -> u64;

    /// Allocation granularity in bytes (a power of two): the qcow2 cluster
    /// size, or 512 for raw files.
    fn cluster_size(&self) -> u64;

    /// Read `buf.len()` bytes at `offset`, filling `buf` completely.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write `buf` at `offset`.
    fn write(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(BlockError::ReadOnly {
            path: self.path().to_path_buf(),
            op: Op::Write,
        })
    }

    /// Write `buf` at `offset` with `flags` (compressed, where the node
    /// can: a new qcow2 image); a node that has no use for a flag ignores it.
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let _ = flags;
        self.write(offset, buf)
    }

    /// Make `[offset, offset + len)` read as zeros.
    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(BlockError::ReadOnly {
            path: self.path().to_path_buf(),
            op: Op::WriteZeroes,
        })
    }

    /// Drop the data of `[offset, offset + len)`; it reads as zeros afterwards.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(BlockError::ReadOnly {
            path: self.path().to_path_buf(),
            op: Op::Discard,
        })
    }

    /// Make every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Flush and leave the file a clean image once its writer is done (a
    /// qcow2 written in place gets its dirty bit cleared; a later write
    /// sets it again). Called on the node that owns the file; filters do
    /// not forward it.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Status of a prefix of `[offset, offset + len)`, for this layer only.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;

    /// [`BlockNode::block_status`] for a reader that reads what is
    /// allocated anyway: data may be reported where the host file has a
    /// hole (it reads as zeros), which saves a format layer asking the host
    /// file (`SEEK_DATA`) at every extent. Zero and unallocated answers are
    /// as exact as `block_status`'s.
    fn allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        self.block_status(offset, len)
    }

    /// Walk `[start, end)` extent by extent in offset order, calling `f`
    /// for each: [`BlockNode::block_status`], or [`BlockNode::allocation`]
    /// when `fast`. The extents cover the range without gaps; adjacent ones
    /// may have the same status. A node that can map a range more cheaply
    /// than one call per extent (a backing chain) overrides it.
    fn walk_extents(
        &self,
        start: u64,
        end: u64,
        fast: bool,
        f: &mut dyn FnMut(u64, Extent),
    ) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let ext = if fast {
                self.allocation(pos, end - pos)?
            } else {
                self.block_status(pos, end - pos)?
            };
            f(pos, ext);
            pos += ext.len;
        }
        Ok(())
    }

    /// The identity (size, modification time, inode, device) of the file
    /// this node stores its data in, taken now: how "did the source change
    /// while it was read" is asked. `None` for a node with no file of its
    /// own behind it (an image in memory, a network export); filters and
    /// chains answer for the node they stand for.
    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        None
    }

    /// For an in-kernel copy (`copy_file_range`) of `[offset, offset+len)`
    /// out of this node: the file whose bytes at those offsets are the
    /// node's bytes (a plain raw file), or None (the caller reads the bytes
    /// itself). Filters that can fail a read (fault injection) decide here,
    /// as for a read.
    fn copy_source(&self, _offset: u64, _len: u64) -> Result<Option<&std::fs::File>> {
        Ok(None)
    }

    /// Copy `[offset, offset+len)` of `src` (a file from
    /// [`BlockNode::copy_source`]) to the same place in this node inside the
    /// kernel. `Ok(false)` when this node cannot (not a plain raw file, or
    /// the file systems cannot copy between them): the caller then copies
    /// the bytes itself. Filters that can fail a write decide here, as for a
    /// write. Bytes past the end of `src` are not copied (they read as
    /// zeros already).
    fn copy_range_from(&self, _src: &std::fs::File, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }
}

/// A filter: a node over one child that passes every request on unless it
/// has something to add. Implement [`Filter::child`] and override only
/// what the filter changes; [`BlockNode`] comes with it. Writes arrive at
/// [`Filter::write_with`] only, so a filter cannot miss one.
pub trait Filter: Send + Sync {
    /// The node below.
    fn child(&self) -> &Arc<dyn BlockNode>;

    /// See [`BlockNode::path`].
    fn path(&self) -> &Path {
        self.child().path()
    }
    /// See [`BlockNode::size`].
    fn size(&self) -> u64 {
        self.child().size()
    }
    /// See [`BlockNode::cluster_size`].
    fn cluster_size(&self) -> u64 {
        self.child().cluster_size()
    }
    /// See [`BlockNode::read`].
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.child().read(offset, buf)
    }
    /// See [`BlockNode::write_with`]: every write of a filter arrives here
    /// (a plain [`BlockNode::write`] has empty flags).
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.child().write_with(offset, buf, flags)
    }
    /// See [`BlockNode::write_zeroes`].
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.child().write_zeroes(offset, len)
    }
    /// See [`BlockNode::discard`].
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.child().discard(offset, len)
    }
    /// See [`BlockNode::flush`].
    fn flush(&self) -> Result<()> {
        self.child().flush()
    }
    /// See [`BlockNode::block_status`].
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.child().block_status(offset, len)
    }
    /// See [`BlockNode::identity`].
    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        self.child().identity()
    }
    /// See [`BlockNode::copy_source`].
    fn copy_source(&self, offset: u64, len: u64) -> Result<Option<&std::fs::File>> {
        self.child().copy_source(offset, len)
    }
    /// See [`BlockNode::copy_range_from`].
    fn copy_range_from(&self, src: &std::fs::File, offset: u64, len: u64) -> Result<bool> {
        self.child().copy_range_from(src, offset, len)
    }
}

impl<F: Filter> BlockNode for F {
    fn path(&self) -> &Path {
        Filter::path(self)
    }
    fn size(&self) -> u64 {
        Filter::size(self)
    }
    fn cluster_size(&self) -> u64 {
        Filter::cluster_size(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Filter::read(self, offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Filter::write_with(self, offset, buf, WriteFlags::default())
    }
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        Filter::write_with(self, offset, buf, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Filter::write_zeroes(self, offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Filter::discard(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Filter::flush(self)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        Filter::block_status(self, offset, len)
    }
    fn copy_source(&self, offset: u64, len: u64) -> Result<Option<&std::fs::File>> {
        Filter::copy_source(self, offset, len)
    }
    fn copy_range_from(&self, src: &std::fs::File, offset: u64, len: u64) -> Result<bool> {
        Filter::copy_range_from(self, src, offset, len)
    }
    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        Filter::identity(self)
    }
}

/// Copy `[offset, offset+len)` from one raw file to the same place in
/// another inside the kernel (`copy_file_range`). Bytes past the end of the
/// source file are not copied (the target reads them as zeros already).
/// `Ok(false)` when the kernel cannot copy between these files (different
/// file systems that do not support it, special files) and nothing was
/// copied yet.
pub fn copy_file_range(
    src: &std::fs::File,
    dst: &std::fs::File,
    offset: u64,
    len: u64,
) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let mut done = 0u64;
    while done < len {
        let mut off_in = (offset + done) as libc::loff_t;
        let mut off_out = (offset + done) as libc::loff_t;
        // SAFETY: both descriptors are open; the offsets are our locals.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                (len - done) as usize,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            let unsupported = matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            );
            if unsupported && done == 0 {
                return Ok(false);
            }
            return Err(e);
        }
        if n == 0 {
            break; // end of the source file
        }
        done += n as u64;
    }
    Ok(true)
}

/// Walk `[start, end)` of `node` extent by extent, calling `f(offset,
/// extent)` for each.
pub fn for_each_extent(
    node: &dyn BlockNode,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, Extent),
) -> Result<()> {
    node.walk_extents(start, end, false, &mut f)
}

/// [`for_each_extent`] with [`BlockNode::allocation`]: data over host
/// holes counts as data.
pub fn for_each_allocation(
    node: &dyn BlockNode,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, Extent),
) -> Result<()> {
    node.walk_extents(start, end, true, &mut f)
}

/// Check that `[offset, offset + len)` lies inside a node of `size` bytes.
pub fn check_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

/// Start writing back `[offset, offset+len)` of `file` without waiting for
/// it, so the device works while the copy goes on and the final flush only
/// waits for the tail. Failures are ignored here: the final flush reports
/// them.
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Buffered writes to one file, one request at a time. Linux takes the
/// file's inode lock for every buffered write, and a second writer waiting
/// for it may spin on the CPU while the first copies its bytes (measured on
/// a 2-core VM: up to 5 CPU-s of a 1.4 s full backup, when the host
/// preempts the lock holder); waiting here sleeps instead, and a whole
/// request's pieces go through under one turn, so a turn changes hands
/// once per request, not once per piece. Block devices take no such lock
/// for buffered writes: their gate ([`WriteGate::open`]) lets writers
/// through together.
#[derive(Debug)]
pub struct WriteGate(Option<std::sync::Mutex<()>>);

impl Default for WriteGate {
    fn default() -> WriteGate {
        WriteGate(Some(std::sync::Mutex::new(())))
    }
}

impl WriteGate {
    /// A gate that never makes a writer wait.
    pub fn open() -> WriteGate {
        WriteGate(None)
    }

    /// Write each of `pieces` (data, file offset) into `file`, alone
    /// among this gate's writers; the first failure ends it with the
    /// piece's offset and length.
    pub fn write_pieces<'a>(
        &self,
        file: &std::fs::File,
        pieces: impl IntoIterator<Item = (&'a [u8], u64)>,
    ) -> std::result::Result<(), (u64, usize, std::io::Error)> {
        use std::os::unix::fs::FileExt;
        let _turn = self
            .0
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        for (buf, at) in pieces {
            file.write_all_at(buf, at).map_err(|e| (at, buf.len(), e))?;
        }
        Ok(())
    }

    /// Write all of `buf` at `offset` of `file` under one turn.
    pub fn write(&self, file: &std::fs::File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_pieces(file, [(buf, offset)])
            .map_err(|(_, _, e)| e)
    }
}

/// True when every byte of `buf` is zero. Word-at-a-time; costs far less
/// than the copy it saves.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = unsafe {
        // SAFETY: u64 has no invalid bit patterns and `align_to` only
        // reinterprets the aligned middle part of the byte slice.
        buf.align_to::<u64>()
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body
            .chunks(8)
            .all(|c| c.iter().fold(0u64, |acc, &w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        for i in [0, 1, 7, 8, 63, 64, 2048, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
