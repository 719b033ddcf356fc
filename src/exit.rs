//! Exit codes (SPEC §5) and the classification of an error chain.

use crate::copy::CopyError;
use crate::error::BlockError;
use crate::job::JobError;
use crate::job::cancel::Reason;

/// The exit codes of imgbackup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exit {
    /// 0: the command did what was asked.
    #[default]
    Success = 0,
    /// 1: a failure not covered below.
    Failure = 1,
    /// 2: a bad option, value or combination.
    Usage = 2,
    /// 3: finished, but an ignore policy skipped clusters.
    Skipped = 3,
    /// 4: the source could not be read (or changed underneath).
    SourceRead = 4,
    /// 5: the target could not be written (no space, a size limit).
    TargetWrite = 5,
    /// 6: a bitmap is missing, inconsistent, stale, or names the wrong parent.
    Bitmap = 6,
    /// 7: data does not match what was recorded.
    Mismatch = 7,
    /// 8: an image or target is locked by another process.
    Locked = 8,
    /// 9: --timeout expired.
    Timeout = 9,
    /// 129: stopped by SIGHUP.
    Hangup = 129,
    /// 130: interrupted by SIGINT.
    Interrupted = 130,
    /// 143: terminated by SIGTERM.
    Terminated = 143,
}

impl From<Reason> for Exit {
    fn from(r: Reason) -> Exit {
        match r {
            Reason::Interrupt => Exit::Interrupted,
            Reason::Terminate => Exit::Terminated,
            Reason::Hangup => Exit::Hangup,
            Reason::Timeout => Exit::Timeout,
        }
    }
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The exit of a process code (an unknown code is a failure).
    pub fn from_code(code: i32) -> Exit {
        [
            Exit::Success,
            Exit::Usage,
            Exit::Skipped,
            Exit::SourceRead,
            Exit::TargetWrite,
            Exit::Bitmap,
            Exit::Mismatch,
            Exit::Locked,
            Exit::Timeout,
            Exit::Hangup,
            Exit::Interrupted,
            Exit::Terminated,
        ]
        .into_iter()
        .find(|e| e.code() == code)
        .unwrap_or(Exit::Failure)
    }
}

/// A failure decided and explained by another imgbackup process (a served
/// image's server ran the command): its exit code, causes and hint, passed
/// on as they are.
#[derive(Debug)]
pub struct Reported {
    /// The exit code.
    pub exit: Exit,
    /// The error and its causes, outermost first, joined.
    pub message: String,
    /// What to do next.
    pub hint: Option<String>,
}

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Reported {}

/// The causes of `err`, outermost first, with the error inside each
/// transparent [`JobError`] variant listed too (its own `source()` skips
/// it), so every cause can be found by its type.
pub fn causes(err: &anyhow::Error) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut out: Vec<&(dyn std::error::Error + 'static)> = Vec::new();
    for c in err.chain() {
        out.push(c);
        if let Some(j) = c.downcast_ref::<JobError>() {
            let inner: Option<&(dyn std::error::Error + 'static)> = match j {
                JobError::Lock(e) => Some(e),
                JobError::Bitmap(e) => Some(e),
                JobError::Partial(e) => Some(e),
                JobError::Manifest(e) => Some(e),
                JobError::Copy(e) => Some(e),
                JobError::Block(e) => Some(e),
                _ => None,
            };
            if let Some(i) = inner {
                out.push(i);
                if let Some(crate::target::PartialError::Locked(l)) =
                    i.downcast_ref::<crate::target::PartialError>()
                {
                    out.push(l);
                }
            }
        }
    }
    out
}

/// The first cause of type `T`.
fn find<T: std::error::Error + 'static>(err: &anyhow::Error) -> Option<&T> {
    causes(err).into_iter().find_map(|c| c.downcast_ref::<T>())
}

