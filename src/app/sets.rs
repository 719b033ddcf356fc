//! `imgbackup list`, `prune` and `consolidate`: backup sets (SPEC §10),
//! rendered.

use super::render::human_lines;
use crate::cli::{ConsolidateArgs, GlobalOpts, ListArgs, PruneArgs};
use crate::exit::Exit;
use crate::job::JobError;
use crate::report::{human_bytes, print_json};
use crate::sets::prune::{Action, Outcome};
use crate::sets::retention::Rules;
use crate::sets::{Backup, Set, scan};
use std::path::PathBuf;

/// What `list --json` prints.
#[derive(serde::Serialize)]
struct Listing<'a> {
    dir: String,
    /// An interrupted prune was finished first (`--repair`).
    repaired: bool,
    /// A prune was interrupted here and is not finished yet.
    interrupted_prune: bool,
    backups: Vec<Listed<'a>>,
    /// Names by source, oldest first.
    sources: std::collections::BTreeMap<String, Vec<&'a str>>,
}

#[derive(serde::Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    backup: &'a Backup,
    /// `--verify`: whether it matched its manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    verified: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verify_error: Option<String>,
    /// `--verify`: the chunks read and checked (an incremental over a
    /// verified parent checks only what it holds itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks_checked: Option<u64>,
}

/// A set, and the names to show of it (None: all).
type Shown = (Set, Option<Vec<String>>);

/// The sets to show: a directory whole, or the directories of the given
/// backups with only those.
fn sets_of(paths: &[PathBuf]) -> Result<Vec<Shown>, JobError> {
    let mut out: Vec<Shown> = Vec::new();
    for p in paths {
        if p.is_dir() {
            let set =
                scan(p).map_err(|e| JobError::step(format!("cannot read {}", p.display()), e))?;
            out.push((set, None));
            continue;
        }
        let dir = crate::files::dir_of(p);
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let set =
            scan(&dir).map_err(|e| JobError::step(format!("cannot read {}", dir.display()), e))?;
        if set.get(&name).is_none() {
            return Err(JobError::Refused(format!(
                "{} is neither a directory nor a backup with a manifest ({}.manifest)",
                p.display(),
                p.display()
            )));
        }
        match out
            .iter_mut()
            .find(|(s, only)| s.dir == set.dir && only.is_some())
        {
            Some((_, Some(only))) => only.push(name),
            _ => out.push((set, Some(vec![name]))),
        }
    }
    Ok(out)
}

/// Run `imgbackup list`.
pub fn list(args: &ListArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let cancel = super::cancel_on_signals()?;
    let mut repaired = false;
    if args.repair {
        for p in args.paths.iter().filter(|p| p.is_dir()) {
            repaired |= crate::sets::prune::repair(p, args.wait_lock, &cancel)?;
        }
    }
    let mut exit = Exit::Success;
    let mut docs = Vec::new();
    let sets = sets_of(&args.paths)?;
    for (set, only) in &sets {
        let shown: Vec<&Backup> = set
            .backups
            .iter()
            .filter(|b| only.as_ref().is_none_or(|o| o.contains(&b.name)))
            .collect();
        let mut listed = Vec::new();
        // Oldest first: an incremental whose parent verified reads only
        // what it holds itself.
        let mut good: std::collections::BTreeSet<&str> = Default::default();
        for b in &shown {
            let mut chunks_checked = None;
            let (verified, verify_error) = if args.verify && b.present && !b.damaged {
                let parent_verified = b
                    .parent
                    .as_deref()
                    .is_some_and(|p| good.contains(p) && !b.parent_missing);
                let r = crate::job::verify::verify(
                    &crate::job::verify::VerifyConfig {
                        backup: b.path.clone(),
                        against_image: None,
                        format: None,
                        jobs: None,
                        parent_verified,
                    },
                    &cancel,
                );
                match r {
                    Ok(v) => {
                        good.insert(&b.name);
                        chunks_checked = Some(v.chunks_checked_over_parent.unwrap_or(v.chunks));
                        (Some(true), None)
                    }
                    Err(JobError::Cancelled(r)) => return Err(JobError::Cancelled(r).into()),
                    Err(e) => {
                        exit = Exit::Mismatch;
                        (Some(false), Some(format!("{e:#}")))
                    }
                }
            } else {
                (None, None)
            };
            listed.push(Listed {
                backup: b,
                verified,
                verify_error,
                chunks_checked,
            });
        }
        let mut sources: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
        for b in &shown {
            sources
                .entry(b.source.clone().unwrap_or_default())
                .or_default()
                .push(&b.name);
        }
        docs.push(Listing {
            dir: set.dir.display().to_string(),
            repaired,
            interrupted_prune: set.dir.join(crate::sets::prune::JOURNAL).exists(),
            backups: listed,
            sources,
        });
    }
    if g.json {
        match docs.len() {
            1 => print_json(&docs[0])?,
            _ => print_json(&docs)?,
        }
    } else {
        for d in &docs {
            render_listing(d);
        }
    }
    // For cron: a backup that cannot be restored as listed is exit 7 and
    // one line on stderr, whatever the output format.
    let broken: Vec<String> = docs
        .iter()
        .flat_map(|d| &d.backups)
        .filter_map(|l| {
            let b = l.backup;
            let why = if b.damaged {
                "manifest unreadable"
            } else if b.orphan {
                "file missing"
            } else if b.parent_missing {
                "parent missing"
            } else {
                return None;
            };
            Some(format!("{} ({why})", b.path.display()))
        })
        .collect();
    if !broken.is_empty() {
        exit = Exit::Mismatch;
        if !g.quiet {
            crate::errln!(
                "imgbackup: {} backup(s) cannot be restored as listed: {}",
                broken.len(),
                broken.join(", ")
            );
        }
    }
    Ok(exit)
}

