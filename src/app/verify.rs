//! `imgbackup verify BACKUP [--against-image IMAGE]`: the library's verify
//! job, rendered.

use crate::cli::{GlobalOpts, VerifyArgs};
use crate::exit::Exit;
use crate::job::verify::{VerifyConfig, VerifySummary, verify};
use crate::report::print_json;

/// Run `imgbackup verify`.
pub fn run(args: &VerifyArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let cancel = super::cancel_on_signals()?;
    let doc = verify(
        &VerifyConfig {
            backup: args.backup.clone(),
            against_image: args.against_image.clone(),
            format: args.format.map(Into::into),
            jobs: args.jobs,
            parent_verified: false,
        },
        &cancel,
    )?;
    render(&doc, g)?;
    Ok(if doc.incomplete.is_empty() {
        Exit::Success
    } else {
        Exit::Skipped
    })
}

/// Print the result: the JSON document, or lines on stderr.
fn render(doc: &VerifySummary, g: &GlobalOpts) -> anyhow::Result<()> {
    if g.json {
        print_json(&doc)?;
    } else if let Some(n) = doc.detached_chunks_checked {
        if !g.quiet {
            crate::errln!(
                "imgbackup: {}: the {n} chunks it holds match its manifest; it is an incremental written with --no-backing, so the rest of the image comes from {} once attached (`qemu-img rebase -u`)",
                doc.backup,
                doc.parent.as_deref().unwrap_or("its parent")
            );
        }
    } else if !g.quiet {
        let against = doc
            .against
            .as_ref()
            .map(|a| format!(", and equals {a}"))
            .unwrap_or_default();
        match (&doc.root_digest, doc.backing_chunks, &doc.backing_file) {
            (_, Some(n), Some(f)) => crate::errln!(
                "imgbackup: {} is whole: {} chunks match its manifest, and the other {n} come from its backing file {f}, unchanged since the backup{against}",
                doc.backup,
                doc.chunks - n,
            ),
            (root, _, _) => crate::errln!(
                "imgbackup: {} is whole: {} chunks match its manifest (root {}){against}",
                doc.backup,
                doc.chunks,
                root.as_deref().unwrap_or("not recorded"),
            ),
        }
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
