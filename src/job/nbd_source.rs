//! A backup whose SOURCE is an NBD export (SPEC §9): the settings that
//! make sense for it, the export opened as the graph's read side, QEMU's
//! dirty bitmap read through its `qemu:dirty-bitmap:NAME` context, and the
//! parent an incremental builds on, checked against its manifest.
//!
//! imgbackup only reads an export: it takes no lock (the server owns the
//! image), keeps no bitmap file, and never clears QEMU's bitmap.

use super::backup::{Backing, BackupConfig};
use super::error::JobError;
use crate::bitmap::file::{Bitmap, BitmapError, DEFAULT_GRANULARITY, Identity};
use crate::manifest::file::ManifestFile;
use crate::nbd::client::{NbdUri, is_uri};
use crate::node::BlockNode;
use crate::node::nbd::{NbdNode, dirty_bitmap_context};
use crate::node::probe::{Format, Image, Layer, LayerInfo};
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Result<T> = std::result::Result<T, JobError>;

/// An NBD source, opened.
pub struct NbdSource {
    /// The URI as given.
    pub uri: NbdUri,
    /// The export.
    pub node: Arc<NbdNode>,
}

/// The URI of `cfg`'s source if it is one; settings that need a file (or
/// an export) refused with the reason (exit 2).
pub fn uri_of(cfg: &BackupConfig) -> Result<Option<NbdUri>> {
    let text = cfg.source.to_string_lossy();
    if !is_uri(&text) {
        if cfg.source_bitmap.is_some() {
            return Err(JobError::Usage(
                "--source-bitmap reads QEMU's dirty bitmap from an NBD export: SOURCE must be an NBD URI (for an image file, use --bitmap)".into(),
            ));
        }
        return Ok(None);
    }
    let uri = NbdUri::parse(&text).map_err(JobError::Usage)?;
    let refuse = |what: &str, why: &str| Err(JobError::Usage(format!("{what} {why}")));
    if cfg.bitmap.is_some() {
        return refuse(
            "--bitmap",
            "keeps a bitmap file beside an image file; for an NBD export, use QEMU's bitmap with --source-bitmap NAME",
        );
    }
    if cfg.bitmap_mode.is_some() {
        return refuse(
            "--bitmap-mode",
            "does not apply to an NBD export: imgbackup never changes QEMU's bitmap (see docs/live-vms.md)",
        );
    }
    if cfg.guest.is_some() {
        return refuse(
            "--guest",
            "simulates writes to an image file; an NBD export's writers are the server's",
        );
    }
    if cfg.source_format == Some(Format::Qcow2) {
        return refuse(
            "--format qcow2",
            "does not apply to an NBD export: the server reads the image's format and exports its guest-visible bytes (raw)",
        );
    }
    let sync_with_bitmap = cfg.sync.uses_bitmap();
    match (&cfg.source_bitmap, sync_with_bitmap) {
        (None, true) => {
            return refuse(
                &format!("--sync {}", cfg.sync),
                "of an NBD export needs --source-bitmap NAME (QEMU's dirty bitmap the export carries)",
            );
        }
        (Some(_), false) => {
            return refuse(
                "--source-bitmap",
                "selects what --sync incremental or bitmap copies; other sync modes read the whole export",
            );
        }
        _ => {}
    }
    if sync_with_bitmap && !matches!(cfg.backing, Backing::File(_)) {
        return refuse(
            &format!("--sync {}", cfg.sync),
            "of an NBD export needs --backing PARENT: the previous backup of the same export",
        );
    }
    Ok(Some(uri))
}

