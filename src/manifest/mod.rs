//! `TARGET.manifest`: what a backup holds, chunk by chunk.
//!
//! A manifest describes the whole point-in-time image as a sequence of
//! chunks (64 KiB, or the backup cluster when smaller; the last one may be
//! short). Format version 2, written since imgbackup 0.2, stores that
//! sequence as *runs*: zero runs cost one record whatever their length, data
//! runs carry one digest per chunk, and an incremental's clean chunks are one
//! record saying "as in my parent's manifest". Its size follows the data.
//! Format version 1 (a digest for every chunk) is still read. The byte
//! layout of both is in `docs/manifest.md` and in [`file`].
//!
//! The root digest identifies the point-in-time image independently of how
//! its manifest is stored: it is SHA-256 over a canonical stream in which
//! every maximal run of zero chunks is one record and every other chunk is
//! its digest ([`RootHasher`]). A zero run therefore hashes in O(1), a
//! manifest that refers to its parent has the same root as one that holds
//! every digest itself, and the root does not depend on the job's workers,
//! request sizes or target format.
//!
//! Chunk digests are SHA-256 (the default) or BLAKE3 (`--digest blake3`,
//! several times cheaper per byte); the algorithm is recorded in the
//! metadata and an incremental takes its parent's.

mod check;
pub mod file;
pub mod runs;
pub mod sha256x;
mod writer;

pub use check::{
    Difference, check_backup, check_held, check_image, check_over_verified_parent,
    differing_chunks, read_from_recorded_backing, ready_to_check,
};
pub use file::{ManifestChecker, ManifestFile, read_meta};
pub use writer::ManifestWriter;

use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};

/// The first bytes of every manifest.
pub const MAGIC: &[u8; 8] = b"IMGBKMAN";
/// The format version this imgbackup writes.
pub const VERSION: u32 = 2;
/// The chunk size of new manifests (smaller when the backup cluster is).
pub const CHUNK_SIZE: u64 = 64 << 10;

/// A chunk digest (32 bytes whatever the algorithm).
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

/// The digest of each chunk.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgo {
    /// SHA-256 (FIPS 180-4).
    #[default]
    Sha256,
    /// BLAKE3, 32-byte output.
    Blake3,
}

impl DigestAlgo {
    /// The name recorded in a manifest and taken by `--digest`.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgo::Sha256 => "sha256",
            DigestAlgo::Blake3 => "blake3",
        }
    }

    /// The digest of `data`.
    pub fn hash(self, data: &[u8]) -> Sha {
        match self {
            DigestAlgo::Sha256 => Sha256::digest(data).into(),
            DigestAlgo::Blake3 => *blake3::hash(data).as_bytes(),
        }
    }

    /// The digest of `len` zero bytes (remembered: every manifest of a
    /// chain asks for the same few).
    pub fn zero(self, len: u64) -> Sha {
        use std::sync::Mutex;
        static SEEN: Mutex<Vec<(DigestAlgo, u64, Sha)>> = Mutex::new(Vec::new());
        let find = |v: &Vec<(DigestAlgo, u64, Sha)>| {
            v.iter().find(|e| e.0 == self && e.1 == len).map(|e| e.2)
        };
        if let Some(d) = SEEN.lock().ok().and_then(|v| find(&v)) {
            return d;
        }
        let d = self.zero_uncached(len);
        if let Ok(mut v) = SEEN.lock()
            && v.len() < 16
        {
            v.push((self, len, d));
        }
        d
    }

    fn zero_uncached(self, len: u64) -> Sha {
        let z = [0u8; 8192];
        let mut left = len;
        match self {
            DigestAlgo::Sha256 => {
                let mut h = Sha256::new();
                while left > 0 {
                    let n = left.min(z.len() as u64) as usize;
                    h.update(&z[..n]);
                    left -= n as u64;
                }
                h.finalize().into()
            }
            DigestAlgo::Blake3 => {
                let mut h = blake3::Hasher::new();
                while left > 0 {
                    let n = left.min(z.len() as u64) as usize;
                    h.update(&z[..n]);
                    left -= n as u64;
                }
                *h.finalize().as_bytes()
            }
        }
    }
}