/// The exit code of one cause, if its type decides one.
fn classify_one(cause: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    if let Some(r) = cause.downcast_ref::<Reported>() {
        return Some(r.exit);
    }
    if let Some(e) = cause.downcast_ref::<JobError>() {
        return match e {
            JobError::Usage(_) => Some(Exit::Usage),
            JobError::Refused(_) | JobError::Internal(_) => Some(Exit::Failure),
            JobError::Cancelled(r) => Some(Exit::from(*r)),
            JobError::Mismatch { .. } | JobError::Verify(_) => Some(Exit::Mismatch),
            // Decided by what is inside (listed next by `causes`).
            _ => None,
        };
    }
    if let Some(b) = cause.downcast_ref::<crate::bitmap::BitmapError>() {
        use crate::bitmap::BitmapError as B;
        return match b {
            B::Missing { .. } | B::Inconsistent { .. } | B::Damaged { .. } | B::Parent { .. } => {
                Some(Exit::Bitmap)
            }
            B::BadName(_) => Some(Exit::Usage),
            // A full file system (or a size limit) under the bitmap file.
            B::Io { source, .. } if crate::job::policy::is_nospace_io(source) => {
                Some(Exit::TargetWrite)
            }
            B::Exists { .. } | B::Io { .. } => None,
        };
    }
    if cause
        .downcast_ref::<crate::lock::LockError>()
        .is_some_and(|l| !matches!(l, crate::lock::LockError::Io { .. }))
    {
        return Some(Exit::Locked);
    }
    if let Some(
        crate::manifest::ManifestError::Unbound { .. }
        | crate::manifest::ManifestError::Parent { .. }
        | crate::manifest::ManifestError::Backing { .. },
    ) = cause.downcast_ref::<crate::manifest::ManifestError>()
    {
        return Some(Exit::Mismatch);
    }
    match cause.downcast_ref::<crate::target::PartialError>() {
        Some(crate::target::PartialError::Io { .. }) => return Some(Exit::TargetWrite),
        Some(crate::target::PartialError::Locked(_)) => return Some(Exit::Locked),
        None => {}
    }
    if let Some(e) = cause.downcast_ref::<CopyError>() {
        return Some(match e {
            CopyError::Source(_) => Exit::SourceRead,
            CopyError::Target(_) => Exit::TargetWrite,
            CopyError::Cancelled | CopyError::Timeout { .. } => Exit::Failure,
            CopyError::Mismatch { .. } => Exit::Mismatch,
            CopyError::ManifestRead(
                crate::manifest::ManifestError::Unbound { .. }
                | crate::manifest::ManifestError::Parent { .. }
                | crate::manifest::ManifestError::Backing { .. }
                | crate::manifest::ManifestError::Damaged { .. },
            ) => Exit::Mismatch,
            CopyError::Manifest(_) | CopyError::ManifestRead(_) => Exit::TargetWrite,
        });
    }
    None
}

/// Walk the causes of `err` and pick the exit code of the first one that
/// has one.
pub fn classify(err: &anyhow::Error) -> Exit {
    causes(err)
        .into_iter()
        .find_map(classify_one)
        .unwrap_or(Exit::Failure)
}

