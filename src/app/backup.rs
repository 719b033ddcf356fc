//! `imgbackup backup SOURCE TARGET`: the arguments become a
//! [`BackupConfig`], the library's [`BackupJob`] runs it, and this module
//! renders the result (a bar or plain lines while it runs; a summary on
//! stderr or the `--json` document at the end).

use crate::cli::{BackupArgs, GlobalOpts, ProgressMode};
use crate::exit::Exit;
use crate::job::backup::{Backing, BackupConfig, BackupJob, DryRun, Summary};
use crate::job::policy::Policies;
use crate::node::cbw::OnCbwError;
use crate::report::{Reporter, human_bytes, human_duration, print_json};

impl From<&BackupArgs> for BackupConfig {
    fn from(a: &BackupArgs) -> BackupConfig {
        BackupConfig {
            source: a.source.clone(),
            source_format: a.format.map(Into::into),
            target: a.target.clone(),
            target_format: a.output_format.map(Into::into),
            target_cluster_size: a.output_cluster_size,
            sync: a.sync.into(),
            bitmap: a.bitmap.clone(),
            bitmap_mode: a.bitmap_mode.map(Into::into),
            backing: match (&a.backing, a.no_backing) {
                (_, true) => Backing::Nothing,
                (Some(b), false) => Backing::File(b.clone()),
                (None, false) => Backing::Default,
            },
            granularity: a.granularity,
            compress: a.compress,
            jobs: a.jobs,
            max_chunk: a.max_chunk,
            speed: a.speed,
            timeout: a.timeout,
            force: a.force,
            keep_partial: a.keep_partial,
            guest: a.guest.clone(),
            guest_overlay: a.guest_overlay.clone(),
            on_cbw_error: a
                .on_cbw_error
                .map(Into::into)
                .unwrap_or(OnCbwError::BreakGuestWrite),
            cbw_timeout: a.cbw_timeout,
            cbw_cache: a.cbw_cache,
            verify: a.verify,
            policies: Policies {
                source: a.on_source_error.into(),
                target: a.on_target_error.into(),
                retries: a.retries,
                delay: a.retry_delay,
                max_delay: a.retry_max_delay,
            },
            force_share: a.force_share,
            wait_lock: a.wait_lock,
            manifest: !a.no_manifest,
            digest: a.digest.map(Into::into),
            inject: a.inject.clone(),
        }
    }
}

