//! Dirty bitmaps beside the image, incremental chains, staleness, import,
//! and QEMU's iotest 257 bitmap outcomes.

use crate::fixture::*;
use serde_json::Value;
use std::time::{Duration, Instant};

#[test]
fn incremental_chain_restores_and_follows_the_dirty_data() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 64);
    let doc = Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    assert_eq!(doc["bitmap"]["dirty_granules"], 0);
    assert!(
        doc["bitmap"]["anchored_backup"]
            .as_str()
            .unwrap()
            .ends_with("full.qcow2")
    );
    // Guest writes in place, some of them zeroes.
    let g = ok(
        p,
        &[
            "guest",
            "disk.raw",
            "iops=0,count=60,bs=4K-64K,zero=30,seed=7",
        ],
    );
    assert_eq!(g["bitmaps_marked"][0], "b0");
    let dirty1 = ok(p, &["bitmap", "show", "disk.raw", "b0"])["dirty_bytes"]
        .as_u64()
        .unwrap();
    assert!(dirty1 > 0);
    let inc1 = Backup::new(p, "disk.raw", "inc1.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    assert_eq!(inc1["backing"], "full.qcow2");
    assert_eq!(inc1["bitmap"]["dirty_granules"], 0);
    assert_eq!(
        inc1["bytes_copied"].as_u64().unwrap() + inc1["bytes_skipped_zero"].as_u64().unwrap(),
        dirty1
    );
    check_clean(p, "inc1.qcow2");
    assert_eq!(info_json(p, "inc1.qcow2")["backing-filename"], "full.qcow2");
    assert!(identical(p, "disk.raw", "inc1.qcow2"));
    // Zeros over data: whole clusters become zero and must shadow the parent.
    ok(
        p,
        &[
            "guest",
            "disk.raw",
            "iops=0,count=20,bs=128K,zero=100,seed=8",
        ],
    );
    let inc2 = Backup::new(p, "disk.raw", "inc2.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    assert_eq!(inc2["backing"], "inc1.qcow2");
    check_clean(p, "inc2.qcow2");
    let zero_own = map_json(p, "inc2.qcow2")
        .iter()
        .any(|e| e["depth"] == 0 && e["zero"] == true && e["data"] == false);
    assert!(zero_own, "no zero clusters in the second incremental");
    // Plain qemu-img restores the chain, and so does imgbackup restore.
    let want = sha256_file(&p.join("disk.raw"));
    qemu_img(p, &["convert", "-O", "raw", "inc2.qcow2", "flat.raw"]);
    assert_eq!(sha256_file(&p.join("flat.raw")), want);
    ok(p, &["restore", "inc2.qcow2", "restored.raw"]);
    assert_eq!(sha256_file(&p.join("restored.raw")), want);
    // The incrementals' size follows the dirty data, not the image size.
    for (inc, doc) in [("inc1.qcow2", &inc1), ("inc2.qcow2", &inc2)] {
        let len = std::fs::metadata(p.join(inc)).unwrap().len();
        let copied = doc["bytes_copied"].as_u64().unwrap();
        assert!(
            len < copied + (2 << 20) && len < 16 << 20,
            "{inc}: {len} bytes for {copied} copied"
        );
    }
    // Its manifest names the parent and reuses its digests.
    let m = &ok(p, &["info", "inc2.qcow2"])["manifest"];
    assert!(
        m["parent"]["path"]
            .as_str()
            .unwrap()
            .ends_with("inc1.qcow2")
    );
    assert_eq!(m["parent"]["root_digest"], inc1["manifest_root_digest"]);
    assert_eq!(
        m["root_digest"],
        independent_root(p, "disk.raw", 65536).as_str()
    );
    ok(p, &["verify", "inc2.qcow2"]);
}

#[test]
fn a_write_behind_imgbackups_back_is_caught_and_rebuild_recovers() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=10,seed=1"]);
    Backup::new(p, "disk.raw", "inc1.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    // Someone writes the image without marking the bitmap.
    std::thread::sleep(Duration::from_millis(20));
    qemu_io(p, "raw", "disk.raw", &["write -P 0xee 5M 8k"]);
    let (rc, _, err) = json_run(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.raw",
            "inc2.qcow2",
        ],
    );
    assert_eq!(rc, 6, "{err}");
    assert!(
        err.contains("inconsistent") && err.contains("bitmap rebuild"),
        "{err}"
    );
    assert!(!p.join("inc2.qcow2").exists() && !p.join("inc2.qcow2.partial").exists());
    let (_, list, _) = json_run(p, &["bitmap", "list", "disk.raw"]);
    assert_eq!(list["bitmaps"][0]["consistent"], false);
    // Rebuild against the last backup, then the chain goes on.
    let r = ok(
        p,
        &[
            "bitmap",
            "rebuild",
            "disk.raw",
            "b0",
            "--against-backup",
            "inc1.qcow2",
        ],
    );
    assert_eq!(r["bitmap"]["dirty_granules"], 1, "{r}");
    let inc2 = Backup::new(p, "disk.raw", "inc2.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    assert_eq!(inc2["backing"], "inc1.qcow2");
    let want = sha256_file(&p.join("disk.raw"));
    ok(p, &["restore", "inc2.qcow2", "r.raw"]);
    assert_eq!(sha256_file(&p.join("r.raw")), want);
}

#[test]
fn a_damaged_or_abandoned_bitmap_is_refused() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=10,seed=2"]);
    let bm = p.join("disk.raw.b0.bitmap");
    let good = std::fs::read(&bm).unwrap();
    for at in [3usize, 20, 100, good.len() - 40, good.len() - 1] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        std::fs::write(&bm, &b).unwrap();
        let (rc, _, err) = json_run(
            p,
            &[
                "backup",
                "--sync",
                "incremental",
                "--bitmap",
                "b0",
                "disk.raw",
                "inc.qcow2",
            ],
        );
        assert_eq!(rc, 6, "flip at {at}: {err}");
        assert!(err.contains("damaged"), "{err}");
        assert!(!p.join("inc.qcow2").exists());
    }
    std::fs::write(&bm, &good).unwrap();
    // kill -9 during a job leaves the bitmap in use.
    let mut child = bin()
        .current_dir(p)
        .args([
            "backup",
            "-q",
            "--speed",
            "1M",
            "--sync",
            "bitmap",
            "--bitmap",
            "b0",
            "disk.raw",
            "inc.qcow2",
        ])
        .spawn()
        .unwrap();
    // The target's partial is created (locked) first, then the bitmap is
    // marked in use: wait for both.
    wait_for(&p.join("inc.qcow2.partial"));
    wait_for_bitmap_in_use(&p.join("disk.raw.b0.bitmap"));
    child.kill().unwrap();
    child.wait().unwrap();
    let (rc, _, err) = json_run(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.raw",
            "inc.qcow2",
            "--force",
        ],
    );
    assert_eq!(rc, 6, "{err}");
    assert!(err.contains("in use"), "{err}");
    let (_, show, _) = json_run(p, &["bitmap", "show", "disk.raw", "b0"]);
    assert_eq!(show["in_use"], true);
    // A full backup with --bitmap starts the bitmap afresh (under a new
    // name: the backup the bitmap is anchored to is never overwritten).
    Backup::new(p, "disk.raw", "full2.qcow2").bitmap("b0").ok();
    assert_eq!(dirty(p, "disk.raw", "b0"), 0);
}

