//! Raw image files: pread/pwrite, SEEK_DATA/SEEK_HOLE for block status,
//! hole punching for write-zeroes and discard.

use super::{BlockNode, Extent, Status, check_range};
use crate::error::{BlockError, Op, Result};
use crate::files::Kind;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// What the file holds at `[offset, end)` (a prefix of it), from
/// SEEK_DATA/SEEK_HOLE: data, or a hole (zeros). `file_len` is where the
/// file ends. File systems without SEEK_DATA report all data.
pub fn host_extent(file: &File, offset: u64, end: u64, file_len: u64) -> Extent {
    let seek = |whence: libc::c_int| -> io::Result<u64> {
        // SAFETY: lseek only moves the descriptor's position; every read and
        // write here is positional (pread/pwrite), so that position is unused.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let len = end - offset;
    if offset >= file_len {
        return Extent {
            status: Status::Zero,
            len,
        };
    }
    let data = match seek(libc::SEEK_DATA) {
        Ok(d) => d,
        // No data at or after offset: the rest is a hole.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Extent {
                status: Status::Zero,
                len,
            };
        }
        Err(_) => {
            return Extent {
                status: Status::Data,
                len,
            };
        }
    };
    if data > offset {
        return Extent {
            status: Status::Zero,
            len: data.min(end) - offset,
        };
    }
    let hole = seek(libc::SEEK_HOLE).unwrap_or(file_len).max(offset + 1);
    Extent {
        status: Status::Data,
        len: hole.min(end) - offset,
    }
}

/// The largest single `pwrite` to a raw file.
const WRITE_PIECE: usize = 256 << 10;

/// A raw file. Its virtual size is the file size rounded up to 512 bytes, as
/// QEMU reports it; the bytes past the end of the file read as zeros.
#[derive(Debug)]
pub struct RawNode {
    // set at open
    path: PathBuf,
    file: File,
    file_len: u64,
    size: u64,
    writable: bool,
    /// A block device: its size comes from the kernel, it has no holes to
    /// find (everything is data), and zeroing writes zeros into it.
    device: bool,
    /// Data writes take turns (see [`crate::node::WriteGate`]).
    gate: super::WriteGate,
}

impl RawNode {
    /// Open an existing raw image read-only (a regular file or a block
    /// device).
    pub fn open(path: &Path) -> Result<RawNode> {
        let (file, kind) = crate::node::probe::open_file(path)?;
        Self::from_image_file(path, file, kind)
    }

    /// A read-only node over an open image file of `kind`.
    pub fn from_image_file(path: &Path, file: File, kind: Kind) -> Result<RawNode> {
        match kind {
            Kind::Regular => Self::from_file(path, file, false),
            Kind::Block => Self::device(path, file, false),
        }
    }

    /// A writable node over an open block device (`restore` onto a device).
    pub fn device_for_writing(path: &Path, file: File) -> Result<RawNode> {
        Self::device(path, file, true)
    }

    fn device(path: &Path, file: File, writable: bool) -> Result<RawNode> {
        let len = crate::files::device_size(&file)
            .map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
        Ok(RawNode {
            path: path.to_path_buf(),
            file,
            file_len: len,
            size: len,
            writable,
            device: true,
            gate: super::WriteGate::open(),
        })
    }

    /// Wrap an open regular file. `writable` nodes accept writes.
    pub fn from_file(path: &Path, file: File, writable: bool) -> Result<RawNode> {
        let meta = file
            .metadata()
            .map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
        if !meta.is_file() {
            return Err(BlockError::Invalid {
                path: path.to_path_buf(),
                detail: "is not a regular file".into(),
            });
        }
        let file_len = meta.len();
        let size = if writable {
            file_len
        } else {
            file_len.div_ceil(512) * 512
        };
        Ok(RawNode {
            path: path.to_path_buf(),
            file,
            file_len,
            size,
            writable,
            device: false,
            gate: super::WriteGate::default(),
        })
    }

    /// The length of the file (or device) on the host.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Create `path` afresh (a file there is unlinked first, never followed)
    /// as a sparse raw image of `size` bytes, mode 0600.
    pub fn create(path: &Path, size: u64) -> Result<RawNode> {
        let file = crate::files::unlink_leftover(path)
            .and_then(|_| crate::files::create_new(path, 0o600))
            .map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
        Self::create_in(path, file, size)
    }

