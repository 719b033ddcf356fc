//! Dirty-bitmap files beside the image: `DIR/IMAGE.NAME.bitmap`.
//!
//! Layout (version 2; integers big-endian):
//!
//! ```text
//!   0   8  magic "IMGBKBMP"
//!   8   4  format version (2)
//!  12   4  flags: bit 0 enabled, bit 1 in-use, bit 2 inconsistent
//!          (other bits set: the file is refused as damaged)
//!  16   8  granularity in bytes (a power of two, 512 .. 2^31)
//!  24   8  the image's virtual size
//!  32   8  identity: the image file's size
//!  40   8  identity: its mtime, seconds (signed)
//!  48   4  identity: its mtime, nanoseconds
//!  52   4  reserved, zero
//!  56   8  identity: its inode number
//!  64   8  identity: its device number
//!  72   4  length A of the anchored backup's path (0: not anchored)
//!  76  32  the anchored backup's manifest root digest (zeros if none)
//! 108   8  the anchored backup file's size        \
//! 116   8  its mtime, seconds                     |  zeros if unknown
//! 124   4  its mtime, nanoseconds                 |
//! 128   4  reserved, zero                         |
//! 132   8  its inode number                       /
//! 140   A  the anchored backup's path (UTF-8, absolute)
//!   ...    zero padding to a multiple of 8
//!   B   N  the bits: ceil(virtual size / granularity) bits, bit k of byte
//!          j is granule 8j+k (LSB first, as in qcow2 bitmaps)
//! B+N  32  sha256 of every byte before it
//! ```
//!
//! Version 1 files (no anchored-file identity, the path at byte 108) are
//! read; version 2 is written.
//!
//! A bitmap is *consistent* when it is not in use, not flagged
//! inconsistent, its checksum holds, it fits the image (virtual size,
//! granularity), and — for an enabled bitmap — the image's identity (size,
//! mtime with nanoseconds, inode, device) is the one recorded when the
//! bitmap was last in sync with it. Once found inconsistent, a bitmap keeps
//! the *inconsistent* flag through every command that saves it (enable,
//! disable, guest, a failed backup) until a full or top backup with
//! `--bitmap` or `bitmap rebuild` starts it afresh. Files are replaced
//! atomically: a temporary file in the same directory
//! (`.IMAGE.NAME.bitmap.tmpXXXXXX`), fsync, rename, fsync of the directory;
//! a temporary file left by a killed run is removed by the next command that
//! locks the image.

use super::Bits;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The first bytes of every bitmap file.
pub const MAGIC: &[u8; 8] = b"IMGBKBMP";
/// The format version written.
pub const VERSION: u32 = 2;
const FLAG_ENABLED: u32 = 1;
const FLAG_IN_USE: u32 = 2;
const FLAG_INCONSISTENT: u32 = 4;
const FLAGS_KNOWN: u32 = FLAG_ENABLED | FLAG_IN_USE | FLAG_INCONSISTENT;
const FIXED_V1: usize = 108;
const FIXED: usize = 140;
/// Default granularity of new bitmaps.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// What identifies the image's content as of a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    /// Size of the image, bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Inode number.
    pub inode: u64,
    /// Device number.
    pub device: u64,
}

impl Identity {
    /// The identity of `image` now.
    pub fn of(image: &Path) -> io::Result<Identity> {
        let m = std::fs::metadata(image)?;
        Ok(Identity {
            size: m.len(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            inode: m.ino(),
            device: m.dev(),
        })
    }
}

/// The backup a bitmap's clean bits are relative to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// Its absolute path.
    pub path: PathBuf,
    /// The backup's manifest root digest (zeros: none).
    pub root: [u8; 32],
    /// The backup file's identity when the bitmap was anchored to it (None
    /// in version 1 files).
    pub file: Option<crate::manifest::FileBinding>,
}

