//! Messages on stderr, by verbosity: errors always, warnings unless
//! `--quiet`, information with `-v`, details with `-vv`.

use std::sync::atomic::{AtomicI8, Ordering};

static LEVEL: AtomicI8 = AtomicI8::new(0);

/// -1 quiet, 0 normal, 1 verbose, 2 more.
pub fn set_level(level: i8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn level() -> i8 {
    LEVEL.load(Ordering::Relaxed)
}

pub fn warn(msg: impl AsRef<str>) {
    if level() >= 0 {
        crate::errln!("imgbackup: warning: {}", msg.as_ref());
    }
}

pub fn info(msg: impl AsRef<str>) {
    if level() >= 1 {
        crate::errln!("imgbackup: {}", msg.as_ref());
    }
}

pub fn debug(msg: impl AsRef<str>) {
    if level() >= 2 {
        crate::errln!("imgbackup: {}", msg.as_ref());
    }
}
