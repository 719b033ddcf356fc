//! What a command would leave behind if it stopped right now: partial files
//! on disk, bitmaps marked in use. The second signal (which ends the process
//! at once) and the error hints read it to say exactly what was left and how
//! to recover.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One thing on disk that a clean end would remove or restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Left {
    /// An incomplete file (`TARGET.partial`, `TARGET.manifest.partial`, ...).
    Partial(PathBuf),
    /// A partial file kept on purpose (`--keep-partial`, `--bitmap-mode always`).
    Kept(PathBuf),
    /// A bitmap marked in use on disk.
    BitmapInUse {
        /// The image.
        image: PathBuf,
        /// The bitmap's name.
        name: String,
        /// The backup it is anchored to, if any.
        anchor: Option<PathBuf>,
    },
}

static NEXT: AtomicU64 = AtomicU64::new(1);
static LEFT: Mutex<Vec<(u64, Left)>> = Mutex::new(Vec::new());

/// A registration; dropping it does not unregister (call [`Token::clear`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(u64);

fn with<T>(f: impl FnOnce(&mut Vec<(u64, Left)>) -> T) -> T {
    match LEFT.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}

/// Record that `what` now exists on disk.
pub fn add(what: Left) -> Token {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    with(|v| v.push((id, what)));
    Token(id)
}

impl Token {
    /// It is gone (removed, committed, or restored).
    pub fn clear(self) {
        with(|v| v.retain(|(i, _)| *i != self.0));
    }

    /// Run `f`, which removes or restores the thing on disk, and forget it,
    /// as one step for [`describe`]: a second signal that ends the process
    /// meanwhile waits for it, so its report matches the disk.
    pub fn settle<T>(self, f: impl FnOnce() -> T) -> T {
        let mut g = match LEFT.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let r = f();
        g.retain(|(i, _)| *i != self.0);
        r
    }

    /// It stays on purpose: record it as kept.
    pub fn kept(self, path: &Path) {
        with(|v| {
            for (i, l) in v.iter_mut() {
                if *i == self.0 {
                    *l = Left::Kept(path.to_path_buf());
                }
            }
        });
    }
}

/// Everything recorded now.
pub fn current() -> Vec<Left> {
    with(|v| v.iter().map(|(_, l)| l.clone()).collect())
}

/// Files kept on purpose after a failure.
pub fn kept() -> Vec<PathBuf> {
    current()
        .into_iter()
        .filter_map(|l| match l {
            Left::Kept(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// Say what stopping now leaves behind (after `prefix`) and end the process
/// with `code`, holding the record all the while: a removal that another
/// thread is about to make waits, so the line stays true of the disk.
pub fn report_and_exit(prefix: &str, code: i32) -> ! {
    let g = match LEFT.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let left: Vec<Left> = g.iter().map(|(_, l)| l.clone()).collect();
    crate::errln!("{prefix}{}", describe_list(left));
    std::process::exit(code)
}

/// One line saying what stopping now leaves behind and how to recover.
pub fn describe() -> String {
    describe_list(current())
}

fn describe_list(left: Vec<Left>) -> String {
    if left.is_empty() {
        return "nothing was left behind".into();
    }
    let mut parts = Vec::new();
    for l in left {
        parts.push(match l {
            Left::Partial(p) | Left::Kept(p) => format!(
                "{} (incomplete; delete it, or let the next run on the same target remove it)",
                p.display()
            ),
            Left::BitmapInUse {
                image,
                name,
                anchor,
            } => format!(
                "bitmap '{name}' of {} marked in use (recover: {})",
                image.display(),
                recover_bitmap(&image, &name, anchor.as_deref())
            ),
        });
    }
    format!("left behind: {}", parts.join("; "))
}

/// The command that makes bitmap `name` of `image` usable again.
pub fn recover_bitmap(image: &Path, name: &str, anchor: Option<&Path>) -> String {
    match anchor {
        Some(a) => format!(
            "`imgbackup bitmap rebuild {} {name} --against-backup {}`, or a full backup with --bitmap {name}",
            image.display(),
            a.display()
        ),
        None => format!(
            "a full backup of {} with `--bitmap {name}`, which starts a new chain",
            image.display()
        ),
    }
}
