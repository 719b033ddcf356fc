//! Exit codes (SPEC §5) and the classification of an error chain.

use crate::copy::CopyError;
use crate::error::BlockError;
use crate::job::cancel::Reason;

/// The exit codes of imgbackup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    Failure = 1,
    Usage = 2,
    Skipped = 3,
    SourceRead = 4,
    TargetWrite = 5,
    Bitmap = 6,
    Mismatch = 7,
    Locked = 8,
    Timeout = 9,
    Interrupted = 130,
    Terminated = 143,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// An error that already knows its exit code: usage problems found after
/// parsing, and cancelled jobs.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Usage(String),
    #[error("the job was {}", .0.describe())]
    Cancelled(Reason),
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("verification failed: {what} differs from {against} at offset {offset}")]
    Mismatch {
        what: String,
        against: String,
        offset: u64,
    },
}

/// Walk the chain of `err` and pick the exit code of the first cause that
/// has one.
pub fn classify(err: &anyhow::Error) -> Exit {
    // anyhow finds a context value at any layer; the chain below finds the
    // error types.
    let app = err.downcast_ref::<AppError>();
    for cause in app
        .map(|a| a as &(dyn std::error::Error + 'static))
        .into_iter()
        .chain(err.chain())
    {
        if let Some(e) = cause.downcast_ref::<AppError>() {
            return match e {
                AppError::Usage(_) => Exit::Usage,
                AppError::Cancelled(Reason::Interrupt) => Exit::Interrupted,
                AppError::Cancelled(Reason::Terminate) => Exit::Terminated,
                AppError::Cancelled(Reason::Timeout) => Exit::Timeout,
                AppError::Mismatch { .. } | AppError::Verify(_) => Exit::Mismatch,
            };
        }
        if let Some(b) = cause.downcast_ref::<crate::bitmap::BitmapError>() {
            use crate::bitmap::BitmapError as B;
            match b {
                B::Missing { .. } | B::Inconsistent { .. } | B::Damaged { .. } => {
                    return Exit::Bitmap;
                }
                B::BadName(_) => return Exit::Usage,
                B::Exists { .. } | B::Io { .. } => {}
            }
        }
        if cause
            .downcast_ref::<crate::lock::LockError>()
            .is_some_and(|l| !matches!(l, crate::lock::LockError::Io { .. }))
        {
            return Exit::Locked;
        }
        if let Some(e) = cause.downcast_ref::<CopyError>() {
            return match e {
                CopyError::Source(_) => Exit::SourceRead,
                CopyError::Target(_) => Exit::TargetWrite,
                CopyError::Cancelled | CopyError::Timeout { .. } => Exit::Failure,
                CopyError::Mismatch { .. } => Exit::Mismatch,
                CopyError::Manifest(_) => Exit::TargetWrite,
            };
        }
    }
    Exit::Failure
}

/// What to do next, for the error's class.
pub fn hint(err: &anyhow::Error) -> Option<String> {
    let code = classify(err);
    let block = err.chain().find_map(|c| c.downcast_ref::<BlockError>());
    match code {
        Exit::SourceRead => Some(
            "the source image is damaged or unreadable there; check it with `qemu-img check`, and restore it from an older backup if it is damaged. No target was written."
                .into(),
        ),
        Exit::TargetWrite => {
            let nospc = block.and_then(|b| b.errno()).is_some_and(|e| e == libc::ENOSPC || e == libc::EDQUOT || e == libc::EFBIG);
            Some(if nospc {
                "the target's file system is full (or a size or quota limit was hit); free space or choose another target. No target was left behind.".into()
            } else {
                "check the target's file system (permissions, space, health). No target was left behind.".into()
            })
        }
        Exit::Mismatch => Some(
            "the data does not match what was recorded; do not rely on this backup: make a new full backup (and check the storage it lives on)"
                .into(),
        ),
        Exit::Bitmap => Some(
            "an inconsistent or stale bitmap is never trusted: run `imgbackup bitmap rebuild IMAGE NAME --against LAST_BACKUP` to mark what changed since that backup, or make a full backup with `--bitmap NAME` to start a new chain"
                .into(),
        ),
        Exit::Locked => Some(
            "wait for the other process to finish (or pass --wait-lock DUR); for a running VM, back it up through QEMU or pass --force-share"
                .into(),
        ),
        Exit::Interrupted | Exit::Terminated | Exit::Timeout => {
            Some("the backup was cancelled cleanly; no target was left behind. Run it again to make a backup.".into())
        }
        _ => match block {
            Some(BlockError::Unsupported { .. }) => Some(
                "convert the image to a plain qcow2 or raw image first, e.g. `qemu-img convert -O qcow2 IMAGE NEW.qcow2`".into(),
            ),
            Some(BlockError::Corrupt { path, .. }) => Some(format!(
                "the image is damaged; `qemu-img check {}` shows the damage and `qemu-img check -r all` may repair it",
                path.display()
            )),
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
