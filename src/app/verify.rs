//! `imgbackup verify BACKUP [--against-image IMAGE]`.

use super::default_jobs;
use crate::cli::{GlobalOpts, VerifyArgs};
use crate::copy::CopyError;
use crate::exit::{AppError, Exit};
use crate::job::cancel::Cancel;
use crate::manifest::{ManifestError, ManifestFile, check_held, check_image, manifest_path};
use crate::node::probe::open_image;
use crate::report::print_json;
use anyhow::Context;
use std::path::Path;
use std::time::Instant;

#[derive(serde::Serialize)]
struct VerifyDoc {
    ok: bool,
    exit_code: i32,
    command: &'static str,
    backup: String,
    manifest: String,
    root_digest: String,
    chunks: u64,
    chunk_size: u64,
    against: Option<String>,
    elapsed_seconds: f64,
    /// Ranges the backup does not hold (skipped when it was made).
    incomplete: Vec<[u64; 2]>,
    /// For an incremental written with --no-backing (and not attached to
    /// its parent): the chunks it holds, which are all that was checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    detached_chunks_checked: Option<u64>,
}

/// The error for a detached incremental used as if it were whole.
pub fn detached_error(backup: &Path, m: &ManifestFile) -> anyhow::Error {
    let parent = m
        .meta
        .parent
        .as_ref()
        .map(|p| p.path.clone())
        .unwrap_or_else(|| "its parent backup".into());
    anyhow::anyhow!(
        "{} is an incremental written with --no-backing: it holds only the clusters that changed since {parent}; attach it first with `qemu-img rebase -u -F qcow2 -b {parent} {}`",
        backup.display(),
        backup.display()
    )
}

/// Run `imgbackup verify`.
pub fn run(args: &VerifyArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let t0 = Instant::now();
    let mpath = manifest_path(&args.backup);
    let manifest = ManifestFile::open(&mpath).map_err(|e| match e {
        ManifestError::Damaged { .. } => anyhow::Error::new(e).context(AppError::Verify(format!(
            "the manifest of {} is damaged",
            args.backup.display()
        ))),
        other => anyhow::Error::new(other),
    })?;
    let image = open_image(&args.backup, None).context("cannot open the backup")?;
    let size = image.node.size();
    if size != manifest.meta.virtual_size {
        return Err(AppError::Verify(format!(
            "the backup {} is {size} bytes, its manifest says {}: the backup is truncated or was replaced",
            args.backup.display(),
            manifest.meta.virtual_size
        ))
        .into());
    }
    // A manifest bound to another file can still match by content (a copy
    // of the backup); the content decides, the binding explains.
    let unbound = manifest.check_bound(&args.backup).err();
    let cancel = Cancel::new();
    cancel
        .install_signal_handlers()
        .context("cannot install the signal handlers")?;
    let jobs = args.jobs.unwrap_or_else(default_jobs);
    let detached = manifest.meta.detached && image.layers.len() == 1;
    let unreadable = |e: CopyError| match e {
        CopyError::Source(b) => {
            let at = b
                .offset()
                .map(|o| format!(" at offset {o}"))
                .unwrap_or_default();
            anyhow::Error::new(b).context(AppError::Verify(format!(
                "cannot read the backup {}{at} (truncated or damaged)",
                args.backup.display()
            )))
        }
        other => other.into(),
    };
    tracing::info!("phase: verify");
    let res = if detached {
        check_held(image.top().as_ref(), &manifest, jobs, &cancel).map(|(d, n)| (d, Some(n)))
    } else {
        check_image(image.node.as_ref(), &manifest, jobs, &cancel).map(|d| (d, None))
    };
    if let Some(r) = cancel.reason() {
        return Err(AppError::Cancelled(r).into());
    }
    let (diff, held) = res.map_err(unreadable)?;
    if let Some(d) = diff {
        let why = unbound
            .as_ref()
            .map(|u| format!("; {u}"))
            .unwrap_or_default();
        return Err(AppError::Verify(format!(
            "chunk {} at offset {} of the backup {} does not match its manifest (expected sha256 {}, found {}){why}",
            d.chunk,
            d.offset,
            args.backup.display(),
            d.expected,
            d.found
        ))
        .into());
    }
    if let Some(u) = &unbound {
        tracing::warn!(
            "{u}; its content matches the manifest all the same (a copy of the backup?)"
        );
    }
    if let Some(other) = &args.against_image {
        if detached {
            return Err(detached_error(&args.backup, &manifest));
        }
        let img =
            open_image(other, args.format).context("cannot open the image to compare with")?;
        let off = super::backup::first_difference(image.node.as_ref(), img.node.as_ref(), &cancel)?;
        if let Some(r) = cancel.reason() {
            return Err(AppError::Cancelled(r).into());
        }
        if let Some(off) = off {
            return Err(AppError::Mismatch {
                what: format!("the backup {}", args.backup.display()),
                against: format!("{}", other.display()),
                offset: off,
            }
            .into());
        }
    }
    let doc = VerifyDoc {
        ok: true,
        exit_code: 0,
        command: "verify",
        backup: args.backup.display().to_string(),
        manifest: mpath.display().to_string(),
        root_digest: manifest.meta.root_digest.clone(),
        chunks: manifest.meta.chunks,
        chunk_size: manifest.meta.chunk_size,
        against: args.against_image.as_ref().map(|p| p.display().to_string()),
        elapsed_seconds: t0.elapsed().as_secs_f64(),
        incomplete: manifest.meta.incomplete.clone(),
        detached_chunks_checked: held,
    };
    let exit = if doc.incomplete.is_empty() {
        Exit::Success
    } else {
        Exit::Skipped
    };
    let doc = VerifyDoc {
        ok: exit == Exit::Success,
        exit_code: exit.code(),
        ..doc
    };
    render(
        &doc,
        manifest.meta.parent.as_ref().map(|p| p.path.as_str()),
        g,
    )?;
    Ok(exit)
}

/// Print the result: the JSON document, or lines on stderr.
fn render(doc: &VerifyDoc, parent: Option<&str>, g: &GlobalOpts) -> anyhow::Result<()> {
    if g.json {
        print_json(&doc)?;
    } else if let Some(n) = doc.detached_chunks_checked {
        if !g.quiet {
            crate::errln!(
                "imgbackup: {}: the {n} chunks it holds match its manifest; it is an incremental written with --no-backing, so the rest of the image comes from {} once attached (`qemu-img rebase -u`)",
                doc.backup,
                parent.unwrap_or("its parent")
            );
        }
    } else if !g.quiet {
        crate::errln!(
            "imgbackup: {} is whole: {} chunks match its manifest (root {}){}",
            doc.backup,
            doc.chunks,
            doc.root_digest,
            doc.against
                .as_ref()
                .map(|a| format!(", and equals {a}"))
                .unwrap_or_default()
        );
    }
    if !doc.incomplete.is_empty() {
        crate::errln!(
            "imgbackup: warning: {} is incomplete: these ranges were skipped when it was made (ignore policy): {}",
            doc.backup,
            doc.incomplete
                .iter()
                .map(|r| format!("{}-{}", r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
