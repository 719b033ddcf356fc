//! Writing a version 2 manifest while the copy runs.
//!
//! Digests of data chunks go to a scratch file (unlinked, sparse: digest
//! of chunk `i` at `32 * i`), what each chunk is goes to a [`RunMap`], so
//! neither memory nor disk follows the virtual size. [`ManifestWriter::finish`]
//! streams the runs and digests into the manifest in chunk order.

use super::check::{digests_of, for_each_batch};
use super::file::{MAX_META_V2, ManifestFile, Piece, run_table_offset};
use super::runs::{Kind, RunMap};
use super::sha256x::LANES;
use super::{DigestAlgo, Geometry, MAGIC, Meta, RootHasher, Sha, VERSION, ZeroDigests, hex};
use crate::copy::{ChunkData, ChunkObserver, CopyError};
use crate::job::cancel::Cancel;
use crate::node::{BlockNode, Status};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Digests read from the scratch file at once (128 KiB, aligned).
const BLOCK: u64 = 4096;

/// Builds `TARGET.manifest.partial` while the copy runs.
pub struct ManifestWriter {
    path: PathBuf,
    file: File,
    scratch: File,
    geo: Geometry,
    zero: ZeroDigests,
    map: Mutex<RunMap>,
    pending: Mutex<Pending>,
}

/// Copied chunks waiting to be hashed [`LANES`] at a time: an incremental
/// copies its dirty clusters one by one, and a single SHA-256 stream leaves
/// most of the CPU's SHA unit idle ([`super::sha256x`]).
#[derive(Default)]
struct Pending {
    /// `(chunk, bytes)`, fewer than [`LANES`] between calls.
    chunks: Vec<(u64, Vec<u8>)>,
    /// Buffers of hashed chunks, to be filled again.
    spare: Vec<Vec<u8>>,
}

