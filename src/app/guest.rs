//! `imgbackup guest IMAGE SPEC`: a simulated guest writing into the image
//! itself, marking every enabled bitmap beside it.
//!
//! The enabled bitmaps are marked in use on disk while the guest runs; every
//! write marks them (in memory) before it is issued; once the writes are
//! flushed the image's new identity is recorded in the bitmaps that were
//! consistent, and the bitmaps are saved with the in-use flag cleared. A
//! bitmap that was already inconsistent is marked but stays inconsistent.
//! Raw images only: imgbackup writes qcow2 files only when it creates them.

use crate::bitmap::file::list_names;
use crate::bitmap::{Bitmap, Identity};
use crate::cli::{GlobalOpts, GuestArgs};
use crate::error::{BlockError, Op};
use crate::exit::Exit;
use crate::guest;
use crate::job::JobError;
use crate::lock::{Access, Locks};
use crate::node::BlockNode;
use crate::node::marking::MarkingNode;
use crate::node::probe::{Format, open_image, probe};
use crate::node::raw::RawNode;
use crate::report::{human_bytes, print_json};
use anyhow::{Context, bail};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Bitmaps being marked, and whether each was consistent when loaded.
type Tracked = Arc<Mutex<Vec<(Bitmap, bool)>>>;

/// Run `imgbackup guest`.
pub fn run(args: &GuestArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let image = &args.image;
    if !args.spec.is_bounded() {
        return Err(JobError::Usage(
            "the guest SPEC needs count= or duration= (it writes into the image itself)".into(),
        )
        .into());
    }
    let probed = probe(image).context("cannot open the image")?;
    let format = args.format.map(Format::from).unwrap_or(probed);
    if format == Format::Raw && probed == Format::Qcow2 {
        bail!(
            "{}: --format raw, but the file is a qcow2 image (it starts with the qcow2 magic); writing into it as raw would destroy its metadata",
            image.display()
        );
    }
    if crate::files::check_image_path(image)? == crate::files::Kind::Block {
        bail!(
            "{}: the guest command writes regular raw files only (a block device has no place for bitmaps beside it)",
            image.display()
        );
    }
    if format != Format::Raw {
        bail!(
            "{}: guest writes into {format} images are not supported (imgbackup writes qcow2 files only when it creates them); use a raw image, or `backup --guest`, which writes into an overlay",
            image.display()
        );
    }
    let mut locks = Locks::new();
    locks.exclusive(image, args.lock.wait_lock)?;
    locks.qemu(image, Access::Write, false, args.lock.wait_lock)?;
    for t in crate::bitmap::file::remove_stale_temps(image) {
        tracing::info!(
            "removed a bitmap temporary file left by a killed run: {}",
            t.display()
        );
    }
    let img = open_image(image, Some(format)).context("cannot open the image")?;
    let size = img.node.size();
    let before = Identity::of(image).with_context(|| format!("cannot stat {}", image.display()))?;

    // The enabled bitmaps, marked in use while we write.
    let mut tracked = Vec::new();
    for name in list_names(image)
        .with_context(|| format!("cannot list the bitmaps of {}", image.display()))?
    {
        match Bitmap::load(image, &name) {
            Ok(b) if b.enabled => {
                let consistent = b.inconsistency(size, &before).is_none();
                if !consistent {
                    tracing::warn!(
                        "bitmap '{name}' of {} is already inconsistent; it is marked but stays inconsistent",
                        image.display()
                    );
                }
                let mut b = b;
                b.in_use = true;
                b.save(image)?;
                tracked.push((b, consistent));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("skipping bitmap '{name}': {e}"),
        }
    }
    let tracked: Tracked = Arc::new(Mutex::new(tracked));

    let (file, _) = crate::files::open_image_file(image, true).map_err(|e| match e {
        crate::files::KindError::Io { source, .. } => BlockError::io(Op::Open, image, 0, 0, source),
        other => BlockError::Invalid {
            path: image.clone(),
            detail: other.to_string(),
        },
    })?;
    let raw: Arc<dyn BlockNode> = Arc::new(RawNode::from_file(image, file, true)?);
    let marks = tracked.clone();
    let node = MarkingNode::new(
        raw.clone(),
        Arc::new(move |offset, len| {
            if let Ok(mut v) = marks.lock() {
                for (b, _) in v.iter_mut() {
                    b.mark(offset, len);
                }
            }
        }),
    );
    let cancel = super::cancel_on_signals()?;
    let stop = AtomicBool::new(false);
    let stats = guest::run(&node, &args.spec, &stop, &cancel);
    let flushed = raw.flush();
    let after = Identity::of(image).with_context(|| format!("cannot stat {}", image.display()))?;

    // Save the bitmaps: marked, in use cleared, the new identity recorded
    // for those that were consistent.
    let mut names = Vec::new();
    let list = match tracked.lock() {
        Ok(v) => v.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for (mut b, consistent) in list {
        if consistent && flushed.is_ok() {
            b.identity = after;
        }
        if !consistent {
            b.inconsistent = true;
        }
        b.in_use = false;
        b.save(image)?;
        names.push(b.name.clone());
    }
    flushed.context("cannot flush the image")?;
    if let Some(r) = cancel.reason() {
        return Err(JobError::Cancelled(r).into());
    }
    let report = stats.report();
    if g.json {
        print_json(&serde_json::json!({
            "ok": stats.failed == 0,
            "exit_code": if stats.failed == 0 { 0 } else { 1 },
            "command": "guest",
            "image": image.display().to_string(),
            "bitmaps_marked": names,
            "guest": report,
        }))?;
    } else if !g.quiet {
        crate::errln!(
            "imgbackup: guest wrote {} writes ({} zero), {} into {}; marked bitmaps: {}",
            report.writes,
            report.zero_writes,
            human_bytes(report.bytes),
            image.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    if stats.failed > 0 {
        bail!(
            "{} guest writes failed; first: {}",
            stats.failed,
            stats.first_error.unwrap_or_default()
        );
    }
    Ok(Exit::Success)
}
