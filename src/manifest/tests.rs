//! Manifests written and read back: digests, roots, runs, parents, damage,
//! and version 1 files.

use super::file::{V1_TABLE_OFFSET, run_table_offset};
use super::*;
use crate::job::cancel::Cancel;
use crate::node::BlockNode;
use crate::node::mem::MemNode;
use sha2::{Digest, Sha256};
use std::fs::File;

#[test]
fn geometry_and_zero_digests() {
    let g = Geometry {
        size: 65536 * 3 + 512,
        chunk: 65536,
    };
    assert_eq!(g.chunks(), 4);
    assert_eq!(g.len(3), 512);
    let z = g.zero_digests(DigestAlgo::Sha256);
    assert_eq!(z.of(0), digest(&vec![0u8; 65536]));
    assert_eq!(z.of(2), digest(&vec![0u8; 65536]));
    assert_eq!(z.of(3), digest(&[0u8; 512]));
    assert_eq!(z.run(1, 4), vec![z.of(0), z.of(0), z.of(3)]);
    let b = g.zero_digests(DigestAlgo::Blake3);
    assert_eq!(b.of(0), *blake3::hash(&vec![0u8; 65536]).as_bytes());
    assert_eq!(b.of(3), *blake3::hash(&[0u8; 512]).as_bytes());
}

#[test]
fn the_root_stream_is_canonical() {
    let geo = Geometry {
        size: 5 * 4096 + 100,
        chunk: 4096,
    };
    let z = geo.zero_digests(DigestAlgo::Sha256);
    let d1 = digest(b"one");
    let d2 = digest(b"two");
    // Zeros given as runs or one by one as digests: the same root.
    let mut a = RootHasher::new(geo, DigestAlgo::Sha256);
    a.zeros(2);
    a.chunk(&d1);
    a.chunk(&z.of(3));
    a.zeros(1);
    a.chunk(&d2);
    let mut b = RootHasher::new(geo, DigestAlgo::Sha256);
    b.chunk(&z.of(0));
    b.zeros(1);
    b.chunk(&d1);
    b.zeros(2);
    b.chunk(&d2);
    let (ra, rb) = (a.finish(), b.finish());
    assert!(ra.is_some());
    assert_eq!(ra, rb);
    // Written out by hand.
    let mut h = Sha256::new();
    h.update(b"imgbackup-root-v2\0sha256\0");
    h.update(geo.size.to_be_bytes());
    h.update(4096u64.to_be_bytes());
    h.update(b"Z");
    h.update(2u64.to_be_bytes());
    h.update(b"D");
    h.update(d1);
    h.update(b"Z");
    h.update(2u64.to_be_bytes());
    h.update(b"D");
    h.update(d2);
    assert_eq!(ra, Some(h.finalize().into()));
    // Another algorithm or a missing chunk: another root, or none.
    let mut c = RootHasher::new(geo, DigestAlgo::Blake3);
    c.zeros(6);
    assert_ne!(c.finish(), ra);
    let mut e = RootHasher::new(geo, DigestAlgo::Sha256);
    e.zeros(5);
    assert_eq!(e.finish(), None);
}

fn meta() -> Meta {
    Meta {
        format_version: 0,
        virtual_size: 0,
        chunk_size: 0,
        chunks: 0,
        root_digest: String::new(),
        digest: DigestAlgo::Sha256,
        data_chunks: 0,
        runs: 0,
        source: "src".into(),
        source_format: "raw".into(),
        target_format: "raw".into(),
        sync: "full".into(),
        bitmap: None,
        parent: None,
        started: String::new(),
        finished: String::new(),
        created_by: String::new(),
        incomplete: Vec::new(),
        file: None,
        detached: false,
        backing_files: Vec::new(),
    }
}

/// A writer of a new manifest at `path`.
fn new_writer(path: &Path, geo: Geometry, algo: DigestAlgo) -> ManifestWriter {
    ManifestWriter::create_in(path, File::create_new(path).unwrap(), geo, algo).unwrap()
}

