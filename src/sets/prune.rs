//! `imgbackup prune DIR`: keep what a retention rule keeps (per source),
//! remove the rest, consolidating first every kept backup whose parent
//! goes (see [`super::consolidate`]).
//!
//! The plan is written to `DIR/.imgbackup-prune` before anything changes
//! (consolidations oldest first, removals newest first); each step is
//! idempotent, and the next `prune` (or `list --repair`) finishes a plan a
//! kill interrupted before it makes a new one. `prune` holds DIR's lock
//! exclusively: a backup writing into DIR holds it shared.

use super::retention::{Rules, apply};
use super::{Set, scan};
use crate::job::JobError;
use crate::job::cancel::Cancel;
use crate::job::error::Result;
use crate::manifest::manifest_path;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The journal of a prune in progress.
pub const JOURNAL: &str = ".imgbackup-prune";

/// What happens to one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Kept as it is.
    Keep,
    /// Kept, rewritten self-contained (its parent goes).
    Consolidate,
    /// Removed.
    Remove,
    /// Left alone: its manifest or its file is missing or unreadable, or
    /// its chain is already broken (`list` shows why).
    Skip,
}

/// One backup in the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Item {
    /// The backup's name.
    pub name: String,
    /// Its source.
    pub source: String,
    /// When its job started.
    pub started: String,
    /// What happens to it.
    pub action: Action,
    /// Why.
    pub reasons: Vec<String>,
    /// Bytes its file takes.
    pub disk_usage: u64,
}

/// The plan, and what was done.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// The directory.
    pub dir: String,
    /// Nothing was changed (`--dry-run`).
    pub dry_run: bool,
    /// An interrupted prune was finished first.
    pub resumed: bool,
    /// Every backup, oldest first.
    pub backups: Vec<Item>,
    /// Bytes the removed files took.
    pub freed_bytes: u64,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Journal {
    consolidate: Vec<String>,
    remove: Vec<String>,
}

/// The plan for `set` under `rules`.
pub fn plan(set: &Set, rules: &Rules) -> Vec<Item> {
    let mut action: BTreeMap<String, (Action, Vec<String>)> = BTreeMap::new();
    for backups in set.by_source().into_values() {
        let usable: Vec<_> = backups
            .iter()
            .filter(|b| !b.damaged && b.present && b.started_at().is_some())
            .collect();
        let times: Vec<_> = usable.iter().filter_map(|b| b.started_at()).collect();
        let why = apply(rules, &times);
        for (b, mut w) in usable.iter().zip(why) {
            if !b.bitmaps.is_empty() {
                w.push(format!("bitmap {}", b.bitmaps.join(", ")));
            }
            let a = if w.is_empty() {
                Action::Remove
            } else {
                Action::Keep
            };
            action.insert(b.name.clone(), (a, w));
        }
        for b in backups {
            if !action.contains_key(&b.name) {
                let why = if b.damaged {
                    "its manifest cannot be read"
                } else if !b.present {
                    "its file is missing"
                } else {
                    "no start time"
                };
                action.insert(b.name.clone(), (Action::Skip, vec![why.into()]));
            }
        }
    }
    // A backup whose manifest cannot be read is left alone, and so is the
    // file its qcow2 header names as its backing file (the chain it needs).
    for b in &set.backups {
        if !b.damaged || !b.present {
            continue;
        }
        let Some(parent) = backing_name(&set.dir, &b.path) else {
            continue;
        };
        if let Some(e) = action.get_mut(&parent)
            && e.0 == Action::Remove
        {
            e.0 = Action::Keep;
            e.1.push(format!(
                "backing file of {}, whose manifest cannot be read",
                b.name
            ));
        }
    }
    // A kept backup whose parent goes is consolidated; one whose parent
    // is already gone cannot be, and its chain is kept as it is.
    let parent_of = |name: &str| -> Option<String> {
        let b = set.get(name)?;
        let p = b.parent.as_ref()?;
        set.get(p).map(|pb| pb.name.clone())
    };
    let names: Vec<String> = set.backups.iter().map(|b| b.name.clone()).collect();
    for n in &names {
        let Some((a, _)) = action.get(n) else {
            continue;
        };
        if *a != Action::Keep {
            continue;
        }
        let b = set.get(n);
        if b.is_some_and(|b| b.parent_missing) {
            if let Some(e) = action.get_mut(n) {
                e.1.push("its parent is missing: not consolidated".into());
            }
            continue;
        }
        if let Some(p) = parent_of(n)
            && action.get(&p).is_some_and(|(pa, _)| *pa == Action::Remove)
            && let Some(e) = action.get_mut(n)
        {
            e.0 = Action::Consolidate;
            e.1.push(format!("its parent {p} is removed"));
        }
    }
    set.backups
        .iter()
        .map(|b| {
            let (a, reasons) = action
                .get(&b.name)
                .cloned()
                .unwrap_or((Action::Skip, Vec::new()));
            Item {
                name: b.name.clone(),
                source: b.source.clone().unwrap_or_default(),
                started: b.started.clone().unwrap_or_default(),
                action: a,
                reasons,
                disk_usage: b.disk_usage,
            }
        })
        .collect()
}

/// The name in `dir` of the backing file `path`'s qcow2 header names, if
/// it is in `dir`.
fn backing_name(dir: &Path, path: &Path) -> Option<String> {
    let layer = crate::node::qcow2::Qcow2Layer::open(path).ok()?;
    let name = layer.header().backing_file.clone()?;
    let resolved = crate::node::graph::resolve_backing(path, &name).ok()?;
    let (a, b) = (
        std::fs::canonicalize(crate::files::dir_of(&resolved)).ok()?,
        std::fs::canonicalize(dir).ok()?,
    );
    (a == b).then(|| {
        resolved
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    })?
}

