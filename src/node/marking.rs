//! A node that reports every write (write, write-zeroes, discard) before it
//! passes it on: how dirty bitmaps learn about writes, in a job (the
//! successor) and in the `guest` command (every enabled bitmap).

use super::{BlockNode, Filter, WriteFlags};
use crate::error::Result;
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

impl Filter for MarkingNode {
    fn child(&self) -> &Arc<dyn BlockNode> {
        &self.inner
    }
    fn write_with(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        (self.mark)(offset, buf.len() as u64);
        self.inner.write_with(offset, buf, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (self.mark)(offset, len);
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (self.mark)(offset, len);
        self.inner.discard(offset, len)
    }
    fn copy_range_from(&self, _src: &std::fs::File, _offset: u64, _len: u64) -> Result<bool> {
        // Writes must be marked one by one: copy through memory.
        Ok(false)
    }
}
