//! Checking images against manifests, at the cost of the data: chunks the
//! manifest says are zero and the image does not hold are equal without a
//! read.

use super::runs::union;
use super::sha256x::LANES;
use super::{ManifestFile, Sha, ZeroDigests, hex};
use crate::bitmap::Bits;
use crate::copy::CopyError;
use crate::job::cancel::Cancel;
use crate::node::{BlockNode, Status};
use std::io;
use std::sync::Mutex;

/// Split the chunk `runs` into batches of at most 64 chunks and run `f` on
/// each batch `[a, b)` in a pool of `jobs` threads, stopping at the first
/// error or when `cancel` is set: the one loop over digests.
pub(super) fn for_each_batch<F>(
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
    if runs.is_empty() {
        return Ok(());
    }
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
    // One batch per task: rayon would otherwise hand each worker a long
    // stretch to do alone, and a worker whose reads wait on the disk (or a
    // chain's scattered layers) would be left with the end while the other
    // sleeps.
    pool.install(|| {
        batches.par_iter().with_max_len(1).try_for_each(|&(a, b)| {
            if cancel.is_cancelled() {
                return Err(CopyError::Cancelled);
            }
            f(a, b)
        })
    })
}

/// Digests of chunks `[a, b)` of `image`, reading only what holds data.
/// Data chunks are hashed [`LANES`] at a time, wherever they come from (a
/// chain's layers split the data into small extents between zeros).
pub(super) fn digests_of(
    image: &dyn BlockNode,
    a: u64,
    b: u64,
    zero: &ZeroDigests,
) -> Result<Vec<Sha>, CopyError> {
    let geo = zero.geometry();
    let c = geo.chunk as usize;
    let start = a * geo.chunk;
    let end = (b * geo.chunk).min(geo.size);
    let mut out: Vec<Sha> = Vec::with_capacity((b - a) as usize);
    let mut buf = vec![0u8; c * LANES];
    // Data chunks read but not hashed yet: (chunk, bytes in `buf`, in
    // slots of a chunk each); their digests go to `out[chunk - a]`.
    let mut pending: Vec<(u64, usize)> = Vec::with_capacity(LANES);
    let hash = |out: &mut Vec<Sha>, pending: &mut Vec<(u64, usize)>, buf: &[u8]| {
        let pieces: Vec<(u64, &[u8])> = pending
            .iter()
            .enumerate()
            .map(|(slot, &(i, n))| (i, &buf[slot * c..slot * c + n]))
            .collect();
        let mut got = vec![[0u8; 32]; pieces.len()];
        zero.of_pieces(&pieces, &mut got);
        for (&(i, _), d) in pending.iter().zip(got) {
            out[(i - a) as usize] = d;
        }
        pending.clear();
    };
    let mut pos = start;
    while pos < end {
        // Data over a host hole is read (zeros, no hashing) rather than
        // asked about: one seek less per extent.
        let ext = image
            .allocation(pos, end - pos)
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
                let (i, j) = geo.chunks_of(pos, zend);
                out.extend(zero.run(i, j));
                pos = zend;
                continue;
            }
        }
        // Data: as many chunks of this extent as the batch has room for,
        // in one read.
        let i = pos / geo.chunk;
        let room = (LANES - pending.len()) as u64;
        let upto = ext_end.div_ceil(geo.chunk).min(i + room);
        let n = ((upto * geo.chunk).min(end) - pos) as usize;
        let slot = pending.len() * c;
        image
            .read(pos, &mut buf[slot..slot + n])
            .map_err(CopyError::Source)?;
        for k in 0..(upto - i) as usize {
            pending.push((i + k as u64, (n - k * c).min(c)));
            out.push([0u8; 32]);
        }
        pos += n as u64;
        if pending.len() == LANES {
            hash(&mut out, &mut pending, &buf);
        }
    }
    hash(&mut out, &mut pending, &buf);
    Ok(out)
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

