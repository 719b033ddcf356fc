//! The backing chain: a layer stacked over the image below it.
//!
//! Reads go to the top layer where it holds data or zeros and fall through
//! to the backing image where it holds nothing. A backing image shorter than
//! the top reads as zeros past its end; a longer one is cut at the top's
//! size.

use super::{BlockNode, Extent, Status, check_range};
use crate::error::Result;
use std::path::Path;
use std::sync::Arc;

/// A top layer over an optional backing image.
pub struct ChainNode {
    // set at open
    top: Arc<dyn BlockNode>,
    backing: Option<Arc<dyn BlockNode>>,
}

impl ChainNode {
    /// `top` over `backing` (None: zeros below).
    pub fn new(top: Arc<dyn BlockNode>, backing: Option<Arc<dyn BlockNode>>) -> ChainNode {
        ChainNode { top, backing }
    }

    /// The top layer alone.
    pub fn top(&self) -> &Arc<dyn BlockNode> {
        &self.top
    }

    /// [`BlockNode::block_status`], or [`BlockNode::allocation`] when
    /// `fast`, of the whole chain.
    fn status(&self, offset: u64, len: u64, fast: bool) -> Result<Extent> {
        check_range(self.path(), offset, len, self.size())?;
        let ext = if fast {
            self.top.allocation(offset, len)?
        } else {
            self.top.block_status(offset, len)?
        };
        if ext.status != Status::Unallocated {
            return Ok(ext);
        }
        self.below(offset, ext.len, fast)
    }

    /// Status of the backing image for `[offset, offset+len)`, which the top
    /// leaves unallocated ([`BlockNode::allocation`] when `fast`).
    fn below(&self, offset: u64, len: u64, fast: bool) -> Result<Extent> {
        let Some(b) = &self.backing else {
            return Ok(Extent {
                status: Status::Unallocated,
                len,
            });
        };
        let bsize = b.size();
        if offset >= bsize {
            return Ok(Extent {
                status: Status::Unallocated,
                len,
            });
        }
        if fast {
            b.allocation(offset, len.min(bsize - offset))
        } else {
            b.block_status(offset, len.min(bsize - offset))
        }
    }
}

impl BlockNode for ChainNode {
    fn path(&self) -> &Path {
        self.top.path()
    }

    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        self.top.identity()
    }

    fn size(&self) -> u64 {
        self.top.size()
    }

    fn cluster_size(&self) -> u64 {
        self.top.cluster_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.path(), offset, buf.len() as u64, self.size())?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let ext = self.top.allocation(pos, end - pos)?;
            let out = &mut buf[(pos - offset) as usize..(pos - offset + ext.len) as usize];
            match ext.status {
                Status::Data => self.top.read(pos, out)?,
                Status::Zero => out.fill(0),
                Status::Unallocated => match &self.backing {
                    Some(b) if pos < b.size() => {
                        let n = (b.size() - pos).min(ext.len) as usize;
                        b.read(pos, &mut out[..n])?;
                        out[n..].fill(0);
                    }
                    _ => out.fill(0),
                },
            }
            pos += ext.len;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.top.flush()
    }

    /// The status of the whole image: Data or Zero where some layer holds
    /// the range, Unallocated where none does (reads as zeros).
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.status(offset, len, false)
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        self.status(offset, len, true)
    }
}
