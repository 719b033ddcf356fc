//! The qcow2 compatibility matrix: images made by qemu-img in the test; each
//! is backed up byte-exactly, or refused as unsupported with exit 1 and no
//! target.

use crate::fixture::*;
use std::path::Path;

/// Back up `img` into raw and qcow2 targets and compare.
fn exact(p: &Path, img: &str) {
    let before = sha256_file(&p.join(img));
    for ext in ["raw", "qcow2"] {
        let tgt = format!("{img}.out.{ext}");
        let o = run_in(p, &["backup", "-q", img, &tgt]);
        assert_eq!(code(&o), 0, "{img} -> {ext}: {}", stderr(&o));
        assert!(identical(p, img, &tgt), "{img} -> {ext} differs");
        if ext == "qcow2" {
            check_clean(p, &tgt);
        }
    }
    assert_eq!(sha256_file(&p.join(img)), before, "{img} changed");
}

fn unsupported(p: &Path, img: &str, what: &str) {
    let o = run_in(p, &["backup", img, "out.raw"]);
    assert_eq!(code(&o), 1, "{img}: {}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("unsupported") && err.contains(what),
        "{img}: {err}"
    );
    assert!(!p.join("out.raw").exists() && !p.join("out.raw.partial").exists());
}

#[test]
fn cluster_sizes() {
    let d = tempdir();
    for cs in ["512", "4096", "65536", "2M"] {
        let name = format!("cs{cs}.qcow2");
        make_qcow2(d.path(), &name, &format!("cluster_size={cs}"));
        exact(d.path(), &name);
    }
}

#[test]
fn versions_refcounts_and_options() {
    let d = tempdir();
    for (name, opts) in [
        ("v2.qcow2", "compat=0.10"),
        ("v3.qcow2", "compat=1.1"),
        ("rb1.qcow2", "refcount_bits=1"),
        ("rb16.qcow2", "refcount_bits=16"),
        ("rb64.qcow2", "refcount_bits=64"),
        ("lazy.qcow2", "lazy_refcounts=on"),
        ("prealloc.qcow2", "preallocation=metadata"),
    ] {
        make_qcow2(d.path(), name, opts);
        exact(d.path(), name);
    }
}

#[test]
fn compressed_clusters() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "plain.qcow2", "");
    qemu_img(
        p,
        &["convert", "-c", "-O", "qcow2", "plain.qcow2", "comp.qcow2"],
    );
    let compressed: bool = map_json(p, "comp.qcow2")
        .iter()
        .any(|e| e["compressed"] == true);
    assert!(compressed, "qemu-img did not compress");
    exact(p, "comp.qcow2");
    // Compressed clusters at the end of a size that is not a cluster multiple.
    qemu_img(p, &["create", "-f", "raw", "odd.raw", "1000K"]);
    qemu_io(p, "raw", "odd.raw", &["write -P 0x42 960k 40k"]);
    qemu_img(p, &["convert", "-c", "-O", "qcow2", "odd.raw", "odd.qcow2"]);
    exact(p, "odd.qcow2");
}

#[test]
fn zstd_compressed_clusters() {
    let d = tempdir();
    let p = d.path();
    // Compressible data everywhere but a hole, then compressed with zstd.
    qemu_img(p, &["create", "-f", "raw", "plain.raw", "8M"]);
    qemu_io(
        p,
        "raw",
        "plain.raw",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 4M 3M",
            "write -P 0x33 7M 333k",
        ],
    );
    let zstd = [
        "convert",
        "-c",
        "-o",
        "compression_type=zstd",
        "-O",
        "qcow2",
    ];
    qemu_img(p, &[&zstd[..], &["plain.raw", "z.qcow2"]].concat());
    assert_eq!(
        info_json(p, "z.qcow2")["format-specific"]["data"]["compression-type"],
        "zstd"
    );
    assert!(
        map_json(p, "z.qcow2")
            .iter()
            .any(|e| e["compressed"] == true)
    );
    // Plain clusters written over compressed ones, as a running VM does.
    qemu_io(p, "qcow2", "z.qcow2", &["write -P 0x44 1M 128k"]);
    exact(p, "z.qcow2");
    Backup::new(p, "z.qcow2", "z.raw").ok();
    run_ok(p, &["verify", "--against-image", "z.qcow2", "z.raw"]);
    // A size that is not a cluster multiple.
    qemu_img(p, &["create", "-f", "raw", "odd.raw", "1000K"]);
    qemu_io(p, "raw", "odd.raw", &["write -P 0x42 960k 40k"]);
    qemu_img(p, &[&zstd[..], &["odd.raw", "odd.qcow2"]].concat());
    exact(p, "odd.qcow2");
    // A damaged frame is a read error naming the offset, never zeros.
    // (The first zstd frame in the file: its magic, 28 b5 2f fd.)
    let path = p.join("z.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == [0x28, 0xb5, 0x2f, 0xfd])
        .expect("a zstd frame");
    for b in &mut bytes[at + 4..at + 20] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let o = run_in(p, &["backup", "z.qcow2", "bad.raw"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(stderr(&o).contains("does not inflate"), "{}", stderr(&o));
    assert!(!p.join("bad.raw").exists());
}

#[test]
fn dirty_lazy_refcount_image_reads_correctly() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "dirty.qcow2", "lazy_refcounts=on");
    // Mark it dirty the way QEMU does after a crash with lazy refcounts.
    let path = p.join("dirty.qcow2");
    let mut b = std::fs::read(&path).unwrap();
    b[79] |= 1;
    std::fs::write(&path, &b).unwrap();
    assert_eq!(info_json(p, "dirty.qcow2")["dirty-flag"], true);
    exact(p, "dirty.qcow2");
}

