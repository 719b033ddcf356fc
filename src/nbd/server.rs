//! An NBD server for one export: fixed newstyle negotiation, structured
//! replies, `base:allocation` and `qemu:dirty-bitmap:NAME` metadata
//! contexts, and concurrent requests per connection (replies go out as each
//! request finishes, as the protocol allows).
//!
//! Every connection runs on its own threads: one reads requests (and the
//! payloads of writes) in order, a few workers carry them out against the
//! export's node and write whole replies under one lock. A client that
//! breaks the protocol is dropped; the other connections go on.

use super::proto::*;
use crate::error::BlockError;
use crate::node::{BlockNode, Status};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// A dirty bitmap offered as `qemu:dirty-bitmap:NAME`: given a byte offset
/// and a length, whether the run starting there is dirty and how long the
/// run is (at most `len`, at least one byte).
pub type DirtyRuns = Arc<dyn Fn(u64, u64) -> (bool, u64) + Send + Sync>;

/// Called after a successful flush of the node (bitmaps record the image's
/// new identity there).
pub type OnFlush = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

/// What is exported.
pub struct Export {
    /// The export's name (`--export-name`; empty is the default export).
    pub name: String,
    /// A description for `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Reads and writes go to this node.
    pub node: Arc<dyn BlockNode>,
    /// Writes are refused with `EPERM`.
    pub read_only: bool,
    /// `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: Vec<(String, DirtyRuns)>,
    /// Run after every successful flush.
    pub on_flush: Option<OnFlush>,
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Bytes written by clients.
    pub bytes_written: AtomicU64,
    /// Bytes read by clients.
    pub bytes_read: AtomicU64,
    /// Connections dropped for a protocol error.
    pub dropped: AtomicU64,
}

/// The id of `base:allocation` in this server's replies.
const BASE_ALLOCATION_ID: u32 = 1;
/// The id of the first dirty bitmap context (then one per bitmap).
const FIRST_BITMAP_ID: u32 = 2;
/// Worker threads per connection.
const WORKERS: usize = 4;
/// The largest request answered on the connection's own thread when
/// nothing else is in flight.
const INLINE_MAX: u32 = 256 << 10;
/// Descriptors per block-status reply at most.
const MAX_DESCRIPTORS: usize = 1024;

/// One export served to any number of connections.
pub struct Server {
    export: Arc<Export>,
    shutdown: Arc<AtomicBool>,
    /// What the server has done so far.
    pub counters: Arc<Counters>,
}

/// What a connection negotiated.
#[derive(Debug, Default, Clone)]
struct Session {
    structured: bool,
    no_zeroes: bool,
    /// Selected contexts: ids.
    contexts: Vec<u32>,
}

/// How the negotiation ended.
enum Negotiated {
    /// Transmission starts.
    Go(Session),
    /// The client went away (or aborted).
    Done,
}

impl Server {
    /// Serve `export`; `shutdown` set makes new negotiations fail with
    /// `NBD_REP_ERR_SHUTDOWN` and transmissions answer `ESHUTDOWN`.
    pub fn new(export: Export, shutdown: Arc<AtomicBool>) -> Server {
        Server {
            export: Arc::new(export),
            shutdown,
            counters: Arc::new(Counters::default()),
        }
    }

    fn flags(&self, s: &Session) -> u16 {
        let mut f = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN;
        if s.structured {
            f |= NBD_FLAG_SEND_DF;
        }
        if self.export.read_only {
            f |= NBD_FLAG_READ_ONLY;
        }
        f
    }

