//! Error policies with --inject, a real full file system, damaged images,
//! locks, and signals at random moments.

use crate::fixture::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const K64: u64 = 65536;

/// A backup of `src.raw` to `tgt` with `--jobs 1 --max-chunk 64K`
/// (requests in offset order, one cluster each) and quick retries.
fn in_order(p: &Path, tgt: &str) -> Backup {
    Backup::new(p, "src.raw", tgt)
        .jobs(1)
        .max_chunk("64K")
        .args(&["--retry-delay", "10ms"])
}

fn no_target(p: &Path, tgt: &str) {
    assert!(!p.join(tgt).exists(), "{tgt} left behind");
    assert!(
        !p.join(format!("{tgt}.partial")).exists(),
        "{tgt}.partial left behind"
    );
    assert!(
        !p.join(format!("{tgt}.manifest")).exists(),
        "{tgt}.manifest left behind"
    );
}

fn ranges(doc: &Value) -> Vec<(u64, u64)> {
    doc["ignored_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect()
}

#[test]
fn report_fails_with_4_or_5_and_leaves_nothing() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let (rc, doc, err) = in_order(p, "a.qcow2")
        .inject("source:read:EIO@nth=3")
        .run()
        .into_parts();
    assert_eq!(rc, 4, "{err}");
    assert_eq!(doc["exit_code"], 4);
    assert!(
        err.contains("injected") && err.contains("offset 131072"),
        "{err}"
    );
    no_target(p, "a.qcow2");
    let (rc, _, err) = in_order(p, "b.raw")
        .inject("target:write:EIO@nth=3")
        .run()
        .into_parts();
    assert_eq!(rc, 5, "{err}");
    no_target(p, "b.raw");
    let (rc, _, err) = in_order(p, "c.qcow2")
        .inject("target:flush:EIO")
        .run()
        .into_parts();
    assert_eq!(rc, 5, "{err}");
    no_target(p, "c.qcow2");
}

#[test]
fn ignore_skips_the_failing_clusters_and_exits_3() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let want = std::fs::read(p.join("src.raw")).unwrap();
    // Source read errors on one cluster (every time), in a larger request.
    let mut args = vec![
        "--on-source-error",
        "ignore",
        "--inject",
        "source:read:EIO@1M-1114111",
    ];
    let (rc, doc, err) = json_run(
        p,
        &[
            &["backup", "--jobs", "2"][..],
            &args[..],
            &["src.raw", "a.raw"][..],
        ]
        .concat(),
    );
    assert_eq!(rc, 3, "{err}");
    assert_eq!(ranges(&doc), vec![(1 << 20, (1 << 20) + K64)], "{doc}");
    assert!(
        err.contains("skipped") && err.contains("1048576-1114112"),
        "{err}"
    );
    let got = std::fs::read(p.join("a.raw")).unwrap();
    assert_eq!(got[..1 << 20], want[..1 << 20]);
    assert!(
        got[1 << 20..(1 << 20) + K64 as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(
        got[(1 << 20) + K64 as usize..],
        want[(1 << 20) + K64 as usize..]
    );
    // The manifest says the backup is incomplete; verify says so too (exit 3).
    let (rc, info, _) = json_run(p, &["info", "a.raw"]);
    assert_eq!(rc, 0);
    assert_eq!(info["manifest"]["incomplete"][0][0], 1 << 20);
    let (rc, v, err) = json_run(p, &["verify", "a.raw"]);
    assert_eq!(rc, 3, "{err}");
    assert_eq!(v["incomplete"][0][1], (1 << 20) + K64);
    // Target write errors on one cluster.
    args = vec![
        "--on-target-error",
        "ignore",
        "--inject",
        "target:write:EIO@2M",
    ];
    let (rc, doc, err) = in_order(p, "b.qcow2").args(&args).run().into_parts();
    assert_eq!(rc, 3, "{err}");
    assert_eq!(ranges(&doc), vec![(2 << 20, (2 << 20) + K64)]);
    assert_eq!(doc["ok"], false);
    check_clean(p, "b.qcow2");
}

#[test]
fn retry_recovers_from_transient_errors_and_logs_each_retry() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let (rc, doc, err) = in_order(p, "a.qcow2")
        .inject("source:read:EIO@nth=2,count=2")
        .args(&["--on-source-error", "retry", "--retries", "3"])
        .run()
        .into_parts();
    assert_eq!(rc, 0, "{err}");
    assert_eq!(doc["retries"], 2);
    let ev = doc["retry_events"].as_array().unwrap();
    assert_eq!(ev.len(), 2);
    assert!(
        ev[0]["cause"].as_str().unwrap().contains("injected"),
        "{ev:?}"
    );
    assert_eq!(ev[0]["delay_ms"], 10);
    assert_eq!(ev[1]["delay_ms"], 20, "the delay doubles");
    assert!(
        err.contains("retry 1/3") && err.contains("retry 2/3"),
        "{err}"
    );
    assert!(identical(p, "src.raw", "a.qcow2"));
    // Target side.
    let (rc, doc, err) = in_order(p, "b.raw")
        .inject("target:write:EIO@nth=5,once")
        .args(&["--on-target-error", "retry"])
        .run()
        .into_parts();
    assert_eq!(rc, 0, "{err}");
    assert_eq!(doc["retries"], 1);
    assert!(identical(p, "src.raw", "b.raw"));
}

