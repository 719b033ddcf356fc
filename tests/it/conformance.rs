//! One conformance body run against every node type: block status covers
//! the range, zero statuses read as zeros, reads of any shape match the
//! oracle (`qemu-img convert -O raw`), out-of-range requests fail cleanly,
//! and writable nodes read back what was written.

use crate::fixture::*;
use imgbackup::error::BlockError;
use imgbackup::node::mem::MemNode;
use imgbackup::node::probe::open_image;
use imgbackup::node::qcow2::{CreateOptions, Qcow2Layer, Qcow2Writer};
use imgbackup::node::raw::RawNode;
use imgbackup::node::{BlockNode, Status};

/// A small deterministic generator for request shapes.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn conform_read(node: &dyn BlockNode, expect: &[u8]) {
    let size = node.size();
    assert_eq!(size, expect.len() as u64, "{}: size", node.path().display());
    // Block status walks the whole node.
    let mut pos = 0;
    while pos < size {
        let ext = node.block_status(pos, size - pos).expect("block status");
        assert!(
            ext.len > 0 && ext.len <= size - pos,
            "extent {ext:?} at {pos}"
        );
        if ext.status != Status::Data {
            let s = &expect[pos as usize..(pos + ext.len) as usize];
            assert!(
                s.iter().all(|&b| b == 0),
                "{:?} extent at {pos} holds data",
                ext.status
            );
        }
        pos += ext.len;
    }
    assert_eq!(pos, size);
    // Random shapes.
    let mut rng = Lcg(size ^ 0x5eed);
    let mut buf = Vec::new();
    let mut shapes: Vec<(u64, u64)> =
        vec![(0, size), (0, 1), (size - 1, 1), (511, 2), (4095, 8194)];
    for _ in 0..200 {
        let off = rng.next(size);
        let len = 1 + rng.next((size - off).min(300_000));
        shapes.push((off, len));
    }
    for (off, len) in shapes {
        if off + len > size {
            continue;
        }
        buf.resize(len as usize, 0xee);
        node.read(off, &mut buf)
            .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
        assert!(
            buf == expect[off as usize..(off + len) as usize],
            "read {off}+{len} differs"
        );
        let ext = node.block_status(off, len).expect("block status");
        assert!(ext.len > 0 && ext.len <= len);
    }
    // Out of range.
    let mut two = [0u8; 2];
    assert!(matches!(
        node.read(size - 1, &mut two),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        node.block_status(size, 1),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        node.read(u64::MAX - 1, &mut two),
        Err(BlockError::OutOfRange { .. })
    ));
}

/// Writes at cluster-aligned places, then zeroes; reads must follow.
fn conform_write(node: &dyn BlockNode, expect: &mut [u8]) {
    let cs = node.cluster_size().max(4096);
    let size = node.size();
    let pat: Vec<u8> = (0..3 * cs).map(|i| (i % 251) as u8 + 1).collect();
    for off in [0, cs * 5, (size / cs - 3) * cs] {
        node.write(off, &pat).expect("write");
        expect[off as usize..(off + 3 * cs) as usize].copy_from_slice(&pat);
    }
    // Overwrite in place.
    node.write(cs * 6, &pat[..cs as usize]).expect("rewrite");
    expect[(cs * 6) as usize..(cs * 7) as usize].copy_from_slice(&pat[..cs as usize]);
    node.write_zeroes(cs * 5, cs).expect("write zeroes");
    expect[(cs * 5) as usize..(cs * 6) as usize].fill(0);
    node.flush().expect("flush");
    let ext = node.block_status(cs * 5, cs).unwrap();
    assert_ne!(ext.status, Status::Data, "zeroed cluster still data");
    conform_read(node, expect);
}

#[test]
fn raw_nodes() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "a.raw", "4M");
    let expect = std::fs::read(p.join("a.raw")).unwrap();
    let n = RawNode::open(&p.join("a.raw")).unwrap();
    conform_read(&n, &expect);
    assert!(n.write(0, &[1]).is_err(), "read-only raw accepted a write");
    let id = n.identity().expect("a raw file has an identity").unwrap();
    assert_eq!(id.size, 4 << 20);

    let w = RawNode::create(&p.join("w.raw"), 4 << 20).unwrap();
    let mut expect = vec![0u8; 4 << 20];
    conform_read(&w, &expect);
    conform_write(&w, &mut expect);
    assert!(
        std::fs::read(p.join("w.raw")).unwrap() == expect,
        "w.raw differs"
    );
}

#[test]
fn memory_nodes() {
    let mut expect: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    expect[1 << 20..2 << 20].fill(0);
    let n = MemNode::new("mem", expect.clone(), 65536);
    conform_read(&n, &expect);
    conform_write(&n, &mut expect);
    assert!(n.contents() == expect, "memory node differs");
    assert!(n.identity().is_none(), "a memory node has no file to stat");
}

