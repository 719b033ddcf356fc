//! The backing chain: a layer stacked over the image below it.
//!
//! Reads go to the top layer where it holds data or zeros and fall through
//! to the backing image where it holds nothing. A backing image shorter than
//! the top reads as zeros past its end; a longer one is cut at the top's
//! size.

use super::{BlockNode, Extent, Status, check_range};
use crate::error::Result;
use std::path::Path;
use std::sync::Arc;

/// A top layer over an optional backing image.
pub struct ChainNode {
    // set at open
    top: Arc<dyn BlockNode>,
    backing: Option<Arc<dyn BlockNode>>,
}

impl ChainNode {
    /// `top` over `backing` (None: zeros below).
    pub fn new(top: Arc<dyn BlockNode>, backing: Option<Arc<dyn BlockNode>>) -> ChainNode {
        ChainNode { top, backing }
    }

    /// The top layer alone.
    pub fn top(&self) -> &Arc<dyn BlockNode> {
        &self.top
    }

    /// [`BlockNode::block_status`], or [`BlockNode::allocation`] when
    /// `fast`, of the whole chain.
    fn status(&self, offset: u64, len: u64, fast: bool) -> Result<Extent> {
        check_range(self.path(), offset, len, self.size())?;
        let ext = if fast {
            self.top.allocation(offset, len)?
        } else {
            self.top.block_status(offset, len)?
        };
        if ext.status != Status::Unallocated {
            return Ok(ext);
        }
        self.below(offset, ext.len, fast)
    }

    /// Status of the backing image for `[offset, offset+len)`, which the top
    /// leaves unallocated ([`BlockNode::allocation`] when `fast`).
    fn below(&self, offset: u64, len: u64, fast: bool) -> Result<Extent> {
        let Some(b) = &self.backing else {
            return Ok(Extent {
                status: Status::Unallocated,
                len,
            });
        };
        let bsize = b.size();
        if offset >= bsize {
            return Ok(Extent {
                status: Status::Unallocated,
                len,
            });
        }
        if fast {
            b.allocation(offset, len.min(bsize - offset))
        } else {
            b.block_status(offset, len.min(bsize - offset))
        }
    }
}

/// Bytes of the image a chain maps at once in [`ChainNode::walk_extents`]:
/// what it holds in memory is bounded by this window's extents, whatever
/// the virtual size.
/// (Small in the unit tests, so that they cross windows.)
const WINDOW: u64 = if cfg!(test) { 1 << 14 } else { 1 << 30 };

/// `layer` of a run no layer holds.
pub(super) const NONE: u32 = u32::MAX;

/// `[start, end)` of the image reads as `status` from layer `layer` (top is
/// 0; [`NONE`] where no layer holds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LayerRun {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) status: Status,
    pub(super) layer: u32,
}

/// The runs of `[s, e)`: each layer, top down, walked once over what the
/// layers above leave unallocated. As in [`ChainNode`], a
/// layer shorter than the one above it reads as zeros past its end, and
/// the layers below it are not asked there. Past `max` runs (held or
/// still open) it stops collecting and returns more than `max`.
pub(super) fn map_layers(
    layers: &[Arc<dyn BlockNode>],
    s: u64,
    e: u64,
    fast: bool,
    max: usize,
) -> Result<Vec<LayerRun>> {
    let mut out: Vec<LayerRun> = Vec::new();
    let mut open: Vec<(u64, u64)> = vec![(s, e)];
    for (k, layer) in layers.iter().enumerate() {
        let lsize = layer.size();
        open.retain_mut(|r| {
            r.1 = r.1.min(lsize);
            r.0 < r.1
        });
        let (Some(&(lo, _)), Some(&(_, hi))) = (open.first(), open.last()) else {
            break;
        };
        let mut still: Vec<(u64, u64)> = Vec::new();
        let mut j = 0;
        layer.walk_extents(lo, hi, fast, &mut |pos, ext| {
            if out.len() + still.len() > max {
                return;
            }
            let end = pos + ext.len;
            while j < open.len() && open[j].1 <= pos {
                j += 1;
            }
            let mut i = j;
            while i < open.len() && open[i].0 < end {
                let (a, z) = (open[i].0.max(pos), open[i].1.min(end));
                if a < z {
                    if ext.status == Status::Unallocated {
                        match still.last_mut() {
                            Some(l) if l.1 == a => l.1 = z,
                            _ => still.push((a, z)),
                        }
                    } else {
                        out.push(LayerRun {
                            start: a,
                            end: z,
                            status: ext.status,
                            layer: k as u32,
                        });
                    }
                }
                i += 1;
            }
        })?;
        if out.len() + still.len() > max {
            out.extend(still.iter().map(|&(start, end)| LayerRun {
                start,
                end,
                status: Status::Unallocated,
                layer: NONE,
            }));
            return Ok(out);
        }
        open = still;
    }
    // What no layer holds reads as zeros; runs alike and adjacent merge.
    out.sort_unstable_by_key(|r| r.start);
    let mut runs: Vec<LayerRun> = Vec::with_capacity(out.len() + 1);
    let mut push = |r: LayerRun| match runs.last_mut() {
        Some(l) if l.end == r.start && l.status == r.status && l.layer == r.layer => l.end = r.end,
        _ => runs.push(r),
    };
    let mut pos = s;
    for r in out {
        if r.start > pos {
            push(LayerRun {
                start: pos,
                end: r.start,
                status: Status::Unallocated,
                layer: NONE,
            });
        }
        pos = r.end;
        push(r);
    }
    if pos < e {
        push(LayerRun {
            start: pos,
            end: e,
            status: Status::Unallocated,
            layer: NONE,
        });
    }
    Ok(runs)
}

