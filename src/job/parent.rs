//! The parent of an incremental backup: the backup its bitmap is anchored
//! to, checked before anything is built on it.
//!
//! An incremental copies only what changed since its parent, and its
//! manifest takes the parent's digests for everything else, so a wrong
//! parent is a wrong backup that looks whole. The parent must be:
//!
//! * the backup the bitmap is anchored to (the same file: path and, for
//!   bitmaps anchored by this version, the file's identity), or a backup
//!   whose manifest has the anchored root digest (a verified copy);
//! * described by its manifest (the manifest is *bound* to the file), so a
//!   replaced backup, or a replacement a crash interrupted, is refused.
//!
//! A bitmap that is not anchored (imported from QEMU, added by hand) has no
//! parent to check against: the parent must then be named with `--backing`.

use crate::bitmap::file::Anchor;
use crate::bitmap::{Bitmap, BitmapError};
use crate::manifest::{FileBinding, ManifestError, ManifestFile, manifest_path, unhex};
use std::path::{Path, PathBuf};

fn refuse(bitmap: &Bitmap, image: &Path, detail: String) -> BitmapError {
    BitmapError::Parent {
        name: bitmap.name.clone(),
        image: image.to_path_buf(),
        detail,
    }
}

/// Check that `anchor` still names the backup the bitmap was anchored to.
fn check_anchor(bitmap: &Bitmap, image: &Path, a: &Anchor) -> Result<(), BitmapError> {
    let p = &a.path;
    let now = match FileBinding::of_path(p) {
        Ok(b) => b,
        Err(_) => {
            return Err(refuse(
                bitmap,
                image,
                format!(
                    "the backup it is anchored to, {}, is gone; restore it, or make a full backup with --bitmap {} to start a new chain",
                    p.display(),
                    bitmap.name
                ),
            ));
        }
    };
    if let Some(want) = &a.file
        && let Some(diff) = want.difference(&now)
    {
        return Err(refuse(
            bitmap,
            image,
            format!(
                "the backup it is anchored to, {}, was replaced or rewritten since ({diff}); make a full backup with --bitmap {} to start a new chain",
                p.display(),
                bitmap.name
            ),
        ));
    }
    if a.root != [0; 32] {
        let m = bound_manifest(bitmap, image, p)?;
        if unhex(&m.meta.root_digest) != Some(a.root) {
            return Err(refuse(
                bitmap,
                image,
                format!(
                    "the backup it is anchored to, {}, was replaced since (its manifest's root digest differs)",
                    p.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The manifest of `backup`, which must exist and describe that file.
fn bound_manifest(
    bitmap: &Bitmap,
    image: &Path,
    backup: &Path,
) -> Result<ManifestFile, BitmapError> {
    let m = ManifestFile::open(&manifest_path(backup)).map_err(|e| {
        refuse(
            bitmap,
            image,
            format!("the manifest of {} cannot be used: {e}", backup.display()),
        )
    })?;
    m.check_bound(backup).map_err(|e| match e {
        e @ ManifestError::Unbound { .. } => refuse(bitmap, image, e.to_string()),
        other => refuse(bitmap, image, other.to_string()),
    })?;
    Ok(m)
}

/// The parent an incremental or bitmap backup of `image` builds on: the
/// bitmap's anchored backup, or `given` (`--backing`) checked against it.
pub fn choose(bitmap: &Bitmap, image: &Path, given: Option<&Path>) -> Result<PathBuf, BitmapError> {
    let Some(anchor) = &bitmap.anchor else {
        return match given {
            // Nothing to check against: the caller names the parent.
            Some(g) if g.is_file() => Ok(g.to_path_buf()),
            Some(g) => Err(refuse(
                bitmap,
                image,
                format!("the backing file {} does not exist", g.display()),
            )),
            None => Err(refuse(
                bitmap,
                image,
                format!(
                    "it is not anchored to a backup; make a full backup with --bitmap {0} to start a chain, rebuild it against the backup it should follow (`imgbackup bitmap rebuild {1} {0} --against-backup` and that backup), or name the parent with --backing",
                    bitmap.name,
                    image.display()
                ),
            )),
        };
    };
    let Some(g) = given else {
        check_anchor(bitmap, image, anchor)?;
        return Ok(anchor.path.clone());
    };
    if crate::files::same_file(g, &anchor.path) {
        check_anchor(bitmap, image, anchor)?;
        return Ok(g.to_path_buf());
    }
    // Another file: it must hold the same point-in-time image (its manifest
    // has the anchored root digest) and be described by that manifest.
    let wrong = |why: String| {
        refuse(
            bitmap,
            image,
            format!(
                "--backing {} is not the backup it is anchored to, {} ({why}); pass --backing {} or leave --backing out",
                g.display(),
                anchor.path.display(),
                anchor.path.display()
            ),
        )
    };
    if anchor.root == [0; 32] {
        return Err(wrong("that backup has no manifest to compare with".into()));
    }
    let m = bound_manifest(bitmap, image, g).map_err(|e| wrong(e.to_string()))?;
    if unhex(&m.meta.root_digest) != Some(anchor.root) {
        return Err(wrong("its manifest's root digest differs".into()));
    }
    Ok(g.to_path_buf())
}

/// The anchor a new backup gives a bitmap: its path, its manifest's root
/// digest (zeros without one) and the file's identity.
pub fn anchor_for(backup: &Path, root: Option<[u8; 32]>) -> Anchor {
    let path = std::fs::canonicalize(backup).unwrap_or_else(|_| backup.to_path_buf());
    Anchor {
        file: FileBinding::of_path(&path).ok(),
        path,
        root: root.unwrap_or([0; 32]),
    }
}
