//! The verify job: recompute the digests of a backup (through its chain)
//! and compare them with its manifest; optionally compare its content with
//! an image.

use super::JobError;
use super::cancel::Cancel;
use super::error::Result;
use crate::copy::CopyError;
use crate::manifest::{ManifestError, ManifestFile, check_backup, check_held, manifest_path};
use crate::node::probe::{Format, open_image};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a verification checks.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The backup (its manifest is BACKUP.manifest).
    pub backup: PathBuf,
    /// Also compare its content with this image.
    pub against_image: Option<PathBuf>,
    /// The image's format (None: probed).
    pub format: Option<Format>,
    /// Hashing workers (None: the number of CPUs).
    pub jobs: Option<usize>,
    /// The backup's parent (its manifest's, the next layer of its chain)
    /// was verified already: the chunks read from it are not read again.
    pub parent_verified: bool,
}

/// The result of a verification (the `--json` document).
#[derive(Debug, serde::Serialize)]
pub struct VerifySummary {
    /// With a parent verified before (`list --verify`): the chunks
    /// checked, the rest being the parent's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks_checked_over_parent: Option<u64>,
    /// True when the backup is whole (nothing skipped when it was made).
    pub ok: bool,
    /// 0, or 3 when the backup records skipped ranges.
    pub exit_code: i32,
    /// "verify".
    pub command: &'static str,
    /// The backup.
    pub backup: String,
    /// Its manifest.
    pub manifest: String,
    /// The manifest's root digest (None for a `--sync top` manifest, whose
    /// root is not recorded: its backing chunks are checked by identity).
    pub root_digest: Option<String>,
    /// A `--sync top` backup: the chunks taken from the backing file, and
    /// the file, found unchanged since the backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_chunks: Option<u64>,
    /// The backing file those chunks come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Number of chunks.
    pub chunks: u64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The image compared with.
    pub against: Option<String>,
    /// Wall-clock time.
    pub elapsed_seconds: f64,
    /// Ranges the backup does not hold (skipped when it was made).
    pub incomplete: Vec<[u64; 2]>,
    /// For an incremental written with --no-backing (and not attached to
    /// its parent): the chunks it holds, which are all that was checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detached_chunks_checked: Option<u64>,
    /// The backup the rest of a detached incremental comes from.
    #[serde(skip)]
    pub parent: Option<String>,
}

/// The error for a detached incremental used as if it were whole.
pub fn detached_error(backup: &Path, m: &ManifestFile) -> JobError {
    let parent = m
        .meta
        .parent
        .as_ref()
        .map(|p| p.path.clone())
        .unwrap_or_else(|| "its parent backup".into());
    JobError::Refused(format!(
        "{} is an incremental written with --no-backing: it holds only the clusters that changed since {parent}; attach it first with `qemu-img rebase -u -F qcow2 -b {parent} {}`",
        backup.display(),
        backup.display()
    ))
}