    /// Make the new, empty `file` (at `path`) a sparse raw image of `size`
    /// bytes. The file grows as it is written (file systems allocate appends
    /// faster than writes into a hole) and gets its full length on `flush`.
    pub fn create_in(path: &Path, file: File, size: u64) -> Result<RawNode> {
        // Check now that the file system and limits take a file this long.
        file.set_len(size)
            .and_then(|_| file.set_len(0))
            .map_err(|e| BlockError::io(Op::Write, path, 0, size, e))?;
        let mut node = Self::from_file(path, file, true)?;
        node.size = size;
        node.file_len = size;
        Ok(node)
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_writable(&self, op: Op) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(BlockError::ReadOnly {
                path: self.path.clone(),
                op,
            })
        }
    }

    /// Punch a hole; falls back to writing zeros where the file system cannot.
    fn punch(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        // SAFETY: plain syscall on a file descriptor we own; no pointers.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(zeros.len() as u64) as usize;
                    self.file
                        .write_all_at(&zeros[..n], pos)
                        .map_err(|e| BlockError::io(op, &self.path, pos, n as u64, e))?;
                    pos += n as u64;
                }
                Ok(())
            }
            _ => Err(BlockError::io(op, &self.path, offset, len, err)),
        }
    }
}

impl BlockNode for RawNode {
    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        Some(crate::bitmap::Identity::of(self.path()))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        512
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        let in_file = self.file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(in_file);
        if !head.is_empty() && self.writable {
            // A new file: what was not written yet reads as zeros.
            let mut done = 0;
            while done < head.len() {
                match self.file.read_at(&mut head[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(BlockError::io(
                            Op::Read,
                            &self.path,
                            offset,
                            head.len() as u64,
                            e,
                        ));
                    }
                }
            }
            head[done..].fill(0);
        } else if !head.is_empty() {
            self.file.read_exact_at(head, offset).map_err(|e| {
                let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ended early (was it truncated while in use?)",
                    )
                } else {
                    e
                };
                BlockError::io(Op::Read, &self.path, offset, head.len() as u64, e)
            })?;
        }
        tail.fill(0);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable(Op::Write)?;
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        // Large buffered writes at large aligned offsets are much slower on
        // ext4 (large folios) than the same bytes in 256 KiB pieces.
        let pieces = buf
            .chunks(WRITE_PIECE)
            .enumerate()
            .map(|(k, piece)| (piece, offset + (k * WRITE_PIECE) as u64));
        self.gate
            .write_pieces(&self.file, pieces)
            .map_err(|(at, len, e)| BlockError::io(Op::Write, &self.path, at, len as u64, e))?;
        super::start_writeback(&self.file, offset, buf.len() as u64);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(Op::WriteZeroes)?;
        check_range(&self.path, offset, len, self.size)?;
        self.punch(Op::WriteZeroes, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable(Op::Discard)?;
        check_range(&self.path, offset, len, self.size)?;
        self.punch(Op::Discard, offset, len)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.device {
            return self
                .file
                .sync_all()
                .map_err(|e| BlockError::io(Op::Flush, &self.path, 0, self.size, e));
        }
        let len = self
            .file
            .metadata()
            .map_err(|e| BlockError::io(Op::Flush, &self.path, 0, self.size, e))?
            .len();
        if len < self.size {
            self.file
                .set_len(self.size)
                .map_err(|e| BlockError::io(Op::Write, &self.path, 0, self.size, e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| BlockError::io(Op::Flush, &self.path, 0, self.size, e))
    }

    fn copy_source(&self, offset: u64, len: u64) -> Result<Option<&File>> {
        check_range(&self.path, offset, len, self.size)?;
        Ok((!self.device).then_some(&self.file))
    }

    fn copy_range_from(&self, src: &File, offset: u64, len: u64) -> Result<bool> {
        self.check_writable(Op::Write)?;
        check_range(&self.path, offset, len, self.size)?;
        if self.device {
            return Ok(false);
        }
        let done = super::copy_file_range(src, &self.file, offset, len)
            .map_err(|e| BlockError::io(Op::Write, &self.path, offset, len, e))?;
        if done {
            super::start_writeback(&self.file, offset, len);
        }
        Ok(done)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, offset, len, self.size)?;
        if self.device {
            // No holes to find on a device: the copy's zero detection
            // keeps zero clusters out of the target.
            return Ok(Extent {
                status: Status::Data,
                len,
            });
        }
        let end = offset + len;
        if offset >= self.file_len {
            return Ok(Extent {
                status: Status::Zero,
                len,
            });
        }
        Ok(host_extent(&self.file, offset, end, self.file_len))
    }
}
