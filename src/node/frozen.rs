//! A backing chain that does not change, mapped once.
//!
//! A [`super::chain::ChainNode`] answers every read and status question by
//! asking its layers top down: a read in a chain of 31 small incrementals
//! asks up to 31 layers where the data is, for every extent. A backup being
//! verified or restored does not change while it is read, so its map can be
//! built once: [`FrozenChain`] walks each layer's own map once (in slices, in
//! parallel), keeps which layer holds each run of the image, and then reads
//! each run straight from its layer. Its memory follows the runs (24 bytes
//! each), and is capped at [`MAX_RUNS`]: a chain whose map would hold more
//! is read through its [`super::chain::ChainNode`] as before.

use super::chain::{LayerRun as Run, map_layers};
use super::probe::Image;
use super::{BlockNode, Extent, Status, check_range};
use crate::error::Result;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The most runs a [`FrozenChain`] keeps (24 MiB of map).
pub const MAX_RUNS: usize = 1 << 20;

/// A chain of layers, mapped once (see the module documentation).
pub struct FrozenChain {
    // set at creation
    whole: Arc<dyn BlockNode>,
    layers: Vec<Arc<dyn BlockNode>>,
    /// Cover `[0, size)` in order, without gaps.
    runs: Vec<Run>,
}

impl FrozenChain {
    /// Map `image`'s chain. `None` when it has a single layer (nothing to
    /// gain), when its map would hold more than [`MAX_RUNS`] runs, or when a
    /// layer cannot be mapped (its error is then met, and reported, where
    /// it is read).
    pub fn map(image: &Image) -> Option<FrozenChain> {
        Self::map_at_most(image, MAX_RUNS)
    }

    /// [`Self::map`] with a map of at most `max` runs.
    fn map_at_most(image: &Image, max: usize) -> Option<FrozenChain> {
        use rayon::prelude::*;
        if image.layers.len() < 2 {
            return None;
        }
        let layers: Vec<Arc<dyn BlockNode>> = image.layers.iter().map(|l| l.node.clone()).collect();
        let size = image.node.size();
        // Slices of at least 64 MiB (4 KiB in the unit tests, to cross
        // them), at most 64 of them.
        let least = if cfg!(test) { 4096 } else { 64 << 20 };
        let slice = (size / 64).next_power_of_two().max(least);
        let slices: Vec<(u64, u64)> = (0..size.div_ceil(slice))
            .map(|k| (k * slice, ((k + 1) * slice).min(size)))
            .collect();
        let count = AtomicUsize::new(0);
        let parts: Vec<Option<Vec<Run>>> = slices
            .par_iter()
            .with_max_len(1)
            .map(|&(s, e)| {
                if count.load(Ordering::Relaxed) > max {
                    return None;
                }
                let runs = map_layers(&layers, s, e, true, max)
                    .map_err(|err| tracing::debug!("no chain map: {err}"))
                    .ok()?;
                count.fetch_add(runs.len(), Ordering::Relaxed);
                Some(runs)
            })
            .collect();
        if count.load(Ordering::Relaxed) > max {
            return None;
        }
        let mut runs = Vec::with_capacity(count.load(Ordering::Relaxed));
        for p in parts {
            runs.extend(p?);
        }
        Some(FrozenChain {
            whole: image.node.clone(),
            layers,
            runs,
        })
    }

    /// Replace `image.node` by its chain mapped once, when [`Self::map`]
    /// gives one. For an image nothing writes to while it is read.
    pub fn freeze(image: &mut Image) {
        if let Some(f) = FrozenChain::map(image) {
            image.node = Arc::new(f);
        }
    }

    /// The index of the run holding `offset`.
    fn at(&self, offset: u64) -> usize {
        self.runs.partition_point(|r| r.end <= offset)
    }

    fn run_at(&self, offset: u64) -> Result<Run> {
        match self.runs.get(self.at(offset)) {
            Some(r) => Ok(*r),
            None => Err(super::BlockError::OutOfRange {
                path: self.path().to_path_buf(),
                offset,
                len: 0,
                size: self.size(),
            }),
        }
    }
}