/// The manifest of `image` written as `dir/NAME.manifest`, then opened.
fn write(
    dir: &Path,
    name: &str,
    image: &dyn BlockNode,
    chunk: u64,
    algo: DigestAlgo,
) -> ManifestFile {
    let path = manifest_path(&dir.join(name));
    let geo = Geometry {
        size: image.size(),
        chunk,
    };
    let w = new_writer(&path, geo, algo);
    assert_eq!(w.gaps().unwrap(), vec![(0, geo.chunks())]);
    w.fill_from(image, 3, &Cancel::new()).unwrap();
    assert!(w.gaps().unwrap().is_empty());
    let mut m = meta();
    w.finish(&mut m, None).unwrap();
    ManifestFile::open(&path).unwrap()
}

/// The version 2 root of `bytes`, computed here from its definition.
fn root_of(bytes: &[u8], chunk: usize, algo: DigestAlgo) -> String {
    let mut h = Sha256::new();
    h.update(b"imgbackup-root-v2\0");
    h.update(algo.name().as_bytes());
    h.update([0]);
    h.update((bytes.len() as u64).to_be_bytes());
    h.update((chunk as u64).to_be_bytes());
    let mut zeros = 0u64;
    for c in bytes.chunks(chunk) {
        if c.iter().all(|&b| b == 0) {
            zeros += 1;
            continue;
        }
        if zeros > 0 {
            h.update(b"Z");
            h.update(zeros.to_be_bytes());
            zeros = 0;
        }
        h.update(b"D");
        h.update(algo.hash(c));
    }
    if zeros > 0 {
        h.update(b"Z");
        h.update(zeros.to_be_bytes());
    }
    hex(&h.finalize())
}

#[test]
fn digests_root_and_differences() {
    let d = tempfile::tempdir().unwrap();
    let chunk = 4096u64;
    for algo in [DigestAlgo::Sha256, DigestAlgo::Blake3] {
        // 100 chunks and a short last one; a zero run in the middle.
        let mut bytes: Vec<u8> = (0..100 * chunk + 100).map(|i| (i % 253) as u8).collect();
        bytes[(10 * chunk) as usize..(30 * chunk) as usize].fill(0);
        let image = MemNode::new("img", bytes.clone(), chunk);
        let m = write(d.path(), algo.name(), &image, chunk, algo);
        assert_eq!(m.meta.chunks, 101);
        assert_eq!(m.meta.digest, algo);
        // The zero run costs one record, not 20 digests.
        assert_eq!(m.meta.data_chunks, 81);
        assert_eq!(m.meta.runs, 3);
        let want: Vec<Sha> = bytes.chunks(chunk as usize).map(|c| algo.hash(c)).collect();
        assert_eq!(m.digests(0, 101).unwrap(), want);
        assert_eq!(m.digests(7, 33).unwrap(), want[7..33].to_vec());
        assert_eq!(m.meta.root_digest, root_of(&bytes, chunk as usize, algo));
        assert_eq!(hex(&m.compute_root().unwrap()), m.meta.root_digest);
        // Kept in memory once opened, or read from the file: the same.
        assert!(m.kept.is_some());
        let unkept = ManifestFile::open_with(&m.path, false).unwrap();
        assert!(unkept.kept.is_none());
        assert_eq!(unkept.digests(0, 101).unwrap(), want);
        assert_eq!(unkept.digests(7, 33).unwrap(), want[7..33].to_vec());
        assert_eq!(hex(&unkept.compute_root().unwrap()), m.meta.root_digest);
        assert_eq!(m.data_runs(0, 101).unwrap(), vec![(0, 10), (30, 101)]);
        let cancel = Cancel::new();
        assert_eq!(check_image(&image, &m, 2, &cancel).unwrap(), None);

        // Changed bytes in a data chunk and in the zero run: the first
        // difference and every differing chunk.
        image.write(77 * chunk + 5, &[0xff]).unwrap();
        image.write(12 * chunk, &[1]).unwrap();
        let diff = check_image(&image, &m, 2, &cancel).unwrap().unwrap();
        assert_eq!((diff.chunk, diff.offset), (12, 12 * chunk));
        assert_eq!(diff.expected, hex(&algo.zero(chunk)));
        let bits = differing_chunks(&image, &m, 2, &cancel).unwrap();
        let set: Vec<u64> = (0..101).filter(|&i| bits.get(i)).collect();
        assert_eq!(set, vec![12, 77]);
    }
}

