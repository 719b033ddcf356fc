//! The block-copy state's invariants: claims never overlap, a failed claim
//! becomes dirty again, and (a property with shrinking) copy-before-write
//! keeps the target equal to the source as it was at the start, whatever
//! the guest writes and however the job and the guest interleave.

use super::*;
use crate::node::cbw::{CbwNode, OnCbwError};
use crate::node::fault::{FaultNode, Rule};
use crate::node::mem::MemNode;
use proptest::prelude::*;
use std::collections::BTreeSet;

const CS: u64 = 4096;

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i / 512) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

fn config(max_chunk: u64, cbw_cache: u64) -> Config {
    Config {
        cluster_size: CS,
        max_chunk,
        write_zeroes: false,
        speed: None,
        compress: false,
        cbw_cache,
        copy_range: false,
    }
}

fn state(clusters: u64, max_chunk: u64, target: Arc<dyn BlockNode>) -> (Arc<MemNode>, BlockCopy) {
    let src = Arc::new(MemNode::new("src", pattern(clusters * CS, 1), CS));
    let bc = BlockCopy::new(
        src.clone(),
        target,
        config(max_chunk, 0),
        Bits::full(clusters),
        Cancel::new(),
        None,
    );
    (src, bc)
}

#[test]
fn claims_never_overlap_and_each_cluster_is_claimed_once() {
    let clusters = 256;
    let target = Arc::new(MemNode::new("t", vec![0; (clusters * CS) as usize], CS));
    let (_src, bc) = state(clusters, 4 * CS, target);
    let held: Mutex<Vec<Claim>> = Mutex::new(Vec::new());
    let claimed: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let take = |c: Claim| {
        let mut h = held.lock().unwrap();
        assert!(
            h.iter().all(|o| o.end <= c.start || c.end <= o.start),
            "{c:?} overlaps a claim in flight: {h:?}"
        );
        h.push(c);
        drop(h);
        claimed
            .lock()
            .unwrap()
            .extend((c.start / CS)..c.end.div_ceil(CS));
        std::thread::yield_now();
        held.lock().unwrap().retain(|o| *o != c);
        bc.release(c, true);
    };
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while let Some(c) = bc.claim_next() {
                    take(c);
                }
            });
        }
        for seed in 0..2u64 {
            let (take, bc) = (&take, &bc);
            s.spawn(move || {
                let mut x = seed + 1;
                for _ in 0..200 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 33) % (clusters * CS);
                    let len = ((x >> 20) % (6 * CS)).min(clusters * CS - off).max(1);
                    for c in bc.claim_range(off, len, None).unwrap() {
                        take(c);
                    }
                }
            });
        }
    });
    let mut all = claimed.into_inner().unwrap();
    all.sort_unstable();
    let want: Vec<u64> = (0..clusters).collect();
    assert_eq!(all, want, "every cluster claimed exactly once");
    assert_eq!(bc.bitmap().count(), 0);
}

#[test]
fn a_failed_claim_becomes_dirty_again() {
    let clusters = 16;
    let target = Arc::new(MemNode::new("t", vec![0; (clusters * CS) as usize], CS));
    let (_src, bc) = state(clusters, 2 * CS, target);
    let c = bc.claim_next().unwrap();
    assert_eq!((c.start, c.end), (0, 2 * CS));
    assert!(
        !bc.bitmap().get(0) && !bc.bitmap().get(1),
        "claimed bits clear"
    );
    bc.release(c, false);
    assert!(
        bc.bitmap().get(0) && bc.bitmap().get(1),
        "failed bits set again"
    );
    // The job's cursor moved on; a copy-before-write still finds them.
    let again = bc.claim_range(0, CS, None).unwrap();
    assert_eq!(again, vec![Claim { start: 0, end: CS }]);
    bc.release(again[0], true);
    assert!(!bc.bitmap().get(0) && bc.bitmap().get(1));

    // A copy whose target write fails: its clusters are to copy again.
    let rule: Rule = "target:write:EIO".parse().unwrap();
    let mem: Arc<dyn BlockNode> = Arc::new(MemNode::new("t", vec![0; 16 * CS as usize], CS));
    let failing = Arc::new(FaultNode::new(mem, vec![rule]));
    let (_src, bc) = state(clusters, 2 * CS, failing);
    let c = bc.claim_next().unwrap();
    let mut buf = Vec::new();
    let err = bc.copy_claimed(c, &mut buf).unwrap_err();
    assert!(matches!(err, CopyError::Target(_)), "{err:?}");
    bc.release(c, false);
    assert_eq!(bc.bitmap().count(), clusters, "nothing counts as copied");
    assert_eq!(bc.progress.done.load(Ordering::Relaxed), 0);
}

#[test]
fn split_pieces_release_on_their_own() {
    let clusters = 8;
    let target = Arc::new(MemNode::new("t", vec![0; (clusters * CS) as usize], CS));
    let (_src, bc) = state(clusters, 4 * CS, target);
    let c = bc.claim_next().unwrap();
    let pieces = bc.split_claim(c);
    assert_eq!(pieces.len(), 4);
    for (i, p) in pieces.iter().enumerate() {
        bc.release(*p, i != 2);
    }
    let dirty: Vec<u64> = (0..clusters).filter(|&i| bc.bitmap().get(i)).collect();
    assert_eq!(dirty, vec![2, 4, 5, 6, 7]);
    // Nothing is left in flight: a request over the first four clusters
    // does not wait and finds only the failed one.
    let got = bc.claim_range(0, 4 * CS, None).unwrap();
    assert_eq!(
        got,
        vec![Claim {
            start: 2 * CS,
            end: 3 * CS
        }]
    );
}

