//! One qcow2 layer, read-only.
//!
//! How it reads (../docs/qcow2.md):
//! * the header is validated first ([`Header::parse`]); the qcow2-rs crate
//!   loads a normalized copy of it (no backing file, no extensions) and the
//!   image's tables once at open time, as a second opinion, through our
//!   file I/O (every short read an error);
//! * L1 entries and L2 entries are checked before any data is read
//!   (alignment, inside the file, not on metadata), so a damaged image fails
//!   with the guest offset named instead of reading garbage or zeros;
//! * clusters are mapped here, from the raw L2 tables read to check them
//!   (one bounded cache per layer, no lock held while reading data): a
//!   chain of 30 layers asks 30 tables, not 30 devices;
//! * data clusters are read with one `pread` per run of contiguous host
//!   clusters; compressed clusters (deflate, zstd) are inflated here.
//!
//! The layer answers for itself only: clusters it does not allocate are
//! [`Status::Unallocated`] and read as zeros here; the chain node decides what
//! lies below.

use super::header::{Header, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::{BlockError, Op, Result};
use crate::node::{BlockNode, Extent, Status, check_range};
use futures::executor::block_on;
use qcow2_rs::dev::{Qcow2Dev, Qcow2DevParams};
use qcow2_rs::error::Qcow2Result;
use qcow2_rs::meta::Qcow2Header;
use qcow2_rs::ops::Qcow2IoOps;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of L2 cache of the crate's device (used at open time).
const L2_CACHE_BYTES: usize = 512 << 10;
/// Bytes of raw L2 tables the adapter keeps to validate entries.
const RAW_L2_CACHE_BYTES: u64 = 8 << 20;

/// Reserved bits of an L1 entry (QEMU's L1E_RESERVED_MASK).
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (QEMU's L2E_STD_RESERVED_MASK).
const L2E_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Longest run one `block_status` call inspects.
const MAX_STATUS_CLUSTERS: u64 = 16384;

/// File I/O handed to qcow2-rs: positional, read-only, strict.
struct HostIo {
    file: Arc<File>,
    path: PathBuf,
    state: Arc<IoState>,
}

/// What the adapter and its file layer share for one device.
#[derive(Default)]
struct IoState {
    /// While the device loads its tables at open, a short read of the
    /// (unused) refcount table is tolerated; the L1 table was checked to lie
    /// inside the file before.
    lenient: AtomicBool,
    /// The last I/O error, so the adapter can report the real cause.
    last_error: Mutex<Option<BlockError>>,
}

impl HostIo {
    fn fail(&self, err: BlockError) -> qcow2_rs::error::Qcow2Error {
        let msg = err.to_string();
        if let Ok(mut slot) = self.state.last_error.lock() {
            *slot = Some(err);
        }
        msg.as_str().into()
    }
}

impl Qcow2IoOps for HostIo {
    async fn read_to(&self, offset: u64, buf: &mut [u8]) -> Qcow2Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.fail(BlockError::io(
                        Op::Read,
                        &self.path,
                        offset,
                        buf.len() as u64,
                        e,
                    )));
                }
            }
        }
        if done < buf.len() {
            if self.state.lenient.load(Ordering::Relaxed) {
                buf[done..].fill(0);
                return Ok(buf.len());
            }
            let e = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "metadata lies past the end of the file",
            );
            return Err(self.fail(BlockError::io(
                Op::Read,
                &self.path,
                offset,
                buf.len() as u64,
                e,
            )));
        }
        Ok(buf.len())
    }

    async fn write_from(&self, _offset: u64, _buf: &[u8]) -> Qcow2Result<()> {
        Err("imgbackup opens source images read-only".into())
    }

    async fn fallocate(&self, _offset: u64, _len: usize, _flags: u32) -> Qcow2Result<()> {
        Err("imgbackup opens source images read-only".into())
    }

    async fn fsync(&self, _offset: u64, _len: usize, _flags: u32) -> Qcow2Result<()> {
        Ok(())
    }
}

/// The crate's device and the state its file layer shares with us.
struct Dev {
    dev: Qcow2Dev<HostIo>,
    state: Arc<IoState>,
}

/// Maps clusters of one layer in ascending order, holding the current L2
/// table: one cache look-up per L2 span instead of one per cluster.
struct Mapper<'a> {
    layer: &'a Qcow2Layer,
    span: u64,
    idx: usize,
    table: Option<Arc<Vec<u64>>>,
}