#[test]
fn cancelling_an_incremental_keeps_the_bitmap() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 32);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    let mut seed = 99u64;
    for round in 0..6u64 {
        // Dirty the bitmap (again), then cancel an incremental at a random moment.
        ok(
            p,
            &[
                "guest",
                "disk.raw",
                &format!("iops=0,count=150,bs=64K,seed={}", round + 3),
            ],
        );
        let before = dirty(p, "disk.raw", "b0");
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(30 + (seed >> 33) % 900);
        let (sig, want) = if round % 2 == 0 {
            (libc::SIGINT, 130)
        } else {
            (libc::SIGTERM, 143)
        };
        let tgt = format!("inc{round}.qcow2");
        let child = bin()
            .current_dir(p)
            .args([
                "backup",
                "-q",
                "--speed",
                "4M",
                "--sync",
                "incremental",
                "--bitmap",
                "b0",
                "disk.raw",
                &tgt,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let (_, show, _) = json_run(p, &["bitmap", "show", "disk.raw", "b0"]);
        assert_eq!(show["in_use"], false, "round {round}");
        assert_eq!(show["consistent"], true, "round {round}");
        if code(&o) == 0 {
            // It finished before the signal: a whole backup, a clean bitmap.
            assert!(p.join(&tgt).exists());
            assert_eq!(show["dirty_granules"], 0);
            continue;
        }
        assert_eq!(
            code(&o),
            want,
            "round {round}, after {delay:?}: {}",
            stderr(&o)
        );
        assert!(!p.join(&tgt).exists() && !p.join(format!("{tgt}.partial")).exists());
        assert_eq!(
            show["dirty_granules"], before,
            "round {round}: the bitmap lost bits"
        );
    }
    // The next incremental succeeds and the chain restores.
    Backup::new(p, "disk.raw", "last.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    ok(p, &["restore", "last.qcow2", "r.raw"]);
    assert_eq!(
        sha256_file(&p.join("r.raw")),
        sha256_file(&p.join("disk.raw"))
    );
}

#[test]
fn ignored_clusters_stay_dirty() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=40,bs=64K,seed=4"]);
    let ranges = ok(p, &["bitmap", "show", "disk.raw", "b0"])["dirty_ranges"].clone();
    let first = ranges[0][0].as_u64().unwrap();
    let rule = format!("source:read:EIO@{first}");
    let (rc, doc, err) = json_run(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "--on-source-error",
            "ignore",
            "--inject",
            &rule,
            "disk.raw",
            "inc.qcow2",
        ],
    );
    assert_eq!(rc, 3, "{err}");
    assert_eq!(doc["ignored_ranges"][0][0], first);
    assert_eq!(doc["bitmap"]["dirty_granules"], 1);
    let show = ok(p, &["bitmap", "show", "disk.raw", "b0"]);
    assert_eq!(show["dirty_ranges"][0][0], first);
    assert_eq!(show["dirty_granules"], 1);
}

