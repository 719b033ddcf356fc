//! Locks (SPEC §6).
//!
//! * **imgbackup against imgbackup**: an exclusive `flock` on the image file
//!   for every command that works with an image or its bitmaps (backup,
//!   guest, bitmap changes), so a second imgbackup on the same image exits 8
//!   at once, or waits with `--wait-lock`. `flock` locks are independent of
//!   QEMU's locks.
//! * **QEMU's image locking**, honoured like qemu-img: QEMU takes OFD locks
//!   on single bytes of the image file, byte 100+i while it holds permission
//!   i and byte 200+i while it does not share it (i: 0 consistent read,
//!   1 write, 2 write-unchanged, 3 resize). A reader of every layer takes
//!   100 and 201 (it reads, and lets nobody write), after checking that
//!   nobody holds 101 (a writer such as a running QEMU): such an image is
//!   refused with exit 8 unless `--force-share`, which takes and checks no
//!   QEMU lock, like `qemu-img -U`. A writer (the `guest` command) takes
//!   100, 101 and 201, after checking 201 and 101 are free. While imgbackup
//!   holds an image, a QEMU cannot open it for writing.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;

/// How an image is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading (a backup).
    Read,
    /// Writing (the guest command).
    Write,
}

/// Who holds the lock that was refused.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{} is locked by another imgbackup (a backup, guest or bitmap command on the same image is running)", path.display())]
    /// Another imgbackup works on the image.
    Imgbackup {
        /// The file.
        path: PathBuf,
    },
    #[error("{} is held open for writing by another process (such as a running QEMU); pass --force-share to back it up anyway", path.display())]
    /// Another process (a QEMU) holds it open for writing.
    Writer {
        /// The file.
        path: PathBuf,
    },
    #[error("{} is in use by another process that does not let others write it (such as a QEMU using it as a backing file)", path.display())]
    /// Another process does not let others write it.
    NoWrite {
        /// The file.
        path: PathBuf,
    },
    #[error("{} is being written by another imgbackup ({} is locked); wait for it to finish, or pass --wait-lock DUR", path.display(), partial.display())]
    /// Another imgbackup is writing the same target.
    Target {
        /// The file.
        path: PathBuf,
        /// Its partial file.
        partial: PathBuf,
    },
    #[error("the backup directory {} is being pruned by another imgbackup; wait for it to finish, or pass --wait-lock DUR", path.display())]
    /// `prune` holds the directory.
    Pruning {
        /// The directory.
        path: PathBuf,
    },
    #[error("the backup directory {} is in use by another imgbackup (a backup writing into it, or another prune); wait for it to finish, or pass --wait-lock DUR", path.display())]
    /// A backup writes into the directory (or another prune runs there).
    DirectoryBusy {
        /// The directory.
        path: PathBuf,
    },
    #[error("cannot lock {}", path.display())]
    /// Taking the lock failed.
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The source.
        source: io::Error,
    },
}

/// Held locks; released when dropped (the files are closed).
#[derive(Debug, Default)]
pub struct Locks {
    files: Vec<File>,
}

