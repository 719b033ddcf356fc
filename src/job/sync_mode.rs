//! The job's vocabulary after QEMU's backup job: what to copy ([`SyncMode`])
//! and what happens to the bitmap ([`BitmapMode`]), and the one place that
//! turns a sync mode into the job's initial copy bitmap (QEMU's
//! `backup_init_bcs_bitmap`). A new sync mode touches this module, the
//! command line's enum and its documentation.

use crate::bitmap::{Bitmap, Bits};
use crate::node::{BlockNode, Status, for_each_extent};

/// What a backup copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every cluster of the image (the default).
    #[default]
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

/// The backing file a target gets when none is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultBacking {
    /// None: the target is self-contained.
    Nothing,
    /// The source itself (fleecing).
    Source,
    /// The source's backing file (top).
    SourceBacking,
    /// The backup the bitmap is anchored to (incremental, bitmap).
    Parent,
}

impl SyncMode {
    /// Check the settings that depend on the sync mode: `bitmap` (a
    /// bitmap is named), `mode` (the bitmap mode asked for), `guest` (None:
    /// no guest; Some(bounded)). The error is the message of a usage error.
    pub fn check(
        self,
        bitmap: bool,
        mode: Option<BitmapMode>,
        guest: Option<bool>,
    ) -> Result<(), String> {
        if self.uses_bitmap() && !bitmap {
            return Err(format!("--sync {self} needs --bitmap NAME"));
        }
        match self {
            SyncMode::None if bitmap => Err("--sync none takes no --bitmap".into()),
            SyncMode::Incremental if mode.is_some_and(|m| m != BitmapMode::OnSuccess) => Err(
                "--sync incremental always uses --bitmap-mode on-success; use --sync bitmap for another mode".into(),
            ),
            SyncMode::Full | SyncMode::Top if mode == Some(BitmapMode::Never) => Err(format!(
                "--bitmap-mode never is meaningless with --sync {self}: a full or top backup with --bitmap exists to anchor the bitmap to it (QEMU refuses it too); leave --bitmap-mode out"
            )),
            SyncMode::None => match guest {
                None => Err("--sync none needs --guest: it copies only what a guest overwrites".into()),
                Some(false) => Err(
                    "--sync none ends when the guest ends: give the --guest SPEC a count= or duration=".into(),
                ),
                Some(true) => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The backing file of the target when none is named.
    pub fn default_backing(self) -> DefaultBacking {
        match self {
            SyncMode::Full => DefaultBacking::Nothing,
            SyncMode::Top => DefaultBacking::SourceBacking,
            SyncMode::Incremental | SyncMode::Bitmap => DefaultBacking::Parent,
            SyncMode::None => DefaultBacking::Source,
        }
    }

    /// "a full", "an incremental", ... (for messages).
    pub fn article(self) -> &'static str {
        match self {
            SyncMode::Full => "a full",
            SyncMode::Top => "a top",
            SyncMode::Incremental => "an incremental",
            SyncMode::Bitmap => "a bitmap",
            SyncMode::None => "a fleecing (sync none)",
        }
    }

    /// What the bytes a backup of this mode leaves out are.
    pub fn clean_means(self) -> &'static str {
        match self {
            SyncMode::Top => "not allocated in the top layer",
            _ => "unchanged since the parent",
        }
    }

    /// The target must be a qcow2 (it has a backing file, or zero clusters
    /// that must shadow one).
    pub fn needs_qcow2(self) -> bool {
        !matches!(self, SyncMode::Full)
    }

    /// What the job does not copy is the source's backing chain's, which
    /// the job checks is unchanged (top): a manifest may record it by the
    /// files' identity instead of hashing it.
    pub fn leaves_the_rest_to_the_backing_file(self) -> bool {
        matches!(self, SyncMode::Top)
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