#[test]
fn the_manifest_size_follows_the_data() {
    let d = tempfile::tempdir().unwrap();
    // 64 MiB in 512-byte chunks (131072 chunks) holding 3 data chunks: a
    // version 1 manifest would hold 4 MiB of digests.
    let mut bytes = vec![0u8; 64 << 20];
    bytes[1000] = 1;
    bytes[40 << 20] = 2;
    bytes[(64 << 20) - 1] = 3;
    let image = MemNode::new("img", bytes.clone(), 512);
    let m = write(d.path(), "m", &image, 512, DigestAlgo::Sha256);
    let len = std::fs::metadata(&m.path).unwrap().len();
    assert_eq!(m.meta.data_chunks, 3);
    assert_eq!(m.meta.runs, 6);
    assert!(len < 2048, "{len} bytes");
    assert_eq!(m.meta.root_digest, root_of(&bytes, 512, DigestAlgo::Sha256));
}

#[test]
fn chunks_seen_one_at_a_time_in_any_order_give_the_same_manifest() {
    use crate::copy::{ChunkData, ChunkObserver};
    let d = tempfile::tempdir().unwrap();
    let chunk = 4096u64;
    let c = chunk as usize;
    // 23 chunks and a short last one; chunk 5 is zeros (seen as bytes),
    // chunks 9..11 are zeros (seen as a zero range).
    let mut bytes: Vec<u8> = (0..23 * chunk + 100).map(|i| (i % 249) as u8 | 1).collect();
    bytes[5 * c..6 * c].fill(0);
    bytes[9 * c..11 * c].fill(0);
    // Pieces as copy workers report them: single chunks (queued and hashed
    // several at a time), a pair, a run of five (hashed at once), the
    // zeros, the short last chunk; out of order.
    let pieces: [(usize, usize); 14] = [
        (7, 8),
        (0, 1),
        (5, 6),
        (12, 17),
        (2, 3),
        (22, 23),
        (1, 2),
        (3, 5),
        (17, 18),
        (6, 7),
        (18, 22),
        (11, 12),
        (8, 9),
        (23, 24),
    ];
    for algo in [DigestAlgo::Sha256, DigestAlgo::Blake3] {
        let path = manifest_path(&d.path().join(algo.name()));
        let geo = Geometry {
            size: bytes.len() as u64,
            chunk,
        };
        let w = new_writer(&path, geo, algo);
        w.copied(9 * chunk, ChunkData::Zeroes(2 * chunk)).unwrap();
        for (a, b) in pieces {
            let piece = &bytes[a * c..(b * c).min(bytes.len())];
            w.copied((a * c) as u64, ChunkData::Bytes(piece)).unwrap();
        }
        // Whatever is still queued counts as recorded.
        assert!(w.gaps().unwrap().is_empty());
        let mut m = meta();
        w.finish(&mut m, None).unwrap();
        let got = ManifestFile::open(&path).unwrap();
        assert_eq!(got.meta.root_digest, root_of(&bytes, c, algo));
        assert_eq!(got.meta.data_chunks, 21);
        let want: Vec<Sha> = bytes.chunks(c).map(|x| algo.hash(x)).collect();
        assert_eq!(got.digests(0, 24).unwrap(), want);
        assert_eq!(
            got.data_runs(0, 24).unwrap(),
            vec![(0, 5), (6, 9), (11, 24)]
        );
    }
}