/// A dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// The bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// The image's virtual size.
    pub image_size: u64,
    /// The image's identity when the bitmap was last in sync with it.
    pub identity: Identity,
    /// Marked by writes.
    pub enabled: bool,
    /// Marked in use on disk.
    pub in_use: bool,
    /// Found inconsistent once: stays so until a full backup or a rebuild.
    pub inconsistent: bool,
    /// The backup its clean bits are relative to.
    pub anchor: Option<Anchor>,
    /// The bits: a set bit is a dirty granule.
    pub bits: Bits,
}

/// Why a bitmap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap '{name}' does not exist for {} (no file {}); {}", image.display(), path.display(), existing(image, name))]
    /// No such bitmap.
    Missing {
        /// The bitmap's name.
        name: String,
        /// The image.
        image: PathBuf,
        /// Where the file would be.
        path: PathBuf,
    },
    #[error("bitmap '{name}' already exists for {}", image.display())]
    /// A bitmap of that name exists already.
    Exists {
        /// The bitmap's name.
        name: String,
        /// The image it belongs to.
        image: PathBuf,
    },
    #[error("bitmap file {} is damaged: {detail}", path.display())]
    /// The file is damaged (checksum, header, size).
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        detail: String,
    },
    #[error("bitmap '{name}' of {} is inconsistent: {reason}", image.display())]
    /// It cannot be trusted (in use, stale, flagged).
    Inconsistent {
        /// The bitmap's name.
        name: String,
        /// The image it belongs to.
        image: PathBuf,
        /// Why it is inconsistent.
        reason: String,
    },
    #[error("bitmap '{name}' of {} cannot be used for this backup: {detail}", image.display())]
    /// It cannot be used with this parent.
    Parent {
        /// The bitmap's name.
        name: String,
        /// The image it belongs to.
        image: PathBuf,
        /// What is wrong, in words.
        detail: String,
    },
    #[error(
        "'{0}' is not a valid bitmap name: use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'"
    )]
    /// Not a valid bitmap name.
    BadName(String),
    #[error("cannot access the bitmap file {}", path.display())]
    /// The file cannot be read or written.
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The source.
        source: io::Error,
    },
}

/// What bitmaps `image` has, in words (for the message of a missing one).
fn existing(image: &Path, name: &str) -> String {
    match list_names(image) {
        Ok(names) if !names.is_empty() => format!("its bitmaps are: {}", names.join(", ")),
        _ => format!("it has no bitmaps (a full backup with --bitmap {name} creates it)"),
    }
}

/// The file of bitmap `name` of `image`.
pub fn bitmap_path(image: &Path, name: &str) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".");
    s.push(name);
    s.push(".bitmap");
    PathBuf::from(s)
}

/// Check that `name` can name a bitmap.
pub fn check_name(name: &str) -> Result<(), BitmapError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(BitmapError::BadName(name.to_string()))
    }
}

/// The prefix of the temporary file a bitmap is written to before it is
/// renamed into place: `.IMAGE.NAME.bitmap.tmp`.
fn temp_prefix(image: &Path, name: &str) -> String {
    let base = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{base}.{name}.bitmap.tmp")
}

/// Remove the temporary bitmap files of `image` that a killed run left
/// (`.IMAGE.*.bitmap.tmp*`). Call it only while holding the image's
/// exclusive lock: then no other imgbackup is writing one. Returns what was
/// removed.
pub fn remove_stale_temps(image: &Path) -> Vec<PathBuf> {
    let dir = crate::files::dir_of(image);
    let Some(base) = image.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let prefix = format!(".{base}.");
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        if let Some(rest) = n.strip_prefix(&prefix)
            && let Some((name, _)) = rest.split_once(".bitmap.tmp")
            && check_name(name).is_ok()
            && e.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed.push(e.path());
        }
    }
    removed
}

/// Names of the bitmaps beside `image`, sorted.
pub fn list_names(image: &Path) -> io::Result<Vec<String>> {
    let dir = crate::files::dir_of(image);
    let Some(base) = image.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{base}.");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let n = e.file_name();
        let Some(n) = n.to_str() else { continue };
        if let Some(rest) = n
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".bitmap"))
            && check_name(rest).is_ok()
        {
            out.push(rest.to_string());
        }
    }
    out.sort();
    Ok(out)
}

