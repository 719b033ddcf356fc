//! `imgbackup restore BACKUP OUTPUT`: flatten a backup and its chain into a
//! new image, checking every chunk against the manifest on the way.

use super::{default_jobs, guard};
use crate::bitmap::Bits;
use crate::cli::{GlobalOpts, ProgressMode, RestoreArgs};
use crate::copy::{BlockCopy, ChunkObserver, Config, CopyError};
use crate::error::{BlockError, Op};
use crate::exit::{AppError, Exit};
use crate::job::cancel::Cancel;
use crate::job::policy::Policies;
use crate::job::{PolicyLog, run_background};
use crate::manifest::{ManifestChecker, ManifestError, ManifestFile, manifest_path};
use crate::node::probe::{Format, Image, format_for, open_image};
use crate::node::raw::RawNode;
use crate::node::{BlockNode, Extent};
use crate::report::{Reporter, human_bytes, human_duration, print_json};
use crate::target::{Output, Partial};
use anyhow::{Context, bail};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(serde::Serialize)]
struct RestoreDoc {
    ok: bool,
    exit_code: i32,
    command: &'static str,
    backup: String,
    output: String,
    format: Format,
    verified: bool,
    root_digest: Option<String>,
    virtual_size: u64,
    bytes_written: u64,
    bytes_zero: u64,
    elapsed_seconds: f64,
}

/// Run `imgbackup restore`.
pub fn run(args: &RestoreArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let t0 = Instant::now();
    let image = open_image(&args.backup, None).context("cannot open the backup")?;
    let size = image.node.size();
    let on_device = std::fs::metadata(&args.output)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let format = match (args.output_format, on_device) {
        (Some(Format::Qcow2), true) => {
            return Err(AppError::Usage(format!(
                "{} is a block device: a restore onto a device writes the raw image into it; leave --output-format out",
                args.output.display()
            ))
            .into());
        }
        (_, true) => Format::Raw,
        (Some(f), false) => f,
        (None, false) => format_for(&args.output, Format::Raw),
    };
    let manifest = open_manifest(args, &image)?;
    // The output may not be the backup or a file of its chain.
    let protected = guard::Protected::source(&image);
    protected.check(&args.output, "output")?;
    if on_device {
        if !args.force {
            bail!(
                "the output {} is a block device; pass --force to overwrite its content with the restored image",
                args.output.display()
            );
        }
    } else {
        guard::check_output(&args.output, args.force, "output")?;
    }
    if format == Format::Qcow2 && args.output_cluster_size > (2 << 20) {
        bail!(
            "--output-cluster-size {} is larger than qcow2 allows (2M)",
            args.output_cluster_size
        );
    }
    let chunk = manifest.as_ref().map(|m| m.meta.chunk_size).unwrap_or(1);
    let out_cs = if format == Format::Qcow2 {
        args.output_cluster_size
    } else {
        65536
    };
    let cluster = out_cs.max(chunk).max(65536);
    let root = manifest.as_ref().map(|m| m.meta.root_digest.clone());

    let cancel = Cancel::new();
    cancel
        .install_signal_handlers()
        .context("cannot install the signal handlers")?;
    let (partial, node, output, write_zeroes) = open_output(args, on_device, format, size, out_cs)?;
    let verified = manifest.is_some();
    let observer: Option<Arc<dyn ChunkObserver>> =
        manifest.map(|m| Arc::new(ManifestChecker::new(m)) as Arc<dyn ChunkObserver>);
    let bc = Arc::new(BlockCopy::new(
        image.node.clone(),
        node.clone(),
        Config {
            cluster_size: cluster,
            max_chunk: (2 << 20u64).max(cluster),
            // A device keeps its old content where the image has holes.
            write_zeroes,
            speed: None,
            compress: false,
            cbw_cache: 0,
            copy_range: false,
        },
        Bits::full(size.div_ceil(cluster)),
        cancel.clone(),
        observer,
    ));
    let counter = bc.clone();
    let reporter = Reporter::start(
        args.progress.progress,
        g.quiet || g.json && args.progress.progress == ProgressMode::Auto,
        "restore",
        Arc::new(move || {
            (
                counter.progress.done.load(Ordering::Relaxed),
                counter.progress.total.load(Ordering::Relaxed),
            )
        }),
    );
    tracing::info!("phase: restore");
    let res = run_background(
        &bc,
        args.jobs.unwrap_or_else(default_jobs),
        &cancel,
        &Policies::default(),
        &PolicyLog::default(),
    );
    reporter.finish();
    let dev_note = || {
        if on_device {
            format!(
                "; the device {} holds a partly restored image now: restore again before using it",
                args.output.display()
            )
        } else {
            String::new()
        }
    };
    res.with_context(|| format!("the restore failed{}", dev_note()))?;
    match &output {
        Some(o) => o.complete(),
        None => node.flush(),
    }
    .map_err(CopyError::Target)
    .with_context(|| format!("cannot complete {}", args.output.display()))?;
    if let Some(r) = cancel.reason() {
        return Err(anyhow::Error::new(AppError::Cancelled(r)).context(dev_note()));
    }
    if let Some(partial) = partial {
        partial.commit().with_context(|| {
            format!(
                "cannot rename the restored image to {}",
                args.output.display()
            )
        })?;
    }
    let doc = RestoreDoc {
        ok: true,
        exit_code: 0,
        command: "restore",
        backup: args.backup.display().to_string(),
        output: args.output.display().to_string(),
        format,
        verified,
        root_digest: root,
        virtual_size: size,
        bytes_written: bc.progress.copied.load(Ordering::Relaxed),
        bytes_zero: bc.progress.zero.load(Ordering::Relaxed),
        elapsed_seconds: t0.elapsed().as_secs_f64(),
    };
    render(&doc, g)?;
    Ok(Exit::Success)
}