#[test]
fn retry_gives_up_after_the_last_retry() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let (rc, doc, err) = in_order(p, "a.qcow2")
        .inject("source:read:EIO@3M")
        .args(&["--on-source-error", "retry", "--retries", "2"])
        .run()
        .into_parts();
    assert_eq!(rc, 4, "{err}");
    assert_eq!(err.matches("retry ").count(), 2, "{err}");
    assert_eq!(doc["exit_code"], 4);
    no_target(p, "a.qcow2");
    let (rc, _, err) = in_order(p, "b.raw")
        .inject("target:write:EROFS@3M")
        .args(&["--on-target-error", "retry", "--retries", "1"])
        .run()
        .into_parts();
    assert_eq!(rc, 5, "{err}");
    no_target(p, "b.raw");
}

#[test]
fn enospc_retries_only_no_space() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let (rc, doc, err) = in_order(p, "a.qcow2")
        .inject("target:write:ENOSPC@nth=4,once")
        .args(&["--on-target-error", "enospc"])
        .run()
        .into_parts();
    assert_eq!(rc, 0, "{err}");
    assert_eq!(doc["retries"], 1);
    assert!(identical(p, "src.raw", "a.qcow2"));
    let (rc, doc, err) = in_order(p, "b.qcow2")
        .inject("target:write:EDQUOT@nth=4,once")
        .args(&["--on-target-error", "enospc"])
        .run()
        .into_parts();
    assert_eq!(rc, 0, "{err}");
    assert_eq!(doc["retries"], 1);
    // Any other cause is reported at once.
    let (rc, _, err) = in_order(p, "c.qcow2")
        .inject("target:write:EIO@nth=4,once")
        .args(&["--on-target-error", "enospc"])
        .run()
        .into_parts();
    assert_eq!(rc, 5, "{err}");
    assert!(!err.contains("retry"), "{err}");
    no_target(p, "c.qcow2");
    let (rc, _, err) = in_order(p, "d.qcow2")
        .inject("source:read:EIO@nth=4,once")
        .args(&["--on-source-error", "enospc"])
        .run()
        .into_parts();
    assert_eq!(rc, 4, "{err}");
    no_target(p, "d.qcow2");
}

