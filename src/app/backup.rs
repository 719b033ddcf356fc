//! `imgbackup backup SOURCE TARGET`: build the graph, run the job, report.
//!
//! ```text
//!  guest ──► copy-before-write ──► overlay (active disk) ──► source chain (read-only)
//!                  │                      ▲                      [fault node]
//!                  └──► block-copy ◄──────┘ job reads through the active disk
//!                           │
//!                           ▼
//!                  [fault node] target (TARGET.partial)
//! ```

use super::guard;
use crate::bitmap::Bits;
use crate::bitmap::{Bitmap, BitmapError, Identity};
use crate::cli::{BackupArgs, BitmapMode, GlobalOpts, ProgressMode, SyncMode};
use crate::copy::ChunkObserver;
use crate::copy::{BlockCopy, Config, CopyError};
use crate::error::{BlockError, Op};
use crate::exit::{AppError, Exit};
use crate::guest::{self, GuestReport, GuestSpec};
use crate::job::cancel::Cancel;
use crate::job::policy::Policies;
use crate::job::sync_bitmap::{Before, SyncBitmap};
use crate::job::{PolicyLog, outcome, run_background, run_drain};
use crate::lock::{Access, Locks};
use crate::manifest::{
    Geometry, ManifestFile, ManifestWriter, Meta, Parent, check_held, check_image, manifest_path,
    unhex,
};
use crate::node::cbw::{CbwNode, OnCbwError};
use crate::node::fault::{FaultNode, Side};
use crate::node::marking::MarkingNode;
use crate::node::overlay::OverlayNode;
use crate::node::probe::{Format, Image, format_for, open_image};
use crate::node::qcow2::{CreateOptions, Qcow2Writer};
use crate::node::{BlockNode, Status, for_each_extent};
use crate::report::{Reporter, human_bytes, human_duration, print_json};
use crate::target::{Output, Partial};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

/// Default backup granularity.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;
/// Default copy-before-write cache per worker.
pub const DEFAULT_CBW_CACHE_PER_WORKER: u64 = 4 << 20;
/// Default request size.
pub const DEFAULT_MAX_CHUNK: u64 = 2 << 20;

/// The validated settings of one backup.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The image to back up.
    pub source: PathBuf,
    /// The backup to write.
    pub target: PathBuf,
    /// What to copy.
    pub sync: SyncMode,
    /// Format of TARGET.
    pub target_format: Format,
    /// qcow2 cluster size of TARGET.
    pub target_cluster_size: u64,
    /// Backup granularity, bytes.
    pub cluster_size: u64,
    /// Largest single request, bytes.
    pub max_chunk: u64,
    /// Copy workers.
    pub jobs: usize,
    /// What a failed copy-before-write does.
    pub on_cbw_error: OnCbwError,
    /// What happens to the bitmap after the job.
    pub bitmap_mode: BitmapMode,
}

/// The end-of-job summary (human on stderr, or the `--json` document).
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    /// True for exit 0.
    pub ok: bool,
    /// The exit code.
    pub exit_code: i32,
    /// The command.
    pub command: &'static str,
    /// The source image.
    pub source: String,
    /// The backup written.
    pub target: String,
    /// Format of TARGET.
    pub target_format: Format,
    /// The sync mode.
    pub sync: SyncMode,
    /// True for --dry-run (nothing was written).
    pub dry_run: bool,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Backup granularity, bytes.
    pub cluster_size: u64,
    /// Bytes written to the target as data.
    pub bytes_copied: u64,
    /// Of those, bytes the kernel copied between the files
    /// (`copy_file_range`, raw to raw without a manifest).
    pub bytes_copied_in_kernel: u64,
    /// Bytes not written as data because they read as zeros (unallocated,
    /// zero clusters, all-zero data).
    pub bytes_skipped_zero: u64,
    /// Bytes not examined at all: clean in the bitmap (incremental, bitmap)
    /// or not allocated in the top layer (top).
    pub bytes_clean: u64,
    /// Bytes TARGET occupies on disk.
    pub target_disk_usage: u64,
    /// Copy-before-write operations.
    pub copy_before_write_copies: u64,
    /// Bytes copied by copy-before-write.
    pub copy_before_write_bytes: u64,
    /// The most bytes the copy-before-write cache held at once.
    pub cbw_cache_peak_bytes: u64,
    /// Retries of failed copies.
    pub retries: u64,
    /// The first retries (at most 1000).
    pub retry_events: Vec<crate::job::RetryEvent>,
    /// Byte ranges `[start, end)` skipped by an ignore policy.
    pub ignored_ranges: Vec<[u64; 2]>,
    /// Wall-clock time of the command.
    pub elapsed_seconds: f64,
    /// Bytes copied or skipped as zeros per second.
    pub throughput_bytes_per_second: f64,
    /// Start time (RFC 3339).
    pub started: String,
    /// End time (RFC 3339).
    pub finished: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The simulated guest, when --guest ran.
    pub guest: Option<GuestReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Where --guest-overlay wrote the overlay.
    pub guest_overlay: Option<String>,
    /// Whether --verify checked the backup.
    pub verified: bool,
    /// Root digest of TARGET.manifest (absent with --no-manifest).
    pub manifest_root_digest: Option<String>,
    /// The backing file written into TARGET.
    pub backing: Option<String>,
    /// The bitmap's state after the job.
    pub bitmap: Option<BitmapReport>,
}

/// The bitmap's state after a job.
#[derive(Debug, serde::Serialize)]
pub struct BitmapReport {
    /// The bitmap's name.
    pub name: String,
    /// The bitmap mode.
    pub mode: BitmapMode,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes.
    pub dirty_bytes: u64,
    /// Dirty granules (bits set).
    pub dirty_granules: u64,
    /// The backup it is anchored to.
    pub anchored_backup: Option<String>,
}

fn usage(msg: String) -> anyhow::Error {
    AppError::Usage(msg).into()
}