fn ofd(file: &File, cmd: libc::c_int, ty: libc::c_short, byte: i64) -> io::Result<libc::flock> {
    // SAFETY: flock is a plain C struct; zeroed is a valid value for it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0;
    // SAFETY: fcntl with an OFD lock command and a pointer to a live flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// True when another open file description holds a lock on `byte`.
fn held_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let fl = ofd(
        file,
        libc::F_OFD_GETLK,
        libc::F_WRLCK as libc::c_short,
        byte,
    )?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn take_shared(file: &File, byte: i64) -> io::Result<()> {
    ofd(
        file,
        libc::F_OFD_SETLK,
        libc::F_RDLCK as libc::c_short,
        byte,
    )
    .map(|_| ())
}

/// Retry `f` until it succeeds, fails for another reason than a busy lock,
/// or `wait` is over.
fn with_wait<T>(
    wait: Option<Duration>,
    mut f: impl FnMut() -> Result<T, LockError>,
) -> Result<T, LockError> {
    let deadline = wait.map(|w| Instant::now() + w);
    let mut said = false;
    loop {
        match f() {
            Err(
                e @ (LockError::Imgbackup { .. }
                | LockError::Writer { .. }
                | LockError::NoWrite { .. }
                | LockError::Target { .. }
                | LockError::Pruning { .. }
                | LockError::DirectoryBusy { .. }),
            ) => match deadline {
                Some(d) if Instant::now() < d => {
                    if !said {
                        tracing::debug!("lock: {e}; waiting up to {:?}", d - Instant::now());
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => return Err(e),
            },
            other => return other,
        }
    }
}

impl Locks {
    /// No locks held yet.
    pub fn new() -> Locks {
        Locks::default()
    }

    /// Take the exclusive imgbackup lock on `path`.
    pub fn exclusive(&mut self, path: &Path, wait: Option<Duration>) -> Result<(), LockError> {
        let io = |e| LockError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = File::open(path).map_err(io)?;
        with_wait(wait, || {
            // SAFETY: plain syscall on an open descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Err(LockError::Imgbackup {
                    path: path.to_path_buf(),
                })
            } else {
                Err(io(e))
            }
        })?;
        self.files.push(file);
        Ok(())
    }

    /// Lock the backup directory `dir`: shared for a backup writing into
    /// it (several may), exclusive for `prune` (alone). A directory that
    /// cannot be locked at all (a file system without flock) is locked by
    /// nobody: a backup goes on, a prune is refused.
    pub fn directory(
        &mut self,
        dir: &Path,
        exclusive: bool,
        wait: Option<Duration>,
    ) -> Result<(), LockError> {
        let io = |e| LockError::Io {
            path: dir.to_path_buf(),
            source: e,
        };
        let file = File::open(dir).map_err(io)?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        let r = with_wait(wait, || {
            // SAFETY: plain syscall on an open descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Err(if exclusive {
                    LockError::DirectoryBusy {
                        path: dir.to_path_buf(),
                    }
                } else {
                    LockError::Pruning {
                        path: dir.to_path_buf(),
                    }
                })
            } else {
                Err(io(e))
            }
        });
        match r {
            Ok(()) => {
                self.files.push(file);
                Ok(())
            }
            Err(LockError::Io { source, .. }) if !exclusive => {
                tracing::warn!(
                    "cannot lock the directory {} ({source}); a prune there would not wait for this backup",
                    dir.display()
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Take QEMU's locks on `path` for `access` (nothing with `force_share`).
    pub fn qemu(
        &mut self,
        path: &Path,
        access: Access,
        force_share: bool,
        wait: Option<Duration>,
    ) -> Result<(), LockError> {
        if force_share {
            return Ok(());
        }
        let io = |e| LockError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = File::open(path).map_err(io)?;
        let mut bytes = vec![PERM_BASE + PERM_CONSISTENT_READ, SHARED_BASE + PERM_WRITE];
        if access == Access::Write {
            bytes.push(PERM_BASE + PERM_WRITE);
        }
        // Take ours first, then look for conflicts (as QEMU does), so two
        // processes racing see each other.
        for &b in &bytes {
            match take_shared(&file, b) {
                Ok(()) => {}
                // File systems without OFD locks: nothing to honour.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(io(e)),
            }
        }
        with_wait(wait, || {
            if held_by_others(&file, PERM_BASE + PERM_WRITE).map_err(io)? {
                return Err(LockError::Writer {
                    path: path.to_path_buf(),
                });
            }
            if access == Access::Write
                && held_by_others(&file, SHARED_BASE + PERM_WRITE).map_err(io)?
            {
                return Err(LockError::NoWrite {
                    path: path.to_path_buf(),
                });
            }
            Ok(())
        })?;
        self.files.push(file);
        Ok(())
    }
}
