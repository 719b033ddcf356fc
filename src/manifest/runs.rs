//! Runs of chunks and what a manifest says of them: zero, data (a digest
//! each) or as in the parent's manifest.

use std::collections::BTreeMap;

/// What a run of chunks is in a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The chunks read as zeros; no digests are stored.
    Zero,
    /// One digest per chunk is stored.
    Data,
    /// The chunks have the digests the parent's manifest gives them.
    Parent,
    /// The chunks read as the source's backing file (`backing_files`)
    /// reads them; their digests are computed when needed.
    Backing,
}

impl Kind {
    /// The kind's code in a run record.
    pub fn code(self) -> u64 {
        match self {
            Kind::Zero => 0,
            Kind::Data => 1,
            Kind::Parent => 2,
            Kind::Backing => 3,
        }
    }

    /// The kind of a run record's code.
    pub fn from_code(c: u64) -> Option<Kind> {
        match c {
            0 => Some(Kind::Zero),
            1 => Some(Kind::Data),
            2 => Some(Kind::Parent),
            3 => Some(Kind::Backing),
            _ => None,
        }
    }
}

/// Disjoint runs `[start, end)` of chunks, each of a [`Kind`]; adjacent runs
/// of one kind are merged. Memory follows the number of runs, not of chunks.
#[derive(Debug, Default, Clone)]
pub struct RunMap {
    m: BTreeMap<u64, (u64, Kind)>,
}

impl RunMap {
    /// An empty map.
    pub fn new() -> RunMap {
        RunMap::default()
    }

    /// Say that `[s, e)` is of `kind`, replacing what was said of it.
    pub fn insert(&mut self, s: u64, e: u64, kind: Kind) {
        if s >= e {
            return;
        }
        let overlapping: Vec<(u64, u64, Kind)> = self
            .m
            .range(..e)
            .rev()
            .take_while(|(_, (re, _))| *re > s)
            .map(|(&rs, &(re, k))| (rs, re, k))
            .collect();
        for (rs, re, k) in overlapping {
            self.m.remove(&rs);
            if rs < s {
                self.m.insert(rs, (s, k));
            }
            if re > e {
                self.m.insert(e, (re, k));
            }
        }
        let (mut ns, mut ne) = (s, e);
        if let Some((&ps, &(pe, pk))) = self.m.range(..ns).next_back()
            && pe == ns
            && pk == kind
        {
            self.m.remove(&ps);
            ns = ps;
        }
        if let Some(&(next_end, nk)) = self.m.get(&ne)
            && nk == kind
        {
            self.m.remove(&ne);
            ne = next_end;
        }
        self.m.insert(ns, (ne, kind));
    }

    /// The runs in order.
    pub fn runs(&self) -> Vec<(u64, u64, Kind)> {
        self.m.iter().map(|(&s, &(e, k))| (s, e, k)).collect()
    }

    /// The runs of `[0, n)` nothing was said of.
    pub fn gaps(&self, n: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = 0;
        for (&s, &(e, _)) in &self.m {
            if s >= n {
                break;
            }
            if s > pos {
                out.push((pos, s));
            }
            pos = pos.max(e);
        }
        if pos < n {
            out.push((pos, n));
        }
        out
    }
}

/// Merge sorted or unsorted chunk ranges into sorted disjoint ones.
pub fn union(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|&(s, e)| s < e);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Zero),
            Just(Kind::Data),
            Just(Kind::Parent),
            Just(Kind::Backing)
        ]
    }

    proptest! {
        /// The map says of every chunk what the last insert said, and its
        /// runs are disjoint, sorted, merged and cover what was said.
        #[test]
        fn the_map_agrees_with_a_model(ops in prop::collection::vec((0u64..200, 1u64..60, kind()), 0..40)) {
            let n = 260u64;
            let mut model: Vec<Option<Kind>> = vec![None; n as usize];
            let mut m = RunMap::new();
            for (s, len, k) in ops {
                let e = s + len;
                m.insert(s, e, k);
                for i in s..e {
                    model[i as usize] = Some(k);
                }
            }
            let runs = m.runs();
            let mut got: Vec<Option<Kind>> = vec![None; n as usize];
            let mut prev: Option<(u64, Kind)> = None;
            for &(s, e, k) in &runs {
                prop_assert!(s < e);
                if let Some((pe, pk)) = prev {
                    prop_assert!(pe <= s);
                    prop_assert!(!(pe == s && pk == k), "unmerged runs at {}", s);
                }
                prev = Some((e, k));
                for i in s..e {
                    got[i as usize] = Some(k);
                }
            }
            prop_assert_eq!(&got, &model);
            let gaps = m.gaps(n);
            let mut covered = vec![false; n as usize];
            for (s, e) in gaps {
                for i in s..e {
                    prop_assert!(model[i as usize].is_none());
                    covered[i as usize] = true;
                }
            }
            for i in 0..n as usize {
                prop_assert_eq!(covered[i], model[i].is_none());
            }
        }
    }

    #[test]
    fn union_merges_overlaps_and_neighbours() {
        assert_eq!(
            union(vec![(5, 7), (0, 2), (2, 3), (6, 9), (20, 20), (10, 11)]),
            vec![(0, 3), (5, 9), (10, 11)]
        );
    }
}
