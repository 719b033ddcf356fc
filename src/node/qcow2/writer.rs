//! imgbackup's writer for *new* qcow2 files (backup targets, overlays,
//! fleecing targets).
//!
//! The file is written in one pass:
//! * cluster 0 is reserved for the header and stays zero until the end, so a
//!   half-written file is never a valid image;
//! * data clusters are appended from any thread: a host range is reserved
//!   with one atomic add, then written with `pwrite` (no global lock);
//! * the L2 tables live in memory (allocated per L1 entry as they are
//!   touched); zero clusters are L2 entries with the zero flag;
//! * [`Qcow2Writer::finish`] appends the L2 tables, the L1 table, the refcount
//!   blocks and table (computed from the actual references, so nothing leaks),
//!   writes the header with the optional backing file name and format, and
//!   syncs the file.
//!
//! Callers serialize writes to one cluster (the block-copy state's range
//! locks do); different clusters may be written concurrently.

use super::header::{
    EXT_BACKING_FORMAT, INCOMPAT_COMPRESSION, MAGIC, MAX_L1_BYTES, OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO,
};
use crate::error::{BlockError, Op, Result};
use crate::node::{BlockNode, Extent, Status, check_range};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts, as qemu-img creates them
const HEADER_LEN: u32 = 112; // v3 header with the compression-type byte, padded
/// The default deflate level of imgbackup's encoder
/// ([`super::deflate`]): no larger than zlib's level 6 (what qemu-img
/// writes) on file-system content and text, at about twice its speed
/// (BENCHMARKS.md).
const DEFLATE_LEVEL: u32 = 6;

/// Options for a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size, bytes.
    pub size: u64,
    /// Cluster size, bytes.
    pub cluster_size: u64,
    /// Backing file name as written into the header, and its format.
    pub backing: Option<(String, String)>,
    /// How clusters written with [`crate::node::WriteFlags::compress`] are compressed
    /// (and the compression type in the header).
    pub compression: Compression,
}

/// How compressed clusters are compressed (`--compress=ALGO[:LEVEL]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Deflate with a 4 KiB window: QEMU's default (zlib) compression type.
    /// Levels 1 to 9.
    Deflate(u32),
    /// zstd (`compression_type=zstd`, an incompatible feature QEMU 5.1 and
    /// later read). Levels 1 to 19.
    Zstd(i32),
}

