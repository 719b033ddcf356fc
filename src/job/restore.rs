//! The restore job: flatten a backup and its chain into a new image (or a
//! block device), checking every chunk against the manifest on the way. It
//! runs on the same copy runner as the backup ([`super::run_background`]).

use super::JobError;
use super::cancel::Cancel;
use super::error::Result;
use super::policy::Policies;
use super::{PolicyLog, run_background};
use crate::bitmap::Bits;
use crate::copy::{BlockCopy, ChunkObserver, Config, CopyError};
use crate::error::{BlockError, Op};
use crate::manifest::{ManifestChecker, ManifestError, ManifestFile, manifest_path};
use crate::node::probe::{Format, Image, format_for, open_image};
use crate::node::raw::RawNode;
use crate::node::{BlockNode, Extent};
use crate::target::guard;
use crate::target::{Output, Partial};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What a restore does.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The backup (with its chain).
    pub backup: PathBuf,
    /// The image (or block device) to write.
    pub output: PathBuf,
    /// Its format (None: by extension; raw on a device).
    pub output_format: Option<Format>,
    /// qcow2 cluster size of the output.
    pub output_cluster_size: u64,
    /// Check every chunk against the manifest.
    pub verify: bool,
    /// Replace an existing output, or overwrite a device.
    pub force: bool,
    /// Keep OUTPUT.partial on failure.
    pub keep_partial: bool,
    /// Copy workers (None: the number of CPUs).
    pub jobs: Option<usize>,
}

/// The result of a restore (the `--json` document).
#[derive(Debug, serde::Serialize)]
pub struct RestoreSummary {
    /// Always true.
    pub ok: bool,
    /// Always 0.
    pub exit_code: i32,
    /// "restore".
    pub command: &'static str,
    /// The backup.
    pub backup: String,
    /// What was written.
    pub output: String,
    /// Its format.
    pub format: Format,
    /// Whether every chunk was checked against the manifest.
    pub verified: bool,
    /// The manifest's root digest.
    pub root_digest: Option<String>,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Bytes written as data.
    pub bytes_written: u64,
    /// Bytes that read as zeros.
    pub bytes_zero: u64,
    /// Wall-clock time.
    pub elapsed_seconds: f64,
}

/// A restore with its output open, ready to run.
pub struct RestoreJob {
    cfg: RestoreConfig,
    t0: Instant,
    format: Format,
    on_device: bool,
    root: Option<String>,
    verified: bool,
    partial: Option<Partial>,
    output: Option<Output>,
    node: Arc<dyn BlockNode>,
    bc: Arc<BlockCopy>,
    cancel: Cancel,
    size: u64,
}

