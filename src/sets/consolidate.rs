//! Consolidation: the point-in-time image of a backup (read through its
//! chain) written as a self-contained qcow2 with a manifest of the same
//! root digest — in place for `prune` (a kept backup whose parents go), or
//! into a new file for `imgbackup consolidate` (a synthetic full backup
//! that never reads the source again).
//!
//! In place, BACKUP is rewritten so that at every moment it stays
//! restorable and its children's backing links stay valid:
//!
//! 1. the copy is made by a backup job into `BACKUP.partial` (with its
//!    own manifest), and its root digest must be BACKUP's;
//! 2. BACKUP's manifest is rewritten with no parent and bound to the copy
//!    (written beside, renamed over it): BACKUP's content still matches it
//!    (the content decides; the binding only explains);
//! 3. the copy is renamed over BACKUP, and the copy's own manifest removed;
//! 4. bitmaps anchored to BACKUP are re-anchored to the new file (same
//!    root digest, new inode).
//!
//! Each step finds where the one before stopped, so a rerun after a kill
//! finishes the job (`prune`, `list --repair`).

use crate::job::JobError;
use crate::job::backup::{Backing, BackupConfig, BackupJob, Summary};
use crate::job::cancel::Cancel;
use crate::job::error::Result;
use crate::job::policy::Policies;
use crate::manifest::{FileBinding, ManifestFile, Meta, manifest_path, unhex};
use crate::node::cbw::OnCbwError;
use crate::node::probe::{Format, format_for};
use crate::node::qcow2::Compression;
use std::path::{Path, PathBuf};

/// Where an in-place consolidation writes its copy: `BACKUP.partial`
/// (SPEC §10), renamed over BACKUP once its manifest is in place.
pub fn copy_path(backup: &Path) -> PathBuf {
    crate::target::partial_path(backup)
}

/// Where the rewritten manifest is written before it is renamed over
/// BACKUP's.
fn manifest_temp(backup: &Path) -> PathBuf {
    crate::target::partial_path(&manifest_path(backup))
}

fn io_step(what: String) -> impl FnOnce(std::io::Error) -> JobError {
    move |e| JobError::step(what, e)
}

/// The manifest of `backup`, which must be readable.
fn manifest_of(backup: &Path) -> Result<ManifestFile> {
    ManifestFile::open(&manifest_path(backup)).map_err(|e| {
        JobError::Refused(format!(
            "{} cannot be consolidated: its manifest cannot be used ({e})",
            backup.display()
        ))
    })
}

/// The job that copies `backup` (through its chain) into `target`.
fn job_config(
    backup: &Path,
    target: &Path,
    m: &ManifestFile,
    format: Format,
    directory_lock: bool,
    force: bool,
) -> Result<BackupConfig> {
    // The copy keeps the backup's cluster size and compression.
    let (cluster, compress) = match crate::node::qcow2::Qcow2Layer::open(backup) {
        Ok(l) => {
            let compressed = l.any_compressed().map_err(JobError::context(format!(
                "cannot read {}",
                backup.display()
            )))?;
            let c = compressed.then(|| match l.header().compression_type {
                1 => Compression::Zstd(3),
                _ => Compression::default(),
            });
            (l.header().cluster_size(), c)
        }
        Err(_) => (64 << 10, None),
    };
    let chunk = m.meta.chunk_size;
    let (target_cs, granularity) = if chunk < (64 << 10) {
        (cluster.min(chunk), Some(chunk))
    } else {
        (cluster.min(2 << 20), None)
    };
    Ok(BackupConfig {
        source: backup.to_path_buf(),
        source_format: None,
        target: target.to_path_buf(),
        target_format: Some(format),
        target_cluster_size: target_cs,
        // A full copy (the default mode) of what BACKUP holds.
        sync: Default::default(),
        bitmap: None,
        source_bitmap: None,
        bitmap_mode: None,
        backing: Backing::Nothing,
        granularity,
        compress: if format == Format::Qcow2 {
            compress
        } else {
            None
        },
        jobs: None,
        max_chunk: None,
        speed: None,
        timeout: None,
        force,
        keep_partial: false,
        guest: None,
        guest_overlay: None,
        on_cbw_error: OnCbwError::BreakGuestWrite,
        cbw_timeout: None,
        cbw_cache: None,
        verify: false,
        policies: Policies::default(),
        force_share: false,
        wait_lock: None,
        manifest: true,
        digest: Some(m.algo()),
        inject: Vec::new(),
        directory_lock,
        // A backup: nothing writes to it.
        unchanging_source: true,
    })
}

fn run_job(cfg: BackupConfig, cancel: &Cancel) -> Result<Summary> {
    let job = BackupJob::prepare(cfg)?;
    let mut running = job.start(cancel.clone())?;
    if let Err(e) = running.run() {
        return Err(running.abort(e));
    }
    running.commit()
}

/// The copy's manifest must describe the same point-in-time image.
fn check_same(original: &ManifestFile, copy: &ManifestFile, what: &Path) -> Result<()> {
    let want = &original.meta.root_digest;
    let got = &copy.meta.root_digest;
    if unhex(want).is_none() || want != got {
        return Err(JobError::Verify(format!(
            "{} read through its chain has root digest {got}, its manifest says {want}: the chain does not hold what was backed up; nothing was changed",
            what.display()
        )));
    }
    Ok(())
}

/// `copy`'s metadata (its counts and file binding) describing the backup
/// as `original` did, with no parent.
fn merged_meta(original: &Meta, copy: &Meta) -> Meta {
    let mut m = copy.clone();
    m.source = original.source.clone();
    m.source_format = original.source_format.clone();
    m.sync = original.sync.clone();
    m.bitmap = original.bitmap.clone();
    m.started = original.started.clone();
    m.finished = original.finished.clone();
    m.incomplete = original.incomplete.clone();
    m.parent = None;
    m.detached = false;
    m.backing_files = Vec::new();
    m
}

