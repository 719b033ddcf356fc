//! Copy-before-write end to end: a simulated guest writes while the backup
//! runs; the backup must equal the source as it was at the start.

use crate::fixture::*;
use serde_json::Value;

fn check_guest_report(doc: &Value, want_writes: u64) {
    let g = &doc["guest"];
    let writes = g["writes"].as_u64().unwrap();
    let failed = g["failed_writes"].as_u64().unwrap();
    assert_eq!(writes + failed, want_writes, "{g}");
    let l = &g["latency_ms"];
    assert_eq!(l["count"].as_u64().unwrap(), want_writes, "{l}");
    let (p50, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(p50 >= 0.0 && p50 <= p99 && p99 <= max, "{l}");
    assert!(max < 60_000.0, "{l}");
}

/// Seeded cases: (seed, threads, bs, size MiB, jobs).
fn cases(seed0: u64) -> Vec<(u64, u64, String, u64, u64)> {
    let bss = [
        "512",
        "4K",
        "64K",
        "256K",
        "512-256K",
        "1000-5000",
        "333-70000",
        "4K-64K",
    ];
    (0..4)
        .map(|i| {
            let s = seed0 * 100 + i;
            let threads = 1 + s % 4;
            let bs = bss[((s * 7 + 3) % bss.len() as u64) as usize].to_string();
            let size = 4 + (s * 5) % 13;
            let jobs = if i % 2 == 0 { 1 } else { 4 };
            (s, threads, bs, size, jobs)
        })
        .collect()
}

fn property(src_ext: &str, tgt_ext: &str, seed0: u64) {
    let d = tempdir();
    let p = d.path();
    for (seed, threads, bs, size, jobs) in cases(seed0) {
        let src = format!("src{seed}.{src_ext}");
        data_disk(p, &src, size);
        let before = sha256_file(&p.join(&src));
        let tgt = format!("t{seed}.{tgt_ext}");
        let count = 150 + seed % 200;
        let spec = format!(
            "iops=0,threads={threads},bs={bs},seed={seed},count={count},pattern=random,zero=20"
        );
        // Throttle the job so the guest runs ahead of it.
        let speed = format!("{}M", size * 2);
        let doc = Backup::new(p, &src, &tgt)
            .jobs(jobs)
            .speed(speed)
            .guest(spec)
            .ok();
        assert!(
            identical(p, &src, &tgt),
            "case seed={seed} threads={threads} bs={bs} size={size}M jobs={jobs}: target differs"
        );
        if tgt_ext == "qcow2" {
            check_clean(p, &tgt);
        }
        check_guest_report(&doc, count);
        assert!(
            doc["copy_before_write_copies"].as_u64().unwrap() > 0,
            "no copy-before-write happened: {doc}"
        );
        assert_eq!(sha256_file(&p.join(&src)), before, "source changed");
    }
}

#[test]
fn point_in_time_raw_to_raw() {
    property("raw", "raw", 1);
}

#[test]
fn point_in_time_raw_to_qcow2() {
    property("raw", "qcow2", 2);
}

#[test]
fn point_in_time_qcow2_to_raw() {
    property("qcow2", "raw", 3);
}

#[test]
fn point_in_time_qcow2_to_qcow2() {
    property("qcow2", "qcow2", 4);
}

#[test]
fn guest_that_rewrites_everything_first_still_gives_the_start() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    // 128 clusters of 64K: the guest rewrites every one, in order, long
    // before the throttled job reaches them.
    let doc = Backup::new(p, "src.raw", "t.raw")
        .jobs(1)
        .speed("1M")
        .max_chunk("64K")
        .guest("iops=0,bs=64K,pattern=sequential,count=128")
        .args(&["--guest-overlay", "guest.qcow2"])
        .ok();
    assert!(
        identical(p, "src.raw", "t.raw"),
        "target is not the image at the start"
    );
    let cbw = doc["copy_before_write_copies"].as_u64().unwrap();
    assert!(
        cbw >= 120,
        "expected nearly every cluster copied before write, got {cbw}"
    );
    assert_eq!(
        doc["copy_before_write_bytes"].as_u64().unwrap(),
        cbw * 65536
    );
    // The guest really wrote: its overlay differs from the source everywhere.
    check_clean(p, "guest.qcow2");
    let map = map_json(p, "guest.qcow2");
    let own: u64 = map
        .iter()
        .filter(|e| e["depth"] == 0)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(own, 8 << 20);
    assert!(!identical(p, "src.raw", "guest.qcow2"));
}

