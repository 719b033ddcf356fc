//! backup --sync full end to end, with qemu-img as the oracle.

use crate::fixture::*;

#[test]
fn every_format_pair_is_byte_exact() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "src.raw", "16M");
    make_qcow2(p, "src.qcow2", "");
    let raw_sum = sha256_file(&p.join("src.raw"));
    let q_sum = sha256_file(&p.join("src.qcow2"));
    for (src, tgt) in [
        ("src.raw", "raw-to.raw"),
        ("src.raw", "raw-to.qcow2"),
        ("src.qcow2", "q-to.raw"),
        ("src.qcow2", "q-to.qcow2"),
    ] {
        Backup::new(p, src, tgt).ok();
        assert!(identical(p, src, tgt), "{src} -> {tgt} differs");
        let info = info_json(p, tgt);
        let want = if tgt.ends_with(".qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        assert_eq!(info["format"], want, "{tgt}");
        if want == "qcow2" {
            check_clean(p, tgt);
        }
        assert!(!p.join(format!("{tgt}.partial")).exists());
    }
    assert_eq!(
        sha256_file(&p.join("src.raw")),
        raw_sum,
        "raw source changed"
    );
    assert_eq!(
        sha256_file(&p.join("src.qcow2")),
        q_sum,
        "qcow2 source changed"
    );
}

#[test]
fn explicit_target_format_overrides_the_extension() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    Backup::new(p, "src.qcow2", "out.img")
        .output_format("qcow2")
        .ok();
    assert_eq!(info_json(p, "out.img")["format"], "qcow2");
    check_clean(p, "out.img");
    assert!(identical(p, "src.qcow2", "out.img"));
    Backup::new(p, "src.qcow2", "out2.qcow2")
        .output_format("raw")
        .ok();
    assert_eq!(info_json(p, "out2.qcow2")["format"], "raw");
    assert!(identical_fmt(p, "src.qcow2", "qcow2", "out2.qcow2", "raw"));
}

#[test]
fn sparse_source_gives_sparse_targets() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-f", "raw", "sparse.raw", "1G"]);
    qemu_io(
        p,
        "raw",
        "sparse.raw",
        &[
            "write -P 0x1 0 1M",
            "write -P 0x2 300M 1M",
            "write -P 0x3 700M 1M",
            "write -P 0x4 1023M 1M",
        ],
    );
    let doc = Backup::new(p, "sparse.raw", "t.raw").ok();
    assert_eq!(doc["bytes_copied"], 4 << 20);
    assert_eq!(doc["bytes_skipped_zero"], (1u64 << 30) - (4 << 20));
    assert_eq!(doc["virtual_size"], 1u64 << 30);
    assert!(
        disk_usage(&p.join("t.raw")) < 16 << 20,
        "raw target not sparse"
    );
    assert_eq!(std::fs::metadata(p.join("t.raw")).unwrap().len(), 1 << 30);
    assert!(identical(p, "sparse.raw", "t.raw"));

    // raw -> raw without a manifest copies inside the kernel; still sparse.
    Backup::new(p, "sparse.raw", "k.raw")
        .args(&["--no-manifest"])
        .ok();
    assert!(
        disk_usage(&p.join("k.raw")) < 16 << 20,
        "kernel-copied target not sparse"
    );
    assert!(identical(p, "sparse.raw", "k.raw"));

    Backup::new(p, "sparse.raw", "t.qcow2").ok();
    assert!(
        std::fs::metadata(p.join("t.qcow2")).unwrap().len() < 16 << 20,
        "qcow2 target too large"
    );
    check_clean(p, "t.qcow2");
    assert!(identical(p, "sparse.raw", "t.qcow2"));
}

#[test]
fn all_zero_data_is_not_written() {
    let d = tempdir();
    let p = d.path();
    // Allocated clusters that hold zeros (written as data, not as zero flags).
    qemu_img(p, &["create", "-f", "qcow2", "z.qcow2", "8M"]);
    qemu_io(
        p,
        "qcow2",
        "z.qcow2",
        &["write -P 0 0 4M", "write -P 0x9 4M 64k"],
    );
    let doc = Backup::new(p, "z.qcow2", "z-out.qcow2").ok();
    assert_eq!(doc["bytes_copied"], 65536);
    check_clean(p, "z-out.qcow2");
    assert!(identical(p, "z.qcow2", "z-out.qcow2"));
    let allocated: u64 = map_json(p, "z-out.qcow2")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(allocated, 65536, "only the non-zero cluster is allocated");
}

