//! `imgbackup backup SOURCE TARGET`.

use crate::bitmap::Bits;
use crate::cli::{BackupArgs, GlobalOpts, SyncMode};
use crate::copy::{BlockCopy, Config, CopyError};
use crate::error::{BlockError, Op};
use crate::exit::{AppError, Exit};
use crate::job::cancel::Cancel;
use crate::job::run_background;
use crate::log;
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
    /// Bytes not written because they read as zeros (unallocated, zero
    /// clusters, all-zero data).
    pub bytes_skipped_zero: u64,
    pub copy_before_write_copies: u64,
    pub retries: u64,
    pub ignored_ranges: Vec<[u64; 2]>,
    pub elapsed_seconds: f64,
    pub throughput_bytes_per_second: f64,
    pub started: String,
    pub finished: String,
}

fn usage(msg: String) -> anyhow::Error {
    AppError::Usage(msg).into()
}

/// Turn the arguments into a plan, refusing inconsistent values (exit 2).
pub fn plan(args: &BackupArgs) -> anyhow::Result<Plan> {
    let target_format = args.target_format.unwrap_or_else(|| {
        match args.target.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("qcow2") => Format::Qcow2,
            _ => Format::Raw,
        }
    });
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
    Ok(Plan {
        source: args.source.clone(),
        target: args.target.clone(),
        sync: args.sync,
        target_format,
        target_cluster_size: target_cs,
        cluster_size,
        max_chunk,
        jobs,
    })
}

/// Refuse targets that would lose data or cannot be written.
fn check_target(plan: &Plan, image: &Image, force: bool) -> anyhow::Result<()> {
    let t = &plan.target;
    let dir = match t.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "the directory of the target {} does not exist; create it first",
            t.display()
        );
    }
    if let Ok(meta) = std::fs::metadata(t) {
        if meta.is_dir() {
            bail!("the target {} is a directory; name a file", t.display());
        }
        for layer in &image.layers {
            if let Ok(m) = std::fs::metadata(&layer.info.path)
                && m.dev() == meta.dev()
                && m.ino() == meta.ino()
            {
                bail!(
                    "the target {} is the source image {} (or in its backing chain); refusing to overwrite it",
                    t.display(),
                    layer.info.path.display()
                );
            }
        }
        if !force {
            bail!(
                "the target {} already exists; pass --force to replace it (it is replaced only once the new backup is complete)",
                t.display()
            );
        }
    }
    Ok(())
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

/// Clusters and bytes a full backup reads: (data bytes, zero or unallocated bytes).
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

pub fn run(args: &BackupArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let plan = plan(args)?;
    let image =
        open_image(&plan.source, args.source_format).context("cannot open the source image")?;
    check_target(&plan, &image, args.force)?;
    let size = image.node.size();
    log::info(format!(
        "source {} ({}, {} layer(s), {}), target {} ({}), cluster size {}, {} worker(s), requests up to {}",
        plan.source.display(),
        image.layers[0].info.format,
        image.layers.len(),
        human_bytes(size),
        plan.target.display(),
        plan.target_format,
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
        retries: 0,
        ignored_ranges: Vec::new(),
        elapsed_seconds: 0.0,
        throughput_bytes_per_second: 0.0,
        started: rfc3339(started),
        finished: String::new(),
    };

    if args.dry_run {
        let (data, zero) = dry_run_counts(image.node.as_ref())?;
        summary.bytes_copied = data;
        summary.bytes_skipped_zero = zero;
        summary.finished = rfc3339(SystemTime::now());
        summary.elapsed_seconds = t0.elapsed().as_secs_f64();
        if g.json {
            print_json(&summary)?;
        } else if !g.quiet {
            eprintln!(
                "imgbackup: dry run: a full backup of {} into {} ({}) would read up to {} of data in {} clusters of {}; {} read as zeros and would not be written. Nothing was written.",
                plan.source.display(),
                plan.target.display(),
                plan.target_format,
                human_bytes(data),
                data.div_ceil(plan.cluster_size),
                human_bytes(plan.cluster_size),
                human_bytes(zero)
            );
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

    let partial = Partial::new(&plan.target, args.keep_partial);
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
                    backing: None,
                },
            )
            .map_err(CopyError::Target)?,
        )),
    };

    let clusters = size.div_ceil(plan.cluster_size);
    let bc = Arc::new(BlockCopy::new(
        image.node.clone(),
        target.node(),
        Config {
            cluster_size: plan.cluster_size,
            max_chunk: plan.max_chunk,
            write_zeroes: false,
            speed: args.speed,
        },
        Bits::full(clusters),
        cancel.clone(),
        None,
    ));
    let counter_bc = bc.clone();
    let reporter = Reporter::start(
        g.progress,
        g.quiet || g.json && g.progress == crate::cli::ProgressMode::Auto,
        "backup",
        Arc::new(move || {
            let p = &counter_bc.progress;
            (
                p.done.load(std::sync::atomic::Ordering::Relaxed),
                p.total.load(std::sync::atomic::Ordering::Relaxed),
            )
        }),
    );
    let result = run_background(&bc, plan.jobs, &cancel);
    reporter.finish();
    result.context("the backup failed")?;

    target
        .complete()
        .map_err(CopyError::Target)
        .with_context(|| format!("cannot complete the target {}", partial.path().display()))?;
    if let Some(reason) = cancel.reason() {
        return Err(AppError::Cancelled(reason).into());
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

    let p = &bc.progress;
    let ord = std::sync::atomic::Ordering::Relaxed;
    summary.bytes_copied = p.copied.load(ord);
    summary.bytes_skipped_zero = p.zero.load(ord);
    summary.copy_before_write_copies = p.cbw_copies.load(ord);
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
        print_human(&summary, &plan.target);
    }
    Ok(Exit::Success)
}

fn print_human(s: &Summary, target: &Path) {
    eprintln!(
        "imgbackup: backup {} -> {} ({}, sync full) complete",
        s.source,
        target.display(),
        s.target_format
    );
    eprintln!("  copied:   {}", human_bytes(s.bytes_copied));
    eprintln!(
        "  zero:     {} (not written)",
        human_bytes(s.bytes_skipped_zero)
    );
    eprintln!(
        "  elapsed:  {} ({}/s)",
        human_duration(s.elapsed_seconds),
        human_bytes(s.throughput_bytes_per_second as u64)
    );
}
