//! qcow2 images written in place (`guest`, `serve`): the same seeded
//! workload applied to a raw copy is the oracle (`qemu-img compare`), and
//! `qemu-img check` must stay clean; after kill -9 at random moments
//! nothing worse than leaked clusters (exit 3) is allowed.

use crate::fixture::*;
use crate::serve::{Served, nbd_io};
use std::path::Path;

/// A qcow2 image and a raw image with the same content: data, zero
/// clusters, holes, and with `compressed` its data clusters compressed.
fn pair(p: &Path, opts: &str, compressed: bool) {
    make_raw(p, "base.raw", "32M");
    qemu_io(
        p,
        "raw",
        "base.raw",
        &["write -P 0x21 4M 9M", "write -P 0x42 20M 1M"],
    );
    let mut args = vec!["convert", "-O", "qcow2"];
    if compressed {
        args.push("-c");
    }
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["base.raw", "disk.qcow2"]);
    qemu_img(p, &args);
    qemu_io(p, "qcow2", "disk.qcow2", &["write -z 6M 1M"]);
    qemu_io(p, "raw", "base.raw", &["write -z 6M 1M"]);
    std::fs::rename(p.join("base.raw"), p.join("disk.raw")).unwrap();
}

const WORKLOAD: &str = "iops=0,count=400,bs=512-256K,zero=25,threads=1,seed=";

#[test]
fn random_workloads_written_in_place_equal_the_same_writes_on_raw_and_check_clean() {
    for (opts, compressed, seed) in [
        ("cluster_size=65536", false, 1),
        ("cluster_size=4096", false, 2),
        ("cluster_size=2097152", false, 3),
        ("cluster_size=65536", true, 4),
        ("cluster_size=65536,refcount_bits=1", false, 6),
        ("cluster_size=512", false, 7),
        ("cluster_size=65536,refcount_bits=2", false, 8),
        ("cluster_size=65536,refcount_bits=4", false, 9),
        ("cluster_size=65536,refcount_bits=8", false, 10),
        ("cluster_size=65536,refcount_bits=64", false, 11),
        ("cluster_size=65536,lazy_refcounts=on", false, 12),
        ("cluster_size=4096", true, 13),
    ] {
        let d = tempdir();
        let p = d.path();
        pair(p, opts, compressed);
        let spec = format!("{WORKLOAD}{seed}");
        ok(p, &["guest", "disk.qcow2", &spec]);
        ok(p, &["guest", "disk.raw", &spec]);
        check_clean(p, "disk.qcow2");
        assert!(
            identical_fmt(p, "disk.qcow2", "qcow2", "disk.raw", "raw"),
            "{opts} compressed={compressed}"
        );
    }
}

#[test]
fn an_overlay_is_written_in_place_and_its_backing_file_never() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "base.raw", "32M");
    let before = sha256_file(&p.join("base.raw"));
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
        ],
    );
    std::fs::copy(p.join("base.raw"), p.join("want.raw")).unwrap();
    let spec = format!("{WORKLOAD}9");
    ok(p, &["guest", "top.qcow2", &spec]);
    ok(p, &["guest", "want.raw", &spec]);
    check_clean(p, "top.qcow2");
    assert!(identical_fmt(p, "top.qcow2", "qcow2", "want.raw", "raw"));
    assert_eq!(sha256_file(&p.join("base.raw")), before);
}

