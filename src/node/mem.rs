//! An image held in memory: a node with no file behind it, for the unit
//! and property tests of the layers above (block-copy, copy-before-write)
//! and for anything that needs a scratch disk of known content.

use super::{BlockNode, Extent, Status, WriteFlags, check_range};
use crate::error::Result;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// A fixed-size image in memory.
pub struct MemNode {
    // set at creation
    name: PathBuf,
    cluster: u64,
    // behind a lock
    bytes: Mutex<Vec<u8>>,
}

impl MemNode {
    /// An image holding `bytes`, named `name` in messages, with allocation
    /// granularity `cluster` (a power of two).
    pub fn new(name: &str, bytes: Vec<u8>, cluster: u64) -> MemNode {
        MemNode {
            name: PathBuf::from(name),
            cluster,
            bytes: Mutex::new(bytes),
        }
    }

    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        match self.bytes.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes().clone()
    }

    fn fill(&self, offset: u64, len: u64) -> Result<()> {
        let mut b = self.bytes();
        check_range(&self.name, offset, len, b.len() as u64)?;
        b[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

impl BlockNode for MemNode {
    fn path(&self) -> &Path {
        &self.name
    }

    fn size(&self) -> u64 {
        self.bytes().len() as u64
    }

    fn cluster_size(&self) -> u64 {
        self.cluster
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = self.bytes();
        check_range(&self.name, offset, buf.len() as u64, b.len() as u64)?;
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_with(offset, buf, WriteFlags::default())
    }

    fn write_with(&self, offset: u64, buf: &[u8], _flags: WriteFlags) -> Result<()> {
        let mut b = self.bytes();
        check_range(&self.name, offset, buf.len() as u64, b.len() as u64)?;
        b[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.fill(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.fill(offset, len)
    }

    /// Zero for a run of clusters that hold only zeros, data otherwise.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let b = self.bytes();
        check_range(&self.name, offset, len, b.len() as u64)?;
        let end = offset + len;
        let status_at = |pos: u64| {
            let next = ((pos / self.cluster + 1) * self.cluster).min(end);
            let zero = super::is_zero(&b[pos as usize..next as usize]);
            (if zero { Status::Zero } else { Status::Data }, next)
        };
        let (status, mut pos) = status_at(offset);
        while pos < end {
            let (s, next) = status_at(pos);
            if s != status {
                break;
            }
            pos = next;
        }
        Ok(Extent {
            status,
            len: pos - offset,
        })
    }
}
