//! A dirty bitmap during a job, with QEMU's successor semantics
//! (block/backup.c `backup_cleanup_sync_bitmap`).
//!
//! When the job starts the bitmap is frozen and marked in use on disk;
//! writes made meanwhile (the simulated guest) go to a *successor*. At the
//! end, whatever happens:
//!
//! * if the job succeeded, or `--bitmap-mode always`, and the mode is not
//!   `never`: the bitmap becomes the successor (the parent *abdicates*),
//!   plus every cluster the job did not copy (skipped by an ignore policy,
//!   or left when it failed);
//! * otherwise the successor is merged back into the parent (*reclaim*):
//!   the bitmap keeps all its bits plus the new writes.
//!
//! The in-use flag is cleared in both cases. A process killed outright
//! leaves it set, and the next run refuses the bitmap (exit 6).
//!
//! A full or top backup that (re)anchors a bitmap starts from the bitmap as
//! it was before the job ([`Before`]): when the job fails, that is what is
//! put back — a bitmap that did not exist is removed, a damaged file is
//! written back byte for byte, and an inconsistent one keeps its
//! inconsistent flag (only a successful job makes it consistent).

use crate::bitmap::file::Anchor;
use crate::bitmap::{Bitmap, BitmapError, Bits, Identity, Tracked};
use crate::copy::BlockCopy;
use crate::job::sync_mode::BitmapMode;
use crate::node::marking::Mark;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The bitmap file as it was before the job.
#[derive(Debug, Clone)]
pub enum Before {
    /// There was none: a failed job removes the new one.
    Missing,
    /// It could not be parsed: a failed job writes these bytes back.
    Raw(Vec<u8>),
    /// It was this bitmap, consistent or not (`consistent`).
    Parsed {
        /// The bitmap as it was.
        bitmap: Box<Bitmap>,
        /// Whether it was consistent.
        consistent: bool,
    },
}

/// Save `bitmap` marked in use (a job holds it), recorded as a leftover
/// to report if the process is stopped before the job ends.
fn mark_in_use(image: &Path, bitmap: &mut Bitmap) -> Result<crate::leftovers::Token, BitmapError> {
    bitmap.in_use = true;
    let token = crate::leftovers::add(crate::leftovers::Left::BitmapInUse {
        image: image.to_path_buf(),
        name: bitmap.name.clone(),
        anchor: bitmap.anchor.as_ref().map(|a| a.path.clone()),
    });
    if let Err(e) = bitmap.save(image) {
        token.clear();
        return Err(e);
    }
    Ok(token)
}

/// What the end of a job does with the bitmap file.
enum Outcome<'a> {
    /// Remove it (there was none).
    Remove,
    /// Write these bytes back (it could not be parsed).
    Raw(&'a [u8]),
    /// Save the bitmap computed.
    Save,
}

/// The job's bitmap.
pub struct SyncBitmap {
    // set at start
    image: PathBuf,
    parent: Bitmap,
    before: Before,
    token: Mutex<Option<crate::leftovers::Token>>,
    mode: BitmapMode,
    start_identity: Identity,
    // behind locks
    successor: Mutex<Bits>,
    /// A served image's live bitmaps: the entry of this bitmap is the
    /// successor, marked by the server (see [`SyncBitmap::start_live`]).
    live: Option<Tracked>,
    copy: Mutex<Option<Arc<BlockCopy>>>,
    done: Mutex<bool>,
}

impl SyncBitmap {
    /// Freeze `bitmap` for a job on `image`: mark it in use on disk.
    /// `before` is the file as it was (what a failed job puts back).
    pub fn start(
        image: &Path,
        mut bitmap: Bitmap,
        before: Before,
        mode: BitmapMode,
        start_identity: Identity,
    ) -> Result<SyncBitmap, BitmapError> {
        let token = mark_in_use(image, &mut bitmap)?;
        let successor = Bits::new(bitmap.bits.len());
        Ok(SyncBitmap {
            image: image.to_path_buf(),
            before,
            token: Mutex::new(Some(token)),
            parent: bitmap,
            mode,
            start_identity,
            successor: Mutex::new(successor),
            live: None,
            copy: Mutex::new(None),
            done: Mutex::new(false),
        })
    }