/// QEMU's iotest 257 patterns (64 MiB image, 64 KiB granularity).
const GROUP0: &[&str] = &[
    "write -P 0x49 0x0000000 64k",
    "write -P 0x6c 0x0100000 64k",
    "write -P 0x6f 0x2000000 64k",
    "write -P 0x76 0x3ff0000 64k",
];
const GROUP1: &[&str] = &[
    "write -P 0x65 0x0000000 64k",
    "write -P 0x77 0x00f8000 64k",
    "write -P 0x72 0x2008000 64k",
    "write -P 0x69 0x3fe0000 64k",
];

fn case_257(sync: &str, mode: &str, failure: bool) -> (i32, u64) {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-f", "qcow2", "img.qcow2", "64M"]);
    qemu_io(p, "qcow2", "img.qcow2", GROUP0);
    Backup::new(p, "img.qcow2", "fbackup0.qcow2").ok();
    ok(p, &["bitmap", "add", "img.qcow2", "bitmap0"]);
    qemu_io(p, "qcow2", "img.qcow2", GROUP1);
    // qemu-io does not mark our bitmap: rebuild it from the reference backup.
    let r = ok(
        p,
        &[
            "bitmap",
            "rebuild",
            "img.qcow2",
            "bitmap0",
            "--against-backup",
            "fbackup0.qcow2",
        ],
    );
    assert_eq!(
        r["bitmap"]["dirty_granules"], 6,
        "group 1 dirties 6 clusters"
    );
    let mut args = vec![
        "backup",
        "--jobs",
        "1",
        "--max-chunk",
        "64K",
        "--sync",
        sync,
        "--bitmap",
        "bitmap0",
        "--bitmap-mode",
        mode,
    ];
    if failure {
        args.extend(["--inject", "source:read:EIO@nth=2,once"]);
    }
    args.extend(["img.qcow2", "bsync1.qcow2"]);
    let (rc, _, _) = json_run(p, &args);
    (rc, dirty(p, "img.qcow2", "bitmap0"))
}