impl std::fmt::Display for DigestAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// sha256 of `data`.
pub fn digest(data: &[u8]) -> Sha {
    DigestAlgo::Sha256.hash(data)
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
    /// Number of chunks of the image.
    pub chunks: u64,
    /// The root digest (hex): see [`RootHasher`] (version 2) or sha256
    /// over every chunk digest in order (version 1).
    pub root_digest: String,
    /// The chunk digest algorithm (version 1: always sha256).
    #[serde(default)]
    pub digest: DigestAlgo,
    /// Chunk digests the file holds itself (version 2).
    #[serde(default)]
    pub data_chunks: u64,
    /// Run records in the file (version 2).
    #[serde(default)]
    pub runs: u64,
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
    /// The source's backing chain (top first) that `backing` runs read
    /// from, by identity: a `--sync top` manifest does not hash the backing
    /// file at backup time; its digests are computed when a check needs
    /// them, from these files if they are unchanged. The root digest of such
    /// a manifest is computed then too (`root_digest` is empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing_files: Vec<BackingFile>,
}

impl Meta {
    /// True when the root digest is recorded (not deferred to the first
    /// check, as in a `--sync top` manifest with backing runs).
    pub fn root_known(&self) -> bool {
        !self.root_digest.is_empty()
    }
}

/// A file of the source's backing chain a manifest takes chunks from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackingFile {
    /// Its absolute path.
    pub path: String,
    /// Its format (the first file only is opened; it finds the rest).
    pub format: String,
    /// Its identity when the backup was made.
    pub file: FileBinding,
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
    /// A file of the backing chain a `--sync top` manifest takes chunks
    /// from changed since the backup (or is gone).
    #[error("the manifest {} takes {what} from the backing file {}, which {detail}; the backup can no longer be checked (and restores what the backing file holds now)", path.display(), backing.display())]
    Backing {
        /// The manifest.
        path: PathBuf,
        /// The backing file.
        backing: PathBuf,
        /// Which chunks.
        what: String,
        /// How it changed.
        detail: String,
    },
    /// The parent manifest a version 2 manifest refers to is missing or
    /// is not the one it was made against.
    #[error("the manifest {} takes the digests of its unchanged chunks from its parent's manifest {}, which {detail}; restore the parent backup with its manifest", path.display(), parent.display())]
    Parent {
        /// The manifest.
        path: PathBuf,
        /// The parent's manifest.
        parent: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
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

    /// The digests of zero chunks in this geometry, with `algo`.
    pub fn zero_digests(&self, algo: DigestAlgo) -> ZeroDigests {
        let last = if self.size == 0 {
            0
        } else {
            self.len(self.chunks() - 1)
        };
        ZeroDigests {
            geo: *self,
            algo,
            full: algo.zero(self.chunk),
            last: algo.zero(last),
        }
    }

    /// The chunks `[first, end)` that cover the bytes `[start, end)`.
    pub fn chunks_of(&self, start: u64, end: u64) -> (u64, u64) {
        (start / self.chunk, end.div_ceil(self.chunk))
    }
}

/// The digest of a zero chunk of a [`Geometry`]: every chunk is full but
/// possibly the last, so two digests serve them all.
#[derive(Debug, Clone, Copy)]
pub struct ZeroDigests {
    geo: Geometry,
    algo: DigestAlgo,
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

    /// True when `d` is the digest of chunk `i` read as zeros.
    pub fn is_zero(&self, i: u64, d: &Sha) -> bool {
        *d == self.of(i)
    }

