//! Manifests, verify and restore.

use crate::fixture::*;
use std::path::Path;

#[test]
fn root_digest_matches_an_independent_computation() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    let doc = Backup::new(p, "src.qcow2", "b.qcow2").ok();
    let want = independent_root(p, "src.qcow2", 65536);
    assert_eq!(doc["manifest_root_digest"], want.as_str());
    let (rc, info, _) = json_run(p, &["info", "b.qcow2"]);
    assert_eq!(rc, 0);
    let m = &info["manifest"];
    assert_eq!(m["root_digest"], want.as_str());
    assert_eq!(m["sync"], "full");
    assert_eq!(m["chunk_size"], 65536);
    assert_eq!(m["virtual_size"], 16 << 20);
    assert!(m["parent"].is_null());
    assert!(
        m["started"].as_str().unwrap().ends_with('Z')
            && m["finished"].as_str().unwrap().contains('T')
    );
    assert!(m["source"].as_str().unwrap().ends_with("src.qcow2"));
    // A 1000-byte-odd size (last chunk short) and a shorter chunk size.
    qemu_img(p, &["create", "-f", "raw", "odd.raw", "1000K"]);
    qemu_io(p, "raw", "odd.raw", &["write -P 0x5 10k 900k"]);
    let doc = Backup::new(p, "odd.raw", "odd.qcow2")
        .args(&["--granularity", "4K", "--output-cluster-size", "4K"])
        .ok();
    assert_eq!(
        doc["manifest_root_digest"],
        independent_root(p, "odd.raw", 4096).as_str()
    );
}

#[test]
fn root_digest_does_not_depend_on_jobs_chunks_or_format() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    let mut roots = Vec::new();
    for (i, extra) in [
        vec!["--jobs", "1"],
        vec!["--jobs", "4", "--max-chunk", "64K"],
        vec!["--jobs", "3", "--max-chunk", "8M"],
        vec!["--output-format", "raw"],
        vec!["--output-cluster-size", "2M"],
    ]
    .into_iter()
    .enumerate()
    {
        let t = format!("b{i}.qcow2");
        let doc = Backup::new(p, "src.qcow2", &t).args(&extra).ok();
        roots.push(doc["manifest_root_digest"].as_str().unwrap().to_string());
    }
    assert!(roots.windows(2).all(|w| w[0] == w[1]), "{roots:?}");
    // And the same content in a raw source.
    qemu_img(p, &["convert", "-O", "raw", "src.qcow2", "src.raw"]);
    let doc = Backup::new(p, "src.raw", "r.raw").ok();
    assert_eq!(doc["manifest_root_digest"].as_str().unwrap(), roots[0]);
}

#[test]
fn verify_accepts_a_whole_backup_and_compares_against_an_image() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    Backup::new(p, "src.qcow2", "b.qcow2").ok();
    let (rc, doc, err) = json_run(p, &["verify", "b.qcow2", "--against-image", "src.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["chunks"], 256);
    // --against a different image is a mismatch at the first differing byte.
    qemu_img(p, &["convert", "-O", "raw", "src.qcow2", "other.raw"]);
    qemu_io(p, "raw", "other.raw", &["write -P 0x99 5000000 1"]);
    let o = run_in(p, &["verify", "b.qcow2", "--against-image", "other.raw"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("offset 5000000"), "{}", stderr(&o));
}

/// Flip one byte of `file` at `at`.
fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, &b).unwrap();
}

#[test]
fn a_flipped_byte_in_a_raw_target_is_found() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    Backup::new(p, "src.qcow2", "b.raw").ok();
    for at in [
        0u64,
        12345 + 100,
        (5 << 20) + 65535,
        (15 << 20) + 777_000,
        (9 << 20) + 3,
    ] {
        let name = format!("f{at}.raw");
        std::fs::copy(p.join("b.raw"), p.join(&name)).unwrap();
        std::fs::copy(p.join("b.raw.manifest"), p.join(format!("{name}.manifest"))).unwrap();
        flip(&p.join(&name), at);
        let o = run_in(p, &["verify", &name]);
        assert_eq!(code(&o), 7, "{at}: {}", stderr(&o));
        let chunk = at / 65536;
        let want = format!("chunk {chunk} at offset {}", chunk * 65536);
        assert!(stderr(&o).contains(&want), "{at}: {}", stderr(&o));
    }
}