    /// Freeze `bitmap` for a job on a served image whose live bitmaps are
    /// `tracked` (marked by the server before every write): the job copies
    /// the live entry's bits as they are now, and the entry, cleared, goes
    /// on as the successor. A bitmap not tracked yet (a new one) is added.
    /// Call with the image's writes drained (the filter slot held), so the
    /// frozen bits are exactly the writes before the job's point in time.
    pub fn start_live(
        image: &Path,
        bitmap: Bitmap,
        before: Before,
        mode: BitmapMode,
        start_identity: Identity,
        tracked: &Tracked,
    ) -> Result<SyncBitmap, BitmapError> {
        let lock = || match tracked.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        let mut parent = bitmap;
        if let Some((live, _)) = lock().iter().find(|(b, _)| b.name == parent.name) {
            parent.bits = live.bits.clone();
        }
        let token = mark_in_use(image, &mut parent)?;
        // From here on the live entry is the successor.
        let mut v = lock();
        match v.iter_mut().find(|(b, _)| b.name == parent.name) {
            Some((live, _)) => live.bits = Bits::new(live.bits.len()),
            None => {
                let mut successor = parent.clone();
                successor.bits = Bits::new(parent.bits.len());
                v.push((successor, true));
            }
        }
        drop(v);
        Ok(SyncBitmap {
            image: image.to_path_buf(),
            before,
            token: Mutex::new(Some(token)),
            successor: Mutex::new(Bits::new(parent.bits.len())),
            parent,
            mode,
            start_identity,
            live: Some(tracked.clone()),
            copy: Mutex::new(None),
            done: Mutex::new(false),
        })
    }

    /// The bitmap as frozen for the job.
    pub fn bitmap(&self) -> &Bitmap {
        &self.parent
    }

    /// The job's block-copy state, whose leftover bits count as not copied.
    pub fn attach(&self, bc: Arc<BlockCopy>) {
        if let Ok(mut c) = self.copy.lock() {
            *c = Some(bc);
        }
    }