#[test]
fn a_full_file_system_is_retried_under_enospc_then_exit_5() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 32, 0x3c);
    // A 4 MiB file size limit: writes fail with EFBIG (imgbackup ignores
    // SIGXFSZ itself).
    let o = std::process::Command::new("sh")
        .current_dir(p)
        .arg("-c")
        .arg("ulimit -f 4096; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_imgbackup"))
        .args([
            "backup",
            "--jobs",
            "1",
            "--on-target-error",
            "enospc",
            "--retries",
            "2",
            "--retry-delay",
            "10ms",
            "src.raw",
            "t.qcow2",
        ])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(code(&o), 5, "{err}");
    assert_eq!(err.matches("retry ").count(), 2, "{err}");
    assert!(err.contains("File too large"), "{err}");
    no_target(p, "t.qcow2");
}

#[test]
fn damaged_l2_entry_report_or_ignore() {
    let d = tempdir();
    let p = d.path();
    let src = testdata().join("broken/l2-past-eof.qcow2");
    let s = src.to_str().unwrap();
    let (rc, _, err) = json_run(p, &["backup", s, "a.raw"]);
    assert_eq!(rc, 4, "{err}");
    no_target(p, "a.raw");
    let (rc, doc, err) = json_run(p, &["backup", "--on-source-error", "ignore", s, "b.raw"]);
    assert_eq!(rc, 3, "{err}");
    assert_eq!(ranges(&doc), vec![(0, K64)], "{doc}");
    assert!(err.contains("0-65536"), "{err}");
}

#[test]
fn a_second_imgbackup_on_the_same_image_exits_8() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let mut first = bin()
        .current_dir(p)
        .args(["backup", "-q", "--speed", "4M", "src.raw", "a.raw"])
        .spawn()
        .unwrap();
    wait_for(&p.join("a.raw.partial"));
    let o = run_in(p, &["backup", "src.raw", "b.raw"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("locked by another imgbackup"),
        "{}",
        stderr(&o)
    );
    no_target(p, "b.raw");
    // While imgbackup reads the image, a writer cannot get QEMU's write lock.
    let w = std::process::Command::new("qemu-io")
        .current_dir(p)
        .args(["-f", "raw", "-c", "write 0 4k", "src.raw"])
        .output()
        .unwrap();
    assert!(!w.status.success());
    assert!(String::from_utf8_lossy(&w.stderr).contains("Failed to get \"write\" lock"));
    // qemu-img's own read-only inspection still works, as with qemu-img.
    qemu_img(p, &["info", "src.raw"]);
    // --wait-lock waits for the first to finish.
    let o = run_in(
        p,
        &["backup", "-q", "--wait-lock", "30s", "src.raw", "c.raw"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(first.wait().unwrap().success());
    assert!(identical(p, "src.raw", "a.raw") && identical(p, "src.raw", "c.raw"));
}

#[test]
fn an_image_a_qemu_holds_writable_exits_8_unless_force_share() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let sock = p.join("nbd.sock");
    let mut qsd = std::process::Command::new("qemu-storage-daemon")
        .current_dir(p)
        .args([
            "--blockdev",
            "driver=file,filename=src.raw,node-name=file0",
            "--blockdev",
            "driver=raw,file=file0,node-name=fmt0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            "type=nbd,id=exp0,node-name=fmt0,writable=on",
        ])
        .spawn()
        .unwrap();
    wait_for(&sock);
    let o = run_in(p, &["backup", "src.raw", "a.raw"]);
    let o2 = run_in(p, &["backup", "-q", "--force-share", "src.raw", "b.raw"]);
    qsd.kill().ok();
    qsd.wait().ok();
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("held open for writing") && stderr(&o).contains("--force-share"),
        "{}",
        stderr(&o)
    );
    no_target(p, "a.raw");
    assert_eq!(code(&o2), 0, "{}", stderr(&o2));
    assert!(identical(p, "src.raw", "b.raw"));
}

