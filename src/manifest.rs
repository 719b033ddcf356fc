//! `TARGET.manifest`: what a backup holds, chunk by chunk.
//!
//! Layout (format version 1; integers big-endian):
//!
//! ```text
//!      0   8  magic "IMGBKMAN"
//!      8   4  format version (1)
//!     12   4  length L of the JSON metadata
//!     16   8  offset T of the digest table (16384)
//!     24   8  number of chunks N
//!     32   L  JSON metadata (UTF-8), zero padding up to T
//!      T N*32 sha256 of each chunk of the point-in-time image, in order
//! T+N*32  32  sha256 of every byte before it (the manifest's own checksum)
//! ```
//!
//! The JSON metadata holds the virtual size, the chunk size, the root digest
//! (sha256 over the N chunk digests, in order), the source, the sync mode,
//! the bitmap, the parent backup and its root digest, and the start and end
//! times (RFC 3339). Every chunk of the *whole* image has a digest, not only
//! the copied ones; the last chunk may be shorter than the chunk size.
//!
//! Digests come from the data the copy already holds ([`ManifestWriter`] is a
//! [`ChunkObserver`]); zero chunks hash without I/O (their digest is a
//! constant); chunks the copy did not touch are filled afterwards, from a
//! parent's manifest (incremental backups) or by reading the image.

use crate::bitmap::Bits;
use crate::copy::{ChunkData, ChunkObserver, CopyError};
use crate::job::cancel::Cancel;
use crate::node::{BlockNode, Status};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The first bytes of every manifest.
pub const MAGIC: &[u8; 8] = b"IMGBKMAN";
/// The format version this imgbackup writes and reads.
pub const VERSION: u32 = 1;
/// Where the digest table starts (after the header and the JSON metadata).
pub const TABLE_OFFSET: u64 = 16384;
/// The chunk size of new manifests (smaller when the backup cluster is).
pub const CHUNK_SIZE: u64 = 64 << 10;
const MAX_META: usize = (TABLE_OFFSET - 32) as usize;

/// A sha256 digest.
pub type Sha = [u8; 32];

/// `PATH.manifest`.
pub fn manifest_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".manifest");
    PathBuf::from(s)
}

/// Lower-case hex of `d`.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The parent of an incremental backup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Parent {
    /// Its absolute path.
    pub path: String,
    /// Its manifest's root digest (hex).
    pub root_digest: String,
}

/// The identity of the data file a manifest describes, taken once the file
/// is complete and synced: a rename keeps it, a rewrite or a replacement of
/// the file changes it. A manifest is *bound* to a file when they match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileBinding {
    /// File size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Inode number.
    pub inode: u64,
}

impl FileBinding {
    /// The identity described by `m`.
    pub fn of(m: &std::fs::Metadata) -> io::Result<FileBinding> {
        use std::os::unix::fs::MetadataExt;
        Ok(FileBinding {
            size: m.len(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            inode: m.ino(),
        })
    }

    /// The identity of the file at `p` now.
    pub fn of_path(p: &Path) -> io::Result<FileBinding> {
        FileBinding::of(&std::fs::metadata(p)?)
    }

    /// How `now` differs from this binding, in words (None: the same file).
    pub fn difference(&self, now: &FileBinding) -> Option<String> {
        if self == now {
            return None;
        }
        let mut d = Vec::new();
        if self.inode != now.inode {
            d.push(format!("inode {} instead of {}", now.inode, self.inode));
        }
        if self.size != now.size {
            d.push(format!("{} bytes instead of {}", now.size, self.size));
        }
        if (self.mtime_sec, self.mtime_nsec) != (now.mtime_sec, now.mtime_nsec) {
            d.push("another modification time".into());
        }
        Some(d.join(", "))
    }
}

/// The manifest's metadata (its JSON part).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// The manifest format version.
    pub format_version: u32,
    /// Virtual size of the point-in-time image, bytes.
    pub virtual_size: u64,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u64,
    /// Number of chunks (= digests).
    pub chunks: u64,
    /// sha256 over the chunk digests in order (hex).
    pub root_digest: String,
    /// The source image (absolute path).
    pub source: String,
    /// The source's format.
    pub source_format: String,
    /// The backup file's format.
    pub target_format: String,
    /// The sync mode of the job.
    pub sync: String,
    /// The bitmap the job used or anchored.
    pub bitmap: Option<String>,
    /// The backup an incremental builds on.
    pub parent: Option<Parent>,
    /// When the job started (RFC 3339).
    pub started: String,
    /// When the manifest was finished (RFC 3339).
    pub finished: String,
    /// `imgbackup VERSION`.
    pub created_by: String,
    /// Byte ranges the backup does not hold (skipped by an ignore policy);
    /// their digests are of the point-in-time image all the same.
    #[serde(default)]
    pub incomplete: Vec<[u64; 2]>,
    /// The data file this manifest describes (absent in manifests made by
    /// imgbackup before 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileBinding>,
    /// An incremental written without a backing file (`--no-backing`): the
    /// file holds only the clusters copied; `parent` names the backup the
    /// rest comes from once it is attached (`qemu-img rebase -u`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
}