#[test]
fn progress_counts_copy_before_write_as_it_happens() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    let o = bin()
        .current_dir(p)
        .env("IMGBACKUP_PROGRESS_INTERVAL", "200ms")
        .args([
            "backup",
            "--progress",
            "plain",
            "--jobs",
            "1",
            "--speed",
            "1M",
            "--max-chunk",
            "64K",
            "--guest",
            "iops=50,bs=64K,pattern=sequential,threads=1",
            "src.raw",
            "t.raw",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // The guest (50 clusters/s) outruns the job (16 clusters/s): progress
    // grows faster than the rate limit alone allows.
    let pcts: Vec<f64> = stderr(&o)
        .lines()
        .filter_map(|l| {
            l.split_once("backup ")
                .and_then(|(_, r)| r.split('%').next()?.trim().parse().ok())
        })
        .collect();
    assert!(pcts.len() >= 4, "{}", stderr(&o));
    let first = pcts[1];
    assert!(
        first > 1.0,
        "progress did not move with copy-before-write: {pcts:?}"
    );
    assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");
    assert!(identical(p, "src.raw", "t.raw"));
}

#[test]
fn failed_copy_before_write_breaks_the_guest_write_by_default() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    // Thread 1 of 2 starts writing at 4M; the copy of that cluster fails once.
    let doc = Backup::new(p, "src.raw", "t.raw")
        .jobs(1)
        .speed("4M")
        .guest("iops=0,bs=4K,pattern=sequential,threads=2,count=2")
        .inject("target:write:EIO@4M,once")
        .args(&["--cbw-cache", "0", "--guest-overlay", "g.qcow2"])
        .ok();
    let g = &doc["guest"];
    assert_eq!(g["failed_writes"], 1, "{g}");
    assert!(
        g["first_error"].as_str().unwrap().contains("injected"),
        "{g}"
    );
    // The snapshot stayed intact: the job copied the cluster later.
    assert!(identical(p, "src.raw", "t.raw"));
    // The refused write did not land in the guest's disk.
    let guest = raw_content(p, "g.qcow2");
    let src = std::fs::read(p.join("src.raw")).unwrap();
    assert_eq!(
        guest[4 << 20..(4 << 20) + 4096],
        src[4 << 20..(4 << 20) + 4096]
    );
    assert_ne!(guest[..4096], src[..4096], "thread 0's write landed");
}

#[test]
fn failed_copy_before_write_with_break_snapshot_fails_the_job() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    for tgt in ["t.raw", "t.qcow2"] {
        let o = run_in(
            p,
            &[
                "backup",
                "--jobs",
                "1",
                "--speed",
                "4M",
                "--guest",
                "iops=0,bs=4K,pattern=sequential,threads=2,count=2",
                "--cbw-cache",
                "0",
                "--on-cbw-error",
                "break-snapshot",
                "--inject",
                "target:write:EIO@4M,once",
                "src.raw",
                tgt,
            ],
        );
        assert_eq!(code(&o), 5, "{}", stderr(&o));
        assert!(stderr(&o).contains("injected"), "{}", stderr(&o));
        assert!(!p.join(tgt).exists() && !p.join(format!("{tgt}.partial")).exists());
    }
}

#[test]
fn cbw_timeout_bounds_the_guest_wait() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 8);
    // Every target write takes 300 ms; a guest write may wait 50 ms.
    let doc = Backup::new(p, "src.raw", "t.raw")
        .jobs(1)
        .max_chunk("64K")
        .guest("iops=0,bs=4K,pattern=sequential,threads=2,count=4")
        .inject("target:write:EIO@4M-5M,count=1,delay=300ms")
        .args(&["--cbw-cache", "0", "--cbw-timeout", "50ms"])
        .ok();
    let g = &doc["guest"];
    assert!(g["failed_writes"].as_u64().unwrap() >= 1, "{g}");
    assert!(identical(p, "src.raw", "t.raw"));
}

#[test]
fn fleecing_copies_exactly_what_the_guest_overwrites() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.qcow2", 16);
    let before = sha256_file(&p.join("src.qcow2"));
    let doc = Backup::new(p, "src.qcow2", "fleece.qcow2")
        .sync("none")
        .guest("iops=0,bs=512-128K,threads=3,seed=5,count=300,zero=30")
        .verify()
        .args(&["--guest-overlay", "g.qcow2"])
        .ok();
    assert_eq!(doc["sync"], "none");
    assert_eq!(doc["verified"], true);
    check_guest_report(&doc, 300);
    check_clean(p, "fleece.qcow2");
    let info = info_json(p, "fleece.qcow2");
    assert_eq!(info["backing-filename"], "src.qcow2");
    assert!(
        identical(p, "src.qcow2", "fleece.qcow2"),
        "fleece + backing is not the source at the start"
    );
    // Its own clusters are exactly the clusters the guest wrote.
    let own = |img: &str| -> Vec<(u64, u64)> {
        map_json(p, img)
            .iter()
            .filter(|e| e["depth"] == 0)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect()
    };
    let mut a = own("fleece.qcow2");
    let mut b = own("g.qcow2");
    merge(&mut a);
    merge(&mut b);
    assert!(!a.is_empty());
    assert_eq!(a, b, "fleecing target vs guest overlay");
    assert_eq!(
        doc["copy_before_write_bytes"].as_u64().unwrap(),
        a.iter().map(|r| r.1).sum::<u64>()
    );
    assert_eq!(sha256_file(&p.join("src.qcow2")), before);
}

