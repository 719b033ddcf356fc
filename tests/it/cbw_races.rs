//! Deterministic copy-before-write races, with the fault node's
//! blkdebug-style `suspend`: a read at a chosen offset waits in the node
//! until the test resumes it.

use crate::fixture::*;
use imgbackup::bitmap::Bits;
use imgbackup::copy::{BlockCopy, Config};
use imgbackup::error::Result;
use imgbackup::job::cancel::Cancel;
use imgbackup::node::BlockNode;
use imgbackup::node::cbw::{CbwNode, OnCbwError};
use imgbackup::node::fault::{FaultNode, FaultOp, Suspension};
use imgbackup::node::overlay::OverlayNode;
use imgbackup::node::raw::RawNode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const CS: u64 = 65536;

/// Counts writes per cluster.
struct CountingNode {
    inner: Arc<dyn BlockNode>,
    writes: Vec<AtomicU64>,
}

impl imgbackup::node::Filter for CountingNode {
    fn child(&self) -> &Arc<dyn BlockNode> {
        &self.inner
    }
    fn write_with(
        &self,
        offset: u64,
        buf: &[u8],
        flags: imgbackup::node::WriteFlags,
    ) -> Result<()> {
        for c in offset / CS..(offset + buf.len() as u64).div_ceil(CS) {
            self.writes[c as usize].fetch_add(1, Ordering::SeqCst);
        }
        self.inner.write_with(offset, buf, flags)
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    pause: Arc<Suspension>,
    overlay: Arc<OverlayNode>,
    target: Arc<CountingNode>,
    bc: Arc<BlockCopy>,
    cbw: Arc<CbwNode>,
    original: Vec<u8>,
}

fn rig(pause_at: u64) -> Rig {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 1, 0x61);
    let original = std::fs::read(p.join("src.raw")).unwrap();
    let src: Arc<dyn BlockNode> = Arc::new(RawNode::open(&p.join("src.raw")).unwrap());
    let fault = Arc::new(FaultNode::new(src, Vec::new()));
    let pause = fault.suspend(FaultOp::Read, pause_at);
    let overlay = Arc::new(OverlayNode::new(fault, p).unwrap());
    let raw: Arc<dyn BlockNode> = Arc::new(RawNode::create(&p.join("t.raw"), 1 << 20).unwrap());
    let target = Arc::new(CountingNode {
        inner: raw,
        writes: (0..16).map(|_| AtomicU64::new(0)).collect(),
    });
    let bc = Arc::new(BlockCopy::new(
        overlay.clone(),
        target.clone(),
        Config {
            cluster_size: CS,
            max_chunk: CS,
            write_zeroes: false,
            speed: None,
            compress: false,
            cbw_cache: 0,
            copy_range: false,
        },
        Bits::full(16),
        Cancel::new(),
        None,
    ));
    let cbw = Arc::new(CbwNode::new(
        overlay.clone(),
        bc.clone(),
        OnCbwError::BreakGuestWrite,
        None,
    ));
    Rig {
        _dir: d,
        pause,
        overlay,
        target,
        bc,
        cbw,
        original,
    }
}

#[test]
fn guest_write_waits_for_the_jobs_copy_in_flight() {
    let r = rig(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The job claims cluster 0 and blocks reading it.
        let job = s.spawn(|| {
            let c = r.bc.claim_next().unwrap();
            assert_eq!(c.start, 0);
            let mut buf = Vec::new();
            let res = r.bc.copy_claimed(c, &mut buf);
            r.bc.release(c, res.is_ok());
            res.unwrap();
        });
        assert!(
            r.pause.wait_suspended(Duration::from_secs(10)),
            "the paused read never came"
        );
        let guest = s.spawn(|| {
            r.cbw.write(4096, &[0x7a; 8192]).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !done.load(Ordering::SeqCst),
            "the guest write did not wait for the copy in flight"
        );
        r.pause.resume();
        job.join().unwrap();
        guest.join().unwrap();
    });
    assert_eq!(
        r.target.writes[0].load(Ordering::SeqCst),
        1,
        "cluster 0 copied twice"
    );
    assert_eq!(
        r.bc.progress.cbw_copies.load(Ordering::SeqCst),
        0,
        "the guest copied a cluster in flight"
    );
    let mut got = vec![0u8; CS as usize];
    r.target.read(0, &mut got).unwrap();
    assert_eq!(got, r.original[..CS as usize], "target holds the old data");
    let mut now = vec![0u8; 8192];
    r.overlay.read(4096, &mut now).unwrap();
    assert!(now.iter().all(|&b| b == 0x7a), "the guest write landed");
}

#[test]
fn job_skips_a_cluster_whose_copy_before_write_is_in_flight() {
    let r = rig(2 * CS);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The guest writes cluster 2; its copy-before-write blocks.
        let g1 = s.spawn(|| r.cbw.write(2 * CS + 100, &[1; 300]).unwrap());
        assert!(
            r.pause.wait_suspended(Duration::from_secs(10)),
            "the paused read never came"
        );
        // A second guest write to the same cluster waits, copies nothing.
        let g2 = s.spawn(|| {
            r.cbw.write(2 * CS + 1000, &[2; 10]).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        // The job drains everything else meanwhile and never claims cluster 2.
        let mut buf = Vec::new();
        while let Some(c) = r.bc.claim_next() {
            assert_ne!(c.start, 2 * CS, "the job claimed a cluster in flight");
            r.bc.copy_claimed(c, &mut buf).unwrap();
            r.bc.release(c, true);
        }
        assert!(
            !done.load(Ordering::SeqCst),
            "the second guest write did not wait"
        );
        r.pause.resume();
        g1.join().unwrap();
        g2.join().unwrap();
    });
    for c in 0..16 {
        assert_eq!(r.target.writes[c].load(Ordering::SeqCst), 1, "cluster {c}");
    }
    assert_eq!(r.bc.progress.cbw_copies.load(Ordering::SeqCst), 1);
    assert_eq!(r.bc.bitmap().count(), 0);
    let mut got = vec![0u8; 1 << 20];
    r.target.read(0, &mut got).unwrap();
    assert_eq!(got, r.original, "the target is the image as it was");
}
