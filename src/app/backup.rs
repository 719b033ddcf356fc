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

use crate::bitmap::Bits;
use crate::cli::{BackupArgs, GlobalOpts, ProgressMode, SyncMode};
use crate::copy::ChunkObserver;
use crate::copy::{BlockCopy, Config, CopyError};
use crate::error::{BlockError, Op};
use crate::exit::{AppError, Exit};
use crate::guest::{self, GuestReport, GuestSpec};
use crate::job::cancel::Cancel;
use crate::job::policy::Policies;
use crate::job::{PolicyLog, outcome, run_background};
use crate::lock::{Access, Locks};
use crate::log;
use crate::manifest::{Geometry, ManifestFile, ManifestWriter, Meta, check_image, manifest_path};
use crate::node::cbw::{CbwNode, OnCbwError};
use crate::node::fault::{FaultNode, Side};
use crate::node::overlay::OverlayNode;
use crate::node::probe::{Format, Image, open_image};
use crate::node::qcow2::{CreateOptions, Qcow2Writer};
use crate::node::raw::RawNode;
use crate::node::{BlockNode, Status};
use crate::report::{Reporter, human_bytes, human_duration, print_json};
use crate::target::Partial;
use anyhow::{Context, bail};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

/// Default backup granularity.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;
/// Default request size.
pub const DEFAULT_MAX_CHUNK: u64 = 2 << 20;

/// The validated settings of one backup.
#[derive(Debug, Clone)]
pub struct Plan {
    pub source: PathBuf,
    pub target: PathBuf,
    pub sync: SyncMode,
    pub target_format: Format,
    pub target_cluster_size: u64,
    pub cluster_size: u64,
    pub max_chunk: u64,
    pub jobs: usize,
    pub on_cbw_error: OnCbwError,
}

/// The end-of-job summary (human on stderr, or the `--json` document).
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub ok: bool,
    pub exit_code: i32,
    pub command: &'static str,
    pub source: String,
    pub target: String,
    pub target_format: Format,
    pub sync: SyncMode,
    pub dry_run: bool,
    pub virtual_size: u64,
    pub cluster_size: u64,
    /// Bytes written to the target as data.
    pub bytes_copied: u64,
    /// Bytes not written as data because they read as zeros (unallocated,
    /// zero clusters, all-zero data).
    pub bytes_skipped_zero: u64,
    pub copy_before_write_copies: u64,
    pub copy_before_write_bytes: u64,
    pub retries: u64,
    pub retry_events: Vec<crate::job::RetryEvent>,
    /// Byte ranges `[start, end)` skipped by an ignore policy.
    pub ignored_ranges: Vec<[u64; 2]>,
    pub elapsed_seconds: f64,
    pub throughput_bytes_per_second: f64,
    pub started: String,
    pub finished: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_overlay: Option<String>,
    pub verified: bool,
    /// Root digest of TARGET.manifest (absent with --no-manifest).
    pub manifest_root_digest: Option<String>,
}

fn usage(msg: String) -> anyhow::Error {
    AppError::Usage(msg).into()
}

