//! A node that reports every write (write, write-zeroes, discard) before it
//! passes it on: how dirty bitmaps learn about writes, in a job (the
//! successor) and in the `guest` command (every enabled bitmap).

use super::{BlockNode, Extent};
use crate::error::Result;
use std::path::Path;
use std::sync::Arc;

/// Called with `(offset, len)` of every write, before the write is issued.
pub type Mark = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Reports writes to `mark`, then passes them to `inner`.
pub struct MarkingNode {
    inner: Arc<dyn BlockNode>,
    mark: Mark,
}

impl MarkingNode {
    /// Mark every write to `inner` with `mark` before it is issued.
    pub fn new(inner: Arc<dyn BlockNode>, mark: Mark) -> MarkingNode {
        MarkingNode { inner, mark }
    }
}

impl BlockNode for MarkingNode {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn cluster_size(&self) -> u64 {
        self.inner.cluster_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        (self.mark)(offset, buf.len() as u64);
        self.inner.write(offset, buf)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (self.mark)(offset, len);
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (self.mark)(offset, len);
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }
}
