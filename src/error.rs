//! Typed errors of the block layer.
//!
//! Each error describes its own layer only (the operation, the file, the
//! offset); the underlying cause sits in `#[source]`, so a caller that prints
//! the chain prints every layer once. Policies look at [`BlockError::errno`]
//! to tell ENOSPC from EIO.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The kind of request that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Opening the file.
    Open,
    /// A read.
    Read,
    /// A write.
    Write,
    /// A write-zeroes.
    WriteZeroes,
    /// A discard.
    Discard,
    /// A flush.
    Flush,
    /// A block-status query.
    BlockStatus,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write-zeroes",
            Op::Discard => "discard",
            Op::Flush => "flush",
            Op::BlockStatus => "block-status",
        })
    }
}

/// An error from a block node.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An I/O request on a file failed (or returned fewer bytes than asked).
    #[error("{}", describe_io(*op, path, *offset, *len))]
    Io {
        /// The operation.
        op: Op,
        /// The file.
        path: PathBuf,
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        #[source]
        /// The source.
        source: io::Error,
    },
    /// The image's metadata is invalid (found while opening or reading it).
    #[error("{}: corrupt image{}: {detail}", path.display(), fmt_offset(*offset))]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset in the image.
        offset: Option<u64>,
        /// What is wrong, in words.
        detail: String,
    },
    /// The image uses a feature imgbackup does not implement.
    #[error("{}: unsupported: {detail}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        detail: String,
    },
    /// The file is not what it was asked to be (not an image, wrong format).
    #[error("{}: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        detail: String,
    },
    /// A request outside the node's range.
    #[error("{}: request at offset {offset} of {len} bytes is outside the image ({size} bytes)", path.display())]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Size of the image, bytes.
        size: u64,
    },
    /// A write to a node opened read-only.
    #[error("{}: {op} refused: the node is read-only", path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
        /// The operation.
        op: Op,
    },
    /// A request the node cannot serve in this shape (for example an unaligned
    /// write into a new qcow2 file).
    #[error("{}: {detail}", path.display())]
    Unaligned {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        detail: String,
    },
    /// A failure injected by `--inject` (a fault-injection node).
    #[error("{op} of {len} bytes at offset {offset} failed in {}: {} (injected by --inject {rule})", path.display(), io::Error::from_raw_os_error(*errno))]
    Injected {
        /// The operation.
        op: Op,
        /// The file.
        path: PathBuf,
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The errno given.
        errno: i32,
        /// The --inject rule.
        rule: String,
    },
    /// A copy-before-write did not finish in time (`--cbw-timeout`).
    #[error(
        "copy-before-write of {len} bytes at offset {offset} timed out after {waited_ms} ms (--cbw-timeout)"
    )]
    CbwTimeout {
        /// Byte offset in the image.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// How long the write waited, ms.
        waited_ms: u64,
    },
    /// A guest write was refused because its copy-before-write failed
    /// (`--on-cbw-error break-guest-write`).
    #[error("guest write at offset {offset} refused: its copy-before-write failed")]
    CbwFailed {
        /// Byte offset in the image.
        offset: u64,
        /// Why the copy failed.
        #[source]
        source: Box<crate::copy::CopyError>,
    },
    /// The file changed while it was read (something wrote it without
    /// honouring the locks).
    #[error("{} changed while it was backed up (its size, modification time or inode differ from the start): something wrote it without honouring the image locks", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
}

fn describe_io(op: Op, path: &std::path::Path, offset: u64, len: u64) -> String {
    match op {
        Op::Open => format!("cannot open {}", path.display()),
        Op::Flush => format!("cannot flush {}", path.display()),
        _ => format!(
            "{op} of {len} bytes at offset {offset} failed in {}",
            path.display()
        ),
    }
}

fn fmt_offset(offset: Option<u64>) -> String {
    match offset {
        Some(o) => format!(" at offset {o}"),
        None => String::new(),
    }
}

impl BlockError {
    /// Build an I/O error.
    pub fn io(op: Op, path: impl Into<PathBuf>, offset: u64, len: u64, source: io::Error) -> Self {
        BlockError::Io {
            op,
            path: path.into(),
            offset,
            len,
            source,
        }
    }

    /// The errno of the underlying I/O error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BlockError::Io { source, .. } => source.raw_os_error(),
            BlockError::Injected { errno, .. } => Some(*errno),
            BlockError::CbwTimeout { .. } => Some(libc::ETIMEDOUT),
            _ => None,
        }
    }

    /// The offset in the image where the error applies, if known.
    pub fn offset(&self) -> Option<u64> {
        match self {
            BlockError::Io { offset, .. } => Some(*offset),
            BlockError::Corrupt { offset, .. } => *offset,
            BlockError::OutOfRange { offset, .. } => Some(*offset),
            BlockError::Injected { offset, .. } => Some(*offset),
            BlockError::CbwTimeout { offset, .. } => Some(*offset),
            BlockError::CbwFailed { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    /// True for errors that mean "the input is not something imgbackup can
    /// back up" rather than a failing device.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, BlockError::Unsupported { .. })
    }
}

/// A result of a block-layer operation.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// "a: b: c" for an error and its sources, for one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