/// Turn the arguments into a plan, refusing inconsistent values (exit 2).
pub fn plan(args: &BackupArgs) -> anyhow::Result<Plan> {
    let needs_qcow2 = matches!(
        args.sync,
        SyncMode::None | SyncMode::Top | SyncMode::Incremental | SyncMode::Bitmap
    );
    let target_format = args.output_format.unwrap_or_else(|| {
        format_for(
            &args.target,
            if needs_qcow2 {
                Format::Qcow2
            } else {
                Format::Raw
            },
        )
    });
    if needs_qcow2 && target_format != Format::Qcow2 {
        return Err(usage(format!("--sync {} needs a qcow2 target", args.sync)));
    }
    match (args.sync, &args.bitmap) {
        (SyncMode::Incremental | SyncMode::Bitmap, None) => {
            return Err(usage(format!("--sync {} needs --bitmap NAME", args.sync)));
        }
        (SyncMode::None, Some(_)) => {
            return Err(usage("--sync none takes no --bitmap".into()));
        }
        _ => {}
    }
    if args.sync == SyncMode::Incremental
        && args.bitmap_mode.is_some_and(|m| m != BitmapMode::OnSuccess)
    {
        return Err(usage(
            "--sync incremental always uses --bitmap-mode on-success; use --sync bitmap for another mode".into(),
        ));
    }
    if matches!(args.sync, SyncMode::Full | SyncMode::Top)
        && args.bitmap_mode == Some(BitmapMode::Never)
    {
        return Err(usage(format!(
            "--bitmap-mode never is meaningless with --sync {}: a full or top backup with --bitmap exists to anchor the bitmap to it (QEMU refuses it too); leave --bitmap-mode out",
            args.sync
        )));
    }
    if args.compress && target_format != Format::Qcow2 {
        return Err(usage("--compress needs a qcow2 target".into()));
    }
    if (args.backing.is_some() || args.no_backing) && target_format != Format::Qcow2 {
        return Err(usage(
            "--backing and --no-backing need a qcow2 target".into(),
        ));
    }
    if args.sync == SyncMode::None {
        match &args.guest {
            None => {
                return Err(usage(
                    "--sync none needs --guest: it copies only what a guest overwrites".into(),
                ));
            }
            Some(g) if !g.is_bounded() => {
                return Err(usage(
                    "--sync none ends when the guest ends: give the --guest SPEC a count= or duration=".into(),
                ));
            }
            _ => {}
        }
    }
    let target_cs = match target_format {
        Format::Qcow2 => args.output_cluster_size,
        Format::Raw => DEFAULT_CLUSTER,
    };
    if target_format == Format::Qcow2 && target_cs > (2 << 20) {
        return Err(usage(format!(
            "--output-cluster-size {target_cs} is larger than qcow2 allows (2M)"
        )));
    }
    let cluster_size = args.granularity.unwrap_or(DEFAULT_CLUSTER.max(target_cs));
    if target_format == Format::Qcow2 && cluster_size < target_cs {
        return Err(usage(format!(
            "--granularity {cluster_size} is smaller than the target's cluster size {target_cs}; \
             use at least {target_cs} or a smaller --output-cluster-size"
        )));
    }
    let max_chunk = args
        .max_chunk
        .unwrap_or(DEFAULT_MAX_CHUNK.max(cluster_size));
    let max_chunk = (max_chunk / cluster_size).max(1) * cluster_size;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if let (Some(o), Some(_)) = (&args.guest_overlay, &args.guest)
        && (o == &args.target || o == &args.source)
    {
        return Err(usage(
            "--guest-overlay must name a file other than SOURCE and TARGET".into(),
        ));
    }
    Ok(Plan {
        source: args.source.clone(),
        target: args.target.clone(),
        sync: args.sync,
        target_format,
        target_cluster_size: target_cs,
        cluster_size,
        max_chunk,
        jobs,
        on_cbw_error: args.on_cbw_error.unwrap_or(OnCbwError::BreakGuestWrite),
        bitmap_mode: args.bitmap_mode.unwrap_or(BitmapMode::OnSuccess),
    })
}

/// The directory holding `p`.
pub fn dir_of(p: &Path) -> PathBuf {
    crate::files::dir_of(p)
}

/// The name a qcow2 written next to `at` uses for `source` as its backing
/// file: the bare file name when both share a directory, else the absolute
/// path.
pub fn backing_name(at: &Path, source: &Path) -> anyhow::Result<String> {
    let src = std::fs::canonicalize(source)
        .with_context(|| format!("cannot resolve {}", source.display()))?;
    let dir = std::fs::canonicalize(dir_of(at))
        .with_context(|| format!("cannot resolve the directory of {}", at.display()))?;
    let name = if src.parent() == Some(dir.as_path()) {
        // `./` keeps QEMU from reading a name with a ':' before any '/'
        // (`full-2026-01-01T12:00:00.qcow2`) as a protocol prefix.
        src.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .map(|n| if n.contains(':') { format!("./{n}") } else { n })
    } else {
        None
    };
    Ok(name.unwrap_or_else(|| src.to_string_lossy().into_owned()))
}

/// Bytes a backup of the clusters in `bits` reads: (data bytes, zero or
/// unallocated bytes).
fn dry_run_counts(node: &dyn BlockNode, bits: &Bits, cluster: u64) -> anyhow::Result<DryRun> {
    let mut d = DryRun::default();
    let mut last_data_cluster = u64::MAX;
    for (s, e) in bits.runs() {
        let end = (e * cluster).min(node.size());
        for_each_extent(node, s * cluster, end, |pos, ext| {
            if ext.status == Status::Data {
                d.data += ext.len;
                // Clusters touched by this extent, each counted once.
                let (first, last) = (pos / cluster, (pos + ext.len).div_ceil(cluster));
                let first = if first == last_data_cluster {
                    first + 1
                } else {
                    first
                };
                d.data_clusters += last.saturating_sub(first);
                last_data_cluster = last - 1;
            } else {
                d.zero += ext.len;
            }
        })
        .map_err(CopyError::Source)?;
    }
    d.clusters = bits.count();
    Ok(d)
}

