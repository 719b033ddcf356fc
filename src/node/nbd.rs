//! An NBD export as a read-only source node (SPEC §9): reads split to the
//! server's maximum request, `base:allocation` block status (ranges the
//! server reports as zeros cost no reads), and a pool of connections: as
//! many as there are readers when the server advertises multi-conn, else
//! one that the readers share (a server may serve one client at a time). A
//! connection that fails is dropped, not reused: the next request (a retry
//! under `--on-source-error retry`) connects again.

use super::{BlockNode, Extent, Status};
use crate::error::{BlockError, Op, Result};
use crate::nbd::client::{Client, ClientError, NbdUri};
use crate::nbd::proto::{NBD_FLAG_CAN_MULTI_CONN, NBD_STATE_ZERO};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

/// The context that tells holes and zeros.
const ALLOCATION: &str = "base:allocation";

/// A read-only NBD export.
pub struct NbdNode {
    uri: NbdUri,
    /// The URI as given: the name in messages.
    name: PathBuf,
    size: u64,
    cluster: u64,
    max_request: usize,
    /// Connections at most (1 without multi-conn).
    max_conns: usize,
    /// Idle connections, and how many are open in all.
    pool: Mutex<(Vec<Client>, usize)>,
    returned: Condvar,
}

/// Connections per export when the server allows several.
const MULTI_CONN: usize = 8;

fn io_error(op: Op, name: &Path, offset: u64, len: u64, e: ClientError) -> BlockError {
    let source = match e {
        ClientError::Io(io) => io,
        other => std::io::Error::other(other.to_string()),
    };
    BlockError::io(op, name, offset, len, source)
}

impl NbdNode {
    /// Connect to `uri` (given as `name`) and learn the export's size.
    pub fn open(uri: NbdUri, name: &str) -> Result<NbdNode> {
        let name = PathBuf::from(name);
        let c =
            Client::connect(&uri, &[ALLOCATION]).map_err(|e| io_error(Op::Open, &name, 0, 0, e))?;
        let (_, preferred, max) = c.info.block_size;
        Ok(NbdNode {
            size: c.info.size,
            cluster: u64::from(preferred.clamp(512, 2 << 20)).next_power_of_two(),
            max_request: (max.clamp(4096, 32 << 20)) as usize,
            max_conns: if c.info.flags & NBD_FLAG_CAN_MULTI_CONN != 0 {
                MULTI_CONN
            } else {
                1
            },
            uri,
            name,
            pool: Mutex::new((vec![c], 1)),
            returned: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, (Vec<Client>, usize)> {
        match self.pool.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// An idle connection, or a new one while fewer than `max_conns` are
    /// open, or the next one returned.
    fn take(&self, offset: u64, len: u64) -> Result<Client> {
        let mut g = self.lock();
        loop {
            if let Some(c) = g.0.pop() {
                return Ok(c);
            }
            if g.1 < self.max_conns {
                g.1 += 1;
                drop(g);
                return Client::connect(&self.uri, &[ALLOCATION]).map_err(|e| {
                    self.lock().1 -= 1;
                    io_error(Op::Open, &self.name, offset, len, e)
                });
            }
            g = match self.returned.wait(g) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// Give `c` back (`Some`), or account for a closed one (`None`).
    fn give_back(&self, c: Option<Client>) {
        let mut g = self.lock();
        match c {
            Some(c) => g.0.push(c),
            None => g.1 -= 1,
        }
        drop(g);
        self.returned.notify_one();
    }

    /// Run `f` on an idle connection (or a new one); a connection whose
    /// request failed is closed.
    fn with_client<T>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, ClientError>,
    ) -> Result<T> {
        let mut c = self.take(offset, len)?;
        match f(&mut c) {
            Ok(v) => {
                self.give_back(Some(c));
                Ok(v)
            }
            // A refused request leaves the connection usable; anything else
            // closes it.
            Err(e @ ClientError::Request { .. }) => {
                self.give_back(Some(c));
                Err(io_error(op, &self.name, offset, len, e))
            }
            Err(e) => {
                self.give_back(None);
                Err(io_error(op, &self.name, offset, len, e))
            }
        }
    }
}

impl BlockNode for NbdNode {
    fn path(&self) -> &Path {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        self.cluster
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        super::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        for (k, part) in buf.chunks_mut(self.max_request).enumerate() {
            let at = offset + (k * self.max_request) as u64;
            let len = part.len() as u64;
            self.with_client(Op::Read, at, len, |c| c.read(at, part))?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        super::check_range(&self.name, offset, len, self.size)?;
        let ask = len.min(u64::from(u32::MAX) & !0xfff).max(1) as u32;
        let first = self.with_client(Op::BlockStatus, offset, len, |c| {
            match c.context(ALLOCATION) {
                Some(id) => c.block_status(offset, ask, id).map(|d| d.first().copied()),
                None => Ok(None),
            }
        })?;
        Ok(match first {
            Some((n, flags)) => Extent {
                status: if flags & NBD_STATE_ZERO != 0 {
                    Status::Zero
                } else {
                    Status::Data
                },
                len: u64::from(n).min(len).max(1),
            },
            // No allocation information: everything is data.
            None => Extent {
                status: Status::Data,
                len,
            },
        })
    }
}