#[test]
fn unsupported_features_are_refused() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "extl2.qcow2", "extended_l2=on");
    unsupported(p, "extl2.qcow2", "extended L2");
    make_qcow2(p, "df.qcow2", "data_file=df.data");
    unsupported(p, "df.qcow2", "external data file");
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=secret",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "luks.qcow2",
            "16M",
        ],
    );
    unsupported(p, "luks.qcow2", "encrypted");
}

#[test]
fn three_level_chain_with_relative_names_from_another_directory() {
    let d = tempdir();
    let p = d.path();
    std::fs::create_dir(p.join("images")).unwrap();
    std::fs::create_dir(p.join("elsewhere")).unwrap();
    let i = p.join("images");
    make_raw(&i, "base.raw", "8M");
    qemu_img(
        &i,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "12M",
        ],
    );
    qemu_io(
        &i,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x55 1M 1M", "write -z 3M 64k"],
    );
    qemu_img(
        &i,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "16M",
        ],
    );
    qemu_io(
        &i,
        "qcow2",
        "top.qcow2",
        &["write -P 0x66 1536k 512k", "write -P 0x67 13M 64k"],
    );
    let e = p.join("elsewhere");
    for tgt in ["chain.raw", "chain.qcow2"] {
        let o = run_in(&e, &["backup", "-q", "../images/top.qcow2", tgt]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert!(identical(&e, "../images/top.qcow2", tgt), "{tgt}");
    }
    check_clean(&e, "chain.qcow2");
    // A full backup has no backing file.
    assert!(
        info_json(&e, "chain.qcow2")
            .get("backing-filename")
            .is_none()
    );
}

#[test]
fn overlay_larger_than_its_backing_and_raw_backing() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "small.raw", 3, 0x71);
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "small.raw",
            "-F",
            "raw",
            "big.qcow2",
            "10M",
        ],
    );
    qemu_io(
        p,
        "qcow2",
        "big.qcow2",
        &["write -P 0x72 2M 64k", "write -P 0x73 9M 64k"],
    );
    exact(p, "big.qcow2");
    // A qcow2 backing that is shorter, too.
    qemu_img(p, &["convert", "-O", "qcow2", "small.raw", "small.qcow2"]);
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "small.qcow2",
            "-F",
            "qcow2",
            "big2.qcow2",
            "10M",
        ],
    );
    qemu_io(p, "qcow2", "big2.qcow2", &["write -P 0x74 4M 64k"]);
    exact(p, "big2.qcow2");
    // An overlay smaller than its backing.
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "big.qcow2",
            "-F",
            "qcow2",
            "shrunk.qcow2",
            "2560K",
        ],
    );
    exact(p, "shrunk.qcow2");
}

#[test]
fn backing_without_a_format_is_probed() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "base.qcow2", "");
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "16M",
        ],
    );
    // Turn the backing-format header extension into an unknown one (which
    // readers ignore), so the backing file's format must be probed.
    let path = p.join("top.qcow2");
    let mut b = std::fs::read(&path).unwrap();
    let at = b
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    b[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&path, &b).unwrap();
    assert!(
        info_json(p, "top.qcow2")
            .get("backing-filename-format")
            .is_none()
    );
    exact(p, "top.qcow2");
}

#[test]
fn preallocated_clusters_never_written_cost_no_io() {
    let d = tempdir();
    let p = d.path();
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "pre.qcow2",
            "64M",
        ],
    );
    qemu_io(
        p,
        "qcow2",
        "pre.qcow2",
        &["write -P 0x5 0 1M", "write -P 0x6 40M 64k"],
    );
    // Every cluster is allocated in qcow2 terms, but the host file has holes
    // under the ones never written: a dry run sees only the written data.
    let o = run_in(
        p,
        &["backup", "--dry-run", "--json", "pre.qcow2", "out.raw"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["bytes_copied"], (1 << 20) + 65536, "{doc}");
    exact(p, "pre.qcow2");
}

#[test]
fn a_preallocated_layer_shadows_its_backing_with_zeros_where_never_written() {
    // Every cluster of the top layer is allocated (preallocation=metadata)
    // over holes in its file: it reads as zeros, not as the backing file's
    // data, wherever it was not written. Reads through the chain, the
    // manifest's digests and `verify` (which do not ask the host file
    // where its holes are) must see the same zeros QEMU does.
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io(p, "qcow2", "base.qcow2", &["write -P 0x11 0 8M"]);
    // (qemu-img creates no preallocated image over a backing file: the
    // backing file is set afterwards, the image left as it is.)
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "top.qcow2",
            "8M",
        ],
    );
    qemu_io(
        p,
        "qcow2",
        "top.qcow2",
        &["write -P 0x22 1M 64k", "write -P 0x33 5M 128k"],
    );
    qemu_img(
        p,
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    // QEMU reads zeros, not 0x11, beside what was written.
    let o = std::process::Command::new("qemu-io")
        .current_dir(p)
        .args(["-f", "qcow2", "-r", "-c", "read -P 0 0 1M", "top.qcow2"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read 1048576/1048576"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    exact(p, "top.qcow2");
    // A backup of it, and the backup verifies against its manifest.
    let o = run_in(p, &["backup", "-q", "top.qcow2", "b.qcow2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(identical(p, "top.qcow2", "b.qcow2"));
    let o = run_in(p, &["verify", "b.qcow2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // The image itself, checked against the backup's manifest.
    let o = run_in(p, &["verify", "b.qcow2", "--against", "top.qcow2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}