#[test]
fn jobs_chunk_and_cluster_sizes_give_the_same_image() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "cluster_size=4096");
    for (i, extra) in [
        vec!["--jobs", "1", "--max-chunk", "64K"],
        vec![
            "--jobs",
            "4",
            "--max-chunk",
            "4K",
            "--granularity",
            "4K",
            "--output-cluster-size",
            "4K",
        ],
        vec!["--jobs", "3", "--max-chunk", "7M"],
        vec!["--output-cluster-size", "2M"],
        vec![
            "--output-cluster-size",
            "512",
            "--granularity",
            "512",
            "--max-chunk",
            "1536",
        ],
    ]
    .iter()
    .enumerate()
    {
        let tgt = format!("out{i}.qcow2");
        Backup::new(p, "src.qcow2", &tgt).args(extra).ok();
        check_clean(p, &tgt);
        assert!(identical(p, "src.qcow2", &tgt), "{extra:?}");
        let info = info_json(p, &tgt);
        let want_cs = extra
            .iter()
            .position(|a| *a == "--output-cluster-size")
            .map(|i| crate::fixture::parse_size(extra[i + 1]))
            .unwrap_or(65536);
        assert_eq!(info["cluster-size"], want_cs, "{extra:?}");
    }
}

#[test]
fn existing_target_needs_force() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "src.raw", "4M");
    std::fs::write(p.join("old.raw"), b"previous backup").unwrap();
    let o = run_in(p, &["backup", "src.raw", "old.raw"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("already exists") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(p.join("old.raw")).unwrap(),
        b"previous backup"
    );
    Backup::new(p, "src.raw", "old.raw").force().ok();
    assert!(identical(p, "src.raw", "old.raw"));
}

#[test]
fn target_equal_to_source_is_refused_even_with_force() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "src.raw", "4M");
    let before = sha256_file(&p.join("src.raw"));
    let o = run_in(p, &["backup", "--force", "src.raw", "./src.raw"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("the source image"), "{}", stderr(&o));
    assert_eq!(sha256_file(&p.join("src.raw")), before);
}

#[test]
fn dry_run_writes_nothing() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    let o = run_ok(p, &["backup", "--dry-run", "src.qcow2", "out.qcow2"]);
    assert!(stderr(&o).contains("dry run"), "{}", stderr(&o));
    assert!(!p.join("out.qcow2").exists() && !p.join("out.qcow2.partial").exists());
    let o = run_ok(
        p,
        &["backup", "--dry-run", "--json", "src.qcow2", "out.qcow2"],
    );
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["dry_run"], true);
    // Data clusters of make_qcow2: 0..320K, 5M+64K, 15M+1M (the 777 bytes at
    // 12345 fall into the first cluster).
    assert_eq!(doc["bytes_copied"], (320 << 10) + (64 << 10) + (1 << 20));
    assert!(!p.join("out.qcow2").exists());
}