impl BlockNode for FrozenChain {
    fn path(&self) -> &Path {
        self.whole.path()
    }

    fn identity(&self) -> Option<std::io::Result<crate::bitmap::Identity>> {
        self.whole.identity()
    }

    fn size(&self) -> u64 {
        self.whole.size()
    }

    fn cluster_size(&self) -> u64 {
        self.whole.cluster_size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self.path(), offset, buf.len() as u64, self.size())?;
        let end = offset + buf.len() as u64;
        let mut k = self.at(offset);
        let mut pos = offset;
        while pos < end {
            let Some(r) = self.runs.get(k) else {
                return self.whole.read(pos, &mut buf[(pos - offset) as usize..]);
            };
            let to = r.end.min(end);
            let out = &mut buf[(pos - offset) as usize..(to - offset) as usize];
            match self.layers.get(r.layer as usize) {
                Some(layer) if r.status == Status::Data => layer.read(pos, out)?,
                _ => out.fill(0),
            }
            pos = to;
            k += 1;
        }
        Ok(())
    }

    /// Data runs are asked of the layer holding them (a hole in its host
    /// file reads as zeros); the rest comes from the map.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(self.path(), offset, len, self.size())?;
        let r = self.run_at(offset)?;
        let len = r.end.min(offset + len) - offset;
        match self.layers.get(r.layer as usize) {
            Some(layer) if r.status == Status::Data => layer.block_status(offset, len),
            _ => Ok(Extent {
                status: r.status,
                len,
            }),
        }
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(self.path(), offset, len, self.size())?;
        let r = self.run_at(offset)?;
        Ok(Extent {
            status: r.status,
            len: r.end.min(offset + len) - offset,
        })
    }

    fn walk_extents(
        &self,
        start: u64,
        end: u64,
        fast: bool,
        f: &mut dyn FnMut(u64, Extent),
    ) -> Result<()> {
        check_range(self.path(), start, end.saturating_sub(start), self.size())?;
        let mut k = self.at(start);
        let mut pos = start;
        while pos < end {
            let Some(r) = self.runs.get(k) else {
                return self.whole.walk_extents(pos, end, fast, f);
            };
            let to = r.end.min(end);
            match self.layers.get(r.layer as usize) {
                Some(layer) if r.status == Status::Data && !fast => {
                    layer.walk_extents(pos, to, false, f)?;
                }
                _ => f(
                    pos,
                    Extent {
                        status: r.status,
                        len: to - pos,
                    },
                ),
            }
            pos = to;
            k += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::chain::ChainNode;
    use crate::node::mem::MemNode;
    use crate::node::probe::{Layer, LayerInfo};
    use proptest::prelude::*;

    /// A layer: bytes, and which clusters it holds (0 unallocated, 1 data,
    /// 2 zero).
    struct Part {
        path: std::path::PathBuf,
        bytes: MemNode,
        map: Vec<u8>,
        cluster: u64,
    }

    impl BlockNode for Part {
        fn path(&self) -> &Path {
            &self.path
        }
        fn size(&self) -> u64 {
            self.bytes.size()
        }
        fn cluster_size(&self) -> u64 {
            self.cluster
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.bytes.read(offset, buf)
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
            check_range(&self.path, offset, len, self.size())?;
            let c = self.cluster;
            let kind = |pos: u64| self.map[(pos / c) as usize];
            let first = kind(offset);
            let mut pos = (offset / c + 1) * c;
            while pos < offset + len && kind(pos) == first {
                pos += c;
            }
            Ok(Extent {
                status: match first {
                    1 => Status::Data,
                    2 => Status::Zero,
                    _ => Status::Unallocated,
                },
                len: pos.min(offset + len) - offset,
            })
        }
    }

    fn image(parts: &[(Vec<u8>, u8)]) -> Image {
        let cluster = 512u64;
        let nodes: Vec<Arc<dyn BlockNode>> = parts
            .iter()
            .enumerate()
            .map(|(k, (map, fill))| {
                let bytes: Vec<u8> = map
                    .iter()
                    .flat_map(|&m| {
                        // Data clusters hold the layer's byte, others junk
                        // that must never be read.
                        let b = if m == 1 { *fill } else { 0xee };
                        std::iter::repeat_n(b, cluster as usize)
                    })
                    .collect();
                Arc::new(Part {
                    path: format!("layer{k}").into(),
                    bytes: MemNode::new("m", bytes, cluster),
                    map: map.clone(),
                    cluster,
                }) as Arc<dyn BlockNode>
            })
            .collect();
        let mut node: Option<Arc<dyn BlockNode>> = None;
        for n in nodes.iter().rev() {
            node = Some(Arc::new(ChainNode::new(n.clone(), node)));
        }
        let layers = nodes
            .iter()
            .map(|n| Layer {
                info: LayerInfo {
                    path: n.path().to_path_buf(),
                    format: crate::node::probe::Format::Raw,
                    virtual_size: n.size(),
                    cluster_size: 512,
                    file_length: n.size(),
                    disk_usage: n.size(),
                    backing_file: None,
                    backing_format: None,
                    qcow2_version: None,
                },
                node: n.clone(),
            })
            .collect();
        Image {
            node: node.unwrap_or_else(|| nodes[0].clone()),
            layers,
        }
    }

    fn statuses(n: &dyn BlockNode, fast: bool) -> Vec<(u64, Status)> {
        let mut v = Vec::new();
        n.walk_extents(0, n.size(), fast, &mut |pos, e| {
            for k in 0..e.len / 512 {
                v.push((pos + k * 512, e.status));
            }
        })
        .unwrap();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The frozen map reads, walks and answers as the chain does, for
        /// layers of different lengths.
        #[test]
        fn a_frozen_chain_reads_as_the_chain(
            parts in proptest::collection::vec(
                (proptest::collection::vec(prop_oneof![5 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)], 1..80), 1u8..200),
                2..6,
            ),
            at in 0u64..80,
            len in 1u64..40_000,
        ) {
            let img = image(&parts);
            let frozen = FrozenChain::map(&img).unwrap();
            let chain = img.node.as_ref();
            let size = chain.size();
            let mut a = vec![0u8; size as usize];
            let mut b = vec![1u8; size as usize];
            chain.read(0, &mut a).unwrap();
            frozen.read(0, &mut b).unwrap();
            prop_assert_eq!(&a, &b);
            let off = (at * 300).min(size - 1);
            let n = len.min(size - off) as usize;
            let mut c = vec![2u8; n];
            frozen.read(off, &mut c).unwrap();
            prop_assert_eq!(&a[off as usize..off as usize + n], &c[..]);
            prop_assert_eq!(statuses(chain, true), statuses(&frozen, true));
            prop_assert_eq!(statuses(chain, false), statuses(&frozen, false));
            let e1 = chain.allocation(off, n as u64).unwrap();
            let e2 = frozen.allocation(off, n as u64).unwrap();
            prop_assert_eq!(e1.status, e2.status);
        }
    }

    #[test]
    fn a_map_past_its_limit_is_not_made() {
        // Alternating clusters over three layers: 13 runs.
        let img = image(&[
            (vec![1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0], 5),
            (vec![0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0], 6),
            (vec![0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1], 7),
        ]);
        let f = FrozenChain::map_at_most(&img, 100).unwrap();
        assert_eq!(f.runs.len(), 12);
        assert!(FrozenChain::map_at_most(&img, 12).is_some());
        assert!(FrozenChain::map_at_most(&img, 11).is_none());
        assert!(FrozenChain::map_at_most(&img, 3).is_none());
    }

    #[test]
    fn one_layer_is_left_as_it_is() {
        let img = image(&[(vec![1, 0, 2], 7)]);
        assert!(FrozenChain::map(&img).is_none());
    }
}
