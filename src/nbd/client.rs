//! An NBD client (doc/proto.md of the NBD project): fixed newstyle
//! negotiation with `NBD_OPT_GO`, structured replies, metadata contexts,
//! and the READ and BLOCK_STATUS commands, over Unix or TCP sockets. The
//! ground the NBD source node stands on (SPEC §9); it shares
//! [`super::proto`] with the server.
//!
//! Several requests may be in flight on one connection: requests are sent
//! from any thread and a reader thread hands each reply to the request it
//! answers (by handle).

use super::proto::*;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

/// Where an export is: QEMU's and libnbd's URI syntax,
/// `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// How to reach the server.
    pub transport: Transport,
    /// The export's name (empty: the default export).
    pub export: String,
}

/// How to reach a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket.
    Unix(PathBuf),
    /// TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (10809 by default).
        port: u16,
    },
}

/// Whether `s` is an NBD URI (of any scheme, supported or not).
pub fn is_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+") || s.starts_with("nbds")
}

/// `%XX` escapes decoded.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl NbdUri {
    /// Parse an NBD URI; what imgbackup cannot do (TLS, vsock, other query
    /// parameters) is refused with the reason.
    pub fn parse(uri: &str) -> Result<NbdUri, String> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| format!("{uri}: not an NBD URI (nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH)"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, percent_decode(e)?),
            None => (rest, String::new()),
        };
        let mut socket = None;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|kv| !kv.is_empty())
        {
            match kv.split_once('=') {
                Some(("socket", v)) => socket = Some(PathBuf::from(percent_decode(v)?)),
                _ => {
                    return Err(format!(
                        "{uri}: the query parameter {kv:?} is not supported (only socket= of nbd+unix)"
                    ));
                }
            }
        }
        let transport = match scheme {
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(format!("{uri}: socket= belongs to nbd+unix:// URIs"));
                }
                if authority.is_empty() {
                    return Err(format!("{uri}: no host"));
                }
                // [IPv6]:port, host:port, or a bare host.
                let (host, port) = match authority.strip_prefix('[') {
                    Some(v6) => {
                        let (h, after) = v6
                            .split_once(']')
                            .ok_or_else(|| format!("{uri}: unclosed [ in the host"))?;
                        (h.to_string(), after.strip_prefix(':'))
                    }
                    None => match authority.rsplit_once(':') {
                        Some((h, p)) => (h.to_string(), Some(p)),
                        None => (authority.to_string(), None),
                    },
                };
                let port = match port {
                    Some(p) => p
                        .parse::<u16>()
                        .map_err(|_| format!("{uri}: bad port {p:?}"))?,
                    None => 10809,
                };
                Transport::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(format!(
                        "{uri}: an nbd+unix:// URI has no host (nbd+unix:///EXPORT?socket=PATH)"
                    ));
                }
                Transport::Unix(socket.ok_or_else(|| format!("{uri}: no ?socket=PATH"))?)
            }
            s if s.starts_with("nbds") => {
                return Err(format!(
                    "{uri}: TLS (nbds://) is not supported; export over a Unix socket or a trusted network"
                ));
            }
            s => {
                return Err(format!(
                    "{uri}: the scheme {s}:// is not supported (nbd://, nbd+unix://)"
                ));
            }
        };
        Ok(NbdUri { transport, export })
    }
}

/// What the server said about the export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints: minimum, preferred, maximum (defaults when
    /// the server sent none).
    pub block_size: (u32, u32, u32),
    /// The metadata contexts selected: (id, name).
    pub contexts: Vec<(u32, String)>,
}

