//! Error policies (`--on-source-error`, `--on-target-error`): what a failed
//! copy of a claimed range does.
//!
//! * `report` fails the job (exit 4 or 5);
//! * `ignore` skips the failing clusters: they get their copy bit back (and
//!   stay dirty in a bitmap), no progress credit, and the job finishes with
//!   exit 3, listing them;
//! * `retry` tries the range again up to `--retries` times, waiting
//!   `--retry-delay` and doubling up to `--retry-max-delay`, then reports;
//! * `enospc` retries like `retry` only when the cause is ENOSPC, EDQUOT or
//!   EFBIG (the target's file system or quota is full), and reports any
//!   other error at once.

use crate::copy::CopyError;
use std::time::Duration;

/// One policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// Fail the job.
    Report,
    /// Skip the failing clusters (exit 3).
    Ignore,
    /// Retry, then fail.
    Retry,
    /// Retry only when the file system or quota is full.
    Enospc,
}

/// The policies of a job.
#[derive(Debug, Clone, Copy)]
pub struct Policies {
    /// Policy for source read errors.
    pub source: ErrorPolicy,
    /// Policy for target write errors.
    pub target: ErrorPolicy,
    /// Retries before giving up.
    pub retries: u32,
    /// Wait before the first retry.
    pub delay: Duration,
    /// Longest wait between retries.
    pub max_delay: Duration,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            source: ErrorPolicy::Report,
            target: ErrorPolicy::Report,
            retries: 3,
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// What to do with a failed copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Give up: the job fails.
    Fail,
    /// Skip the range: it stays to be copied.
    Ignore,
    /// Try again after this wait.
    RetryAfter(Duration),
}

/// True for "no space" causes.
pub fn is_nospace(errno: Option<i32>) -> bool {
    matches!(errno, Some(e) if e == libc::ENOSPC || e == libc::EDQUOT || e == libc::EFBIG)
}

/// True for an I/O error that means "no space" (also when the errno was
/// wrapped, as `tempfile` does with the path).
pub fn is_nospace_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    is_nospace(e.raw_os_error())
        || matches!(
            e.kind(),
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge
        )
}

impl Policies {
    /// The decision for `err` after `attempt` retries of the same range.
    pub fn decide(&self, err: &CopyError, attempt: u32) -> Decision {
        let policy = match err {
            CopyError::Source(_) => self.source,
            CopyError::Target(_) | CopyError::Manifest(_) | CopyError::ManifestRead(_) => {
                self.target
            }
            CopyError::Cancelled | CopyError::Timeout { .. } | CopyError::Mismatch { .. } => {
                return Decision::Fail;
            }
        };
        let retry = || {
            if attempt >= self.retries {
                return Decision::Fail;
            }
            let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
            Decision::RetryAfter(self.delay.saturating_mul(factor).min(self.max_delay))
        };
        match policy {
            ErrorPolicy::Report => Decision::Fail,
            ErrorPolicy::Ignore => Decision::Ignore,
            ErrorPolicy::Retry => retry(),
            ErrorPolicy::Enospc if is_nospace(err.errno()) => retry(),
            ErrorPolicy::Enospc => Decision::Fail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{BlockError, Op};

    fn err(target: bool, errno: i32) -> CopyError {
        let e = BlockError::io(
            Op::Write,
            "/x",
            0,
            1,
            std::io::Error::from_raw_os_error(errno),
        );
        if target {
            CopyError::Target(e)
        } else {
            CopyError::Source(e)
        }
    }

    #[test]
    fn decisions() {
        let p = Policies {
            source: ErrorPolicy::Retry,
            target: ErrorPolicy::Enospc,
            retries: 3,
            delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
        };
        assert_eq!(
            p.decide(&err(false, libc::EIO), 0),
            Decision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(&err(false, libc::EIO), 1),
            Decision::RetryAfter(Duration::from_millis(200))
        );
        assert_eq!(
            p.decide(&err(false, libc::EIO), 2),
            Decision::RetryAfter(Duration::from_millis(250))
        );
        assert_eq!(p.decide(&err(false, libc::EIO), 3), Decision::Fail);
        assert_eq!(p.decide(&err(true, libc::EIO), 0), Decision::Fail);
        assert_eq!(
            p.decide(&err(true, libc::ENOSPC), 0),
            Decision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(&err(true, libc::EFBIG), 0),
            Decision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(p.decide(&err(true, libc::EDQUOT), 3), Decision::Fail);
        let d = Policies::default();
        assert_eq!(d.decide(&err(true, libc::ENOSPC), 0), Decision::Fail);
        let i = Policies {
            source: ErrorPolicy::Ignore,
            ..d
        };
        assert_eq!(i.decide(&err(false, libc::EIO), 9), Decision::Ignore);
        assert_eq!(i.decide(&CopyError::Cancelled, 0), Decision::Fail);
    }
}
