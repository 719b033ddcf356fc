//! The copy-before-write filter node (QEMU's block/copy-before-write.c).
//!
//! It sits in front of the active disk. Reads pass through. Before a write,
//! write-zeroes or discard reaches clusters that the job has not copied yet,
//! the filter has the shared block-copy state copy their old data to the
//! target ([`BlockCopy::copy_before_write`]), then lets the request through.
//! The filter decides *when* to copy; the block-copy state owns the copy
//! bitmap, the in-flight ranges and the progress.
//!
//! A failed copy-before-write either fails the guest request
//! ([`OnCbwError::BreakGuestWrite`], the snapshot stays intact) or breaks the
//! snapshot ([`OnCbwError::BreakSnapshot`]): the request proceeds, every later
//! request passes straight through, and the job fails.

use super::{BlockNode, Filter, WriteFlags};
use crate::copy::{BlockCopy, CopyError};
use crate::error::{BlockError, Result};
use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What a failed copy-before-write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCbwError {
    /// The guest write fails; the backup stays consistent.
    BreakGuestWrite,
    /// The guest write proceeds and the job fails.
    BreakSnapshot,
}

/// The copy-before-write filter.
pub struct CbwNode {
    // set at creation
    active: Arc<dyn BlockNode>,
    bcs: Arc<BlockCopy>,
    on_error: OnCbwError,
    timeout: Option<Duration>,
    // atomic
    /// Guest requests refused because their copy failed.
    pub refused: AtomicU64,
}

thread_local! {
    static CBW_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl CbwNode {
    /// A filter in front of `active` that copies through `bcs`.
    pub fn new(
        active: Arc<dyn BlockNode>,
        bcs: Arc<BlockCopy>,
        on_error: OnCbwError,
        timeout: Option<Duration>,
    ) -> CbwNode {
        CbwNode {
            active,
            bcs,
            on_error,
            timeout,
            refused: AtomicU64::new(0),
        }
    }

    /// Copy the old data of `[offset, offset+len)` if the job still needs it.
    fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.bcs.failed() {
            // The snapshot is broken (or the job failed): pass through.
            return Ok(());
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let res = CBW_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            self.bcs.copy_before_write(offset, len, &mut buf, deadline)
        });
        let err = match res {
            Ok(_) => return Ok(()),
            // The job is being cancelled: its target is thrown away, so
            // nothing needs the old data any more. The write goes ahead (a
            // served image's clients never see a backup's cancel).
            Err(CopyError::Cancelled) => return Ok(()),
            Err(e) => e,
        };
        match self.on_error {
            OnCbwError::BreakGuestWrite => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(match err {
                    CopyError::Timeout { waited } => BlockError::CbwTimeout {
                        offset,
                        len,
                        waited_ms: waited.as_millis() as u64,
                    },
                    other => BlockError::CbwFailed {
                        offset,
                        source: Box::new(other),
                    },
                })
            }
            OnCbwError::BreakSnapshot => {
                self.bcs.fail(err);
                Ok(())
            }
        }
    }
}

impl Filter for CbwNode {
    fn child(&self) -> &Arc<dyn BlockNode> {
        &self.active
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.before_write(offset, buf.len() as u64)?;
        self.active.write_with(offset, buf, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.before_write(offset, len)?;
        self.active.write_zeroes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.before_write(offset, len)?;
        self.active.discard(offset, len)
    }

    fn copy_range_from(&self, _src: &std::fs::File, _offset: u64, _len: u64) -> Result<bool> {
        // Every write must pass the copy-before-write: copy through memory.
        Ok(false)
    }
}
