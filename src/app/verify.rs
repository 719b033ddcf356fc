//! `imgbackup verify BACKUP [--against IMAGE]`.

use super::default_jobs;
use crate::cli::{GlobalOpts, VerifyArgs};
use crate::copy::CopyError;
use crate::exit::{AppError, Exit};
use crate::manifest::{ManifestError, ManifestFile, check_image, manifest_path};
use crate::node::probe::open_image;
use crate::report::print_json;
use anyhow::Context;
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
}

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
    let jobs = args.jobs.unwrap_or_else(default_jobs);
    let diff = check_image(image.node.as_ref(), &manifest, jobs).map_err(|e| match e {
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
    })?;
    if let Some(d) = diff {
        return Err(AppError::Verify(format!(
            "chunk {} at offset {} of the backup {} does not match its manifest (expected sha256 {}, found {})",
            d.chunk,
            d.offset,
            args.backup.display(),
            d.expected,
            d.found
        ))
        .into());
    }
    if let Some(other) = &args.against {
        let img = open_image(other, args.against_format)
            .context("cannot open the image to compare with")?;
        if let Some(off) = super::backup::first_difference(image.node.as_ref(), img.node.as_ref())?
        {
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
        against: args.against.as_ref().map(|p| p.display().to_string()),
        elapsed_seconds: t0.elapsed().as_secs_f64(),
        incomplete: manifest.meta.incomplete.clone(),
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
    if g.json {
        print_json(&doc)?;
    } else if !g.quiet {
        eprintln!(
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
    if exit == Exit::Skipped {
        eprintln!(
            "imgbackup: warning: {} is incomplete: these ranges were skipped when it was made (ignore policy): {}",
            doc.backup,
            doc.incomplete
                .iter()
                .map(|r| format!("{}-{}", r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(exit)
}
