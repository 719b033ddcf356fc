//! clap's view of the job vocabulary: `ValueEnum` mirrors of the core's
//! enums (which know nothing of clap), turned into them with `From`. The
//! doc comments are the help text of each value.

use crate::job::policy::ErrorPolicy;
use crate::job::sync_mode::{BitmapMode, SyncMode};
use crate::node::cbw::OnCbwError;
use crate::node::probe::Format;
use clap::ValueEnum;

/// The sync modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncArg {
    /// Copy every cluster of the image.
    Full,
    /// Copy only the clusters allocated in the top image of SOURCE's
    /// backing chain (the target's backing file is SOURCE's backing file).
    Top,
    /// Copy the clusters dirty in --bitmap; clear them on success (bitmap
    /// with --bitmap-mode on-success).
    Incremental,
    /// Copy the clusters dirty in --bitmap, with --bitmap-mode.
    Bitmap,
    /// Copy only what the guest is about to overwrite (fleecing; needs
    /// --guest with count= or duration=, and a qcow2 target backed by SOURCE).
    None,
}

impl From<SyncArg> for SyncMode {
    fn from(a: SyncArg) -> SyncMode {
        match a {
            SyncArg::Full => SyncMode::Full,
            SyncArg::Top => SyncMode::Top,
            SyncArg::Incremental => SyncMode::Incremental,
            SyncArg::Bitmap => SyncMode::Bitmap,
            SyncArg::None => SyncMode::None,
        }
    }
}

/// What happens to the bitmap after a job (QEMU's bitmap sync modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BitmapModeArg {
    /// Clear what was copied only if the job succeeds.
    OnSuccess,
    /// Clear what was copied even if the job fails.
    Always,
    /// Leave the bitmap as it was (differential backups).
    Never,
}

impl From<BitmapModeArg> for BitmapMode {
    fn from(a: BitmapModeArg) -> BitmapMode {
        match a {
            BitmapModeArg::OnSuccess => BitmapMode::OnSuccess,
            BitmapModeArg::Always => BitmapMode::Always,
            BitmapModeArg::Never => BitmapMode::Never,
        }
    }
}

/// A manifest's chunk digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DigestArg {
    /// SHA-256.
    Sha256,
    /// BLAKE3.
    Blake3,
}

impl From<DigestArg> for crate::manifest::DigestAlgo {
    fn from(a: DigestArg) -> crate::manifest::DigestAlgo {
        match a {
            DigestArg::Sha256 => crate::manifest::DigestAlgo::Sha256,
            DigestArg::Blake3 => crate::manifest::DigestAlgo::Blake3,
        }
    }
}

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// A raw image: the bytes are the disk.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(a: FormatArg) -> Format {
        match a {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

/// What a failed copy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ErrorPolicyArg {
    /// Fail the job.
    Report,
    /// Skip the failing clusters, leave them dirty, finish with exit 3.
    Ignore,
    /// Retry up to --retries times, then report.
    Retry,
    /// Retry only when the file system or quota is full.
    Enospc,
}

impl From<ErrorPolicyArg> for ErrorPolicy {
    fn from(a: ErrorPolicyArg) -> ErrorPolicy {
        match a {
            ErrorPolicyArg::Report => ErrorPolicy::Report,
            ErrorPolicyArg::Ignore => ErrorPolicy::Ignore,
            ErrorPolicyArg::Retry => ErrorPolicy::Retry,
            ErrorPolicyArg::Enospc => ErrorPolicy::Enospc,
        }
    }
}

/// What a failed copy-before-write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnCbwErrorArg {
    /// The guest write fails; the backup stays consistent.
    BreakGuestWrite,
    /// The guest write proceeds and the job fails.
    BreakSnapshot,
}

impl From<OnCbwErrorArg> for OnCbwError {
    fn from(a: OnCbwErrorArg) -> OnCbwError {
        match a {
            OnCbwErrorArg::BreakGuestWrite => OnCbwError::BreakGuestWrite,
            OnCbwErrorArg::BreakSnapshot => OnCbwError::BreakSnapshot,
        }
    }
}