#[test]
fn an_incremental_refers_to_its_parent_and_has_the_full_root() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let chunk = 4096u64;
    let old: Vec<u8> = (0..64 * chunk).map(|i| (i % 251) as u8 | 1).collect();
    let parent_img = MemNode::new("old", old.clone(), chunk);
    let parent = write(p, "parent", &parent_img, chunk, DigestAlgo::Blake3);
    // The new image: chunk 3 changed, chunk 40 zeroed.
    let mut new = old.clone();
    new[(3 * chunk) as usize] ^= 0xff;
    new[(40 * chunk) as usize..(41 * chunk) as usize].fill(0);
    let geo = Geometry {
        size: new.len() as u64,
        chunk,
    };
    let path = manifest_path(&p.join("child"));
    let w = new_writer(&path, geo, DigestAlgo::Blake3);
    let z = geo.zero_digests(DigestAlgo::Blake3);
    w.put_many(
        3,
        &[z.of_data(3, &new[(3 * chunk) as usize..(4 * chunk) as usize])],
    )
    .unwrap();
    w.put_many(40, &[z.of(40)]).unwrap();
    w.fill_from_parent(&parent).unwrap();
    assert!(w.gaps().unwrap().is_empty());
    let mut m = meta();
    m.parent = Some(Parent {
        path: p.join("parent").display().to_string(),
        root_digest: parent.meta.root_digest.clone(),
    });
    w.finish(&mut m, Some(&parent)).unwrap();
    let child = ManifestFile::open(&path).unwrap();
    // One digest of its own; the same root as a manifest of the whole image.
    assert_eq!(child.meta.data_chunks, 1);
    assert_eq!(child.parent_chunks(), 62);
    assert_eq!(
        child.meta.root_digest,
        root_of(&new, chunk as usize, DigestAlgo::Blake3)
    );
    let whole = write(
        p,
        "whole",
        &MemNode::new("new", new.clone(), chunk),
        chunk,
        DigestAlgo::Blake3,
    );
    assert_eq!(child.meta.root_digest, whole.meta.root_digest);
    assert_eq!(child.digests(0, 64).unwrap(), whole.digests(0, 64).unwrap());
    assert_eq!(hex(&child.compute_root().unwrap()), child.meta.root_digest);
    let cancel = Cancel::new();
    let new_img = MemNode::new("new", new.clone(), chunk);
    assert_eq!(check_image(&new_img, &child, 2, &cancel).unwrap(), None);
    let diff = check_image(&parent_img, &child, 2, &cancel)
        .unwrap()
        .unwrap();
    assert_eq!(diff.chunk, 3);

    // The parent's manifest replaced by another one, then gone: refused,
    // naming the parent.
    let pm = manifest_path(&p.join("parent"));
    std::fs::rename(&pm, p.join("saved")).unwrap();
    std::fs::copy(manifest_path(&p.join("whole")), &pm).unwrap();
    let e = ManifestFile::open(&path)
        .unwrap()
        .digests(0, 64)
        .unwrap_err();
    assert!(matches!(e, ManifestError::Parent { .. }), "{e}");
    assert!(e.to_string().contains("root digest"), "{e}");
    std::fs::remove_file(&pm).unwrap();
    let e = ManifestFile::open(&path)
        .unwrap()
        .digests(0, 64)
        .unwrap_err();
    assert!(e.to_string().contains("is missing"), "{e}");
    // Chunks of its own still read without the parent.
    assert_eq!(
        ManifestFile::open(&path).unwrap().digests(3, 4).unwrap(),
        whole.digests(3, 4).unwrap()
    );
}

#[test]
fn a_changed_byte_anywhere_in_the_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut bytes = vec![7u8; 9000];
    bytes[4096..8192].fill(0);
    let image = MemNode::new("img", bytes, 4096);
    let m = write(d.path(), "m", &image, 4096, DigestAlgo::Sha256);
    let len = std::fs::metadata(&m.path).unwrap().len();
    let good = std::fs::read(&m.path).unwrap();
    let json_len = u32::from_be_bytes([good[12], good[13], good[14], good[15]]) as usize;
    let table = run_table_offset(json_len);
    // Header, metadata, run table, digests, checksum.
    for at in [0, 9, 20, 40, table + 3, table + 40, len - 40, len - 1] {
        let mut bad = good.clone();
        bad[at as usize] ^= 1;
        std::fs::write(&m.path, &bad).unwrap();
        assert!(
            matches!(
                ManifestFile::open(&m.path),
                Err(ManifestError::Damaged { .. })
            ),
            "a flipped bit at {at} was accepted"
        );
    }
    std::fs::write(&m.path, &good[..good.len() - 32]).unwrap();
    assert!(
        ManifestFile::open(&m.path).is_err(),
        "a truncated manifest was accepted"
    );
}