/// A failure of the protocol or of a request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("NBD protocol: {0}")]
    Protocol(String),
    /// The server refused an option.
    #[error("the NBD server refused {what}: {message}")]
    Refused {
        /// What was asked.
        what: String,
        /// Its message (or the error code).
        message: String,
    },
    /// A request failed on the server.
    #[error("the NBD server failed the request at offset {offset}: error {errno}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Request {
        /// The request's offset.
        offset: u64,
        /// The NBD error code.
        errno: u32,
        /// The server's message.
        message: String,
    },
    /// The connection was lost while the request waited for its reply.
    #[error("NBD connection lost: {0}")]
    Closed(String),
    /// The caller's stop condition held while the request waited.
    #[error("the NBD request was abandoned (the job is stopping)")]
    Stopped,
}

impl ClientError {
    /// True when the connection cannot serve another request.
    pub fn breaks_connection(&self) -> bool {
        !matches!(self, ClientError::Request { .. } | ClientError::Stopped)
    }
}

/// One extent of a metadata context: length and flags.
pub type Descriptor = (u32, u32);

/// How long connecting and negotiating may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a request waiting for its reply looks at its stop condition.
const POLL: Duration = Duration::from_millis(50);

/// One reply chunk: flags, type, payload.
type Chunk = (u16, u16, Vec<u8>);

/// Replies still awaited, by handle, and why the connection ended.
#[derive(Default)]
struct Pending {
    next_handle: u64,
    waiting: HashMap<u64, mpsc::Sender<Chunk>>,
    failed: Option<String>,
}

/// A connection in transmission phase. Requests may be sent from several
/// threads at once (`&self`): each waits for its own reply, which a reader
/// thread routes by handle, so several are in flight on one connection.
pub struct Client {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Arc<Mutex<Pending>>,
    shutdown: Box<dyn Fn() + Send + Sync>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Payload buffers to reuse.
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The export.
    pub info: ExportInfo,
}

/// A connected socket.
enum Sock {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Sock {
    fn connect(t: &Transport, limit: Duration) -> io::Result<Sock> {
        match t {
            Transport::Unix(p) => Ok(Sock::Unix(std::os::unix::net::UnixStream::connect(p)?)),
            Transport::Tcp { host, port } => {
                use std::net::ToSocketAddrs;
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"));
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match std::net::TcpStream::connect_timeout(&a, limit) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Sock::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(t),
            Sock::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    /// End the connection both ways (wakes a thread blocked reading it).
    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.flush(),
            Sock::Tcp(s) => s.flush(),
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn read_exact(r: &mut dyn Read, n: usize) -> Result<Vec<u8>, ClientError> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// The negotiation phase, on a blocking socket with a read timeout.
struct Negotiation<'a> {
    s: &'a mut Sock,
    info: ExportInfo,
}

impl Negotiation<'_> {
    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m)?;
        Ok(())
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let h = read_exact(self.s, 20)?;
        if be64(&h) != NBD_REP_MAGIC || be32(&h[8..]) != opt {
            return Err(protocol("a malformed option reply"));
        }
        let (kind, len) = (be32(&h[12..]), be32(&h[16..]));
        if len > MAX_OPTION_LEN {
            return Err(protocol("an option reply too long"));
        }
        let data = read_exact(self.s, len as usize)?;
        Ok((kind, data))
    }

    fn refused(what: &str, kind: u32, data: &[u8]) -> ClientError {
        let message = String::from_utf8_lossy(data).into_owned();
        ClientError::Refused {
            what: what.to_string(),
            message: if message.is_empty() {
                format!("error {kind:#x}")
            } else {
                message
            },
        }
    }

