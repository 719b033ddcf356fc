//! Backup sets (SPEC §10): the backups in a directory, found from their
//! manifests, grouped in chains by source; `list` shows them, `prune`
//! removes what no retention rule keeps, consolidating a kept backup whose
//! parents go so that every kept backup stays restorable.

pub mod consolidate;
pub mod prune;
pub mod retention;

use crate::manifest::{FileBinding, manifest_path, read_meta};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Suffix of a manifest file.
const MANIFEST: &str = ".manifest";

/// A backup of the set, as its manifest and the file system describe it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Backup {
    /// The backup file's name in the directory.
    pub name: String,
    /// Its path.
    pub path: PathBuf,
    /// The parent's name when it is in the same directory, else its path.
    pub parent: Option<String>,
    /// The parent the manifest names is gone (the backup cannot be
    /// restored).
    pub parent_missing: bool,
    /// The sync mode that made it.
    pub sync: Option<String>,
    /// What was backed up.
    pub source: Option<String>,
    /// When the job started (RFC 3339).
    pub started: Option<String>,
    /// When it finished.
    pub finished: Option<String>,
    /// Virtual size, bytes.
    pub virtual_size: Option<u64>,
    /// Bytes the backup file takes on disk.
    pub disk_usage: u64,
    /// The manifest's root digest (empty when deferred).
    pub root_digest: Option<String>,
    /// Bitmaps anchored to this backup (`SOURCE:NAME`).
    pub bitmaps: Vec<String>,
    /// The backup file exists.
    pub present: bool,
    /// The manifest is bound to this file as it is (None: nothing to
    /// compare, or no file).
    pub bound: Option<bool>,
    /// A manifest without its file.
    pub orphan: bool,
    /// The manifest cannot be read.
    pub damaged: bool,
}

impl Backup {
    /// When its job started.
    pub fn started_at(&self) -> Option<SystemTime> {
        self.started
            .as_deref()
            .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
    }
}

/// The backups of one directory.
#[derive(Debug, Clone)]
pub struct Set {
    /// The directory.
    pub dir: PathBuf,
    /// Its backups, oldest first.
    pub backups: Vec<Backup>,
}

/// Bytes a file takes on disk.
fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// `p` made absolute with its directory resolved (the file itself may be
/// gone).
fn canon(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let dir = crate::files::dir_of(p);
    match (std::fs::canonicalize(&dir), p.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => p.to_path_buf(),
    }
}

/// The bitmaps beside `source` and the backups they are anchored to:
/// anchor path -> `SOURCE:NAME`.
fn anchors_of(source: &Path, out: &mut BTreeMap<PathBuf, Vec<String>>) {
    let Ok(names) = crate::bitmap::file::list_names(source) else {
        return;
    };
    for n in names {
        if let Ok(b) = crate::bitmap::Bitmap::load(source, &n)
            && let Some(a) = b.anchor
        {
            let key = canon(&a.path);
            out.entry(key)
                .or_default()
                .push(format!("{}:{n}", source.display()));
        }
    }
}

/// Read the set in `dir`: every `*.manifest` and the file beside it.
pub fn scan(dir: &Path) -> std::io::Result<Set> {
    let canon_dir = std::fs::canonicalize(dir)?;
    let mut backups = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(name) = fname.strip_suffix(MANIFEST) else {
            continue;
        };
        if name.is_empty() || !e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        let path = dir.join(name);
        let manifest = manifest_path(&path);
        let meta = read_meta(&manifest);
        let present = path.is_file();
        let bound = match (&meta, present) {
            (Some(m), true) => m.file.as_ref().map(|want| {
                FileBinding::of_path(&path)
                    .ok()
                    .is_some_and(|now| want.difference(&now).is_none())
            }),
            _ => None,
        };
        let (parent, parent_missing) = match meta.as_ref().and_then(|m| m.parent.as_ref()) {
            Some(p) => {
                let pp = Path::new(&p.path);
                let shown = match pp.parent() {
                    Some(d) if d == canon_dir => pp
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| p.path.clone()),
                    _ => p.path.clone(),
                };
                (Some(shown), !pp.is_file())
            }
            None => (None, false),
        };
        backups.push(Backup {
            name: name.to_string(),
            disk_usage: disk_usage(&path),
            parent,
            parent_missing,
            sync: meta.as_ref().map(|m| m.sync.clone()),
            source: meta.as_ref().map(|m| m.source.clone()),
            started: meta.as_ref().map(|m| m.started.clone()),
            finished: meta.as_ref().map(|m| m.finished.clone()),
            virtual_size: meta.as_ref().map(|m| m.virtual_size),
            root_digest: meta.as_ref().map(|m| m.root_digest.clone()),
            bitmaps: Vec::new(),
            orphan: !present,
            damaged: meta.is_none(),
            bound,
            present,
            path,
        });
    }
    // Bitmaps beside the sources the manifests name.
    let mut anchors = BTreeMap::new();
    let mut sources: Vec<&str> = backups
        .iter()
        .filter_map(|b| b.source.as_deref())
        .filter(|s| !crate::nbd::client::is_uri(s))
        .collect();
    sources.sort_unstable();
    sources.dedup();
    for s in sources {
        anchors_of(Path::new(s), &mut anchors);
    }
    for b in &mut backups {
        if let Some(v) = anchors.get(&canon(&b.path)) {
            b.bitmaps = v.clone();
        }
    }
    backups.sort_by(|a, b| {
        a.started_at()
            .cmp(&b.started_at())
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(Set {
        dir: dir.to_path_buf(),
        backups,
    })
}

impl Set {
    /// The backups grouped by source (a chain or several), each oldest
    /// first; backups whose manifest cannot be read come under "".
    pub fn by_source(&self) -> BTreeMap<String, Vec<&Backup>> {
        let mut out: BTreeMap<String, Vec<&Backup>> = BTreeMap::new();
        for b in &self.backups {
            out.entry(b.source.clone().unwrap_or_default())
                .or_default()
                .push(b);
        }
        out
    }

    /// The backup named `name`.
    pub fn get(&self, name: &str) -> Option<&Backup> {
        self.backups.iter().find(|b| b.name == name)
    }
}