impl NbdSource {
    /// Connect to the export (selecting the bitmap's context), and the
    /// image the job reads: the export, whose top layer is its own
    /// allocation (what `--sync top` copies).
    pub fn open(uri: NbdUri, cfg: &BackupConfig) -> Result<(NbdSource, Image)> {
        let name = cfg.source.to_string_lossy().into_owned();
        let extra: Vec<String> = cfg
            .source_bitmap
            .iter()
            .map(|b| dirty_bitmap_context(b))
            .collect();
        // A server that never answers the handshake ends the job at its
        // --timeout (exit 9), as a silent one does later.
        let t0 = std::time::Instant::now();
        let opened = NbdNode::open(uri.clone(), &name, &extra, cfg.timeout);
        let node = match opened {
            Ok(n) => Arc::new(n),
            Err(_) if cfg.timeout.is_some_and(|t| t0.elapsed() >= t) => {
                return Err(JobError::Cancelled(crate::job::cancel::Reason::Timeout));
            }
            Err(e) => return Err(JobError::step("cannot connect to the NBD server", e)),
        };
        if let Some(b) = &cfg.source_bitmap
            && !node.has_context(&dirty_bitmap_context(b))
        {
            return Err(BitmapError::Parent {
                name: b.clone(),
                image: cfg.source.clone(),
                detail: format!(
                    "the server offers no metadata context {} (export the bitmap: qemu-nbd -B {b}, or the export's \"bitmaps\" in QMP block-export-add)",
                    dirty_bitmap_context(b)
                ),
            }
            .into());
        }
        let size = node.size();
        let info = LayerInfo {
            path: cfg.source.clone(),
            format: Format::Raw,
            virtual_size: size,
            cluster_size: node.cluster_size(),
            file_length: size,
            disk_usage: 0,
            backing_file: None,
            backing_format: None,
            qcow2_version: None,
        };
        let image = Image {
            node: node.clone(),
            layers: vec![Layer {
                info,
                node: node.allocation(),
            }],
        };
        Ok((NbdSource { uri, node }, image))
    }

    /// The export's identity as far as NBD tells it: its size.
    pub fn identity(&self) -> Identity {
        Identity {
            size: self.node.size(),
            mtime_sec: 0,
            mtime_nsec: 0,
            inode: 0,
            device: 0,
        }
    }

    /// QEMU's bitmap `name` as the clusters to copy (never changed here).
    pub fn dirty(&self, name: &str, source: &Path) -> Result<Bitmap> {
        let size = self.node.size();
        let ranges = self
            .node
            .dirty_ranges(name)
            .map_err(JobError::context(format!(
                "cannot read the dirty bitmap {name} of {}",
                source.display()
            )))?;
        let mut b = Bitmap::new(name, DEFAULT_GRANULARITY, size, self.identity());
        for (s, e) in &ranges {
            b.mark(*s, e - s);
        }
        let dirty: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        tracing::info!(
            "QEMU's bitmap {name}: {} dirty in {} range(s)",
            crate::report::human_bytes(dirty),
            ranges.len()
        );
        Ok(b)
    }

    /// The parent of an incremental: `--backing PARENT`, which must be a
    /// backup of the same export (its manifest says so) of the same size.
    pub fn parent(&self, cfg: &BackupConfig) -> Result<PathBuf> {
        let Backing::File(p) = &cfg.backing else {
            return Err(JobError::Internal(
                "an NBD incremental without --backing".into(),
            ));
        };
        let name = cfg.source_bitmap.clone().unwrap_or_default();
        let refuse = |detail: String| -> JobError {
            BitmapError::Parent {
                name: name.clone(),
                image: cfg.source.clone(),
                detail,
            }
            .into()
        };
        let m = ManifestFile::open(&crate::manifest::manifest_path(p)).map_err(|e| {
            refuse(format!(
                "--backing {} must be a backup of this export with its manifest: {e}",
                p.display()
            ))
        })?;
        m.check_bound(p).map_err(|e| {
            refuse(format!(
                "the manifest of --backing {} does not describe that file: {e}",
                p.display()
            ))
        })?;
        let same = NbdUri::parse(&m.meta.source).is_ok_and(|u| u == self.uri);
        if !same {
            return Err(refuse(format!(
                "--backing {} is a backup of {}, not of this export; an incremental builds on the previous backup of the same export",
                p.display(),
                m.meta.source
            )));
        }
        let size = self.node.size();
        if m.meta.virtual_size != size {
            return Err(refuse(format!(
                "--backing {} holds {} bytes, the export {size}: the disk was resized; take a full backup",
                p.display(),
                m.meta.virtual_size
            )));
        }
        Ok(p.clone())
    }
}