impl RestoreJob {
    /// Open the backup and its manifest, check the output, and create it
    /// (OUTPUT.partial, or the device opened exclusively).
    pub fn prepare(cfg: RestoreConfig, cancel: Cancel) -> Result<RestoreJob> {
        let t0 = Instant::now();
        let mut image =
            open_image(&cfg.backup, None).map_err(JobError::context("cannot open the backup"))?;
        let size = image.node.size();
        let on_device = std::fs::metadata(&cfg.output)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let format = match (cfg.output_format, on_device) {
            (Some(Format::Qcow2), true) => {
                return Err(JobError::Usage(format!(
                    "{} is a block device: a restore onto a device writes the raw image into it; leave --output-format out",
                    cfg.output.display()
                )));
            }
            (_, true) => Format::Raw,
            (Some(f), false) => f,
            (None, false) => format_for(&cfg.output, Format::Raw),
        };
        let manifest = open_manifest(&cfg, &image)?;
        // Nothing writes to a backup being restored.
        crate::manifest::ready_to_check(&mut image, manifest.as_ref());
        // The output may not be the backup or a file of its chain.
        let protected = guard::Protected::source(&image);
        protected.check(&cfg.output, "output")?;
        if on_device {
            if !cfg.force {
                return Err(JobError::Refused(format!(
                    "the output {} is a block device; pass --force to overwrite its content with the restored image",
                    cfg.output.display()
                )));
            }
        } else {
            guard::check_output(&cfg.output, cfg.force, "output")?;
        }
        if format == Format::Qcow2 && cfg.output_cluster_size > (2 << 20) {
            return Err(JobError::Refused(format!(
                "--output-cluster-size {} is larger than qcow2 allows (2M)",
                cfg.output_cluster_size
            )));
        }
        let chunk = manifest.as_ref().map(|m| m.meta.chunk_size).unwrap_or(1);
        let out_cs = if format == Format::Qcow2 {
            cfg.output_cluster_size
        } else {
            65536
        };
        let cluster = out_cs.max(chunk).max(65536);
        let root = manifest
            .as_ref()
            .map(|m| m.meta.root_digest.clone())
            .filter(|r| !r.is_empty());
        let (partial, node, output, write_zeroes) =
            open_output(&cfg, on_device, format, size, out_cs)?;
        let verified = manifest.is_some();
        let observer: Option<Arc<dyn ChunkObserver>> = match manifest {
            Some(m) => {
                let trusted = crate::manifest::read_from_recorded_backing(&image, &m)?;
                Some(Arc::new(ManifestChecker::new(m).trusting(trusted)) as Arc<dyn ChunkObserver>)
            }
            None => None,
        };
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
        Ok(RestoreJob {
            cfg,
            t0,
            format,
            on_device,
            root,
            verified,
            partial,
            output,
            node,
            bc,
            cancel,
            size,
        })
    }

    /// The job's progress as (done, total) bytes.
    pub fn progress(&self) -> super::backup::ProgressFn {
        let bc = self.bc.clone();
        Arc::new(move || {
            (
                bc.progress.done.load(Ordering::Relaxed),
                bc.progress.total.load(Ordering::Relaxed),
            )
        })
    }

    /// A note for a failure that left a device half written.
    fn dev_note(&self) -> String {
        if self.on_device {
            format!(
                "; the device {} holds a partly restored image now: restore again before using it",
                self.cfg.output.display()
            )
        } else {
            String::new()
        }
    }

    /// Copy, then complete and put the output into place.
    pub fn run(self) -> Result<RestoreSummary> {
        tracing::info!("phase: restore");
        let res = run_background(
            &self.bc,
            self.cfg.jobs.unwrap_or_else(super::backup::default_jobs),
            &self.cancel,
            &Policies::default(),
            &PolicyLog::default(),
        );
        res.map_err(|e| e.within(format!("the restore failed{}", self.dev_note())))?;
        match &self.output {
            Some(o) => o.complete(),
            None => self.node.flush(),
        }
        .map_err(|e| {
            JobError::step(
                format!("cannot complete {}", self.cfg.output.display()),
                CopyError::Target(e),
            )
        })?;
        if let Some(r) = self.cancel.reason() {
            return Err(JobError::Cancelled(r).within(self.dev_note()));
        }
        let output = self.cfg.output.display().to_string();
        if let Some(partial) = self.partial {
            partial.commit().map_err(JobError::context(format!(
                "cannot rename the restored image to {output}"
            )))?;
        }
        Ok(RestoreSummary {
            ok: true,
            exit_code: 0,
            command: "restore",
            backup: self.cfg.backup.display().to_string(),
            output,
            format: self.format,
            verified: self.verified,
            root_digest: self.root,
            virtual_size: self.size,
            bytes_written: self.bc.progress.copied.load(Ordering::Relaxed),
            bytes_zero: self.bc.progress.zero.load(Ordering::Relaxed),
            elapsed_seconds: self.t0.elapsed().as_secs_f64(),
        })
    }
}