#[test]
fn signals_at_random_moments_cancel_cleanly() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 16, 0x3c);
    let before = sha256_file(&p.join("src.raw"));
    let mut seed = 12345u64;
    for i in 0..8 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(50 + (seed >> 33) % 1200);
        let (sig, want) = if i % 2 == 0 {
            (libc::SIGINT, 130)
        } else {
            (libc::SIGTERM, 143)
        };
        let tgt = format!("t{i}.{}", if i % 3 == 0 { "raw" } else { "qcow2" });
        let mut args = vec!["backup", "-q", "--speed", "8M"];
        if i % 4 == 1 {
            args.extend(["--guest", "iops=200,bs=4K-64K,threads=2"]);
        }
        args.extend(["src.raw", &tgt]);
        let child = bin()
            .current_dir(p)
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let rc = code(&o);
        if rc == 0 {
            // The signal came after the backup was complete.
            assert!(identical(p, "src.raw", &tgt));
        } else {
            assert_eq!(rc, want, "round {i}, after {delay:?}: {}", stderr(&o));
            no_target(p, &tgt);
        }
    }
    assert_eq!(sha256_file(&p.join("src.raw")), before);
}

#[test]
fn policies_and_the_bitmap_afterwards() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let (rc, _, err) = json_run(p, &["backup", "--bitmap", "b0", "src.raw", "full.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = json_run(p, &["guest", "src.raw", "iops=0,count=20,bs=64K,seed=11"]);
    assert_eq!(rc, 0, "{err}");
    let dirty = |p: &Path| -> (u64, Value) {
        let (_, s, _) = json_run(p, &["bitmap", "show", "src.raw", "b0"]);
        (
            s["dirty_granules"].as_u64().unwrap(),
            s["dirty_ranges"].clone(),
        )
    };
    let (before, ranges) = dirty(p);
    assert!(before > 2);
    let second = ranges[1][0].as_u64().unwrap();
    let inc = ["--sync", "incremental", "--bitmap", "b0"];
    // (extra arguments, expected exit, expected dirty clusters afterwards)
    let cases: Vec<(Vec<String>, i32, u64)> = vec![
        (
            vec!["--inject".into(), "source:read:EIO@nth=2".into()],
            4,
            before,
        ),
        (
            vec!["--inject".into(), "target:write:EIO@nth=2".into()],
            5,
            before,
        ),
        (
            vec![
                "--on-target-error".into(),
                "enospc".into(),
                "--inject".into(),
                "target:write:EIO@nth=2,once".into(),
            ],
            5,
            before,
        ),
        (
            vec![
                "--on-source-error".into(),
                "retry".into(),
                "--inject".into(),
                "source:read:EIO@nth=2,once".into(),
            ],
            0,
            0,
        ),
        (
            vec![
                "--on-target-error".into(),
                "enospc".into(),
                "--inject".into(),
                "target:write:ENOSPC@nth=2,once".into(),
            ],
            0,
            0,
        ),
        (
            vec![
                "--on-target-error".into(),
                "ignore".into(),
                "--inject".into(),
                format!("target:write:EIO@{second}"),
            ],
            3,
            1,
        ),
    ];
    for (i, (extra, want_rc, want_dirty)) in cases.into_iter().enumerate() {
        // Each case starts from the same bitmap: rebuild it against the full backup.
        let (rc, _, err) = json_run(
            p,
            &[
                "bitmap",
                "rebuild",
                "src.raw",
                "b0",
                "--against-backup",
                "full.qcow2",
            ],
        );
        assert_eq!(rc, 0, "{err}");
        assert_eq!(dirty(p).0, before);
        let tgt = format!("inc{i}.qcow2");
        let mut a: Vec<&str> = inc.to_vec();
        a.extend(extra.iter().map(String::as_str));
        let (rc, doc, err) = in_order(p, &tgt).args(&a).run().into_parts();
        assert_eq!(rc, want_rc, "case {i} {extra:?}: {err}");
        assert_eq!(
            dirty(p).0,
            want_dirty,
            "case {i} {extra:?}: bitmap afterwards"
        );
        if want_rc == 4 || want_rc == 5 {
            no_target(p, &tgt);
        } else {
            assert!(p.join(&tgt).exists());
            if want_rc == 3 {
                assert_eq!(doc["ignored_ranges"][0][0], second);
                assert_eq!(dirty(p).1[0][0], second);
            }
        }
    }
}