/// `imgbackup consolidate BACKUP OUTPUT`: a new self-contained backup of
/// BACKUP's point-in-time image, with its own manifest (same root digest,
/// BACKUP's source and times, no parent).
pub fn synthetic_full(
    backup: &Path,
    output: &Path,
    force: bool,
    cancel: &Cancel,
) -> Result<Summary> {
    let m = manifest_of(backup)?;
    if !m.meta.root_known() {
        return Err(JobError::Refused(format!(
            "{} has no root digest yet (a --sync top backup); verify it first",
            backup.display()
        )));
    }
    let format = format_for(output, Format::Qcow2);
    let cfg = job_config(backup, output, &m, format, true, force)?;
    let mut summary = run_job(cfg, cancel)?;
    let copy = manifest_of(output)?;
    if let Err(e) = check_same(&m, &copy, backup) {
        let _ = std::fs::remove_file(manifest_path(output));
        let _ = std::fs::remove_file(output);
        return Err(e);
    }
    let meta = merged_meta(&m.meta, &copy.meta);
    let tmp = manifest_temp(output);
    let _ = std::fs::remove_file(&tmp);
    copy.rewrite_meta(&meta, &tmp)?;
    std::fs::rename(&tmp, manifest_path(output))
        .map_err(io_step(format!("cannot rename {}", tmp.display())))?;
    crate::files::sync_dir(output).map_err(io_step(format!(
        "cannot sync the directory of {}",
        output.display()
    )))?;
    summary.source = backup.display().to_string();
    Ok(summary)
}

/// Rewrite `backup` (a file of the directory `prune` holds locked) as a
/// self-contained qcow2, or finish a rewrite a kill interrupted.
pub fn in_place(backup: &Path, cancel: &Cancel) -> Result<()> {
    let copy = copy_path(backup);
    let copy_manifest = manifest_path(&copy);
    let m = manifest_of(backup)?;
    // Where did an earlier run stop?
    let manifest_on_copy = copy.exists() && m.check_bound(&copy).is_ok();
    if !manifest_on_copy {
        if m.meta.parent.is_none() && !copy.exists() {
            // Done (or never needed): leftovers of step 3 go.
            remove_if_present(&copy_manifest)?;
            return reanchor(backup, &m.meta);
        }
        if !copy.exists() || ManifestFile::open(&copy_manifest).is_err() {
            // Step 1, from the start (a killed job leaves only partials).
            for p in [copy.clone(), copy_manifest.clone()] {
                remove_if_present(&p)?;
                remove_if_present(&crate::target::partial_path(&p))?;
            }
            tracing::info!("consolidating {}", backup.display());
            let cfg = job_config(backup, &copy, &m, Format::Qcow2, false, false)?;
            run_job(cfg, cancel)?;
        }
        // Step 2.
        let cm = manifest_of(&copy)?;
        if let Err(e) = check_same(&m, &cm, backup) {
            remove_if_present(&copy_manifest)?;
            remove_if_present(&copy)?;
            return Err(e);
        }
        let meta = merged_meta(&m.meta, &cm.meta);
        let tmp = manifest_temp(backup);
        remove_if_present(&tmp)?;
        cm.rewrite_meta(&meta, &tmp)?;
        std::fs::rename(&tmp, manifest_path(backup))
            .map_err(io_step(format!("cannot rename {}", tmp.display())))?;
        crate::files::sync_dir(backup).map_err(io_step(format!(
            "cannot sync the directory of {}",
            backup.display()
        )))?;
    }
    // Step 3.
    std::fs::rename(&copy, backup).map_err(io_step(format!("cannot rename {}", copy.display())))?;
    crate::files::sync_dir(backup).map_err(io_step(format!(
        "cannot sync the directory of {}",
        backup.display()
    )))?;
    remove_if_present(&copy_manifest)?;
    // Step 4 (the source and root digest are the ones read at the start).
    reanchor(backup, &m.meta)
}

fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => crate::files::sync_dir(p).map_err(io_step(format!(
            "cannot sync the directory of {}",
            p.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JobError::step(format!("cannot remove {}", p.display()), e)),
    }
}

/// Bitmaps beside the backup's source anchored to `backup` with its root
/// digest but another file identity (the file before consolidation) are
/// anchored to the file as it is now.
fn reanchor(backup: &Path, meta: &Meta) -> Result<()> {
    if crate::nbd::client::is_uri(&meta.source) {
        return Ok(());
    }
    let source = Path::new(&meta.source);
    let Ok(names) = crate::bitmap::file::list_names(source) else {
        return Ok(());
    };
    let Some(root) = unhex(&meta.root_digest) else {
        return Ok(());
    };
    let now = FileBinding::of_path(backup)
        .map_err(io_step(format!("cannot stat {}", backup.display())))?;
    for name in names {
        let Ok(mut b) = crate::bitmap::Bitmap::load(source, &name) else {
            continue;
        };
        let Some(a) = b.anchor.as_mut() else { continue };
        if !crate::files::same_file(&a.path, backup) && a.path != backup {
            continue;
        }
        if a.root != root
            || a.file
                .as_ref()
                .is_some_and(|f| f.difference(&now).is_none())
        {
            continue;
        }
        // The source's lock: no backup of it may save this bitmap meanwhile.
        let mut locks = crate::lock::Locks::new();
        locks.exclusive(source, Some(std::time::Duration::from_secs(60)))?;
        a.file = Some(now);
        b.save(source)?;
        tracing::info!(
            "bitmap {name} of {} anchored to the consolidated {}",
            source.display(),
            backup.display()
        );
    }
    Ok(())
}