impl ManifestWriter {
    /// Build a manifest in the new, empty `file` (at `path`), chunk digests
    /// with `algo`.
    pub fn create_in(
        path: &Path,
        file: File,
        geo: Geometry,
        algo: DigestAlgo,
    ) -> io::Result<ManifestWriter> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let scratch = tempfile::tempfile_in(dir)?;
        Ok(ManifestWriter {
            path: path.to_path_buf(),
            file,
            scratch,
            zero: geo.zero_digests(algo),
            geo,
            map: Mutex::new(RunMap::new()),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// The chunk geometry of the manifest being written.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The chunk digest algorithm.
    pub fn algo(&self) -> DigestAlgo {
        self.zero.algo()
    }

    fn with_map<T>(&self, f: impl FnOnce(&mut RunMap) -> T) -> T {
        match self.map.lock() {
            Ok(mut m) => f(&mut m),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Record that chunks `[first, end)` read as zeros.
    pub fn put_zeros(&self, first: u64, end: u64) {
        self.with_map(|m| m.insert(first, end, Kind::Zero));
    }

    /// Record the digests of consecutive chunks from `first` (zero digests
    /// are recorded as zero runs).
    pub fn put_many(&self, first: u64, ds: &[Sha]) -> io::Result<()> {
        let mut runs: Vec<(u64, u64, Kind)> = Vec::new();
        let mut k = 0;
        while k < ds.len() {
            let i = first + k as u64;
            let zero = self.zero.is_zero(i, &ds[k]);
            let mut j = k + 1;
            while j < ds.len() && self.zero.is_zero(first + j as u64, &ds[j]) == zero {
                j += 1;
            }
            if zero {
                runs.push((i, first + j as u64, Kind::Zero));
            } else {
                let bytes: Vec<u8> = ds[k..j].iter().flatten().copied().collect();
                self.scratch.write_all_at(&bytes, i * 32)?;
                runs.push((i, first + j as u64, Kind::Data));
            }
            k = j;
        }
        self.with_map(|m| {
            for (s, e, kind) in runs {
                m.insert(s, e, kind);
            }
        });
        Ok(())
    }

    fn with_pending<T>(&self, f: impl FnOnce(&mut Pending) -> T) -> T {
        match self.pending.lock() {
            Ok(mut p) => f(&mut p),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Queue a copy of the full chunk `i`; when [`LANES`] are queued, hash
    /// and record them.
    fn queue(&self, i: u64, bytes: &[u8]) -> io::Result<()> {
        let batch = self.with_pending(|p| {
            let mut b = p.spare.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(bytes);
            p.chunks.push((i, b));
            if p.chunks.len() >= LANES {
                std::mem::take(&mut p.chunks)
            } else {
                Vec::new()
            }
        });
        self.record(batch)
    }

    /// Hash and record the queued `batch`, and keep its buffers.
    fn record(&self, batch: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let pieces: Vec<(u64, &[u8])> = batch.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        let mut ds = vec![[0u8; 32]; pieces.len()];
        self.zero.of_pieces(&pieces, &mut ds);
        for (&(i, _), d) in pieces.iter().zip(&ds) {
            self.put_many(i, std::slice::from_ref(d))?;
        }
        self.with_pending(|p| {
            if p.spare.len() < LANES {
                p.spare
                    .extend(batch.into_iter().map(|(_, b)| b).take(LANES));
            }
        });
        Ok(())
    }

    /// Hash and record the chunks still queued. Must follow the copy,
    /// before anything else is recorded ([`Self::gaps`] calls it).
    pub fn settle(&self) -> io::Result<()> {
        let batch = self.with_pending(|p| std::mem::take(&mut p.chunks));
        self.record(batch)
    }

    /// Chunk runs nothing was recorded for yet (queued chunks are hashed
    /// and recorded first).
    pub fn gaps(&self) -> io::Result<Vec<(u64, u64)>> {
        self.settle()?;
        let n = self.geo.chunks();
        Ok(self.with_map(|m| m.gaps(n)))
    }

    /// Fill the chunks not recorded yet from `image` (the point-in-time
    /// image): zero and unallocated extents without I/O, the rest read and
    /// hashed in parallel.
    pub fn fill_from(
        &self,
        image: &dyn BlockNode,
        jobs: usize,
        cancel: &Cancel,
    ) -> Result<(), CopyError> {
        let geo = self.geo;
        let mut data = Vec::new();
        for (s, e) in self.gaps().map_err(CopyError::Manifest)? {
            let (start, end) = (s * geo.chunk, (e * geo.chunk).min(geo.size));
            let mut zero_from = s;
            crate::node::for_each_extent(image, start, end, |pos, ext| {
                if ext.status == Status::Data {
                    let (a, b) = geo.chunks_of(pos, pos + ext.len);
                    if a > zero_from {
                        self.put_zeros(zero_from, a);
                    }
                    data.push((a.max(zero_from), b));
                    zero_from = zero_from.max(b);
                }
            })
            .map_err(CopyError::Source)?;
            if e > zero_from {
                self.put_zeros(zero_from, e);
            }
        }
        self.fill_runs(image, jobs, &super::runs::union(data), cancel)
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
        let runs: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(s, e)| self.geo.chunks_of(s, e))
            .collect();
        self.fill_runs(node, jobs, &super::runs::union(runs), cancel)
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

    /// Say that the chunks not recorded yet are as in `parent`'s manifest
    /// (an incremental's clean chunks): one run record each, no digest is
    /// copied. `parent` must have this geometry and digest algorithm
    /// (otherwise nothing is recorded and [`Self::fill_from`] hashes them).
    pub fn fill_from_parent(&self, parent: &ManifestFile) -> io::Result<()> {
        if parent.geometry() != self.geo || parent.algo() != self.algo() {
            return Ok(());
        }
        let gaps = self.gaps()?;
        self.with_map(|m| {
            for (s, e) in gaps {
                m.insert(s, e, Kind::Parent);
            }
        });
        Ok(())
    }

    /// Say that the chunks not recorded yet read as the source's backing
    /// file reads them (`--sync top`): one run record each, nothing read
    /// or hashed now. The caller names the backing chain in
    /// `Meta::backing_files`; the root digest is then deferred.
    pub fn fill_from_backing(&self) -> io::Result<()> {
        let gaps = self.gaps()?;
        self.with_map(|m| {
            for (s, e) in gaps {
                m.insert(s, e, Kind::Backing);
            }
        });
        Ok(())
    }

    /// Visit the digests of data chunks `[s, e)` from the scratch file,
    /// through `win` (runs visited in increasing order read each block of
    /// the scratch file once, however many short runs it holds).
    fn scratch_digests(
        &self,
        win: &mut Window,
        s: u64,
        e: u64,
        f: &mut dyn FnMut(&Sha) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut i = s;
        while i < e {
            let block = i / BLOCK;
            if win.block != Some(block) {
                let n = (self.geo.chunks() - block * BLOCK).min(BLOCK);
                win.raw.clear();
                win.raw.resize((n * 32) as usize, 0);
                // The scratch file ends after the last data chunk recorded.
                let (mut got, at) = (0, block * BLOCK * 32);
                while got < win.raw.len() {
                    match self.scratch.read_at(&mut win.raw[got..], at + got as u64) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                win.block = Some(block);
                win.valid = got / 32;
            }
            let j = e.min((block + 1) * BLOCK);
            if j - block * BLOCK > win.valid as u64 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "internal error: the scratch file lacks digests",
                ));
            }
            let at = ((i - block * BLOCK) * 32) as usize;
            for c in win.raw[at..at + ((j - i) * 32) as usize].chunks_exact(32) {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                f(&d)?;
            }
            i = j;
        }
        Ok(())
    }

    /// The root digest of the image the `runs` describe: data digests from
    /// the scratch file, a parent's through its manifest.
    fn root(&self, runs: &[(u64, u64, Kind)], parent: Option<&ManifestFile>) -> io::Result<Sha> {
        let internal = |what: &str| io::Error::other(format!("internal error: {what}"));
        let mut root = RootHasher::new(self.geo, self.algo());
        let mut win = Window::default();
        for &(s, e, kind) in runs {
            match kind {
                Kind::Zero => root.zeros(e - s),
                Kind::Data => self.scratch_digests(&mut win, s, e, &mut |d| {
                    root.chunk(d);
                    Ok(())
                })?,
                Kind::Backing => return Err(internal("a root over backing runs")),
                Kind::Parent => {
                    let p = parent.ok_or_else(|| internal("no parent manifest"))?;
                    p.visit(s, e, &mut |piece| {
                        match piece {
                            Piece::Zero(a, b) => root.zeros(b - a),
                            Piece::Digests(_, ds) => ds.iter().for_each(|d| root.chunk(d)),
                        }
                        Ok(())
                    })
                    .map_err(io::Error::other)?;
                }
            }
        }
        root.finish()
            .ok_or_else(|| internal("the runs do not cover the image"))
    }

    /// Compute the root digest, write the runs, the digests, the metadata
    /// and the checksum, and sync. `meta.root_digest` and the geometry
    /// fields are filled in; every chunk must be recorded, and `parent`
    /// given when chunks refer to it.
    pub fn finish(&self, meta: &mut Meta, parent: Option<&ManifestFile>) -> io::Result<()> {
        let internal = |what: &str| io::Error::other(format!("internal error: {what}"));
        if !self.gaps()?.is_empty() {
            return Err(internal("the manifest lacks digests"));
        }
        let runs = self.with_map(|m| m.runs());
        let deferred = runs.iter().any(|r| r.2 == Kind::Backing);
        if deferred && meta.backing_files.is_empty() {
            return Err(internal("backing runs without backing files"));
        }
        let data: u64 = runs
            .iter()
            .filter(|r| r.2 == Kind::Data)
            .map(|r| r.1 - r.0)
            .sum();
        // A deferred root is computed by the first check that needs it.
        meta.root_digest = if deferred {
            String::new()
        } else {
            hex(&self.root(&runs, parent)?)
        };
        meta.chunk_size = self.geo.chunk;
        meta.chunks = self.geo.chunks();
        meta.virtual_size = self.geo.size;
        meta.format_version = VERSION;
        meta.digest = self.algo();
        meta.data_chunks = data;
        meta.runs = runs.len() as u64;
        let json = serde_json::to_vec(meta).map_err(io::Error::other)?;
        if json.len() > MAX_META_V2 {
            return Err(io::Error::other(
                "manifest metadata too long (source path?)",
            ));
        }
        let table = run_table_offset(json.len());
        let mut out = Summed {
            w: io::BufWriter::with_capacity(1 << 20, &self.file),
            sum: Sha256::new(),
        };
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_be_bytes())?;
        out.write_all(&(json.len() as u32).to_be_bytes())?;
        out.write_all(&table.to_be_bytes())?;
        out.write_all(&(runs.len() as u64).to_be_bytes())?;
        out.write_all(&json)?;
        out.write_all(&vec![0u8; (table - 32 - json.len() as u64) as usize])?;
        for &(s, e, kind) in &runs {
            out.write_all(&s.to_be_bytes())?;
            out.write_all(&((kind.code() << 62) | (e - s)).to_be_bytes())?;
        }
        let mut win = Window::default();
        for &(s, e, kind) in &runs {
            if kind == Kind::Data {
                self.scratch_digests(&mut win, s, e, &mut |d| out.write_all(d))?;
            }
        }
        let sum: Sha = out.sum.finalize().into();
        let mut w = out.w;
        w.write_all(&sum)?;
        w.flush()?;
        drop(w);
        self.file.sync_all()
    }

    /// Where the manifest is being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The block of the scratch file read last.
#[derive(Default)]
struct Window {
    block: Option<u64>,
    raw: Vec<u8>,
    /// Digests the scratch file held in `raw`.
    valid: usize,
}

/// A writer that hashes what goes through it.
struct Summed<W: Write> {
    w: W,
    sum: Sha256,
}

impl<W: Write> Write for Summed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl ChunkObserver for ManifestWriter {
    fn copied(&self, offset: u64, data: ChunkData<'_>) -> Result<(), CopyError> {
        let c = self.geo.chunk;
        let first = offset / c;
        match data {
            ChunkData::Zeroes(len) => {
                self.put_zeros(first, (offset + len).div_ceil(c));
                Ok(())
            }
            // A few full chunks wait for others to be hashed with them.
            ChunkData::Bytes(buf)
                if buf.len() < LANES * c as usize
                    && buf.len() % c as usize == 0
                    && self.algo() == DigestAlgo::Sha256
                    && super::sha256x::batches() =>
            {
                for (k, piece) in buf.chunks(c as usize).enumerate() {
                    let i = first + k as u64;
                    if crate::node::is_zero(piece) {
                        self.put_zeros(i, i + 1);
                    } else {
                        self.queue(i, piece).map_err(CopyError::Manifest)?;
                    }
                }
                Ok(())
            }
            ChunkData::Bytes(buf) => {
                let ds = self.zero.of_chunks(first, buf);
                self.put_many(first, &ds).map_err(CopyError::Manifest)
            }
        }
    }
}