#[test]
fn a_flipped_byte_in_a_qcow2_data_cluster_is_found() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    Backup::new(p, "src.qcow2", "b.qcow2").ok();
    // The host offset of guest offset 15M + 64K (a data cluster), from qemu-img map.
    let map = map_json(p, "b.qcow2");
    let guest = (15u64 << 20) + 65536;
    let e = map
        .iter()
        .find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= guest && guest < s + e["length"].as_u64().unwrap() && e["data"] == true
        })
        .expect("mapped");
    let host = e["offset"].as_u64().unwrap() + (guest - e["start"].as_u64().unwrap()) + 4321;
    flip(&p.join("b.qcow2"), host);
    check_clean(p, "b.qcow2");
    let o = run_in(p, &["verify", "b.qcow2"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    let chunk = guest / 65536;
    assert!(
        stderr(&o).contains(&format!("chunk {chunk} at offset {guest}")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn truncated_target_damaged_or_missing_manifest() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    Backup::new(p, "src.qcow2", "b.raw").ok();
    Backup::new(p, "src.qcow2", "q.qcow2").ok();
    // Truncated raw.
    std::fs::copy(p.join("b.raw"), p.join("t.raw")).unwrap();
    std::fs::copy(p.join("b.raw.manifest"), p.join("t.raw.manifest")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("t.raw"))
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    let o = run_in(p, &["verify", "t.raw"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    // Truncated qcow2: its data clusters are gone.
    std::fs::copy(p.join("q.qcow2"), p.join("tq.qcow2")).unwrap();
    std::fs::copy(p.join("q.qcow2.manifest"), p.join("tq.qcow2.manifest")).unwrap();
    let len = std::fs::metadata(p.join("tq.qcow2")).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.join("tq.qcow2"))
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = run_in(p, &["verify", "tq.qcow2"]);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    // A damaged manifest.
    std::fs::copy(p.join("b.raw"), p.join("m.raw")).unwrap();
    std::fs::copy(p.join("b.raw.manifest"), p.join("m.raw.manifest")).unwrap();
    let mlen = std::fs::metadata(p.join("m.raw.manifest")).unwrap().len();
    flip(&p.join("m.raw.manifest"), mlen - 40);
    let o = run_in(p, &["verify", "m.raw"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("damaged") && stderr(&o).contains("checksum"),
        "{}",
        stderr(&o)
    );
    // No manifest at all.
    std::fs::copy(p.join("b.raw"), p.join("n.raw")).unwrap();
    let o = run_in(p, &["verify", "n.raw"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no manifest") && stderr(&o).contains("n.raw.manifest"),
        "{}",
        stderr(&o)
    );
    // --no-manifest writes none.
    let doc = Backup::new(p, "src.qcow2", "nm.raw")
        .args(&["--no-manifest"])
        .ok();
    assert!(doc["manifest_root_digest"].is_null());
    assert!(!p.join("nm.raw.manifest").exists());
}

#[test]
fn restore_equals_the_source_and_stays_sparse() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-f", "raw", "sparse.raw", "256M"]);
    qemu_io(
        p,
        "raw",
        "sparse.raw",
        &[
            "write -P 0x1 0 1M",
            "write -P 0x2 100M 2M",
            "write -P 0x3 255M 1M",
        ],
    );
    for (tgt, out) in [
        ("b.raw", "r1.raw"),
        ("b.qcow2", "r2.raw"),
        ("b.qcow2", "r3.qcow2"),
        ("b.raw", "r4.qcow2"),
    ] {
        if !p.join(tgt).exists() {
            Backup::new(p, "sparse.raw", tgt).ok();
        }
        let (rc, doc, err) = json_run(p, &["restore", tgt, out]);
        assert_eq!(rc, 0, "{err}");
        assert_eq!(doc["verified"], true);
        assert!(identical(p, "sparse.raw", out), "{tgt} -> {out}");
        if out.ends_with(".raw") {
            assert!(disk_usage(&p.join(out)) < 16 << 20, "{out} not sparse");
        } else {
            check_clean(p, out);
        }
    }
    // An existing output needs --force.
    let o = run_in(p, &["restore", "b.raw", "r1.raw"]);
    assert_eq!(code(&o), 1);
}

#[test]
fn restore_refuses_damaged_data_and_leaves_no_output() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    Backup::new(p, "src.qcow2", "b.raw").ok();
    flip(&p.join("b.raw"), (5 << 20) + 10);
    let o = run_in(p, &["restore", "b.raw", "out.raw"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("offset 5242880"), "{}", stderr(&o));
    assert!(!p.join("out.raw").exists() && !p.join("out.raw.partial").exists());
    // Without a manifest: refused unless --no-verify.
    std::fs::remove_file(p.join("b.raw.manifest")).unwrap();
    let o = run_in(p, &["restore", "b.raw", "out.raw"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("--no-verify"), "{}", stderr(&o));
    let o = run_in(p, &["restore", "--no-verify", "b.raw", "out.raw"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(identical(p, "b.raw", "out.raw"));
}

#[test]
fn backup_verify_uses_the_manifest() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    let doc = Backup::new(p, "src.qcow2", "b.qcow2").verify().ok();
    assert_eq!(doc["verified"], true);
    let doc = Backup::new(p, "src.qcow2", "f.qcow2")
        .verify()
        .sync("none")
        .guest("iops=0,count=100")
        .ok();
    assert_eq!(doc["verified"], true);
    // A fleecing target's manifest covers the whole image.
    assert_eq!(
        doc["manifest_root_digest"],
        independent_root(p, "src.qcow2", 65536).as_str()
    );
    let (rc, _, err) = json_run(p, &["verify", "f.qcow2"]);
    assert_eq!(rc, 0, "{err}");
}

#[test]
fn an_incremental_manifest_refers_to_its_parent_and_keeps_the_full_root() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 64);
    Backup::new(p, "disk.raw", "full.qcow2")
        .bitmap("b0")
        .args(&["--digest", "blake3"])
        .ok();
    ok(
        p,
        &[
            "guest",
            "disk.raw",
            "iops=0,count=12,bs=4K-64K,zero=25,seed=3",
        ],
    );
    let inc = Backup::new(p, "disk.raw", "inc.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    // The parent's algorithm; one digest per dirty data chunk at most; the
    // root of the whole image as it was.
    let (rc, info, err) = json_run(p, &["info", "inc.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    let m = &info["manifest"];
    assert_eq!(m["digest"], "blake3");
    let dirty_chunks = (inc["bytes_copied"].as_u64().unwrap()
        + inc["bytes_skipped_zero"].as_u64().unwrap())
        / 65536;
    assert!(
        m["data_chunks"].as_u64().unwrap() <= dirty_chunks,
        "{m} for {dirty_chunks} dirty chunks"
    );
    let len = std::fs::metadata(p.join("inc.qcow2.manifest"))
        .unwrap()
        .len();
    assert!(len < 4096 + dirty_chunks * 48, "a manifest of {len} bytes");
    // A full backup of the same image made now has the same root.
    let full2 = Backup::new(p, "disk.raw", "full2.raw")
        .args(&["--digest", "blake3"])
        .ok();
    assert_eq!(inc["manifest_root_digest"], full2["manifest_root_digest"]);
    let (rc, _, err) = json_run(p, &["verify", "inc.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    let (rc, doc, err) = json_run(p, &["restore", "inc.qcow2", "r.raw"]);
    assert_eq!(
        (rc, &doc["verified"]),
        (0, &serde_json::json!(true)),
        "{err}"
    );
    assert!(identical(p, "disk.raw", "r.raw"));
    // The parent's manifest replaced: the incremental's is refused, naming it.
    std::fs::rename(p.join("full.qcow2.manifest"), p.join("saved")).unwrap();
    std::fs::copy(p.join("full2.raw.manifest"), p.join("full.qcow2.manifest")).unwrap();
    let o = run_in(p, &["verify", "inc.qcow2"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("full.qcow2.manifest") && stderr(&o).contains("root digest"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(p.join("full.qcow2.manifest")).unwrap();
    let o = run_in(p, &["restore", "inc.qcow2", "r2.raw"]);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("is missing"), "{}", stderr(&o));
    assert!(!p.join("r2.raw").exists());
    std::fs::rename(p.join("saved"), p.join("full.qcow2.manifest")).unwrap();
    let (rc, _, err) = json_run(p, &["verify", "inc.qcow2"]);
    assert_eq!(rc, 0, "{err}");
}

/// Rewrite the manifest of `backup` in format version 1 (as imgbackup 0.1
/// wrote it), bound to the file, from the content of `image`.
fn write_v1_manifest(p: &Path, backup: &str, image: &str) -> String {
    use sha2::{Digest, Sha256};
    let data = raw_content(p, image);
    let digests: Vec<[u8; 32]> = data
        .chunks(65536)
        .map(|c| Sha256::digest(c).into())
        .collect();
    let mut root = Sha256::new();
    digests.iter().for_each(|d| root.update(d));
    let root = hex(&root.finalize());
    let old: serde_json::Value = {
        let (_, info, _) = json_run(p, &["info", backup]);
        info["manifest"].clone()
    };
    let json = serde_json::json!({
        "format_version": 1, "virtual_size": data.len(), "chunk_size": 65536,
        "chunks": digests.len(), "root_digest": root, "source": old["source"],
        "source_format": old["source_format"], "target_format": old["target_format"],
        "sync": "full", "bitmap": null, "parent": null, "started": old["started"],
        "finished": old["finished"], "created_by": "imgbackup 0.1.0", "incomplete": [],
        "file": old["file"]
    })
    .to_string();
    let mut f = vec![0u8; 16384];
    f[..8].copy_from_slice(b"IMGBKMAN");
    f[8..12].copy_from_slice(&1u32.to_be_bytes());
    f[12..16].copy_from_slice(&(json.len() as u32).to_be_bytes());
    f[16..24].copy_from_slice(&16384u64.to_be_bytes());
    f[24..32].copy_from_slice(&(digests.len() as u64).to_be_bytes());
    f[32..32 + json.len()].copy_from_slice(json.as_bytes());
    digests.iter().for_each(|d| f.extend_from_slice(d));
    let sum = Sha256::digest(&f);
    f.extend_from_slice(&sum);
    std::fs::write(p.join(format!("{backup}.manifest")), f).unwrap();
    root
}

#[test]
fn version_1_manifests_still_verify_and_restore() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    Backup::new(p, "src.qcow2", "b.qcow2").ok();
    let root = write_v1_manifest(p, "b.qcow2", "src.qcow2");
    let (rc, info, err) = json_run(p, &["info", "b.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(info["manifest"]["format_version"], 1);
    let (rc, v, err) = json_run(p, &["verify", "b.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(v["root_digest"], root.as_str());
    let (rc, doc, err) = json_run(p, &["restore", "b.qcow2", "r.raw"]);
    assert_eq!(
        (rc, &doc["verified"]),
        (0, &serde_json::json!(true)),
        "{err}"
    );
    assert!(identical(p, "src.qcow2", "r.raw"));
    // A changed cluster is still found through the version 1 table.
    qemu_io(p, "qcow2", "b.qcow2", &["write -P 0x77 3M 512"]);
    let o = run_in(p, &["verify", "b.qcow2"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("offset 3145728"), "{}", stderr(&o));
}

#[test]
fn a_top_manifest_takes_the_backing_file_by_identity() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "base.raw", 32);
    qemu_img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "32M",
        ],
    );
    qemu_io(
        p,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0xa1 64k 64k",
            "write -P 0xa2 3M 192k",
            "write -z 6M 64k",
        ],
    );
    let doc = Backup::new(p, "top.qcow2", "t.qcow2").sync("top").ok();
    // Nothing of the backing file was hashed: the manifest holds the
    // top's 4 data chunks and names the backing file; its root is deferred.
    assert!(doc["manifest_root_digest"].is_null(), "{doc}");
    let (rc, info, err) = json_run(p, &["info", "t.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    let m = &info["manifest"];
    assert_eq!(m["data_chunks"], 4, "{m}");
    assert_eq!(m["root_digest"], "");
    let files = m["backing_files"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    assert!(files[0]["path"].as_str().unwrap().ends_with("base.raw"));
    // verify checks the top's chunks by digest and the rest by the backing
    // file's identity, without hashing it.
    let (rc, v, err) = json_run(p, &["verify", "t.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    assert!(v["root_digest"].is_null(), "{v}");
    assert_eq!(v["backing_chunks"], 512 - 5, "{v}");
    // A changed cluster of the backup's own is found.
    std::fs::copy(p.join("t.qcow2"), p.join("bad.qcow2")).unwrap();
    std::fs::copy(p.join("t.qcow2.manifest"), p.join("bad.qcow2.manifest")).unwrap();
    qemu_io(p, "qcow2", "bad.qcow2", &["write -P 0x5 3M 1"]);
    let o = run_in(p, &["verify", "bad.qcow2"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("offset 3145728"), "{}", stderr(&o));
    // So is one the backup holds where it should read the backing file.
    std::fs::copy(p.join("t.qcow2"), p.join("bad2.qcow2")).unwrap();
    std::fs::copy(p.join("t.qcow2.manifest"), p.join("bad2.qcow2.manifest")).unwrap();
    qemu_io(p, "qcow2", "bad2.qcow2", &["write -P 0x6 10M 4k"]);
    let o = run_in(p, &["verify", "bad2.qcow2"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("offset 10485760"), "{}", stderr(&o));
    let (rc, r, err) = json_run(p, &["restore", "t.qcow2", "r.raw"]);
    assert_eq!((rc, &r["verified"]), (0, &serde_json::json!(true)), "{err}");
    assert!(identical(p, "top.qcow2", "r.raw"));
    // A byte of the backing file changed (its mtime too): refused, naming it.
    qemu_io(p, "raw", "base.raw", &["write -P 0x33 20M 1"]);
    for args in [
        &["verify", "t.qcow2"][..],
        &["restore", "t.qcow2", "r2.raw"],
    ] {
        let o = run_in(p, args);
        assert_eq!(code(&o), 7, "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("base.raw") && stderr(&o).contains("changed since the backup"),
            "{}",
            stderr(&o)
        );
    }
    assert!(!p.join("r2.raw").exists());
    // With a bitmap to anchor, the root is needed now: the backing file is
    // hashed as before.
    let doc = Backup::new(p, "top.qcow2", "tb.qcow2")
        .sync("top")
        .bitmap("b0")
        .ok();
    assert_eq!(
        doc["manifest_root_digest"],
        independent_root(p, "top.qcow2", 65536).as_str()
    );
}