/// Errors reading a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: no manifest (the backup was made with --no-manifest, or by another tool)", path.display())]
    /// No manifest beside the backup.
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    #[error("cannot read the manifest {}", path.display())]
    /// The manifest cannot be read.
    Io {
        /// The manifest.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    #[error("{}: damaged manifest: {detail}", path.display())]
    /// The manifest is damaged (checksum, header, metadata).
    Damaged {
        /// The manifest.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    #[error("the manifest {} does not describe {}: it was made for another file ({detail}); the backup was replaced, rewritten, or a replacement was interrupted", path.display(), data.display())]
    /// The manifest describes another file than the one beside it.
    Unbound {
        /// The manifest.
        path: PathBuf,
        /// The data file it was checked against.
        data: PathBuf,
        /// How the file differs from the one recorded.
        detail: String,
    },
}

/// sha256 of `len` zero bytes.
pub fn zero_digest(len: u64) -> Sha {
    let mut h = Sha256::new();
    let z = [0u8; 8192];
    let mut left = len;
    while left > 0 {
        let n = left.min(z.len() as u64) as usize;
        h.update(&z[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// sha256 of `data`.
pub fn digest(data: &[u8]) -> Sha {
    Sha256::digest(data).into()
}

/// Chunk geometry of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual size, bytes.
    pub size: u64,
    /// Chunk size, bytes.
    pub chunk: u64,
}

impl Geometry {
    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// Length of chunk `i` (the last one may be short).
    pub fn len(&self, i: u64) -> u64 {
        (self.size - i * self.chunk).min(self.chunk)
    }

    /// True for an empty image.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The digests of zero chunks in this geometry.
    pub fn zero_digests(&self) -> ZeroDigests {
        let last = if self.size == 0 {
            0
        } else {
            self.len(self.chunks() - 1)
        };
        ZeroDigests {
            geo: *self,
            full: zero_digest(self.chunk),
            last: zero_digest(last),
        }
    }
}

/// The digest of a zero chunk of a [`Geometry`]: every chunk is full but
/// possibly the last, so two digests serve them all.
#[derive(Debug, Clone, Copy)]
pub struct ZeroDigests {
    geo: Geometry,
    full: Sha,
    last: Sha,
}

impl ZeroDigests {
    /// The digest chunk `i` has when it reads as zeros.
    pub fn of(&self, i: u64) -> Sha {
        if self.geo.len(i) == self.geo.chunk {
            self.full
        } else {
            self.last
        }
    }

    /// The digests of chunks `[first, end)` read as zeros.
    pub fn run(&self, first: u64, end: u64) -> Vec<Sha> {
        (first..end).map(|i| self.of(i)).collect()
    }
}

/// Split the chunk `runs` into batches of at most 64 chunks and run `f` on
/// each batch `[a, b)` in a pool of `jobs` threads, stopping at the first
/// error or when `cancel` is set: the one loop over a digest table.
fn for_each_batch<F>(
    runs: &[(u64, u64)],
    jobs: usize,
    cancel: &Cancel,
    f: F,
) -> Result<(), CopyError>
where
    F: Fn(u64, u64) -> Result<(), CopyError> + Sync,
{
    use rayon::prelude::*;
    const BATCH: u64 = 64;
    let batches: Vec<(u64, u64)> = runs
        .iter()
        .flat_map(|&(s, e)| {
            (s..e)
                .step_by(BATCH as usize)
                .map(move |a| (a, (a + BATCH).min(e)))
        })
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()
        .map_err(|e| CopyError::Manifest(io::Error::other(e)))?;
    pool.install(|| {
        batches.par_iter().try_for_each(|&(a, b)| {
            if cancel.is_cancelled() {
                return Err(CopyError::Cancelled);
            }
            f(a, b)
        })
    })
}

/// Builds `TARGET.manifest.partial` while the copy runs.
pub struct ManifestWriter {
    // set at creation
    path: PathBuf,
    file: File,
    geo: Geometry,
    zero: ZeroDigests,
    // behind a lock
    have: Mutex<Bits>,
}

impl ManifestWriter {
    /// Build a manifest in the new, empty `file` (at `path`).
    pub fn create_in(path: &Path, file: File, geo: Geometry) -> io::Result<ManifestWriter> {
        file.set_len(TABLE_OFFSET + geo.chunks() * 32)?;
        Ok(ManifestWriter {
            path: path.to_path_buf(),
            file,
            zero: geo.zero_digests(),
            geo,
            have: Mutex::new(Bits::new(geo.chunks())),
        })
    }

    /// The chunk geometry of the manifest being written.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Record the digest of chunk `i`.
    pub fn put(&self, i: u64, d: &Sha) -> io::Result<()> {
        self.file.write_all_at(d, TABLE_OFFSET + i * 32)?;
        if let Ok(mut h) = self.have.lock() {
            h.set(i);
        }
        Ok(())
    }

    /// Record digests of consecutive chunks from `first`.
    pub fn put_many(&self, first: u64, ds: &[Sha]) -> io::Result<()> {
        let bytes: Vec<u8> = ds.iter().flatten().copied().collect();
        self.file.write_all_at(&bytes, TABLE_OFFSET + first * 32)?;
        if let Ok(mut h) = self.have.lock() {
            h.set_range(first, first + ds.len() as u64);
        }
        Ok(())
    }

    /// Chunks without a digest yet.
    pub fn missing(&self) -> Bits {
        let have = match self.have.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut m = Bits::full(self.geo.chunks());
        for (s, e) in have.runs() {
            m.clear_range(s, e);
        }
        m
    }

    /// Fill missing digests by reading `image` (the point-in-time image).
    pub fn fill_from(
        &self,
        image: &dyn BlockNode,
        jobs: usize,
        cancel: &Cancel,
    ) -> Result<(), CopyError> {
        self.fill_runs(image, jobs, &self.missing().runs(), cancel)
    }

    /// Fill the digests of chunks that overlap the byte `ranges` from `node`
    /// (what a backup holds where an ignore policy skipped data).
    pub fn fill_ranges_from(
        &self,
        node: &dyn BlockNode,
        ranges: &[(u64, u64)],
        jobs: usize,
        cancel: &Cancel,
    ) -> Result<(), CopyError> {
        let c = self.geo.chunk;
        let runs: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(s, e)| (s / c, e.div_ceil(c)))
            .collect();
        self.fill_runs(node, jobs, &runs, cancel)
    }

    fn fill_runs(
        &self,
        image: &dyn BlockNode,
        jobs: usize,
        runs: &[(u64, u64)],
        cancel: &Cancel,
    ) -> Result<(), CopyError> {
        for_each_batch(runs, jobs, cancel, |a, b| {
            let ds = digests_of(image, a, b, &self.zero)?;
            self.put_many(a, &ds).map_err(CopyError::Manifest)
        })
    }

    /// Fill missing digests from a parent manifest (same geometry).
    pub fn fill_from_parent(
        &self,
        parent: &ManifestFile,
        cancel: &Cancel,
    ) -> Result<(), CopyError> {
        for (s, e) in self.missing().runs() {
            let mut a = s;
            while a < e {
                if cancel.is_cancelled() {
                    return Err(CopyError::Cancelled);
                }
                let b = (a + 4096).min(e);
                let ds = parent.digests(a, b).map_err(CopyError::ManifestRead)?;
                self.put_many(a, &ds).map_err(CopyError::Manifest)?;
                a = b;
            }
        }
        Ok(())
    }

    /// Compute the root digest, write the metadata and the checksum, sync.
    /// `meta.root_digest` is filled in; every chunk must have a digest.
    pub fn finish(&self, meta: &mut Meta) -> io::Result<()> {
        if self.missing().count() > 0 {
            return Err(io::Error::other(
                "internal error: the manifest lacks digests",
            ));
        }
        let n = self.geo.chunks();
        let mut root = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let table_len = n * 32;
        let mut pos = 0;
        while pos < table_len {
            let k = (table_len - pos).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..k], TABLE_OFFSET + pos)?;
            root.update(&buf[..k]);
            pos += k as u64;
        }
        meta.root_digest = hex(&root.finalize());
        meta.chunk_size = self.geo.chunk;
        meta.chunks = n;
        meta.virtual_size = self.geo.size;
        meta.format_version = VERSION;
        let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
        if json.len() > MAX_META {
            return Err(io::Error::other(
                "manifest metadata too long (source path?)",
            ));
        }
        let mut head = vec![0u8; TABLE_OFFSET as usize];
        head[0..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&VERSION.to_be_bytes());
        head[12..16].copy_from_slice(&(json.len() as u32).to_be_bytes());
        head[16..24].copy_from_slice(&TABLE_OFFSET.to_be_bytes());
        head[24..32].copy_from_slice(&n.to_be_bytes());
        head[32..32 + json.len()].copy_from_slice(&json);
        self.file.write_all_at(&head, 0)?;
        // The checksum over everything before it.
        let mut sum = Sha256::new();
        sum.update(&head);
        let mut pos = 0;
        while pos < table_len {
            let k = (table_len - pos).min(buf.len() as u64) as usize;
            self.file.read_exact_at(&mut buf[..k], TABLE_OFFSET + pos)?;
            sum.update(&buf[..k]);
            pos += k as u64;
        }
        let sum: Sha = sum.finalize().into();
        self.file.write_all_at(&sum, TABLE_OFFSET + table_len)?;
        self.file.sync_all()
    }

    /// Where the manifest is being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ChunkObserver for ManifestWriter {
    fn copied(&self, offset: u64, data: ChunkData<'_>) -> Result<(), CopyError> {
        let c = self.geo.chunk;
        let first = offset / c;
        match data {
            ChunkData::Zeroes(len) => {
                let ds = self.zero.run(first, (offset + len).div_ceil(c));
                self.put_many(first, &ds).map_err(CopyError::Manifest)
            }
            ChunkData::Bytes(buf) => {
                let ds: Vec<Sha> = buf.chunks(c as usize).map(digest).collect();
                self.put_many(first, &ds).map_err(CopyError::Manifest)
            }
        }
    }
}

/// Digests of chunks `[a, b)` of `image`, reading only what holds data.
pub fn digests_of(
    image: &dyn BlockNode,
    a: u64,
    b: u64,
    zero: &ZeroDigests,
) -> Result<Vec<Sha>, CopyError> {
    let geo = zero.geo;
    let start = a * geo.chunk;
    let end = (b * geo.chunk).min(geo.size);
    let mut out = Vec::with_capacity((b - a) as usize);
    let mut buf = vec![0u8; geo.chunk as usize];
    let mut pos = start;
    while pos < end {
        let ext = image
            .block_status(pos, end - pos)
            .map_err(CopyError::Source)?;
        let ext_end = pos + ext.len;
        // Whole chunks inside a zero extent need no I/O.
        if ext.status != Status::Data {
            let zend = if ext_end == end {
                end
            } else {
                ext_end / geo.chunk * geo.chunk
            };
            if zend > pos {
                let (i, j) = (pos / geo.chunk, zend.div_ceil(geo.chunk));
                out.extend(zero.run(i, j));
                pos = zend;
                continue;
            }
        }
        let i = pos / geo.chunk;
        let n = geo.len(i) as usize;
        image.read(pos, &mut buf[..n]).map_err(CopyError::Source)?;
        out.push(digest(&buf[..n]));
        pos += n as u64;
    }
    Ok(out)
}

/// The metadata of the manifest at `path`, read without checking the
/// digest table (cheap at any size): for finding backups, never for
/// trusting one.
pub fn read_meta(path: &Path) -> Option<Meta> {
    let file = File::open(path).ok()?;
    let mut head = vec![0u8; TABLE_OFFSET as usize];
    file.read_exact_at(&mut head, 0).ok()?;
    if &head[0..8] != MAGIC {
        return None;
    }
    let jl = u32::from_be_bytes([head[12], head[13], head[14], head[15]]) as usize;
    if jl > MAX_META {
        return None;
    }
    serde_json::from_slice(&head[32..32 + jl]).ok()
}

/// A manifest on disk, validated; digests are read on demand.
pub struct ManifestFile {
    /// The manifest file.
    pub path: PathBuf,
    /// Its metadata.
    pub meta: Meta,
    file: File,
}

impl ManifestFile {
    /// Open and validate `path` (its checksum, header and metadata).
    pub fn open(path: &Path) -> Result<ManifestFile, ManifestError> {
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
        if len < TABLE_OFFSET + 32 {
            return Err(damaged("too short"));
        }
        let mut head = vec![0u8; TABLE_OFFSET as usize];
        file.read_exact_at(&mut head, 0).map_err(ioerr)?;
        if &head[0..8] != MAGIC {
            return Err(damaged("bad magic (not an imgbackup manifest)"));
        }
        let version = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        if version != VERSION {
            return Err(damaged(&format!(
                "format version {version}, this imgbackup reads version {VERSION}"
            )));
        }
        let jl = u32::from_be_bytes([head[12], head[13], head[14], head[15]]) as usize;
        let mut w = [0u8; 8];
        w.copy_from_slice(&head[16..24]);
        let table = u64::from_be_bytes(w);
        w.copy_from_slice(&head[24..32]);
        let n = u64::from_be_bytes(w);
        if jl > MAX_META || table != TABLE_OFFSET {
            return Err(damaged("bad header"));
        }
        if n.checked_mul(32)
            .and_then(|t| t.checked_add(TABLE_OFFSET + 32))
            != Some(len)
        {
            return Err(damaged(&format!(
                "{n} chunks do not fit a file of {len} bytes (truncated?)"
            )));
        }
        // Checksum.
        let mut sum = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        let body = len - 32;
        while pos < body {
            let k = (body - pos).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..k], pos).map_err(ioerr)?;
            sum.update(&buf[..k]);
            pos += k as u64;
        }
        let mut want = [0u8; 32];
        file.read_exact_at(&mut want, body).map_err(ioerr)?;
        if sum.finalize().as_slice() != want {
            return Err(damaged("checksum mismatch: the manifest file is corrupted"));
        }
        let meta: Meta = serde_json::from_slice(&head[32..32 + jl])
            .map_err(|e| damaged(&format!("metadata: {e}")))?;
        if meta.chunks != n
            || meta.chunk_size == 0
            || !meta.chunk_size.is_power_of_two()
            || meta.virtual_size.div_ceil(meta.chunk_size) != n
        {
            return Err(damaged("metadata does not match the digest table"));
        }
        Ok(ManifestFile {
            path: path.to_path_buf(),
            meta,
            file,
        })
    }

    /// Virtual size and chunk size.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            size: self.meta.virtual_size,
            chunk: self.meta.chunk_size,
        }
    }

    /// Check that this manifest describes the file `data` as it is now.
    /// Manifests made before files were bound pass (there is nothing to
    /// compare).
    pub fn check_bound(&self, data: &Path) -> Result<(), ManifestError> {
        let Some(want) = &self.meta.file else {
            return Ok(());
        };
        let now = FileBinding::of_path(data).map_err(|e| ManifestError::Io {
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

    /// Digests of chunks `[a, b)`.
    pub fn digests(&self, a: u64, b: u64) -> Result<Vec<Sha>, ManifestError> {
        let b = b.min(self.meta.chunks);
        if a >= b {
            return Ok(Vec::new());
        }
        let mut raw = vec![0u8; ((b - a) * 32) as usize];
        self.file
            .read_exact_at(&mut raw, TABLE_OFFSET + a * 32)
            .map_err(|e| ManifestError::Io {
                path: self.path.clone(),
                source: e,
            })?;
        Ok(raw
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect())
    }
}

/// Checks copied data against a manifest (restore).
pub struct ManifestChecker {
    manifest: ManifestFile,
    zero: ZeroDigests,
}

impl ManifestChecker {
    /// Check copies against `manifest`.
    pub fn new(manifest: ManifestFile) -> ManifestChecker {
        let zero = manifest.geometry().zero_digests();
        ManifestChecker { manifest, zero }
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
                    detail: format!("expected {}, read {}", hex(w), hex(g)),
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
        let got: Vec<Sha> = match data {
            ChunkData::Zeroes(len) => self.zero.run(first, (offset + len).div_ceil(geo.chunk)),
            ChunkData::Bytes(buf) => buf.chunks(geo.chunk as usize).map(digest).collect(),
        };
        self.check(first, &got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_and_zero_digests() {
        let g = Geometry {
            size: 65536 * 3 + 512,
            chunk: 65536,
        };
        assert_eq!(g.chunks(), 4);
        assert_eq!(g.len(3), 512);
        let z = g.zero_digests();
        assert_eq!(z.of(0), digest(&vec![0u8; 65536]));
        assert_eq!(z.of(2), digest(&vec![0u8; 65536]));
        assert_eq!(z.of(3), digest(&[0u8; 512]));
        assert_eq!(z.run(1, 4), vec![z.of(0), z.of(0), z.of(3)]);
    }
    fn meta() -> Meta {
        Meta {
            format_version: 0,
            virtual_size: 0,
            chunk_size: 0,
            chunks: 0,
            root_digest: String::new(),
            source: "src".into(),
            source_format: "raw".into(),
            target_format: "raw".into(),
            sync: "full".into(),
            bitmap: None,
            parent: None,
            started: String::new(),
            finished: String::new(),
            created_by: String::new(),
            incomplete: Vec::new(),
            file: None,
            detached: false,
        }
    }

    /// A manifest of `image` written in `dir`, then opened.
    fn write(dir: &Path, image: &dyn BlockNode, chunk: u64) -> ManifestFile {
        let path = dir.join("m");
        let file = File::create_new(&path).unwrap();
        let geo = Geometry {
            size: image.size(),
            chunk,
        };
        let w = ManifestWriter::create_in(&path, file, geo).unwrap();
        assert_eq!(w.missing().count(), geo.chunks());
        w.fill_from(image, 3, &Cancel::new()).unwrap();
        assert_eq!(w.missing().count(), 0);
        let mut m = meta();
        w.finish(&mut m).unwrap();
        ManifestFile::open(&path).unwrap()
    }

    #[test]
    fn digests_root_and_differences() {
        use crate::node::mem::MemNode;
        let d = tempfile::tempdir().unwrap();
        let chunk = 4096u64;
        // 100 chunks and a short last one; a zero run in the middle.
        let mut bytes: Vec<u8> = (0..100 * chunk + 100).map(|i| (i % 253) as u8).collect();
        bytes[(10 * chunk) as usize..(30 * chunk) as usize].fill(0);
        let image = MemNode::new("img", bytes.clone(), chunk);
        let m = write(d.path(), &image, chunk);
        assert_eq!(m.meta.chunks, 101);
        let want: Vec<Sha> = bytes.chunks(chunk as usize).map(digest).collect();
        assert_eq!(m.digests(0, 101).unwrap(), want);
        let mut root = Sha256::new();
        for w in &want {
            root.update(w);
        }
        assert_eq!(m.meta.root_digest, hex(&root.finalize()));
        let cancel = Cancel::new();
        assert_eq!(check_image(&image, &m, 2, &cancel).unwrap(), None);

        // Two changed bytes: the first difference and every differing chunk.
        image.write(77 * chunk + 5, &[0xff]).unwrap();
        image.write(12 * chunk, &[1]).unwrap();
        let diff = check_image(&image, &m, 2, &cancel).unwrap().unwrap();
        assert_eq!((diff.chunk, diff.offset), (12, 12 * chunk));
        assert_eq!(diff.expected, hex(&want[12]));
        let bits = differing_chunks(&image, &m, 2, &cancel).unwrap();
        let set: Vec<u64> = (0..101).filter(|&i| bits.get(i)).collect();
        assert_eq!(set, vec![12, 77]);
    }

    #[test]
    fn a_changed_byte_anywhere_in_the_file_is_refused() {
        use crate::node::mem::MemNode;
        let d = tempfile::tempdir().unwrap();
        let image = MemNode::new("img", vec![7; 9000], 4096);
        let m = write(d.path(), &image, 4096);
        let len = std::fs::metadata(&m.path).unwrap().len();
        let good = std::fs::read(&m.path).unwrap();
        for at in [0, 9, 40, TABLE_OFFSET + 3, len - 1] {
            let mut bad = good.clone();
            bad[at as usize] ^= 1;
            std::fs::write(&m.path, &bad).unwrap();
            assert!(
                matches!(
                    ManifestFile::open(&m.path),
                    Err(ManifestError::Damaged { .. })
                ),
                "a flipped bit at {at} was accepted"
            );
        }
        std::fs::write(&m.path, &good[..good.len() - 32]).unwrap();
        assert!(
            ManifestFile::open(&m.path).is_err(),
            "a truncated manifest was accepted"
        );
    }
}

/// The first chunk whose digest differs, when checking an image against a
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Index of the chunk.
    pub chunk: u64,
    /// Byte offset of the chunk.
    pub offset: u64,
    /// Digest the manifest holds (hex).
    pub expected: String,
    /// Digest of the data (hex).
    pub found: String,
}

/// Recompute every chunk digest of `image` in parallel and compare with
/// `manifest`. Returns the first (lowest) differing chunk.
pub fn check_image(
    image: &dyn BlockNode,
    manifest: &ManifestFile,
    jobs: usize,
    cancel: &Cancel,
) -> Result<Option<Difference>, CopyError> {
    let n = manifest.geometry().chunks();
    first_difference_in(image, manifest, &[(0, n)], jobs, cancel)
}

/// Check the chunks a layer holds itself (allocated, as data or zeros)
/// against `manifest`: what can be checked of a detached incremental, which
/// holds only what it copied. Returns the first differing chunk and the
/// number of chunks checked.
pub fn check_held(
    layer: &dyn BlockNode,
    manifest: &ManifestFile,
    jobs: usize,
    cancel: &Cancel,
) -> Result<(Option<Difference>, u64), CopyError> {
    let geo = manifest.geometry();
    let mut held = Bits::new(geo.chunks());
    crate::node::for_each_extent(layer, 0, layer.size(), |pos, ext| {
        if ext.status != Status::Unallocated {
            held.set_range(pos / geo.chunk, (pos + ext.len).div_ceil(geo.chunk));
        }
    })
    .map_err(CopyError::Source)?;
    let d = first_difference_in(layer, manifest, &held.runs(), jobs, cancel)?;
    Ok((d, held.count()))
}

/// The first (lowest) chunk in the chunk `runs` whose digest in `image`
/// differs from `manifest`, hashed in parallel batches; batches past a
/// difference already found are skipped.
fn first_difference_in(
    image: &dyn BlockNode,
    manifest: &ManifestFile,
    runs: &[(u64, u64)],
    jobs: usize,
    cancel: &Cancel,
) -> Result<Option<Difference>, CopyError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let geo = manifest.geometry();
    let zero = geo.zero_digests();
    let first_bad = AtomicU64::new(u64::MAX);
    let found: Mutex<Option<Difference>> = Mutex::new(None);
    for_each_batch(runs, jobs, cancel, |a, b| {
        if a > first_bad.load(Ordering::Relaxed) {
            return Ok(());
        }
        let got = digests_of(image, a, b, &zero)?;
        let want = manifest.digests(a, b).map_err(CopyError::ManifestRead)?;
        if let Some(k) = got.iter().zip(&want).position(|(g, w)| g != w) {
            let i = a + k as u64;
            if first_bad.fetch_min(i, Ordering::SeqCst) > i
                && let Ok(mut f) = found.lock()
                && f.as_ref().is_none_or(|d| d.chunk > i)
            {
                *f = Some(Difference {
                    chunk: i,
                    offset: i * geo.chunk,
                    expected: hex(&want[k]),
                    found: hex(&got[k]),
                });
            }
        }
        Ok(())
    })?;
    Ok(found.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Chunks of `image` whose digest differs from `manifest` (same geometry),
/// computed in parallel.
pub fn differing_chunks(
    image: &dyn BlockNode,
    manifest: &ManifestFile,
    jobs: usize,
    cancel: &Cancel,
) -> Result<Bits, CopyError> {
    let geo = manifest.geometry();
    let zero = geo.zero_digests();
    let n = geo.chunks();
    let out = Mutex::new(Bits::new(n));
    for_each_batch(&[(0, n)], jobs, cancel, |a, b| {
        let got = digests_of(image, a, b, &zero)?;
        let want = manifest.digests(a, b).map_err(CopyError::ManifestRead)?;
        let diff: Vec<u64> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (g, w))| g != w)
            .map(|(k, _)| a + k as u64)
            .collect();
        if !diff.is_empty()
            && let Ok(mut o) = out.lock()
        {
            for i in diff {
                o.set(i);
            }
        }
        Ok(())
    })?;
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Parse a hex digest.
pub fn unhex(s: &str) -> Option<Sha> {
    if s.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}