impl Default for Compression {
    fn default() -> Compression {
        Compression::Deflate(DEFLATE_LEVEL)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Deflate(l) => write!(f, "deflate:{l}"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

impl Compression {
    /// Parse `deflate`, `zstd`, `deflate:LEVEL` or `zstd:LEVEL`.
    pub fn parse(s: &str) -> std::result::Result<Compression, String> {
        let (algo, level) = match s.split_once(':') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let level = |range: std::ops::RangeInclusive<i64>, default: i64| match level {
            None => Ok(default),
            Some(l) => match l.parse::<i64>() {
                Ok(n) if range.contains(&n) => Ok(n),
                _ => Err(format!(
                    "'{l}' is not a {algo} level: give {} to {}",
                    range.start(),
                    range.end()
                )),
            },
        };
        match algo {
            "deflate" | "zlib" => Ok(Compression::Deflate(
                level(1..=9, i64::from(DEFLATE_LEVEL))? as u32,
            )),
            "zstd" => Ok(Compression::Zstd(level(1..=19, 3)? as i32)),
            _ => Err(format!(
                "'{algo}' is not a compression: give deflate or zstd, optionally with a level (zstd:3)"
            )),
        }
    }

    /// The header's compression type (0 zlib, 1 zstd).
    pub fn header_type(self) -> u8 {
        match self {
            Compression::Deflate(_) => 0,
            Compression::Zstd(_) => 1,
        }
    }

    /// Compress one cluster into `out`; the length, or None when it does
    /// not fit (then the cluster is written as it is). Each thread keeps its
    /// compressor (a deflate state, a zstd context): making one per cluster
    /// cost more than compressing it. Deflate is imgbackup's own encoder:
    /// each cluster it writes is first inflated back (zlib-rs, in one call
    /// as QEMU inflates) and compared, and one that does not give back its
    /// bytes is written uncompressed instead (about 8 % of the compression
    /// time).
    fn compress(self, src: &[u8], out: &mut [u8]) -> Option<u64> {
        use std::cell::RefCell;
        thread_local! {
            static DEFLATE: RefCell<(super::deflate::Deflater, Vec<u8>)> =
                RefCell::new((super::deflate::Deflater::new(), Vec::new()));
            static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
        }
        match self {
            Compression::Deflate(level) => DEFLATE.with(|cell| {
                let mut slot = cell.try_borrow_mut().ok()?;
                let (d, back) = &mut *slot;
                let n = d.compress(src, level, out)?;
                #[cfg(test)]
                if DAMAGE_NEXT.with(|f| f.replace(false)) {
                    out[n / 2] ^= 0x10;
                }
                if !inflates_to(&out[..n], src, back) {
                    tracing::warn!(
                        "a compressed cluster did not inflate back to its bytes: written uncompressed"
                    );
                    return None;
                }
                Some(n as u64)
            }),
            Compression::Zstd(level) => ZSTD.with(|cell| {
                let mut slot = cell.try_borrow_mut().ok()?;
                if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                    *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
                }
                let (_, c) = slot.as_mut()?;
                c.compress_to_buffer(src, out).ok().map(|n| n as u64)
            }),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: damage the next deflate stream this thread compresses, as an
    /// encoder bug would, before its check.
    static DAMAGE_NEXT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the deflate stream `comp` inflates, as QEMU inflates a
/// cluster, to exactly `src` (`back` is scratch space).
fn inflates_to(comp: &[u8], src: &[u8], back: &mut Vec<u8>) -> bool {
    back.resize(src.len(), 0);
    super::reader::decompress_cluster(0, comp, back) && back[..] == *src
}

/// Where compressed clusters go: the host bytes `[next, end)` right behind
/// the last piece, and spares: the rests of host clusters that an
/// uncompressed cluster allocated behind them cut short.
#[derive(Debug, Default)]
struct Pack {
    next: u64,
    end: u64,
    spare: Vec<(u64, u64)>,
}

impl Pack {
    /// Rests smaller than this are not kept.
    const MIN_SPARE: u64 = 64;
    /// At most this many rests are kept (the smallest goes first).
    const MAX_SPARES: usize = 64;

    fn keep_spare(&mut self, start: u64, end: u64) {
        if end < start + Self::MIN_SPARE {
            return;
        }
        if self.spare.len() == Self::MAX_SPARES {
            let Some(k) = (0..self.spare.len()).min_by_key(|&k| self.spare[k].1 - self.spare[k].0)
            else {
                return;
            };
            if self.spare[k].1 - self.spare[k].0 >= end - start {
                return;
            }
            self.spare.swap_remove(k);
        }
        self.spare.push((start, end));
    }
}

/// A new qcow2 file being written. See the module documentation.
pub struct Qcow2Writer {
    // set at create
    path: PathBuf,
    file: File,
    size: u64,
    cluster_bits: u32,
    backing: Option<(String, String)>,
    compression: Compression,
    // atomic / behind locks
    next_host: AtomicU64,
    l2: Vec<OnceLock<Box<[AtomicU64]>>>,
    free: Mutex<Vec<u64>>,
    /// Where compressed clusters are packed.
    pack: Mutex<Pack>,
    /// Data writes take turns (see [`crate::node::WriteGate`]).
    gate: crate::node::WriteGate,
    /// Where writeback was last started up to (see [`Qcow2Writer::kick`]).
    kicked: AtomicU64,
    finished: AtomicBool,
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("path", &self.path)
            .finish()
    }
}

impl Qcow2Writer {
    /// Create `path` afresh (a file there is unlinked first, never followed)
    /// as a new qcow2 image, mode 0600.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Qcow2Writer> {
        let file = crate::files::unlink_leftover(path)
            .and_then(|_| crate::files::create_new(path, 0o600))
            .map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
        Self::create_in(path, file, opts)
    }

    /// Make the new, empty `file` (at `path`) a qcow2 image.
    pub fn create_in(path: &Path, file: File, opts: &CreateOptions) -> Result<Qcow2Writer> {
        let cs = opts.cluster_size;
        let invalid = |detail: String| BlockError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(invalid(format!(
                "qcow2 cluster size {cs} must be a power of two between 512 and 2M"
            )));
        }
        let l2_span = cs * (cs / 8);
        let l1_entries = opts.size.div_ceil(l2_span);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(invalid(format!(
                "virtual size {} is too large for {cs}-byte clusters; use a larger --output-cluster-size",
                opts.size
            )));
        }
        if let Some((name, fmt)) = &opts.backing {
            let need =
                HEADER_LEN as u64 + 8 + (fmt.len() as u64).div_ceil(8) * 8 + 8 + name.len() as u64;
            if name.len() > 1023 || need > cs {
                return Err(invalid(format!(
                    "backing file name '{name}' is too long for a {cs}-byte header cluster"
                )));
            }
        }
        let mut l2 = Vec::with_capacity(l1_entries as usize);
        l2.resize_with(l1_entries as usize, OnceLock::new);
        Ok(Qcow2Writer {
            path: path.to_path_buf(),
            file,
            size: opts.size,
            cluster_bits: cs.trailing_zeros(),
            backing: opts.backing.clone(),
            compression: opts.compression,
            next_host: AtomicU64::new(cs),
            l2,
            free: Mutex::new(Vec::new()),
            pack: Mutex::new(Pack::default()),
            gate: crate::node::WriteGate::default(),
            kicked: AtomicU64::new(cs),
            finished: AtomicBool::new(false),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cs() / 8
    }

    fn entry(&self, cluster: u64) -> &AtomicU64 {
        let per = self.l2_entries();
        let table = self.l2[(cluster / per) as usize]
            .get_or_init(|| (0..per).map(|_| AtomicU64::new(0)).collect());
        &table[(cluster % per) as usize]
    }

    fn peek(&self, cluster: u64) -> u64 {
        let per = self.l2_entries();
        match self.l2[(cluster / per) as usize].get() {
            Some(t) => t[(cluster % per) as usize].load(Ordering::Acquire),
            None => 0,
        }
    }

    /// Reserve `n` contiguous host clusters.
    fn alloc(&self, n: u64) -> u64 {
        if n == 1
            && let Some(h) = self.free.lock().ok().and_then(|mut f| f.pop())
        {
            return h;
        }
        self.next_host.fetch_add(n * self.cs(), Ordering::AcqRel)
    }

    fn release(&self, host: u64) {
        if let Ok(mut f) = self.free.lock() {
            f.push(host);
        }
    }

    fn check_open(&self, op: Op) -> Result<()> {
        if self.finished.load(Ordering::Acquire) {
            return Err(BlockError::ReadOnly {
                path: self.path.clone(),
                op,
            });
        }
        Ok(())
    }

    /// Check that `[offset, offset+len)` covers whole clusters (the last one
    /// may end at the virtual size).
    fn check_aligned(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        let end = offset + len;
        if !offset.is_multiple_of(cs) || (!end.is_multiple_of(cs) && end != self.size) {
            return Err(BlockError::Unaligned {
                path: self.path.clone(),
                detail: format!(
                    "request at {offset} of {len} bytes is not aligned to the {cs}-byte clusters of a new qcow2 image"
                ),
            });
        }
        Ok(())
    }

    fn data_host(entry: u64) -> Option<u64> {
        let h = entry & OFFSET_MASK;
        if h != 0 && entry & (OFLAG_ZERO | OFLAG_COMPRESSED) == 0 {
            Some(h)
        } else {
            None
        }
    }

    /// Write the metadata and the header, and sync. After this the image is
    /// complete and the writer refuses further writes.
    pub fn finish(&self) -> Result<()> {
        self.check_open(Op::Flush)?;
        let cs = self.cs();
        let data_end = self.next_host.load(Ordering::Acquire);
        let werr = |off: u64, len: u64, e| BlockError::io(Op::Write, &self.path, off, len, e);

        // 1. L2 tables, after the data.
        let mut l1 = vec![0u64; self.l2.len()];
        let mut pos = data_end;
        let mut buf = vec![0u8; cs as usize];
        for (i, slot) in self.l2.iter().enumerate() {
            let Some(table) = slot.get() else { continue };
            let mut any = false;
            for (j, e) in table.iter().enumerate() {
                let mut v = e.load(Ordering::Acquire);
                if Self::data_host(v).is_some() {
                    v |= OFLAG_COPIED;
                }
                any |= v != 0;
                buf[j * 8..j * 8 + 8].copy_from_slice(&v.to_be_bytes());
            }
            if !any {
                continue;
            }
            self.file
                .write_all_at(&buf, pos)
                .map_err(|e| werr(pos, cs, e))?;
            l1[i] = pos | OFLAG_COPIED;
            pos += cs;
        }
        let l2_end = pos;

        // 2. L1 table.
        let l1_offset = pos;
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|v| v.to_be_bytes()).collect();
        // An empty image has no L1 table (and no cluster for one: qemu-img
        // check would call it leaked).
        let l1_clusters = (l1_bytes.len() as u64).div_ceil(cs);
        if !l1_bytes.is_empty() {
            self.file
                .write_all_at(&l1_bytes, l1_offset)
                .map_err(|e| werr(l1_offset, l1_bytes.len() as u64, e))?;
        }
        pos += l1_clusters * cs;

        // 3. Refcount blocks and table, covering every cluster including
        // themselves.
        let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
        let base = pos / cs;
        let (mut blocks, mut rt_clusters) = (0u64, 0u64);
        loop {
            let total = base + blocks + rt_clusters;
            let nb = total.div_ceil(per_block);
            let nrt = (nb * 8).div_ceil(cs);
            if nb == blocks && nrt == rt_clusters {
                break;
            }
            blocks = nb;
            rt_clusters = nrt;
        }
        let total = base + blocks + rt_clusters;
        let mut refs = vec![0u16; total as usize];
        refs[0] = 1; // header
        for slot in self.l2.iter() {
            let Some(table) = slot.get() else { continue };
            for e in table.iter() {
                let v = e.load(Ordering::Acquire);
                if let Some(h) = Self::data_host(v) {
                    refs[(h / cs) as usize] += 1;
                } else if let Some((off, end)) = self.compressed_range(v) {
                    for c in off / cs..end.div_ceil(cs) {
                        refs[c as usize] += 1;
                    }
                }
            }
        }
        for c in (data_end / cs)..(l2_end / cs) {
            refs[c as usize] = 1;
        }
        for c in base - l1_clusters..total {
            refs[c as usize] = 1;
        }
        let rb_offset = base * cs;
        let rt_offset = rb_offset + blocks * cs;
        let mut rt = vec![0u8; (rt_clusters * cs) as usize];
        for b in 0..blocks {
            let first = (b * per_block) as usize;
            let last = ((b + 1) * per_block).min(total) as usize;
            buf.fill(0);
            for (k, r) in refs[first..last].iter().enumerate() {
                buf[k * 2..k * 2 + 2].copy_from_slice(&r.to_be_bytes());
            }
            let off = rb_offset + b * cs;
            self.file
                .write_all_at(&buf, off)
                .map_err(|e| werr(off, cs, e))?;
            rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        self.file
            .write_all_at(&rt, rt_offset)
            .map_err(|e| werr(rt_offset, rt.len() as u64, e))?;
        let file_end = total * cs;
        self.file
            .set_len(file_end)
            .map_err(|e| werr(0, file_end, e))?;

        // 4. Header, last.
        let mut h = vec![0u8; cs as usize];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&self.size.to_be_bytes());
        h[36..40].copy_from_slice(&(l1.len() as u32).to_be_bytes());
        h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
        h[56..60].copy_from_slice(&(rt_clusters as u32).to_be_bytes());
        h[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h[100..104].copy_from_slice(&HEADER_LEN.to_be_bytes());
        if self.compression.header_type() != 0 {
            h[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
            h[104] = self.compression.header_type();
        }
        let mut ext = HEADER_LEN as usize;
        if let Some((name, fmt)) = &self.backing {
            h[ext..ext + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            h[ext + 4..ext + 8].copy_from_slice(&(fmt.len() as u32).to_be_bytes());
            h[ext + 8..ext + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
            ext += 8 + fmt.len().div_ceil(8) * 8;
            ext += 8; // end-of-extensions marker (zeros)
            h[8..16].copy_from_slice(&(ext as u64).to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h[ext..ext + name.len()].copy_from_slice(name.as_bytes());
        }
        self.file.write_all_at(&h, 0).map_err(|e| werr(0, cs, e))?;
        self.file
            .sync_all()
            .map_err(|e| BlockError::io(Op::Flush, &self.path, 0, file_end, e))?;
        self.finished.store(true, Ordering::Release);
        Ok(())
    }

    /// Bits of the host offset in a compressed-cluster descriptor.
    fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// The host byte range `[start, end)` (whole sectors) of a compressed
    /// cluster's descriptor.
    fn compressed_range(&self, entry: u64) -> Option<(u64, u64)> {
        if entry & OFLAG_COMPRESSED == 0 {
            return None;
        }
        let x = self.compressed_offset_bits();
        let desc = entry & !(OFLAG_COPIED | OFLAG_COMPRESSED);
        let off = desc & ((1u64 << x) - 1);
        let sectors = desc >> x;
        Some((off, (off / 512 + sectors + 1) * 512))
    }

    /// Reserve `len` bytes for compressed data. Pieces are packed byte
    /// after byte and may span two host clusters, as QEMU packs them (a
    /// descriptor holds any byte offset and a sector count): when a piece
    /// does not fit, the next host cluster is taken right behind the
    /// current one if nothing else was allocated there meanwhile. When
    /// something was (an uncompressed cluster), the rest of the current one
    /// is kept as a spare, and the next pieces that fit in a spare go there
    /// first; QEMU leaves it unused.
    fn pack(&self, len: u64) -> u64 {
        let cs = self.cs();
        let mut p = match self.pack.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        if let Some(k) = p.spare.iter().position(|&(a, b)| a + len <= b) {
            let at = p.spare[k].0;
            p.spare[k].0 += len;
            if p.spare[k].1 - p.spare[k].0 < Pack::MIN_SPARE {
                p.spare.swap_remove(k);
            }
            return at;
        }
        while p.next == 0 || p.next + len > p.end {
            let behind = p.next != 0
                && self
                    .next_host
                    .compare_exchange(p.end, p.end + cs, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
            if behind {
                p.end += cs;
            } else {
                let start = self.next_host.fetch_add(cs, Ordering::AcqRel);
                let (next, end) = (p.next, p.end);
                p.keep_spare(next, end);
                p.next = start;
                p.end = start + cs;
            }
        }
        let at = p.next;
        p.next += len;
        at
    }

    /// Write whole clusters at `offset` compressed (deflate, as QEMU's zlib
    /// compression type, or zstd); a cluster that does not shrink is written
    /// as is (QEMU's rule: a compressed cluster is at most one byte short of
    /// a cluster).
    fn compress_clusters(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_open(Op::Write)?;
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        self.check_aligned(offset, buf.len() as u64)?;
        let cs = self.cs() as usize;
        let mut out = vec![0u8; cs];
        for (i, piece) in buf.chunks(cs).enumerate() {
            let at = offset + (i * cs) as u64;
            // The last cluster of an image may be short: compress it padded.
            let padded;
            let src = if piece.len() < cs {
                let mut p = vec![0u8; cs];
                p[..piece.len()].copy_from_slice(piece);
                padded = p;
                &padded[..]
            } else {
                piece
            };
            // For deflate, clusters whose bytes are near-uniform (compressed
            // or encrypted data) are written as they are without trying
            // (deflate is slow on them); zstd gives up on such data faster
            // than the test costs. Compressed clusters are kept if they are
            // smaller than the cluster, as QEMU keeps them.
            if matches!(self.compression, Compression::Deflate(_)) && looks_incompressible(src) {
                self.write(at, piece)?;
                continue;
            }
            let Some(len) = self.compression.compress(src, &mut out[..cs - 1]) else {
                self.write(at, piece)?;
                continue;
            };
            let host = self.pack(len);
            self.gate
                .write(&self.file, &out[..len as usize], host)
                .map_err(|e| BlockError::io(Op::Write, &self.path, host, len, e))?;
            let x = self.compressed_offset_bits();
            let sectors = (host + len - 1) / 512 - host / 512;
            let entry = OFLAG_COMPRESSED | (sectors << x) | host;
            let old = self.entry(at / cs as u64).swap(entry, Ordering::AcqRel);
            if let Some(h) = Self::data_host(old) {
                self.release(h);
            }
        }
        Ok(())
    }

    /// Number of host bytes used by data clusters so far.
    pub fn data_bytes(&self) -> u64 {
        self.next_host.load(Ordering::Acquire) - self.cs()
    }
}

impl BlockNode for Qcow2Writer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        self.cs()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        let cs = self.cs();
        let mut pos = offset;
        let end = offset + buf.len() as u64;
        while pos < end {
            let n = ((pos / cs + 1) * cs).min(end) - pos;
            let out = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            let entry = self.peek(pos / cs);
            match (Self::data_host(entry), self.compressed_range(entry)) {
                (Some(h), _) => {
                    let at = h + pos % cs;
                    self.file
                        .read_exact_at(out, at)
                        .map_err(|e| BlockError::io(Op::Read, &self.path, at, n, e))?;
                }
                (None, Some((start, end))) => {
                    let mut comp = vec![0u8; (end - start) as usize];
                    self.file
                        .read_exact_at(&mut comp, start)
                        .map_err(|e| BlockError::io(Op::Read, &self.path, start, end - start, e))?;
                    let mut cluster = vec![0u8; cs as usize];
                    let kind = self.compression.header_type();
                    if !super::reader::decompress_cluster(kind, &comp, &mut cluster) {
                        return Err(BlockError::Corrupt {
                            path: self.path.clone(),
                            offset: Some(pos),
                            detail: format!(
                                "compressed cluster at host offset {start:#x} does not inflate to a full cluster"
                            ),
                        });
                    }
                    let o = (pos % cs) as usize;
                    out.copy_from_slice(&cluster[o..o + n as usize]);
                }
                (None, None) => out.fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_open(Op::Write)?;
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        self.check_aligned(offset, buf.len() as u64)?;
        let cs = self.cs();
        let first = offset / cs;
        let n = (buf.len() as u64).div_ceil(cs);
        // Clusters already holding data are rewritten in place; the others
        // get one contiguous host range.
        let fresh: Vec<u64> = (first..first + n)
            .filter(|&c| Self::data_host(self.peek(c)).is_none())
            .collect();
        if fresh.len() as u64 == n {
            let host = self.alloc(n);
            let res = self.write_padded(host, buf);
            if let Err(e) = res {
                (0..n).for_each(|i| self.release(host + i * cs));
                return Err(e);
            }
            for i in 0..n {
                let old = self.entry(first + i).swap(host + i * cs, Ordering::AcqRel);
                if let Some(h) = Self::data_host(old) {
                    self.release(h);
                }
            }
            return Ok(());
        }
        for i in 0..n {
            let c = first + i;
            let piece = &buf[(i * cs) as usize..(((i + 1) * cs) as usize).min(buf.len())];
            match Self::data_host(self.peek(c)) {
                Some(h) => self.write_padded(h, piece)?,
                None => {
                    let h = self.alloc(1);
                    if let Err(e) = self.write_padded(h, piece) {
                        self.release(h);
                        return Err(e);
                    }
                    self.entry(c).store(h, Ordering::Release);
                }
            }
        }
        Ok(())
    }

    fn write_with(&self, offset: u64, buf: &[u8], flags: crate::node::WriteFlags) -> Result<()> {
        if !flags.compress {
            return self.write(offset, buf);
        }
        self.compress_clusters(offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_open(Op::WriteZeroes)?;
        check_range(&self.path, offset, len, self.size)?;
        self.check_aligned(offset, len)?;
        let cs = self.cs();
        for c in offset / cs..(offset + len).div_ceil(cs) {
            let old = self.entry(c).swap(OFLAG_ZERO, Ordering::AcqRel);
            if let Some(h) = Self::data_host(old) {
                self.release(h);
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_open(Op::Discard)?;
        check_range(&self.path, offset, len, self.size)?;
        self.check_aligned(offset, len)?;
        let cs = self.cs();
        for c in offset / cs..(offset + len).div_ceil(cs) {
            if self.peek(c) != 0 {
                let old = self.entry(c).swap(0, Ordering::AcqRel);
                if let Some(h) = Self::data_host(old) {
                    self.release(h);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(Op::Flush, &self.path, 0, self.size, e))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, offset, len, self.size)?;
        let cs = self.cs();
        let kind = |e: u64| {
            if Self::data_host(e).is_some() || e & OFLAG_COMPRESSED != 0 {
                Status::Data
            } else if e & OFLAG_ZERO != 0 {
                Status::Zero
            } else {
                Status::Unallocated
            }
        };
        let status = kind(self.peek(offset / cs));
        let end = offset + len;
        let mut pos = (offset / cs + 1) * cs;
        while pos < end && kind(self.peek(pos / cs)) == status {
            pos += cs;
        }
        Ok(Extent {
            status,
            len: pos.min(end) - offset,
        })
    }
}

impl Qcow2Writer {
    /// Write `data` at host offset `host`, padding the last cluster with
    /// zeros so every data cluster lies wholly inside the file.
    fn write_padded(&self, host: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs() as usize;
        let whole = data.len() / cs * cs;
        // The last, partial cluster padded with zeros.
        let last = (whole < data.len()).then(|| {
            let mut last = vec![0u8; cs];
            last[..data.len() - whole].copy_from_slice(&data[whole..]);
            last
        });
        // 256 KiB pieces (large buffered writes are slower, see raw.rs),
        // all under one turn of the gate.
        let pieces = data[..whole]
            .chunks(256 << 10)
            .enumerate()
            .map(|(k, piece)| (piece, host + (k * (256 << 10)) as u64))
            .chain(last.as_deref().map(|l| (l, host + whole as u64)));
        self.gate
            .write_pieces(&self.file, pieces)
            .map_err(|(at, len, e)| BlockError::io(Op::Write, &self.path, at, len as u64, e))?;
        if whole > 0 {
            self.kick(host + whole as u64);
        }
        Ok(())
    }

    /// Start writing back what was written up to host offset `end` once
    /// [`WRITEBACK_BATCH`] bytes gathered since the last start: the device
    /// works while the copy goes on, and an incremental's scattered
    /// clusters (written one after another in the host file) do not cost a
    /// writeback request each. What this leaves behind (below the last
    /// start, or the tail) is written by [`Qcow2Writer::finish`]'s sync.
    fn kick(&self, end: u64) {
        let from = self.kicked.load(Ordering::Acquire);
        if end >= from + WRITEBACK_BATCH
            && self
                .kicked
                .compare_exchange(from, end, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            crate::node::start_writeback(&self.file, from, end - from);
        }
    }
}

/// Bytes of data written between two starts of writeback.
const WRITEBACK_BATCH: u64 = 4 << 20;

/// True when `buf` looks incompressible: its byte histogram is close to
/// uniform (more than 7.9 bits of entropy per byte, as compressed or
/// encrypted data has). A cheap test instead of a wasted compression.
fn looks_incompressible(buf: &[u8]) -> bool {
    let mut hist = [0u32; 256];
    for &b in buf {
        hist[b as usize] += 1;
    }
    let n = buf.len() as f64;
    let bits: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    bits > 7.9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deflate_stream_that_does_not_inflate_to_its_cluster_is_refused() {
        // What the self-check behind every compressed cluster catches: a
        // stream that fails to inflate, or inflates to other bytes.
        let mut src = Vec::new();
        let mut i = 0u32;
        while src.len() < 65536 {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12345);
            src.extend_from_slice(format!("cluster {} ", (i >> 16) % 1000).as_bytes());
        }
        src.truncate(65536);
        let mut out = vec![0u8; 65535];
        let n = super::super::deflate::Deflater::new()
            .compress(&src, 6, &mut out)
            .unwrap();
        let mut back = Vec::new();
        assert!(inflates_to(&out[..n], &src, &mut back));
        // another cluster's bytes
        let mut other = src.clone();
        other[40000] ^= 1;
        assert!(!inflates_to(&out[..n], &other, &mut back));
        // damaged streams: a flipped bit in the data, a truncated end (bits
        // after the cluster's last byte, the end-of-block code, are not
        // read: QEMU stops when the cluster is full, and so does the check)
        for at in [0, 1, n / 3, n / 2, n - 40] {
            let mut bad = out[..n].to_vec();
            bad[at] ^= 0x10;
            assert!(!inflates_to(&bad, &src, &mut back), "bit flipped at {at}");
        }
        assert!(!inflates_to(&out[..n - 4], &src, &mut back));
        // and Compression::compress passes a good one through
        let mut out2 = vec![0u8; 65535];
        assert_eq!(
            Compression::Deflate(6).compress(&src, &mut out2),
            Some(n as u64)
        );
        assert_eq!(out2[..n], out[..n]);
    }

    #[test]
    fn a_cluster_whose_stream_fails_its_check_is_written_uncompressed() {
        use crate::node::{BlockNode, WriteFlags};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.qcow2");
        let cs = 65536usize;
        let w = Qcow2Writer::create(
            &path,
            &CreateOptions {
                size: 2 * cs as u64,
                cluster_size: cs as u64,
                backing: None,
                compression: Compression::Deflate(6),
            },
        )
        .unwrap();
        let text: Vec<u8> = (0..2 * cs)
            .map(|i| b"a cluster of text, "[i % 19] ^ (i / 4096) as u8)
            .collect();
        let compress = WriteFlags { compress: true };
        // An encoder bug in the first cluster's stream, none in the second.
        DAMAGE_NEXT.with(|f| f.set(true));
        w.write_with(0, &text[..cs], compress).unwrap();
        w.write_with(cs as u64, &text[cs..], compress).unwrap();
        let compressed = |i: u64| w.entry(i).load(Ordering::Acquire) & OFLAG_COMPRESSED != 0;
        assert!(!compressed(0), "the damaged stream was kept");
        assert!(compressed(1));
        w.finish().unwrap();
        // What qemu-img reads is the data, and the image is clean.
        let raw = d.path().join("c.raw");
        std::fs::write(&raw, &text).unwrap();
        let qemu = |args: &[&str]| {
            let o = std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
        };
        let p = path.to_str().unwrap();
        qemu(&["check", p]);
        qemu(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p,
            raw.to_str().unwrap(),
        ]);
    }
}