/// Run `imgbackup backup`.
pub fn run(args: &BackupArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let job = BackupJob::prepare(BackupConfig::from(args))?;
    if args.dry_run {
        let (summary, d) = job.dry_run()?;
        render_dry_run(&summary, &d, g)?;
        return Ok(Exit::Success);
    }
    let cancel = super::cancel_on_signals()?;
    let mut running = job.start(cancel)?;
    let progress = args.progress.progress;
    let reporter = Reporter::start(
        progress,
        g.quiet || g.json && progress == ProgressMode::Auto,
        "backup",
        running.progress(),
    );
    let result = running.run();
    reporter.finish();
    if let Err(e) = result {
        return Err(running.abort(e).into());
    }
    let summary = running.commit()?;
    if g.json {
        print_json(&summary)?;
    } else if !g.quiet {
        print_human(&summary);
    }
    if !summary.ignored_ranges.is_empty() {
        crate::errln!(
            "imgbackup: warning: the backup is incomplete: {} range(s) were skipped by an ignore policy (they stay to be copied): {}",
            summary.ignored_ranges.len(),
            summary
                .ignored_ranges
                .iter()
                .map(|r| format!("{}-{}", r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(Exit::Skipped);
    }
    Ok(Exit::Success)
}

/// Print (or return as JSON) what a backup would copy.
fn render_dry_run(s: &Summary, d: &DryRun, g: &GlobalOpts) -> anyhow::Result<()> {
    if g.json {
        return print_json(s);
    }
    if g.quiet {
        return Ok(());
    }
    let backing = s
        .backing
        .as_ref()
        .map(|b| format!(", backed by {b}"))
        .unwrap_or_default();
    match s.sync.copies_in_background() {
        false => crate::errln!(
            "imgbackup: dry run: {} backup of {} into {}{backing} would copy only the clusters the guest overwrites. Nothing was written.",
            s.sync.article(),
            s.source,
            s.target
        ),
        true => crate::errln!(
            "imgbackup: dry run: {} backup of {} into {} ({}{backing}) would examine {} clusters of {}: {} hold data ({} to read and write), the rest read as zeros ({}, not written as data){}. Nothing was written.",
            s.sync.article(),
            s.source,
            s.target,
            s.target_format,
            d.clusters,
            human_bytes(s.cluster_size),
            d.data_clusters,
            human_bytes(d.data),
            human_bytes(d.zero),
            if s.bytes_clean > 0 {
                format!("; {} are clean and not copied", human_bytes(s.bytes_clean))
            } else {
                String::new()
            }
        ),
    }
    Ok(())
}

fn print_human(s: &Summary) {
    crate::errln!(
        "imgbackup: backup {} -> {} ({}, sync {}) {}{}",
        s.source,
        s.target,
        s.target_format,
        s.sync,
        if s.ignored_ranges.is_empty() {
            "complete"
        } else {
            "finished with skipped ranges"
        },
        if s.verified { ", verified" } else { "" }
    );
    crate::errln!(
        "  target:            {} ({} on disk)",
        s.target,
        human_bytes(s.target_disk_usage)
    );
    crate::errln!("  copied:            {}", human_bytes(s.bytes_copied));
    if s.retries > 0 {
        crate::errln!("  retries:           {}", s.retries);
    }
    if !s.ignored_ranges.is_empty() {
        crate::errln!(
            "  skipped:           {} (ignored errors)",
            s.ignored_ranges
                .iter()
                .map(|r| format!("{}-{}", r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    crate::errln!(
        "  zero:              {} (not written as data)",
        human_bytes(s.bytes_skipped_zero)
    );
    if s.bytes_clean > 0 {
        crate::errln!(
            "  clean:             {} (not copied: {})",
            human_bytes(s.bytes_clean),
            s.sync.clean_means()
        );
    }
    print_guest(s);
    if let Some(r) = &s.manifest_root_digest {
        crate::errln!("  manifest root:     {r}");
    }
    if let Some(b) = &s.backing {
        crate::errln!("  backing file:      {b}");
    }
    if let Some(b) = &s.bitmap {
        crate::errln!(
            "  bitmap:            {} ({}): {} dirty{}",
            b.name,
            b.mode,
            human_bytes(b.dirty_bytes),
            b.anchored_backup
                .as_ref()
                .map(|a| format!(", anchored to {a}"))
                .unwrap_or_default()
        );
    }
    crate::errln!("  started:           {}", s.started);
    crate::errln!("  finished:          {}", s.finished);
    crate::errln!(
        "  elapsed:           {} ({}/s)",
        human_duration(s.elapsed_seconds),
        human_bytes(s.throughput_bytes_per_second as u64)
    );
}

fn print_guest(s: &Summary) {
    if let Some(g) = &s.guest {
        crate::errln!(
            "  copy-before-write: {} copies, {} (cache peak {})",
            s.copy_before_write_copies,
            human_bytes(s.copy_before_write_bytes),
            human_bytes(s.cbw_cache_peak_bytes)
        );
        crate::errln!(
            "  guest:             {} writes ({} zero), {}, {} failed; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            g.writes,
            g.zero_writes,
            human_bytes(g.bytes),
            g.failed_writes,
            g.latency_ms.p50,
            g.latency_ms.p99,
            g.latency_ms.max
        );
    }
    if let Some(o) = &s.guest_overlay {
        crate::errln!("  guest overlay:     {o}");
    }
}
