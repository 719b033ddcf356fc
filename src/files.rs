//! The files imgbackup opens and creates, and what it refuses to.
//!
//! * **Kinds.** An image is a regular file or a block device (an LVM
//!   volume, a loop device, a disk). Directories, character devices, FIFOs
//!   and sockets are refused before `open`, and every open is
//!   non-blocking, so a FIFO named as an image is an error, never a hang.
//! * **Sizes.** A block device's size comes from the kernel
//!   (`BLKGETSIZE64`), not from `st_size` (which is 0).
//! * **New files** are created exclusively and without following links
//!   (`O_CREAT | O_EXCL | O_NOFOLLOW`): a leftover or planted file of that
//!   name (a symlink to `/etc/passwd`, a hard link) is unlinked first, never
//!   opened, so nothing outside the new file is ever written.
//! * **Modes.** A new file is never more readable than the file it is made
//!   from: it gets that file's permission bits (less the umask).

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// What an image file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    Regular,
    /// A block device.
    Block,
}

/// Why a path cannot be an image.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    #[error("{}: {what}, not a disk image; name a regular file or a block device", path.display())]
    /// Not a regular file or block device.
    NotAnImage {
        /// The file.
        path: PathBuf,
        /// What was cancelled.
        what: &'static str,
    },
    #[error("cannot open {}", path.display())]
    /// The file cannot be examined or opened.
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The source.
        source: io::Error,
    },
}

impl KindError {
    /// The underlying I/O error, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            KindError::Io { source, .. } => Some(source),
            KindError::NotAnImage { .. } => None,
        }
    }
}

/// The kind of an image file, from its metadata; `Err` names what else it is.
pub fn kind_of(meta: &Metadata) -> Result<Kind, &'static str> {
    let t = meta.file_type();
    if t.is_file() {
        Ok(Kind::Regular)
    } else if t.is_block_device() {
        Ok(Kind::Block)
    } else if t.is_dir() {
        Err("is a directory")
    } else if t.is_char_device() {
        Err("is a character device")
    } else if t.is_fifo() {
        Err("is a FIFO (named pipe)")
    } else if t.is_socket() {
        Err("is a socket")
    } else {
        Err("is not a regular file or block device")
    }
}

/// Check `path` (following symlinks) before opening it as an image.
pub fn check_image_path(path: &Path) -> Result<Kind, KindError> {
    let meta = std::fs::metadata(path).map_err(|e| KindError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    kind_of(&meta).map_err(|what| KindError::NotAnImage {
        path: path.to_path_buf(),
        what,
    })
}

/// Open an image file read-only (or read-write), refusing what is not an
/// image without blocking: the kind is checked before and after the open.
pub fn open_image_file(path: &Path, write: bool) -> Result<(File, Kind), KindError> {
    check_image_path(path)?;
    let io = |e| KindError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let kind = kind_of(&meta).map_err(|what| KindError::NotAnImage {
        path: path.to_path_buf(),
        what,
    })?;
    clear_nonblock(&file).map_err(io)?;
    Ok((file, kind))
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size of a block device, from the kernel.
pub fn device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `size`, which lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The length of an image file: `st_size`, or the device size.
pub fn file_len(file: &File, kind: Kind) -> io::Result<u64> {
    match kind {
        Kind::Regular => Ok(file.metadata()?.len()),
        Kind::Block => device_size(file),
    }
}

/// The directory holding `path` (`.` for a bare name).
pub fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// fsync the directory holding `path`, so a rename or unlink in it is durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(dir_of(path))?.sync_all()
}

/// The permission bits a file made from `from` gets: those of `from`
/// (read and write bits only), so it is never more readable. 0600 when
/// `from` cannot be read.
pub fn mode_from(from: &Path) -> u32 {
    std::fs::metadata(from)
        .map(|m| m.mode() & 0o666)
        .unwrap_or(0o600)
}

/// Remove whatever is at `path` (a leftover file, a symlink, a hard link)
/// without following it. A missing file is fine; a directory is an error.
pub fn unlink_leftover(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        )),
        Ok(_) => match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
    }
}

/// Create `path` as a new, empty file with `mode` (less the umask): never
/// through a symlink, never an existing file. Fails with `AlreadyExists` if
/// something appears at `path` meanwhile.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The (device, inode) of `path`, following symlinks.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// `path` with its directory resolved (symlinks in the directory followed,
/// the last component kept as written): how two names for a file that may
/// not exist yet are compared.
pub fn resolved(path: &Path) -> PathBuf {
    let dir = std::fs::canonicalize(dir_of(path)).unwrap_or_else(|_| dir_of(path));
    match path.file_name() {
        Some(n) => dir.join(n),
        None => dir,
    }
}

/// True when `a` and `b` name the same file: the same resolved path, or
/// (both existing) the same device and inode (a hard link, a symlink).
pub fn same_file(a: &Path, b: &Path) -> bool {
    if resolved(a) == resolved(b) {
        return true;
    }
    matches!((file_id(a), file_id(b)), (Some(x), Some(y)) if x == y)
}

/// `PATH` with `suffix` appended to its file name (`disk.qcow2` →
/// `disk.qcow2.partial`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_exclusive_creation() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(check_image_path(&f).unwrap(), Kind::Regular);
        assert!(check_image_path(dir.path()).is_err());
        assert!(check_image_path(Path::new("/dev/null")).is_err());
        // A planted symlink is removed, not followed.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(create_new(&link, 0o600).is_err());
        unlink_leftover(&link).unwrap();
        let mut n = create_new(&link, 0o600).unwrap();
        std::io::Write::write_all(&mut n, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::metadata(&link).unwrap().mode() & 0o777, 0o600);
        assert!(same_file(&link, &dir.path().join(".").join("link")));
        assert!(!same_file(&link, &victim));
    }
}
