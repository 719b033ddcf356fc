//! `imgbackup restore BACKUP OUTPUT`: flatten a backup and its chain into a
//! new image, checking every chunk against the manifest on the way.

use super::backup::check_output;
use super::default_jobs;
use crate::bitmap::Bits;
use crate::cli::{GlobalOpts, ProgressMode, RestoreArgs};
use crate::copy::{BlockCopy, ChunkObserver, Config, CopyError};
use crate::exit::{AppError, Exit};
use crate::job::cancel::Cancel;
use crate::job::policy::Policies;
use crate::job::{PolicyLog, run_background};
use crate::manifest::{ManifestChecker, ManifestError, ManifestFile, manifest_path};
use crate::node::probe::{Format, format_for, open_image};
use crate::report::{Reporter, human_bytes, human_duration, print_json};
use crate::target::{Output, Partial};
use anyhow::{Context, bail};
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

pub fn run(args: &RestoreArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let t0 = Instant::now();
    let image = open_image(&args.backup, None).context("cannot open the backup")?;
    let size = image.node.size();
    let format = args
        .format
        .unwrap_or_else(|| format_for(&args.output, Format::Raw));
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
    if let Some(m) = &manifest
        && m.meta.virtual_size != size
    {
        return Err(AppError::Verify(format!(
            "the backup {} is {size} bytes, its manifest says {}: the backup is truncated or was replaced",
            args.backup.display(),
            m.meta.virtual_size
        ))
        .into());
    }
    check_output(&args.output, &image, args.force, "output")?;
    if format == Format::Qcow2 && args.cluster_size > (2 << 20) {
        bail!(
            "--cluster-size {} is larger than qcow2 allows (2M)",
            args.cluster_size
        );
    }
    let chunk = manifest.as_ref().map(|m| m.meta.chunk_size).unwrap_or(1);
    let out_cs = if format == Format::Qcow2 {
        args.cluster_size
    } else {
        65536
    };
    let cluster = out_cs.max(chunk).max(65536);
    let root = manifest.as_ref().map(|m| m.meta.root_digest.clone());

    let cancel = Cancel::new();
    cancel
        .install_signal_handlers()
        .context("cannot install the signal handlers")?;
    let partial = Partial::new(&args.output, args.keep_partial);
    let output =
        Output::create(partial.path(), format, size, out_cs, None).map_err(CopyError::Target)?;
    let node = output.node();
    let verified = manifest.is_some();
    let observer: Option<Arc<dyn ChunkObserver>> =
        manifest.map(|m| Arc::new(ManifestChecker::new(m)) as Arc<dyn ChunkObserver>);
    let bc = Arc::new(BlockCopy::new(
        image.node.clone(),
        node.clone(),
        Config {
            cluster_size: cluster,
            max_chunk: (2 << 20u64).max(cluster),
            write_zeroes: false,
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
        g.progress,
        g.quiet || g.json && g.progress == ProgressMode::Auto,
        "restore",
        Arc::new(move || {
            (
                counter.progress.done.load(Ordering::Relaxed),
                counter.progress.total.load(Ordering::Relaxed),
            )
        }),
    );
    let res = run_background(
        &bc,
        args.jobs.unwrap_or_else(default_jobs),
        &cancel,
        &Policies::default(),
        &PolicyLog::default(),
    );
    reporter.finish();
    res.context("the restore failed")?;
    output
        .complete()
        .map_err(CopyError::Target)
        .with_context(|| format!("cannot complete {}", partial.path().display()))?;
    if let Some(r) = cancel.reason() {
        return Err(AppError::Cancelled(r).into());
    }
    partial.commit().with_context(|| {
        format!(
            "cannot rename the restored image to {}",
            args.output.display()
        )
    })?;
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
    if g.json {
        print_json(&doc)?;
    } else if !g.quiet {
        eprintln!(
            "imgbackup: restored {} -> {} ({}, {}{}): {} written, {} zero, {}",
            doc.backup,
            doc.output,
            format,
            human_bytes(size),
            if verified {
                ", every chunk matches the manifest"
            } else {
                ", not checked (--no-verify)"
            },
            human_bytes(doc.bytes_written),
            human_bytes(doc.bytes_zero),
            human_duration(doc.elapsed_seconds)
        );
    }
    Ok(Exit::Success)
}
