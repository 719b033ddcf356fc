//! Reading manifests, versions 1 and 2.
//!
//! Version 2 (integers big-endian; `docs/manifest.md` has the full text):
//!
//! ```text
//!      0   8  magic "IMGBKMAN"
//!      8   4  format version (2)
//!     12   4  length L of the JSON metadata
//!     16   8  offset T of the run table: 32 + L rounded up to 8
//!     24   8  number of runs R
//!     32   L  JSON metadata (UTF-8), zero padding up to T
//!      T R*16 runs, in chunk order, together covering every chunk:
//!               first chunk (u64), kind << 62 | number of chunks (u64);
//!               kind 0 zero, 1 data, 2 as in the parent's manifest,
//!               3 as the source's backing file reads (digests computed
//!               when needed)
//!  T+R*16 D*32 the digest of every chunk of the data runs, in order
//!     ... 32  sha256 of every byte before it (the manifest's own checksum)
//! ```
//!
//! Version 1: the same 32-byte header with T = 16384 and the number of
//! chunks N at 24, then N digests (sha256) from T, then the checksum.

use super::runs::Kind;
use super::{
    DigestAlgo, Geometry, MAGIC, ManifestError, Meta, RootHasher, Sha, ZeroDigests, unhex,
};
use crate::copy::{ChunkData, ChunkObserver, CopyError};
use crate::node::BlockNode;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;

/// Where a version 1 digest table starts.
pub const V1_TABLE_OFFSET: u64 = 16384;
/// The longest JSON metadata a version 2 manifest may hold.
pub const MAX_META_V2: usize = 1 << 20;
const MAX_META_V1: usize = (V1_TABLE_OFFSET - 32) as usize;
/// Digests read at once.
const BLOCK: u64 = 4096;

/// Offset of the run table of a version 2 manifest whose JSON is `json_len`
/// bytes long.
pub fn run_table_offset(json_len: usize) -> u64 {
    (32 + json_len as u64).div_ceil(8) * 8
}

/// What [`ManifestFile::visit`] hands out, in chunk order.
pub enum Piece<'a> {
    /// Chunks `[first, end)` read as zeros.
    Zero(u64, u64),
    /// The digests of the chunks from `first` on.
    Digests(u64, &'a [Sha]),
}

#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    end: u64,
    kind: Kind,
    /// Index of the run's first digest in the digest area (data runs).
    base: u64,
}

/// A manifest on disk, validated; digests are read on demand.
pub struct ManifestFile {
    /// The manifest file.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: Meta,
    file: File,
    /// The whole file as its checksum was checked, when small enough
    /// ([`KEEP_MAX`], within [`KEEP_BUDGET`]): digests are then read from
    /// these very bytes, not from the file again.
    pub(super) kept: Option<Kept>,
    runs: Vec<Run>,
    digests_at: u64,
    zero: ZeroDigests,
    parent: OnceLock<Result<Box<ManifestFile>, ManifestError>>,
    backing: OnceLock<Result<Arc<dyn BlockNode>, (PathBuf, String)>>,
}

/// The largest manifest kept in memory once opened (a chain's manifests
/// are read many times over, a few digests at a time).
const KEEP_MAX: u64 = 4 << 20;

/// The most bytes of manifests kept in memory at once, all together.
const KEEP_BUDGET: usize = 64 << 20;

/// Bytes of manifests kept in memory now.
static KEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A manifest's bytes kept in memory, counted in [`KEPT`] while they live.
pub(super) struct Kept {
    bytes: Vec<u8>,
    /// What it took of [`KEEP_BUDGET`].
    reserved: usize,
}

impl Kept {
    /// Room for `n` bytes, if [`KEEP_BUDGET`] has them left.
    fn reserve(n: usize) -> Option<Kept> {
        use std::sync::atomic::Ordering;
        KEPT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| {
            (k + n <= KEEP_BUDGET).then_some(k + n)
        })
        .ok()
        .map(|_| Kept {
            bytes: Vec::with_capacity(n),
            reserved: n,
        })
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        KEPT.fetch_sub(self.reserved, std::sync::atomic::Ordering::SeqCst);
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_be_bytes(w)
}