#[test]
fn iotest_257_bitmap_outcomes() {
    // (sync mode, bitmap mode, failure, expected dirty clusters afterwards)
    let table: &[(&str, &str, bool, u64)] = &[
        ("bitmap", "on-success", false, 0),
        ("bitmap", "always", false, 0),
        ("bitmap", "never", false, 6),
        ("full", "on-success", false, 0),
        ("full", "always", false, 0),
        ("full", "never", false, 6),
        ("top", "on-success", false, 0),
        ("top", "always", false, 0),
        ("top", "never", false, 6),
        ("bitmap", "on-success", true, 6),
        ("bitmap", "always", true, 5),
        ("bitmap", "never", true, 6),
        ("full", "on-success", true, 6),
        ("full", "always", true, 1024 - 15),
        ("full", "never", true, 6),
        ("top", "on-success", true, 6),
        ("top", "always", true, 6),
        ("top", "never", true, 6),
    ];
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = table
            .iter()
            .map(|&(sync, mode, failure, _)| s.spawn(move || case_257(sync, mode, failure)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (&(sync, mode, failure, want), (rc, got)) in table.iter().zip(results) {
        // QEMU refuses bitmap mode never with full and top ("has no
        // meaningful effect"): a usage error, the bitmap untouched.
        let want_rc = if mode == "never" && sync != "bitmap" {
            2
        } else if failure {
            4
        } else {
            0
        };
        assert_eq!(rc, want_rc, "{sync} {mode} failure={failure}");
        assert_eq!(got, want, "{sync} {mode} failure={failure}: dirty clusters");
    }
}

#[test]
fn sync_top_copies_only_the_top_layer() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "base.raw", 8);
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "8M",
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
    assert_eq!(doc["backing"], "base.raw");
    check_clean(p, "t.qcow2");
    let own = |img: &str| -> Vec<(u64, u64, bool)> {
        map_json(p, img)
            .iter()
            .filter(|e| e["depth"] == 0 && e["present"] == true)
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["zero"] == true,
                )
            })
            .collect()
    };
    assert_eq!(
        own("t.qcow2"),
        own("top.qcow2"),
        "the target holds exactly the top layer"
    );
    assert!(identical(p, "top.qcow2", "t.qcow2"));
    assert_eq!(doc["bytes_copied"], 256 << 10);
}

