//! `imgbackup backup SOURCE TARGET`: the arguments become a
//! [`BackupConfig`], the library's [`BackupJob`] runs it, and this module
//! renders the result (a bar or plain lines while it runs; a summary on
//! stderr or the `--json` document at the end).

use super::render::{dry_run_lines, human_lines, skipped_warning};
use crate::cli::{BackupArgs, GlobalOpts, ProgressMode};
use crate::exit::Exit;
use crate::job::backup::{Backing, BackupConfig, BackupJob, DryRun, Summary};
use crate::job::policy::Policies;
use crate::node::cbw::OnCbwError;
use crate::report::{Reporter, print_json};

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
            source_bitmap: a.source_bitmap.clone(),
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
            directory_lock: true,
            unchanging_source: false,
        }
    }
}

/// Run `imgbackup backup`.
pub fn run(args: &BackupArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    // A served image: the job runs in the serving process.
    if let Some(ctl) = super::control::connect(&args.source, g)? {
        return super::control::backup(ctl, g, args.progress.progress);
    }
    // Copy-before-write options need writes to copy before: a guest.
    let cbw = [
        (args.on_cbw_error.is_some(), "--on-cbw-error"),
        (args.cbw_timeout.is_some(), "--cbw-timeout"),
        (args.cbw_cache.is_some(), "--cbw-cache"),
    ];
    if let (None, Some((_, opt))) = (&args.guest, cbw.iter().find(|(given, _)| *given)) {
        return Err(crate::job::JobError::Usage(format!(
            "{opt} needs --guest, or an image `imgbackup serve` writes (whose clients are the guest)"
        ))
        .into());
    }
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
        for l in human_lines(&summary) {
            crate::errln!("{l}");
        }
    }
    if !summary.ignored_ranges.is_empty() {
        crate::errln!("{}", skipped_warning(&summary));
        return Ok(Exit::Skipped);
    }
    Ok(Exit::Success)
}

/// Print (or return as JSON) what a backup would copy.
fn render_dry_run(s: &Summary, d: &DryRun, g: &GlobalOpts) -> anyhow::Result<()> {
    if g.json {
        return print_json(s);
    }
    if !g.quiet {
        for l in dry_run_lines(s, d) {
            crate::errln!("{l}");
        }
    }
    Ok(())
}