fn journal_path(dir: &Path) -> PathBuf {
    dir.join(JOURNAL)
}

fn write_journal(dir: &Path, j: &Journal) -> Result<()> {
    let p = journal_path(dir);
    let tmp = dir.join(format!("{JOURNAL}.partial"));
    let data = serde_json::to_vec_pretty(j).map_err(|e| JobError::Internal(e.to_string()))?;
    let io = |e| JobError::step(format!("cannot write {}", p.display()), e);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &p).map_err(io)?;
    crate::files::sync_dir(&p).map_err(io)
}

fn read_journal(dir: &Path) -> Result<Option<Journal>> {
    let p = journal_path(dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            JobError::Refused(format!(
                "{} is damaged ({e}); it records an interrupted prune: check the directory with `imgbackup list`, then remove the file",
                p.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JobError::step(format!("cannot read {}", p.display()), e)),
    }
}

fn unlink(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JobError::step(format!("cannot remove {}", p.display()), e)),
    }
}

/// Carry out a journal: consolidations, then removals, then the journal
/// goes.
fn carry_out(dir: &Path, j: &Journal, cancel: &Cancel) -> Result<()> {
    // Nothing is removed before every consolidation is done: a
    // consolidation that fails (a chain that does not hold what its
    // manifest says, a full disk, a signal) abandons the plan, and what
    // was consolidated so far stays (self-contained, the same images).
    for name in &j.consolidate {
        let r = match cancel.reason() {
            Some(r) => Err(JobError::Cancelled(r)),
            None => super::consolidate::in_place(&dir.join(name), cancel),
        };
        if let Err(e) = r {
            unlink(&journal_path(dir))?;
            let _ = crate::files::sync_dir(&journal_path(dir));
            return Err(match e {
                e @ JobError::Cancelled(_) => e,
                e => e.within(format!(
                    "cannot consolidate {} (nothing was removed; the prune was abandoned)",
                    dir.join(name).display()
                )),
            });
        }
    }
    for name in &j.remove {
        let p = dir.join(name);
        tracing::info!("removing {}", p.display());
        unlink(&p)?;
        unlink(&manifest_path(&p))?;
        crate::files::sync_dir(&p)
            .map_err(|e| JobError::step(format!("cannot sync {}", dir.display()), e))?;
    }
    unlink(&journal_path(dir))?;
    crate::files::sync_dir(&journal_path(dir))
        .map_err(|e| JobError::step(format!("cannot sync {}", dir.display()), e))
}

/// Finish a prune a kill interrupted (`list --repair`); true if there was
/// one. Holds DIR's lock meanwhile.
pub fn repair(dir: &Path, wait: Option<Duration>, cancel: &Cancel) -> Result<bool> {
    let mut locks = crate::lock::Locks::new();
    locks.directory(dir, true, wait)?;
    match read_journal(dir)? {
        Some(j) => {
            carry_out(dir, &j, cancel)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// `imgbackup prune DIR`.
pub fn prune(
    dir: &Path,
    rules: &Rules,
    dry_run: bool,
    wait: Option<Duration>,
    cancel: &Cancel,
) -> Result<Outcome> {
    if rules.is_empty() {
        return Err(JobError::Usage(
            "prune needs at least one rule (--keep-last, --keep-within, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly): without one it would remove every backup".into(),
        ));
    }
    if !dir.is_dir() {
        return Err(JobError::Refused(format!(
            "{} is not a directory (prune works on the directory that holds the backups)",
            dir.display()
        )));
    }
    let mut locks = crate::lock::Locks::new();
    locks.directory(dir, true, wait)?;
    let pending = read_journal(dir)?;
    let resumed = pending.is_some();
    if let (Some(j), false) = (&pending, dry_run) {
        tracing::info!("finishing an interrupted prune of {}", dir.display());
        carry_out(dir, j, cancel)?;
    }
    let set = scan(dir).map_err(|e| JobError::step(format!("cannot read {}", dir.display()), e))?;
    let items = plan(&set, rules);
    let freed_bytes = items
        .iter()
        .filter(|i| i.action == Action::Remove)
        .map(|i| i.disk_usage)
        .sum();
    let outcome = Outcome {
        dir: dir.display().to_string(),
        dry_run,
        resumed,
        backups: items.clone(),
        freed_bytes,
    };
    if dry_run {
        return Ok(outcome);
    }
    // Consolidations oldest first; removals newest first.
    let j = Journal {
        consolidate: items
            .iter()
            .filter(|i| i.action == Action::Consolidate)
            .map(|i| i.name.clone())
            .collect(),
        remove: items
            .iter()
            .rev()
            .filter(|i| i.action == Action::Remove)
            .map(|i| i.name.clone())
            .collect(),
    };
    if j.consolidate.is_empty() && j.remove.is_empty() {
        return Ok(outcome);
    }
    // Every backup the plan keeps must stay whole: nothing it reads is
    // removed before it is consolidated (the plan's order) — checked here
    // once more against the names.
    let removed: BTreeSet<&String> = j.remove.iter().collect();
    for i in &items {
        if i.action == Action::Keep
            && let Some(p) = set.get(&i.name).and_then(|b| b.parent.as_ref())
            && removed.contains(p)
        {
            return Err(JobError::Internal(format!(
                "the plan keeps {} and removes its parent {p}",
                i.name
            )));
        }
    }
    write_journal(dir, &j)?;
    carry_out(dir, &j, cancel)?;
    Ok(outcome)
}