impl BlockNode for ChainNode {
    fn path(&self) -> &Path {
        self.top.path()
    }

    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        self.top.identity()
    }

    fn size(&self) -> u64 {
        self.top.size()
    }

    fn cluster_size(&self) -> u64 {
        self.top.cluster_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.path(), offset, buf.len() as u64, self.size())?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let ext = self.top.allocation(pos, end - pos)?;
            let out = &mut buf[(pos - offset) as usize..(pos - offset + ext.len) as usize];
            match ext.status {
                Status::Data => self.top.read(pos, out)?,
                Status::Zero => out.fill(0),
                Status::Unallocated => match &self.backing {
                    Some(b) if pos < b.size() => {
                        let n = (b.size() - pos).min(ext.len) as usize;
                        b.read(pos, &mut out[..n])?;
                        out[n..].fill(0);
                    }
                    _ => out.fill(0),
                },
            }
            pos += ext.len;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.top.flush()
    }

    /// The status of the whole image: Data or Zero where some layer holds
    /// the range, Unallocated where none does (reads as zeros).
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.status(offset, len, false)
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        self.status(offset, len, true)
    }

    /// Each layer's map is walked once per [`WINDOW`] (not once per extent
    /// of the layers above it), so a long chain of small incrementals maps
    /// in time that follows its layers' extents.
    fn walk_extents(
        &self,
        start: u64,
        end: u64,
        fast: bool,
        f: &mut dyn FnMut(u64, Extent),
    ) -> Result<()> {
        check_range(self.path(), start, end.saturating_sub(start), self.size())?;
        let mut pos = start;
        while pos < end {
            let w = end.min(pos.saturating_add(WINDOW));
            let layers: Vec<Arc<dyn BlockNode>> = std::iter::once(&self.top)
                .chain(&self.backing)
                .cloned()
                .collect();
            for r in map_layers(&layers, pos, w, fast, usize::MAX)? {
                f(
                    r.start,
                    Extent {
                        status: r.status,
                        len: r.end - r.start,
                    },
                );
            }
            pos = w;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A layer described by the status of each of its clusters; its
    /// status answers stop after `cap` clusters, as a qcow2 layer's do.
    struct MapNode {
        path: std::path::PathBuf,
        map: Vec<Status>,
        cluster: u64,
        cap: u64,
    }

    impl BlockNode for MapNode {
        fn path(&self) -> &Path {
            &self.path
        }
        fn size(&self) -> u64 {
            self.map.len() as u64 * self.cluster
        }
        fn cluster_size(&self) -> u64 {
            self.cluster
        }
        fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
            check_range(&self.path, offset, len, self.size())?;
            let (c, end) = (self.cluster, offset + len);
            let status = self.map[(offset / c) as usize];
            let mut pos = (offset / c + 1) * c;
            let mut n = 1;
            while pos < end && n < self.cap && self.map[(pos / c) as usize] == status {
                pos += c;
                n += 1;
            }
            Ok(Extent {
                status,
                len: pos.min(end) - offset,
            })
        }
    }

    /// Coalesced `(start, end, status)` runs.
    fn runs(node: &dyn BlockNode, start: u64, end: u64, merged: bool) -> Vec<(u64, u64, Status)> {
        let mut out: Vec<(u64, u64, Status)> = Vec::new();
        let mut add = |pos: u64, ext: Extent| match out.last_mut() {
            Some(l) if l.1 == pos && l.2 == ext.status => l.1 = pos + ext.len,
            _ => out.push((pos, pos + ext.len, ext.status)),
        };
        if merged {
            node.walk_extents(start, end, false, &mut add).unwrap();
        } else {
            // One status call per extent, as before walk_extents.
            let mut pos = start;
            while pos < end {
                let ext = node.block_status(pos, end - pos).unwrap();
                add(pos, ext);
                pos += ext.len;
            }
        }
        out
    }

    fn layer() -> impl Strategy<Value = (Vec<u8>, u64)> {
        (
            // 0: unallocated (most), 1: data, 2: zero.
            proptest::collection::vec(
                prop_oneof![6 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)],
                1..96,
            ),
            1u64..6,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The chain's merged walk gives the map one status call per
        /// extent gives, across windows, for layers of different sizes.
        #[test]
        fn the_merged_walk_maps_as_extent_by_extent(
            layers in proptest::collection::vec(layer(), 1..6),
            a in 0u64..96,
            b in 0u64..96,
        ) {
            let cluster = 512u64;
            let mut node: Option<Arc<dyn BlockNode>> = None;
            for (k, (map, cap)) in layers.iter().enumerate().rev() {
                let map = map
                    .iter()
                    .map(|&m| match m {
                        1 => Status::Data,
                        2 => Status::Zero,
                        _ => Status::Unallocated,
                    })
                    .collect();
                let top: Arc<dyn BlockNode> = Arc::new(MapNode {
                    path: format!("layer{k}").into(),
                    map,
                    cluster,
                    cap: *cap,
                });
                node = Some(Arc::new(ChainNode::new(top, node)));
            }
            let chain = node.unwrap();
            let size = chain.size();
            let (a, b) = ((a * 300).min(size), (b * 300).min(size));
            let (s, e) = (a.min(b), a.max(b));
            prop_assert_eq!(runs(chain.as_ref(), s, e, true), runs(chain.as_ref(), s, e, false));
        }
    }
}