    /// Serve one connection to its end: `reader` and `writer` are the two
    /// halves of one stream. Returns the protocol error that dropped it,
    /// if one did.
    pub fn serve(
        &self,
        mut reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
    ) -> Result<(), WireError> {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let writer = Arc::new(Mutex::new(writer));
        let r = (|| {
            let session = match self.negotiate(&mut reader, &writer)? {
                Negotiated::Go(s) => s,
                Negotiated::Done => return Ok(()),
            };
            self.transmit(reader, writer.clone(), session)
        })();
        if let Err(e) = &r
            && !matches!(e, WireError::Closed)
        {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        match r {
            Err(WireError::Closed) => Ok(()),
            other => other,
        }
    }

    fn send(w: &Mutex<Box<dyn Write + Send>>, bytes: &[u8]) -> Result<(), WireError> {
        let mut w = w
            .lock()
            .map_err(|_| WireError::Protocol("writer lock".into()))?;
        w.write_all(bytes)?;
        w.flush()?;
        Ok(())
    }

    fn reply(
        w: &Mutex<Box<dyn Write + Send>>,
        option: u32,
        kind: u32,
        data: &[u8],
    ) -> Result<(), WireError> {
        let mut m = Vec::new();
        write_option_reply(&mut m, option, kind, data)?;
        Self::send(w, &m)
    }

    fn negotiate(
        &self,
        r: &mut Box<dyn Read + Send>,
        w: &Mutex<Box<dyn Write + Send>>,
    ) -> Result<Negotiated, WireError> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        hello.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        hello.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
        Self::send(w, &hello)?;
        let mut cf = [0u8; 4];
        r.read_exact(&mut cf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        })?;
        let client = u32::from_be_bytes(cf);
        if client & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
            return Err(WireError::Protocol(format!(
                "unknown client flags {client:#x}"
            )));
        }
        let mut s = Session {
            no_zeroes: client & NBD_FLAG_C_NO_ZEROES != 0,
            ..Session::default()
        };
        loop {
            let opt = read_option(r)?;
            if self.shutdown.load(Ordering::Relaxed) && opt.code != NBD_OPT_ABORT {
                Self::reply(w, opt.code, NBD_REP_ERR_SHUTDOWN, b"the server is stopping")?;
                continue;
            }
            match opt.code {
                NBD_OPT_EXPORT_NAME => {
                    let name = String::from_utf8(opt.data).unwrap_or_default();
                    if name != self.export.name {
                        return Err(WireError::Protocol(format!("no export named '{name}'")));
                    }
                    let mut m = Vec::new();
                    m.extend_from_slice(&self.export.node.size().to_be_bytes());
                    m.extend_from_slice(&self.flags(&s).to_be_bytes());
                    if !s.no_zeroes {
                        m.extend_from_slice(&[0u8; 124]);
                    }
                    Self::send(w, &m)?;
                    return Ok(Negotiated::Go(s));
                }
                NBD_OPT_ABORT => {
                    // The client may already be gone.
                    let _ = Self::reply(w, opt.code, NBD_REP_ACK, b"");
                    return Ok(Negotiated::Done);
                }
                NBD_OPT_LIST => {
                    if !opt.data.is_empty() {
                        Self::reply(w, opt.code, NBD_REP_ERR_INVALID, b"LIST takes no data")?;
                        continue;
                    }
                    let name = self.export.name.as_bytes();
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name);
                    Self::reply(w, opt.code, NBD_REP_SERVER, &d)?;
                    Self::reply(w, opt.code, NBD_REP_ACK, b"")?;
                }
                NBD_OPT_STARTTLS => {
                    Self::reply(
                        w,
                        opt.code,
                        NBD_REP_ERR_POLICY,
                        b"imgbackup serves without TLS (use a Unix socket, or a loopback or trusted network)",
                    )?;
                }
                NBD_OPT_STRUCTURED_REPLY => {
                    if !opt.data.is_empty() {
                        Self::reply(w, opt.code, NBD_REP_ERR_INVALID, b"no data expected")?;
                        continue;
                    }
                    s.structured = true;
                    Self::reply(w, opt.code, NBD_REP_ACK, b"")?;
                }
                NBD_OPT_INFO | NBD_OPT_GO => {
                    if self.info(w, &opt, &s)? && opt.code == NBD_OPT_GO {
                        return Ok(Negotiated::Go(s));
                    }
                }
                NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                    self.meta_context(w, &opt, &mut s)?;
                }
                other => {
                    Self::reply(w, other, NBD_REP_ERR_UNSUP, b"unknown option")?;
                }
            }
        }
    }

    /// The rest of an option that names an export: refused as invalid when
    /// it did not parse (`None`), as unknown when it names another export.
    fn for_this_export<T>(
        &self,
        w: &Mutex<Box<dyn Write + Send>>,
        opt: &Opt,
        parsed: Option<(String, T)>,
        what: &str,
    ) -> Result<Option<T>, WireError> {
        match parsed {
            None => {
                Self::reply(
                    w,
                    opt.code,
                    NBD_REP_ERR_INVALID,
                    format!("malformed {what}").as_bytes(),
                )?;
                Ok(None)
            }
            Some((name, _)) if name != self.export.name => {
                Self::reply(
                    w,
                    opt.code,
                    NBD_REP_ERR_UNKNOWN,
                    format!("no export named '{name}'").as_bytes(),
                )?;
                Ok(None)
            }
            Some((_, rest)) => Ok(Some(rest)),
        }
    }

    /// Answer INFO or GO; true when the export was described (GO then
    /// starts transmission).
    fn info(
        &self,
        w: &Mutex<Box<dyn Write + Send>>,
        opt: &Opt,
        s: &Session,
    ) -> Result<bool, WireError> {
        let parsed = (|| {
            let mut p = Payload::new(&opt.data);
            let name = p.lstring()?;
            let n = p.u16()?;
            let wanted = (0..n).map(|_| p.u16()).collect::<Option<Vec<u16>>>()?;
            p.is_done().then_some((name, wanted))
        })();
        let Some(wanted) = self.for_this_export(w, opt, parsed, "INFO/GO request")? else {
            return Ok(false);
        };
        let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&self.export.node.size().to_be_bytes());
        export.extend_from_slice(&self.flags(s).to_be_bytes());
        Self::reply(w, opt.code, NBD_REP_INFO, &export)?;
        if wanted.contains(&NBD_INFO_NAME) {
            let mut d = NBD_INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(self.export.name.as_bytes());
            Self::reply(w, opt.code, NBD_REP_INFO, &d)?;
        }
        if wanted.contains(&NBD_INFO_DESCRIPTION) {
            let mut d = NBD_INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(
                &self.export.description.as_bytes()
                    [..self.export.description.len().min(MAX_STRING)],
            );
            Self::reply(w, opt.code, NBD_REP_INFO, &d)?;
        }
        let mut bs = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        bs.extend_from_slice(&1u32.to_be_bytes());
        bs.extend_from_slice(&4096u32.to_be_bytes());
        bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
        Self::reply(w, opt.code, NBD_REP_INFO, &bs)?;
        Self::reply(w, opt.code, NBD_REP_ACK, b"")?;
        Ok(true)
    }

    /// The contexts a query names: (id, name).
    fn matching(&self, query: &str, listing: bool) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let base = "base:allocation";
        if query == base || (listing && (query == "base:" || query.is_empty())) {
            out.push((BASE_ALLOCATION_ID, base.to_string()));
        }
        for (k, (name, _)) in self.export.bitmaps.iter().enumerate() {
            let full = format!("qemu:dirty-bitmap:{name}");
            let all =
                listing && (query.is_empty() || query == "qemu:" || query == "qemu:dirty-bitmap:");
            if query == full || all {
                out.push((FIRST_BITMAP_ID + k as u32, full));
            }
        }
        out
    }

    fn meta_context(
        &self,
        w: &Mutex<Box<dyn Write + Send>>,
        opt: &Opt,
        s: &mut Session,
    ) -> Result<(), WireError> {
        if !s.structured {
            Self::reply(
                w,
                opt.code,
                NBD_REP_ERR_INVALID,
                b"metadata contexts need structured replies first",
            )?;
            return Ok(());
        }
        let parsed = (|| {
            let mut p = Payload::new(&opt.data);
            let name = p.lstring()?;
            let n = p.u32()?;
            let queries = (0..n)
                .map(|_| p.lstring())
                .collect::<Option<Vec<String>>>()?;
            p.is_done().then_some((name, queries))
        })();
        let Some(queries) = self.for_this_export(w, opt, parsed, "metadata context request")?
        else {
            return Ok(());
        };
        let listing = opt.code == NBD_OPT_LIST_META_CONTEXT;
        let mut found: Vec<(u32, String)> = Vec::new();
        if listing && queries.is_empty() {
            found = self.matching("", true);
        }
        for q in &queries {
            for m in self.matching(q, listing) {
                if !found.iter().any(|f| f.0 == m.0) {
                    found.push(m);
                }
            }
        }
        if !listing {
            s.contexts = found.iter().map(|f| f.0).collect();
        }
        for (id, ctx) in &found {
            let mut d = (if listing { 0 } else { *id }).to_be_bytes().to_vec();
            d.extend_from_slice(ctx.as_bytes());
            Self::reply(w, opt.code, NBD_REP_META_CONTEXT, &d)?;
        }
        Self::reply(w, opt.code, NBD_REP_ACK, b"")
    }

    fn transmit(
        &self,
        mut r: Box<dyn Read + Send>,
        w: Arc<Mutex<Box<dyn Write + Send>>>,
        s: Session,
    ) -> Result<(), WireError> {
        let (tx, rx) = mpsc::channel::<(Request, Vec<u8>)>();
        let rx = Arc::new(Mutex::new(rx));
        let s = Arc::new(s);
        // Requests handed to workers and not answered yet.
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..WORKERS {
                let (rx, w, s, busy) = (rx.clone(), w.clone(), s.clone(), busy.clone());
                scope.spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(g) => g.recv(),
                            Err(_) => return,
                        };
                        let Ok((q, data)) = job else { return };
                        let reply = self.execute(&s, &q, data);
                        self.counters.requests.fetch_add(1, Ordering::Relaxed);
                        let sent = Self::send(&w, &reply);
                        busy.fetch_sub(1, Ordering::AcqRel);
                        if sent.is_err() {
                            return;
                        }
                    }
                });
            }
            let result = loop {
                let q = match read_request(&mut r) {
                    Ok(q) => q,
                    Err(e) => break Err(e),
                };
                if q.kind == NBD_CMD_DISC {
                    break Ok(());
                }
                let mut data = Vec::new();
                if q.kind == NBD_CMD_WRITE {
                    if q.len > MAX_REQUEST {
                        break Err(WireError::Protocol(format!(
                            "a write of {} bytes (at most {MAX_REQUEST})",
                            q.len
                        )));
                    }
                    data = vec![0u8; q.len as usize];
                    if let Err(e) = r.read_exact(&mut data) {
                        break Err(WireError::Io(e));
                    }
                }
                // With nothing in flight, a small request that does not wait
                // for the disk is answered here: no hand-over to a worker
                // (the common case of a client waiting for each reply).
                let quick = matches!(
                    q.kind,
                    NBD_CMD_READ
                        | NBD_CMD_WRITE
                        | NBD_CMD_WRITE_ZEROES
                        | NBD_CMD_TRIM
                        | NBD_CMD_BLOCK_STATUS
                ) && q.len <= INLINE_MAX
                    && q.flags & NBD_CMD_FLAG_FUA == 0;
                if quick && busy.load(Ordering::Acquire) == 0 {
                    let reply = self.execute(&s, &q, data);
                    self.counters.requests.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = Self::send(&w, &reply) {
                        break Err(e);
                    }
                    continue;
                }
                busy.fetch_add(1, Ordering::AcqRel);
                if tx.send((q, data)).is_err() {
                    break Ok(());
                }
            };
            // Requests in flight finish and are answered before the
            // connection closes.
            drop(tx);
            result
        })
    }

    fn errno(e: &BlockError) -> u32 {
        match e.errno() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NBD_ENOSPC,
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NBD_EPERM,
            _ => NBD_EIO,
        }
    }

    fn fail(s: &Session, q: &Request, error: u32, message: &str) -> Vec<u8> {
        tracing::warn!(
            "request {} of {} bytes at offset {} failed (error {error}): {message}",
            q.kind,
            q.len,
            q.offset
        );
        if s.structured {
            error_chunk(q.handle, error, message)
        } else {
            simple_reply(error, q.handle, b"")
        }
    }

    fn ok(q: &Request) -> Vec<u8> {
        simple_reply(0, q.handle, b"")
    }

    /// Carry out one request; the whole reply.
    fn execute(&self, s: &Session, q: &Request, data: Vec<u8>) -> Vec<u8> {
        let node = &self.export.node;
        let size = node.size();
        if self.shutdown.load(Ordering::Relaxed) {
            return Self::fail(s, q, NBD_ESHUTDOWN, "the server is stopping");
        }
        let in_range = q
            .offset
            .checked_add(u64::from(q.len))
            .is_some_and(|e| e <= size);
        let allowed = match q.kind {
            NBD_CMD_READ => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
            NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_FLUSH => NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        };
        if q.flags & !allowed != 0 {
            return Self::fail(s, q, NBD_EINVAL, "a flag this command does not take");
        }
        let writes = matches!(q.kind, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
        if writes && self.export.read_only {
            return Self::fail(s, q, NBD_EPERM, "the export is read-only");
        }
        if writes && !in_range {
            return Self::fail(
                s,
                q,
                NBD_ENOSPC,
                "the request ends past the end of the export",
            );
        }
        let fua = |r: Result<(), BlockError>| -> Result<(), BlockError> {
            r?;
            // FUA makes this write durable; the bitmaps (marked in use on
            // disk while served) are saved on FLUSH and when the server stops.
            if q.flags & NBD_CMD_FLAG_FUA != 0 {
                self.export.node.flush()?;
            }
            Ok(())
        };
        let done = |r: Result<(), BlockError>| match r {
            Ok(()) => Self::ok(q),
            Err(e) => Self::fail(s, q, Self::errno(&e), &crate::error::error_chain(&e)),
        };
        match q.kind {
            NBD_CMD_READ => {
                if !in_range || q.len > MAX_REQUEST {
                    return Self::fail(
                        s,
                        q,
                        NBD_EINVAL,
                        "the read ends past the end of the export",
                    );
                }
                let mut buf = vec![0u8; q.len as usize];
                if let Err(e) = node.read(q.offset, &mut buf) {
                    return Self::fail(s, q, Self::errno(&e), &crate::error::error_chain(&e));
                }
                self.counters
                    .bytes_read
                    .fetch_add(u64::from(q.len), Ordering::Relaxed);
                if s.structured {
                    if q.len == 0 {
                        return chunk_header(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, q.handle, 0)
                            .to_vec();
                    }
                    let mut m = chunk_header(
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_OFFSET_DATA,
                        q.handle,
                        8 + q.len,
                    )
                    .to_vec();
                    m.extend_from_slice(&q.offset.to_be_bytes());
                    m.extend_from_slice(&buf);
                    m
                } else {
                    simple_reply(0, q.handle, &buf)
                }
            }
            NBD_CMD_WRITE => {
                if data.len() != q.len as usize {
                    return Self::fail(s, q, NBD_EINVAL, "payload length");
                }
                self.counters
                    .bytes_written
                    .fetch_add(u64::from(q.len), Ordering::Relaxed);
                done(fua(node.write(q.offset, &data)))
            }
            NBD_CMD_WRITE_ZEROES => done(fua(node.write_zeroes(q.offset, u64::from(q.len)))),
            NBD_CMD_TRIM => done(fua(node.discard(q.offset, u64::from(q.len)))),
            NBD_CMD_FLUSH => done(self.flush()),
            NBD_CMD_BLOCK_STATUS => self.block_status(s, q, size),
            _ => Self::fail(s, q, NBD_EINVAL, "unknown or unadvertised command"),
        }
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.export.node.flush()?;
        if let Some(f) = &self.export.on_flush {
            f().map_err(|e| {
                BlockError::io(crate::error::Op::Flush, self.export.node.path(), 0, 0, e)
            })?;
        }
        Ok(())
    }

    fn block_status(&self, s: &Session, q: &Request, size: u64) -> Vec<u8> {
        if !s.structured || s.contexts.is_empty() {
            return Self::fail(s, q, NBD_EINVAL, "no metadata context was selected");
        }
        if q.len == 0
            || q.offset
                .checked_add(u64::from(q.len))
                .is_none_or(|e| e > size)
        {
            return Self::fail(
                s,
                q,
                NBD_EINVAL,
                "the range is empty or ends past the export",
            );
        }
        let end = q.offset + u64::from(q.len);
        let max = if q.flags & NBD_CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_DESCRIPTORS
        };
        let mut out = Vec::new();
        for &id in &s.contexts {
            let mut descs: Vec<(u32, u32)> = Vec::new();
            let mut pos = q.offset;
            while pos < end && descs.len() < max {
                let want = (end - pos).min(u64::from(u32::MAX) & !511);
                let (flags, len) = if id == BASE_ALLOCATION_ID {
                    match self.export.node.block_status(pos, want) {
                        Ok(ext) => (
                            // As QEMU's server says it: what is not data
                            // (a hole, a zero cluster) is a hole that reads
                            // as zeros.
                            match ext.status {
                                Status::Data => 0,
                                Status::Zero | Status::Unallocated => {
                                    NBD_STATE_HOLE | NBD_STATE_ZERO
                                }
                            },
                            ext.len.clamp(1, want),
                        ),
                        Err(e) => {
                            return Self::fail(
                                s,
                                q,
                                Self::errno(&e),
                                &crate::error::error_chain(&e),
                            );
                        }
                    }
                } else {
                    match self.export.bitmaps.get((id - FIRST_BITMAP_ID) as usize) {
                        Some((_, f)) => {
                            let (dirty, len) = f(pos, want);
                            (if dirty { NBD_STATE_DIRTY } else { 0 }, len.clamp(1, want))
                        }
                        None => return Self::fail(s, q, NBD_EINVAL, "unknown context"),
                    }
                };
                match descs.last_mut() {
                    Some(last)
                        if last.1 == flags && u64::from(last.0) + len <= u64::from(u32::MAX) =>
                    {
                        last.0 += len as u32
                    }
                    _ => descs.push((len as u32, flags)),
                }
                pos += len;
            }
            let mut m = chunk_header(
                0,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                q.handle,
                4 + 8 * descs.len() as u32,
            )
            .to_vec();
            m.extend_from_slice(&id.to_be_bytes());
            for (len, flags) in descs {
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(&flags.to_be_bytes());
            }
            out.extend_from_slice(&m);
        }
        out.extend_from_slice(&chunk_header(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            q.handle,
            0,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mem::MemNode;
    use std::os::unix::net::UnixStream;

    /// A hand-made client on one end of a socket pair; the server on the
    /// other, in a thread.
    struct Client {
        s: UnixStream,
        server: Option<std::thread::JoinHandle<Result<(), WireError>>>,
    }

    impl Client {
        fn new(read_only: bool) -> Client {
            let (a, b) = UnixStream::pair().unwrap();
            let node: Arc<dyn BlockNode> = Arc::new(MemNode::new("mem", vec![0u8; 1 << 20], 65536));
            let server = Server::new(
                Export {
                    name: "e".into(),
                    description: "test".into(),
                    node,
                    read_only,
                    bitmaps: vec![("b".into(), Arc::new(|_, len| (true, len)) as DirtyRuns)],
                    on_flush: None,
                },
                Arc::new(AtomicBool::new(false)),
            );
            let (r, w) = (b.try_clone().unwrap(), b);
            let t = std::thread::spawn(move || server.serve(Box::new(r), Box::new(w)));
            let mut c = Client {
                s: a,
                server: Some(t),
            };
            let mut hello = [0u8; 18];
            c.s.read_exact(&mut hello).unwrap();
            assert_eq!(&hello[..8], b"NBDMAGIC");
            assert_eq!(&hello[8..16], b"IHAVEOPT");
            c.s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
                .unwrap();
            c
        }

        /// Send an option; the replies until a final one: (type, data).
        fn opt(&mut self, code: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
            let mut m = NBD_OPTS_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&code.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.s.write_all(&m).unwrap();
            let mut out = Vec::new();
            loop {
                let mut h = [0u8; 20];
                self.s.read_exact(&mut h).unwrap();
                assert_eq!(&h[..8], &NBD_REP_MAGIC.to_be_bytes());
                assert_eq!(u32::from_be_bytes([h[8], h[9], h[10], h[11]]), code);
                let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
                let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
                let mut d = vec![0u8; len as usize];
                self.s.read_exact(&mut d).unwrap();
                let last = kind == NBD_REP_ACK || kind & (1 << 31) != 0;
                out.push((kind, d));
                if last {
                    return out;
                }
            }
        }

        fn request(
            &mut self,
            kind: u16,
            flags: u16,
            handle: u64,
            offset: u64,
            len: u32,
            data: &[u8],
        ) {
            let mut m = encode_request(&Request {
                flags,
                kind,
                handle,
                offset,
                len,
            })
            .to_vec();
            m.extend_from_slice(data);
            self.s.write_all(&m).unwrap();
        }

        /// One structured chunk: (flags, type, handle, payload).
        fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(&h[..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).unwrap();
            let mut hd = [0u8; 8];
            hd.copy_from_slice(&h[8..16]);
            (
                u16::from_be_bytes([h[4], h[5]]),
                u16::from_be_bytes([h[6], h[7]]),
                u64::from_be_bytes(hd),
                d,
            )
        }

        fn go(&mut self) {
            let mut d = 1u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"e");
            d.extend_from_slice(&0u16.to_be_bytes());
            let r = self.opt(NBD_OPT_GO, &d);
            assert_eq!(r.last().unwrap().0, NBD_REP_ACK, "{r:?}");
        }

        fn finish(mut self) -> Result<(), WireError> {
            let t = self.server.take().unwrap();
            drop(self);
            t.join().unwrap()
        }
    }

    fn meta(query: &str) -> Vec<u8> {
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"e");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(query.len() as u32).to_be_bytes());
        d.extend_from_slice(query.as_bytes());
        d
    }

    #[test]
    fn negotiation_answers_every_option() {
        let mut c = Client::new(false);
        let r = c.opt(NBD_OPT_LIST, b"");
        assert_eq!(r[0].0, NBD_REP_SERVER);
        assert_eq!(&r[0].1, &[0, 0, 0, 1, b'e']);
        assert_eq!(r[1].0, NBD_REP_ACK);
        assert_eq!(c.opt(NBD_OPT_STARTTLS, b"")[0].0, NBD_REP_ERR_POLICY);
        assert_eq!(c.opt(99, b"xyz")[0].0, NBD_REP_ERR_UNSUP);
        assert_eq!(c.opt(NBD_OPT_LIST, b"x")[0].0, NBD_REP_ERR_INVALID);
        // Contexts need structured replies first.
        assert_eq!(
            c.opt(NBD_OPT_SET_META_CONTEXT, &meta("base:allocation"))[0].0,
            NBD_REP_ERR_INVALID
        );
        assert_eq!(c.opt(NBD_OPT_STRUCTURED_REPLY, b"")[0].0, NBD_REP_ACK);
        // A malformed GO, an unknown export.
        assert_eq!(
            c.opt(NBD_OPT_GO, &[0, 0, 0, 9, b'e'])[0].0,
            NBD_REP_ERR_INVALID
        );
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"x");
        d.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(c.opt(NBD_OPT_GO, &d)[0].0, NBD_REP_ERR_UNKNOWN);
        // Listing every context, then selecting two.
        let mut all = 1u32.to_be_bytes().to_vec();
        all.extend_from_slice(b"e");
        all.extend_from_slice(&0u32.to_be_bytes());
        let r = c.opt(NBD_OPT_LIST_META_CONTEXT, &all);
        let names: Vec<String> = r
            .iter()
            .filter(|x| x.0 == NBD_REP_META_CONTEXT)
            .map(|x| String::from_utf8_lossy(&x.1[4..]).into_owned())
            .collect();
        assert_eq!(names, vec!["base:allocation", "qemu:dirty-bitmap:b"]);
        let r = c.opt(NBD_OPT_SET_META_CONTEXT, &meta("qemu:dirty-bitmap:b"));
        assert_eq!(r[0].0, NBD_REP_META_CONTEXT);
        assert_eq!(&r[0].1[..4], &FIRST_BITMAP_ID.to_be_bytes());
        // INFO describes without starting; GO starts.
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"e");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
        let r = c.opt(NBD_OPT_INFO, &d);
        let export = &r[0].1;
        assert_eq!(&export[..2], &NBD_INFO_EXPORT.to_be_bytes());
        assert_eq!(&export[2..10], &(1u64 << 20).to_be_bytes());
        assert!(
            r.iter()
                .any(|x| x.1.starts_with(&NBD_INFO_NAME.to_be_bytes()))
        );
        c.go();
        c.request(NBD_CMD_BLOCK_STATUS, 0, 5, 0, 65536, b"");
        let (flags, kind, handle, d) = c.chunk();
        assert_eq!((flags, kind, handle), (0, NBD_REPLY_TYPE_BLOCK_STATUS, 5));
        assert_eq!(&d[..4], &FIRST_BITMAP_ID.to_be_bytes());
        assert_eq!(&d[4..12], &[0, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!(c.chunk().0, NBD_REPLY_FLAG_DONE);
        c.request(NBD_CMD_DISC, 0, 0, 0, 0, b"");
        assert!(c.finish().is_ok());
    }

    #[test]
    fn transmission_reads_writes_and_refuses_what_it_must() {
        let mut c = Client::new(false);
        c.opt(NBD_OPT_STRUCTURED_REPLY, b"");
        c.opt(NBD_OPT_SET_META_CONTEXT, &meta("base:allocation"));
        c.go();
        c.request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1, 4096, 3, b"abc");
        let mut h = [0u8; 16];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[4..8], &[0, 0, 0, 0]);
        c.request(NBD_CMD_READ, 0, 2, 4095, 5, b"");
        let (flags, kind, handle, d) = c.chunk();
        assert_eq!(
            (flags, kind, handle),
            (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 2)
        );
        assert_eq!(&d[..8], &4095u64.to_be_bytes());
        assert_eq!(&d[8..], b"\0abc\0");
        // One extent with REQ_ONE; the data cluster is not a hole.
        c.request(
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_FLAG_REQ_ONE,
            3,
            0,
            1 << 20,
            b"",
        );
        let (_, kind, _, d) = c.chunk();
        assert_eq!(kind, NBD_REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(d.len(), 12);
        assert_eq!(&d[8..12], &0u32.to_be_bytes());
        c.chunk();
        // Past the end, an unknown command, a flag a command does not take.
        for (kind, flags, off, len) in [
            (NBD_CMD_READ, 0, (1 << 20) - 1, 2),
            (42, 0, 0, 0),
            (NBD_CMD_FLUSH, NBD_CMD_FLAG_REQ_ONE, 0, 0),
        ] {
            c.request(kind, flags, 4, off, len, b"");
            let (flags, kind, _, d) = c.chunk();
            assert_eq!((flags, kind), (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR));
            assert_eq!(&d[..4], &NBD_EINVAL.to_be_bytes());
        }
        c.request(NBD_CMD_WRITE, 0, 6, (1 << 20) - 1, 2, b"zz");
        let (_, _, _, d) = c.chunk();
        assert_eq!(&d[..4], &NBD_ENOSPC.to_be_bytes());
        c.request(NBD_CMD_DISC, 0, 0, 0, 0, b"");
        assert!(c.finish().is_ok());
    }

    #[test]
    fn read_only_exports_refuse_writes_and_garbage_drops_the_client() {
        let mut c = Client::new(true);
        c.go();
        c.request(NBD_CMD_TRIM, 0, 1, 0, 4096, b"");
        let mut h = [0u8; 16];
        c.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[4..8], &NBD_EPERM.to_be_bytes());
        c.s.write_all(&[0xab; 28]).unwrap();
        assert!(matches!(c.finish(), Err(WireError::Protocol(_))));
    }
}