/// Make a backup nothing writes to ready to be read against its
/// `manifest`: its chain mapped once ([`crate::node::frozen::FrozenChain`])
/// while the manifests of its parents are opened and checked.
pub fn ready_to_check(image: &mut crate::node::probe::Image, manifest: Option<&ManifestFile>) {
    rayon::join(
        || crate::node::frozen::FrozenChain::freeze(image),
        || manifest.map(|m| m.open_parents()),
    );
}

/// The chunk runs where `image` and `manifest` may differ: what the
/// manifest says is not zero, and what the image holds as data.
fn runs_to_check(
    image: &dyn BlockNode,
    manifest: &ManifestFile,
) -> Result<Vec<(u64, u64)>, CopyError> {
    let geo = manifest.geometry();
    let mut runs = manifest
        .data_runs(0, geo.chunks())
        .map_err(CopyError::ManifestRead)?;
    let end = image.size().min(geo.size);
    // Data over host holes is checked too (it reads as zeros): no seek per
    // extent to tell.
    crate::node::for_each_allocation(image, 0, end, |pos, ext| {
        if ext.status == Status::Data {
            runs.push(geo.chunks_of(pos, pos + ext.len));
        }
    })
    .map_err(CopyError::Source)?;
    Ok(union(runs))
}

/// Check a backup opened as `image` (its chain) against its `manifest`:
/// as [`check_image`] does, but for the chunks it reads from the very
/// backing file its manifest recorded by identity
/// ([`read_from_recorded_backing`]), which both sides read alike and need
/// no digest.
pub fn check_backup(
    image: &crate::node::probe::Image,
    manifest: &ManifestFile,
    jobs: usize,
    cancel: &Cancel,
) -> Result<Option<Difference>, CopyError> {
    let trusted = read_from_recorded_backing(image, manifest)?;
    let untrusted = complement(&trusted, manifest.geometry().chunks());
    let runs: Vec<(u64, u64)> = runs_to_check(image.node.as_ref(), manifest)?
        .into_iter()
        .flat_map(|(a, b)| intersect(&untrusted, a, b))
        .collect();
    first_difference_in(image.node.as_ref(), manifest, &runs, jobs, cancel)
}

/// Check an incremental opened as `image` against its `manifest` when its
/// parent — the next layer of its chain, the backup its manifest names —
/// was verified already (`list --verify` goes oldest first): the chunks
/// the incremental does not hold itself and its manifest gives as the
/// parent's are read from that parent and described by its manifest,
/// equal by construction; the rest is checked as [`check_backup`] does.
/// Returns the first difference and the number of chunks checked.
pub fn check_over_verified_parent(
    image: &crate::node::probe::Image,
    manifest: &ManifestFile,
    jobs: usize,
    cancel: &Cancel,
) -> Result<(Option<Difference>, u64), CopyError> {
    let n = manifest.geometry().chunks();
    let own = top_held(image, manifest)?;
    let free = complement(&own, n);
    let trusted = union(
        manifest
            .parent_runs()
            .iter()
            .flat_map(|&(a, b)| intersect(&free, a, b))
            .collect(),
    );
    let untrusted = complement(&trusted, n);
    let runs: Vec<(u64, u64)> = runs_to_check(image.node.as_ref(), manifest)?
        .into_iter()
        .flat_map(|(a, b)| intersect(&untrusted, a, b))
        .collect();
    let checked = runs.iter().map(|(a, b)| b - a).sum();
    Ok((
        first_difference_in(image.node.as_ref(), manifest, &runs, jobs, cancel)?,
        checked,
    ))
}

