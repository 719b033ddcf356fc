//! The NBD protocol on the wire: constants named as in the NBD project's
//! `doc/proto.md`, and the encoding and decoding of its messages. Integers
//! are big-endian. Nothing here does I/O beyond reading or writing one
//! message on a stream, so it serves the server and a client alike.

use std::io::{self, Read, Write};

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic of every option.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// The magic of option replies.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a (compact) request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported on reads.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: connections share one cache (flush is global).
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose the export and start transmission (no reply on error).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and start transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: an export's name.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: information about an export.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: a metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Option reply error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// Option reply error: refused by policy.
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) | 2;
/// Option reply error: syntactically invalid.
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Option reply error: unknown export.
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// Option reply error: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;
/// Option reply error: too big.
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

/// Information type: size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Information type: the export's name.
pub const NBD_INFO_NAME: u16 = 1;
/// Information type: a description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write.
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: cache (prefetch).
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes without punching a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment the read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail fast instead of writing zeroes slowly.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: the last chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: nothing (the final chunk).
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: a hole (zeros) at an offset.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type: block status descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: an error.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Structured reply type: an error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` flag: not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag: dirty.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// Error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Error: input/output error.
pub const NBD_EIO: u32 = 5;
/// Error: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Error: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// Error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error: not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Error: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// The longest option payload a server accepts (a string is at most 4096
/// bytes; a few of them fit).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The largest read or write request a server accepts (32 MiB, QEMU's).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The longest string the protocol allows.
pub const MAX_STRING: usize = 4096;

/// A protocol violation by the other side: the connection is dropped.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the other side closed the connection")]
    /// End of stream where a message should start.
    Closed,
    #[error("I/O error on the connection: {0}")]
    /// The stream failed.
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    /// The other side broke the protocol.
    Protocol(String),
}

fn read_exact_or_closed<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => {
                return Err(WireError::Protocol(format!(
                    "the connection closed in the middle of a message ({got} of {} bytes)",
                    buf.len()
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_be_bytes(w)
}

/// An option the client sent during negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    /// `NBD_OPT_*`.
    pub code: u32,
    /// Its payload.
    pub data: Vec<u8>,
}

/// Read one option (header and payload); a payload over `MAX_OPTION_LEN`
/// is a protocol error.
pub fn read_option<R: Read>(r: &mut R) -> Result<Opt, WireError> {
    let mut h = [0u8; 16];
    read_exact_or_closed(r, &mut h)?;
    parse_option_header(&h).and_then(|(code, len)| {
        let mut data = vec![0u8; len as usize];
        read_exact_or_closed(r, &mut data)?;
        Ok(Opt { code, data })
    })
}

/// Check an option header: the magic, then `(option, payload length)`.
pub fn parse_option_header(h: &[u8; 16]) -> Result<(u32, u32), WireError> {
    if be64(h) != NBD_OPTS_MAGIC {
        return Err(WireError::Protocol(format!(
            "option magic {:#x} instead of IHAVEOPT",
            be64(h)
        )));
    }
    let (code, len) = (be32(&h[8..]), be32(&h[12..]));
    if len > MAX_OPTION_LEN {
        return Err(WireError::Protocol(format!(
            "option {code} with {len} bytes of data (at most {MAX_OPTION_LEN})"
        )));
    }
    Ok((code, len))
}

/// Write an option reply.
pub fn write_option_reply<W: Write>(
    w: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&reply.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// A transmission request (the header; a write's payload follows it on
/// the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// The client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// Decode a 28-byte request header.
pub fn parse_request(h: &[u8; 28]) -> Result<Request, WireError> {
    let magic = be32(h);
    if magic != NBD_REQUEST_MAGIC {
        return Err(WireError::Protocol(format!(
            "request magic {magic:#x} instead of {NBD_REQUEST_MAGIC:#x}"
        )));
    }
    Ok(Request {
        flags: be16(&h[4..]),
        kind: be16(&h[6..]),
        handle: be64(&h[8..]),
        offset: be64(&h[16..]),
        len: be32(&h[24..]),
    })
}

/// Read a request header.
pub fn read_request<R: Read>(r: &mut R) -> Result<Request, WireError> {
    let mut h = [0u8; 28];
    read_exact_or_closed(r, &mut h)?;
    parse_request(&h)
}

/// Encode a request header (for clients and tests).
pub fn encode_request(q: &Request) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&q.flags.to_be_bytes());
    h[6..8].copy_from_slice(&q.kind.to_be_bytes());
    h[8..16].copy_from_slice(&q.handle.to_be_bytes());
    h[16..24].copy_from_slice(&q.offset.to_be_bytes());
    h[24..28].copy_from_slice(&q.len.to_be_bytes());
    h
}

/// A simple reply (header, then `data` for a read).
pub fn simple_reply(error: u32, handle: u64, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// The header of a structured reply chunk of `len` payload bytes.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

/// A structured error chunk (final) with a message for people.
pub fn error_chunk(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    let mut m = chunk_header(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    )
    .to_vec();
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    m.extend_from_slice(msg);
    m
}

/// A cursor over an option's payload: every read is bounds-checked, so a
/// short or lying payload is an `NBD_REP_ERR_INVALID`, never a panic.
pub struct Payload<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Payload<'a> {
    /// Read `data` from the start.
    pub fn new(data: &'a [u8]) -> Payload<'a> {
        Payload { data, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }

    /// A string of `len` bytes (UTF-8, at most 4096 bytes).
    pub fn string(&mut self, len: u32) -> Option<String> {
        if len as usize > MAX_STRING {
            return None;
        }
        let b = self.take(len as usize)?;
        String::from_utf8(b.to_vec()).ok()
    }

    /// A u32 length, then that many bytes of string.
    pub fn lstring(&mut self) -> Option<String> {
        let n = self.u32()?;
        self.string(n)
    }

    /// True when every byte was read.
    pub fn is_done(&self) -> bool {
        self.pos == self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let q = Request {
            flags: NBD_CMD_FLAG_FUA,
            kind: NBD_CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 65536,
        };
        let h = encode_request(&q);
        assert_eq!(&h[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(parse_request(&h).unwrap(), q);
        let mut bad = h;
        bad[0] ^= 1;
        assert!(matches!(parse_request(&bad), Err(WireError::Protocol(_))));
        // A stream that ends inside a header.
        let mut short = &h[..10];
        assert!(matches!(
            read_request(&mut short),
            Err(WireError::Protocol(_))
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(read_request(&mut empty), Err(WireError::Closed)));
    }

    #[test]
    fn option_headers_and_replies() {
        let mut m = Vec::new();
        m.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        m.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        m.extend_from_slice(&3u32.to_be_bytes());
        m.extend_from_slice(b"abc");
        let o = read_option(&mut &m[..]).unwrap();
        assert_eq!(
            o,
            Opt {
                code: NBD_OPT_GO,
                data: b"abc".to_vec()
            }
        );
        // An option claiming a huge payload is refused before reading it.
        let mut big = m.clone();
        big[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(read_option(&mut &big[..]).is_err());
        let mut out = Vec::new();
        write_option_reply(&mut out, NBD_OPT_GO, NBD_REP_ACK, b"").unwrap();
        assert_eq!(out.len(), 20);
        assert_eq!(&out[..8], &NBD_REP_MAGIC.to_be_bytes());
        assert_eq!(be32(&out[12..]), NBD_REP_ACK);
        // Known byte patterns from the specification.
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&NBD_OPTS_MAGIC.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn replies_have_their_layout() {
        let s = simple_reply(NBD_EIO, 7, b"");
        assert_eq!(s.len(), 16);
        assert_eq!(be32(&s), NBD_SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&s[4..]), NBD_EIO);
        assert_eq!(be64(&s[8..]), 7);
        let e = error_chunk(9, NBD_EINVAL, "bad");
        assert_eq!(be32(&e), NBD_STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&e[4..]), NBD_REPLY_FLAG_DONE);
        assert_eq!(be16(&e[6..]), NBD_REPLY_TYPE_ERROR);
        assert_eq!(be32(&e[16..]), 9);
        assert_eq!(be32(&e[20..]), NBD_EINVAL);
        assert_eq!(be16(&e[24..]), 3);
        assert_eq!(&e[26..], b"bad");
    }

    #[test]
    fn payloads_never_read_past_their_end() {
        let mut p = Payload::new(&[0, 0, 0, 5, b'a', b'b']);
        assert_eq!(p.lstring(), None);
        let mut p = Payload::new(&[0, 0, 0, 2, b'a', b'b', 0, 1]);
        assert_eq!(p.lstring().as_deref(), Some("ab"));
        assert_eq!(p.u16(), Some(1));
        assert!(p.is_done());
        assert_eq!(p.u32(), None);
    }

    proptest::proptest! {
        /// Any 28 bytes either parse as a request whose encoding gives them
        /// back, or are refused; never a panic.
        #[test]
        fn the_request_parser_takes_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 28)) {
            let mut h = [0u8; 28];
            h.copy_from_slice(&bytes);
            if let Ok(q) = parse_request(&h) {
                proptest::prop_assert_eq!(encode_request(&q), h);
            }
            let mut with_magic = h;
            with_magic[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
            let q = parse_request(&with_magic);
            proptest::prop_assert!(q.is_ok());
        }

        /// Any option payload read with any sequence of field reads stays
        /// in bounds.
        #[test]
        fn payload_reads_stay_in_bounds(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64), ops in proptest::collection::vec(0u8..4, 0..16)) {
            let mut p = Payload::new(&data);
            for op in ops {
                match op {
                    0 => { p.u16(); }
                    1 => { p.u32(); }
                    2 => { p.lstring(); }
                    _ => { p.string(3); }
                }
            }
        }
    }
}