fn short(root: Option<&str>) -> String {
    match root {
        Some(r) if r.len() >= 16 => format!("{}…", &r[..16]),
        Some("") | None => "-".into(),
        Some(r) => r.into(),
    }
}

fn render_listing(d: &Listing<'_>) {
    if d.interrupted_prune {
        crate::outln!(
            "{}: a prune was interrupted here; `imgbackup list --repair {}` (or the next prune) finishes it",
            d.dir,
            d.dir
        );
    }
    for (source, names) in &d.sources {
        crate::outln!(
            "{}",
            if source.is_empty() {
                "(unreadable manifests)".to_string()
            } else {
                format!("source {source}")
            }
        );
        for n in names {
            let Some(l) = d.backups.iter().find(|l| l.backup.name == *n) else {
                continue;
            };
            let b = l.backup;
            let mut notes = Vec::new();
            if b.damaged {
                notes.push("DAMAGED MANIFEST".to_string());
            }
            if b.orphan {
                notes.push("ORPHAN: its file is missing".into());
            }
            if b.parent_missing {
                notes.push(format!(
                    "PARENT MISSING: {}",
                    b.parent.as_deref().unwrap_or("?")
                ));
            }
            if b.bound == Some(false) {
                notes.push("manifest not bound to this file (copied or replaced)".into());
            }
            match (l.verified, &l.verify_error) {
                (Some(true), _) => notes.push("verified".into()),
                (Some(false), Some(e)) => notes.push(format!("VERIFY FAILED: {e}")),
                _ => {}
            }
            for bm in &b.bitmaps {
                notes.push(format!("bitmap {bm}"));
            }
            crate::outln!(
                "  {:<32} {:<11} {:<20} {:>10} {:>10} root {} {}{}",
                b.name,
                b.sync.as_deref().unwrap_or("?"),
                b.started.as_deref().unwrap_or("?"),
                human_bytes(b.virtual_size.unwrap_or(0)),
                human_bytes(b.disk_usage),
                short(b.root_digest.as_deref()),
                b.parent
                    .as_ref()
                    .map(|p| format!("parent {p}"))
                    .unwrap_or_else(|| "self-contained".into()),
                if notes.is_empty() {
                    String::new()
                } else {
                    format!("  [{}]", notes.join("; "))
                }
            );
        }
    }
}

/// Run `imgbackup prune`.
pub fn prune(args: &PruneArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let cancel = super::cancel_on_signals()?;
    let rules = Rules {
        last: args.keep_last,
        within: args.keep_within,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
    };
    let out = crate::sets::prune::prune(&args.dir, &rules, args.dry_run, args.wait_lock, &cancel)?;
    if g.json {
        print_json(&out)?;
    } else if !g.quiet || args.dry_run {
        render_prune(&out);
    }
    Ok(Exit::Success)
}

fn render_prune(o: &Outcome) {
    if o.resumed {
        crate::errln!(
            "imgbackup: {}an interrupted prune of {}",
            if o.dry_run {
                "would first finish "
            } else {
                "finished "
            },
            o.dir
        );
    }
    let verb = |a: Action| match (a, o.dry_run) {
        (Action::Keep, _) => "keep",
        (Action::Consolidate, true) => "consolidate",
        (Action::Consolidate, false) => "consolidated",
        (Action::Remove, true) => "remove",
        (Action::Remove, false) => "removed",
        (Action::Skip, _) => "left",
    };
    for i in &o.backups {
        let line = format!(
            "{:<12} {:<32} {:<20} {}",
            verb(i.action),
            i.name,
            i.started,
            if i.reasons.is_empty() {
                "no rule keeps it".into()
            } else {
                i.reasons.join(", ")
            }
        );
        if o.dry_run {
            crate::outln!("{line}");
        } else {
            crate::errln!("{line}");
        }
    }
    crate::errln!(
        "imgbackup: {} {}{}",
        if o.dry_run { "would free" } else { "freed" },
        human_bytes(o.freed_bytes),
        if o.dry_run {
            " (dry run: nothing was changed)"
        } else {
            ""
        }
    );
}

/// Run `imgbackup consolidate`.
pub fn consolidate(args: &ConsolidateArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let cancel = super::cancel_on_signals()?;
    let summary =
        crate::sets::consolidate::synthetic_full(&args.backup, &args.output, args.force, &cancel)?;
    if g.json {
        print_json(&summary)?;
    } else if !g.quiet {
        for l in human_lines(&summary) {
            crate::errln!("{l}");
        }
    }
    Ok(Exit::Success)
}