fn merge(v: &mut Vec<(u64, u64)>) {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, l) in v.iter() {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l)),
        }
    }
    *v = out;
}

#[test]
fn verify_and_usage_rules() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 4);
    let doc = Backup::new(p, "src.raw", "t.qcow2")
        .verify()
        .guest("iops=0,count=50")
        .ok();
    assert_eq!(doc["verified"], true);
    // sync none needs a bounded guest and a qcow2 target.
    for (args, msg) in [
        (
            vec!["--sync", "none", "src.raw", "f.qcow2"],
            "needs --guest",
        ),
        (
            vec!["--sync", "none", "--guest", "iops=10", "src.raw", "f.qcow2"],
            "count= or duration=",
        ),
        (
            vec![
                "--sync",
                "none",
                "--output-format",
                "raw",
                "--guest",
                "count=1",
                "src.raw",
                "f.raw",
            ],
            "qcow2",
        ),
        (
            vec!["--guest-overlay", "x.qcow2", "src.raw", "f.raw"],
            "--guest",
        ),
        (vec!["--cbw-timeout", "1s", "src.raw", "f.raw"], "--guest"),
        (
            vec!["--guest", "pattern=zigzag", "src.raw", "f.raw"],
            "pattern",
        ),
        (
            vec!["--inject", "disk:read:EIO", "src.raw", "f.raw"],
            "unknown node",
        ),
    ] {
        let mut a = vec!["backup"];
        a.extend(args.iter().copied());
        let o = run_in(p, &a);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn first_difference_finds_the_offset() {
    use imgbackup::node::raw::RawNode;
    let d = tempdir();
    let p = d.path();
    let mut a = vec![7u8; 5 << 20];
    std::fs::write(p.join("a.raw"), &a).unwrap();
    a[(4 << 20) + 12345] = 8;
    std::fs::write(p.join("b.raw"), &a).unwrap();
    let na = RawNode::open(&p.join("a.raw")).unwrap();
    let nb = RawNode::open(&p.join("b.raw")).unwrap();
    let off =
        imgbackup::compare::first_difference(&na, &nb, &imgbackup::job::cancel::Cancel::new())
            .unwrap();
    assert_eq!(off, Some((4 << 20) + 12345));
    assert_eq!(
        imgbackup::compare::first_difference(&na, &na, &imgbackup::job::cancel::Cancel::new())
            .unwrap(),
        None
    );
}

#[test]
fn the_cbw_cache_keeps_the_point_in_time_and_its_bound() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "src.raw", 16);
    // Small cache, a fast guest, a slow job: the cache fills and drains.
    let doc = Backup::new(p, "src.raw", "t.qcow2")
        .jobs(2)
        .speed("4M")
        .guest("iops=0,threads=3,bs=4K-128K,count=400,seed=21")
        .args(&["--cbw-cache", "512K"])
        .ok();
    assert!(identical(p, "src.raw", "t.qcow2"));
    let peak = doc["cbw_cache_peak_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 512 << 10, "peak {peak}");
    assert!(doc["copy_before_write_copies"].as_u64().unwrap() > 0);
    check_guest_report(&doc, 400);
    // A transient target failure while draining is retried from the cache.
    let doc = Backup::new(p, "src.raw", "t2.raw")
        .jobs(1)
        .speed("2M")
        .guest("iops=0,bs=64K,pattern=sequential,threads=2,count=8")
        .inject("target:write:EIO@8M,once")
        .args(&[
            "--cbw-cache",
            "8M",
            "--on-target-error",
            "retry",
            "--retry-delay",
            "10ms",
        ])
        .ok();
    assert_eq!(doc["retries"], 1, "{doc}");
    let ev = doc["retry_events"].as_array().unwrap();
    assert_eq!(ev.len(), 1, "the drain's retry is in the summary: {doc}");
    assert_eq!(ev[0]["offset"], 8 << 20);
    assert_eq!(doc["guest"]["failed_writes"], 0);
    assert!(identical(p, "src.raw", "t2.raw"));
    // A permanent one fails the job: the cache held the only copy.
    let o = run_in(
        p,
        &[
            "backup",
            "--jobs",
            "1",
            "--speed",
            "2M",
            "--cbw-cache",
            "8M",
            "--guest",
            "iops=0,bs=64K,pattern=sequential,threads=2,count=8",
            "--inject",
            "target:write:EIO@8M",
            "src.raw",
            "t3.raw",
        ],
    );
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(!p.join("t3.raw").exists() && !p.join("t3.raw.partial").exists());
}