    fn run(&mut self, export: &str, contexts: &[&str]) -> Result<(), ClientError> {
        let h = read_exact(self.s, 18)?;
        if be64(&h) != NBD_MAGIC || be64(&h[8..]) != NBD_OPTS_MAGIC {
            return Err(protocol("not an NBD server speaking the newstyle protocol"));
        }
        let flags = be16(&h[16..]);
        if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("the server does not speak fixed newstyle"));
        }
        let client_flags = NBD_FLAG_C_FIXED_NEWSTYLE
            | (u32::from(flags & NBD_FLAG_NO_ZEROES != 0) * NBD_FLAG_C_NO_ZEROES);
        self.s.write_all(&client_flags.to_be_bytes())?;
        // Structured replies: required (holes and errors per chunk).
        self.send_option(NBD_OPT_STRUCTURED_REPLY, &[])?;
        let (kind, data) = self.option_reply(NBD_OPT_STRUCTURED_REPLY)?;
        if kind != NBD_REP_ACK {
            return Err(Self::refused("structured replies", kind, &data));
        }
        let name = export.as_bytes();
        if !contexts.is_empty() {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name);
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.send_option(NBD_OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (kind, data) = self.option_reply(NBD_OPT_SET_META_CONTEXT)?;
                match kind {
                    NBD_REP_META_CONTEXT if data.len() >= 4 => {
                        let id = be32(&data);
                        let n = String::from_utf8_lossy(&data[4..]).into_owned();
                        self.info.contexts.push((id, n));
                    }
                    NBD_REP_ACK => break,
                    k if k & (1 << 31) != 0 => {
                        return Err(Self::refused("the metadata contexts", k, &data));
                    }
                    _ => return Err(protocol("an unexpected reply to SET_META_CONTEXT")),
                }
            }
        }
        // GO, asking for the block size constraints.
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(NBD_OPT_GO, &d)?;
        let mut have_export = false;
        loop {
            let (kind, data) = self.option_reply(NBD_OPT_GO)?;
            match kind {
                NBD_REP_INFO if data.len() >= 2 => match be16(&data) {
                    NBD_INFO_EXPORT if data.len() == 12 => {
                        self.info.size = be64(&data[2..]);
                        self.info.flags = be16(&data[10..]);
                        have_export = true;
                    }
                    NBD_INFO_BLOCK_SIZE if data.len() == 14 => {
                        self.info.block_size =
                            (be32(&data[2..]), be32(&data[6..]), be32(&data[10..]));
                    }
                    _ => {}
                },
                NBD_REP_ACK => break,
                k if k & (1 << 31) != 0 => {
                    return Err(Self::refused(&format!("the export {export:?}"), k, &data));
                }
                _ => return Err(protocol("an unexpected reply to GO")),
            }
        }
        if !have_export {
            return Err(protocol("GO succeeded without the export's size"));
        }
        Ok(())
    }
}

/// The next reply chunk on `r`: (handle, (flags, type, payload)); a simple
/// reply comes as `NBD_REPLY_TYPE_NONE` with its error in the payload.
fn next_chunk(r: &mut dyn Read, spare: &Mutex<Vec<Vec<u8>>>) -> Result<(u64, Chunk), ClientError> {
    let m = read_exact(r, 4)?;
    match be32(&m) {
        NBD_STRUCTURED_REPLY_MAGIC => {
            let h = read_exact(r, 16)?;
            let (flags, kind, handle, len) =
                (be16(&h), be16(&h[2..]), be64(&h[4..]), be32(&h[12..]));
            if len > MAX_REQUEST + 64 {
                return Err(protocol("a reply chunk too long"));
            }
            // Payloads land in recycled buffers: a fresh 2 MiB buffer per
            // reply costs more in page faults than the copy itself.
            let mut data = lock(spare).pop().unwrap_or_default();
            let n = len as usize;
            if data.len() < n {
                data.resize(n, 0);
            }
            data.truncate(n);
            r.read_exact(&mut data)?;
            Ok((handle, (flags, kind, data)))
        }
        NBD_SIMPLE_REPLY_MAGIC => {
            let h = read_exact(r, 12)?;
            Ok((
                be64(&h[4..]),
                (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, h[..4].to_vec()),
            ))
        }
        _ => Err(protocol("a reply with a bad magic")),
    }
}