#[test]
fn kill_9_while_writing_in_place_leaves_nothing_worse_than_leaked_clusters() {
    let (mut clean, mut leaks) = (0, 0);
    for (round, delay_ms) in [40u64, 60, 90, 150, 230, 310, 420, 70, 260, 50, 30, 120]
        .into_iter()
        .enumerate()
    {
        let d = tempdir();
        let p = d.path();
        let cs = if round % 2 == 0 { "4096" } else { "65536" };
        qemu_img(
            p,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                "disk.qcow2",
                "64M",
            ],
        );
        let mut child = bin()
            .current_dir(p)
            .args([
                "guest",
                "disk.qcow2",
                &format!("iops=0,duration=20s,bs=512-128K,zero=20,threads=2,seed={round}"),
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        signal(&child, libc::SIGKILL);
        let _ = child.wait();
        let o = std::process::Command::new("qemu-img")
            .current_dir(p)
            .args(["check", "disk.qcow2"])
            .output()
            .unwrap();
        let rc = o.status.code().unwrap_or(-1);
        match rc {
            0 => clean += 1,
            3 => leaks += 1,
            _ => panic!(
                "round {round} (cluster size {cs}, killed after {delay_ms} ms): qemu-img check exit {rc}: {}",
                String::from_utf8_lossy(&o.stdout)
            ),
        }
        // Killed while written: marked dirty, so QEMU rebuilds its
        // refcounts when it opens it (as a VM would), leaving it clean.
        if rc == 3 {
            assert_eq!(
                info_json(p, "disk.qcow2")["dirty-flag"],
                true,
                "round {round}"
            );
            qemu_io(p, "qcow2", "disk.qcow2", &["read 0 4k"]);
            check_clean(p, "disk.qcow2");
        }
        qemu_img(p, &["convert", "-O", "raw", "disk.qcow2", "flat.raw"]);
    }
    eprintln!("kill -9: {clean} clean, {leaks} leaked clusters only");
}

#[test]
fn a_served_qcow2_is_written_in_place_and_backed_up_through_the_server() {
    let d = tempdir();
    let p = d.path();
    pair(p, "", false);
    Backup::new(p, "disk.qcow2", "full.qcow2").bitmap("b0").ok();
    let s = Served::start(p, "disk.qcow2", &[]);
    let cmds = [
        "write -P 0x11 0 64k",
        "write -P 0x22 -f 5M 100k",
        "write -z 8M 1M",
        "discard 12M 64k",
        "write -P 0x33 33550336 4096",
        "flush",
    ];
    let o = nbd_io(p, &s.uri(), &cmds);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    qemu_io(p, "raw", "disk.raw", &cmds[..3]);
    qemu_io(
        p,
        "raw",
        "disk.raw",
        &["write -z 12M 64k", "write -P 0x33 33550336 4096"],
    );
    // The export is the image as the client wrote it.
    assert!(identical_fmt(p, &s.uri(), "raw", "disk.raw", "raw"));
    // An incremental runs in the server while it serves.
    let inc = ok(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.qcow2",
            "inc.qcow2",
            "--verify",
        ],
    );
    assert!(!inc["point_in_time"].as_str().unwrap().is_empty());
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    check_clean(p, "disk.qcow2");
    assert!(identical_fmt(p, "disk.qcow2", "qcow2", "disk.raw", "raw"));
    assert!(identical_fmt(p, "inc.qcow2", "qcow2", "disk.raw", "raw"));
    // After the server: the bitmap is consistent, the next incremental is
    // accepted and empty.
    let doc = ok(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.qcow2",
            "inc2.qcow2",
        ],
    );
    assert_eq!(doc["bytes_copied"], 0);
}

#[test]
fn qemu_persistent_bitmaps_inside_a_qcow2_written_in_place_are_invalidated() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-q", "-f", "qcow2", "disk.qcow2", "16M"]);
    qemu_img(p, &["bitmap", "--add", "disk.qcow2", "qemu0"]);
    let has_bitmaps = |p: &Path| {
        info_json(p, "disk.qcow2")["format-specific"]["data"]
            .get("bitmaps")
            .is_some_and(|b| b.as_array().is_some_and(|a| !a.is_empty()))
    };
    assert!(has_bitmaps(p));
    ok(p, &["guest", "disk.qcow2", "iops=0,count=5,seed=1"]);
    // QEMU no longer trusts (or shows) a bitmap that missed these writes.
    assert!(!has_bitmaps(p));
}

#[test]
fn qcow2_images_that_cannot_be_written_in_place_are_refused_unchanged() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "snap.qcow2", "");
    qemu_img(p, &["snapshot", "-c", "s1", "snap.qcow2"]);
    make_qcow2(p, "zstd.qcow2", "compression_type=zstd");
    make_qcow2(p, "v2.qcow2", "compat=0.10");
    for img in ["snap.qcow2", "zstd.qcow2", "v2.qcow2"] {
        let before = sha256_file(&p.join(img));
        let o = run_in(p, &["guest", img, "iops=0,count=5,seed=1"]);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(img), "{}", stderr(&o));
        let o = run_in(p, &["serve", img, "--socket", "s.sock"]);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert_eq!(sha256_file(&p.join(img)), before, "{img} was changed");
    }
}
