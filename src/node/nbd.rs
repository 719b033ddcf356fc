//! An NBD export as a read-only source node (SPEC §9): reads split to the
//! server's maximum request, `base:allocation` block status (ranges the
//! server reports as zeros cost no reads), and connections that carry
//! several requests each: one when the server does not advertise
//! multi-conn (a server may serve one client at a time), else up to one per
//! reader, opened in the background so that a server which accepts fewer
//! never holds a request up. A connection that fails is dropped: the next
//! request (a retry under `--on-source-error retry`) connects again. Under
//! `ignore`, a request whose connection was lost is sent once more, alone
//! (no other request in flight), before it counts as failed.
//!
//! [`NbdNode::allocation`] is the export's own allocation (holes the
//! server reports are unallocated): what `--sync top` copies.

use super::{BlockNode, Extent, Status};
use crate::error::{BlockError, Op, Result};
use crate::nbd::client::{Client, ClientError, NbdUri};
use crate::nbd::proto::{NBD_FLAG_CAN_MULTI_CONN, NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

/// The context that tells holes and zeros.
pub const ALLOCATION: &str = "base:allocation";

/// The metadata context of QEMU's dirty bitmap `name`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// Connections per export at most when the server allows several.
const MULTI_CONN: usize = 4;

/// Extents kept per context at most (about 40 MiB); past it they are
/// asked again.
const MAX_CACHED_EXTENTS: usize = 1 << 20;

/// The largest BLOCK_STATUS request (4 GiB less 4 KiB, aligned).
const MAX_STATUS: u64 = (u32::MAX as u64) & !0xfff;

/// Extents of one context: start -> (end, flags).
type Extents = BTreeMap<u64, (u64, u32)>;

type StopFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// A read-only NBD export.
pub struct NbdNode {
    uri: NbdUri,
    /// The URI as given: the name in messages.
    name: PathBuf,
    contexts: Vec<String>,
    size: u64,
    cluster: u64,
    max_request: usize,
    /// Connections at most (1 without multi-conn).
    max_conns: usize,
    /// Open connections (a background connection attempt adds to it).
    pool: Arc<Mutex<Vec<Arc<Client>>>>,
    /// Held while a reader connects again after every connection failed.
    reconnecting: Mutex<()>,
    /// A background connection attempt is under way.
    connecting: Arc<AtomicBool>,
    next: AtomicUsize,
    /// Asked while a request waits: true abandons it (cancellation).
    stop: OnceLock<StopFn>,
    /// Extents the server described, per context: start -> (end, flags).
    extents: Mutex<HashMap<String, Extents>>,
    /// Re-send, alone, a request that failed because its connection was
    /// lost (see [`NbdNode::isolate_lost_requests`]).
    isolate: AtomicBool,
    /// Held shared by every request in flight, exclusively by a request
    /// sent again alone.
    quiet: RwLock<()>,
    /// READ requests sent, and their bytes.
    reads: AtomicUsize,
    read_bytes: std::sync::atomic::AtomicU64,
}

fn io_error(op: Op, name: &Path, offset: u64, len: u64, e: ClientError) -> BlockError {
    let source = match e {
        ClientError::Io(io) => io,
        ClientError::Stopped => std::io::Error::new(std::io::ErrorKind::Interrupted, e.to_string()),
        other => std::io::Error::other(other.to_string()),
    };
    BlockError::io(op, name, offset, len, source)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl NbdNode {
    /// Connect to `uri` (given as `name`), selecting `base:allocation` and
    /// the `extra` contexts, and learn the export's size. Connecting gives
    /// up after `limit` (None: the client's default).
    pub fn open(
        uri: NbdUri,
        name: &str,
        extra: &[String],
        limit: Option<std::time::Duration>,
    ) -> Result<NbdNode> {
        let name = PathBuf::from(name);
        let mut contexts = vec![ALLOCATION.to_string()];
        contexts.extend(extra.iter().cloned());
        let refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
        let limit = limit.map_or(crate::nbd::client::HANDSHAKE_TIMEOUT, |l| {
            l.min(crate::nbd::client::HANDSHAKE_TIMEOUT)
        });
        let c = Client::connect_within(&uri, &refs, limit)
            .map_err(|e| io_error(Op::Open, &name, 0, 0, e))?;
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
            contexts,
            pool: Arc::new(Mutex::new(vec![Arc::new(c)])),
            reconnecting: Mutex::new(()),
            isolate: AtomicBool::new(false),
            quiet: RwLock::new(()),
            connecting: Arc::new(AtomicBool::new(false)),
            next: AtomicUsize::new(0),
            stop: OnceLock::new(),
            extents: Mutex::new(HashMap::new()),
            reads: AtomicUsize::new(0),
            read_bytes: Default::default(),
        })
    }

    /// Abandon requests waiting for a reply once `stop` says so (a job's
    /// cancellation): a server that stopped answering never holds the job.
    pub fn set_stop(&self, stop: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.stop.set(Arc::new(stop));
    }

    /// Send a request that failed because its connection was lost once
    /// more, alone (no other request in flight, on a connection opened
    /// again), before reporting the failure. QEMU's server drops the
    /// connection when a read fails in its image, and every request in
    /// flight on it fails with the damaged one: under `--on-source-error
    /// ignore` they would all be skipped. Sent alone, only the damaged
    /// one fails again. Off by default: under `report` the first failure
    /// ends the job, and `retry` sends requests again itself.
    pub fn isolate_lost_requests(&self, on: bool) {
        self.isolate.store(on, Ordering::Relaxed);
    }

    /// READ requests sent so far and their bytes.
    pub fn reads(&self) -> (usize, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.read_bytes.load(Ordering::Relaxed),
        )
    }

    /// True if the server selected metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        lock(&self.pool)
            .first()
            .is_some_and(|c| c.context(name).is_some())
    }

    fn connect(&self) -> std::result::Result<Client, ClientError> {
        let refs: Vec<&str> = self.contexts.iter().map(String::as_str).collect();
        Client::connect(&self.uri, &refs)
    }

    /// A connection for the next request: the open ones in turn (a new one
    /// is opened in the background while fewer than `max_conns` are
    /// open); none open (all failed): connect now.
    fn client(&self, offset: u64, len: u64) -> Result<Arc<Client>> {
        let pool = lock(&self.pool);
        if pool.is_empty() {
            drop(pool);
            // One reader connects again; the others wait for it and share
            // its connection (a server taking one client at a time would
            // leave a second connection waiting in its backlog).
            let _one = lock(&self.reconnecting);
            if let Some(c) = lock(&self.pool).first().cloned() {
                return Ok(c);
            }
            let c = Arc::new(
                self.connect()
                    .map_err(|e| io_error(Op::Open, &self.name, offset, len, e))?,
            );
            tracing::info!("{}: connected again", self.name.display());
            let mut pool = lock(&self.pool);
            pool.push(c.clone());
            return Ok(c);
        }
        let c = pool[self.next.fetch_add(1, Ordering::Relaxed) % pool.len()].clone();
        let grow = pool.len() < self.max_conns && c.in_flight() > 0;
        drop(pool);
        if grow && !self.connecting.swap(true, Ordering::SeqCst) {
            self.grow();
        }
        Ok(c)
    }

    /// Open one more connection in the background; it joins the pool when
    /// it is ready (unless the node is gone or the pool full by then).
    fn grow(&self) {
        let (uri, contexts) = (self.uri.clone(), self.contexts.clone());
        let connecting = self.connecting.clone();
        let pool = Arc::downgrade(&self.pool);
        let max = self.max_conns;
        let spawned = std::thread::Builder::new()
            .name("nbd-connect".into())
            .spawn(move || {
                let refs: Vec<&str> = contexts.iter().map(String::as_str).collect();
                match Client::connect(&uri, &refs) {
                    Ok(c) => {
                        if let Some(pool) = pool.upgrade() {
                            let mut g = lock(&pool);
                            if g.len() < max {
                                g.push(Arc::new(c));
                            }
                        }
                    }
                    Err(e) => tracing::debug!("no further NBD connection: {e}"),
                }
                connecting.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.connecting.store(false, Ordering::SeqCst);
        }
    }

    /// Run `f` on a connection; a connection the failure broke leaves the
    /// pool. A request whose connection was lost is sent again alone when
    /// [`NbdNode::isolate_lost_requests`] is on.
    fn with_client<T>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Client, &dyn Fn() -> bool) -> std::result::Result<T, ClientError>,
    ) -> Result<T> {
        if !self.isolate.load(Ordering::Relaxed) {
            return self.attempt(op, offset, len, &mut f).map_err(|(_, e)| e);
        }
        let first = {
            let _shared = self.quiet.read().unwrap_or_else(|p| p.into_inner());
            self.attempt(op, offset, len, &mut f)
        };
        match first {
            Err((true, _)) => {
                let _alone = self.quiet.write().unwrap_or_else(|p| p.into_inner());
                tracing::info!(
                    "{}: the connection was lost; sending the request at offset {offset} again, alone",
                    self.name.display()
                );
                self.attempt(op, offset, len, &mut f).map_err(|(_, e)| e)
            }
            other => other.map_err(|(_, e)| e),
        }
    }

    /// One attempt of [`NbdNode::with_client`]; a failure says whether
    /// the request's connection was lost under it (not a failure the
    /// server replied with, not a connection that could not be opened).
    fn attempt<T>(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        f: &mut impl FnMut(&Client, &dyn Fn() -> bool) -> std::result::Result<T, ClientError>,
    ) -> std::result::Result<T, (bool, BlockError)> {
        let c = self.client(offset, len).map_err(|e| (false, e))?;
        let stop = self.stop.get().cloned();
        let stop = move || stop.as_ref().is_some_and(|s| s());
        match f(&c, &stop) {
            Ok(v) => Ok(v),
            Err(e) => {
                let lost = matches!(e, ClientError::Closed(_) | ClientError::Io(_));
                if e.breaks_connection() || c.is_broken() {
                    lock(&self.pool).retain(|x| !Arc::ptr_eq(x, &c));
                }
                Err((lost, io_error(op, &self.name, offset, len, e)))
            }
        }
    }

    /// The extent of context `ctx` at `offset` (at most `len` bytes):
    /// length and flags. Every extent a reply describes is kept (the
    /// export does not change under a backup), so a walk over the export
    /// asks the server once per reply, not once per extent.
    fn status(&self, ctx: &str, offset: u64, len: u64) -> Result<Option<(u64, u32)>> {
        if let Some(hit) = self.cached(ctx, offset, len) {
            return Ok(Some(hit));
        }
        let ask = len.clamp(1, MAX_STATUS) as u32;
        let got = self.with_client(Op::BlockStatus, offset, len, |c, stop| {
            match c.context(ctx) {
                Some(id) => c.block_status(offset, ask, id, stop).map(Some),
                None => Ok(None),
            }
        })?;
        let Some(descriptors) = got else {
            return Ok(None);
        };
        let mut cache = lock(&self.extents);
        let map = cache.entry(ctx.to_string()).or_default();
        if map.len() > MAX_CACHED_EXTENTS {
            map.clear();
        }
        let mut pos = offset;
        for &(n, flags) in &descriptors {
            let end = pos.saturating_add(u64::from(n)).min(self.size);
            if end <= pos {
                break;
            }
            map.insert(pos, (end, flags));
            pos = end;
        }
        drop(cache);
        let (n, flags) = descriptors[0];
        Ok(Some((u64::from(n).min(len).max(1), flags)))
    }

    /// A kept extent of `ctx` holding `offset`.
    fn cached(&self, ctx: &str, offset: u64, len: u64) -> Option<(u64, u32)> {
        let cache = lock(&self.extents);
        let (_, &(end, flags)) = cache.get(ctx)?.range(..=offset).next_back()?;
        (offset < end).then(|| ((end - offset).min(len).max(1), flags))
    }

    /// The dirty ranges of QEMU's bitmap `name` (the export must have been
    /// opened with [`dirty_bitmap_context`]`(name)`), merged, in order.
    pub fn dirty_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let ctx = dirty_bitmap_context(name);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            let Some((n, flags)) = self.status(&ctx, pos, self.size - pos)? else {
                return Err(BlockError::Unsupported {
                    path: self.name.clone(),
                    detail: format!("the server does not offer the metadata context {ctx}"),
                });
            };
            if flags & NBD_STATE_DIRTY != 0 {
                match out.last_mut() {
                    Some(l) if l.1 == pos => l.1 = pos + n,
                    _ => out.push((pos, pos + n)),
                }
            }
            pos += n;
        }
        Ok(out)
    }

    /// The export's own allocation: a node whose block status reports the
    /// server's holes as unallocated (reads are the export's).
    pub fn allocation(self: &Arc<Self>) -> Arc<dyn BlockNode> {
        Arc::new(Allocation(self.clone()))
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
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.read_bytes.fetch_add(len, Ordering::Relaxed);
            tracing::trace!("NBD READ {at}+{len}");
            self.with_client(Op::Read, at, len, |c, stop| c.read(at, part, stop))?;
        }
        Ok(())
    }

    /// What a reader sees: zeros where the server says so, data elsewhere
    /// (a hole not known to read as zeros is read).
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.extent(offset, len, false)
    }
}