/// A version 1 manifest of `bytes`, written here from its definition.
fn write_v1(path: &Path, bytes: &[u8], chunk: usize) -> String {
    let ds: Vec<Sha> = bytes.chunks(chunk).map(digest).collect();
    let mut root = Sha256::new();
    ds.iter().for_each(|d| root.update(d));
    let root = hex(&root.finalize());
    let json = serde_json::json!({
        "format_version": 1, "virtual_size": bytes.len(), "chunk_size": chunk,
        "chunks": ds.len(), "root_digest": root, "source": "/src", "source_format": "raw",
        "target_format": "raw", "sync": "full", "bitmap": null, "parent": null,
        "started": "2026-01-01T00:00:00Z", "finished": "2026-01-01T00:00:01Z",
        "created_by": "imgbackup 0.1.0", "incomplete": []
    })
    .to_string();
    let mut f = vec![0u8; V1_TABLE_OFFSET as usize];
    f[..8].copy_from_slice(MAGIC);
    f[8..12].copy_from_slice(&1u32.to_be_bytes());
    f[12..16].copy_from_slice(&(json.len() as u32).to_be_bytes());
    f[16..24].copy_from_slice(&V1_TABLE_OFFSET.to_be_bytes());
    f[24..32].copy_from_slice(&(ds.len() as u64).to_be_bytes());
    f[32..32 + json.len()].copy_from_slice(json.as_bytes());
    ds.iter().for_each(|d| f.extend_from_slice(d));
    let sum = digest(&f);
    f.extend_from_slice(&sum);
    std::fs::write(path, f).unwrap();
    root
}

#[test]
fn version_1_manifests_are_read_and_serve_as_parents() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let chunk = 4096usize;
    let mut bytes: Vec<u8> = (0..20 * chunk + 7).map(|i| (i % 13) as u8).collect();
    bytes[chunk..5 * chunk].fill(0);
    let root = write_v1(&manifest_path(&p.join("v1")), &bytes, chunk);
    let v1 = ManifestFile::open(&manifest_path(&p.join("v1"))).unwrap();
    assert_eq!(v1.meta.format_version, 1);
    assert_eq!(v1.meta.root_digest, root);
    assert_eq!(hex(&v1.compute_root().unwrap()), root);
    let image = MemNode::new("img", bytes.clone(), chunk as u64);
    assert_eq!(check_image(&image, &v1, 2, &Cancel::new()).unwrap(), None);
    // A version 2 child of it: one changed chunk, the rest referred to.
    let mut new = bytes.clone();
    new[10 * chunk] ^= 1;
    let geo = Geometry {
        size: new.len() as u64,
        chunk: chunk as u64,
    };
    let path = manifest_path(&p.join("child"));
    let w = new_writer(&path, geo, DigestAlgo::Sha256);
    w.put_many(10, &[digest(&new[10 * chunk..11 * chunk])])
        .unwrap();
    w.fill_from_parent(&v1).unwrap();
    let mut m = meta();
    m.parent = Some(Parent {
        path: p.join("v1").display().to_string(),
        root_digest: root,
    });
    w.finish(&mut m, Some(&v1)).unwrap();
    let child = ManifestFile::open(&path).unwrap();
    assert_eq!(child.meta.format_version, 2);
    assert_eq!(child.meta.data_chunks, 1);
    assert_eq!(
        child.meta.root_digest,
        root_of(&new, chunk, DigestAlgo::Sha256)
    );
    let new_img = MemNode::new("new", new, chunk as u64);
    assert_eq!(
        check_image(&new_img, &child, 2, &Cancel::new()).unwrap(),
        None
    );
}

