//! imgbackup: point-in-time backups of raw and qcow2 disk images.
//!
//! ```text
//!  source image (read-only) ──► chain node ──► block-copy state ──► target
//!  raw / qcow2 layers,            (reads         copy bitmap,        TARGET.partial
//!  backing chain                   through)       in-flight ranges,   (raw, or qcow2 by
//!                                                 progress            our own writer)
//! ```
//!
//! Error layering: block nodes return [`error::BlockError`] (operation, file,
//! offset, errno); the copy engine wraps it as [`copy::CopyError`] saying
//! which side failed; commands add context with `anyhow`; `main` prints the
//! chain once and picks the exit code with [`exit::classify`].

pub mod app;
pub mod bitmap;
pub mod cli;
pub mod clock;
pub mod compare;
pub mod copy;
pub mod error;
pub mod exit;
pub mod files;
pub mod guest;
pub mod job;
pub mod leftovers;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod nbd;
pub mod node;
pub mod report;
pub mod sets;
pub mod signals;
pub mod stats;
pub mod target;
pub mod units;

/// `n` bytes of xorshift noise from `seed`: incompressible test and
/// benchmark data, the same for the same seed.
#[doc(hidden)]
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