/// The backup's manifest, checked against the backup (unless not verifying).
fn open_manifest(cfg: &RestoreConfig, image: &Image) -> Result<Option<ManifestFile>> {
    let size = image.node.size();
    if !cfg.verify {
        return Ok(None);
    }
    let m = match ManifestFile::open(&manifest_path(&cfg.backup)) {
        Ok(m) => m,
        Err(e @ ManifestError::Missing { .. }) => {
            return Err(JobError::step(
                "cannot check the restored data; pass --no-verify to restore without checking",
                e,
            ));
        }
        Err(e @ ManifestError::Damaged { .. }) => {
            return Err(JobError::Verify(format!(
                "the manifest of {} is damaged: {e}",
                cfg.backup.display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if m.meta.virtual_size != size {
        return Err(JobError::Verify(format!(
            "the backup {} is {size} bytes, its manifest says {}: the backup is truncated or was replaced",
            cfg.backup.display(),
            m.meta.virtual_size
        )));
    }
    if m.meta.detached && image.layers.len() == 1 {
        return Err(super::verify::detached_error(&cfg.backup, &m));
    }
    Ok(Some(m))
}

/// Where a restore writes: OUTPUT.partial with its image (renamed at the
/// end), or a block device written in place (zeros written explicitly).
type Destination = (Option<Partial>, Arc<dyn BlockNode>, Option<Output>, bool);

fn open_output(
    cfg: &RestoreConfig,
    on_device: bool,
    format: Format,
    size: u64,
    out_cs: u64,
) -> Result<Destination> {
    if on_device {
        let dev = open_device(&cfg.output, size)?;
        return Ok((None, dev, None, true));
    }
    let partial = Partial::create(
        &cfg.output,
        crate::files::mode_from(&cfg.backup),
        cfg.keep_partial,
        None,
    )?;
    let output = Output::create(&partial, format, size, out_cs, None, Default::default())
        .map_err(CopyError::Target)?;
    let node = output.node();
    Ok((Some(partial), node, Some(output), false))
}

/// Open the block device `path` to restore an image of `size` bytes into
/// it: exclusively (not while mounted or otherwise in use), and only if it
/// is large enough.
fn open_device(path: &Path, size: u64) -> Result<Arc<dyn BlockNode>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            JobError::step(
                if busy {
                    format!(
                        "{} is in use (mounted, or held by another program); unmount it first",
                        path.display()
                    )
                } else {
                    format!("cannot open the device {}", path.display())
                },
                CopyError::Target(BlockError::io(Op::Open, path, 0, 0, e)),
            )
        })?;
    let node = RawNode::device_for_writing(path, file).map_err(CopyError::Target)?;
    if node.size() < size {
        return Err(JobError::Refused(format!(
            "the device {} has {} bytes, the restored image needs {size}; choose a larger device",
            path.display(),
            node.size()
        )));
    }
    Ok(Arc::new(DeviceWindow {
        dev: Arc::new(node),
        size,
    }))
}

/// The first `size` bytes of a device: what a restore writes (the rest of
/// the device is left as it was).
struct DeviceWindow {
    dev: Arc<dyn BlockNode>,
    size: u64,
}

impl crate::node::Filter for DeviceWindow {
    fn child(&self) -> &Arc<dyn BlockNode> {
        &self.dev
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> crate::error::Result<()> {
        crate::node::check_range(self.dev.path(), offset, buf.len() as u64, self.size)?;
        self.dev.read(offset, buf)
    }
    fn write_with(
        &self,
        offset: u64,
        buf: &[u8],
        flags: crate::node::WriteFlags,
    ) -> crate::error::Result<()> {
        crate::node::check_range(self.dev.path(), offset, buf.len() as u64, self.size)?;
        self.dev.write_with(offset, buf, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> crate::error::Result<()> {
        crate::node::check_range(self.dev.path(), offset, len, self.size)?;
        self.dev.write_zeroes(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> crate::error::Result<Extent> {
        crate::node::check_range(self.dev.path(), offset, len, self.size)?;
        self.dev.block_status(offset, len)
    }
}
