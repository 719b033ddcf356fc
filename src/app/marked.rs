//! The bitmaps beside an image that a command writes in place (`guest`,
//! `serve`): every enabled bitmap is marked in use on disk while the image
//! is written, marked by every write before it is issued, and saved at the
//! end with the image's new identity (the ones that were consistent) and
//! the in-use flag cleared. A bitmap that was already inconsistent is
//! marked but stays inconsistent.

use crate::bitmap::file::list_names;
use crate::bitmap::{Bitmap, Identity};
use crate::node::BlockNode;
use crate::node::marking::MarkingNode;
use anyhow::Context;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Open `image` (of `format`) for writing in place: a raw file, or a qcow2
/// image through the in-place writer.
pub fn open_writable(
    image: &Path,
    format: crate::node::probe::Format,
) -> anyhow::Result<Arc<dyn BlockNode>> {
    let manifest = crate::manifest::manifest_path(image);
    if manifest.exists() {
        return Err(crate::job::JobError::Usage(format!(
            "{} is a backup ({} is its manifest): writing it in place would break the manifest and every backup built on it; serve it --read-only",
            image.display(),
            manifest.display()
        ))
        .into());
    }
    match format {
        crate::node::probe::Format::Raw => open_raw(image),
        crate::node::probe::Format::Qcow2 => Ok(Arc::new(
            crate::node::qcow2::inplace::Qcow2InPlace::open(image)
                .with_context(|| format!("cannot open {} for writing", image.display()))?,
        )),
    }
}

/// Open the raw image `image` for writing in place.
pub fn open_raw(image: &Path) -> anyhow::Result<Arc<dyn BlockNode>> {
    use crate::error::{BlockError, Op};
    let (file, _) = crate::files::open_image_file(image, true).map_err(|e| match e {
        crate::files::KindError::Io { source, .. } => BlockError::io(Op::Open, image, 0, 0, source),
        other => BlockError::Invalid {
            path: image.to_path_buf(),
            detail: other.to_string(),
        },
    })?;
    Ok(Arc::new(crate::node::raw::RawNode::from_file(
        image, file, true,
    )?))
}

/// The bitmaps being marked, and whether each was consistent when loaded.
pub use crate::bitmap::Tracked;

/// Load every enabled bitmap beside `image` (of `size` bytes) and mark it in
/// use on disk.
pub fn track_enabled(image: &Path, size: u64) -> anyhow::Result<Tracked> {
    for t in crate::bitmap::file::remove_stale_temps(image) {
        tracing::info!(
            "removed a bitmap temporary file left by a killed run: {}",
            t.display()
        );
    }
    let before = Identity::of(image).with_context(|| format!("cannot stat {}", image.display()))?;
    let mut tracked = Vec::new();
    for name in list_names(image)
        .with_context(|| format!("cannot list the bitmaps of {}", image.display()))?
    {
        match Bitmap::load(image, &name) {
            Ok(b) if b.enabled => {
                let consistent = b.inconsistency(size, &before).is_none();
                if !consistent {
                    tracing::warn!(
                        "bitmap '{name}' of {} is already inconsistent; it is marked but stays inconsistent",
                        image.display()
                    );
                }
                let mut b = b;
                b.in_use = true;
                b.save(image)?;
                tracked.push((b, consistent));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("skipping bitmap '{name}': {e}"),
        }
    }
    Ok(Arc::new(Mutex::new(tracked)))
}

/// `inner` behind a node that marks every tracked bitmap before each write.
pub fn marking(inner: Arc<dyn BlockNode>, tracked: &Tracked) -> MarkingNode {
    let marks = tracked.clone();
    MarkingNode::new(
        inner,
        Arc::new(move |offset, len| {
            if let Ok(mut v) = marks.lock() {
                for (b, _) in v.iter_mut() {
                    b.mark(offset, len);
                }
            }
        }),
    )
}

/// Save the tracked bitmaps: the image's identity now recorded in those
/// that were consistent (when the image was `flushed`), in use while
/// `in_use`. Their names.
pub fn save(
    image: &Path,
    tracked: &Tracked,
    flushed: bool,
    in_use: bool,
) -> anyhow::Result<Vec<String>> {
    let after = Identity::of(image).with_context(|| format!("cannot stat {}", image.display()))?;
    let mut v = match tracked.lock() {
        Ok(v) => v,
        Err(p) => p.into_inner(),
    };
    let mut names = Vec::new();
    for (b, consistent) in v.iter_mut() {
        if *consistent && flushed {
            b.identity = after;
        }
        if !*consistent {
            b.inconsistent = true;
        }
        b.in_use = in_use;
        b.save(image)?;
        names.push(b.name.clone());
    }
    Ok(names)
}