/// Verify the backup of `cfg`; `cancel` stops it between batches.
pub fn verify(cfg: &VerifyConfig, cancel: &Cancel) -> Result<VerifySummary> {
    let t0 = Instant::now();
    let mpath = manifest_path(&cfg.backup);
    let manifest = ManifestFile::open(&mpath).map_err(|e| match e {
        ManifestError::Damaged { .. } => JobError::Verify(format!(
            "the manifest of {} is damaged: {e}",
            cfg.backup.display()
        )),
        other => other.into(),
    })?;
    let mut image =
        open_image(&cfg.backup, None).map_err(JobError::context("cannot open the backup"))?;
    // Nothing writes to a backup being verified.
    crate::manifest::ready_to_check(&mut image, Some(&manifest));
    let size = image.node.size();
    if size != manifest.meta.virtual_size {
        return Err(JobError::Verify(format!(
            "the backup {} is {size} bytes, its manifest says {}: the backup is truncated or was replaced",
            cfg.backup.display(),
            manifest.meta.virtual_size
        )));
    }
    // A manifest bound to another file can still match by content (a copy
    // of the backup); the content decides, the binding explains.
    let unbound = manifest.check_bound(&cfg.backup).err();
    let jobs = cfg.jobs.unwrap_or_else(super::backup::default_jobs);
    let detached = manifest.meta.detached && image.layers.len() == 1;
    let unreadable = |e: CopyError| match e {
        CopyError::Source(b) => {
            let at = b
                .offset()
                .map(|o| format!(" at offset {o}"))
                .unwrap_or_default();
            JobError::Verify(format!(
                "cannot read the backup {}{at} (truncated or damaged): {b}",
                cfg.backup.display()
            ))
        }
        other => other.into(),
    };
    tracing::info!("phase: verify");
    let over_parent = cfg.parent_verified && !detached && parent_is_next_layer(&image, &manifest);
    let mut checked = None;
    let res = if detached {
        check_held(image.top().as_ref(), &manifest, jobs, cancel).map(|(d, n)| (d, Some(n)))
    } else if over_parent {
        crate::manifest::check_over_verified_parent(&image, &manifest, jobs, cancel).map(
            |(d, n)| {
                checked = Some(n);
                (d, None)
            },
        )
    } else {
        check_backup(&image, &manifest, jobs, cancel).map(|d| (d, None))
    };
    if let Some(r) = cancel.reason() {
        return Err(JobError::Cancelled(r));
    }
    let (diff, held) = res.map_err(unreadable)?;
    if let Some(d) = diff {
        let why = unbound
            .as_ref()
            .map(|u| format!("; {u}"))
            .unwrap_or_default();
        return Err(JobError::Verify(format!(
            "chunk {} at offset {} of the backup {} does not match its manifest (expected {} {}, found {}){why}",
            d.chunk,
            d.offset,
            cfg.backup.display(),
            manifest.algo(),
            d.expected,
            d.found
        )));
    }
    if let Some(u) = &unbound {
        tracing::warn!(
            "{u}; its content matches the manifest all the same (a copy of the backup?)"
        );
    }
    if let Some(other) = &cfg.against_image {
        if detached {
            return Err(detached_error(&cfg.backup, &manifest));
        }
        let img = open_image(other, cfg.format)
            .map_err(JobError::context("cannot open the image to compare with"))?;
        let off = crate::compare::first_difference(image.node.as_ref(), img.node.as_ref(), cancel)?;
        if let Some(r) = cancel.reason() {
            return Err(JobError::Cancelled(r));
        }
        if let Some(off) = off {
            return Err(JobError::Mismatch {
                what: format!("the backup {}", cfg.backup.display()),
                against: format!("{}", other.display()),
                offset: off,
            });
        }
    }
    let incomplete = manifest.meta.incomplete.clone();
    let root_digest = manifest
        .meta
        .root_known()
        .then(|| manifest.meta.root_digest.clone());
    let backing_chunks = (manifest.backing_chunks() > 0).then(|| manifest.backing_chunks());
    Ok(VerifySummary {
        ok: incomplete.is_empty(),
        exit_code: if incomplete.is_empty() { 0 } else { 3 },
        command: "verify",
        backup: cfg.backup.display().to_string(),
        manifest: mpath.display().to_string(),
        root_digest,
        backing_chunks,
        backing_file: manifest
            .meta
            .backing_files
            .first()
            .filter(|_| backing_chunks.is_some())
            .map(|b| b.path.clone()),
        chunks: manifest.meta.chunks,
        chunk_size: manifest.meta.chunk_size,
        against: cfg.against_image.as_ref().map(|p| p.display().to_string()),
        elapsed_seconds: t0.elapsed().as_secs_f64(),
        incomplete,
        detached_chunks_checked: held,
        parent: manifest.meta.parent.as_ref().map(|p| p.path.clone()),
        chunks_checked_over_parent: checked,
    })
}

/// True when the next layer of the backup's chain is the parent its
/// manifest names.
fn parent_is_next_layer(image: &crate::node::probe::Image, m: &ManifestFile) -> bool {
    match (image.layers.get(1), &m.meta.parent) {
        // ...and its manifest is the one this manifest was made against
        // (same root digest), whose digests its parent runs stand for.
        (Some(l), Some(p)) => {
            crate::files::same_file(&l.info.path, std::path::Path::new(&p.path))
                && m.parent().is_ok()
        }
        _ => false,
    }
}
