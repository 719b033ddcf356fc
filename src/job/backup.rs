//! The backup job, after QEMU's BlockJobDriver: [`BackupJob::prepare`]
//! (open the graph's read side, take the locks, choose the copy bitmap from
//! the sync mode, find and check the parent, refuse a target that would
//! overwrite what the job reads), then [`BackupJob::start`] (create the
//! target, freeze the bitmap, build the graph), [`Running::run`] (workers,
//! copy-before-write drain, the simulated guest, cancel and timeout), and
//! exactly one of [`Running::commit`] (complete, check, manifest, verify,
//! rename, anchor the bitmap) or [`Running::abort`]; dropping what is left
//! cleans up (partial files removed, the bitmap put back).
//!
//! ```text
//!  guest ──► marking ──► copy-before-write ──► overlay (active disk) ──► source chain
//!                              │                      ▲                  [fault node]
//!                              └──► block-copy ◄──────┘ job reads through the active disk
//!                                       │
//!                                       ▼
//!                              [fault node] target (a [`Target`])
//! ```
//!
//! Nothing here knows the command line: a [`BackupConfig`] (plain data) goes
//! in, a [`Summary`] comes out, and progress is read from [`Running::progress`].

use super::JobError;
use super::cancel::Cancel;
use super::error::Result;
use super::nbd_source::NbdSource;
use super::policy::Policies;
use super::sync_bitmap::{Before, SyncBitmap};
use super::sync_mode::{BitmapMode, DefaultBacking, SyncMode};
use super::{PolicyLog, RetryEvent, copy_left_behind, outcome, run_background, run_drain};
use crate::bitmap::{Bitmap, BitmapError, Bits, Identity, Tracked};
use crate::copy::{BlockCopy, ChunkObserver, Config, CopyError};
use crate::guest::{self, GuestReport, GuestSpec};
use crate::lock::{Access, Locks};
use crate::manifest::{
    DigestAlgo, Geometry, ManifestFile, Meta, Parent, check_backup, check_held, manifest_path,
    unhex,
};
use crate::node::cbw::{CbwNode, OnCbwError};
use crate::node::fault::{FaultNode, Rule, Side};
use crate::node::graph::SourceSpec;
use crate::node::marking::MarkingNode;
use crate::node::overlay::OverlayNode;
use crate::node::probe::{Format, Image, format_for};
use crate::node::qcow2::{Compression, CreateOptions, Qcow2Writer};
use crate::node::slot::{FilterSlot, MeasuredNode};
use crate::node::{BlockNode, Status, for_each_extent};
use crate::target::guard::{self, GuardError};
use crate::target::{FileTarget, FileTargetSpec, Partial, Target};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Default backup granularity.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;
/// Default copy-before-write cache per worker.
pub const DEFAULT_CBW_CACHE_PER_WORKER: u64 = 4 << 20;
/// Default request size.
pub const DEFAULT_MAX_CHUNK: u64 = 2 << 20;
/// Default request size of a job on a served image, rounded up to the
/// backup granularity: a client write that hits a copy in flight waits for
/// all of it (BENCHMARKS.md, client writes during a backup of a served
/// image).
pub const SERVED_MAX_CHUNK: u64 = 64 << 10;

/// A served image (`imgbackup serve`): the job runs inside the serving
/// process, and the clients' writes reach it through the filter slot.
#[derive(Clone)]
pub struct Served {
    /// The image as the clients write it, below the filter slot (the server
    /// marks its bitmaps here): the job reads it, the filter writes to it.
    pub live: Arc<dyn BlockNode>,
    /// Where the job's copy-before-write filter is inserted.
    pub slot: Arc<FilterSlot>,
    /// The bitmaps the server marks; a job's bitmap is taken from here.
    pub bitmaps: Tracked,
    /// The image as imgbackup's reader opened it before the server started
    /// writing it: the facts of its layers. A job never reads it (it reads
    /// `live`), and never opens the image again while the server writes it.
    pub image: Image,
}

/// The backing file written into a qcow2 target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// The sync mode's: the anchored backup (incremental, bitmap), the
    /// source's backing file (top), the source (none), nothing (full).
    Default,
    /// This file (for incremental and bitmap, checked against the anchor).
    File(PathBuf),
    /// None (`--no-backing`).
    Nothing,
}

/// What a backup does: plain data, from the command line or anywhere else.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// The image to back up.
    pub source: PathBuf,
    /// Its format (None: probed).
    pub source_format: Option<Format>,
    /// The backup to write.
    pub target: PathBuf,
    /// Its format (None: by extension, or qcow2 when the sync mode needs it).
    pub target_format: Option<Format>,
    /// qcow2 cluster size of the target.
    pub target_cluster_size: u64,
    /// What to copy.
    pub sync: SyncMode,
    /// The dirty bitmap beside the source.
    pub bitmap: Option<String>,
    /// QEMU's dirty bitmap an NBD source exports (`qemu:dirty-bitmap:NAME`).
    pub source_bitmap: Option<String>,
    /// What happens to the bitmap (None: on-success).
    pub bitmap_mode: Option<BitmapMode>,
    /// The backing file written into the target.
    pub backing: Backing,
    /// Backup granularity (None: max(64K, the target's cluster size)).
    pub granularity: Option<u64>,
    /// Write compressed clusters.
    pub compress: Option<Compression>,
    /// Copy workers (None: the number of CPUs).
    pub jobs: Option<usize>,
    /// Largest single request (None: max(2M, granularity)).
    pub max_chunk: Option<u64>,
    /// Rate limit, bytes per second.
    pub speed: Option<u64>,
    /// Cancel after this long.
    pub timeout: Option<Duration>,
    /// Replace an existing target.
    pub force: bool,
    /// Keep the partial files on failure.
    pub keep_partial: bool,
    /// A simulated guest writing while the job runs.
    pub guest: Option<GuestSpec>,
    /// Keep what the guest wrote as a qcow2 backed by the source.
    pub guest_overlay: Option<PathBuf>,
    /// What a failed copy-before-write does.
    pub on_cbw_error: OnCbwError,
    /// The longest a guest write waits for its copy-before-write.
    pub cbw_timeout: Option<Duration>,
    /// RAM for the copy-before-write cache (None: 4M per worker).
    pub cbw_cache: Option<u64>,
    /// Re-read the backup before it is committed.
    pub verify: bool,
    /// The error policies.
    pub policies: Policies,
    /// Take no QEMU lock.
    pub force_share: bool,
    /// Wait for locks this long.
    pub wait_lock: Option<Duration>,
    /// Write TARGET.manifest.
    pub manifest: bool,
    /// The manifest's chunk digest (None: the parent's, else sha256).
    pub digest: Option<DigestAlgo>,
    /// Fault injection.
    pub inject: Vec<Rule>,
    /// Hold a shared lock on TARGET's directory while the job runs, so
    /// that `prune` never removes what the job builds on (false only for
    /// jobs `prune` runs itself, under its exclusive lock).
    pub directory_lock: bool,
    /// Nothing writes to the source while the job reads it (a backup
    /// being consolidated): its backing chain is mapped once and each run
    /// read straight from its layer ([`crate::node::frozen::FrozenChain`]).
    /// Refused with `guest`.
    pub unchanging_source: bool,
}

