//! `imgbackup guest IMAGE SPEC`: a simulated guest writing into the image
//! itself, marking every enabled bitmap beside it.
//!
//! The enabled bitmaps are marked in use on disk while the guest runs; every
//! write marks them (in memory) before it is issued; once the writes are
//! flushed the image's new identity is recorded in the bitmaps that were
//! consistent, and the bitmaps are saved with the in-use flag cleared. A
//! bitmap that was already inconsistent is marked but stays inconsistent.
//! Raw images, and qcow2 images through the in-place writer.

use crate::cli::{GlobalOpts, GuestArgs};
use crate::exit::Exit;
use crate::guest;
use crate::job::JobError;
use crate::lock::{Access, Locks};
use crate::node::probe::{Format, open_image, probe};
use crate::report::{human_bytes, print_json};
use anyhow::{Context, bail};
use std::sync::atomic::AtomicBool;

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
    let mut locks = Locks::new();
    locks.exclusive(image, args.lock.wait_lock)?;
    locks.qemu(image, Access::Write, false, args.lock.wait_lock)?;
    let img = open_image(image, Some(format)).context("cannot open the image")?;
    let size = img.node.size();
    // The enabled bitmaps, marked in use while we write.
    let tracked = super::marked::track_enabled(image, size)?;

    let raw = match super::marked::open_writable(image, format) {
        Ok(r) => r,
        Err(e) => {
            // Put the bitmaps back as they were (no longer in use).
            let _ = super::marked::save(image, &tracked, false, false);
            return Err(e);
        }
    };
    let node = super::marked::marking(raw.clone(), &tracked);
    let cancel = super::cancel_on_signals()?;
    let stop = AtomicBool::new(false);
    let stats = guest::run(&node, &args.spec, &stop, &cancel);
    let flushed = raw.close();
    // Save the bitmaps: marked, in use cleared, the new identity recorded
    // for those that were consistent.
    let names = super::marked::save(image, &tracked, flushed.is_ok(), false)?;
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