    /// The digests of chunks `[first, end)` read as zeros.
    pub fn run(&self, first: u64, end: u64) -> Vec<Sha> {
        (first..end).map(|i| self.of(i)).collect()
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The digest algorithm.
    pub fn algo(&self) -> DigestAlgo {
        self.algo
    }

    /// The digest of chunk `i` holding `data`: no hashing when it is zeros.
    pub fn of_data(&self, i: u64, data: &[u8]) -> Sha {
        if crate::node::is_zero(data) {
            self.of(i)
        } else {
            self.algo.hash(data)
        }
    }

    /// The digests of the chunks from `first` on that `buf` holds (cut at
    /// chunk boundaries; the last piece may be short), as
    /// [`ZeroDigests::of_data`] gives them one by one.
    pub fn of_chunks(&self, first: u64, buf: &[u8]) -> Vec<Sha> {
        let c = self.geo.chunk as usize;
        let pieces: Vec<(u64, &[u8])> = buf
            .chunks(c)
            .enumerate()
            .map(|(k, piece)| (first + k as u64, piece))
            .collect();
        let mut out = vec![[0u8; 32]; pieces.len()];
        self.of_pieces(&pieces, &mut out);
        out
    }

    /// The digest of each `(chunk, bytes)` into `out` (same length), as
    /// [`ZeroDigests::of_data`] gives them one by one. SHA-256 digests of
    /// the chunks that are not zeros are computed several at a time
    /// ([`sha256x::digest_many`]).
    pub fn of_pieces(&self, pieces: &[(u64, &[u8])], out: &mut [Sha]) {
        let mut data: Vec<&[u8]> = Vec::with_capacity(pieces.len());
        let mut at: Vec<usize> = Vec::with_capacity(pieces.len());
        for (k, &(i, piece)) in pieces.iter().enumerate() {
            if crate::node::is_zero(piece) {
                out[k] = self.of(i);
            } else if self.algo == DigestAlgo::Sha256 {
                at.push(k);
                data.push(piece);
            } else {
                out[k] = self.algo.hash(piece);
            }
        }
        if !data.is_empty() {
            let mut got = vec![[0u8; 32]; data.len()];
            sha256x::digest_many(&data, &mut got);
            for (k, d) in at.into_iter().zip(got) {
                out[k] = d;
            }
        }
    }
}

/// The root digest of a version 2 manifest: SHA-256 over
///
/// ```text
/// "imgbackup-root-v2\0"  algorithm name  0x00  virtual size (u64 BE)  chunk size (u64 BE)
/// then, chunk by chunk in order:
///   each maximal run of chunks that read as zeros:  'Z'  count (u64 BE)
///   each other chunk:                               'D'  its digest (32 bytes)
/// ```
///
/// A chunk whose digest is the zero digest for its length counts as a zero
/// chunk wherever the digest came from, so the stream depends on the image
/// only.
pub struct RootHasher {
    h: Sha256,
    zeros: u64,
    zero: ZeroDigests,
    next: u64,
}

impl RootHasher {
    /// Start the stream for an image of `geo`, chunks digested with `algo`.
    pub fn new(geo: Geometry, algo: DigestAlgo) -> RootHasher {
        let mut h = Sha256::new();
        h.update(b"imgbackup-root-v2\0");
        h.update(algo.name().as_bytes());
        h.update([0u8]);
        h.update(geo.size.to_be_bytes());
        h.update(geo.chunk.to_be_bytes());
        RootHasher {
            h,
            zeros: 0,
            zero: geo.zero_digests(algo),
            next: 0,
        }
    }

    /// The next `n` chunks read as zeros.
    pub fn zeros(&mut self, n: u64) {
        self.zeros += n;
        self.next += n;
    }

    /// The next chunk has digest `d`.
    pub fn chunk(&mut self, d: &Sha) {
        if self.zero.is_zero(self.next, d) {
            self.zeros += 1;
        } else {
            self.flush_zeros();
            self.h.update(b"D");
            self.h.update(d);
        }
        self.next += 1;
    }

    fn flush_zeros(&mut self) {
        if self.zeros > 0 {
            self.h.update(b"Z");
            self.h.update(self.zeros.to_be_bytes());
            self.zeros = 0;
        }
    }

    /// The root, once every chunk of the image was given (None otherwise).
    pub fn finish(mut self) -> Option<Sha> {
        if self.next != self.zero.geo.chunks() {
            return None;
        }
        self.flush_zeros();
        Some(self.h.finalize().into())
    }
}

#[cfg(test)]
mod tests;