/// The reader thread: route every chunk to the request that waits for it;
/// on the first failure, record why and wake every waiting request.
fn route_replies(
    mut r: Box<dyn Read + Send>,
    pending: Arc<Mutex<Pending>>,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
) {
    let why = loop {
        let (handle, chunk) = match next_chunk(r.as_mut(), &spare) {
            Ok(c) => c,
            Err(e) => break e.to_string(),
        };
        let mut p = lock(&pending);
        let done = chunk.0 & NBD_REPLY_FLAG_DONE != 0;
        let to = if done {
            p.waiting.remove(&handle)
        } else {
            p.waiting.get(&handle).cloned()
        };
        match to {
            // A request that stopped waiting no longer listens.
            Some(tx) => drop(tx.send(chunk)),
            None => {
                break format!("NBD protocol: a reply to a request never sent (handle {handle})");
            }
        }
    };
    let mut p = lock(&pending);
    if p.failed.is_none() {
        p.failed = Some(why);
    }
    p.waiting.clear();
}

impl Client {
    /// Connect to `uri` and select `contexts` (e.g. `base:allocation`;
    /// those the server does not know are simply not selected). Connecting
    /// and negotiating fail after [`HANDSHAKE_TIMEOUT`] (a server that
    /// serves one client at a time leaves a second one waiting).
    pub fn connect(uri: &NbdUri, contexts: &[&str]) -> Result<Client, ClientError> {
        Self::connect_within(uri, contexts, HANDSHAKE_TIMEOUT)
    }