impl NbdNode {
    /// The `base:allocation` extent at `offset`; with `holes`, a hole that
    /// reads as zeros is reported unallocated (the export's own
    /// allocation), else as zeros. Without allocation information
    /// everything is data.
    fn extent(&self, offset: u64, len: u64, holes: bool) -> Result<Extent> {
        super::check_range(&self.name, offset, len, self.size)?;
        let Some((n, flags)) = self.status(ALLOCATION, offset, len)? else {
            return Ok(Extent {
                status: Status::Data,
                len,
            });
        };
        let zero = flags & NBD_STATE_ZERO != 0;
        let status = match (zero, holes && flags & NBD_STATE_HOLE != 0) {
            (true, true) => Status::Unallocated,
            (true, false) => Status::Zero,
            // A hole whose content is not known to be zeros is copied.
            (false, _) => Status::Data,
        };
        Ok(Extent { status, len: n })
    }
}

/// [`NbdNode::allocation`].
struct Allocation(Arc<NbdNode>);

impl BlockNode for Allocation {
    fn path(&self) -> &Path {
        self.0.path()
    }

    fn size(&self) -> u64 {
        self.0.size
    }

    fn cluster_size(&self) -> u64 {
        self.0.cluster
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read(offset, buf)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.0.extent(offset, len, true)
    }
}