#[test]
fn backing_runs_are_digested_when_needed_and_only_from_the_same_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let chunk = 4096usize;
    let base: Vec<u8> = (0..32 * chunk).map(|i| (i % 241) as u8).collect();
    std::fs::write(p.join("base.raw"), &base).unwrap();
    // The image: the base with chunk 5 replaced (a top layer's chunk).
    let mut image = base.clone();
    image[5 * chunk..6 * chunk].fill(9);
    let geo = Geometry {
        size: image.len() as u64,
        chunk: chunk as u64,
    };
    let path = manifest_path(&p.join("t"));
    let w = new_writer(&path, geo, DigestAlgo::Sha256);
    w.put_many(5, &[digest(&image[5 * chunk..6 * chunk])])
        .unwrap();
    w.fill_from_backing().unwrap();
    let mut m = meta();
    // Without the backing files named, finishing is refused.
    assert!(w.finish(&mut m.clone(), None).is_err());
    m.backing_files = vec![BackingFile {
        path: p.join("base.raw").display().to_string(),
        format: "raw".into(),
        file: FileBinding::of_path(&p.join("base.raw")).unwrap(),
    }];
    std::fs::remove_file(&path).unwrap();
    let w2 = new_writer(&path, geo, DigestAlgo::Sha256);
    w2.put_many(5, &[digest(&image[5 * chunk..6 * chunk])])
        .unwrap();
    w2.fill_from_backing().unwrap();
    w2.finish(&mut m, None).unwrap();
    let mf = ManifestFile::open(&path).unwrap();
    assert!(!mf.meta.root_known());
    assert_eq!(mf.meta.data_chunks, 1);
    assert_eq!(mf.backing_chunks(), 31);
    let want: Vec<Sha> = image.chunks(chunk).map(digest).collect();
    assert_eq!(mf.digests(0, 32).unwrap(), want);
    assert_eq!(
        hex(&mf.compute_root().unwrap()),
        root_of(&image, chunk, DigestAlgo::Sha256)
    );
    // The base rewritten (same bytes, another mtime): refused.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(p.join("base.raw"), &base).unwrap();
    let e = ManifestFile::open(&path)
        .unwrap()
        .digests(0, 32)
        .unwrap_err();
    assert!(matches!(e, ManifestError::Backing { .. }), "{e}");
    // Chunks of its own still read.
    assert_eq!(
        ManifestFile::open(&path).unwrap().digests(5, 6).unwrap(),
        vec![want[5]]
    );
}

#[test]
fn a_checker_skips_only_the_trusted_chunks() {
    use crate::copy::{ChunkData, ChunkObserver};
    let d = tempfile::tempdir().unwrap();
    let chunk = 4096usize;
    let bytes: Vec<u8> = (0..10 * chunk).map(|i| (i % 7) as u8 + 1).collect();
    let m = write(
        d.path(),
        "m",
        &MemNode::new("i", bytes.clone(), 4096),
        4096,
        DigestAlgo::Sha256,
    );
    let path = m.path.clone();
    let checker = ManifestChecker::new(m).trusting(vec![(2, 5), (7, 8)]);
    let mut bad = bytes.clone();
    for c in [2, 4, 7] {
        bad[c * chunk] ^= 0xff;
    }
    // Wrong only where trusted: accepted, whole or in pieces.
    checker.copied(0, ChunkData::Bytes(&bad)).unwrap();
    checker
        .copied(
            3 * chunk as u64,
            ChunkData::Bytes(&bad[3 * chunk..8 * chunk]),
        )
        .unwrap();
    // Zeros over trusted chunks only: accepted; over an untrusted one: not.
    checker
        .copied(2 * chunk as u64, ChunkData::Zeroes(3 * chunk as u64))
        .unwrap();
    assert!(
        checker
            .copied(5 * chunk as u64, ChunkData::Zeroes(chunk as u64))
            .is_err()
    );
    // A wrong untrusted chunk between trusted ones is found.
    bad[5 * chunk + 9] ^= 1;
    let e = checker.copied(0, ChunkData::Bytes(&bad)).unwrap_err();
    assert!(e.to_string().contains(&format!("{}", 5 * chunk)), "{e}");
    let plain = ManifestChecker::new(ManifestFile::open(&path).unwrap());
    assert!(
        plain
            .copied(
                2 * chunk as u64,
                ChunkData::Bytes(&bad[2 * chunk..3 * chunk])
            )
            .is_err()
    );
}