impl<'a> Mapper<'a> {
    fn new(layer: &'a Qcow2Layer) -> Mapper<'a> {
        let cs = layer.header.cluster_size();
        Mapper {
            layer,
            span: cs * (cs / 8),
            idx: usize::MAX,
            table: None,
        }
    }

    fn map(&mut self, offset: u64) -> Result<Map> {
        let idx = (offset / self.span) as usize;
        if idx != self.idx {
            self.table = self.layer.l2_table(idx, offset)?;
            self.idx = idx;
        }
        self.layer
            .map_in(self.table.as_deref().map(|v| v.as_slice()), offset)
    }
}

/// Where the data of one cluster comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Map {
    Data(u64),
    Compressed { offset: u64, len: usize },
    Zero,
    Unallocated,
}

impl Map {
    fn status(self) -> Status {
        match self {
            Map::Data(_) | Map::Compressed { .. } => Status::Data,
            Map::Zero => Status::Zero,
            Map::Unallocated => Status::Unallocated,
        }
    }
}

/// A read-only qcow2 layer (no backing: see [`crate::node::chain`]).
pub struct Qcow2Layer {
    // set at open
    path: PathBuf,
    file: Arc<File>,
    file_len: u64,
    header: Header,
    lib_header: Vec<u8>,
    l1: Vec<u64>,
    /// Host clusters that hold metadata (header, L1 and L2 tables, the
    /// refcount table and blocks): a data cluster there is corruption.
    metadata: HashSet<u64>,
    /// L1 entries that are damaged, with why: a read through one of them
    /// fails (as in QEMU, which finds them when it follows them).
    bad_l1: HashMap<usize, String>,
    // behind a lock: raw L2 tables, read to check and decode entries
    raw_l2: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

impl std::fmt::Debug for Qcow2Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Layer")
            .field("path", &self.path)
            .finish()
    }
}

impl Qcow2Layer {
    /// Open `path` (already known to carry the qcow2 magic), validating it.
    pub fn open(path: &Path) -> Result<Qcow2Layer> {
        let (file, kind) = crate::node::probe::open_file(path)?;
        Self::open_file(path, file, kind)
    }