    /// [`Client::connect`], giving up after `limit` instead (a job's
    /// `--timeout` that is shorter).
    pub fn connect_within(
        uri: &NbdUri,
        contexts: &[&str],
        limit: Duration,
    ) -> Result<Client, ClientError> {
        let limit = limit.max(Duration::from_millis(1));
        let mut sock = Sock::connect(&uri.transport, limit)?;
        sock.set_read_timeout(Some(limit))?;
        let mut n = Negotiation {
            s: &mut sock,
            info: ExportInfo {
                size: 0,
                flags: 0,
                block_size: (1, 4096, 32 << 20),
                contexts: Vec::new(),
            },
        };
        let timed_out = |e: ClientError| match e {
            ClientError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the server did not finish the handshake within {:?} (does it serve one client at a time, and is another connected?)",
                        limit
                    ),
                ))
            }
            e => e,
        };
        n.run(&uri.export, contexts).map_err(timed_out)?;
        let info = n.info;
        // Transmission: the reader thread blocks until a reply or the end.
        sock.set_read_timeout(None)?;
        let read_half = sock.try_clone()?;
        let killer = sock.try_clone()?;
        let pending = Arc::new(Mutex::new(Pending {
            next_handle: 1,
            ..Pending::default()
        }));
        let p = pending.clone();
        let spare = Arc::new(Mutex::new(Vec::new()));
        let s = spare.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-replies".into())
            .spawn(move || route_replies(Box::new(read_half), p, s))?;
        Ok(Client {
            writer: Mutex::new(Box::new(sock)),
            pending,
            shutdown: Box::new(move || killer.shutdown()),
            reader: Some(reader),
            spare,
            info,
        })
    }

    /// Send a request; its reply chunks arrive on the returned receiver.
    fn send(&self, kind: u16, offset: u64, len: u32) -> Result<mpsc::Receiver<Chunk>, ClientError> {
        let (tx, rx) = mpsc::channel();
        let handle = {
            let mut p = lock(&self.pending);
            if let Some(why) = &p.failed {
                return Err(ClientError::Closed(why.clone()));
            }
            let h = p.next_handle;
            p.next_handle += 1;
            p.waiting.insert(h, tx);
            h
        };
        let q = Request {
            flags: 0,
            kind,
            handle,
            offset,
            len,
        };
        let sent = lock(&self.writer).write_all(&encode_request(&q));
        if let Err(e) = sent {
            let mut p = lock(&self.pending);
            p.waiting.remove(&handle);
            p.failed.get_or_insert_with(|| e.to_string());
            drop(p);
            (self.shutdown)();
            return Err(ClientError::Io(e));
        }
        Ok(rx)
    }

    /// The next chunk of a request, checking `stop` while it waits.
    fn receive(
        &self,
        rx: &mpsc::Receiver<Chunk>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Chunk, ClientError> {
        loop {
            match rx.recv_timeout(POLL) {
                Ok(c) => return Ok(c),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if stop() {
                        return Err(ClientError::Stopped);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let why = lock(&self.pending)
                        .failed
                        .clone()
                        .unwrap_or_else(|| "closed".into());
                    return Err(ClientError::Closed(why));
                }
            }
        }
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        lock(&self.pending).waiting.len()
    }

    /// True once the connection failed (it takes no more requests).
    pub fn is_broken(&self) -> bool {
        lock(&self.pending).failed.is_some()
    }

    fn error_of(offset: u64, kind: u16, data: &[u8]) -> ClientError {
        let errno = if data.len() >= 4 { be32(data) } else { NBD_EIO };
        let message = if kind == NBD_REPLY_TYPE_NONE || data.len() < 6 {
            String::new()
        } else {
            let n = be16(&data[4..]) as usize;
            String::from_utf8_lossy(data.get(6..6 + n).unwrap_or_default()).into_owned()
        };
        ClientError::Request {
            offset,
            errno,
            message,
        }
    }

    /// Where `n` bytes a chunk places at `at` land in a buffer of `len`
    /// bytes read from `offset`: [a, b), or None if outside it.
    fn within(at: u64, offset: u64, n: usize, len: usize) -> Option<(usize, usize)> {
        let a = usize::try_from(at.checked_sub(offset)?).ok()?;
        let b = a.checked_add(n)?;
        (b <= len).then_some((a, b))
    }

    /// Read `buf.len()` bytes at `offset` (holes the server reports are
    /// filled with zeros). At most the server's maximum block size. While
    /// it waits, `stop` is asked every 50 ms; true abandons the request.
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        stop: &dyn Fn() -> bool,
    ) -> Result<(), ClientError> {
        let len = buf.len();
        let rx = self.send(NBD_CMD_READ, offset, len as u32)?;
        let mut err = None;
        loop {
            let (flags, kind, data) = self.receive(&rx, stop)?;
            match kind {
                NBD_REPLY_TYPE_NONE if data.len() == 4 && be32(&data) != 0 => {
                    err = Some(Self::error_of(offset, kind, &data));
                }
                NBD_REPLY_TYPE_NONE => {}
                NBD_REPLY_TYPE_OFFSET_DATA if data.len() >= 8 => {
                    match Self::within(be64(&data), offset, data.len() - 8, len) {
                        Some((a, b)) => buf[a..b].copy_from_slice(&data[8..]),
                        None => return Err(self.broken("read data outside the request")),
                    }
                    self.recycle(data);
                }
                NBD_REPLY_TYPE_OFFSET_HOLE if data.len() == 12 => {
                    match Self::within(be64(&data), offset, be32(&data[8..]) as usize, len) {
                        Some((a, b)) => buf[a..b].fill(0),
                        None => return Err(self.broken("a hole outside the request")),
                    }
                }
                NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
                    err = Some(Self::error_of(offset, kind, &data));
                }
                _ => {
                    return Err(self.broken(&format!("an unexpected reply chunk {kind} to READ")));
                }
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        err.map_or(Ok(()), Err)
    }

    /// Give a payload buffer back (a few of at most 4 MiB are kept, so a
    /// server sending oversized chunks cannot make the pool grow).
    fn recycle(&self, data: Vec<u8>) {
        let mut spare = lock(&self.spare);
        if spare.len() < 16 && data.capacity() <= 4 << 20 {
            spare.push(data);
        }
    }

    /// A protocol violation: the connection takes no more requests.
    fn broken(&self, what: &str) -> ClientError {
        lock(&self.pending)
            .failed
            .get_or_insert_with(|| format!("NBD protocol: {what}"));
        (self.shutdown)();
        protocol(what)
    }

    /// The extents of context `id` from `offset` (at most `len` bytes): the
    /// server's descriptors for the first part of the range.
    pub fn block_status(
        &self,
        offset: u64,
        len: u32,
        id: u32,
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<Descriptor>, ClientError> {
        let rx = self.send(NBD_CMD_BLOCK_STATUS, offset, len)?;
        let mut out = Vec::new();
        let mut err = None;
        loop {
            let (flags, kind, data) = self.receive(&rx, stop)?;
            match kind {
                NBD_REPLY_TYPE_BLOCK_STATUS if data.len() >= 4 && (data.len() - 4) % 8 == 0 => {
                    if be32(&data) == id {
                        out = data[4..]
                            .chunks(8)
                            .map(|d| (be32(d), be32(&d[4..])))
                            .collect();
                    }
                }
                NBD_REPLY_TYPE_NONE if data.len() == 4 && be32(&data) != 0 => {
                    err = Some(Self::error_of(offset, kind, &data));
                }
                NBD_REPLY_TYPE_NONE => {}
                NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
                    err = Some(Self::error_of(offset, kind, &data));
                }
                _ => {
                    return Err(
                        self.broken(&format!("an unexpected reply chunk {kind} to BLOCK_STATUS"))
                    );
                }
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        if out.is_empty() || out.iter().any(|d| d.0 == 0) {
            return Err(protocol(
                "BLOCK_STATUS without extents for the context asked",
            ));
        }
        Ok(out)
    }

    /// The id the server gave context `name`, if it was selected.
    pub fn context(&self, name: &str) -> Option<u32> {
        self.info
            .contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    /// Say goodbye (`NBD_CMD_DISC`); the server closes the connection.
    pub fn disconnect(self) -> Result<(), ClientError> {
        self.send(NBD_CMD_DISC, 0, 0).map(drop)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        (self.shutdown)();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_outside_the_request_are_refused_without_overflow() {
        assert_eq!(Client::within(4096, 4096, 512, 4096), Some((0, 512)));
        assert_eq!(Client::within(8192, 4096, 4096, 8192), Some((4096, 8192)));
        assert_eq!(Client::within(8192, 4096, 4097, 8192), None);
        assert_eq!(Client::within(0, 4096, 1, 4096), None);
        assert_eq!(Client::within(u64::MAX, 0, 8, 4096), None);
        assert_eq!(
            Client::within(4096 + (u64::MAX >> 1), 4096, usize::MAX, 4096),
            None
        );
        assert_eq!(Client::within(4096, 4096, usize::MAX, 4096), None);
    }

    #[test]
    fn uris_in_qemu_and_libnbd_syntax() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/d.sock").unwrap();
        assert_eq!(u.transport, Transport::Unix("/run/d.sock".into()));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd+unix://?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(u.transport, Transport::Unix("/tmp/a b.sock".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://example.com:10810/my%2Fexport").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "example.com".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "my/export");
        let u = NbdUri::parse("nbd://[::1]/x").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "::1".into(),
                port: 10809
            }
        );
        let u = NbdUri::parse("nbd://[::1]:99").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        for (bad, why) in [
            ("nbds://host/x", "TLS"),
            ("nbd+vsock://3/x", "not supported"),
            ("nbd+unix:///x", "socket"),
            ("nbd://host/x?socket=/a", "socket= belongs"),
            ("nbd://host:port/x", "bad port"),
            (
                "nbd+unix:///x?socket=/a&tls-certificates=/c",
                "not supported",
            ),
            ("nbd+unix://host/x?socket=/a", "no host"),
            ("nbd:///x", "no host"),
            ("/path/disk.raw", "not an NBD URI"),
        ] {
            let e = NbdUri::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(is_uri("nbd://h") && is_uri("nbd+unix:///?socket=s") && !is_uri("disk.raw"));
    }
}