/// The backup's manifest, checked against the backup (unless
/// --no-verify).
fn open_manifest(args: &RestoreArgs, image: &Image) -> anyhow::Result<Option<ManifestFile>> {
    let size = image.node.size();
    let manifest = if args.no_verify {
        None
    } else {
        match ManifestFile::open(&manifest_path(&args.backup)) {
            Ok(m) => Some(m),
            Err(e @ ManifestError::Missing { .. }) => {
                return Err(anyhow::Error::new(e).context(
                    "cannot check the restored data; pass --no-verify to restore without checking",
                ));
            }
            Err(e @ ManifestError::Damaged { .. }) => {
                return Err(anyhow::Error::new(e).context(AppError::Verify(format!(
                    "the manifest of {} is damaged",
                    args.backup.display()
                ))));
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(m) = &manifest {
        if m.meta.virtual_size != size {
            return Err(AppError::Verify(format!(
                "the backup {} is {size} bytes, its manifest says {}: the backup is truncated or was replaced",
                args.backup.display(),
                m.meta.virtual_size
            ))
            .into());
        }
        if m.meta.detached && image.layers.len() == 1 {
            return Err(super::verify::detached_error(&args.backup, m));
        }
    }
    Ok(manifest)
}

/// Where a restore writes: OUTPUT.partial with its image (renamed at the
/// end), or a block device written in place (zeros written explicitly).
type Destination = (Option<Partial>, Arc<dyn BlockNode>, Option<Output>, bool);

fn open_output(
    args: &RestoreArgs,
    on_device: bool,
    format: Format,
    size: u64,
    out_cs: u64,
) -> anyhow::Result<Destination> {
    if on_device {
        let dev = open_device(&args.output, size)?;
        return Ok((None, dev, None, true));
    }
    let partial = Partial::create(
        &args.output,
        crate::files::mode_from(&args.backup),
        args.keep_partial,
        None,
    )?;
    let output = Output::create(&partial, format, size, out_cs, None).map_err(CopyError::Target)?;
    let node = output.node();
    Ok((Some(partial), node, Some(output), false))
}

/// Print the result: the JSON document, or a line on stderr.
fn render(doc: &RestoreDoc, g: &GlobalOpts) -> anyhow::Result<()> {
    if g.json {
        print_json(&doc)?;
    } else if !g.quiet {
        crate::errln!(
            "imgbackup: restored {} -> {} ({}, {}{}): {} written, {} zero, {}",
            doc.backup,
            doc.output,
            doc.format,
            human_bytes(doc.virtual_size),
            if doc.verified {
                ", every chunk matches the manifest"
            } else {
                ", not checked (--no-verify)"
            },
            human_bytes(doc.bytes_written),
            human_bytes(doc.bytes_zero),
            human_duration(doc.elapsed_seconds)
        );
    }
    Ok(())
}

/// Open the block device `path` to restore an image of `size` bytes into
/// it: exclusively (not while mounted or otherwise in use), and only if it
/// is large enough.
fn open_device(path: &Path, size: u64) -> anyhow::Result<Arc<dyn BlockNode>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            anyhow::Error::new(CopyError::Target(BlockError::io(Op::Open, path, 0, 0, e))).context(
                if busy {
                    format!(
                        "{} is in use (mounted, or held by another program); unmount it first",
                        path.display()
                    )
                } else {
                    format!("cannot open the device {}", path.display())
                },
            )
        })?;
    let node = RawNode::device_for_writing(path, file).map_err(CopyError::Target)?;
    if node.size() < size {
        bail!(
            "the device {} has {} bytes, the restored image needs {size}; choose a larger device",
            path.display(),
            node.size()
        );
    }
    Ok(Arc::new(DeviceWindow { dev: node, size }))
}

/// The first `size` bytes of a device: what a restore writes (the rest of
/// the device is left as it was).
struct DeviceWindow {
    dev: RawNode,
    size: u64,
}

impl BlockNode for DeviceWindow {
    fn path(&self) -> &Path {
        self.dev.path()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> u64 {
        self.dev.cluster_size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> crate::error::Result<()> {
        crate::node::check_range(self.path(), offset, buf.len() as u64, self.size)?;
        self.dev.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> crate::error::Result<()> {
        crate::node::check_range(self.path(), offset, buf.len() as u64, self.size)?;
        self.dev.write(offset, buf)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> crate::error::Result<()> {
        crate::node::check_range(self.path(), offset, len, self.size)?;
        self.dev.write_zeroes(offset, len)
    }
    fn flush(&self) -> crate::error::Result<()> {
        self.dev.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> crate::error::Result<Extent> {
        crate::node::check_range(self.path(), offset, len, self.size)?;
        self.dev.block_status(offset, len)
    }
}