#[test]
fn import_a_qemu_bitmap_and_back_up_with_it() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-f", "qcow2", "img.qcow2", "64M"]);
    qemu_io(p, "qcow2", "img.qcow2", &["write -P 1 0 64M"]);
    Backup::new(p, "img.qcow2", "full.qcow2").ok();
    qemu_img(p, &["bitmap", "--add", "img.qcow2", "bm0"]);
    qemu_io(
        p,
        "qcow2",
        "img.qcow2",
        &[
            "write -P 2 1M 64k",
            "write -P 3 10M 200k",
            "write -z 20M 128k",
            "write -P 4 63M 4k",
        ],
    );
    // What QEMU reports: qemu-nbd exports the bitmap; dirty areas read as
    // "data": false through x-dirty-bitmap.
    let sock = p.join("nbd.sock");
    let mut nbd = std::process::Command::new("qemu-nbd")
        .current_dir(p)
        .args([
            "-r",
            "-B",
            "bm0",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "qcow2",
            "img.qcow2",
        ])
        .spawn()
        .unwrap();
    wait_for(&sock);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:bm0",
        sock.display()
    );
    let m = qemu_img(p, &["map", "--output=json", "--image-opts", &opts]);
    nbd.kill().ok();
    nbd.wait().ok();
    let qemu_dirty: Vec<[u64; 2]> = serde_json::from_slice::<Vec<Value>>(&m.stdout)
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| {
            let s = e["start"].as_u64().unwrap();
            [s, s + e["length"].as_u64().unwrap()]
        })
        .collect();
    assert_eq!(qemu_dirty.len(), 4, "{qemu_dirty:?}");
    ok(
        p,
        &["bitmap", "import", "img.qcow2", "bm0", "--as", "imported"],
    );
    let show = ok(p, &["bitmap", "show", "img.qcow2", "imported"]);
    let ours: Vec<[u64; 2]> = serde_json::from_value(show["dirty_ranges"].clone()).unwrap();
    assert_eq!(ours, qemu_dirty);
    assert_eq!(show["granularity"], 65536);
    // An incremental driven by it restores the image.
    let inc = Backup::new(p, "img.qcow2", "inc.qcow2")
        .sync("incremental")
        .bitmap("imported")
        .args(&["--backing", "full.qcow2"])
        .ok();
    assert_eq!(inc["backing"], "full.qcow2");
    ok(p, &["restore", "inc.qcow2", "r.raw"]);
    assert!(identical(p, "img.qcow2", "r.raw"));
    // A bitmap QEMU holds in use, and an image whose autoclear bit says
    // the bitmaps are stale, are refused.
    let mut qsd = std::process::Command::new("qemu-storage-daemon")
        .current_dir(p)
        .args([
            "--blockdev",
            "driver=qcow2,node-name=n0,file.driver=file,file.filename=img.qcow2",
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut rc = 0;
    let mut err = String::new();
    // While QEMU opens the image, its autoclear bit may briefly be clear
    // (also refused); wait until it holds the bitmap in use.
    while t.elapsed() < Duration::from_secs(10) {
        (rc, _, err) = json_run(
            p,
            &["bitmap", "import", "img.qcow2", "bm0", "--as", "again"],
        );
        if rc == 0 {
            std::fs::remove_file(p.join("img.qcow2.again.bitmap")).ok();
        } else {
            assert_eq!(rc, 6, "{err}");
            if err.contains("in use") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    qsd.kill().ok();
    qsd.wait().ok();
    assert_eq!(rc, 6, "{err}");
    assert!(err.contains("in use"), "{err}");
    let path = p.join("img.qcow2");
    let mut b = std::fs::read(&path).unwrap();
    assert_eq!(b[95] & 1, 1, "autoclear bitmaps bit");
    b[95] &= !1;
    std::fs::write(&path, &b).unwrap();
    let (rc, _, err) = json_run(
        p,
        &["bitmap", "import", "img.qcow2", "bm0", "--as", "stale"],
    );
    assert_eq!(rc, 6, "{err}");
    assert!(err.contains("autoclear"), "{err}");
}

#[test]
fn bitmap_commands() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    let a = ok(
        p,
        &["bitmap", "add", "disk.raw", "b1", "--granularity", "4K"],
    );
    assert_eq!(a["bitmap"]["granularity"], 4096);
    let (rc, _, err) = json_run(p, &["bitmap", "add", "disk.raw", "b1"]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("already exists"));
    ok(p, &["bitmap", "add", "disk.raw", "b2", "--disabled"]);
    let (rc, _, _) = json_run(p, &["bitmap", "add", "disk.raw", "../evil"]);
    assert_eq!(rc, 2);
    ok(
        p,
        &[
            "guest",
            "disk.raw",
            "iops=0,count=5,bs=4K,pattern=sequential",
        ],
    );
    let l = ok(p, &["bitmap", "list", "disk.raw"]);
    let bms = l["bitmaps"].as_array().unwrap();
    assert_eq!(bms.len(), 2);
    assert_eq!(bms[0]["name"], "b1");
    assert_eq!(bms[0]["dirty_bytes"], 5 * 4096);
    assert_eq!(bms[0]["consistent"], true);
    assert_eq!(bms[1]["enabled"], false);
    assert_eq!(bms[1]["dirty_bytes"], 0, "a disabled bitmap is not marked");
    let s = ok(p, &["bitmap", "show", "disk.raw", "b1"]);
    assert_eq!(s["dirty_ranges"][0], serde_json::json!([0, 5 * 4096]));
    // merge needs the same granularity.
    let (rc, _, err) = json_run(p, &["bitmap", "merge", "disk.raw", "b1", "--into", "b2"]);
    assert_eq!(rc, 1, "{err}");
    ok(
        p,
        &["bitmap", "add", "disk.raw", "b3", "--granularity", "4K"],
    );
    let m = ok(p, &["bitmap", "merge", "disk.raw", "b1", "--into", "b3"]);
    assert_eq!(m["bitmap"]["dirty_bytes"], 5 * 4096);
    ok(p, &["bitmap", "enable", "disk.raw", "b2"]);
    ok(p, &["bitmap", "disable", "disk.raw", "b1"]);
    ok(p, &["guest", "disk.raw", "iops=0,count=1,bs=4K,seed=9"]);
    assert_eq!(dirty(p, "disk.raw", "b1"), 5, "disabled: unchanged");
    assert_eq!(dirty(p, "disk.raw", "b2"), 1);
    ok(p, &["bitmap", "clear", "disk.raw", "b3"]);
    assert_eq!(dirty(p, "disk.raw", "b3"), 0);
    ok(p, &["bitmap", "remove", "disk.raw", "b3"]);
    let (rc, _, _) = json_run(p, &["bitmap", "show", "disk.raw", "b3"]);
    assert_eq!(rc, 6);
    let (rc, _, err) = json_run(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "nope",
            "disk.raw",
            "x.qcow2",
        ],
    );
    assert_eq!(rc, 6, "{err}");
    let i = ok(p, &["info", "disk.raw"]);
    assert_eq!(i["bitmaps"].as_array().unwrap().len(), 2);
    // qcow2 images are written in place by the guest; a backup never is.
    qemu_img(p, &["create", "-f", "qcow2", "q.qcow2", "1M"]);
    let (rc, _, err) = json_run(p, &["guest", "q.qcow2", "count=1"]);
    assert_eq!(rc, 0, "{err}");
    check_clean(p, "q.qcow2");
    Backup::new(p, "disk.raw", "b.qcow2").ok();
    let (rc, _, err) = json_run(p, &["guest", "b.qcow2", "count=1"]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("is a backup"), "{err}");
}

#[test]
fn a_chain_of_thirty_incrementals_verifies_and_restores() {
    // Every layer of a long chain is mapped by imgbackup's own qcow2
    // reader; the result must equal qemu-img's reading of the chain.
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    Backup::new(p, "disk.raw", "c00.qcow2").bitmap("b0").ok();
    for night in 1..=30 {
        let spec = format!("iops=0,count=20,bs=4K-128K,zero=10,seed={night}");
        ok(p, &["guest", "disk.raw", &spec]);
        let t = format!("c{night:02}.qcow2");
        let doc = Backup::new(p, "disk.raw", &t)
            .sync("incremental")
            .bitmap("b0")
            .ok();
        assert_eq!(doc["backing"], format!("c{:02}.qcow2", night - 1));
    }
    let (rc, v, err) = json_run(p, &["verify", "c30.qcow2"]);
    assert_eq!((rc, &v["ok"]), (0, &Value::Bool(true)), "{err}");
    ok(p, &["restore", "c30.qcow2", "r.raw"]);
    assert!(identical(p, "disk.raw", "r.raw"));
    assert!(identical(p, "c30.qcow2", "r.raw"));
    ok(p, &["restore", "c15.qcow2", "r15.qcow2"]);
    assert!(identical(p, "c15.qcow2", "r15.qcow2"));
    check_clean(p, "r15.qcow2");
    // The incrementals' manifests refer to their parents: the last one
    // holds at most its own dirty chunks.
    let (_, info, _) = json_run(p, &["info", "c30.qcow2"]);
    assert!(
        info["manifest"]["data_chunks"].as_u64().unwrap() <= 20 * 3,
        "{info}"
    );
}