#[test]
fn keep_partial_keeps_the_partial_file_on_failure() {
    let d = tempdir();
    let p = d.path();
    let src = testdata().join("broken/l2-past-eof.qcow2");
    let src = src.to_str().unwrap();
    let o = run_in(p, &["backup", src, "out.raw"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(!p.join("out.raw").exists() && !p.join("out.raw.partial").exists());
    let o = run_in(p, &["backup", "--keep-partial", src, "out.raw"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(!p.join("out.raw").exists());
    assert!(p.join("out.raw.partial").exists(), "partial kept");
}

#[test]
fn json_summary_is_the_only_stdout() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "src.qcow2", "");
    let o = run_ok(
        p,
        &[
            "backup",
            "--json",
            "--progress",
            "plain",
            "src.qcow2",
            "out.raw",
        ],
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["sync"], "full");
    assert_eq!(doc["target_format"], "raw");
    let copied = doc["bytes_copied"].as_u64().unwrap();
    let zero = doc["bytes_skipped_zero"].as_u64().unwrap();
    assert_eq!(copied + zero, 16 << 20);
    assert!(doc["elapsed_seconds"].as_f64().unwrap() >= 0.0);
    // A failure with --json is a JSON document too.
    let o = run_in(p, &["backup", "--json", "missing.qcow2", "x.raw"]);
    assert_eq!(code(&o), 1);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("error document");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["exit_code"], 1);
}

#[test]
fn plain_progress_prints_lines_for_logs() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 8, 0x3);
    let o = bin()
        .current_dir(p)
        .env("IMGBACKUP_PROGRESS_INTERVAL", "300ms")
        .args([
            "backup",
            "--progress",
            "plain",
            "--speed",
            "8M",
            "src.raw",
            "out.raw",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines = stderr(&o)
        .lines()
        .filter(|l| l.contains("backup") && l.contains('%'))
        .count();
    assert!(lines >= 2, "expected progress lines: {}", stderr(&o));
    // Under `auto` with stderr not a terminal: no progress at all.
    let o = run_in(
        p,
        &["backup", "--force", "--speed", "16M", "src.raw", "out.raw"],
    );
    assert!(!stderr(&o).contains('%'), "{}", stderr(&o));
}

#[test]
fn speed_limits_throughput() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 6, 0x3);
    let t = std::time::Instant::now();
    let o = run_in(
        p,
        &[
            "backup",
            "-q",
            "--speed",
            "4M",
            "--max-chunk",
            "256K",
            "src.raw",
            "out.raw",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // 6 MiB at 4 MiB/s with a one-second burst allowance: at least ~0.5 s.
    assert!(
        t.elapsed().as_secs_f64() >= 0.45,
        "--speed had no effect: {:?}",
        t.elapsed()
    );
    assert!(identical(p, "src.raw", "out.raw"));
}

#[test]
fn info_reports_format_sizes_and_chain() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "base.raw", "8M");
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
            "12M",
        ],
    );
    qemu_io(
        p,
        "qcow2",
        "top.qcow2",
        &["write -P 0x1 0 128k", "write -z 1M 64k"],
    );
    let o = run_in(p, &["info", "--json", "top.qcow2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let q = info_json(p, "top.qcow2");
    assert_eq!(doc["format"], "qcow2");
    assert_eq!(doc["virtual_size"], q["virtual-size"]);
    assert_eq!(doc["cluster_size"], q["cluster-size"]);
    assert_eq!(doc["allocation"]["data"], 128 << 10);
    assert_eq!(doc["allocation"]["zero"], 64 << 10);
    let chain = doc["backing_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1]["format"], "raw");
    assert_eq!(chain[1]["virtual_size"], 8 << 20);
    assert_eq!(chain[0]["backing_file"], "base.raw");
    let o = run_in(p, &["info", "top.qcow2"]);
    let text = stdout(&o);
    assert!(
        text.contains("qcow2") && text.contains("base.raw") && text.contains("12.00 MiB"),
        "{text}"
    );
}

#[test]
fn raw_with_odd_size_reads_like_qemu() {
    let d = tempdir();
    let p = d.path();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(p.join("odd.raw"), &data).unwrap();
    Backup::new(p, "odd.raw", "odd-out.qcow2").ok();
    check_clean(p, "odd-out.qcow2");
    assert!(identical(p, "odd.raw", "odd-out.qcow2"));
    assert_eq!(info_json(p, "odd-out.qcow2")["virtual-size"], 1024);
}

#[test]
fn compressed_targets_are_valid_and_exact() {
    let d = tempdir();
    let p = d.path();
    // Compressible data, incompressible data, zeros, and an odd tail.
    qemu_img(p, &["create", "-f", "raw", "src.raw", "8388608"]);
    qemu_io(
        p,
        "raw",
        "src.raw",
        &["write -P 0x41 0 3M", "write -P 0x42 5M 64k"],
    );
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("src.raw"))
            .unwrap();
        f.write_all_at(&noise, 6 << 20).unwrap();
    }
    for (tgt, extra) in [
        ("c.qcow2", vec![]),
        (
            "c4k.qcow2",
            vec!["--output-cluster-size", "4K", "--granularity", "64K"],
        ),
        ("c2m.qcow2", vec!["--output-cluster-size", "2M"]),
    ] {
        let mut a = vec!["backup", "-q", "--compress"];
        a.extend(extra);
        a.extend(["src.raw", tgt]);
        let o = run_in(p, &a);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        check_clean(p, tgt);
        assert!(identical(p, "src.raw", tgt), "{tgt}");
        let map = map_json(p, tgt);
        assert!(
            map.iter().any(|e| e["compressed"] == true),
            "{tgt}: nothing compressed"
        );
        let o = run_in(p, &["verify", tgt]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    // Much smaller than the data it holds.
    assert!(std::fs::metadata(p.join("c.qcow2")).unwrap().len() < (1 << 20) + (512 << 10));
    let o = run_in(p, &["backup", "--compress", "src.raw", "c.raw"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

#[test]
fn a_terabyte_sparse_image_backs_up_exactly() {
    // Claims over holes grow to the hole: a terabyte of nothing costs its
    // extents. The copy must stay exact around the data.
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-q", "-f", "qcow2", "big.qcow2", "1T"]);
    qemu_io(
        p,
        "qcow2",
        "big.qcow2",
        &[
            "write -P 1 0 1M",
            "write -P 2 100G 64k",
            "write -z 200G 1M",
            "write -P 3 1023G 1M",
            "write -P 4 1099511562240 65536",
        ],
    );
    for tgt in ["t.qcow2", "t.raw"] {
        let doc = Backup::new(p, "big.qcow2", tgt)
            .args(&["--no-manifest"])
            .ok();
        assert_eq!(doc["bytes_copied"], (2 << 20) + 2 * 65536, "{tgt}: {doc}");
        assert!(identical(p, "big.qcow2", tgt), "{tgt} differs");
    }
    check_clean(p, "t.qcow2");
    assert!(
        disk_usage(&p.join("t.raw")) < 64 << 20,
        "the raw target is not sparse"
    );
    // With the manifest: its size follows the 34 data chunks (a version 1
    // manifest held 512 MiB of digests), and verify agrees with it.
    let doc = Backup::new(p, "big.qcow2", "m.qcow2").ok();
    assert_eq!(doc["bytes_copied"], (2 << 20) + 2 * 65536, "{doc}");
    let len = std::fs::metadata(p.join("m.qcow2.manifest")).unwrap().len();
    assert!(len < 8192, "a manifest of {len} bytes");
    let (rc, info, err) = json_run(p, &["info", "m.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(info["manifest"]["data_chunks"], 34, "{info}");
    assert_eq!(info["manifest"]["format_version"], 2);
    let (rc, v, err) = json_run(p, &["verify", "m.qcow2"]);
    assert_eq!((rc, &v["ok"]), (0, &serde_json::json!(true)), "{err}");
    qemu_io(p, "qcow2", "m.qcow2", &["write -P 9 500G 4k"]);
    let o = run_in(p, &["verify", "m.qcow2"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("offset {}", 500u64 << 30)),
        "{}",
        stderr(&o)
    );
}

#[test]
fn compressed_pieces_fill_the_rest_of_a_host_cluster_an_uncompressed_one_cut_short() {
    // Groups of six clusters: one incompressible (written as it is), then
    // five that compress to about 60 % (big), 30 % (mid) and 19 % (small,
    // three) of a cluster. The uncompressed cluster takes the host cluster
    // behind the one compressed pieces were filling; QEMU leaves the rest
    // of that one unused once a piece does not fit there, imgbackup packs
    // later pieces that fit (about a sixth fewer host clusters here), and
    // qemu-img reads every piece where it went.
    let d = tempdir();
    let p = d.path();
    const CS: usize = 64 << 10;
    const GROUPS: usize = 40;
    let mut data = Vec::with_capacity(GROUPS * 6 * CS);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut random = |n: usize| {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&next().to_le_bytes());
        }
        v.truncate(n);
        v
    };
    // Words and numbers below `modulus`, one per line.
    let text = |seed: u64, modulus: u64| {
        let mut v = Vec::with_capacity(CS + 32);
        let mut y = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        while v.len() < CS {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            let word = ["before", "write", "cluster", "bitmap"][(y >> 62) as usize];
            v.extend_from_slice(format!("{word} {}\n", (y >> 20) % modulus).as_bytes());
        }
        v.truncate(CS);
        v
    };
    for g in 0..GROUPS as u64 {
        data.extend_from_slice(&random(CS));
        data.extend_from_slice(&random(CS / 2));
        data.extend_from_slice(&text(g * 8 + 1, 100)[..CS / 2]);
        data.extend_from_slice(&text(g * 8 + 2, 1_000_000));
        for k in 3..6 {
            data.extend_from_slice(&text(g * 8 + k, 100));
        }
    }
    std::fs::write(p.join("mixed.raw"), &data).unwrap();
    let size = |f: &str| std::fs::metadata(p.join(f)).unwrap().len();
    for (compress, qemu_opts) in [
        ("--compress", vec![]),
        ("--compress=zstd", vec!["-o", "compression_type=zstd"]),
    ] {
        let q = format!("q{}.qcow2", qemu_opts.len());
        qemu_img(
            p,
            &[
                &["convert", "-c"][..],
                &qemu_opts,
                &["-O", "qcow2", "mixed.raw", &q],
            ]
            .concat(),
        );
        let tgt = format!("ours{}.qcow2", qemu_opts.len());
        Backup::new(p, "mixed.raw", &tgt)
            .args(&[compress, "--no-manifest"])
            .jobs("1")
            .ok();
        check_clean(p, &tgt);
        assert!(identical(p, "mixed.raw", &tgt), "{tgt}");
        let map = map_json(p, &tgt);
        let plain = map
            .iter()
            .filter(|e| e["data"] == true && e["compressed"] == false)
            .map(|e| e["length"].as_u64().unwrap())
            .sum::<u64>();
        assert_eq!(
            plain,
            (GROUPS * CS) as u64,
            "{tgt}: the incompressible clusters are stored as they are"
        );
        let (ours, theirs) = (size(&tgt), size(&q));
        assert!(
            ours + (GROUPS * CS / 4) as u64 <= theirs,
            "{compress}: {ours} bytes, qemu-img convert -c {theirs}"
        );
    }
}

#[test]
fn compressed_text_packs_as_tightly_as_qemu_img() {
    // Text-like data compresses to 20-60 % of a cluster: pieces must span
    // host clusters (as QEMU packs them) or the rest of each cluster is
    // lost.
    let d = tempdir();
    let p = d.path();
    let mut text = String::new();
    let mut i: u64 = 1;
    while text.len() < 4 << 20 {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let word = [
            "block", "copy", "before", "write", "qcow2", "cluster", "guest", "bitmap",
        ][(i >> 60) as usize % 8];
        text.push_str(&format!("{word} {} {:x}\n", i >> 40, i % 9973));
    }
    std::fs::write(p.join("text.raw"), &text.as_bytes()[..4 << 20]).unwrap();
    qemu_img(p, &["convert", "-c", "-O", "qcow2", "text.raw", "q.qcow2"]);
    let zstd = ["-o", "compression_type=zstd"];
    qemu_img(
        p,
        &[
            &["convert", "-c"][..],
            &zstd,
            &["-O", "qcow2", "text.raw", "qz.qcow2"],
        ]
        .concat(),
    );
    let size = |f: &str| std::fs::metadata(p.join(f)).unwrap().len();
    // (qemu: the image to be no larger than, times the slack; None: levels
    // that trade size for speed, checked for correctness only.) imgbackup's
    // deflate writes no more than zlib's level 6 that QEMU uses (it takes a
    // 3-byte match only where that saves bits); zstd is the same library
    // at the same level, within 1 %.
    for (jobs, compress, qemu, kind) in [
        ("1", "--compress", Some(("q.qcow2", 1.0)), "zlib"),
        ("2", "--compress", Some(("q.qcow2", 1.0)), "zlib"),
        ("2", "--compress=deflate:9", Some(("q.qcow2", 1.0)), "zlib"),
        ("2", "--compress=deflate:1", None, "zlib"),
        ("2", "--compress=zstd", Some(("qz.qcow2", 1.01)), "zstd"),
        ("1", "--compress=zstd:9", Some(("qz.qcow2", 1.01)), "zstd"),
    ] {
        let tgt = format!("c{jobs}-{}.qcow2", compress.replace([':', '='], "-"));
        Backup::new(p, "text.raw", &tgt)
            .args(&[compress, "--no-manifest"])
            .jobs(jobs)
            .ok();
        check_clean(p, &tgt);
        assert!(identical(p, "text.raw", &tgt), "{tgt}");
        let info = info_json(p, &tgt);
        assert_eq!(info["format-specific"]["data"]["compression-type"], kind);
        if let Some((qemu, slack)) = qemu {
            let (ours, theirs) = (size(&tgt), size(qemu));
            assert!(
                ours as f64 <= theirs as f64 * slack,
                "{compress} --jobs {jobs}: {ours} bytes, qemu-img convert -c {theirs}"
            );
        }
        // imgbackup reads back what it wrote.
        let back = format!("{tgt}.raw");
        Backup::new(p, &tgt, &back).ok();
        assert_eq!(
            std::fs::read(p.join(&back)).unwrap(),
            std::fs::read(p.join("text.raw")).unwrap()
        );
    }
    // Unknown algorithms and levels out of range are usage errors.
    for bad in [
        "--compress=lz4",
        "--compress=zstd:0",
        "--compress=deflate:10",
    ] {
        let (rc, _, err) = json_run(p, &["backup", bad, "text.raw", "bad.qcow2"]);
        assert_eq!(rc, 2, "{bad}: {err}");
        assert!(!p.join("bad.qcow2").exists());
    }
}
