//! What a command may write: checks made before anything is written.
//!
//! * An output path must be in an existing directory, and be (if it
//!   exists) a regular file that `--force` allows to replace — never a
//!   directory, a device, a FIFO or a socket.
//! * A backup's files (TARGET, its manifest, their partials) must not be
//!   any file the backup reads or depends on: the source and its backing
//!   chain, the files beside them (bitmaps, manifests), the new backup's
//!   parent, or the backup the bitmap is anchored to. With `--force` or
//!   without, such a TARGET is a usage error (exit 2).
//! * A backup that other backups name as their parent (their manifests say
//!   so) is not replaced: that would break their chains.

use crate::bitmap::file::{bitmap_path, list_names};
use crate::files::{self, same_file};
use crate::manifest::{manifest_path, read_meta};
use crate::node::probe::Image;
use crate::target::partial_path;
use std::path::{Path, PathBuf};

/// Why a path may not be written.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// It would overwrite what the job reads or builds on (exit 2).
    #[error("{0}")]
    Conflict(String),
    /// It cannot be written (exit 1): a missing directory, a directory, a
    /// special file, an existing file without `--force`.
    #[error("{0}")]
    Refused(String),
}

macro_rules! bail {
    ($($t:tt)*) => {
        return Err(GuardError::Refused(format!($($t)*)))
    };
}

/// Refuse an output path that cannot be written, or exists without `force`.
pub fn check_output(path: &Path, force: bool, what: &str) -> Result<(), GuardError> {
    if !files::dir_of(path).is_dir() {
        bail!(
            "the directory of the {what} {} does not exist; create it first",
            path.display()
        );
    }
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        bail!("the {what} {} is a directory; name a file", path.display());
    }
    if let Err(kind) = files::kind_of(&meta) {
        bail!(
            "the {what} {} {kind}; imgbackup writes a new file there (as {} renamed into place), so name a regular file",
            path.display(),
            partial_path(path).display()
        );
    }
    if meta.file_type().is_block_device() {
        bail!(
            "the {what} {} is a block device; a backup is a file (written as {} and renamed into place). To write an image onto a device, restore onto it: `imgbackup restore --force BACKUP {}`",
            path.display(),
            partial_path(path).display(),
            path.display()
        );
    }
    if !force {
        bail!(
            "the {what} {} already exists; pass --force to replace it (it is replaced only once the new file is complete)",
            path.display()
        );
    }
    Ok(())
}

use std::os::unix::fs::FileTypeExt;

/// Files a backup reads or depends on, each with what it is.
#[derive(Debug, Default)]
pub struct Protected {
    files: Vec<(PathBuf, String)>,
}

impl Protected {
    fn add(&mut self, p: &Path, what: impl Into<String>) {
        self.files.push((p.to_path_buf(), what.into()));
    }

    /// A file and the files imgbackup keeps beside it (its manifest and,
    /// for an image, its bitmaps).
    fn add_with_sidecars(&mut self, p: &Path, what: &str) {
        self.add(p, what);
        self.add(
            &manifest_path(p),
            format!("the manifest of {what} {}", p.display()),
        );
        for name in list_names(p).unwrap_or_default() {
            self.add(
                &bitmap_path(p, &name),
                format!("bitmap '{name}' of {what} {}", p.display()),
            );
        }
    }

    /// The source image and every file of its backing chain.
    pub fn source(image: &Image) -> Protected {
        let mut p = Protected::default();
        for (i, layer) in image.layers.iter().enumerate() {
            let what = if i == 0 {
                "the source image"
            } else {
                "a file of the source's backing chain"
            };
            p.add_with_sidecars(&layer.info.path, what);
        }
        p
    }

    /// The new backup's backing file (its parent).
    pub fn parent(&mut self, backing: &Path) {
        self.add_with_sidecars(backing, "the new backup's backing file");
    }

    /// The backup a bitmap is anchored to.
    pub fn anchor(&mut self, anchor: &Path, bitmap: &str) {
        self.add_with_sidecars(
            anchor,
            &format!("the backup bitmap '{bitmap}' is anchored to"),
        );
    }

    /// Another output of the same command (`--guest-overlay`).
    pub fn output(&mut self, p: &Path, what: &str) {
        self.add(p, what);
        self.add(&partial_path(p), format!("the partial file of {what}"));
    }

    /// Refuse `target` if it, or a file written beside it, is protected.
    pub fn check(&self, target: &Path, what: &str) -> Result<(), GuardError> {
        let m = manifest_path(target);
        let written = [
            target.to_path_buf(),
            partial_path(target),
            m.clone(),
            partial_path(&m),
        ];
        for w in &written {
            for (p, is) in &self.files {
                if same_file(w, p) {
                    return Err(GuardError::Conflict(format!(
                        "the {what} {} would overwrite {is} ({}); choose another {what}",
                        target.display(),
                        p.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Refuse to replace `target` when other backups in its directory name it
/// as their parent (found from their manifests).
pub fn check_children(target: &Path) -> Result<(), GuardError> {
    if std::fs::metadata(target).is_err() {
        return Ok(());
    }
    let dir = files::dir_of(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("manifest") {
            continue;
        }
        let Some(meta) = read_meta(&path) else {
            continue;
        };
        if let Some(parent) = &meta.parent
            && same_file(Path::new(&parent.path), target)
        {
            let child = path.with_extension("");
            if !child.exists() {
                continue;
            }
            return Err(GuardError::Conflict(format!(
                "{} is the parent of the backup {} (its backing file): replacing it would break that chain; write the new backup under another name",
                target.display(),
                child.display()
            )));
        }
    }
    Ok(())
}