/// Turn the arguments into a plan, refusing inconsistent values (exit 2).
pub fn plan(args: &BackupArgs) -> anyhow::Result<Plan> {
    let needs_qcow2 = args.sync == SyncMode::None;
    let target_format = args.target_format.unwrap_or_else(|| {
        match args.target.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("qcow2") => Format::Qcow2,
            _ if needs_qcow2 => Format::Qcow2,
            _ => Format::Raw,
        }
    });
    if needs_qcow2 && target_format != Format::Qcow2 {
        return Err(usage(format!("--sync {} needs a qcow2 target", args.sync)));
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
        Format::Qcow2 => args.target_cluster_size,
        Format::Raw => DEFAULT_CLUSTER,
    };
    if target_format == Format::Qcow2 && target_cs > (2 << 20) {
        return Err(usage(format!(
            "--target-cluster-size {target_cs} is larger than qcow2 allows (2M)"
        )));
    }
    let cluster_size = args.cluster_size.unwrap_or(DEFAULT_CLUSTER.max(target_cs));
    if target_format == Format::Qcow2 && cluster_size < target_cs {
        return Err(usage(format!(
            "--cluster-size {cluster_size} is smaller than the target's cluster size {target_cs}; \
             use at least {target_cs} or a smaller --target-cluster-size"
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
    })
}

pub fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Refuse an output path that would lose data or cannot be written.
pub fn check_output(path: &Path, image: &Image, force: bool, what: &str) -> anyhow::Result<()> {
    if !dir_of(path).is_dir() {
        bail!(
            "the directory of the {what} {} does not exist; create it first",
            path.display()
        );
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_dir() {
            bail!("the {what} {} is a directory; name a file", path.display());
        }
        for layer in &image.layers {
            if let Ok(m) = std::fs::metadata(&layer.info.path)
                && m.dev() == meta.dev()
                && m.ino() == meta.ino()
            {
                bail!(
                    "the {what} {} is the source image {} (or in its backing chain); refusing to overwrite it",
                    path.display(),
                    layer.info.path.display()
                );
            }
        }
        if !force {
            bail!(
                "the {what} {} already exists; pass --force to replace it (it is replaced only once the new file is complete)",
                path.display()
            );
        }
    }
    Ok(())
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
        src.file_name().map(|n| n.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(name.unwrap_or_else(|| src.to_string_lossy().into_owned()))
}

/// The node a backup writes into, and how to complete it.
enum Target {
    Raw(Arc<RawNode>),
    Qcow2(Arc<Qcow2Writer>),
}

impl Target {
    fn node(&self) -> Arc<dyn BlockNode> {
        match self {
            Target::Raw(n) => n.clone(),
            Target::Qcow2(n) => n.clone(),
        }
    }

    fn complete(&self) -> Result<(), BlockError> {
        match self {
            Target::Raw(n) => n.flush(),
            Target::Qcow2(n) => n.finish(),
        }
    }
}

/// Bytes a full backup reads: (data bytes, zero or unallocated bytes).
fn dry_run_counts(node: &dyn BlockNode) -> anyhow::Result<(u64, u64)> {
    let (mut data, mut zero) = (0, 0);
    let size = node.size();
    let mut pos = 0;
    while pos < size {
        let ext = node
            .block_status(pos, size - pos)
            .map_err(CopyError::Source)?;
        if ext.status == Status::Data {
            data += ext.len;
        } else {
            zero += ext.len;
        }
        pos += ext.len;
    }
    Ok((data, zero))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Compare `got` with `want` over their whole size; the first differing
/// offset, if any.
pub fn first_difference(got: &dyn BlockNode, want: &dyn BlockNode) -> anyhow::Result<Option<u64>> {
    if got.size() != want.size() {
        return Ok(Some(got.size().min(want.size())));
    }
    let size = want.size();
    let chunk = 4u64 << 20;
    let (mut a, mut b) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut pos = 0;
    while pos < size {
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

/// Write the guest overlay as a qcow2 backed by the source.
fn export_overlay(
    overlay: &OverlayNode,
    file: &Path,
    source: &Path,
    source_format: Format,
    cluster_size: u64,
    keep_partial: bool,
) -> anyhow::Result<()> {
    let partial = Partial::new(file, keep_partial);
    let w = Qcow2Writer::create(
        partial.path(),
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
    partial
        .commit()
        .with_context(|| format!("cannot rename the guest overlay to {}", file.display()))?;
    Ok(())
}

pub fn run(args: &BackupArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let plan = plan(args)?;
    let image =
        open_image(&plan.source, args.source_format).context("cannot open the source image")?;
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
    check_output(&plan.target, &image, args.force, "target")?;
    if let Some(o) = &args.guest_overlay {
        check_output(o, &image, args.force, "guest overlay")?;
    }
    let size = image.node.size();
    let source_format = image.layers[0].info.format;
    log::info(format!(
        "source {} ({}, {} layer(s), {}), target {} ({}), sync {}, cluster size {}, {} worker(s), requests up to {}",
        plan.source.display(),
        source_format,
        image.layers.len(),
        human_bytes(size),
        plan.target.display(),
        plan.target_format,
        plan.sync,
        human_bytes(plan.cluster_size),
        plan.jobs,
        human_bytes(plan.max_chunk)
    ));

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
        cluster_size: plan.cluster_size,
        bytes_copied: 0,
        bytes_skipped_zero: 0,
        copy_before_write_copies: 0,
        copy_before_write_bytes: 0,
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
    };

    if args.dry_run {
        let (data, zero) = match plan.sync {
            SyncMode::Full => dry_run_counts(image.node.as_ref())?,
            SyncMode::None => (0, 0),
        };
        summary.bytes_copied = data;
        summary.bytes_skipped_zero = zero;
        summary.finished = rfc3339(SystemTime::now());
        summary.elapsed_seconds = t0.elapsed().as_secs_f64();
        if g.json {
            print_json(&summary)?;
        } else if !g.quiet {
            match plan.sync {
                SyncMode::Full => eprintln!(
                    "imgbackup: dry run: a full backup of {} into {} ({}) would read up to {} of data in {} clusters of {}; {} read as zeros and would not be written. Nothing was written.",
                    plan.source.display(),
                    plan.target.display(),
                    plan.target_format,
                    human_bytes(data),
                    data.div_ceil(plan.cluster_size),
                    human_bytes(plan.cluster_size),
                    human_bytes(zero)
                ),
                SyncMode::None => eprintln!(
                    "imgbackup: dry run: a fleecing backup (sync none) of {} into {} would copy only the clusters the guest overwrites. Nothing was written.",
                    plan.source.display(),
                    plan.target.display()
                ),
            }
        }
        return Ok(Exit::Success);
    }

    let cancel = Cancel::new();
    cancel
        .install_signal_handlers()
        .context("cannot install the SIGINT/SIGTERM handlers")?;
    if let Some(t) = args.timeout {
        cancel.arm_timeout(t);
    }

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
    let partial = Partial::new(&plan.target, args.keep_partial);
    let backing = match plan.sync {
        SyncMode::None => Some((
            backing_name(&plan.target, &plan.source)?,
            source_format.to_string(),
        )),
        SyncMode::Full => None,
    };
    let has_backing = backing.is_some();
    let target = match plan.target_format {
        Format::Raw => Target::Raw(Arc::new(
            RawNode::create(partial.path(), size).map_err(CopyError::Target)?,
        )),
        Format::Qcow2 => Target::Qcow2(Arc::new(
            Qcow2Writer::create(
                partial.path(),
                &CreateOptions {
                    size,
                    cluster_size: plan.target_cluster_size,
                    backing,
                },
            )
            .map_err(CopyError::Target)?,
        )),
    };
    let target_node = FaultNode::wrap(target.node(), &args.inject, Side::Target);
    let geo = Geometry {
        size,
        chunk: crate::manifest::CHUNK_SIZE.min(plan.cluster_size),
    };
    let mpartial =
        (!args.no_manifest).then(|| Partial::new(&manifest_path(&plan.target), args.keep_partial));
    let mwriter = match &mpartial {
        Some(mp) => Some(Arc::new(
            ManifestWriter::create(mp.path(), geo).map_err(CopyError::Manifest)?,
        )),
        None => None,
    };
    let clusters = size.div_ceil(plan.cluster_size);
    let bc = Arc::new(BlockCopy::new(
        active.clone(),
        target_node,
        Config {
            cluster_size: plan.cluster_size,
            max_chunk: plan.max_chunk,
            write_zeroes: has_backing,
            speed: args.speed,
        },
        Bits::full(clusters),
        cancel.clone(),
        mwriter.clone().map(|m| m as Arc<dyn ChunkObserver>),
    ));
    let cbw = args.guest.as_ref().map(|_| {
        Arc::new(CbwNode::new(
            active.clone(),
            bc.clone(),
            plan.on_cbw_error,
            args.cbw_timeout,
        ))
    });

    let counter_bc = bc.clone();
    let reporter = Reporter::start(
        g.progress,
        g.quiet || g.json && g.progress == ProgressMode::Auto,
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
    let stop_guest = AtomicBool::new(false);
    let (result, guest_stats) = std::thread::scope(|s| {
        let guest = match (&args.guest, &cbw) {
            (Some(spec), Some(cbw)) => {
                let spec: &GuestSpec = spec;
                let cbw = cbw.clone();
                let stop = &stop_guest;
                let cancel = &cancel;
                Some(s.spawn(move || guest::run(cbw.as_ref(), spec, stop, cancel)))
            }
            _ => None,
        };
        let result = match plan.sync {
            SyncMode::Full => run_background(&bc, plan.jobs, &cancel, &policies, &plog),
            SyncMode::None => Ok(()),
        };
        let bounded = args.guest.as_ref().is_some_and(|g| g.is_bounded());
        if result.is_err() || !bounded {
            stop_guest.store(true, Ordering::Relaxed);
        }
        let stats = guest.and_then(|h| h.join().ok());
        (result, stats)
    });
    reporter.finish();
    let result = result.and_then(|_| outcome(&bc, &cancel));
    result.context("the backup failed")?;

    // Flush through the graph first, so target flush faults are seen.
    bc.flush_target().context("cannot flush the target")?;
    target
        .complete()
        .map_err(CopyError::Target)
        .with_context(|| format!("cannot complete the target {}", partial.path().display()))?;
    if let Some(reason) = cancel.reason() {
        return Err(AppError::Cancelled(reason).into());
    }

    let skipped = plog.skipped_ranges();
    if let Some(m) = &mwriter {
        // Where an ignore policy skipped data, the digests are of what the
        // backup holds; chunks the copy did not see (sync none) come from
        // the image.
        m.fill_ranges_from(target.node().as_ref(), &skipped, plan.jobs)
            .context("cannot compute the manifest")?;
        m.fill_from(image.node.as_ref(), plan.jobs)
            .context("cannot compute the manifest")?;
        let mut meta = Meta {
            format_version: crate::manifest::VERSION,
            virtual_size: size,
            chunk_size: geo.chunk,
            chunks: geo.chunks(),
            root_digest: String::new(),
            source: std::fs::canonicalize(&plan.source)
                .unwrap_or_else(|_| plan.source.clone())
                .display()
                .to_string(),
            source_format: source_format.to_string(),
            target_format: plan.target_format.to_string(),
            sync: plan.sync.to_string(),
            bitmap: None,
            parent: None,
            started: summary.started.clone(),
            finished: rfc3339(SystemTime::now()),
            created_by: format!("imgbackup {}", env!("CARGO_PKG_VERSION")),
            incomplete: skipped.iter().map(|&(s, e)| [s, e]).collect(),
        };
        m.finish(&mut meta).map_err(CopyError::Manifest)?;
        summary.manifest_root_digest = Some(meta.root_digest);
    }

    if args.verify {
        let got = open_image(partial.path(), Some(plan.target_format))
            .context("cannot open the backup to verify it")?;
        if let Some(mp) = &mpartial {
            let mf = ManifestFile::open(mp.path())?;
            if let Some(d) = check_image(got.node.as_ref(), &mf, plan.jobs)? {
                return Err(AppError::Verify(format!(
                    "chunk {} at offset {} of the new backup does not match its manifest (expected sha256 {}, found {}); it was not kept",
                    d.chunk, d.offset, d.expected, d.found
                ))
                .into());
            }
        }
        if (args.guest.is_some() || mpartial.is_none())
            && let Some(offset) = first_difference(got.node.as_ref(), image.node.as_ref())?
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
        summary.verified = true;
    }

    // The manifest first: a crash between the renames leaves a manifest
    // without its backup, never a backup that looks whole without one.
    if let Some(mp) = mpartial {
        let mfinal = mp.final_path().to_path_buf();
        mp.commit()
            .map_err(CopyError::Manifest)
            .with_context(|| format!("cannot rename the manifest to {}", mfinal.display()))?;
    }
    let final_path = partial.final_path().to_path_buf();
    partial
        .commit()
        .map_err(|e| CopyError::Target(BlockError::io(Op::Flush, &final_path, 0, 0, e)))
        .with_context(|| {
            format!(
                "cannot rename the finished backup to {}",
                final_path.display()
            )
        })?;

    if let (Some(o), Some(file)) = (&overlay, &args.guest_overlay) {
        export_overlay(
            o,
            file,
            &plan.source,
            source_format,
            65536,
            args.keep_partial,
        )
        .with_context(|| format!("cannot write the guest overlay {}", file.display()))?;
        summary.guest_overlay = Some(file.display().to_string());
    }

    let p = &bc.progress;
    summary.bytes_copied = p.copied.load(Ordering::Relaxed);
    summary.bytes_skipped_zero = p.zero.load(Ordering::Relaxed);
    summary.copy_before_write_copies = p.cbw_copies.load(Ordering::Relaxed);
    summary.copy_before_write_bytes = p.cbw_bytes.load(Ordering::Relaxed);
    summary.retries = p.retries.load(Ordering::Relaxed);
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
        eprintln!(
            "imgbackup: warning: the backup is incomplete: {} range(s) were skipped by an ignore policy (they stay to be copied): {}",
            skipped.len(),
            skipped
                .iter()
                .map(|(s, e)| format!("{s}-{e}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(exit)
}

fn print_human(s: &Summary) {
    eprintln!(
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
    eprintln!("  copied:            {}", human_bytes(s.bytes_copied));
    if s.retries > 0 {
        eprintln!("  retries:           {}", s.retries);
    }
    if !s.ignored_ranges.is_empty() {
        eprintln!(
            "  skipped:           {} (ignored errors)",
            s.ignored_ranges
                .iter()
                .map(|r| format!("{}-{}", r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!(
        "  zero:              {} (not written as data)",
        human_bytes(s.bytes_skipped_zero)
    );
    if let Some(g) = &s.guest {
        eprintln!(
            "  copy-before-write: {} copies, {}",
            s.copy_before_write_copies,
            human_bytes(s.copy_before_write_bytes)
        );
        eprintln!(
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
        eprintln!("  guest overlay:     {o}");
    }
    if let Some(r) = &s.manifest_root_digest {
        eprintln!("  manifest root:     {r}");
    }
    eprintln!(
        "  elapsed:           {} ({}/s)",
        human_duration(s.elapsed_seconds),
        human_bytes(s.throughput_bytes_per_second as u64)
    );
}