#[test]
fn qcow2_layers() {
    let d = tempdir();
    let p = d.path();
    for (name, opts) in [
        ("c512.qcow2", "cluster_size=512"),
        ("c64k.qcow2", ""),
        ("c2m.qcow2", "cluster_size=2M"),
    ] {
        make_qcow2(p, name, opts);
        let expect = raw_content(p, name);
        let n = Qcow2Layer::open(&p.join(name)).unwrap();
        conform_read(&n, &expect);
        assert!(n.write(0, &[0; 512]).is_err());
    }
    make_qcow2(p, "plain.qcow2", "");
    qemu_img(
        p,
        &["convert", "-c", "-O", "qcow2", "plain.qcow2", "comp.qcow2"],
    );
    let expect = raw_content(p, "comp.qcow2");
    conform_read(&Qcow2Layer::open(&p.join("comp.qcow2")).unwrap(), &expect);
}

#[test]
fn chain_node() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "base.raw", "4M");
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "5M",
        ],
    );
    qemu_io(
        p,
        "qcow2",
        "top.qcow2",
        &["write -P 0x9 1M 8k", "write -z 0 4k", "write -P 0xa 4M 4k"],
    );
    let expect = raw_content(p, "top.qcow2");
    let img = open_image(&p.join("top.qcow2"), None).unwrap();
    conform_read(img.node.as_ref(), &expect);
    assert_eq!(img.layers.len(), 2);
}

#[test]
fn qcow2_writer() {
    let d = tempdir();
    let p = d.path();
    for cs in [512u64, 65536, 2 << 20] {
        let size = 9 * (2 << 20) + 4096; // not a multiple of the larger clusters
        let path = p.join(format!("w{cs}.qcow2"));
        let w = Qcow2Writer::create(
            &path,
            &CreateOptions {
                size,
                cluster_size: cs,
                backing: None,
                compression: Default::default(),
            },
        )
        .unwrap();
        let mut expect = vec![0u8; size as usize];
        conform_read(&w, &expect);
        if cs <= 65536 {
            conform_write(&w, &mut expect);
        } else {
            let pat = vec![7u8; cs as usize];
            w.write(0, &pat).unwrap();
            expect[..cs as usize].copy_from_slice(&pat);
            // The last, partial cluster.
            let last = size / cs * cs;
            let tail = vec![9u8; (size - last) as usize];
            w.write(last, &tail).unwrap();
            expect[last as usize..].copy_from_slice(&tail);
            conform_read(&w, &expect);
        }
        // Unaligned writes are refused, not half done.
        assert!(matches!(
            w.write(1, &[1, 2]),
            Err(BlockError::Unaligned { .. })
        ));
        w.finish().unwrap();
        assert!(
            w.write(0, &vec![0; cs as usize]).is_err(),
            "write after finish"
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        check_clean(p, name);
        assert_eq!(raw_content(p, name), expect, "{name}");
        conform_read(&Qcow2Layer::open(&path).unwrap(), &expect);
    }
}

#[test]
fn qcow2_writer_from_many_threads() {
    let d = tempdir();
    let p = d.path();
    let path = p.join("mt.qcow2");
    let cs = 4096u64;
    let size = 8u64 << 20;
    let w = std::sync::Arc::new(
        Qcow2Writer::create(
            &path,
            &CreateOptions {
                size,
                cluster_size: cs,
                backing: None,
                compression: Default::default(),
            },
        )
        .unwrap(),
    );
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let w = w.clone();
            s.spawn(move || {
                for c in (t..size / cs).step_by(4) {
                    if c % 3 == 0 {
                        continue;
                    }
                    let data = vec![(c % 250) as u8 + 1; cs as usize];
                    w.write(c * cs, &data).unwrap();
                }
            });
        }
    });
    w.finish().unwrap();
    check_clean(p, "mt.qcow2");
    let got = raw_content(p, "mt.qcow2");
    for c in 0..size / cs {
        let want = if c % 3 == 0 { 0 } else { (c % 250) as u8 + 1 };
        assert!(
            got[(c * cs) as usize..((c + 1) * cs) as usize]
                .iter()
                .all(|&b| b == want),
            "cluster {c}"
        );
    }
}