/// What was left on disk, for the end of a hint.
fn left_behind() -> String {
    let kept = crate::leftovers::kept();
    if kept.is_empty() {
        "No target was left behind.".into()
    } else {
        format!(
            "The partial file was kept: {}.",
            kept.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The hint for a bitmap error: the real image, bitmap and backup names.
fn bitmap_hint(err: &anyhow::Error) -> String {
    use crate::bitmap::BitmapError as B;
    let b = find::<B>(err);
    match b {
        Some(B::Parent { image, .. })
            if crate::nbd::client::is_uri(&image.to_string_lossy()) =>
        {
            format!(
                "an incremental of an NBD export needs QEMU's bitmap exported with it and --backing naming the previous backup of the same export; without one, take a full backup of {} (and let QEMU's bitmap track from that point: docs/live-vms.md)",
                image.display()
            )
        }
        Some(B::Inconsistent { name, image, .. } | B::Parent { name, image, .. }) => {
            let anchor = crate::bitmap::Bitmap::load(image, name)
                .ok()
                .and_then(|b| b.anchor)
                .map(|a| a.path)
                .filter(|p| p.exists());
            format!(
                "a bitmap that is inconsistent, stale or not tied to an existing backup is never trusted; recover with {}",
                crate::leftovers::recover_bitmap(image, name, anchor.as_deref())
            )
        }
        Some(B::Missing { name, image, .. }) => format!(
            "a full backup of {} with `--bitmap {name}` creates the bitmap and anchors it to that backup",
            image.display()
        ),
        Some(B::Damaged { path, .. }) => format!(
            "the bitmap file {} is damaged and is never trusted; a full backup with --bitmap of the same name starts it afresh",
            path.display()
        ),
        _ => "a bitmap that is inconsistent or stale is never trusted; make a full backup with --bitmap to start a new chain".into(),
    }
}

/// What to do next, for the error's class.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    if let Some(r) = find::<Reported>(err) {
        return r.hint.clone();
    }
    let code = classify(err);
    let block = find::<BlockError>(err);
    match code {
        Exit::SourceRead => Some(match block {
            Some(BlockError::Changed { .. }) => format!(
                "stop whatever writes the source (or back up a running VM through QEMU), then run the backup again. {}",
                left_behind()
            ),
            Some(BlockError::Io { path, .. })
                if crate::nbd::client::is_uri(&path.to_string_lossy()) =>
            {
                format!(
                    "the NBD server failed the read or dropped the connection (qemu-nbd and QEMU drop it when their image cannot be read there): see the server's log; `--on-source-error retry` connects again. {}",
                    left_behind()
                )
            }
            _ => format!(
                "the source image is damaged or unreadable there; check it with `qemu-img check`, and restore it from an older backup if it is damaged. {}",
                left_behind()
            ),
        }),
        Exit::TargetWrite => {
            let nospc = crate::job::policy::is_nospace(block.and_then(BlockError::errno))
                || find::<crate::bitmap::BitmapError>(err).is_some_and(|b| {
                    matches!(b, crate::bitmap::BitmapError::Io { source, .. } if crate::job::policy::is_nospace_io(source))
                });
            Some(if nospc {
                format!("the file system is full (or a size or quota limit was hit); free space or choose another target. {}", left_behind())
            } else {
                format!("check the target's file system (permissions, space, health). {}", left_behind())
            })
        }
        Exit::Mismatch => Some(
            if matches!(find::<crate::manifest::ManifestError>(err), Some(crate::manifest::ManifestError::Unbound { .. })) {
                "the manifest belongs to another file: the backup was replaced or rewritten, or a replacement was interrupted; do not rely on it: make the backup again (with --force to replace it)".into()
            } else if matches!(find::<crate::manifest::ManifestError>(err), Some(crate::manifest::ManifestError::Backing { .. })) {
                "the backup takes these chunks from its backing file, which is no longer the one it was made with: restore the backing file it was made with, or make a new backup (--sync full does not depend on one)".into()
            } else if matches!(find::<crate::manifest::ManifestError>(err), Some(crate::manifest::ManifestError::Parent { .. })) {
                "this backup's manifest is checked through its parent's: put the parent backup's manifest back beside it (restore --no-verify reads the chain without checking)".into()
            } else {
                "the data does not match what was recorded; do not rely on this backup: make a new full backup (and check the storage it lives on)".into()
            },
        ),
        Exit::Bitmap => Some(bitmap_hint(err)),
        Exit::Locked => Some(
            match find::<crate::target::PartialError>(err) {
                Some(crate::target::PartialError::Locked(crate::lock::LockError::Target { path, .. })) => format!(
                    "another imgbackup is writing {}; wait for it to finish (or pass --wait-lock DUR)",
                    path.display()
                ),
                _ => "wait for the other process to finish (or pass --wait-lock DUR); for a running VM, back it up through QEMU or pass --force-share".into(),
            },
        ),
        Exit::Interrupted | Exit::Terminated | Exit::Hangup | Exit::Timeout => Some(format!(
            "the command was cancelled cleanly. {} Run it again to finish the job.",
            left_behind()
        )),
        _ => match block {
            Some(BlockError::Unsupported { .. }) => Some(
                "convert the image to a plain qcow2 or raw image first, e.g. `qemu-img convert -O qcow2 IMAGE NEW.qcow2`".into(),
            ),
            Some(BlockError::Corrupt { path, .. }) => Some(format!(
                "the image is damaged; `qemu-img check {}` shows the damage and `qemu-img check -r all` may repair it",
                path.display()
            )),
            Some(BlockError::Io { path, .. })
                if crate::nbd::client::is_uri(&path.to_string_lossy()) =>
            {
                Some("check that the NBD server is running and exports that name (e.g. `nbdinfo --list URI`); under --on-source-error retry, a dropped connection is opened again".into())
            }
            Some(BlockError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Some("check the path; it must name an existing file".into())
            }
            Some(BlockError::Io { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                Some("check the file's permissions".into())
            }
            _ => None,
        },
    }
}