fn be32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_be_bytes(w)
}

/// The metadata of the manifest at `path`, read without checking the
/// digests (cheap at any size): for finding backups, never for trusting
/// one.
pub fn read_meta(path: &Path) -> Option<Meta> {
    let file = File::open(path).ok()?;
    let mut head = [0u8; 32];
    file.read_exact_at(&mut head, 0).ok()?;
    if &head[0..8] != MAGIC {
        return None;
    }
    let max = match be32(&head[8..]) {
        1 => MAX_META_V1,
        2 => MAX_META_V2,
        _ => return None,
    };
    let jl = be32(&head[12..]) as usize;
    if jl > max {
        return None;
    }
    let mut json = vec![0u8; jl];
    file.read_exact_at(&mut json, 32).ok()?;
    serde_json::from_slice(&json).ok()
}

impl ManifestFile {
    /// Open and validate `path` (its checksum, header, metadata and, for
    /// version 2, its run table).
    pub fn open(path: &Path) -> Result<ManifestFile, ManifestError> {
        Self::open_with(path, true)
    }

    /// [`Self::open`]; `keep`: whether a small manifest's bytes may be
    /// kept in memory (otherwise its digests are read from the file).
    pub(super) fn open_with(path: &Path, keep: bool) -> Result<ManifestFile, ManifestError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(ManifestError::Io {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
        };
        let ioerr = |e| ManifestError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let damaged = |d: &str| ManifestError::Damaged {
            path: path.to_path_buf(),
            detail: d.to_string(),
        };
        let len = file.metadata().map_err(ioerr)?.len();
        if len < 64 {
            return Err(damaged("too short"));
        }
        let mut head = [0u8; 32];
        file.read_exact_at(&mut head, 0).map_err(ioerr)?;
        if &head[0..8] != MAGIC {
            return Err(damaged("bad magic (not an imgbackup manifest)"));
        }
        let version = be32(&head[8..]);
        let jl = be32(&head[12..]) as usize;
        let table = be64(&head[16..]);
        let count = be64(&head[24..]);
        // The checksum first: nothing else is trusted before it.
        let mut sum = Sha256::new();
        let body = len - 32;
        let mut kept = if keep && body <= KEEP_MAX {
            Kept::reserve(body as usize)
        } else {
            None
        };
        let mut buf = vec![0u8; (1 << 20).min(body as usize)];
        let mut pos = 0;
        while pos < body {
            let k = (body - pos).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..k], pos).map_err(ioerr)?;
            sum.update(&buf[..k]);
            if let Some(v) = kept.as_mut() {
                v.bytes.extend_from_slice(&buf[..k]);
            }
            pos += k as u64;
        }
        let mut want = [0u8; 32];
        file.read_exact_at(&mut want, body).map_err(ioerr)?;
        if sum.finalize().as_slice() != want {
            return Err(damaged(
                "checksum mismatch: the manifest file is corrupted or truncated",
            ));
        }
        let max = match version {
            1 => MAX_META_V1,
            2 => MAX_META_V2,
            v => {
                return Err(damaged(&format!(
                    "format version {v}; this imgbackup reads versions 1 and 2 (a newer imgbackup wrote it?)"
                )));
            }
        };
        if jl > max || 32 + jl as u64 > len {
            return Err(damaged("bad header"));
        }
        let mut json = vec![0u8; jl];
        file.read_exact_at(&mut json, 32).map_err(ioerr)?;
        let meta: Meta =
            serde_json::from_slice(&json).map_err(|e| damaged(&format!("metadata: {e}")))?;
        if meta.chunk_size == 0
            || !meta.chunk_size.is_power_of_two()
            || meta.virtual_size.div_ceil(meta.chunk_size) != meta.chunks
            || meta.format_version != version
        {
            return Err(damaged("metadata does not match the header"));
        }
        let n = meta.chunks;
        let (runs, digests_at) = if version == 1 {
            if table != V1_TABLE_OFFSET
                || count != n
                || n.checked_mul(32)
                    .and_then(|t| t.checked_add(V1_TABLE_OFFSET + 32))
                    != Some(len)
                || meta.digest != DigestAlgo::Sha256
            {
                return Err(damaged(&format!(
                    "{n} chunks do not fit a version 1 manifest of {len} bytes"
                )));
            }
            let runs = if n == 0 {
                Vec::new()
            } else {
                vec![Run {
                    start: 0,
                    end: n,
                    kind: Kind::Data,
                    base: 0,
                }]
            };
            (runs, V1_TABLE_OFFSET)
        } else {
            let runs = Self::read_runs(&file, path, &meta, jl, table, count, len)?;
            (runs, table + count * 16)
        };
        let zero = Geometry {
            size: meta.virtual_size,
            chunk: meta.chunk_size,
        }
        .zero_digests(meta.digest);
        Ok(ManifestFile {
            path: path.to_path_buf(),
            meta,
            file,
            kept,
            runs,
            digests_at,
            zero,
            parent: OnceLock::new(),
            backing: OnceLock::new(),
        })
    }

    /// Read and check the run table of a version 2 manifest of `len` bytes.
    fn read_runs(
        file: &File,
        path: &Path,
        meta: &Meta,
        jl: usize,
        table: u64,
        r: u64,
        len: u64,
    ) -> Result<Vec<Run>, ManifestError> {
        let damaged = |d: String| ManifestError::Damaged {
            path: path.to_path_buf(),
            detail: d,
        };
        if table != run_table_offset(jl)
            || r.checked_mul(16)
                .and_then(|t| t.checked_add(table + 32))
                .is_none_or(|end| end > len)
            || r != meta.runs
        {
            return Err(damaged("bad run table header".into()));
        }
        let mut raw = vec![0u8; (r * 16) as usize];
        file.read_exact_at(&mut raw, table)
            .map_err(|e| ManifestError::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        let mut runs = Vec::with_capacity(r as usize);
        let (mut next, mut data) = (0u64, 0u64);
        for (k, rec) in raw.chunks_exact(16).enumerate() {
            let start = be64(rec);
            let word = be64(&rec[8..]);
            let count = word & ((1 << 62) - 1);
            let kind = Kind::from_code(word >> 62)
                .ok_or_else(|| damaged(format!("run {k}: unknown kind {}", word >> 62)))?;
            if start != next || count == 0 || count > meta.chunks - start {
                return Err(damaged(format!(
                    "run {k} (chunks {start}+{count}) does not follow the previous one"
                )));
            }
            if kind == Kind::Parent && meta.parent.is_none() {
                return Err(damaged(format!(
                    "run {k} refers to a parent, and the metadata names none"
                )));
            }
            if kind == Kind::Backing && meta.backing_files.is_empty() {
                return Err(damaged(format!(
                    "run {k} refers to a backing file, and the metadata names none"
                )));
            }
            runs.push(Run {
                start,
                end: start + count,
                kind,
                base: data,
            });
            if kind == Kind::Data {
                data += count;
            }
            next = start + count;
        }
        if next != meta.chunks
            || data != meta.data_chunks
            || data
                .checked_mul(32)
                .and_then(|d| d.checked_add(table + r * 16 + 32))
                != Some(len)
        {
            return Err(damaged(format!(
                "the runs cover {next} of {} chunks and hold {data} digests in a file of {len} bytes",
                meta.chunks
            )));
        }
        Ok(runs)
    }

    /// Virtual size and chunk size.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            size: self.meta.virtual_size,
            chunk: self.meta.chunk_size,
        }
    }

    /// The chunk digest algorithm.
    pub fn algo(&self) -> DigestAlgo {
        self.meta.digest
    }

    /// The digests of zero chunks of this manifest.
    pub fn zero_digests(&self) -> ZeroDigests {
        self.zero
    }

    /// Chunks whose digests come from the parent's manifest.
    pub fn parent_chunks(&self) -> u64 {
        self.chunks_of(Kind::Parent)
    }

    /// Open (and check) the manifests of the parents this one refers to,
    /// down the chain, now rather than at the first digest a parent gives.
    /// Errors are left for that first use to report.
    pub fn open_parents(&self) {
        let mut m = self;
        while m.parent_chunks() > 0 {
            match m.parent() {
                Ok(p) => m = p,
                Err(_) => return,
            }
        }
    }

    /// Chunks read from the source's backing file, digested when needed.
    pub fn backing_chunks(&self) -> u64 {
        self.chunks_of(Kind::Backing)
    }

    fn chunks_of(&self, kind: Kind) -> u64 {
        self.runs
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.end - r.start)
            .sum()
    }

    /// The chunk runs `[s, e)` recorded as the parent's (an incremental's
    /// clean chunks: the parent's manifest gives their digests).
    pub fn parent_runs(&self) -> Vec<(u64, u64)> {
        self.runs
            .iter()
            .filter(|r| r.kind == Kind::Parent)
            .map(|r| (r.start, r.end))
            .collect()
    }

    /// The chunk runs recorded as the source's backing file's (`--sync
    /// top`).
    pub fn backing_runs(&self) -> Vec<(u64, u64)> {
        self.runs
            .iter()
            .filter(|r| r.kind == Kind::Backing)
            .map(|r| (r.start, r.end))
            .collect()
    }

    /// Check that every file of the backing chain the backing runs read
    /// from is the one recorded (and open it).
    pub fn check_backing(&self) -> Result<(), ManifestError> {
        self.backing_node().map(|_| ())
    }

    /// The source's backing chain the backing runs read from, opened once
    /// after checking that every file of it is the one recorded.
    fn backing_node(&self) -> Result<&Arc<dyn BlockNode>, ManifestError> {
        let r = self.backing.get_or_init(|| {
            let files = &self.meta.backing_files;
            let Some(first) = files.first() else {
                return Err((self.path.clone(), "is not named".into()));
            };
            for f in files {
                let p = PathBuf::from(&f.path);
                let now = match super::FileBinding::of_path(&p) {
                    Ok(b) => b,
                    Err(e) => return Err((p, format!("cannot be read ({e})"))),
                };
                if let Some(d) = f.file.difference(&now) {
                    return Err((p, format!("changed since the backup ({d})")));
                }
            }
            let p = PathBuf::from(&first.path);
            let fmt = match first.format.as_str() {
                "qcow2" => Some(crate::node::probe::Format::Qcow2),
                "raw" => Some(crate::node::probe::Format::Raw),
                _ => None,
            };
            match crate::node::probe::open_image(&p, fmt) {
                Ok(img) if img.node.size() >= self.meta.virtual_size => Ok(img.node),
                Ok(_) => Err((p, "is smaller than the image".into())),
                Err(e) => Err((p, format!("cannot be opened ({e})"))),
            }
        });
        r.as_ref().map_err(|(p, detail)| ManifestError::Backing {
            path: self.path.clone(),
            backing: p.clone(),
            what: format!("{} chunks", self.backing_chunks()),
            detail: detail.clone(),
        })
    }

    /// Write this (version 2) manifest to `to` with `meta` as its
    /// metadata: the same runs and digests byte for byte, so the same
    /// point-in-time image and root digest. `meta` may change what says
    /// where the backup lives (its file binding, its parent); it must keep
    /// the geometry and counts. Created new and fsynced; the caller renames
    /// it into place.
    pub fn rewrite_meta(&self, meta: &Meta, to: &Path) -> Result<(), ManifestError> {
        let io_err = |e: io::Error| ManifestError::Io {
            path: to.to_path_buf(),
            source: e,
        };
        let m = &self.meta;
        let same = meta.format_version == super::VERSION
            && m.format_version == super::VERSION
            && meta.virtual_size == m.virtual_size
            && meta.chunk_size == m.chunk_size
            && meta.chunks == m.chunks
            && meta.runs == m.runs
            && meta.data_chunks == m.data_chunks
            && meta.digest == m.digest
            && meta.root_digest == m.root_digest;
        if !same {
            return Err(ManifestError::Damaged {
                path: self.path.clone(),
                detail:
                    "internal error: a metadata rewrite may not change what the manifest describes"
                        .into(),
            });
        }
        if meta.parent.is_none() && self.runs.iter().any(|r| r.kind == Kind::Parent) {
            return Err(ManifestError::Damaged {
                path: self.path.clone(),
                detail: "internal error: a manifest that refers to its parent cannot lose it"
                    .into(),
            });
        }
        let json = serde_json::to_vec(meta).map_err(|e| io_err(io::Error::other(e)))?;
        if json.len() > MAX_META_V2 {
            return Err(io_err(io::Error::other("manifest metadata too long")));
        }
        let table = run_table_offset(json.len());
        let body_len = self.meta.runs * 16 + self.meta.data_chunks * 32;
        let old_table = self.digests_at - self.meta.runs * 16;
        let mut head = Vec::with_capacity(table as usize);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&super::VERSION.to_be_bytes());
        head.extend_from_slice(&(json.len() as u32).to_be_bytes());
        head.extend_from_slice(&table.to_be_bytes());
        head.extend_from_slice(&self.meta.runs.to_be_bytes());
        head.extend_from_slice(&json);
        head.resize(table as usize, 0);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(io_err)?;
        let mut out = io::BufWriter::with_capacity(1 << 20, &mut f);
        let mut sum = Sha256::new();
        let mut put = |b: &[u8], out: &mut io::BufWriter<&mut File>| {
            sum.update(b);
            io::Write::write_all(out, b)
        };
        put(&head, &mut out).map_err(io_err)?;
        // The runs and digests, streamed: memory stays bounded whatever
        // the manifest holds.
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < body_len {
            let n = (body_len - done).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], old_table + done)
                .map_err(|e| ManifestError::Io {
                    path: self.path.clone(),
                    source: e,
                })?;
            put(&buf[..n], &mut out).map_err(io_err)?;
            done += n as u64;
        }
        io::Write::write_all(&mut out, &sum.finalize()).map_err(io_err)?;
        io::Write::flush(&mut out).map_err(io_err)?;
        drop(out);
        f.sync_all().map_err(io_err)?;
        Ok(())
    }

    /// Check that this manifest describes the file `data` as it is now.
    /// Manifests made before files were bound pass (there is nothing to
    /// compare).
    pub fn check_bound(&self, data: &Path) -> Result<(), ManifestError> {
        let Some(want) = &self.meta.file else {
            return Ok(());
        };
        let now = super::FileBinding::of_path(data).map_err(|e| ManifestError::Io {
            path: data.to_path_buf(),
            source: e,
        })?;
        match want.difference(&now) {
            None => Ok(()),
            Some(detail) => Err(ManifestError::Unbound {
                path: self.path.clone(),
                data: data.to_path_buf(),
                detail,
            }),
        }
    }

    /// The parent's manifest, opened once and checked: its root digest is
    /// the one this manifest was made against, and its geometry and digest
    /// algorithm are this one's.
    pub fn parent(&self) -> Result<&ManifestFile, ManifestError> {
        let r = self.parent.get_or_init(|| {
            let Some(p) = &self.meta.parent else {
                return Err(ManifestError::Damaged {
                    path: self.path.clone(),
                    detail: "it refers to a parent and names none".into(),
                });
            };
            let pm = super::manifest_path(Path::new(&p.path));
            let fail = |detail: String| ManifestError::Parent {
                path: self.path.clone(),
                parent: pm.clone(),
                detail,
            };
            let m = match ManifestFile::open(&pm) {
                Ok(m) => m,
                Err(ManifestError::Missing { .. }) => return Err(fail("is missing".into())),
                Err(e) => return Err(fail(format!("cannot be read ({e})"))),
            };
            if unhex(&m.meta.root_digest).is_none() || m.meta.root_digest != p.root_digest {
                return Err(fail(format!(
                    "has root digest {} instead of {} (it was replaced)",
                    m.meta.root_digest, p.root_digest
                )));
            }
            if m.geometry() != self.geometry() || m.algo() != self.algo() {
                return Err(fail("has another geometry or digest algorithm".into()));
            }
            Ok(Box::new(m))
        });
        match r {
            Ok(m) => Ok(m),
            Err(e) => Err(match e {
                ManifestError::Parent {
                    path,
                    parent,
                    detail,
                } => ManifestError::Parent {
                    path: path.clone(),
                    parent: parent.clone(),
                    detail: detail.clone(),
                },
                other => ManifestError::Damaged {
                    path: self.path.clone(),
                    detail: other.to_string(),
                },
            }),
        }
    }

    fn read_digests(&self, first: u64, n: u64, out: &mut Vec<Sha>) -> Result<(), ManifestError> {
        let (at, len) = (self.digests_at + first * 32, (n * 32) as usize);
        let mut read = Vec::new();
        let raw: &[u8] = match &self.kept {
            Some(kept) => kept
                .bytes
                .get(at as usize..at as usize + len)
                .ok_or_else(|| ManifestError::Damaged {
                    path: self.path.clone(),
                    detail: format!("digests {first}..{} lie past its end", first + n),
                })?,
            None => {
                read.resize(len, 0);
                self.file
                    .read_exact_at(&mut read, at)
                    .map_err(|e| ManifestError::Io {
                        path: self.path.clone(),
                        source: e,
                    })?;
                &read
            }
        };
        out.clear();
        out.extend(raw.chunks_exact(32).map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            d
        }));
        Ok(())
    }

    /// Hand the chunks `[a, b)` to `f` in order: zero runs whole, digests
    /// in blocks, a parent's runs through the parent. Reads follow the data.
    pub fn visit(
        &self,
        a: u64,
        b: u64,
        f: &mut dyn FnMut(Piece<'_>) -> Result<(), ManifestError>,
    ) -> Result<(), ManifestError> {
        let b = b.min(self.meta.chunks);
        if a >= b {
            return Ok(());
        }
        let mut k = self.runs.partition_point(|r| r.end <= a);
        let mut buf = Vec::new();
        while let Some(r) = self.runs.get(k).filter(|r| r.start < b) {
            let (s, e) = (r.start.max(a), r.end.min(b));
            match r.kind {
                Kind::Zero => f(Piece::Zero(s, e))?,
                Kind::Data => {
                    let mut i = s;
                    while i < e {
                        let j = (i + BLOCK).min(e);
                        self.read_digests(r.base + (i - r.start), j - i, &mut buf)?;
                        f(Piece::Digests(i, &buf))?;
                        i = j;
                    }
                }
                Kind::Parent => self.parent()?.visit(s, e, f)?,
                Kind::Backing => {
                    let node = self.backing_node()?;
                    let mut i = s;
                    while i < e {
                        let j = (i + 64).min(e);
                        let ds = super::check::digests_of(node.as_ref(), i, j, &self.zero)
                            .map_err(|err| ManifestError::Backing {
                                path: self.path.clone(),
                                backing: node.path().to_path_buf(),
                                what: format!("chunk {i}"),
                                detail: format!("cannot be read ({err})"),
                            })?;
                        f(Piece::Digests(i, &ds))?;
                        i = j;
                    }
                }
            }
            k += 1;
        }
        Ok(())
    }

    /// The chunk runs in `[a, b)` that are not known to read as zeros
    /// (through the parent's manifest where this one refers to it).
    pub fn data_runs(&self, a: u64, b: u64) -> Result<Vec<(u64, u64)>, ManifestError> {
        let b = b.min(self.meta.chunks);
        let mut out = Vec::new();
        let mut k = self.runs.partition_point(|r| r.end <= a);
        while let Some(r) = self.runs.get(k).filter(|r| r.start < b) {
            let (s, e) = (r.start.max(a), r.end.min(b));
            match r.kind {
                Kind::Zero => {}
                Kind::Data => out.push((s, e)),
                Kind::Parent => out.extend(self.parent()?.data_runs(s, e)?),
                Kind::Backing => out.push((s, e)),
            }
            k += 1;
        }
        Ok(super::runs::union(out))
    }

    /// Digests of chunks `[a, b)`.
    pub fn digests(&self, a: u64, b: u64) -> Result<Vec<Sha>, ManifestError> {
        let mut out = Vec::with_capacity(b.saturating_sub(a).min(1 << 16) as usize);
        let zero = self.zero;
        self.visit(a, b, &mut |p| {
            match p {
                Piece::Zero(s, e) => out.extend((s..e).map(|i| zero.of(i))),
                Piece::Digests(_, ds) => out.extend_from_slice(ds),
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Compute the root digest from the digests (as recorded in the
    /// metadata when the manifest is intact).
    pub fn compute_root(&self) -> Result<Sha, ManifestError> {
        let geo = self.geometry();
        if self.meta.format_version == 1 {
            let mut root = Sha256::new();
            self.visit(0, geo.chunks(), &mut |p| {
                if let Piece::Digests(_, ds) = p {
                    for d in ds {
                        root.update(d);
                    }
                }
                Ok(())
            })?;
            return Ok(root.finalize().into());
        }
        let mut root = RootHasher::new(geo, self.algo());
        self.visit(0, geo.chunks(), &mut |p| {
            match p {
                Piece::Zero(s, e) => root.zeros(e - s),
                Piece::Digests(_, ds) => ds.iter().for_each(|d| root.chunk(d)),
            }
            Ok(())
        })?;
        root.finish().ok_or_else(|| ManifestError::Damaged {
            path: self.path.clone(),
            detail: "the runs do not cover the image".into(),
        })
    }
}

/// Checks copied data against a manifest (restore).
pub struct ManifestChecker {
    manifest: ManifestFile,
    zero: ZeroDigests,
    /// Sorted disjoint chunk runs that need no check (read from the very
    /// backing file the manifest recorded by identity).
    trusted: Vec<(u64, u64)>,
}

impl ManifestChecker {
    /// Check copies against `manifest`.
    pub fn new(manifest: ManifestFile) -> ManifestChecker {
        let zero = manifest.zero_digests();
        ManifestChecker {
            manifest,
            zero,
            trusted: Vec::new(),
        }
    }

    /// Do not check the chunk runs `trusted` (see
    /// [`super::read_from_recorded_backing`]).
    pub fn trusting(mut self, trusted: Vec<(u64, u64)>) -> ManifestChecker {
        self.trusted = trusted;
        self
    }

    /// The first chunk at or after `i` outside the trusted runs, and where
    /// the untrusted stretch from it ends.
    fn untrusted_from(&self, i: u64, end: u64) -> Option<(u64, u64)> {
        let k = self.trusted.partition_point(|r| r.1 <= i);
        let mut start = i;
        if let Some(&(s, e)) = self.trusted.get(k)
            && s <= start
        {
            start = e;
        }
        if start >= end {
            return None;
        }
        let stop = self
            .trusted
            .get(k..)
            .and_then(|rest| rest.iter().find(|r| r.0 > start))
            .map_or(end, |r| r.0.min(end));
        Some((start, stop))
    }

    fn check(&self, first: u64, got: &[Sha]) -> Result<(), CopyError> {
        let want = self
            .manifest
            .digests(first, first + got.len() as u64)
            .map_err(CopyError::ManifestRead)?;
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                let i = first + k as u64;
                return Err(CopyError::Mismatch {
                    offset: i * self.manifest.meta.chunk_size,
                    chunk: i,
                    detail: format!(
                        "expected {} {}, read {}",
                        self.manifest.algo(),
                        super::hex(w),
                        super::hex(g)
                    ),
                });
            }
        }
        Ok(())
    }
}

impl ChunkObserver for ManifestChecker {
    fn copied(&self, offset: u64, data: ChunkData<'_>) -> Result<(), CopyError> {
        let geo = self.manifest.geometry();
        let first = offset / geo.chunk;
        let end = match data {
            ChunkData::Zeroes(len) => (offset + len).div_ceil(geo.chunk),
            ChunkData::Bytes(buf) => (offset + buf.len() as u64).div_ceil(geo.chunk),
        };
        let mut i = first;
        while let Some((a, b)) = self.untrusted_from(i, end) {
            let got: Vec<Sha> = match data {
                ChunkData::Zeroes(_) => self.zero.run(a, b),
                ChunkData::Bytes(buf) => {
                    let c = geo.chunk as usize;
                    let from = (a - first) as usize * c;
                    let to = ((b - first) as usize * c).min(buf.len());
                    self.zero.of_chunks(a, &buf[from..to])
                }
            };
            self.check(a, &got)?;
            i = b;
        }
        Ok(())
    }
}