/// The chunks a backup opened as `image` reads from the very backing file
/// its manifest's backing runs were recorded from (same files, unchanged,
/// and the backup holds nothing of its own there): equal by construction,
/// so they need no digest. Empty when the manifest has no backing runs or
/// the backup's chain is another.
pub fn read_from_recorded_backing(
    image: &crate::node::probe::Image,
    manifest: &ManifestFile,
) -> Result<Vec<(u64, u64)>, CopyError> {
    let backing = manifest.backing_runs();
    if backing.is_empty() || !same_backing_chain(image, manifest) {
        return Ok(Vec::new());
    }
    manifest.check_backing().map_err(CopyError::ManifestRead)?;
    let own = top_held(image, manifest)?;
    let n = manifest.geometry().chunks();
    let free = complement(&own, n);
    Ok(union(
        backing
            .iter()
            .flat_map(|&(a, b)| intersect(&free, a, b))
            .collect(),
    ))
}

/// The chunks the top layer of `image` holds itself (data or zeros).
fn top_held(
    image: &crate::node::probe::Image,
    manifest: &ManifestFile,
) -> Result<Vec<(u64, u64)>, CopyError> {
    let geo = manifest.geometry();
    let mut out = Vec::new();
    let end = image.top().size().min(geo.size);
    crate::node::for_each_extent(image.top().as_ref(), 0, end, |pos, ext| {
        if ext.status != Status::Unallocated {
            out.push(geo.chunks_of(pos, pos + ext.len));
        }
    })
    .map_err(CopyError::Source)?;
    Ok(union(out))
}

/// True when `image`'s backing chain (below its top) is the chain the
/// manifest's backing runs were recorded from: same files, same formats.
/// (Their identities are checked by [`ManifestFile::check_backing`].)
fn same_backing_chain(image: &crate::node::probe::Image, manifest: &ManifestFile) -> bool {
    let below = &image.layers[1.min(image.layers.len())..];
    below.len() == manifest.meta.backing_files.len()
        && below
            .iter()
            .zip(&manifest.meta.backing_files)
            .all(|(l, b)| {
                let p = std::fs::canonicalize(&l.info.path).unwrap_or_else(|_| l.info.path.clone());
                p.as_os_str() == std::ffi::OsStr::new(&b.path)
                    && l.info.format.to_string() == b.format
            })
}

/// The runs of `[0, n)` not in the sorted disjoint `runs`.
fn complement(runs: &[(u64, u64)], n: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(s, e) in runs {
        if s > pos {
            out.push((pos, s));
        }
        pos = pos.max(e);
    }
    if pos < n {
        out.push((pos, n));
    }
    out
}

/// The parts of the sorted disjoint `runs` inside `[a, b)`.
fn intersect(runs: &[(u64, u64)], a: u64, b: u64) -> Vec<(u64, u64)> {
    let k = runs.partition_point(|r| r.1 <= a);
    runs[k..]
        .iter()
        .take_while(|r| r.0 < b)
        .map(|&(s, e)| (s.max(a), e.min(b)))
        .collect()
}

/// Recompute the chunk digests of `image` in parallel and compare with
/// `manifest`. Returns the first (lowest) differing chunk.
pub fn check_image(
    image: &dyn BlockNode,
    manifest: &ManifestFile,
    jobs: usize,
    cancel: &Cancel,
) -> Result<Option<Difference>, CopyError> {
    let runs = runs_to_check(image, manifest)?;
    first_difference_in(image, manifest, &runs, jobs, cancel)
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
    let mut held = Vec::new();
    crate::node::for_each_extent(layer, 0, layer.size(), |pos, ext| {
        if ext.status != Status::Unallocated {
            held.push(geo.chunks_of(pos, pos + ext.len));
        }
    })
    .map_err(CopyError::Source)?;
    let held = union(held);
    let count = held.iter().map(|(s, e)| e - s).sum();
    let d = first_difference_in(layer, manifest, &held, jobs, cancel)?;
    Ok((d, count))
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
    let zero = manifest.zero_digests();
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
    let zero = manifest.zero_digests();
    let runs = runs_to_check(image, manifest)?;
    let out = Mutex::new(Bits::new(geo.chunks()));
    for_each_batch(&runs, jobs, cancel, |a, b| {
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