#[test]
fn a_claim_in_a_hole_covers_the_hole_and_data_claims_stay_small() {
    // 64 clusters: data in 0..2 and 40..41, zeros elsewhere.
    let mut bytes = vec![0u8; 64 * CS as usize];
    bytes[..2 * CS as usize].fill(1);
    bytes[40 * CS as usize..41 * CS as usize].fill(2);
    let src = Arc::new(MemNode::new("src", bytes.clone(), CS));
    let target = Arc::new(MemNode::new("t", vec![9; bytes.len()], CS));
    let bc = BlockCopy::new(
        src,
        target.clone(),
        config(CS, 0),
        Bits::full(64),
        Cancel::new(),
        None,
    );
    bc.map_holes();
    let mut claims = Vec::new();
    let mut buf = Vec::new();
    while let Some(c) = bc.claim_next() {
        bc.copy_claimed(c, &mut buf).unwrap();
        bc.release(c, true);
        claims.push((c.start / CS, c.end / CS));
    }
    assert_eq!(claims, vec![(0, 1), (1, 2), (2, 40), (40, 41), (41, 64)]);
    // Holes are left as they are in a target that reads as zeros.
    let t = target.contents();
    assert_eq!(t[..2 * CS as usize], bytes[..2 * CS as usize]);
    assert_eq!(
        t[40 * CS as usize..41 * CS as usize],
        bytes[40 * CS as usize..41 * CS as usize]
    );
    assert_eq!(bc.progress.zero.load(Ordering::Relaxed), 61 * CS);
}

/// One step of a backup with a guest: the job copies its next claim, or
/// the guest writes through the copy-before-write filter.
#[derive(Debug, Clone)]
enum Step {
    Job,
    Guest { offset: u64, len: u64, seed: u8 },
    Drain,
}

fn step(size: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => Just(Step::Job),
        3 => (0..size, 1..3 * CS, any::<u8>()).prop_map(move |(offset, len, seed)| Step::Guest {
            offset,
            len: len.min(size - offset),
            seed,
        }),
        1 => Just(Step::Drain),
    ]
}

/// (size, max_chunk, cache bytes, holes in the source, steps)
type Case = (u64, u64, u64, bool, Vec<Step>);

fn cases() -> impl Strategy<Value = Case> {
    (
        1..24u64,
        1..5u64,
        prop_oneof![Just(0u64), Just(3 * CS)],
        any::<bool>(),
    )
        .prop_flat_map(|(clusters, chunk, cache, holes)| {
            let size = clusters * CS - if clusters % 3 == 0 { 700 } else { 0 };
            (
                Just(size),
                Just(chunk * CS),
                Just(cache),
                Just(holes),
                proptest::collection::vec(step(size), 0..60),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever the guest writes, in whatever order with the job's copies
    /// (and the cache's drains), the target ends up equal to the source as
    /// it was when the job started, and the source ends up as the guest
    /// left it.
    #[test]
    fn copy_before_write_keeps_the_point_in_time((size, max_chunk, cache, holes, steps) in cases()) {
        let mut original = pattern(size, 7);
        if holes {
            // Every third cluster reads as zeros: claims over holes grow.
            for (i, c) in original.chunks_mut(CS as usize).enumerate() {
                if i % 3 == 1 {
                    c.fill(0);
                }
            }
        }
        let src = Arc::new(MemNode::new("src", original.clone(), CS));
        let target = Arc::new(MemNode::new("t", vec![0; size as usize], CS));
        let bc = Arc::new(BlockCopy::new(
            src.clone(),
            target.clone(),
            config(max_chunk, cache),
            Bits::full(size.div_ceil(CS)),
            Cancel::new(),
            None,
        ));
        let cbw = CbwNode::new(src.clone(), bc.clone(), OnCbwError::BreakGuestWrite, None);
        bc.map_holes();
        let mut guest_view = original.clone();
        let mut buf = Vec::new();
        let mut copied = BTreeSet::new();
        for s in &steps {
            match *s {
                Step::Job => {
                    if let Some(c) = bc.claim_next() {
                        bc.copy_claimed(c, &mut buf).unwrap();
                        bc.release(c, true);
                        copied.insert(c.start);
                    }
                }
                Step::Guest { offset, len, seed } => {
                    let data = pattern(len, seed);
                    cbw.write(offset, &data).unwrap();
                    guest_view[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                Step::Drain => {
                    while bc.drain_one(std::time::Duration::ZERO).unwrap() {}
                }
            }
        }
        while let Some(c) = bc.claim_next() {
            bc.copy_claimed(c, &mut buf).unwrap();
            bc.release(c, true);
        }
        while bc.drain_one(std::time::Duration::ZERO).unwrap() {}
        prop_assert!(!bc.failed());
        prop_assert_eq!(bc.not_copied().count(), 0);
        prop_assert!(target.contents() == original, "the target is not the point in time");
        prop_assert!(src.contents() == guest_view, "a guest write was lost");
    }
}
