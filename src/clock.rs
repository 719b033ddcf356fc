//! The wall clock backups record (`started`, `finished` in manifests and
//! summaries, what `prune`'s retention rules read).
//!
//! `IMGBACKUP_NOW` (RFC 3339) sets the time the process starts at, for
//! tests that simulate nights of backups without waiting for them; the
//! clock then runs on from it. Unset (always, in real use), it is the
//! system clock.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

fn base() -> &'static Option<(SystemTime, Instant)> {
    static BASE: OnceLock<Option<(SystemTime, Instant)>> = OnceLock::new();
    BASE.get_or_init(|| {
        let v = std::env::var("IMGBACKUP_NOW").ok()?;
        match humantime::parse_rfc3339_weak(&v) {
            Ok(t) => Some((t, Instant::now())),
            Err(e) => {
                tracing::warn!(
                    "IMGBACKUP_NOW={v:?} is not an RFC 3339 time ({e}); using the system clock"
                );
                None
            }
        }
    })
}

/// Now.
pub fn now() -> SystemTime {
    match base() {
        Some((t, at)) => *t + at.elapsed(),
        None => SystemTime::now(),
    }
}