impl Bitmap {
    /// A new, clean bitmap for an image of `image_size` bytes.
    pub fn new(name: &str, granularity: u64, image_size: u64, identity: Identity) -> Bitmap {
        Bitmap {
            name: name.to_string(),
            granularity,
            image_size,
            identity,
            enabled: true,
            in_use: false,
            inconsistent: false,
            anchor: None,
            bits: Bits::new(image_size.div_ceil(granularity)),
        }
    }

    /// Dirty bytes (granules × granularity, the last one clamped).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().iter().map(|(s, e)| e - s).sum()
    }

    /// Dirty byte ranges.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        self.bits
            .runs()
            .into_iter()
            .map(|(s, e)| {
                (
                    s * self.granularity,
                    (e * self.granularity).min(self.image_size),
                )
            })
            .collect()
    }

    /// Mark `[offset, offset+len)` dirty.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity;
        self.bits.set_range(offset / g, (offset + len).div_ceil(g));
    }

    /// Why this bitmap cannot be trusted for `image` (None: consistent).
    pub fn inconsistency(&self, image_size: u64, identity: &Identity) -> Option<String> {
        if self.in_use {
            return Some(
                "it is marked in use: a process working with it stopped before finishing (killed or crashed)".into(),
            );
        }
        if self.inconsistent {
            return Some(
                "it was found inconsistent earlier and stays so until a full backup with --bitmap or `bitmap rebuild` starts it afresh".into(),
            );
        }
        if self.image_size != image_size {
            return Some(format!(
                "it was made for an image of {} bytes, the image now has {image_size}",
                self.image_size
            ));
        }
        if self.enabled && self.identity != *identity {
            return Some(
                "the image was changed without marking the bitmap (its size, mtime or inode differ from what the bitmap recorded)".into(),
            );
        }
        None
    }

    /// Load bitmap `name` of `image`, which must be consistent with an
    /// image of `image_size` bytes whose identity is `identity` now.
    pub fn load_consistent(
        image: &Path,
        name: &str,
        image_size: u64,
        identity: &Identity,
    ) -> Result<Bitmap, BitmapError> {
        let b = Bitmap::load(image, name)?;
        if let Some(reason) = b.inconsistency(image_size, identity) {
            return Err(BitmapError::Inconsistent {
                name: name.to_string(),
                image: image.to_path_buf(),
                reason,
            });
        }
        Ok(b)
    }

    /// Serialize (with the checksum).
    pub fn to_bytes(&self) -> Vec<u8> {
        let apath = self
            .anchor
            .as_ref()
            .map(|a| a.path.to_string_lossy().into_owned().into_bytes())
            .unwrap_or_default();
        let mut b = vec![0u8; FIXED];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_be_bytes());
        let flags = if self.enabled { FLAG_ENABLED } else { 0 }
            | if self.in_use { FLAG_IN_USE } else { 0 }
            | if self.inconsistent {
                FLAG_INCONSISTENT
            } else {
                0
            };
        b[12..16].copy_from_slice(&flags.to_be_bytes());
        b[16..24].copy_from_slice(&self.granularity.to_be_bytes());
        b[24..32].copy_from_slice(&self.image_size.to_be_bytes());
        b[32..40].copy_from_slice(&self.identity.size.to_be_bytes());
        b[40..48].copy_from_slice(&self.identity.mtime_sec.to_be_bytes());
        b[48..52].copy_from_slice(&self.identity.mtime_nsec.to_be_bytes());
        b[56..64].copy_from_slice(&self.identity.inode.to_be_bytes());
        b[64..72].copy_from_slice(&self.identity.device.to_be_bytes());
        b[72..76].copy_from_slice(&(apath.len() as u32).to_be_bytes());
        if let Some(a) = &self.anchor {
            b[76..108].copy_from_slice(&a.root);
            if let Some(f) = &a.file {
                b[108..116].copy_from_slice(&f.size.to_be_bytes());
                b[116..124].copy_from_slice(&f.mtime_sec.to_be_bytes());
                b[124..128].copy_from_slice(&f.mtime_nsec.to_be_bytes());
                b[132..140].copy_from_slice(&f.inode.to_be_bytes());
            }
        }
        b.extend_from_slice(&apath);
        b.resize(b.len().div_ceil(8) * 8, 0);
        let nbytes = self.bits.len().div_ceil(8) as usize;
        let mut raw = Vec::with_capacity(nbytes);
        for w in self.bits.word_iter() {
            raw.extend_from_slice(&w.to_le_bytes());
        }
        raw.resize(nbytes, 0);
        b.extend_from_slice(&raw);
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum);
        b
    }

    /// Parse and check a bitmap file's bytes.
    pub fn from_bytes(name: &str, path: &Path, b: &[u8]) -> Result<Bitmap, BitmapError> {
        let damaged = |d: &str| BitmapError::Damaged {
            path: path.to_path_buf(),
            detail: d.to_string(),
        };
        if b.len() < FIXED_V1 + 32 {
            return Err(damaged("too short"));
        }
        if &b[0..8] != MAGIC {
            return Err(damaged("bad magic (not an imgbackup bitmap)"));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(damaged("checksum mismatch"));
        }
        let u32at = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_be_bytes(w)
        };
        let version = u32at(8);
        let fixed = match version {
            1 => FIXED_V1,
            2 => FIXED,
            _ => {
                return Err(damaged(&format!(
                    "format version {version}, this imgbackup reads versions 1 and {VERSION}"
                )));
            }
        };
        if body.len() < fixed {
            return Err(damaged("too short"));
        }
        let flags = u32at(12);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(damaged(&format!(
                "unknown flags {:#x}",
                flags & !FLAGS_KNOWN
            )));
        }
        let granularity = u64at(16);
        if !granularity.is_power_of_two() || !(512..=1 << 31).contains(&granularity) {
            return Err(damaged(&format!(
                "granularity {granularity} is not a power of two from 512 to 2G"
            )));
        }
        let image_size = u64at(24);
        let alen = u32at(72) as usize;
        let bits_at = (fixed + alen).div_ceil(8) * 8;
        let nbits = image_size.div_ceil(granularity);
        let nbytes = nbits.div_ceil(8);
        if alen > 4096 || (bits_at as u64).checked_add(nbytes) != Some(body.len() as u64) {
            return Err(damaged("the size of the file does not match its header"));
        }
        let anchor = if alen > 0 {
            let p = std::str::from_utf8(&b[fixed..fixed + alen])
                .map_err(|_| damaged("anchor path is not UTF-8"))?;
            let mut root = [0u8; 32];
            root.copy_from_slice(&b[76..108]);
            let file = (version >= 2 && b[108..140].iter().any(|&x| x != 0)).then(|| {
                crate::manifest::FileBinding {
                    size: u64at(108),
                    mtime_sec: u64at(116) as i64,
                    mtime_nsec: u32at(124),
                    inode: u64at(132),
                }
            });
            Some(Anchor {
                path: PathBuf::from(p),
                root,
                file,
            })
        } else {
            None
        };
        let raw = &body[bits_at..];
        let words: Vec<u64> = raw
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Ok(Bitmap {
            name: name.to_string(),
            granularity,
            image_size,
            identity: Identity {
                size: u64at(32),
                mtime_sec: u64at(40) as i64,
                mtime_nsec: u32at(48),
                inode: u64at(56),
                device: u64at(64),
            },
            enabled: flags & FLAG_ENABLED != 0,
            in_use: flags & FLAG_IN_USE != 0,
            inconsistent: flags & FLAG_INCONSISTENT != 0,
            anchor,
            bits: Bits::from_words(words, nbits),
        })
    }

    /// Load bitmap `name` of `image`.
    pub fn load(image: &Path, name: &str) -> Result<Bitmap, BitmapError> {
        check_name(name)?;
        let path = bitmap_path(image, name);
        let b = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BitmapError::Missing {
                    name: name.to_string(),
                    image: image.to_path_buf(),
                    path,
                });
            }
            Err(e) => return Err(BitmapError::Io { path, source: e }),
        };
        Bitmap::from_bytes(name, &path, &b)
    }

    /// Write the bitmap beside `image`, atomically.
    pub fn save(&self, image: &Path) -> Result<(), BitmapError> {
        Self::write_raw(image, &self.name, &self.to_bytes())
    }

    /// Replace the file of bitmap `name` of `image` with `bytes`, atomically
    /// (a temporary file beside it, fsync, rename, fsync of the directory).
    pub fn write_raw(image: &Path, name: &str, bytes: &[u8]) -> Result<(), BitmapError> {
        let path = bitmap_path(image, name);
        let ioerr = |e| BitmapError::Io {
            path: path.clone(),
            source: e,
        };
        let dir = crate::files::dir_of(&path);
        let mut tmp = tempfile::Builder::new()
            .prefix(&temp_prefix(image, name))
            .tempfile_in(&dir)
            .map_err(ioerr)?;
        tmp.write_all(bytes).map_err(ioerr)?;
        tmp.as_file().sync_all().map_err(ioerr)?;
        // From here the temporary file is ours to rename (or remove).
        let tmp_path = tmp.into_temp_path().keep().map_err(|e| ioerr(e.error))?;
        if let Err(e) = std::fs::rename(&tmp_path, &path) {
            let _ = std::fs::remove_file(&tmp_path);
            return Err(ioerr(e));
        }
        File::open(&dir).and_then(|d| d.sync_all()).map_err(ioerr)?;
        Ok(())
    }

    /// The raw bytes of bitmap `name` of `image`, if the file exists.
    pub fn read_raw(image: &Path, name: &str) -> Option<Vec<u8>> {
        std::fs::read(bitmap_path(image, name)).ok()
    }

    /// Remove the bitmap file of `name`.
    pub fn remove(image: &Path, name: &str) -> Result<(), BitmapError> {
        check_name(name)?;
        let path = bitmap_path(image, name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BitmapError::Missing {
                name: name.to_string(),
                image: image.to_path_buf(),
                path,
            }),
            Err(e) => Err(BitmapError::Io { path, source: e }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let id = Identity {
            size: 5,
            mtime_sec: -3,
            mtime_nsec: 999,
            inode: 7,
            device: 9,
        };
        let mut b = Bitmap::new("bm0", 65536, (64 << 20) + 512, id);
        b.mark(0, 1);
        b.mark(65536 * 15, 65536 * 2);
        b.mark(64 << 20, 512);
        b.anchor = Some(Anchor {
            path: "/backups/full.qcow2".into(),
            root: [7; 32],
            file: Some(crate::manifest::FileBinding {
                size: 1,
                mtime_sec: 2,
                mtime_nsec: 3,
                inode: 4,
            }),
        });
        b.in_use = true;
        b.inconsistent = true;
        let bytes = b.to_bytes();
        let p = Path::new("/x");
        let c = Bitmap::from_bytes("bm0", p, &bytes).unwrap();
        assert_eq!(c, b);
        assert_eq!(c.bits.count(), 4);
        assert_eq!(
            c.dirty_ranges(),
            vec![
                (0, 65536),
                (65536 * 15, 65536 * 17),
                (64 << 20, (64 << 20) + 512)
            ]
        );
        let mut unknown = b.clone();
        unknown.in_use = false;
        let mut raw = unknown.to_bytes();
        raw[15] |= 8;
        let n = raw.len() - 32;
        let sum = Sha256::digest(&raw[..n]);
        raw[n..].copy_from_slice(&sum);
        assert!(Bitmap::from_bytes("bm0", p, &raw).is_err(), "unknown flag");
        for i in [
            0,
            9,
            13,
            20,
            77,
            110,
            130,
            bytes.len() - 40,
            bytes.len() - 1,
        ] {
            let mut d = bytes.clone();
            d[i] ^= 1;
            assert!(Bitmap::from_bytes("bm0", p, &d).is_err(), "flip at {i}");
        }
        assert!(Bitmap::from_bytes("bm0", p, &bytes[..bytes.len() - 1]).is_err());
        assert!(check_name("ok.name-1_x").is_ok());
        for bad in ["", ".hidden", "a/b", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