/// What a dry run would copy.
#[derive(Debug, Default)]
struct DryRun {
    /// Bytes of data to read.
    data: u64,
    /// Bytes that read as zeros (not written as data).
    zero: u64,
    /// Clusters to examine, and those of them that hold data.
    clusters: u64,
    data_clusters: u64,
}

/// Clusters allocated (data or zero) in the top layer.
fn top_clusters(top: &dyn BlockNode, cluster: u64) -> anyhow::Result<Bits> {
    let mut bits = Bits::new(top.size().div_ceil(cluster));
    for_each_extent(top, 0, top.size(), |pos, ext| {
        if ext.status != Status::Unallocated {
            bits.set_range(pos / cluster, (pos + ext.len).div_ceil(cluster));
        }
    })
    .map_err(CopyError::Source)?;
    Ok(bits)
}

/// The bitmap a job uses or (re)anchors, checked for the sync mode, and
/// the file as it was before (what a failed job puts back).
fn job_bitmap(
    name: &str,
    sync: SyncMode,
    source: &Path,
    size: u64,
    identity: &Identity,
) -> Result<(Bitmap, Before), BitmapError> {
    if matches!(sync, SyncMode::Incremental | SyncMode::Bitmap) {
        let b = Bitmap::load_consistent(source, name, size, identity)?;
        let before = Before::Parsed {
            bitmap: Box::new(b.clone()),
            consistent: true,
        };
        return Ok((b, before));
    }
    let fresh = || {
        Bitmap::new(
            name,
            crate::bitmap::file::DEFAULT_GRANULARITY,
            size,
            *identity,
        )
    };
    match Bitmap::load(source, name) {
        Ok(b) => {
            let consistent = b.inconsistency(size, identity).is_none();
            let before = Before::Parsed {
                bitmap: Box::new(b.clone()),
                consistent,
            };
            if b.image_size == size {
                Ok((b, before))
            } else {
                Ok((fresh(), before))
            }
        }
        Err(BitmapError::Missing { .. }) => Ok((fresh(), Before::Missing)),
        Err(e @ BitmapError::Damaged { .. }) => {
            tracing::warn!("{e}; this backup starts it afresh");
            let raw = Bitmap::read_raw(source, name).unwrap_or_default();
            Ok((fresh(), Before::Raw(raw)))
        }
        Err(e) => Err(e),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Compare `got` with `want` over their whole size; the first differing
/// offset, if any. Stops early (`Ok(None)`) when `cancel` is set: callers
/// check it.
pub fn first_difference(
    got: &dyn BlockNode,
    want: &dyn BlockNode,
    cancel: &Cancel,
) -> anyhow::Result<Option<u64>> {
    if got.size() != want.size() {
        return Ok(Some(got.size().min(want.size())));
    }
    let size = want.size();
    let chunk = 4u64 << 20;
    let (mut a, mut b) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut pos = 0;
    while pos < size {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let n = (size - pos).min(chunk) as usize;
        got.read(pos, &mut a[..n])
            .context("cannot read the backup")?;
        want.read(pos, &mut b[..n]).map_err(CopyError::Source)?;
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}

/// Write the guest overlay as a qcow2 backed by the source, into its
/// partial file (the caller commits it with the backup).
fn export_overlay(
    overlay: &OverlayNode,
    file: &Path,
    source: &Path,
    source_format: Format,
    cancel: &Cancel,
    keep_partial: bool,
) -> anyhow::Result<Partial> {
    let cluster_size = 65536;
    let partial = Partial::create(file, crate::files::mode_from(source), keep_partial, None)?;
    let w = Qcow2Writer::create_in(
        partial.path(),
        partial.file()?,
        &CreateOptions {
            size: overlay.size(),
            cluster_size,
            backing: Some((backing_name(file, source)?, source_format.to_string())),
        },
    )?;
    let mut buf = vec![0u8; cluster_size as usize];
    let mut last = u64::MAX;
    for (s, e) in overlay.allocated_ranges() {
        for c in s / cluster_size..e.div_ceil(cluster_size) {
            if let Some(r) = cancel.reason() {
                return Err(AppError::Cancelled(r).into());
            }
            if c == last {
                continue;
            }
            last = c;
            let off = c * cluster_size;
            let n = (overlay.size() - off).min(cluster_size) as usize;
            overlay.read(off, &mut buf[..n])?;
            if crate::node::is_zero(&buf[..n]) {
                w.write_zeroes(off, n as u64)?;
            } else {
                w.write(off, &buf[..n])?;
            }
        }
    }
    w.finish()?;
    if let Some(r) = cancel.reason() {
        return Err(AppError::Cancelled(r).into());
    }
    Ok(partial)
}

/// The identity of every file of the source's chain, to tell at the end
/// whether something wrote them during the backup (block devices record no
/// modification time: only their size is compared).
fn chain_identities(image: &Image) -> Vec<(PathBuf, Option<Identity>)> {
    image
        .layers
        .iter()
        .map(|l| (l.info.path.clone(), Identity::of(&l.info.path).ok()))
        .collect()
}

/// Fail (exit 4) if a file of the source's chain changed since `before`.
fn check_unchanged(before: &[(PathBuf, Option<Identity>)]) -> anyhow::Result<()> {
    for (path, was) in before {
        let now = Identity::of(path).ok();
        let changed = match (was, &now) {
            (Some(a), Some(b)) => a != b,
            _ => true,
        };
        if changed {
            return Err(anyhow::Error::new(CopyError::Source(BlockError::Changed {
                path: path.clone(),
            }))
            .context("the backup is not point-in-time"));
        }
    }
    Ok(())
}

/// What the job copied and what it was told to skip: every cluster it did
/// not copy must be one an ignore policy skipped, or the backup is wrong.
fn check_all_copied(bc: &BlockCopy, skipped: &[(u64, u64)]) -> anyhow::Result<()> {
    let cs = bc.cluster_size();
    let mut left = bc.not_copied();
    for &(s, e) in skipped {
        left.clear_range(s / cs, e.div_ceil(cs));
    }
    if let Some(c) = left.next_set(0) {
        anyhow::bail!(
            "internal error: the cluster at offset {} was neither copied nor listed as skipped; the backup was not kept",
            c * cs
        );
    }
    Ok(())
}

/// Times the phases of a job for `-vv`.
struct PhaseClock {
    name: &'static str,
    started: Instant,
}

impl PhaseClock {
    fn start(name: &'static str) -> PhaseClock {
        PhaseClock {
            name,
            started: Instant::now(),
        }
    }

    /// The current phase ended; `name` starts.
    fn next(&mut self, name: &'static str) {
        self.end();
        *self = PhaseClock::start(name);
    }

    fn end(&self) {
        tracing::debug!("phase {} took {:.1?}", self.name, self.started.elapsed());
    }
}

/// The result of a phase, or the cancellation that cut it short.
fn phase<T>(cancel: &Cancel, r: anyhow::Result<T>) -> anyhow::Result<T> {
    if let Some(reason) = cancel.reason() {
        return Err(AppError::Cancelled(reason).into());
    }
    r
}

/// Run `imgbackup backup`.
#[allow(
    clippy::too_many_lines,
    reason = "the whole job in one function until it becomes a library job (prepare, run, commit or abort)"
)]
pub fn run(args: &BackupArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let plan = plan(args)?;
    let image = open_image(&plan.source, args.format).context("cannot open the source image")?;
    let on_device = std::fs::metadata(&plan.source)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    if on_device && args.bitmap.is_some() {
        return Err(usage(format!(
            "--bitmap is not available for the block device {}: a device records no modification time, so a bitmap beside it could not tell when something wrote the device without marking it (and would live in /dev); use full backups",
            plan.source.display()
        )));
    }
    let mut locks = Locks::new();
    locks.exclusive(&plan.source, args.wait_lock)?;
    for layer in &image.layers {
        locks.qemu(
            &layer.info.path,
            Access::Read,
            args.force_share,
            args.wait_lock,
        )?;
    }
    for t in crate::bitmap::file::remove_stale_temps(&plan.source) {
        tracing::info!(
            "removed a bitmap temporary file left by a killed run: {}",
            t.display()
        );
    }
    guard::check_output(&plan.target, args.force, "target")?;
    if let Some(o) = &args.guest_overlay {
        guard::check_output(o, args.force, "guest overlay")?;
    }
    let size = image.node.size();
    let source_format = image.layers[0].info.format;
    let identity = Identity::of(&plan.source)
        .with_context(|| format!("cannot stat {}", plan.source.display()))?;
    let source_ids = chain_identities(&image);

    // The bitmap, and what to copy.
    let bitmap = match &args.bitmap {
        Some(name) => Some(job_bitmap(name, plan.sync, &plan.source, size, &identity)?),
        None => None,
    };
    let cs = plan.cluster_size;
    let clusters = size.div_ceil(cs);
    let copy_bits = match plan.sync {
        SyncMode::Full | SyncMode::None => Bits::full(clusters),
        SyncMode::Top => top_clusters(image.top().as_ref(), cs)?,
        SyncMode::Incremental | SyncMode::Bitmap => {
            let mut bits = Bits::new(clusters);
            for (s, e) in bitmap
                .as_ref()
                .map(|(b, _)| b.dirty_ranges())
                .unwrap_or_default()
            {
                bits.set_range(s / cs, e.div_ceil(cs));
            }
            bits
        }
    };

    // The parent of an incremental (checked against the bitmap's anchor),
    // and the backing file written into the target.
    let parent_path: Option<PathBuf> = match (plan.sync, &bitmap) {
        (SyncMode::Incremental | SyncMode::Bitmap, Some((b, _))) => Some(
            crate::job::parent::choose(b, &plan.source, args.backing.as_deref())?,
        ),
        _ => None,
    };
    let backing_path: Option<PathBuf> = if args.no_backing {
        None
    } else if parent_path.is_some() {
        parent_path.clone()
    } else if let Some(b) = &args.backing {
        crate::files::check_image_path(b)
            .with_context(|| format!("the backing file {} cannot be used", b.display()))?;
        Some(b.clone())
    } else {
        match plan.sync {
            SyncMode::None => Some(plan.source.clone()),
            SyncMode::Top => image.layers.get(1).map(|l| l.info.path.clone()),
            _ => None,
        }
    };

    // Nothing the backup reads or builds on may be written over.
    let mut protected = guard::Protected::source(&image);
    if let Some(b) = &backing_path {
        protected.parent(b);
    }
    if let Some(p) = &parent_path {
        protected.parent(p);
    }
    if let Some((b, _)) = &bitmap
        && let Some(a) = &b.anchor
    {
        protected.anchor(&a.path, &b.name);
    }
    if let Some(o) = &args.guest_overlay {
        protected.check(o, "guest overlay")?;
        protected.output(o, "the guest overlay");
    }
    protected.check(&plan.target, "target")?;
    guard::check_children(&plan.target)?;

    let backing = match &backing_path {
        Some(p) => {
            let fmt = crate::node::probe::probe(p)
                .with_context(|| format!("cannot open the backing file {}", p.display()))?;
            Some((backing_name(&plan.target, p)?, fmt.to_string()))
        }
        None => None,
    };
    let geo = Geometry {
        size,
        chunk: crate::manifest::CHUNK_SIZE.min(cs),
    };
    let parent = match &parent_path {
        Some(p) => ManifestFile::open(&manifest_path(p))
            .ok()
            .filter(|m| m.geometry() == geo && m.check_bound(p).is_ok()),
        None => None,
    };

    tracing::info!(
        "source {} ({}, {} layer(s), {}), target {} ({}{}), sync {}{}, cluster size {}, {} worker(s), requests up to {}",
        plan.source.display(),
        source_format,
        image.layers.len(),
        human_bytes(size),
        plan.target.display(),
        plan.target_format,
        backing
            .as_ref()
            .map(|(n, _)| format!(", backing {n}"))
            .unwrap_or_default(),
        plan.sync,
        bitmap
            .as_ref()
            .map(|(b, _)| format!(", bitmap {} ({})", b.name, plan.bitmap_mode))
            .unwrap_or_default(),
        human_bytes(cs),
        plan.jobs,
        human_bytes(plan.max_chunk)
    );

    let mut summary = Summary {
        ok: true,
        exit_code: 0,
        command: "backup",
        source: plan.source.display().to_string(),
        target: plan.target.display().to_string(),
        target_format: plan.target_format,
        sync: plan.sync,
        dry_run: args.dry_run,
        virtual_size: size,
        cluster_size: cs,
        bytes_copied: 0,
        bytes_copied_in_kernel: 0,
        bytes_skipped_zero: 0,
        bytes_clean: 0,
        target_disk_usage: 0,
        copy_before_write_copies: 0,
        copy_before_write_bytes: 0,
        cbw_cache_peak_bytes: 0,
        retries: 0,
        retry_events: Vec::new(),
        ignored_ranges: Vec::new(),
        elapsed_seconds: 0.0,
        throughput_bytes_per_second: 0.0,
        started: rfc3339(started),
        finished: String::new(),
        guest: None,
        guest_overlay: None,
        verified: false,
        manifest_root_digest: None,
        backing: backing.as_ref().map(|(n, _)| n.clone()),
        bitmap: None,
    };

    if args.dry_run {
        return dry_run(&plan, &image, &copy_bits, summary, t0, g);
    }

    let cancel = Cancel::new();
    cancel
        .install_signal_handlers()
        .context("cannot install the SIGINT/SIGTERM/SIGHUP handlers")?;
    if let Some(t) = args.timeout {
        cancel.arm_timeout(t);
    }

    // The target's files, created exclusively and locked (a second run on
    // the same TARGET is refused here), before the bitmap is touched.
    let mode = crate::files::mode_from(&plan.source);
    let mut partial = Partial::create(&plan.target, mode, args.keep_partial, args.wait_lock)?;
    let mpartial = match args.no_manifest {
        true => None,
        false => Some(Partial::create(
            &manifest_path(&plan.target),
            mode,
            args.keep_partial,
            args.wait_lock,
        )?),
    };

    // From here on the bitmap is frozen and in use; dropping the job's
    // bitmap on any failure puts it back (with the writes made meanwhile).
    let sync_bitmap = match bitmap {
        Some((b, before)) => Some(Arc::new(SyncBitmap::start(
            &plan.source,
            b,
            before,
            plan.bitmap_mode,
            identity,
        )?)),
        None => None,
    };

    // The graph.
    let source: Arc<dyn BlockNode> =
        FaultNode::wrap(image.node.clone(), &args.inject, Side::Source);
    let overlay = match &args.guest {
        Some(_) => Some(Arc::new(
            OverlayNode::new(source.clone(), &dir_of(&plan.target))
                .context("cannot create the guest overlay")?,
        )),
        None => None,
    };
    let active: Arc<dyn BlockNode> = match &overlay {
        Some(o) => o.clone(),
        None => source.clone(),
    };
    let target = Output::create(
        &partial,
        plan.target_format,
        size,
        plan.target_cluster_size,
        backing.clone(),
    )
    .map_err(CopyError::Target)?;
    let target_node = FaultNode::wrap(target.node(), &args.inject, Side::Target);
    let mwriter = match &mpartial {
        Some(mp) => Some(Arc::new(
            mp.file()
                .and_then(|f| ManifestWriter::create_in(mp.path(), f, geo))
                .map_err(CopyError::Manifest)?,
        )),
        None => None,
    };
    let bc = Arc::new(BlockCopy::new(
        active.clone(),
        target_node,
        Config {
            cluster_size: cs,
            max_chunk: plan.max_chunk,
            // Zero clusters are written as zero flags wherever something
            // below could show through: a backing file now, or a parent
            // the file is attached to later (--no-backing incrementals).
            write_zeroes: backing.is_some() || parent_path.is_some(),
            speed: args.speed,
            compress: args.compress,
            cbw_cache: match (&args.guest, args.cbw_cache) {
                (None, _) => 0,
                (Some(_), Some(c)) => c,
                (Some(_), None) => DEFAULT_CBW_CACHE_PER_WORKER * plan.jobs as u64,
            },
            copy_range: true,
        },
        copy_bits,
        cancel.clone(),
        mwriter.clone().map(|m| m as Arc<dyn ChunkObserver>),
    ));
    if let Some(sb) = &sync_bitmap {
        sb.attach(bc.clone());
    }
    let guest_node: Option<Arc<dyn BlockNode>> = args.guest.as_ref().map(|_| {
        let cbw: Arc<dyn BlockNode> = Arc::new(CbwNode::new(
            active.clone(),
            bc.clone(),
            plan.on_cbw_error,
            args.cbw_timeout,
        ));
        match &sync_bitmap {
            Some(sb) => Arc::new(MarkingNode::new(cbw, sb.marker())) as Arc<dyn BlockNode>,
            None => cbw,
        }
    });

    tracing::debug!(
        "graph: {}{}source chain [{}]{} -> block-copy ({} clusters of {}, requests up to {}, {} worker(s){}{}) -> {}target {} ({}{})",
        if args.guest.is_some() {
            "guest -> "
        } else {
            ""
        },
        match (&args.guest, &sync_bitmap) {
            (Some(_), Some(_)) => "marking -> copy-before-write -> overlay -> ",
            (Some(_), None) => "copy-before-write -> overlay -> ",
            _ => "",
        },
        image
            .layers
            .iter()
            .map(|l| format!("{} ({})", l.info.path.display(), l.info.format))
            .collect::<Vec<_>>()
            .join(" <- "),
        if args.inject.iter().any(|r| r.side == Side::Source) {
            " + fault"
        } else {
            ""
        },
        clusters,
        human_bytes(cs),
        human_bytes(plan.max_chunk),
        plan.jobs,
        args.speed
            .map(|s| format!(", {}/s", human_bytes(s)))
            .unwrap_or_default(),
        if mwriter.is_some() { ", manifest" } else { "" },
        if args.inject.iter().any(|r| r.side == Side::Target) {
            "fault -> "
        } else {
            ""
        },
        partial.path().display(),
        plan.target_format,
        backing
            .as_ref()
            .map(|(n, _)| format!(", backing {n}"))
            .unwrap_or_default(),
    );
    let counter_bc = bc.clone();
    let reporter = Reporter::start(
        args.progress.progress,
        g.quiet || g.json && args.progress.progress == ProgressMode::Auto,
        "backup",
        Arc::new(move || {
            let p = &counter_bc.progress;
            (
                p.done.load(Ordering::Relaxed),
                p.total.load(Ordering::Relaxed),
            )
        }),
    );

    let policies = Policies {
        source: args.on_source_error,
        target: args.on_target_error,
        retries: args.retries,
        delay: args.retry_delay,
        max_delay: args.retry_max_delay,
    };
    let plog = PolicyLog::default();

    // Run: the background copy (unless sync none) and the guest side by side.
    tracing::info!("phase: copy");
    let mut clock = PhaseClock::start("copy");
    let stop_guest = AtomicBool::new(false);
    let stop_drain = AtomicBool::new(false);
    let (result, guest_stats) = std::thread::scope(|s| {
        let guest = match (&args.guest, &guest_node) {
            (Some(spec), Some(node)) => {
                let spec: &GuestSpec = spec;
                let node = node.clone();
                let stop = &stop_guest;
                let cancel = &cancel;
                Some(s.spawn(move || guest::run(node.as_ref(), spec, stop, cancel)))
            }
            _ => None,
        };
        let drain = s.spawn(|| run_drain(&bc, &stop_drain, &cancel, &policies, &plog));
        let result = match plan.sync {
            SyncMode::None => Ok(()),
            _ => run_background(&bc, plan.jobs, &cancel, &policies, &plog),
        };
        let bounded = args.guest.as_ref().is_some_and(|g| g.is_bounded());
        if result.is_err() || !bounded {
            stop_guest.store(true, Ordering::Relaxed);
        }
        let stats = guest.and_then(|h| h.join().ok());
        // The cache drains once no guest can fill it any more.
        stop_drain.store(true, Ordering::Relaxed);
        let _ = drain.join();
        (result, stats)
    });
    reporter.finish();
    let result = result
        .and_then(|_| outcome(&bc, &cancel))
        .and_then(|_| bc.flush_target().map_err(anyhow::Error::from));
    if let Err(e) = result {
        if plan.bitmap_mode == BitmapMode::Always && sync_bitmap.is_some() {
            // The bitmap forgets what was copied: keep what was copied.
            if target.complete().is_ok() {
                partial.keep();
                tracing::warn!(
                    "--bitmap-mode always: the bitmap no longer marks the clusters copied before the failure; they are kept in {}",
                    partial.path().display()
                );
            }
        }
        return Err(e.context("the backup failed"));
    }

    target
        .complete()
        .map_err(CopyError::Target)
        .with_context(|| format!("cannot complete the target {}", partial.path().display()))?;
    phase(&cancel, Ok(()))?;
    let skipped = plog.skipped_ranges();
    if plan.sync != SyncMode::None {
        check_all_copied(&bc, &skipped)?;
    }
    // A source written behind our back (without honouring the locks) gives
    // no point-in-time backup.
    check_unchanged(&source_ids)?;

    if let (Some(m), Some(mp)) = (&mwriter, &mpartial) {
        tracing::info!("phase: manifest (digests of what the copy did not see)");
        clock.next("manifest");
        let meta = finish_manifest(
            m,
            &ManifestInputs {
                plan: &plan,
                args,
                partial: &partial,
                image: &image,
                parent: parent.as_ref(),
                parent_path: parent_path.as_deref(),
                skipped: &skipped,
                started: &summary.started,
                source_format,
                detached: args.no_backing && parent_path.is_some(),
            },
            &cancel,
        );
        let meta = phase(&cancel, meta)?;
        summary.manifest_root_digest = Some(meta.root_digest);
        debug_assert_eq!(mp.path(), m.path());
    }

    if args.verify {
        tracing::info!("phase: verify (re-reading the new backup)");
        clock.next("verify");
        let v = verify_new_backup(&plan, args, &partial, mpartial.as_ref(), &image, &cancel);
        phase(&cancel, v)?;
        summary.verified = true;
    }

    // The guest overlay, before anything is committed: a cancel here
    // leaves no TARGET either.
    let overlay_partial = match (&overlay, &args.guest_overlay) {
        (Some(o), Some(file)) => {
            tracing::info!("phase: export of the guest overlay");
            clock.next("export");
            let r = export_overlay(
                o,
                file,
                &plan.source,
                source_format,
                &cancel,
                args.keep_partial,
            )
            .with_context(|| format!("cannot write the guest overlay {}", file.display()));
            Some(phase(&cancel, r)?)
        }
        _ => None,
    };

    // The manifest first (bound to the new file), then the backup.
    tracing::info!("phase: commit");
    clock.next("commit");
    let final_path = partial.final_path().to_path_buf();
    crate::target::commit(partial, mpartial)
        .map_err(|e| CopyError::Target(BlockError::io(Op::Flush, &final_path, 0, 0, e)))
        .with_context(|| {
            format!(
                "cannot rename the finished backup to {}",
                final_path.display()
            )
        })?;

    if let Some(sb) = &sync_bitmap {
        let root = summary.manifest_root_digest.as_deref().and_then(unhex);
        let b = sb.finish(
            true,
            Some(crate::job::parent::anchor_for(&final_path, root)),
        )?;
        summary.bitmap = Some(BitmapReport {
            name: b.name.clone(),
            mode: plan.bitmap_mode,
            granularity: b.granularity,
            dirty_bytes: b.dirty_bytes(),
            dirty_granules: b.bits.count(),
            anchored_backup: b.anchor.as_ref().map(|a| a.path.display().to_string()),
        });
    }

    if let Some(op) = overlay_partial {
        let file = op.final_path().to_path_buf();
        op.commit()
            .with_context(|| format!("cannot rename the guest overlay to {}", file.display()))?;
        summary.guest_overlay = Some(file.display().to_string());
    }

    clock.end();
    let p = &bc.progress;
    summary.bytes_copied = p.copied.load(Ordering::Relaxed);
    summary.bytes_copied_in_kernel = p.copied_in_kernel.load(Ordering::Relaxed);
    summary.bytes_skipped_zero = p.zero.load(Ordering::Relaxed);
    summary.bytes_clean = size.saturating_sub(p.total.load(Ordering::Relaxed));
    summary.target_disk_usage = std::fs::metadata(&final_path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    summary.copy_before_write_copies = p.cbw_copies.load(Ordering::Relaxed);
    summary.copy_before_write_bytes = p.cbw_bytes.load(Ordering::Relaxed);
    summary.retries = p.retries.load(Ordering::Relaxed);
    summary.cbw_cache_peak_bytes = bc.cache_peak();
    summary.retry_events = match plog.retries.lock() {
        Ok(r) => r.clone(),
        Err(e) => e.into_inner().clone(),
    };
    summary.ignored_ranges = skipped.iter().map(|&(s, e)| [s, e]).collect();
    let exit = if skipped.is_empty() {
        Exit::Success
    } else {
        Exit::Skipped
    };
    summary.exit_code = exit.code();
    summary.ok = exit == Exit::Success;
    summary.guest = guest_stats.map(|s| s.report());
    summary.elapsed_seconds = t0.elapsed().as_secs_f64();
    summary.throughput_bytes_per_second = if summary.elapsed_seconds > 0.0 {
        (summary.bytes_copied + summary.bytes_skipped_zero) as f64 / summary.elapsed_seconds
    } else {
        0.0
    };
    summary.finished = rfc3339(SystemTime::now());
    if g.json {
        print_json(&summary)?;
    } else if !g.quiet {
        print_human(&summary);
    }
    if exit == Exit::Skipped {
        crate::errln!(
            "imgbackup: warning: the backup is incomplete: {} range(s) were skipped by an ignore policy (they stay to be copied): {}",
            skipped.len(),
            skipped
                .iter()
                .map(|(s, e)| format!("{s}-{e}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    drop(locks);
    Ok(exit)
}

/// Print (or return as JSON) what a backup would copy, and exit 0.
fn dry_run(
    plan: &Plan,
    image: &Image,
    copy_bits: &Bits,
    mut summary: Summary,
    t0: Instant,
    g: &GlobalOpts,
) -> anyhow::Result<Exit> {
    let cs = plan.cluster_size;
    let d = match plan.sync {
        SyncMode::None => DryRun::default(),
        _ => dry_run_counts(image.node.as_ref(), copy_bits, cs)?,
    };
    summary.bytes_copied = d.data;
    summary.bytes_skipped_zero = d.zero;
    summary.bytes_clean = summary.virtual_size.saturating_sub(d.data + d.zero);
    summary.finished = rfc3339(SystemTime::now());
    summary.elapsed_seconds = t0.elapsed().as_secs_f64();
    let backing = summary
        .backing
        .as_ref()
        .map(|b| format!(", backed by {b}"))
        .unwrap_or_default();
    if g.json {
        print_json(&summary)?;
    } else if !g.quiet {
        match plan.sync {
            SyncMode::None => crate::errln!(
                "imgbackup: dry run: a fleecing backup (sync none) of {} into {}{backing} would copy only the clusters the guest overwrites. Nothing was written.",
                plan.source.display(),
                plan.target.display()
            ),
            _ => crate::errln!(
                "imgbackup: dry run: {} backup of {} into {} ({}{backing}) would examine {} clusters of {}: {} hold data ({} to read and write), the rest read as zeros ({}, not written as data){}. Nothing was written.",
                article(plan.sync),
                plan.source.display(),
                plan.target.display(),
                plan.target_format,
                d.clusters,
                human_bytes(cs),
                d.data_clusters,
                human_bytes(d.data),
                human_bytes(d.zero),
                if summary.bytes_clean > 0 {
                    format!(
                        "; {} are clean and not copied",
                        human_bytes(summary.bytes_clean)
                    )
                } else {
                    String::new()
                }
            ),
        }
    }
    Ok(Exit::Success)
}

/// "a full", "an incremental", ...
fn article(sync: SyncMode) -> String {
    match sync {
        SyncMode::Incremental => "an incremental".into(),
        s => format!("a {s}"),
    }
}

/// What the manifest of a finished backup is made from.
struct ManifestInputs<'a> {
    plan: &'a Plan,
    args: &'a BackupArgs,
    partial: &'a Partial,
    image: &'a Image,
    parent: Option<&'a ManifestFile>,
    parent_path: Option<&'a Path>,
    skipped: &'a [(u64, u64)],
    started: &'a str,
    source_format: Format,
    detached: bool,
}

/// Fill the digests the copy did not see and write the manifest, bound to
/// the (complete, synced) partial file.
fn finish_manifest(
    m: &ManifestWriter,
    i: &ManifestInputs<'_>,
    cancel: &Cancel,
) -> anyhow::Result<Meta> {
    let plan = i.plan;
    // Where an ignore policy skipped data, the digests are of what the
    // backup holds; clean chunks of an incremental come from its parent's
    // manifest; chunks the copy did not see otherwise (top, none) come from
    // the image.
    let target_chain = open_image(i.partial.path(), Some(plan.target_format))
        .context("cannot open the new backup")?;
    m.fill_ranges_from(target_chain.node.as_ref(), i.skipped, plan.jobs, cancel)
        .context("cannot compute the manifest")?;
    if let Some(p) = i.parent {
        m.fill_from_parent(p, cancel)
            .context("cannot compute the manifest")?;
    }
    m.fill_from(i.image.node.as_ref(), plan.jobs, cancel)
        .context("cannot compute the manifest")?;
    let binding = i
        .partial
        .identity()
        .map_err(CopyError::Manifest)
        .context("cannot stat the new backup")?;
    let mut meta = Meta {
        format_version: crate::manifest::VERSION,
        virtual_size: i.image.node.size(),
        chunk_size: m.geometry().chunk,
        chunks: m.geometry().chunks(),
        root_digest: String::new(),
        source: crate::app::bitmap::canonical(&plan.source)
            .display()
            .to_string(),
        source_format: i.source_format.to_string(),
        target_format: plan.target_format.to_string(),
        sync: plan.sync.to_string(),
        bitmap: i.args.bitmap.clone(),
        parent: match (i.parent, i.parent_path) {
            (Some(pm), Some(bp)) => Some(Parent {
                path: crate::app::bitmap::canonical(bp).display().to_string(),
                root_digest: pm.meta.root_digest.clone(),
            }),
            _ => None,
        },
        started: i.started.to_string(),
        finished: rfc3339(SystemTime::now()),
        created_by: format!("imgbackup {}", env!("CARGO_PKG_VERSION")),
        incomplete: i.skipped.iter().map(|&(s, e)| [s, e]).collect(),
        file: Some(binding),
        detached: i.detached,
    };
    m.finish(&mut meta).map_err(CopyError::Manifest)?;
    Ok(meta)
}

/// `--verify`: re-read the new backup (through its chain) against its
/// manifest, and against the source as it was at the start where the
/// manifest cannot say (with --guest, or without a manifest).
fn verify_new_backup(
    plan: &Plan,
    args: &BackupArgs,
    partial: &Partial,
    mpartial: Option<&Partial>,
    image: &Image,
    cancel: &Cancel,
) -> anyhow::Result<()> {
    let got = open_image(partial.path(), Some(plan.target_format))
        .context("cannot open the backup to verify it")?;
    let detached = args.no_backing && matches!(plan.sync, SyncMode::Incremental | SyncMode::Bitmap);
    if let Some(mp) = mpartial {
        let mf = ManifestFile::open(mp.path())?;
        // A detached incremental holds only what it copied: check that.
        let diff = if detached {
            check_held(got.top().as_ref(), &mf, plan.jobs, cancel)?.0
        } else {
            check_image(got.node.as_ref(), &mf, plan.jobs, cancel)?
        };
        if let Some(d) = diff {
            return Err(AppError::Verify(format!(
                "chunk {} at offset {} of the new backup does not match its manifest (expected sha256 {}, found {}); it was not kept",
                d.chunk, d.offset, d.expected, d.found
            ))
            .into());
        }
    }
    if (args.guest.is_some() || mpartial.is_none())
        && !detached
        && let Some(offset) = first_difference(got.node.as_ref(), image.node.as_ref(), cancel)?
    {
        return Err(AppError::Mismatch {
            what: format!("the backup {}", plan.target.display()),
            against: format!(
                "the source {} as it was at the start",
                plan.source.display()
            ),
            offset,
        }
        .into());
    }
    Ok(())
}

fn print_human(s: &Summary) {
    crate::errln!(
        "imgbackup: backup {} -> {} ({}, sync {}) {}{}",
        s.source,
        s.target,
        s.target_format,
        s.sync,
        if s.ignored_ranges.is_empty() {
            "complete"
        } else {
            "finished with skipped ranges"
        },
        if s.verified { ", verified" } else { "" }
    );
    crate::errln!(
        "  target:            {} ({} on disk)",
        s.target,
        human_bytes(s.target_disk_usage)
    );
    crate::errln!("  copied:            {}", human_bytes(s.bytes_copied));
    if s.retries > 0 {
        crate::errln!("  retries:           {}", s.retries);
    }
    if !s.ignored_ranges.is_empty() {
        crate::errln!(
            "  skipped:           {} (ignored errors)",
            s.ignored_ranges
                .iter()
                .map(|r| format!("{}-{}", r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    crate::errln!(
        "  zero:              {} (not written as data)",
        human_bytes(s.bytes_skipped_zero)
    );
    if s.bytes_clean > 0 {
        crate::errln!(
            "  clean:             {} (not copied: {})",
            human_bytes(s.bytes_clean),
            match s.sync {
                SyncMode::Top => "not allocated in the top layer",
                _ => "unchanged since the parent",
            }
        );
    }
    if let Some(g) = &s.guest {
        crate::errln!(
            "  copy-before-write: {} copies, {} (cache peak {})",
            s.copy_before_write_copies,
            human_bytes(s.copy_before_write_bytes),
            human_bytes(s.cbw_cache_peak_bytes)
        );
        crate::errln!(
            "  guest:             {} writes ({} zero), {}, {} failed; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            g.writes,
            g.zero_writes,
            human_bytes(g.bytes),
            g.failed_writes,
            g.latency_ms.p50,
            g.latency_ms.p99,
            g.latency_ms.max
        );
    }
    if let Some(o) = &s.guest_overlay {
        crate::errln!("  guest overlay:     {o}");
    }
    if let Some(r) = &s.manifest_root_digest {
        crate::errln!("  manifest root:     {r}");
    }
    if let Some(b) = &s.backing {
        crate::errln!("  backing file:      {b}");
    }
    if let Some(b) = &s.bitmap {
        crate::errln!(
            "  bitmap:            {} ({}): {} dirty{}",
            b.name,
            b.mode,
            human_bytes(b.dirty_bytes),
            b.anchored_backup
                .as_ref()
                .map(|a| format!(", anchored to {a}"))
                .unwrap_or_default()
        );
    }
    crate::errln!("  started:           {}", s.started);
    crate::errln!("  finished:          {}", s.finished);
    crate::errln!(
        "  elapsed:           {} ({}/s)",
        human_duration(s.elapsed_seconds),
        human_bytes(s.throughput_bytes_per_second as u64)
    );
}
