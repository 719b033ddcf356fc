//! `imgbackup restore BACKUP OUTPUT`: the arguments become a
//! [`RestoreConfig`], the library's [`RestoreJob`] runs it, and this module
//! renders the progress and the result.

use crate::cli::{GlobalOpts, ProgressMode, RestoreArgs};
use crate::exit::Exit;
use crate::job::restore::{RestoreConfig, RestoreJob, RestoreSummary};
use crate::report::{Reporter, human_bytes, human_duration, print_json};

/// Run `imgbackup restore`.
pub fn run(args: &RestoreArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let cancel = super::cancel_on_signals()?;
    let job = RestoreJob::prepare(
        RestoreConfig {
            backup: args.backup.clone(),
            output: args.output.clone(),
            output_format: args.output_format.map(Into::into),
            output_cluster_size: args.output_cluster_size,
            verify: !args.no_verify,
            force: args.force,
            keep_partial: args.keep_partial,
            jobs: args.jobs,
        },
        cancel,
    )?;
    let progress = args.progress.progress;
    let reporter = Reporter::start(
        progress,
        g.quiet || g.json && progress == ProgressMode::Auto,
        "restore",
        job.progress(),
    );
    let res = job.run();
    reporter.finish();
    render(&res?, g)?;
    Ok(Exit::Success)
}

/// Print the result: the JSON document, or a line on stderr.
fn render(doc: &RestoreSummary, g: &GlobalOpts) -> anyhow::Result<()> {
    if g.json {
        print_json(&doc)?;
    } else if !g.quiet {
        crate::errln!(
            "imgbackup: restored {} -> {} ({}, {}{}): {} written, {} zero, {}",
            doc.backup,
            doc.output,
            doc.format,
            human_bytes(doc.virtual_size),
            if doc.verified {
                ", every chunk matches the manifest"
            } else {
                ", not checked (--no-verify)"
            },
            human_bytes(doc.bytes_written),
            human_bytes(doc.bytes_zero),
            human_duration(doc.elapsed_seconds)
        );
    }
    Ok(())
}
