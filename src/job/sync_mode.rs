//! The job's vocabulary after QEMU's backup job: what to copy ([`SyncMode`])
//! and what happens to the bitmap ([`BitmapMode`]), and the one place that
//! turns a sync mode into the job's initial copy bitmap (QEMU's
//! `backup_init_bcs_bitmap`). A new sync mode touches this module, the
//! command line's enum and its documentation.

use crate::bitmap::{Bitmap, Bits};
use crate::node::{BlockNode, Status, for_each_extent};

/// What a backup copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every cluster of the image.
    Full,
    /// The clusters allocated in the top image of the source's chain.
    Top,
    /// The clusters dirty in the bitmap, cleared on success.
    Incremental,
    /// The clusters dirty in the bitmap, with a [`BitmapMode`].
    Bitmap,
    /// Only what a guest is about to overwrite (fleecing).
    None,
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::Incremental => "incremental",
            SyncMode::Bitmap => "bitmap",
            SyncMode::None => "none",
        })
    }
}

/// What happens to the bitmap after a job (QEMU's bitmap sync modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapMode {
    /// Clear what was copied only if the job succeeds.
    OnSuccess,
    /// Clear what was copied even if the job fails.
    Always,
    /// Leave the bitmap as it was.
    Never,
}

impl std::fmt::Display for BitmapMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BitmapMode::OnSuccess => "on-success",
            BitmapMode::Always => "always",
            BitmapMode::Never => "never",
        })
    }
}

impl SyncMode {
    /// The target must be a qcow2 (it has a backing file, or zero clusters
    /// that must shadow one).
    pub fn needs_qcow2(self) -> bool {
        !matches!(self, SyncMode::Full)
    }

    /// The clusters to copy are those a bitmap marks dirty.
    pub fn uses_bitmap(self) -> bool {
        matches!(self, SyncMode::Incremental | SyncMode::Bitmap)
    }

    /// The background copy runs (sync none copies only before guest writes).
    pub fn copies_in_background(self) -> bool {
        self != SyncMode::None
    }

    /// A full or top backup with a bitmap anchors the bitmap to itself.
    pub fn anchors_bitmap(self) -> bool {
        matches!(self, SyncMode::Full | SyncMode::Top)
    }

    /// The job's initial copy bitmap at `cluster` granularity: every
    /// cluster (full, none), the clusters the top layer allocates (top), or
    /// the clusters the bitmap marks dirty (incremental, bitmap).
    pub fn initial_copy_bitmap(
        self,
        top: &dyn BlockNode,
        size: u64,
        bitmap: Option<&Bitmap>,
        cluster: u64,
    ) -> crate::error::Result<Bits> {
        let clusters = size.div_ceil(cluster);
        Ok(match self {
            SyncMode::Full | SyncMode::None => Bits::full(clusters),
            SyncMode::Top => {
                let mut bits = Bits::new(clusters);
                for_each_extent(top, 0, top.size(), |pos, ext| {
                    if ext.status != Status::Unallocated {
                        bits.set_range(pos / cluster, (pos + ext.len).div_ceil(cluster));
                    }
                })?;
                bits
            }
            SyncMode::Incremental | SyncMode::Bitmap => {
                let mut bits = Bits::new(clusters);
                for (s, e) in bitmap.map(|b| b.dirty_ranges()).unwrap_or_default() {
                    bits.set_range(s / cluster, e.div_ceil(cluster));
                }
                bits
            }
        })
    }
}
