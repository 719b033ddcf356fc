//! Why a job failed, typed. Each variant describes its own layer; the cause
//! sits in `#[source]` (or is the error itself, for the transparent ones),
//! and the exit code is chosen from the type at the edge (`crate::exit`).

use super::cancel::Reason;
use crate::bitmap::BitmapError;
use crate::copy::CopyError;
use crate::error::BlockError;
use crate::lock::LockError;
use crate::manifest::ManifestError;
use crate::target::PartialError;

/// A job's failure.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A bad combination of settings, found before anything was done.
    #[error("{0}")]
    Usage(String),
    /// Refused before anything was written: an existing target without
    /// `--force`, a missing directory, a special file.
    #[error("{0}")]
    Refused(String),
    /// Cancelled by a signal or `--timeout`.
    #[error("the job was {}", .0.describe())]
    Cancelled(Reason),
    /// The data does not match what was recorded.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Content differs from what it was compared with.
    #[error("verification failed: {what} differs from {against} at offset {offset}")]
    Mismatch {
        /// What was checked.
        what: String,
        /// What it was compared with.
        against: String,
        /// The first differing byte.
        offset: u64,
    },
    /// A step of the job failed: what it was, and why.
    #[error("{what}")]
    Step {
        /// The step, in words ("cannot open the source image").
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A lock is held by someone else.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A bitmap cannot be used.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// The target's partial file cannot be created.
    #[error(transparent)]
    Partial(#[from] PartialError),
    /// A manifest cannot be used.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A copy failed.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// A block node failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A broken promise inside imgbackup; nothing was committed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl JobError {
    /// `what` failed because of `source`.
    pub fn step(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> JobError {
        JobError::Step {
            what: what.into(),
            source: Box::new(source),
        }
    }

    /// A closure for `map_err`: `what` failed because of its argument.
    pub fn context<E: std::error::Error + Send + Sync + 'static>(
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> JobError {
        let what = what.into();
        move |e| JobError::step(what, e)
    }

    /// Wrap this error as the cause of `what`.
    pub fn within(self, what: impl Into<String>) -> JobError {
        JobError::step(what, self)
    }
}

/// A job's result.
pub type Result<T, E = JobError> = std::result::Result<T, E>;