    /// Open the image file `file` of `kind` (a regular file or a block
    /// device holding a qcow2 image), validating it.
    pub fn open_file(path: &Path, file: File, kind: crate::files::Kind) -> Result<Qcow2Layer> {
        let file_len = crate::files::file_len(&file, kind)
            .map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
        // The header cluster: everything the header describes lies in it.
        // Its size is in the header: 64 KiB first (the usual cluster size),
        // the rest when the header names a larger one.
        let mut buf = vec![0u8; (file_len.min(64 << 10)) as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| BlockError::io(Op::Read, path, 0, buf.len() as u64, e))?;
        if let Some(bits) = buf
            .get(20..24)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        {
            let want = file_len.min(2 << 20).min(1u64 << bits.min(21)) as usize;
            if want > buf.len() {
                let have = buf.len();
                buf.resize(want, 0);
                file.read_exact_at(&mut buf[have..], have as u64)
                    .map_err(|e| {
                        BlockError::io(Op::Read, path, have as u64, (want - have) as u64, e)
                    })?;
            }
        }
        let header = Header::parse(path, &buf, file_len)?;
        let cs = header.cluster_size();
        buf.truncate(cs.min(file_len) as usize);

        // Our own copy of the L1 table, to check entries before the crate
        // follows them.
        let n = header.l1_entries_needed().min(u64::from(header.l1_size)) as usize;
        let mut raw = vec![0u8; n * 8];
        file.read_exact_at(&mut raw, header.l1_table_offset)
            .map_err(|e| {
                BlockError::io(Op::Read, path, header.l1_table_offset, raw.len() as u64, e)
            })?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let (metadata, bad_l1) = metadata_clusters(path, &file, &header, &l1, file_len)?;
        // QEMU refuses to open an image whose persistent bitmaps are
        // damaged: so does imgbackup, rather than read what QEMU would not.
        if header.bitmaps.is_some()
            && header.autoclear_features & super::header::AUTOCLEAR_BITMAPS != 0
        {
            crate::bitmap::qcow2::check_image_bitmaps(path).map_err(|e| BlockError::Corrupt {
                path: path.to_path_buf(),
                offset: None,
                detail: format!(
                    "its persistent bitmaps are damaged (QEMU refuses to open it): {e}"
                ),
            })?;
        }

        let layer = Qcow2Layer {
            path: path.to_path_buf(),
            file: Arc::new(file),
            file_len,
            lib_header: header.for_library(),
            header,
            l1,
            metadata,
            bad_l1,
            raw_l2: Mutex::new(HashMap::new()),
        };
        // qcow2-rs loads the image's tables once, as a second opinion at
        // open time (an empty image has no table for it to load); mapping
        // and reads are ours.
        if layer.header.l1_entries_needed() > 0 {
            drop(layer.new_dev()?);
        }
        Ok(layer)
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Length of the image file on the host.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    fn new_dev(&self) -> Result<Dev> {
        let lib_err = |e: qcow2_rs::error::Qcow2Error| BlockError::Corrupt {
            path: self.path.clone(),
            offset: None,
            detail: format!("qcow2 library refused the image: {e}"),
        };
        let h = Qcow2Header::from_buf(&self.lib_header).map_err(lib_err)?;
        let bits = (self.header.cluster_bits as u8).min(12);
        let params = Qcow2DevParams::new(
            9,
            Some((bits, 2usize << bits)),
            Some((bits, L2_CACHE_BYTES.max(2usize << bits))),
            true,
            false,
        );
        let state = Arc::new(IoState {
            lenient: AtomicBool::new(true),
            last_error: Mutex::new(None),
        });
        let io = HostIo {
            file: self.file.clone(),
            path: self.path.clone(),
            state: state.clone(),
        };
        let dev = Dev {
            dev: Qcow2Dev::new(&self.path, h, &params, io).map_err(lib_err)?,
            state,
        };
        block_on(dev.dev.qcow2_prep_io()).map_err(|e| self.lib_error(&dev, None, e))?;
        dev.state.lenient.store(false, Ordering::Relaxed);
        Ok(dev)
    }

    /// Turn a crate error into ours, preferring the I/O error our file layer saw.
    fn lib_error(
        &self,
        dev: &Dev,
        guest: Option<u64>,
        e: qcow2_rs::error::Qcow2Error,
    ) -> BlockError {
        if let Some(err) = dev.state.last_error.lock().ok().and_then(|mut s| s.take()) {
            return match (err, guest) {
                (BlockError::Io { source, offset, .. }, Some(g)) => BlockError::Corrupt {
                    path: self.path.clone(),
                    offset: Some(g),
                    detail: format!(
                        "cannot read the L2 table at host offset {offset:#x}: {source}"
                    ),
                },
                (err, _) => err,
            };
        }
        BlockError::Corrupt {
            path: self.path.clone(),
            offset: guest,
            detail: e.to_string(),
        }
    }

    /// The raw L2 table at host offset `l2_off` (validated at open to be
    /// aligned and inside the file).
    fn raw_l2_table(&self, l2_off: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self
            .raw_l2
            .lock()
            .ok()
            .and_then(|c| c.get(&l2_off).cloned())
        {
            return Ok(t);
        }
        let cs = self.header.cluster_size();
        let mut raw = vec![0u8; cs as usize];
        self.file
            .read_exact_at(&mut raw, l2_off)
            .map_err(|e| BlockError::io(Op::Read, &self.path, l2_off, cs, e))?;
        let t: Arc<Vec<u64>> = Arc::new(
            raw.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        );
        if let Ok(mut c) = self.raw_l2.lock() {
            if (c.len() as u64 + 1) * cs > RAW_L2_CACHE_BYTES {
                c.clear();
            }
            c.insert(l2_off, t.clone());
        }
        Ok(t)
    }

    /// Check the raw L2 entry `e` of the cluster at `offset` (see
    /// [`check_l2_entry`]).
    fn check_entry(&self, e: u64, offset: u64) -> Result<()> {
        let image = EntryImage {
            cluster_bits: self.header.cluster_bits,
            version: self.header.version,
            size: self.header.size,
            file_len: self.file_len,
            metadata: &self.metadata,
        };
        check_l2_entry(e, offset, &image).map_err(|detail| BlockError::Corrupt {
            path: self.path.clone(),
            offset: Some(offset),
            detail,
        })
    }

    /// True when the L1 entry covering `offset` points to no L2 table (the
    /// whole span reads through to the backing file).
    /// True if any cluster of this layer is stored compressed (reads
    /// the L2 tables, not the data; stops at the first one found).
    pub fn any_compressed(&self) -> Result<bool> {
        let cs = self.header.cluster_size();
        let span = cs * (cs / 8);
        for idx in 0..self.l1.len() {
            if let Some(t) = self.l2_table(idx, idx as u64 * span)?
                && t.iter().any(|e| e & OFLAG_COMPRESSED != 0)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn l1_empty(&self, offset: u64) -> bool {
        let cs = self.header.cluster_size();
        let idx = (offset / (cs * (cs / 8))) as usize;
        self.l1.get(idx).copied().unwrap_or(0) & OFFSET_MASK == 0
    }

    /// The raw L2 table of the L1 entry `idx` (None: the entry is empty,
    /// its span unallocated). A damaged L1 entry fails here, as in QEMU.
    fn l2_table(&self, idx: usize, offset: u64) -> Result<Option<Arc<Vec<u64>>>> {
        let l2_off = self.l1.get(idx).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(None);
        }
        // The L1 entries were checked at open (metadata_clusters).
        if let Some(why) = self.bad_l1.get(&idx) {
            return Err(BlockError::Corrupt {
                path: self.path.clone(),
                offset: Some(offset),
                detail: why.clone(),
            });
        }
        self.raw_l2_table(l2_off).map(Some)
    }

    /// Map the cluster containing `offset` whose L2 table is `table`,
    /// checking what the image says: the L2 entry is decoded here
    /// (docs/interop/qcow2.rst, "Cluster mapping").
    fn map_in(&self, table: Option<&[u64]>, offset: u64) -> Result<Map> {
        let Some(t) = table else {
            return Ok(Map::Unallocated);
        };
        let cs = self.header.cluster_size();
        let e = t
            .get(((offset / cs) % (cs / 8)) as usize)
            .copied()
            .unwrap_or(0);
        if e == 0 {
            return Ok(Map::Unallocated);
        }
        self.check_entry(e, offset)?;
        let corrupt = |detail: String| BlockError::Corrupt {
            path: self.path.clone(),
            offset: Some(offset),
            detail,
        };
        match decode_l2_entry(e, self.header.cluster_bits) {
            Err(()) => Err(corrupt(format!("L2 entry {e:#x} cannot be decoded"))),
            Ok(Map::Compressed { offset: off, .. }) if off >= self.file_len => {
                Err(corrupt(format!(
                    "L2 entry points to compressed data at {off:#x}, past the end of the file ({} bytes)",
                    self.file_len
                )))
            }
            Ok(m) => Ok(m),
        }
    }

    fn read_compressed(&self, offset: u64, len: usize, out: &mut [u8], guest: u64) -> Result<()> {
        let cs = self.header.cluster_size() as usize;
        let avail = (self.file_len - offset).min(len as u64) as usize;
        let mut comp = vec![0u8; avail];
        self.file
            .read_exact_at(&mut comp, offset)
            .map_err(|e| BlockError::io(Op::Read, &self.path, offset, avail as u64, e))?;
        let mut cluster = vec![0u8; cs];
        if !decompress_cluster(self.header.compression_type, &comp, &mut cluster) {
            return Err(BlockError::Corrupt {
                path: self.path.clone(),
                offset: Some(guest),
                detail: format!(
                    "compressed cluster at host offset {offset:#x} does not inflate to a full cluster"
                ),
            });
        }
        let in_cluster = (guest % cs as u64) as usize;
        out.copy_from_slice(&cluster[in_cluster..in_cluster + out.len()]);
        Ok(())
    }
}

/// Decompress one cluster (`out` is its size) from `comp`, the bytes its
/// descriptor names (whole sectors: a zstd frame may be followed by
/// padding). `compression_type` is the header's: 0 deflate, 1 zstd. False
/// when the data does not give exactly one full cluster; for zstd, as
/// QEMU's qcow2_zstd_decompress, also when the frame does not end there.
pub(crate) fn decompress_cluster(compression_type: u8, comp: &[u8], out: &mut [u8]) -> bool {
    match compression_type {
        // One decompressor per thread, reset for each cluster (a new one
        // per cluster costs its allocation every time).
        0 => {
            thread_local! {
                static INFLATE: std::cell::RefCell<flate2::Decompress> =
                    std::cell::RefCell::new(flate2::Decompress::new(false));
            }
            INFLATE.with(|d| {
                let mut d = d.borrow_mut();
                d.reset(false);
                let res = d.decompress(comp, out, flate2::FlushDecompress::Finish);
                res.is_ok() && d.total_out() as usize == out.len()
            })
        }
        1 => {
            use zstd::stream::raw::Decoder;
            thread_local! {
                static ZSTD: std::cell::RefCell<Option<Decoder<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            ZSTD.with(|slot| {
                let mut slot = slot.borrow_mut();
                if slot.is_none() {
                    *slot = Decoder::new().ok();
                }
                match slot.as_mut() {
                    Some(d) => {
                        let ok = zstd_cluster(d, comp, out);
                        // A failed frame may leave the context mid-frame.
                        if !ok {
                            *slot = None;
                        }
                        ok
                    }
                    None => false,
                }
            })
        }
        _ => false,
    }
}

/// Decompress one zstd frame `comp` into exactly `out` with `d`, reset
/// first.
fn zstd_cluster(d: &mut zstd::stream::raw::Decoder<'static>, comp: &[u8], out: &mut [u8]) -> bool {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    if d.reinit().is_err() {
        return false;
    }
    let mut input = InBuffer::around(comp);
    let mut output = OutBuffer::around(out);
    let mut last = 1;
    while output.pos() < output.capacity() {
        let (in_before, out_before) = (input.pos(), output.pos());
        match d.run(&mut input, &mut output) {
            Ok(hint) => last = hint,
            Err(_) => return false,
        }
        if input.pos() <= in_before && output.pos() <= out_before {
            return false;
        }
    }
    last == 0
}

/// What checking an L2 entry needs to know of its image.
struct EntryImage<'a> {
    cluster_bits: u32,
    version: u32,
    /// Virtual size, bytes.
    size: u64,
    /// Length of the image file, bytes.
    file_len: u64,
    /// Host clusters holding metadata.
    metadata: &'a HashSet<u64>,
}

/// What the (checked) L2 entry `e` of an image with `cluster_bits` maps its
/// cluster to. A compressed cluster's descriptor holds the host offset in
/// bits 0..x-1 and the number of 512-byte sectors beyond the first in bits
/// x..61, x = 62 - (cluster_bits - 8); its data runs from the offset to the
/// end of the last sector. A standard cluster with the zero flag reads as
/// zeros (preallocated or not); without a host offset it is unallocated.
fn decode_l2_entry(e: u64, cluster_bits: u32) -> std::result::Result<Map, ()> {
    if !(9..=21).contains(&cluster_bits) {
        return Err(());
    }
    if e & OFLAG_COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let host = e & ((1u64 << shift) - 1);
        let sectors = ((e >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        return Ok(Map::Compressed {
            offset: host,
            len: len as usize,
        });
    }
    if e & OFLAG_ZERO != 0 {
        return Ok(Map::Zero);
    }
    match e & OFFSET_MASK {
        0 => Ok(Map::Unallocated),
        host => Ok(Map::Data(host)),
    }
}

/// Check the L2 entry `e` of the cluster at guest `offset` the way `qemu-img
/// check` does: reserved bits, alignment, a zero flag in a version 2 image,
/// a compressed cluster marked COPIED, data inside the file and not on top
/// of metadata. The error says what is wrong.
fn check_l2_entry(e: u64, offset: u64, img: &EntryImage<'_>) -> std::result::Result<(), String> {
    let cs = 1u64 << img.cluster_bits;
    if e & OFLAG_COMPRESSED != 0 {
        if e & OFLAG_COPIED != 0 {
            return Err(format!("compressed L2 entry {e:#x} has the COPIED flag"));
        }
        let shift = 62 - (img.cluster_bits - 8);
        let host = e & ((1u64 << shift) - 1);
        let sectors = ((e >> shift) & ((1u64 << (img.cluster_bits - 8)) - 1)) + 1;
        let end = (host & !511) + sectors * 512;
        let (first, last) = (host / cs, (end - 1) / cs);
        if (first..=last).any(|c| img.metadata.contains(&c)) {
            return Err(format!(
                "compressed data at host offset {host:#x} overlaps the image's metadata"
            ));
        }
        return Ok(());
    }
    if e & L2E_STD_RESERVED != 0 {
        return Err(format!("L2 entry {e:#x} has reserved bits set"));
    }
    let host = e & OFFSET_MASK;
    if e & OFLAG_ZERO != 0 && img.version < 3 {
        return Err(format!("zero-cluster L2 entry {e:#x} in a version 2 image"));
    }
    if host == 0 {
        return Ok(());
    }
    if !host.is_multiple_of(cs) {
        return Err(format!(
            "L2 entry {e:#x} points to an unaligned cluster ({host:#x})"
        ));
    }
    if img.metadata.contains(&(host / cs)) {
        return Err(format!(
            "L2 entry points to host cluster {host:#x}, which holds the image's metadata"
        ));
    }
    if e & OFLAG_ZERO == 0 {
        let in_image = (img.size - (offset - offset % cs)).min(cs);
        if host.saturating_add(in_image) > img.file_len {
            return Err(format!(
                "L2 entry points to a data cluster at {host:#x}, past the end of the file ({} bytes)",
                img.file_len
            ));
        }
    }
    Ok(())
}

/// The host clusters holding metadata, and the L1 entries that are damaged
/// (checked the way `qemu-img check` does: reserved bits, alignment, inside
/// the file, no L2 table shared by two L1 entries or placed on other
/// metadata).
fn metadata_clusters(
    path: &Path,
    file: &File,
    h: &Header,
    l1: &[u64],
    file_len: u64,
) -> Result<(HashSet<u64>, HashMap<usize, String>)> {
    let cs = h.cluster_size();
    let mut meta = HashSet::new();
    let add_range = |meta: &mut HashSet<u64>, start: u64, bytes: u64| {
        if bytes > 0 {
            for c in start / cs..=(start + bytes - 1) / cs {
                meta.insert(c);
            }
        }
    };
    add_range(&mut meta, 0, cs);
    add_range(&mut meta, h.l1_table_offset, u64::from(h.l1_size) * 8);
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    add_range(&mut meta, h.refcount_table_offset, rt_bytes);
    // Refcount blocks, from the refcount table (at most 8 MiB, checked by
    // the header); a table past the end of the file is read as far as it
    // goes (the rest is unused).
    let avail = file_len
        .saturating_sub(h.refcount_table_offset)
        .min(rt_bytes);
    let mut rt = vec![0u8; avail as usize];
    file.read_exact_at(&mut rt, h.refcount_table_offset)
        .map_err(|e| BlockError::io(Op::Read, path, h.refcount_table_offset, avail, e))?;
    for c in rt.chunks_exact(8) {
        let off = u64::from_be_bytes(c.try_into().unwrap_or([0; 8])) & !(cs - 1);
        if off != 0 {
            meta.insert(off / cs);
        }
    }
    let mut bad = HashMap::new();
    let mut l2s = HashSet::new();
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        let why = if e & L1E_RESERVED != 0 {
            Some(format!("L1 entry {i} ({e:#x}) has reserved bits set"))
        } else if l2 == 0 {
            None
        } else if !l2.is_multiple_of(cs) {
            Some(format!(
                "L1 entry {i} points to an unaligned L2 table ({l2:#x})"
            ))
        } else if l2.saturating_add(cs) > file_len {
            Some(format!(
                "L1 entry {i} points to an L2 table at {l2:#x}, past the end of the file ({file_len} bytes)"
            ))
        } else if meta.contains(&(l2 / cs)) || !l2s.insert(l2 / cs) {
            Some(format!(
                "L1 entry {i} points to an L2 table at {l2:#x} that is also other metadata"
            ))
        } else {
            None
        };
        if let Some(w) = why {
            bad.insert(i, w);
        }
    }
    meta.extend(l2s);
    Ok((meta, bad))
}

impl BlockNode for Qcow2Layer {
    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        Some(crate::bitmap::Identity::of(self.path()))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, offset, buf.len() as u64, self.header.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.header.cluster_size();
        let mut mapper = Mapper::new(self);
        {
            let end = offset + buf.len() as u64;
            let mut pos = offset;
            while pos < end {
                let m = mapper.map(pos)?;
                // Extend a data run over clusters whose host clusters follow.
                let mut run_end = ((pos / cs + 1) * cs).min(end);
                if let Map::Data(host) = m {
                    let mut next_host = host + cs;
                    while run_end < end {
                        match mapper.map(run_end)? {
                            Map::Data(h) if h == next_host => {
                                next_host += cs;
                                run_end = (run_end + cs).min(end);
                            }
                            _ => break,
                        }
                    }
                }
                let out = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                match m {
                    Map::Data(host) => {
                        let h = host + pos % cs;
                        self.file.read_exact_at(out, h).map_err(|e| {
                            BlockError::io(Op::Read, &self.path, h, out.len() as u64, e)
                        })?;
                    }
                    Map::Compressed { offset: o, len } => self.read_compressed(o, len, out, pos)?,
                    Map::Zero | Map::Unallocated => out.fill(0),
                }
                pos = run_end;
            }
            Ok(())
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.status(offset, len, true)
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        self.status(offset, len, false)
    }
}

impl Qcow2Layer {
    /// [`BlockNode::block_status`] (`holes`: data clusters over a hole in
    /// the host file are zeros) or [`BlockNode::allocation`].
    fn status(&self, offset: u64, len: u64, holes: bool) -> Result<Extent> {
        check_range(&self.path, offset, len, self.header.size)?;
        let cs = self.header.cluster_size();
        let end = offset + len;
        let mut mapper = Mapper::new(self);
        {
            let first = mapper.map(offset)?;
            let limit = offset.saturating_add(MAX_STATUS_CLUSTERS * cs);
            let mut pos = (offset / cs + 1) * cs;
            if let Map::Data(host) = first {
                // A run of host-contiguous data clusters; where the host file
                // has a hole under it (preallocated, never written), it reads
                // as zeros and needs no I/O.
                let mut next = host + cs;
                while pos < end && pos < limit {
                    match mapper.map(pos)? {
                        Map::Data(h) if h == next => {
                            next += cs;
                            pos += cs;
                        }
                        _ => break,
                    }
                }
                if !holes {
                    return Ok(Extent {
                        status: Status::Data,
                        len: pos.min(end) - offset,
                    });
                }
                let hs = host + offset % cs;
                let he = hs + (pos.min(end) - offset);
                return Ok(crate::node::raw::host_extent(
                    &self.file,
                    hs,
                    he,
                    self.file_len,
                ));
            }
            let status = first.status();
            // A zero L1 entry leaves its whole span unallocated: skipped
            // at once (an empty terabyte is 2048 of them at 64 KiB).
            let l1_span = cs * (cs / 8);
            let skip_empty = |pos: u64| {
                (status == Status::Unallocated && self.l1_empty(pos))
                    .then(|| (pos / l1_span + 1) * l1_span)
            };
            if let Some(next) = skip_empty(offset) {
                pos = next;
            }
            let mut mapped = 1;
            while pos < end && mapped < MAX_STATUS_CLUSTERS {
                if let Some(next) = skip_empty(pos) {
                    pos = next;
                    continue;
                }
                if mapper.map(pos)?.status() != status {
                    break;
                }
                pos += cs;
                mapped += 1;
            }
            Ok(Extent {
                status,
                len: pos.min(end) - offset,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    #[test]
    fn l2_entries_decode_as_the_qcow2_spec_says() {
        // 64 KiB clusters: x = 62 - 8 = 54; 3 more sectors after the first.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x1_2345;
        assert!(matches!(
            decode_l2_entry(e, 16),
            Ok(Map::Compressed {
                offset: 0x1_2345,
                len: 1723
            })
        ));
        // 4 KiB clusters: x = 58, a 4-bit sector count.
        let e = OFLAG_COMPRESSED | (15u64 << 58) | 0x200;
        assert!(matches!(
            decode_l2_entry(e, 12),
            Ok(Map::Compressed {
                offset: 0x200,
                len: 8192
            })
        ));
        assert!(matches!(decode_l2_entry(OFLAG_ZERO, 16), Ok(Map::Zero)));
        assert!(matches!(
            decode_l2_entry(OFLAG_ZERO | OFLAG_COPIED | 0x30000, 16),
            Ok(Map::Zero)
        ));
        assert!(matches!(
            decode_l2_entry(OFLAG_COPIED | 0x30000, 16),
            Ok(Map::Data(0x30000))
        ));
        assert!(matches!(decode_l2_entry(0, 16), Ok(Map::Unallocated)));
        assert!(decode_l2_entry(0, 30).is_err());
    }

    fn check(e: u64, version: u32) -> std::result::Result<(), String> {
        // Clusters 0-3 hold metadata; the file is 16 clusters long.
        let metadata: HashSet<u64> = (0..4).collect();
        let img = EntryImage {
            cluster_bits: 16,
            version,
            size: 64 * CS,
            file_len: 16 * CS,
            metadata: &metadata,
        };
        check_l2_entry(e, 5 * CS, &img)
    }

    #[test]
    fn good_entries_pass() {
        assert_eq!(check(0, 3), Ok(()), "unallocated");
        assert_eq!(check(OFLAG_COPIED | (8 * CS), 3), Ok(()), "data");
        assert_eq!(check(8 * CS, 2), Ok(()), "data without COPIED");
        assert_eq!(check(OFLAG_ZERO, 3), Ok(()), "zero, no host");
        assert_eq!(
            check(OFLAG_ZERO | OFLAG_COPIED | (9 * CS), 3),
            Ok(()),
            "preallocated zero"
        );
        assert_eq!(
            check(OFLAG_COMPRESSED | (10 * CS + 512), 3),
            Ok(()),
            "compressed"
        );
    }

    #[test]
    fn clusters_decompress_from_deflate_and_zstd() {
        use std::io::Write;
        let cluster: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&cluster).unwrap();
        let deflated = e.finish().unwrap();
        let mut zstd = zstd::bulk::compress(&cluster, 3).unwrap();
        let mut out = vec![0u8; cluster.len()];
        assert!(decompress_cluster(0, &deflated, &mut out) && out == cluster);
        out.fill(0);
        assert!(decompress_cluster(1, &zstd, &mut out) && out == cluster);
        // Padding to the sector after the frame is ignored, as in QEMU.
        zstd.resize(zstd.len().div_ceil(512) * 512, 0xaa);
        out.fill(0);
        assert!(decompress_cluster(1, &zstd, &mut out) && out == cluster);
        // A truncated frame, a frame of another size, a damaged frame and
        // an unknown type are refused.
        assert!(!decompress_cluster(1, &zstd[..zstd.len() / 2], &mut out));
        let short = zstd::bulk::compress(&cluster[..4096], 3).unwrap();
        assert!(!decompress_cluster(1, &short, &mut out));
        let mut bad = zstd::bulk::compress(&cluster, 3).unwrap();
        bad[0] ^= 0xff;
        assert!(!decompress_cluster(1, &bad, &mut out));
        assert!(!decompress_cluster(2, &deflated, &mut out));
        // The thread's decompressors start afresh after a failure, whatever
        // it left half done: each good cluster reads back again.
        for _ in 0..2 {
            out.fill(0);
            assert!(decompress_cluster(1, &zstd, &mut out) && out == cluster);
            assert!(!decompress_cluster(
                0,
                &deflated[..deflated.len() / 2],
                &mut out
            ));
            out.fill(0);
            assert!(decompress_cluster(0, &deflated, &mut out) && out == cluster);
            assert!(!decompress_cluster(1, &zstd[..zstd.len() / 3], &mut out));
        }
        let other: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&other).unwrap();
        let other_deflated = e.finish().unwrap();
        out.fill(0);
        assert!(decompress_cluster(0, &other_deflated, &mut out) && out == other);
        out.fill(0);
        assert!(decompress_cluster(0, &deflated, &mut out) && out == cluster);
    }

    #[test]
    fn damaged_entries_are_named() {
        let cases = [
            ((1u64 << 56) | (8 * CS), 3, "reserved bits"),
            (OFLAG_COPIED | (8 * CS + 512), 3, "unaligned"),
            (OFLAG_COPIED | (2 * CS), 3, "metadata"),
            (OFLAG_COPIED | (16 * CS), 3, "past the end of the file"),
            (OFLAG_ZERO, 2, "version 2"),
            (OFLAG_COMPRESSED | OFLAG_COPIED | (10 * CS), 3, "COPIED"),
            (
                OFLAG_COMPRESSED | (3 * CS),
                3,
                "overlaps the image's metadata",
            ),
        ];
        for (e, version, what) in cases {
            match check(e, version) {
                Err(msg) => assert!(msg.contains(what), "{e:#x}: {msg}"),
                Ok(()) => panic!("{e:#x} (version {version}) passed; want {what}"),
            }
        }
    }
}
