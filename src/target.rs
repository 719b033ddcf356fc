//! `TARGET.partial`: a backup is written beside its final name and renamed
//! only when complete. A guard removes the partial file on failure (unless
//! asked to keep it), so a file named TARGET always holds a whole backup.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The partial file of one output, removed on drop unless committed.
#[derive(Debug)]
pub struct Partial {
    final_path: PathBuf,
    partial_path: PathBuf,
    keep_on_failure: bool,
    committed: bool,
}

/// `PATH.partial`.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

impl Partial {
    pub fn new(final_path: &Path, keep_on_failure: bool) -> Partial {
        Partial {
            final_path: final_path.to_path_buf(),
            partial_path: partial_path(final_path),
            keep_on_failure,
            committed: false,
        }
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.partial_path
    }

    /// The final name.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Keep the partial file even if the job fails.
    pub fn keep(&mut self) {
        self.keep_on_failure = true;
    }

    /// Rename to the final name and sync the directory. The caller has
    /// flushed the file.
    pub fn commit(mut self) -> io::Result<()> {
        std::fs::rename(&self.partial_path, &self.final_path)?;
        self.committed = true;
        sync_dir(&self.final_path)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed && !self.keep_on_failure {
            let _ = std::fs::remove_file(&self.partial_path);
        }
    }
}

/// fsync the directory holding `path`, so a rename in it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