    /// Record a write made during the job.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.parent.granularity;
        if let Ok(mut s) = self.successor.lock() {
            s.set_range(offset / g, (offset + len).div_ceil(g));
        }
    }

    /// A [`Mark`] that records writes in the successor (for a
    /// [`crate::node::marking::MarkingNode`] in front of the guest).
    pub fn marker(self: &Arc<Self>) -> Mark {
        let me = self.clone();
        Arc::new(move |offset, len| me.mark(offset, len))
    }

    /// Clusters the job did not copy, at the bitmap's granularity.
    fn leftovers(&self) -> Bits {
        let g = self.parent.granularity;
        let mut out = Bits::new(self.parent.bits.len());
        let bc = self.copy.lock().ok().and_then(|c| c.clone());
        if let Some(bc) = bc {
            let cs = bc.cluster_size();
            for (s, e) in bc.not_copied().runs() {
                out.set_range(s * cs / g, (e * cs).div_ceil(g));
            }
        }
        out
    }

    /// End the job: `ok` is the job's success; `anchor` the new backup.
    /// Returns the bitmap as saved.
    pub fn finish(&self, ok: bool, anchor: Option<Anchor>) -> Result<Bitmap, BitmapError> {
        let token = self.token.lock().ok().and_then(|mut t| t.take());
        let res = match token {
            Some(t) => t.settle(|| self.finish_inner(ok, anchor)),
            None => self.finish_inner(ok, anchor),
        };
        if res.is_err() {
            // Still marked in use on disk.
            let t = crate::leftovers::add(crate::leftovers::Left::BitmapInUse {
                image: self.image.clone(),
                name: self.parent.name.clone(),
                anchor: self.parent.anchor.as_ref().map(|a| a.path.clone()),
            });
            if let Ok(mut slot) = self.token.lock() {
                *slot = Some(t);
            }
        }
        res
    }

    fn finish_inner(&self, ok: bool, anchor: Option<Anchor>) -> Result<Bitmap, BitmapError> {
        let mut done = match self.done.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        let b = match &self.live {
            None => {
                let successor = match self.successor.lock() {
                    Ok(s) => s.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                let (outcome, mut b) = self.outcome(ok, anchor, &successor);
                match outcome {
                    Outcome::Remove => Bitmap::remove(&self.image, &self.parent.name)?,
                    Outcome::Raw(bytes) => {
                        Bitmap::write_raw(&self.image, &self.parent.name, bytes)?
                    }
                    Outcome::Save => {
                        b.in_use = false;
                        b.save(&self.image)?;
                    }
                }
                b
            }
            Some(tracked) => {
                // The live bitmap is the successor: read it, and put the
                // result in its place, under its lock (no write is marked
                // in between).
                let mut v = match tracked.lock() {
                    Ok(v) => v,
                    Err(p) => p.into_inner(),
                };
                let name = &self.parent.name;
                let at = v.iter().position(|(b, _)| &b.name == name);
                let successor = match at {
                    Some(i) => v[i].0.bits.clone(),
                    None => Bits::new(self.parent.bits.len()),
                };
                let (outcome, mut b) = self.outcome(ok, anchor, &successor);
                match outcome {
                    Outcome::Remove | Outcome::Raw(_) => {
                        if let Some(i) = at {
                            v.remove(i);
                        }
                        match outcome {
                            Outcome::Raw(bytes) => Bitmap::write_raw(&self.image, name, bytes)?,
                            _ => Bitmap::remove(&self.image, name)?,
                        }
                    }
                    Outcome::Save => {
                        // Still marked by the server: in use on disk.
                        b.in_use = true;
                        b.save(&self.image)?;
                        let entry = (b.clone(), !b.inconsistent);
                        match at {
                            Some(i) => v[i] = entry,
                            None => v.push(entry),
                        }
                    }
                }
                b
            }
        };
        self.settled(&mut done);
        Ok(b)
    }

    /// What the job's end makes of the bitmap, given the writes made
    /// meanwhile (`successor`): the bitmap to save, or the file as it was.
    fn outcome<'a>(
        &'a self,
        ok: bool,
        anchor: Option<Anchor>,
        successor: &Bits,
    ) -> (Outcome<'a>, Bitmap) {
        let sync = (ok || self.mode == BitmapMode::Always) && self.mode != BitmapMode::Never;
        let mut b = self.parent.clone();
        if sync {
            b.bits = successor.clone();
            b.bits.merge(&self.leftovers());
            if ok {
                // This backup is the new reference point.
                b.identity = self.start_identity;
                b.inconsistent = false;
                if anchor.is_some() {
                    b.anchor = anchor;
                }
            }
        } else {
            b.bits.merge(successor);
        }
        if !ok {
            // Put back what was there, plus the writes made meanwhile; an
            // inconsistent bitmap stays inconsistent.
            match &self.before {
                Before::Missing => return (Outcome::Remove, b),
                Before::Raw(bytes) => return (Outcome::Raw(bytes), b),
                Before::Parsed { bitmap, consistent } => {
                    if !sync {
                        let mut orig = (**bitmap).clone();
                        if orig.bits.len() == successor.len() {
                            orig.bits.merge(successor);
                        }
                        b = orig;
                    }
                    if !consistent {
                        b.inconsistent = true;
                    }
                }
            }
        }
        (Outcome::Save, b)
    }

    fn settled(&self, done: &mut bool) {
        *done = true;
    }
}

impl Drop for SyncBitmap {
    fn drop(&mut self) {
        let done = self.done.lock().map(|d| *d).unwrap_or(true);
        if !done && let Err(e) = self.finish(false, None) {
            tracing::warn!("cannot restore bitmap '{}': {e}", self.parent.name);
        }
    }
}