/// The validated, derived settings of one backup.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The format of the target.
    pub target_format: Format,
    /// qcow2 cluster size of the target.
    pub target_cluster_size: u64,
    /// Backup granularity, bytes.
    pub cluster_size: u64,
    /// Largest single request, bytes.
    pub max_chunk: u64,
    /// Copy workers.
    pub jobs: usize,
    /// What happens to the bitmap.
    pub bitmap_mode: BitmapMode,
}

/// The end of a backup (human on stderr, or the `--json` document).
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    /// True when nothing was skipped.
    pub ok: bool,
    /// The exit code (0, or 3 with skipped ranges).
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
    /// True for a dry run (nothing was written).
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
    pub retry_events: Vec<RetryEvent>,
    /// Byte ranges `[start, end)` skipped by an ignore policy.
    pub ignored_ranges: Vec<[u64; 2]>,
    /// Wall-clock time of the command.
    pub elapsed_seconds: f64,
    /// Bytes copied or skipped as zeros per second.
    pub throughput_bytes_per_second: f64,
    /// Start time (RFC 3339).
    pub started: String,
    /// The point in time the backup holds: when the copy bitmap was frozen
    /// (RFC 3339, microseconds). For a served image, every client write
    /// completed before it is in the backup and none begun after it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub point_in_time: String,
    /// End time (RFC 3339).
    pub finished: String,
    /// The simulated guest, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestReport>,
    /// A served image's NBD clients' writes while the job ran (through its
    /// copy-before-write filter), with their latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<GuestReport>,
    /// Where the guest overlay was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_overlay: Option<String>,
    /// Whether the backup was verified before it was committed.
    pub verified: bool,
    /// Root digest of TARGET.manifest (absent without a manifest).
    pub manifest_root_digest: Option<String>,
    /// The backing file written into TARGET.
    pub backing: Option<String>,
    /// The bitmap's state after the job.
    pub bitmap: Option<BitmapReport>,
    /// QEMU's bitmap that selected what an NBD incremental copied (left
    /// as it was).
    pub source_bitmap: Option<String>,
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

/// What a dry run would copy.
#[derive(Debug, Default, Clone, Copy)]
pub struct DryRun {
    /// Bytes of data to read.
    pub data: u64,
    /// Bytes that read as zeros (not written as data).
    pub zero: u64,
    /// Clusters to examine.
    pub clusters: u64,
    /// Of those, clusters that hold data.
    pub data_clusters: u64,
}

fn usage(msg: String) -> JobError {
    JobError::Usage(msg)
}

impl From<GuardError> for JobError {
    fn from(e: GuardError) -> JobError {
        match e {
            GuardError::Conflict(m) => JobError::Usage(m),
            GuardError::Refused(m) => JobError::Refused(m),
        }
    }
}

impl From<crate::target::TargetError> for JobError {
    fn from(e: crate::target::TargetError) -> JobError {
        match e {
            crate::target::TargetError::Partial(p) => JobError::Partial(p),
            crate::target::TargetError::Copy(c) => JobError::Copy(c),
        }
    }
}

/// Check the settings against each other and derive the plan (exit 2 on a
/// bad combination).
pub fn plan(cfg: &BackupConfig) -> Result<Plan> {
    let sync = cfg.sync;
    let target_format = cfg.target_format.unwrap_or_else(|| {
        format_for(
            &cfg.target,
            if sync.needs_qcow2() {
                Format::Qcow2
            } else {
                Format::Raw
            },
        )
    });
    if sync.needs_qcow2() && target_format != Format::Qcow2 {
        return Err(usage(format!("--sync {sync} needs a qcow2 target")));
    }
    sync.check(
        cfg.bitmap.is_some() || cfg.source_bitmap.is_some(),
        cfg.bitmap_mode,
        cfg.guest.as_ref().map(|g| g.is_bounded()),
    )
    .map_err(usage)?;
    if cfg.compress.is_some() && target_format != Format::Qcow2 {
        return Err(usage("--compress needs a qcow2 target".into()));
    }
    if cfg.backing != Backing::Default && target_format != Format::Qcow2 {
        return Err(usage(
            "--backing and --no-backing need a qcow2 target".into(),
        ));
    }
    let target_cs = match target_format {
        Format::Qcow2 => cfg.target_cluster_size,
        Format::Raw => DEFAULT_CLUSTER,
    };
    if target_format == Format::Qcow2 && target_cs > (2 << 20) {
        return Err(usage(format!(
            "--output-cluster-size {target_cs} is larger than qcow2 allows (2M)"
        )));
    }
    let cluster_size = cfg.granularity.unwrap_or(DEFAULT_CLUSTER.max(target_cs));
    if target_format == Format::Qcow2 && cluster_size < target_cs {
        return Err(usage(format!(
            "--granularity {cluster_size} is smaller than the target's cluster size {target_cs}; \
             use at least {target_cs} or a smaller --output-cluster-size"
        )));
    }
    let max_chunk = cfg.max_chunk.unwrap_or(DEFAULT_MAX_CHUNK.max(cluster_size));
    let max_chunk = (max_chunk / cluster_size).max(1) * cluster_size;
    let jobs = cfg.jobs.unwrap_or_else(default_jobs);
    if let (Some(o), Some(_)) = (&cfg.guest_overlay, &cfg.guest)
        && (o == &cfg.target || o == &cfg.source)
    {
        return Err(usage(
            "--guest-overlay must name a file other than SOURCE and TARGET".into(),
        ));
    }
    Ok(Plan {
        target_format,
        target_cluster_size: target_cs,
        cluster_size,
        max_chunk,
        jobs,
        bitmap_mode: cfg.bitmap_mode.unwrap_or(BitmapMode::OnSuccess),
    })
}

/// Copy workers for an NBD source at least (`--jobs` unset).
pub const NBD_MIN_JOBS: usize = 4;

/// The number of CPUs.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The name a qcow2 written next to `at` uses for `source` as its backing
/// file: the bare file name when both share a directory (`./NAME` when the
/// name has a ':', so QEMU never reads it as a protocol), else the absolute
/// path.
pub fn backing_name(at: &Path, source: &Path) -> Result<String> {
    let src = std::fs::canonicalize(source).map_err(JobError::context(format!(
        "cannot resolve {}",
        source.display()
    )))?;
    let dir = std::fs::canonicalize(crate::files::dir_of(at)).map_err(JobError::context(
        format!("cannot resolve the directory of {}", at.display()),
    ))?;
    let name = if src.parent() == Some(dir.as_path()) {
        src.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .map(|n| if n.contains(':') { format!("./{n}") } else { n })
    } else {
        None
    };
    Ok(name.unwrap_or_else(|| src.to_string_lossy().into_owned()))
}

