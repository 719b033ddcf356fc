//! `TARGET.partial`: a backup is written beside its final name and renamed
//! only when complete. A guard removes the partial file on failure (unless
//! asked to keep it), so a file named TARGET always holds a whole backup.
//!
//! The partial file is created exclusively and without following links
//! ([`crate::files::create_new`]), with the source's permission bits, and
//! holds an exclusive `flock` for as long as it is written: a second run
//! writing the same TARGET finds the partial locked and is refused (exit 8);
//! a partial left by a killed run is not locked, and is unlinked and
//! created afresh.
//!
//! [`commit`] puts a finished file and its manifest into place: the manifest
//! first (it records the identity of the data file it describes), then the
//! data file. A crash between the two renames leaves a manifest that refuses
//! the old file, never a pair that looks whole but disagrees.

pub mod guard;

use crate::error::BlockError;
use crate::files;
use crate::leftovers::{self, Left};
use crate::lock::LockError;
use crate::node::BlockNode;
use crate::node::probe::Format;
use crate::node::qcow2::{Compression, CreateOptions, Qcow2Writer};
use crate::node::raw::RawNode;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a partial file could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PartialError {
    #[error(transparent)]
    /// Another run holds the partial file.
    Locked(#[from] LockError),
    #[error("cannot create {}", path.display())]
    /// The partial file cannot be created.
    Io {
        /// The partial file.
        path: PathBuf,
        #[source]
        /// The source.
        source: io::Error,
    },
}

/// The partial file of one output, removed on drop unless committed.
#[derive(Debug)]
pub struct Partial {
    final_path: PathBuf,
    partial_path: PathBuf,
    /// Holds the flock for the life of the partial.
    file: File,
    keep_on_failure: bool,
    committed: bool,
    token: Option<leftovers::Token>,
}

/// `PATH.partial`.
pub fn partial_path(path: &Path) -> PathBuf {
    files::with_suffix(path, ".partial")
}

fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// True when `path` still names the file open as `file`.
fn still_names(path: &Path, file: &File) -> io::Result<bool> {
    let a = file.metadata()?;
    Ok(match std::fs::symlink_metadata(path) {
        Ok(b) => a.dev() == b.dev() && a.ino() == b.ino(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

/// One attempt at creating `partial` locked: `Ok(None)` when another
/// process holds it (or raced us to it).
fn try_create(partial: &Path, mode: u32) -> io::Result<Option<File>> {
    for _ in 0..64 {
        match files::create_new(partial, mode) {
            Ok(f) => {
                if !try_flock(&f)? || !still_names(partial, &f)? {
                    // Another run took it over between our create and lock.
                    return Ok(None);
                }
                return Ok(Some(f));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // Something is there: a live writer's partial (locked), or a
        // leftover (a killed run's file, a planted link).
        let old = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_nofollow()
            .open(partial);
        match old {
            Ok(old) => {
                if !try_flock(&old)? {
                    return Ok(None);
                }
                if still_names(partial, &old)? {
                    files::unlink_leftover(partial)?;
                }
            }
            // A symlink (ELOOP), a FIFO or device (ENXIO and friends), or
            // gone meanwhile: unlink whatever is there without following it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(_) => files::unlink_leftover(partial)?,
        }
    }
    Err(io::Error::other(
        "the partial file keeps reappearing; is another program creating it?",
    ))
}

/// Opening an existing partial without following a symlink, without
/// blocking on a FIFO.
trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
    }
}

impl Partial {
    /// Create `FINAL.partial` for writing: exclusively, not through a link,
    /// with `mode`, and locked. A partial that another imgbackup is writing
    /// is refused with [`LockError::Target`] (after waiting up to `wait`).
    pub fn create(
        final_path: &Path,
        mode: u32,
        keep_on_failure: bool,
        wait: Option<Duration>,
    ) -> Result<Partial, PartialError> {
        let partial_path = partial_path(final_path);
        let deadline = wait.map(|w| Instant::now() + w);
        let file = loop {
            match try_create(&partial_path, mode) {
                Ok(Some(f)) => break f,
                Ok(None) => match deadline {
                    Some(d) if Instant::now() < d => std::thread::sleep(Duration::from_millis(50)),
                    _ => {
                        return Err(LockError::Target {
                            path: final_path.to_path_buf(),
                            partial: partial_path,
                        }
                        .into());
                    }
                },
                Err(e) => {
                    return Err(PartialError::Io {
                        path: partial_path,
                        source: e,
                    });
                }
            }
        };
        let token = leftovers::add(Left::Partial(partial_path.clone()));
        Ok(Partial {
            final_path: final_path.to_path_buf(),
            partial_path,
            file,
            keep_on_failure,
            committed: false,
            token: Some(token),
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.partial_path
    }

    /// The final name.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// A handle on the partial file for a writer.
    pub fn file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// The identity of the partial file now (it keeps it through the rename).
    pub fn identity(&self) -> io::Result<crate::manifest::FileBinding> {
        crate::manifest::FileBinding::of(&self.file.metadata()?)
    }

    /// Keep the partial file even if the job fails.
    pub fn keep(&mut self) {
        self.keep_on_failure = true;
    }

    /// Rename to the final name and sync the directory. The caller has
    /// flushed the file.
    pub fn commit(mut self) -> io::Result<()> {
        let rename = || std::fs::rename(&self.partial_path, &self.final_path);
        let res = match self.token.take() {
            Some(t) => t.settle(rename),
            None => rename(),
        };
        if let Err(e) = res {
            self.token = Some(leftovers::add(Left::Partial(self.partial_path.clone())));
            return Err(e);
        }
        self.committed = true;
        files::sync_dir(&self.final_path)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if self.keep_on_failure {
            if let Some(t) = self.token.take() {
                t.kept(&self.partial_path);
            }
            return;
        }
        // Remove it only while it is still ours.
        let remove = || {
            if still_names(&self.partial_path, &self.file).unwrap_or(false) {
                let _ = std::fs::remove_file(&self.partial_path);
            }
        };
        match self.token.take() {
            Some(t) => t.settle(remove),
            None => remove(),
        }
    }
}

/// Put a finished data file and its manifest into place. The manifest goes
/// first: it is bound to the data file's identity, so a crash between the
/// renames leaves a manifest that every command refuses for the old file.
/// Without a manifest, a stale `FINAL.manifest` of a replaced file is
/// removed before the new file takes the name.
pub fn commit(data: Partial, manifest: Option<Partial>) -> io::Result<()> {
    match manifest {
        Some(m) => m.commit()?,
        None => {
            let stale = crate::manifest::manifest_path(data.final_path());
            match std::fs::remove_file(&stale) {
                Ok(()) => files::sync_dir(&stale)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    data.commit()
}

/// fsync the directory holding `path`, so a rename in it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    files::sync_dir(path)
}

/// A new image being written (a backup target, a restored image): a
/// sparse raw file or a qcow2 file by imgbackup's writer.
pub enum Output {
    /// A sparse raw file.
    Raw(Arc<RawNode>),
    /// A qcow2 file by imgbackup's writer.
    Qcow2(Arc<Qcow2Writer>),
}

impl Output {
    /// Make `partial` a `format` image of `size` bytes; `cluster_size`
    /// and `backing` (name, format) apply to qcow2.
    pub fn create(
        partial: &Partial,
        format: Format,
        size: u64,
        cluster_size: u64,
        backing: Option<(String, String)>,
        compression: Compression,
    ) -> Result<Output, BlockError> {
        let path = partial.path();
        let file = partial
            .file()
            .map_err(|e| BlockError::io(crate::error::Op::Open, path, 0, 0, e))?;
        Ok(match format {
            Format::Raw => Output::Raw(Arc::new(RawNode::create_in(path, file, size)?)),
            Format::Qcow2 => Output::Qcow2(Arc::new(Qcow2Writer::create_in(
                path,
                file,
                &CreateOptions {
                    size,
                    cluster_size,
                    backing,
                    compression,
                },
            )?)),
        })
    }

    /// The node to write into.
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

/// Why a target cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Its partial file cannot be created (or another run holds it).
    #[error(transparent)]
    Partial(#[from] PartialError),
    /// The image or manifest cannot be started.
    #[error(transparent)]
    Copy(#[from] crate::copy::CopyError),
}

/// Where a job writes: a writable node while it runs, then made complete
/// and durable, then put into place ([`Target::commit`]) or given up
/// (dropped: what was written is removed, unless kept). A new kind of
/// target (a chain consolidated in place, an export through a server) is
/// one more implementation; the job does not change.
pub trait Target: Send + Sync {
    /// The final name.
    fn path(&self) -> &Path;
    /// Where it is written until it is committed.
    fn partial_path(&self) -> &Path;
    /// The node the copy writes into.
    fn node(&self) -> Arc<dyn BlockNode>;
    /// The manifest being built beside it, if any.
    fn manifest(&self) -> Option<&Arc<crate::manifest::ManifestWriter>>;
    /// Make the image complete and durable (flush; a qcow2 gets its
    /// metadata). Nothing is written into the node afterwards.
    fn complete(&self) -> Result<(), BlockError>;
    /// Open what was written for reading, through its backing chain.
    fn reopen(&self) -> Result<crate::node::probe::Image, BlockError>;
    /// The identity the manifest is bound to (taken after `complete`).
    fn binding(&self) -> io::Result<crate::manifest::FileBinding>;
    /// Keep what was written if the job fails.
    fn keep_on_failure(&mut self);
    /// Put it into place: the manifest first (bound to the file), then the
    /// file; a stale manifest of a replaced file is removed.
    fn commit(self: Box<Self>) -> io::Result<()>;
    /// Give up: remove what was written, unless
    /// [`Target::keep_on_failure`] asked to keep it. A target dropped
    /// without [`Target::commit`] is aborted the same way.
    fn abort(self: Box<Self>);
}

/// What a [`FileTarget`] is made of.
#[derive(Debug, Clone)]
pub struct FileTargetSpec {
    /// The final name.
    pub path: PathBuf,
    /// Raw or qcow2.
    pub format: Format,
    /// Virtual size, bytes.
    pub size: u64,
    /// qcow2 cluster size.
    pub cluster_size: u64,
    /// Backing file name and format written into a qcow2.
    pub backing: Option<(String, String)>,
    /// The manifest's geometry (None: no manifest).
    pub manifest: Option<crate::manifest::Geometry>,
    /// The manifest's chunk digest.
    pub digest: crate::manifest::DigestAlgo,
    /// Permission bits of the new files.
    pub mode: u32,
    /// How compressed clusters are compressed (a qcow2 target).
    pub compression: Compression,
    /// Keep the partial files when the job fails.
    pub keep_partial: bool,
    /// Wait this long for another run writing the same target.
    pub wait: Option<Duration>,
}

/// A raw or qcow2 file with its manifest: `PATH.partial` and
/// `PATH.manifest.partial`, renamed into place by [`Target::commit`].
pub struct FileTarget {
    spec: FileTargetSpec,
    partial: Partial,
    output: Output,
    mpartial: Option<Partial>,
    manifest: Option<Arc<crate::manifest::ManifestWriter>>,
}

impl FileTarget {
    /// Create the partial files (locked: a second run on the same target is
    /// refused here) and start the image and the manifest.
    pub fn create(spec: FileTargetSpec) -> Result<FileTarget, TargetError> {
        use crate::copy::CopyError;
        let partial = Partial::create(&spec.path, spec.mode, spec.keep_partial, spec.wait)?;
        let mpartial = match spec.manifest {
            Some(_) => Some(Partial::create(
                &crate::manifest::manifest_path(&spec.path),
                spec.mode,
                spec.keep_partial,
                spec.wait,
            )?),
            None => None,
        };
        let output = Output::create(
            &partial,
            spec.format,
            spec.size,
            spec.cluster_size,
            spec.backing.clone(),
            spec.compression,
        )
        .map_err(CopyError::Target)?;
        let manifest = match (&mpartial, spec.manifest) {
            (Some(mp), Some(geo)) => Some(Arc::new(
                mp.file()
                    .and_then(|f| {
                        crate::manifest::ManifestWriter::create_in(mp.path(), f, geo, spec.digest)
                    })
                    .map_err(CopyError::Manifest)?,
            )),
            _ => None,
        };
        Ok(FileTarget {
            spec,
            partial,
            output,
            mpartial,
            manifest,
        })
    }
}

impl Target for FileTarget {
    fn path(&self) -> &Path {
        self.partial.final_path()
    }

    fn partial_path(&self) -> &Path {
        self.partial.path()
    }

    fn node(&self) -> Arc<dyn BlockNode> {
        self.output.node()
    }

    fn manifest(&self) -> Option<&Arc<crate::manifest::ManifestWriter>> {
        self.manifest.as_ref()
    }

    fn complete(&self) -> Result<(), BlockError> {
        self.output.complete()
    }

    fn reopen(&self) -> Result<crate::node::probe::Image, BlockError> {
        crate::node::probe::open_image(self.partial.path(), Some(self.spec.format))
    }

    fn binding(&self) -> io::Result<crate::manifest::FileBinding> {
        self.partial.identity()
    }

    fn keep_on_failure(&mut self) {
        self.partial.keep();
    }

    fn commit(self: Box<Self>) -> io::Result<()> {
        let me = *self;
        commit(me.partial, me.mpartial)
    }

    fn abort(self: Box<Self>) {
        // The partial files remove themselves (or report that they were
        // kept) when dropped.
        drop(self);
    }
}
