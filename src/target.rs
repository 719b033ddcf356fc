//! `TARGET.partial`: a backup is written beside its final name and renamed
//! only when complete. A guard removes the partial file on failure (unless
//! asked to keep it), so a file named TARGET always holds a whole backup.

use crate::error::BlockError;
use crate::node::BlockNode;
use crate::node::probe::Format;
use crate::node::qcow2::{CreateOptions, Qcow2Writer};
use crate::node::raw::RawNode;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A new image being written (a backup target, a restored image): a
/// sparse raw file or a qcow2 file by imgbackup's writer.
pub enum Output {
    Raw(Arc<RawNode>),
    Qcow2(Arc<Qcow2Writer>),
}

impl Output {
    /// Create `path` as a `format` image of `size` bytes; `cluster_size`
    /// and `backing` (name, format) apply to qcow2.
    pub fn create(
        path: &Path,
        format: Format,
        size: u64,
        cluster_size: u64,
        backing: Option<(String, String)>,
    ) -> Result<Output, BlockError> {
        Ok(match format {
            Format::Raw => Output::Raw(Arc::new(RawNode::create(path, size)?)),
            Format::Qcow2 => Output::Qcow2(Arc::new(Qcow2Writer::create(
                path,
                &CreateOptions {
                    size,
                    cluster_size,
                    backing,
                },
            )?)),
        })
    }

    pub fn node(&self) -> Arc<dyn BlockNode> {
        match self {
            Output::Raw(n) => n.clone(),
            Output::Qcow2(n) => n.clone(),
        }
    }

    /// Make the image complete and durable (a qcow2 gets its metadata).
    pub fn complete(&self) -> Result<(), BlockError> {
        match self {
            Output::Raw(n) => n.flush(),
            Output::Qcow2(n) => n.finish(),
        }
    }
}