/// The bitmap a job uses or (re)anchors, checked for the sync mode, and
/// the file as it was before (what a failed job puts back).
fn job_bitmap(
    name: &str,
    sync: SyncMode,
    source: &Path,
    size: u64,
    identity: &Identity,
) -> std::result::Result<(Bitmap, Before), BitmapError> {
    if sync.uses_bitmap() {
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

fn rfc3339_micros(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The identity of every file of the source's chain, to tell at the end
/// whether something wrote them during the backup.
fn chain_identities(image: &Image) -> Vec<SourceFile> {
    image
        .layers
        .iter()
        .filter_map(|l| {
            let now = l.node.identity()?;
            Some(SourceFile {
                node: l.node.clone(),
                was: now.ok(),
            })
        })
        .collect()
}

/// The source's backing chain a `--sync top` manifest may take its
/// unchanged chunks from by identity instead of hashing them: top without a
/// bitmap (an anchored bitmap needs the root digest now), every file below
/// the top a regular file whose identity was taken at the start. Empty:
/// hash them.
fn lazy_backing_files(job: &BackupJob) -> Vec<crate::manifest::BackingFile> {
    if !job.cfg.sync.leaves_the_rest_to_the_backing_file()
        || job.cfg.bitmap.is_some()
        || job.image.layers.len() < 2
    {
        return Vec::new();
    }
    let mut out = Vec::new();
    for l in &job.image.layers[1..] {
        let is_file = std::fs::metadata(&l.info.path).is_ok_and(|m| m.is_file());
        let was = job
            .source_ids
            .iter()
            .find(|s| s.node.path() == l.node.path())
            .and_then(|s| s.was);
        let (true, Some(id)) = (is_file, was) else {
            return Vec::new();
        };
        out.push(crate::manifest::BackingFile {
            path: std::fs::canonicalize(&l.info.path)
                .unwrap_or_else(|_| l.info.path.clone())
                .display()
                .to_string(),
            format: l.info.format.to_string(),
            file: crate::manifest::FileBinding {
                size: id.size,
                mtime_sec: id.mtime_sec,
                mtime_nsec: id.mtime_nsec,
                inode: id.inode,
            },
        });
    }
    out
}

/// A file of the source's chain, as it was when the job started: the
/// changed-source check asks its node (a node with no file behind it has
/// nothing to check).
struct SourceFile {
    node: Arc<dyn BlockNode>,
    was: Option<Identity>,
}

/// Fail (exit 4) if a file of the source's chain changed since `before`.
fn check_unchanged(before: &[SourceFile]) -> Result<()> {
    for f in before {
        let now = f.node.identity().and_then(|r| r.ok());
        let changed = match (&f.was, &now) {
            (Some(a), Some(b)) => a != b,
            _ => true,
        };
        if changed {
            return Err(JobError::step(
                "the backup is not point-in-time",
                CopyError::Source(crate::error::BlockError::Changed {
                    path: f.node.path().to_path_buf(),
                }),
            ));
        }
    }
    Ok(())
}

/// Every cluster the job did not copy must be one an ignore policy skipped,
/// or the backup is wrong.
fn check_all_copied(bc: &BlockCopy, skipped: &[(u64, u64)]) -> Result<()> {
    let cs = bc.cluster_size();
    let left = super::without_skipped(bc.not_copied(), skipped, cs);
    if let Some(c) = left.next_set(0) {
        return Err(JobError::Internal(format!(
            "the cluster at offset {} was neither copied nor listed as skipped; the backup was not kept",
            c * cs
        )));
    }
    Ok(())
}

/// The result of a phase, or the cancellation that cut it short.
fn phase<T>(cancel: &Cancel, r: Result<T>) -> Result<T> {
    if let Some(reason) = cancel.reason() {
        return Err(JobError::Cancelled(reason));
    }
    r
}

/// Times the phases of a job for `-vv`.
struct PhaseClock {
    name: &'static str,
    started: Instant,
}

impl PhaseClock {
    fn start(name: &'static str) -> PhaseClock {
        tracing::info!("phase: {name}");
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

/// A prepared backup: everything checked, nothing written yet.
pub struct BackupJob {
    cfg: BackupConfig,
    plan: Plan,
    image: Image,
    locks: Locks,
    started: SystemTime,
    t0: Instant,
    identity: Identity,
    source_ids: Vec<SourceFile>,
    bitmap: Option<(Bitmap, Before)>,
    copy_bits: Bits,
    parent_path: Option<PathBuf>,
    backing: Option<(String, String)>,
    parent: Option<ManifestFile>,
    geo: Geometry,
    digest: DigestAlgo,
    served: Option<Served>,
    /// The export of an NBD source.
    nbd: Option<Arc<crate::node::nbd::NbdNode>>,
}

impl BackupJob {
    /// Check the settings, open the source with its chain, take the locks,
    /// load the bitmap, choose what to copy and the parent, and refuse a
    /// target that would overwrite what the job reads. Writes nothing.
    pub fn prepare(cfg: BackupConfig) -> Result<BackupJob> {
        Self::prepare_with(cfg, None)
    }

    /// [`BackupJob::prepare`] for an image this process serves: the server
    /// holds its locks, the bitmap is the server's live one, and the job's
    /// point in time is the moment [`BackupJob::start`] inserts the filter.
    pub fn prepare_served(cfg: BackupConfig, served: Served) -> Result<BackupJob> {
        check_served(&cfg)?;
        Self::prepare_with(cfg, Some(served))
    }

    fn prepare_with(mut cfg: BackupConfig, served: Option<Served>) -> Result<BackupJob> {
        // A served image's clients get a core of their own (the job takes
        // the others, at least one), and a client write that lands on a
        // copy in flight waits for one cluster at most (SERVED_MAX_CHUNK).
        if served.is_some() {
            cfg.jobs = cfg.jobs.or(Some(default_jobs().saturating_sub(1).max(1)));
            cfg.max_chunk = cfg.max_chunk.or(Some(SERVED_MAX_CHUNK));
        }
        let started = crate::clock::now();
        let t0 = Instant::now();
        let nbd_uri = super::nbd_source::uri_of(&cfg)?;
        // An export's reads wait on the server: more of them in flight
        // than there are cores keeps both sides busy.
        if nbd_uri.is_some() {
            cfg.jobs = cfg.jobs.or(Some(default_jobs().max(NBD_MIN_JOBS)));
        }
        let plan = plan(&cfg)?;
        let (nbd, image) = match (&served, nbd_uri) {
            (Some(s), _) => (None, s.image.clone()),
            (None, Some(uri)) => {
                let (n, image) = NbdSource::open(uri, &cfg)?;
                (Some(n), image)
            }
            (None, None) => (
                None,
                crate::node::graph::open(&SourceSpec::file(&cfg.source, cfg.source_format))
                    .map_err(JobError::context("cannot open the source image"))?,
            ),
        };
        let on_device = std::fs::metadata(&cfg.source)
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        if on_device && cfg.bitmap.is_some() {
            return Err(usage(format!(
                "--bitmap is not available for the block device {}: a device records no modification time, so a bitmap beside it could not tell when something wrote the device without marking it (and would live in /dev); use full backups",
                cfg.source.display()
            )));
        }
        let locks = match (&served, &nbd) {
            // The server holds the image's locks (this process's, or the
            // NBD server's).
            (Some(_), _) | (_, Some(_)) => Locks::new(),
            (None, None) => lock_source(&cfg, &image)?,
        };
        // A served image's server removed them when it started; its own
        // bitmap saves may be in flight now. An export has none.
        if served.is_none() && nbd.is_none() {
            for t in crate::bitmap::file::remove_stale_temps(&cfg.source) {
                tracing::info!(
                    "removed a bitmap temporary file left by a killed run: {}",
                    t.display()
                );
            }
        }
        guard::check_output(&cfg.target, cfg.force, "target")?;
        let mut image = image;
        if cfg.unchanging_source {
            if cfg.guest.is_some() || served.is_some() || nbd.is_some() {
                return Err(JobError::Internal(
                    "an unchanging source cannot have a guest, a server or an NBD export".into(),
                ));
            }
            // Mapped under the source's lock.
            crate::node::frozen::FrozenChain::freeze(&mut image);
        }
        let mut locks = locks;
        if cfg.directory_lock {
            locks.directory(&crate::files::dir_of(&cfg.target), false, cfg.wait_lock)?;
        }
        if let Some(o) = &cfg.guest_overlay {
            guard::check_output(o, cfg.force, "guest overlay")?;
        }
        let size = image.node.size();
        let identity = match &nbd {
            Some(n) => n.identity(),
            None => Identity::of(&cfg.source).map_err(JobError::context(format!(
                "cannot stat {}",
                cfg.source.display()
            )))?,
        };
        let source_ids = chain_identities(&image);
        let bitmap = match (&cfg.bitmap, &served) {
            (Some(name), None) => Some(job_bitmap(name, cfg.sync, &cfg.source, size, &identity)?),
            (Some(name), Some(sv)) => Some(served_bitmap(name, cfg.sync, &cfg.source, size, sv)?),
            (None, _) => None,
        };
        // QEMU's bitmap selects what an NBD incremental copies; it is never
        // anchored or changed here.
        let qemu_bitmap = match (&nbd, &cfg.source_bitmap) {
            (Some(n), Some(name)) => Some(n.dirty(name, &cfg.source)?),
            _ => None,
        };
        let copy_bits = cfg
            .sync
            .initial_copy_bitmap(
                image.top().as_ref(),
                size,
                bitmap.as_ref().map(|(b, _)| b).or(qemu_bitmap.as_ref()),
                plan.cluster_size,
            )
            .map_err(CopyError::Source)?;
        let (parent_path, backing_path) = match &nbd {
            Some(n) if cfg.source_bitmap.is_some() => {
                let p = n.parent(&cfg)?;
                (Some(p.clone()), Some(p))
            }
            _ => choose_backing(&cfg, &image, bitmap.as_ref())?,
        };
        check_target(&cfg, &image, bitmap.as_ref(), &parent_path, &backing_path)?;
        let backing = match &backing_path {
            Some(p) => {
                let fmt = crate::node::probe::probe(p).map_err(JobError::context(format!(
                    "cannot open the backing file {}",
                    p.display()
                )))?;
                Some((backing_name(&cfg.target, p)?, fmt.to_string()))
            }
            None => None,
        };
        let geo = Geometry {
            size,
            chunk: crate::manifest::CHUNK_SIZE.min(plan.cluster_size),
        };
        let parent = parent_path.as_ref().and_then(|p| {
            ManifestFile::open(&manifest_path(p))
                .ok()
                .filter(|m| m.geometry() == geo && m.check_bound(p).is_ok())
        });
        // An incremental's manifest takes its parent's algorithm, so that
        // its clean chunks are one reference instead of a re-read.
        let digest = cfg
            .digest
            .or(parent.as_ref().map(|m| m.algo()))
            .unwrap_or_default();
        let job = BackupJob {
            cfg,
            plan,
            image,
            locks,
            started,
            t0,
            identity,
            source_ids,
            bitmap,
            copy_bits,
            parent_path,
            backing,
            parent,
            geo,
            digest,
            served,
            nbd: nbd.map(|n| n.node),
        };
        job.log_plan();
        Ok(job)
    }

    fn log_plan(&self) {
        let (cfg, plan) = (&self.cfg, &self.plan);
        tracing::info!(
            "source {} ({}, {} layer(s), {}), target {} ({}{}), sync {}{}, cluster size {}, {} worker(s), requests up to {}",
            cfg.source.display(),
            self.image.layers[0].info.format,
            self.image.layers.len(),
            crate::report::human_bytes(self.image.node.size()),
            cfg.target.display(),
            plan.target_format,
            self.backing
                .as_ref()
                .map(|(n, _)| format!(", backing {n}"))
                .unwrap_or_default(),
            cfg.sync,
            self.bitmap
                .as_ref()
                .map(|(b, _)| format!(", bitmap {} ({})", b.name, plan.bitmap_mode))
                .unwrap_or_default(),
            crate::report::human_bytes(plan.cluster_size),
            plan.jobs,
            crate::report::human_bytes(plan.max_chunk)
        );
    }

    /// The validated settings.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The summary as it stands before the job runs (what a dry run
    /// reports, filled in by [`BackupJob::dry_run`]).
    pub fn summary(&self) -> Summary {
        Summary {
            ok: true,
            exit_code: 0,
            command: "backup",
            source: self.cfg.source.display().to_string(),
            target: self.cfg.target.display().to_string(),
            target_format: self.plan.target_format,
            sync: self.cfg.sync,
            dry_run: false,
            virtual_size: self.image.node.size(),
            cluster_size: self.plan.cluster_size,
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
            started: rfc3339(self.started),
            point_in_time: String::new(),
            finished: String::new(),
            guest: None,
            clients: None,
            guest_overlay: None,
            verified: false,
            manifest_root_digest: None,
            backing: self.backing.as_ref().map(|(n, _)| n.clone()),
            bitmap: None,
            source_bitmap: self.cfg.source_bitmap.clone(),
        }
    }

    /// What the job would copy, without writing anything.
    pub fn dry_run(&self) -> Result<(Summary, DryRun)> {
        let cs = self.plan.cluster_size;
        let d = match self.cfg.sync.copies_in_background() {
            false => DryRun::default(),
            true => dry_run_counts(self.image.node.as_ref(), &self.copy_bits, cs)?,
        };
        let mut s = self.summary();
        s.dry_run = true;
        s.bytes_copied = d.data;
        s.bytes_skipped_zero = d.zero;
        s.bytes_clean = s.virtual_size.saturating_sub(d.data + d.zero);
        s.finished = rfc3339(crate::clock::now());
        s.elapsed_seconds = self.t0.elapsed().as_secs_f64();
        Ok((s, d))
    }

    /// What [`BackupJob::start`] writes: the file pair at `--target`.
    pub fn file_target_spec(&self) -> FileTargetSpec {
        FileTargetSpec {
            path: self.cfg.target.clone(),
            format: self.plan.target_format,
            size: self.image.node.size(),
            cluster_size: self.plan.target_cluster_size,
            backing: self.backing.clone(),
            manifest: self.cfg.manifest.then_some(self.geo),
            digest: self.digest,
            mode: crate::files::mode_from(&self.cfg.source),
            compression: self.cfg.compress.unwrap_or_default(),
            keep_partial: self.cfg.keep_partial,
            wait: self.cfg.wait_lock,
        }
    }

    /// Create the file target (locked: a second run writing it is refused
    /// here), then [`BackupJob::start_with`] it. `cancel` is checked by
    /// every worker and phase.
    pub fn start(self, cancel: Cancel) -> Result<Running> {
        if let Some(t) = self.cfg.timeout {
            cancel.arm_timeout(t);
        }
        let target = FileTarget::create(self.file_target_spec())?;
        self.start_with(Box::new(target), cancel)
    }

    /// Start the job writing into `target` (any [`Target`]): freeze the
    /// bitmap and build the graph. `--timeout` is armed on `cancel`.
    pub fn start_with(self, target: Box<dyn Target>, cancel: Cancel) -> Result<Running> {
        if let Some(t) = self.cfg.timeout {
            cancel.arm_timeout(t);
        }
        // From here on the bitmap is frozen and in use; dropping the job's
        // bitmap on any failure puts it back (with the writes made meanwhile).
        let mut job = self;
        // A read blocked on the network gives up once the job is cancelled.
        if let Some(n) = &job.nbd {
            let c = cancel.clone();
            n.set_stop(move || c.is_cancelled());
            n.isolate_lost_requests(job.cfg.policies.source == super::policy::ErrorPolicy::Ignore);
        }
        if let Some(served) = job.served.clone() {
            return served
                .slot
                .insert_with(|| job.start_served(&served, target, cancel));
        }
        let sync_bitmap = match job.bitmap.take() {
            Some((b, before)) => Some(Arc::new(SyncBitmap::start(
                &job.cfg.source,
                b,
                before,
                job.plan.bitmap_mode,
                job.identity,
            )?)),
            None => None,
        };
        Running::build(job, target, sync_bitmap, cancel)
    }
}

impl BackupJob {
    /// With the clients' writes drained (inside [`FilterSlot::insert_with`]):
    /// the point in time. Freeze the bitmap, choose the clusters to copy
    /// from the image as it is now, build the graph, and return the filter
    /// to insert.
    fn start_served(
        mut self,
        served: &Served,
        target: Box<dyn Target>,
        cancel: Cancel,
    ) -> Result<(Arc<dyn BlockNode>, Running)> {
        let source = self.cfg.source.clone();
        self.identity = Identity::of(&source).map_err(JobError::context(format!(
            "cannot stat {}",
            source.display()
        )))?;
        let sync_bitmap = match self.bitmap.take() {
            Some((b, before)) => Some(Arc::new(SyncBitmap::start_live(
                &source,
                b,
                before,
                self.plan.bitmap_mode,
                self.identity,
                &served.bitmaps,
            )?)),
            None => None,
        };
        self.copy_bits = self
            .cfg
            .sync
            .initial_copy_bitmap(
                served.live.as_ref(),
                served.live.size(),
                sync_bitmap.as_ref().map(|sb| sb.bitmap()),
                self.plan.cluster_size,
            )
            .map_err(CopyError::Source)?;
        let running = Running::build(self, target, sync_bitmap, cancel)?;
        let filter = running
            .guest_node
            .clone()
            .ok_or_else(|| JobError::Internal("no copy-before-write filter was built".into()))?;
        Ok((filter, running))
    }
}

/// What a backup of a served image cannot do.
fn check_served(cfg: &BackupConfig) -> Result<()> {
    let image = cfg.source.display();
    if cfg.guest.is_some() {
        return Err(usage(format!(
            "--guest is refused: {image} is served over NBD, and its clients are the guest"
        )));
    }
    if !cfg.sync.copies_in_background() || cfg.sync.leaves_the_rest_to_the_backing_file() {
        return Err(usage(format!(
            "--sync {} is not available for {image}, which is served over NBD: use --sync full, incremental or bitmap",
            cfg.sync
        )));
    }
    if cfg.verify && !cfg.manifest {
        return Err(usage(format!(
            "--verify --no-manifest is not available for {image}, which is served over NBD: the image changes while the job runs, so only the manifest can tell what the backup must hold"
        )));
    }
    Ok(())
}

/// The bitmap of a job on a served image: the server's live one (which
/// must be consistent for incremental and bitmap), or for full a new one.
fn served_bitmap(
    name: &str,
    sync: SyncMode,
    image: &Path,
    size: u64,
    served: &Served,
) -> std::result::Result<(Bitmap, Before), BitmapError> {
    let live = match served.bitmaps.lock() {
        Ok(v) => v.iter().find(|(b, _)| b.name == name).cloned(),
        Err(p) => p.into_inner().iter().find(|(b, _)| b.name == name).cloned(),
    };
    let inconsistent = |reason: String| BitmapError::Inconsistent {
        name: name.to_string(),
        image: image.to_path_buf(),
        reason,
    };
    match live {
        Some((b, consistent)) => {
            let usable = consistent && !b.inconsistent && b.image_size == size;
            if sync.uses_bitmap() && !usable {
                return Err(inconsistent(
                    "it was not consistent when the server started".into(),
                ));
            }
            let before = Before::Parsed {
                bitmap: Box::new(b.clone()),
                consistent: usable,
            };
            Ok((b, before))
        }
        None => match Bitmap::load(image, name) {
            // On disk but not marked by the server: disabled.
            Ok(_) => Err(inconsistent(
                "it is disabled, so the server does not mark it; stop the server, `imgbackup bitmap enable` it, and start a new chain with a full backup".into(),
            )),
            Err(e @ (BitmapError::Missing { .. } | BitmapError::Damaged { .. })) => {
                if sync.uses_bitmap() {
                    return Err(e);
                }
                let before = match e {
                    BitmapError::Missing { .. } => Before::Missing,
                    _ => Before::Raw(Bitmap::read_raw(image, name).unwrap_or_default()),
                };
                let fresh = Bitmap::new(
                    name,
                    crate::bitmap::file::DEFAULT_GRANULARITY,
                    size,
                    Identity::of(image).map_err(|e| BitmapError::Io {
                        path: image.to_path_buf(),
                        source: e,
                    })?,
                );
                Ok((fresh, before))
            }
            Err(e) => Err(e),
        },
    }
}

/// Take the imgbackup lock on the source and QEMU's read locks on every
/// layer.
fn lock_source(cfg: &BackupConfig, image: &Image) -> Result<Locks> {
    let mut locks = Locks::new();
    locks.exclusive(&cfg.source, cfg.wait_lock)?;
    for layer in &image.layers {
        locks.qemu(
            &layer.info.path,
            Access::Read,
            cfg.force_share,
            cfg.wait_lock,
        )?;
    }
    Ok(locks)
}

/// The parent of an incremental (checked against the bitmap's anchor), and
/// the backing file written into the target.
fn choose_backing(
    cfg: &BackupConfig,
    image: &Image,
    bitmap: Option<&(Bitmap, Before)>,
) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
    let given = match &cfg.backing {
        Backing::File(p) => Some(p.as_path()),
        _ => None,
    };
    let parent_path = match (cfg.sync.uses_bitmap(), bitmap) {
        (true, Some((b, _))) => Some(super::parent::choose(b, &cfg.source, given)?),
        _ => None,
    };
    let backing_path = match &cfg.backing {
        Backing::Nothing => None,
        _ if parent_path.is_some() => parent_path.clone(),
        Backing::File(b) => {
            crate::files::check_image_path(b).map_err(JobError::context(format!(
                "the backing file {} cannot be used",
                b.display()
            )))?;
            Some(b.clone())
        }
        Backing::Default => match cfg.sync.default_backing() {
            DefaultBacking::Source => Some(cfg.source.clone()),
            DefaultBacking::SourceBacking => image.layers.get(1).map(|l| l.info.path.clone()),
            DefaultBacking::Nothing | DefaultBacking::Parent => None,
        },
    };
    Ok((parent_path, backing_path))
}

/// Nothing the backup reads or builds on may be written over.
fn check_target(
    cfg: &BackupConfig,
    image: &Image,
    bitmap: Option<&(Bitmap, Before)>,
    parent_path: &Option<PathBuf>,
    backing_path: &Option<PathBuf>,
) -> Result<()> {
    let mut protected = guard::Protected::source(image);
    if let Some(b) = backing_path {
        protected.parent(b);
    }
    if let Some(p) = parent_path {
        protected.parent(p);
    }
    if let Some((b, _)) = bitmap
        && let Some(a) = &b.anchor
    {
        protected.anchor(&a.path, &b.name);
    }
    if let Some(o) = &cfg.guest_overlay {
        protected.check(o, "guest overlay")?;
        protected.output(o, "the guest overlay");
    }
    protected.check(&cfg.target, "target")?;
    guard::check_children(&cfg.target)?;
    Ok(())
}

/// Bytes a backup of the clusters in `bits` reads: whole clusters wherever
/// some of a cluster holds data, as the copy reads them (so the count does
/// not depend on where the host file has holes inside a cluster).
fn dry_run_counts(node: &dyn BlockNode, bits: &Bits, cluster: u64) -> Result<DryRun> {
    let mut d = DryRun::default();
    let size = node.size();
    let mut last_data_cluster = u64::MAX;
    let mut total = 0;
    for (s, e) in bits.runs() {
        let end = (e * cluster).min(size);
        total += end.saturating_sub(s * cluster);
        for_each_extent(node, s * cluster, end, |pos, ext| {
            if ext.status == Status::Data {
                // Clusters touched by this extent, each counted once.
                let (first, last) = (pos / cluster, (pos + ext.len).div_ceil(cluster));
                let first = if first == last_data_cluster {
                    first + 1
                } else {
                    first
                };
                if last > first {
                    d.data_clusters += last - first;
                    d.data += (last * cluster).min(size) - first * cluster;
                }
                last_data_cluster = last - 1;
            }
        })
        .map_err(CopyError::Source)?;
    }
    d.zero = total - d.data;
    d.clusters = bits.count();
    Ok(d)
}

/// A started backup: the target exists, the bitmap is frozen, the graph is
/// built.
pub struct Running {
    job: BackupJob,
    cancel: Cancel,
    target: Box<dyn Target>,
    sync_bitmap: Option<Arc<SyncBitmap>>,
    overlay: Option<Arc<OverlayNode>>,
    bc: Arc<BlockCopy>,
    guest_node: Option<Arc<dyn BlockNode>>,
    plog: PolicyLog,
    guest_stats: Option<guest::GuestStats>,
    clock: PhaseClock,
    /// The job's point in time: the copy bitmap was frozen then.
    frozen_at: SystemTime,
    /// A served image's clients' writes during the job.
    clients: Option<Arc<MeasuredNode>>,
    /// Removes the filter from a served image's slot when dropped.
    _slot: Option<SlotGuard>,
}

/// Takes a job's filter out of a served image's slot when the job ends in
/// any way.
struct SlotGuard(Arc<FilterSlot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// Reads the job's progress as (done, total) bytes, from any thread.
pub type ProgressFn = Arc<dyn Fn() -> (u64, u64) + Send + Sync>;

impl Running {
    fn build(
        job: BackupJob,
        target: Box<dyn Target>,
        sync_bitmap: Option<Arc<SyncBitmap>>,
        cancel: Cancel,
    ) -> Result<Running> {
        let cfg = &job.cfg;
        let frozen_at = crate::clock::now();
        let read_from = match &job.served {
            Some(s) => s.live.clone(),
            None => job.image.node.clone(),
        };
        let source: Arc<dyn BlockNode> = FaultNode::wrap(read_from, &cfg.inject, Side::Source);
        let overlay = match &cfg.guest {
            Some(_) => Some(Arc::new(
                OverlayNode::new(source.clone(), &crate::files::dir_of(&cfg.target))
                    .map_err(JobError::context("cannot create the guest overlay"))?,
            )),
            None => None,
        };
        let active: Arc<dyn BlockNode> = match &overlay {
            Some(o) => o.clone(),
            None => source.clone(),
        };
        let target_node = FaultNode::wrap(target.node(), &cfg.inject, Side::Target);
        let bc = Arc::new(BlockCopy::new(
            active.clone(),
            target_node,
            Config {
                cluster_size: job.plan.cluster_size,
                max_chunk: job.plan.max_chunk,
                // Zero clusters are written as zero flags wherever something
                // below could show through: a backing file now, or a parent
                // the file is attached to later (--no-backing incrementals).
                write_zeroes: job.backing.is_some() || job.parent_path.is_some(),
                speed: cfg.speed,
                compress: cfg.compress.is_some(),
                cbw_cache: match (cfg.guest.is_some() || job.served.is_some(), cfg.cbw_cache) {
                    (false, _) => 0,
                    (true, Some(c)) => c,
                    (true, None) => DEFAULT_CBW_CACHE_PER_WORKER * job.plan.jobs as u64,
                },
                copy_range: true,
            },
            job.copy_bits.clone(),
            cancel.clone(),
            target
                .manifest()
                .cloned()
                .map(|m| m as Arc<dyn ChunkObserver>),
        ));
        if let Some(sb) = &sync_bitmap {
            sb.attach(bc.clone());
        }
        let cbw = || -> Arc<dyn BlockNode> {
            Arc::new(CbwNode::new(
                active.clone(),
                bc.clone(),
                cfg.on_cbw_error,
                cfg.cbw_timeout,
            ))
        };
        // A served image's server marks its bitmaps below the filter (the
        // job's live bitmap is the successor); the simulated guest's writes
        // mark the successor here.
        let (guest_node, clients): (Option<Arc<dyn BlockNode>>, _) = match (&job.served, &cfg.guest)
        {
            (Some(_), _) => {
                let m = Arc::new(MeasuredNode::new(cbw()));
                (Some(m.clone() as Arc<dyn BlockNode>), Some(m))
            }
            (None, Some(_)) => (
                Some(match &sync_bitmap {
                    Some(sb) => {
                        Arc::new(MarkingNode::new(cbw(), sb.marker())) as Arc<dyn BlockNode>
                    }
                    None => cbw(),
                }),
                None,
            ),
            (None, None) => (None, None),
        };
        let slot = job.served.as_ref().map(|s| SlotGuard(s.slot.clone()));
        let r = Running {
            job,
            cancel,
            target,
            sync_bitmap,
            overlay,
            bc,
            guest_node,
            plog: PolicyLog::default(),
            guest_stats: None,
            clock: PhaseClock::start("copy"),
            frozen_at,
            clients,
            _slot: slot,
        };
        r.log_graph();
        Ok(r)
    }

    fn log_graph(&self) {
        let (cfg, plan) = (&self.job.cfg, &self.job.plan);
        let human = crate::report::human_bytes;
        tracing::debug!(
            "graph: {}{}source chain [{}]{} -> block-copy ({} clusters of {}, requests up to {}, {} worker(s){}{}) -> {}target {} ({}{})",
            if cfg.guest.is_some() { "guest -> " } else { "" },
            match (&cfg.guest, &self.sync_bitmap) {
                (Some(_), Some(_)) => "marking -> copy-before-write -> overlay -> ",
                (Some(_), None) => "copy-before-write -> overlay -> ",
                _ => "",
            },
            self.job
                .image
                .layers
                .iter()
                .map(|l| format!("{} ({})", l.info.path.display(), l.info.format))
                .collect::<Vec<_>>()
                .join(" <- "),
            if cfg.inject.iter().any(|r| r.side == Side::Source) {
                " + fault"
            } else {
                ""
            },
            self.job.image.node.size().div_ceil(plan.cluster_size),
            human(plan.cluster_size),
            human(plan.max_chunk),
            plan.jobs,
            cfg.speed
                .map(|s| format!(", {}/s", human(s)))
                .unwrap_or_default(),
            if self.target.manifest().is_some() {
                ", manifest"
            } else {
                ""
            },
            if cfg.inject.iter().any(|r| r.side == Side::Target) {
                "fault -> "
            } else {
                ""
            },
            self.target.partial_path().display(),
            plan.target_format,
            self.job
                .backing
                .as_ref()
                .map(|(n, _)| format!(", backing {n}"))
                .unwrap_or_default(),
        );
    }

    /// The job's progress, for a display or a stream.
    pub fn progress(&self) -> ProgressFn {
        let bc = self.bc.clone();
        Arc::new(move || {
            let p = &bc.progress;
            (
                p.done.load(Ordering::Relaxed),
                p.total.load(Ordering::Relaxed),
            )
        })
    }

    /// Copy: the background workers (unless sync none), the copy-before-
    /// write drain and the simulated guest side by side, until the copy
    /// bitmap is drained (or the guest ends, for sync none), a failure, or
    /// a cancel.
    pub fn run(&mut self) -> Result<()> {
        let cfg = &self.job.cfg;
        let policies = &cfg.policies;
        let (bc, cancel, plog) = (&self.bc, &self.cancel, &self.plog);
        let stop_guest = AtomicBool::new(false);
        let stop_drain = AtomicBool::new(false);
        let (result, stats) = std::thread::scope(|s| {
            let guest = match (&cfg.guest, &self.guest_node) {
                (Some(spec), Some(node)) => {
                    let node = node.clone();
                    let stop = &stop_guest;
                    Some(s.spawn(move || guest::run(node.as_ref(), spec, stop, cancel)))
                }
                _ => None,
            };
            let drain = s.spawn(|| run_drain(bc, &stop_drain, cancel, policies, plog));
            let result = match cfg.sync.copies_in_background() {
                false => Ok(()),
                true => run_background(bc, self.job.plan.jobs, cancel, policies, plog),
            };
            let bounded = cfg.guest.as_ref().is_some_and(|g| g.is_bounded());
            if result.is_err() || !bounded {
                stop_guest.store(true, Ordering::Relaxed);
            }
            let stats = guest.and_then(|h| h.join().ok());
            // A copy-before-write that failed gave its clusters back, maybe
            // after the workers had passed them: copy them now, while a
            // served image's writes still go through the filter.
            let result = result.and_then(|()| match cfg.sync.copies_in_background() {
                true => copy_left_behind(bc, cancel, policies, plog),
                false => Ok(()),
            });
            // A served image's clients go on writing: once every cluster is
            // copied (or the job failed) the filter has nothing left to do.
            // Removing it waits for the writes in flight through it, so no
            // copy-before-write can start after the cache has drained.
            if let Some(s) = &self.job.served {
                s.slot.remove();
            }
            // The cache drains once no guest can fill it any more.
            stop_drain.store(true, Ordering::Relaxed);
            let _ = drain.join();
            (result, stats)
        });
        self.guest_stats = stats.or_else(|| self.clients.as_ref().map(|c| c.stats()));
        result
            .and_then(|_| outcome(bc, cancel))
            .and_then(|_| bc.flush_target().map_err(JobError::from))
    }

    /// The job failed (`err`): with `--bitmap-mode always` the bitmap
    /// forgets what was copied, so what was copied is kept; otherwise the
    /// target is removed. The bitmap, the overlay and the locks are
    /// released as the job is dropped.
    pub fn abort(mut self, err: JobError) -> JobError {
        if self.job.plan.bitmap_mode == BitmapMode::Always
            && self.sync_bitmap.is_some()
            && self.target.complete().is_ok()
        {
            self.target.keep_on_failure();
            tracing::warn!(
                "--bitmap-mode always: the bitmap no longer marks the clusters copied before the failure; they are kept in {}",
                self.target.partial_path().display()
            );
        }
        let Running { target, .. } = self;
        target.abort();
        err.within("the backup failed")
    }

    /// Complete the target, check that the backup is whole and the source
    /// unchanged, write the manifest, verify, export the guest overlay,
    /// rename everything into place, and anchor the bitmap.
    pub fn commit(mut self) -> Result<Summary> {
        self.target.complete().map_err(|e| {
            JobError::step(
                format!(
                    "cannot complete the target {}",
                    self.target.partial_path().display()
                ),
                CopyError::Target(e),
            )
        })?;
        phase(&self.cancel, Ok(()))?;
        let skipped = self.plog.skipped_ranges();
        if self.job.cfg.sync.copies_in_background() {
            check_all_copied(&self.bc, &skipped)?;
        }
        // A source written behind our back (without honouring the locks)
        // gives no point-in-time backup.
        if self.job.served.is_none() {
            check_unchanged(&self.job.source_ids)?;
        }
        if let Some(n) = &self.job.nbd {
            let (requests, bytes) = n.reads();
            tracing::info!(
                "NBD: {requests} READ request(s), {} read from {}",
                crate::report::human_bytes(bytes),
                self.job.cfg.source.display()
            );
        }
        let mut summary = self.job.summary();
        summary.point_in_time = rfc3339_micros(self.frozen_at);
        if self.target.manifest().is_some() {
            self.clock.next("manifest");
            let meta = self.finish_manifest(&skipped);
            summary.manifest_root_digest =
                Some(phase(&self.cancel, meta)?.root_digest).filter(|r| !r.is_empty());
        }
        if self.job.cfg.verify {
            self.clock.next("verify");
            let v = self.verify();
            phase(&self.cancel, v)?;
            summary.verified = true;
        }
        // The guest overlay, before anything is committed: a cancel here
        // leaves no TARGET either.
        let overlay = match (&self.overlay, &self.job.cfg.guest_overlay) {
            (Some(o), Some(file)) => {
                self.clock.next("export");
                let r = export_overlay(o, file, &self.job, &self.cancel).map_err(|e| {
                    e.within(format!("cannot write the guest overlay {}", file.display()))
                });
                Some(phase(&self.cancel, r)?)
            }
            _ => None,
        };
        self.clock.next("commit");
        self.finish(summary, skipped, overlay)
    }

    /// Rename into place, anchor the bitmap, commit the overlay, and fill in
    /// the summary.
    fn finish(
        self,
        mut summary: Summary,
        skipped: Vec<(u64, u64)>,
        overlay: Option<Partial>,
    ) -> Result<Summary> {
        let Running {
            job,
            target,
            sync_bitmap,
            bc,
            plog,
            guest_stats,
            clock,
            ..
        } = self;
        let final_path = target.path().to_path_buf();
        // The manifest first (bound to the new file), then the backup.
        target.commit().map_err(|e| {
            JobError::step(
                format!(
                    "cannot rename the finished backup to {}",
                    final_path.display()
                ),
                CopyError::Target(crate::error::BlockError::io(
                    crate::error::Op::Flush,
                    &final_path,
                    0,
                    0,
                    e,
                )),
            )
        })?;
        if let Some(sb) = &sync_bitmap {
            let root = summary.manifest_root_digest.as_deref().and_then(unhex);
            let b = sb.finish(true, Some(super::parent::anchor_for(&final_path, root)))?;
            summary.bitmap = Some(BitmapReport {
                name: b.name.clone(),
                mode: job.plan.bitmap_mode,
                granularity: b.granularity,
                dirty_bytes: b.dirty_bytes(),
                dirty_granules: b.bits.count(),
                anchored_backup: b.anchor.as_ref().map(|a| a.path.display().to_string()),
            });
        }
        if let Some(op) = overlay {
            let file = op.final_path().to_path_buf();
            op.commit().map_err(JobError::context(format!(
                "cannot rename the guest overlay to {}",
                file.display()
            )))?;
            summary.guest_overlay = Some(file.display().to_string());
        }
        clock.end();
        let p = &bc.progress;
        summary.bytes_copied = p.copied.load(Ordering::Relaxed);
        summary.bytes_copied_in_kernel = p.copied_in_kernel.load(Ordering::Relaxed);
        summary.bytes_skipped_zero = p.zero.load(Ordering::Relaxed);
        summary.bytes_clean = summary
            .virtual_size
            .saturating_sub(p.total.load(Ordering::Relaxed));
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
        summary.ok = skipped.is_empty();
        summary.exit_code = if skipped.is_empty() { 0 } else { 3 };
        match job.served {
            Some(_) => summary.clients = guest_stats.map(|s| s.report()),
            None => summary.guest = guest_stats.map(|s| s.report()),
        }
        summary.elapsed_seconds = job.t0.elapsed().as_secs_f64();
        summary.throughput_bytes_per_second = if summary.elapsed_seconds > 0.0 {
            (summary.bytes_copied + summary.bytes_skipped_zero) as f64 / summary.elapsed_seconds
        } else {
            0.0
        };
        summary.finished = rfc3339(crate::clock::now());
        drop(job.locks);
        Ok(summary)
    }

    /// Fill the digests the copy did not see and write the manifest, bound
    /// to the (complete, synced) target file.
    fn finish_manifest(&self, skipped: &[(u64, u64)]) -> Result<Meta> {
        let Some(m) = self.target.manifest() else {
            return Err(JobError::Internal("no manifest to finish".into()));
        };
        let (job, cancel) = (&self.job, &self.cancel);
        let jobs = job.plan.jobs;
        // Where an ignore policy skipped data, the digests are of what the
        // backup holds; clean chunks of an incremental come from its
        // parent's manifest; chunks the copy did not see otherwise (top,
        // none) come from the image.
        let what = "cannot compute the manifest";
        let written = self
            .target
            .reopen()
            .map_err(JobError::context("cannot open the new backup"))?;
        m.settle()
            .map_err(|e| JobError::step(what, CopyError::Manifest(e)))?;
        m.fill_ranges_from(written.node.as_ref(), skipped, jobs, cancel)
            .map_err(JobError::context(what))?;
        if let Some(p) = &job.parent {
            m.fill_from_parent(p)
                .map_err(|e| JobError::step(what, CopyError::Manifest(e)))?;
        }
        // `--sync top`: what the copy did not see is the backing file's,
        // recorded by identity and digested when a check needs it.
        let backing_files = lazy_backing_files(job);
        if job.served.is_some() {
            // The image has changed since the point in time; the backup (with
            // its chain) holds it.
            m.fill_from(written.node.as_ref(), jobs, cancel)
                .map_err(JobError::context(what))?;
        } else if backing_files.is_empty() {
            m.fill_from(job.image.node.as_ref(), jobs, cancel)
                .map_err(JobError::context(what))?;
        } else {
            m.fill_from_backing()
                .map_err(|e| JobError::step(what, CopyError::Manifest(e)))?;
        }
        let binding = self
            .target
            .binding()
            .map_err(|e| JobError::step("cannot stat the new backup", CopyError::Manifest(e)))?;
        let canonical = |p: &Path| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        let mut meta = Meta {
            format_version: crate::manifest::VERSION,
            virtual_size: job.image.node.size(),
            chunk_size: m.geometry().chunk,
            chunks: m.geometry().chunks(),
            root_digest: String::new(),
            digest: m.algo(),
            data_chunks: 0,
            runs: 0,
            source: canonical(&job.cfg.source),
            source_format: job.image.layers[0].info.format.to_string(),
            target_format: job.plan.target_format.to_string(),
            sync: job.cfg.sync.to_string(),
            bitmap: job.cfg.bitmap.clone().or(job
                .cfg
                .source_bitmap
                .as_deref()
                .map(crate::node::nbd::dirty_bitmap_context)),
            parent: match (&job.parent, &job.parent_path) {
                (Some(pm), Some(bp)) => Some(Parent {
                    path: canonical(bp),
                    root_digest: pm.meta.root_digest.clone(),
                }),
                _ => None,
            },
            started: rfc3339(job.started),
            finished: rfc3339(crate::clock::now()),
            created_by: format!("imgbackup {}", env!("CARGO_PKG_VERSION")),
            incomplete: skipped.iter().map(|&(s, e)| [s, e]).collect(),
            file: Some(binding),
            detached: job.cfg.backing == Backing::Nothing && job.parent_path.is_some(),
            backing_files,
        };
        m.finish(&mut meta, job.parent.as_ref())
            .map_err(CopyError::Manifest)?;
        Ok(meta)
    }

    /// `--verify`: re-read the new backup (through its chain) against its
    /// manifest, and against the source as it was at the start where the
    /// manifest cannot say (with --guest, or without a manifest).
    fn verify(&self) -> Result<()> {
        let job = &self.job;
        let mut got = self
            .target
            .reopen()
            .map_err(JobError::context("cannot open the backup to verify it"))?;
        let detached = job.cfg.backing == Backing::Nothing && job.cfg.sync.uses_bitmap();
        if let Some(m) = self.target.manifest() {
            let mf = ManifestFile::open(m.path())?;
            // The new backup is complete: read as `verify` reads it.
            crate::manifest::ready_to_check(&mut got, Some(&mf));
            // A detached incremental holds only what it copied: check that.
            let diff = if detached {
                check_held(got.top().as_ref(), &mf, job.plan.jobs, &self.cancel)?.0
            } else {
                check_backup(&got, &mf, job.plan.jobs, &self.cancel)?
            };
            if let Some(d) = diff {
                return Err(JobError::Verify(format!(
                    "chunk {} at offset {} of the new backup does not match its manifest (expected {} {}, found {}); it was not kept",
                    d.chunk,
                    d.offset,
                    mf.algo(),
                    d.expected,
                    d.found
                )));
            }
        }
        if (job.cfg.guest.is_some() || self.target.manifest().is_none())
            && job.served.is_none()
            && !detached
            && let Some(offset) = crate::compare::first_difference(
                got.node.as_ref(),
                job.image.node.as_ref(),
                &self.cancel,
            )?
        {
            return Err(JobError::Mismatch {
                what: format!("the backup {}", job.cfg.target.display()),
                against: format!(
                    "the source {} as it was at the start",
                    job.cfg.source.display()
                ),
                offset,
            });
        }
        Ok(())
    }
}

/// Write the guest overlay as a qcow2 backed by the source, into its
/// partial file (committed with the backup).
fn export_overlay(
    overlay: &OverlayNode,
    file: &Path,
    job: &BackupJob,
    cancel: &Cancel,
) -> Result<Partial> {
    let cluster_size = 65536;
    let source = &job.cfg.source;
    let partial = Partial::create(
        file,
        crate::files::mode_from(source),
        job.cfg.keep_partial,
        None,
    )?;
    let w = Qcow2Writer::create_in(
        partial.path(),
        partial
            .file()
            .map_err(JobError::context("cannot open the overlay's partial file"))?,
        &CreateOptions {
            size: overlay.size(),
            cluster_size,
            backing: Some((
                backing_name(file, source)?,
                job.image.layers[0].info.format.to_string(),
            )),
            compression: Compression::default(),
        },
    )?;
    let mut buf = vec![0u8; cluster_size as usize];
    let mut last = u64::MAX;
    for (s, e) in overlay.allocated_ranges() {
        for c in s / cluster_size..e.div_ceil(cluster_size) {
            if let Some(r) = cancel.reason() {
                return Err(JobError::Cancelled(r));
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
        return Err(JobError::Cancelled(r));
    }
    Ok(partial)
}