#[test]
fn qcow2_writer_with_backing_and_zero_clusters() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "base.raw", 1, 0x31);
    let w = Qcow2Writer::create(
        &p.join("over.qcow2"),
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 65536,
            backing: Some(("base.raw".into(), "raw".into())),
            compression: Default::default(),
        },
    )
    .unwrap();
    w.write(65536, &vec![0x32; 65536]).unwrap();
    w.write_zeroes(3 * 65536, 65536).unwrap();
    w.finish().unwrap();
    check_clean(p, "over.qcow2");
    let info = info_json(p, "over.qcow2");
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    let got = raw_content(p, "over.qcow2");
    assert!(got[..65536].iter().all(|&b| b == 0x31));
    assert!(got[65536..131072].iter().all(|&b| b == 0x32));
    assert!(
        got[3 * 65536..4 * 65536].iter().all(|&b| b == 0),
        "zero cluster shadows the backing"
    );
    assert!(got[4 * 65536..].iter().all(|&b| b == 0x31));
}

/// Unaligned writes (the overlay and the filter take any shape).
fn conform_unaligned_writes(node: &dyn BlockNode, expect: &mut [u8]) {
    let size = node.size();
    let mut rng = Lcg(size ^ 0xabc);
    for i in 0..60u64 {
        let off = rng.next(size - 1);
        let len = 1 + rng.next((size - off).min(70_000));
        let data: Vec<u8> = (0..len).map(|k| ((k + i * 13) % 253) as u8 + 1).collect();
        if i % 5 == 0 {
            node.write_zeroes(off, len).unwrap();
            expect[off as usize..(off + len) as usize].fill(0);
        } else {
            node.write(off, &data).unwrap();
            expect[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
    conform_read(node, expect);
}

#[test]
fn overlay_nodes_in_memory_and_in_a_file() {
    use imgbackup::node::overlay::{MEMORY_LIMIT, OverlayNode};
    let d = tempdir();
    let p = d.path();
    for (name, size) in [("small.qcow2", "8M"), ("large.qcow2", "40M")] {
        qemu_img(p, &["create", "-f", "qcow2", name, size]);
        qemu_io(
            p,
            "qcow2",
            name,
            &[
                "write -P 0x21 0 1M",
                "write -P 0x22 5M 3M",
                "write -z 7M 64k",
            ],
        );
        let before = sha256_file(&p.join(name));
        let mut expect = raw_content(p, name);
        let img = open_image(&p.join(name), None).unwrap();
        let ov = OverlayNode::new(img.node.clone(), p).unwrap();
        assert_eq!(ov.size() <= MEMORY_LIMIT, name == "small.qcow2");
        conform_read(&ov, &expect);
        conform_unaligned_writes(&ov, &mut expect);
        conform_write(&ov, &mut expect);
        assert_eq!(sha256_file(&p.join(name)), before, "the base changed");
    }
}

#[test]
fn filter_and_fault_nodes() {
    use imgbackup::bitmap::Bits;
    use imgbackup::copy::{BlockCopy, Config};
    use imgbackup::job::cancel::Cancel;
    use imgbackup::node::cbw::{CbwNode, OnCbwError};
    use imgbackup::node::fault::{FaultNode, Rule, Side};
    use imgbackup::node::overlay::OverlayNode;
    use std::sync::Arc;
    let d = tempdir();
    let p = d.path();
    make_raw(p, "src.raw", "4M");
    let mut expect = std::fs::read(p.join("src.raw")).unwrap();
    let original = expect.clone();
    let src: Arc<dyn BlockNode> = Arc::new(RawNode::open(&p.join("src.raw")).unwrap());
    // A fault node whose rule never matches behaves like its child.
    let rules: Vec<Rule> = vec!["source:read:EIO@100M".parse().unwrap()];
    let faulty = FaultNode::wrap(src, &rules, Side::Source);
    conform_read(faulty.as_ref(), &expect);
    let ov: Arc<dyn BlockNode> = Arc::new(OverlayNode::new(faulty, p).unwrap());
    let tgt: Arc<dyn BlockNode> = Arc::new(RawNode::create(&p.join("t.raw"), 4 << 20).unwrap());
    let bc = Arc::new(BlockCopy::new(
        ov.clone(),
        tgt,
        Config {
            cluster_size: 65536,
            max_chunk: 65536,
            write_zeroes: false,
            speed: None,
            compress: false,
            cbw_cache: 0,
            copy_range: false,
        },
        Bits::full(64),
        Cancel::new(),
        None,
    ));
    let cbw = CbwNode::new(ov, bc.clone(), OnCbwError::BreakGuestWrite, None);
    conform_read(&cbw, &expect);
    conform_unaligned_writes(&cbw, &mut expect);
    // Whatever the guest wrote, the target got the old data first.
    assert!(
        bc.progress
            .cbw_copies
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    );
    let mut buf = Vec::new();
    while let Some(c) = bc.claim_next() {
        bc.copy_claimed(c, &mut buf).unwrap();
        bc.release(c, true);
    }
    bc.flush_target().unwrap();
    assert!(
        std::fs::read(p.join("t.raw")).unwrap() == original,
        "the target is not the original"
    );
}
