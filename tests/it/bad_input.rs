//! Bad input: a clear message naming the file, the right exit code, no
//! panic, no target (and no partial), and the source unchanged.

use crate::fixture::*;
use std::path::Path;

/// Run a backup of `src` into a fresh directory and check the failure.
fn refused(src: &Path, extra: &[&str], want_code: i32, want_msg: &[&str]) {
    let d = tempdir();
    let p = d.path();
    let before = if src.is_file() {
        Some(sha256_file(src))
    } else {
        None
    };
    let s = src.to_str().unwrap();
    for tgt in ["out.raw", "out.qcow2"] {
        let mut args = vec!["backup"];
        args.extend_from_slice(extra);
        args.push(s);
        args.push(tgt);
        let o = run_in(p, &args);
        let err = stderr(&o);
        assert_eq!(code(&o), want_code, "{s} {extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        for m in want_msg {
            assert!(err.contains(m), "{s}: message lacks '{m}': {err}");
        }
        let name = src.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name), "message does not name the file: {err}");
        assert!(!p.join(tgt).exists(), "{s}: target left behind");
        assert!(
            !p.join(format!("{tgt}.partial")).exists(),
            "{s}: partial left behind"
        );
    }
    if let Some(b) = before {
        assert_eq!(sha256_file(src), b, "{s}: source changed");
    }
}

fn broken(name: &str) -> std::path::PathBuf {
    testdata().join("broken").join(name)
}

#[test]
fn missing_file_and_directory() {
    let d = tempdir();
    refused(
        &d.path().join("nope.qcow2"),
        &[],
        1,
        &["cannot open", "No such file"],
    );
    std::fs::create_dir(d.path().join("adir")).unwrap();
    refused(&d.path().join("adir"), &[], 1, &["directory"]);
}

#[test]
fn not_a_qcow2_image() {
    refused(&broken("empty.img"), &["--format", "qcow2"], 1, &["empty"]);
    refused(
        &broken("bad-magic.qcow2"),
        &["--format", "qcow2"],
        1,
        &["not a qcow2 image"],
    );
}

#[test]
fn damaged_headers() {
    refused(
        &broken("truncated-header.qcow2"),
        &[],
        1,
        &["truncated header"],
    );
    refused(&broken("huge-l1.qcow2"), &[], 1, &["L1 table too large"]);
    refused(&broken("cluster-bits.qcow2"), &[], 1, &["cluster_bits 40"]);
    refused(
        &broken("refcount-table.qcow2"),
        &[],
        1,
        &["refcount table too large"],
    );
    refused(&broken("version.qcow2"), &[], 1, &["version 9"]);
    refused(
        &broken("incompat-bit.qcow2"),
        &[],
        1,
        &["unsupported", "incompatible feature bit 20"],
    );
}

#[test]
fn damaged_metadata_is_a_source_read_error_never_zeros() {
    refused(
        &broken("l1-past-eof.qcow2"),
        &[],
        4,
        &["L2 table", "past the end of the file", "offset 0"],
    );
    refused(
        &broken("l2-past-eof.qcow2"),
        &[],
        4,
        &["data cluster", "past the end of the file"],
    );
    refused(&broken("l2-unaligned.qcow2"), &[], 4, &["unaligned"]);
    refused(
        &broken("truncated-data.qcow2"),
        &[],
        4,
        &["past the end of the file", "offset 1081344"],
    );
}

#[test]
fn missing_target_directory() {
    let d = tempdir();
    let p = d.path();
    let src = testdata().join("disk.qcow2");
    let o = run_in(p, &["backup", src.to_str().unwrap(), "no/such/dir/out.raw"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    assert!(!p.join("no").exists());
}

#[test]
fn bad_values_are_usage_errors() {
    let d = tempdir();
    let p = d.path();
    let src = testdata().join("disk.qcow2");
    let s = src.to_str().unwrap();
    for (opt, val, msg) in [
        ("--max-chunk", "1.5M", "fractional"),
        ("--max-chunk", "12Q", "unit"),
        ("--granularity", "3K", "power of two"),
        ("--output-cluster-size", "100", "power of two"),
        ("--timeout", "soon", "duration"),
        ("--timeout", "30", "unit"),
        ("--speed", "fast", "rate"),
        ("--speed", "0", "larger than zero"),
        ("--jobs", "0", "worker count"),
        ("--sync", "sideways", "invalid value"),
        ("--output-format", "vmdk", "invalid value"),
    ] {
        let o = run_in(p, &["backup", opt, val, s, "out.raw"]);
        assert_eq!(code(&o), 2, "{opt} {val}: {}", stderr(&o));
        assert!(stderr(&o).contains(msg), "{opt} {val}: {}", stderr(&o));
        assert!(!p.join("out.raw").exists());
    }
    let o = run_in(p, &["backup", "--no-such-option", s, "out.raw"]);
    assert_eq!(code(&o), 2);
    // Consistent values only: a backup cluster smaller than the target's.
    let o = run_in(
        p,
        &[
            "backup",
            "--granularity",
            "4K",
            "--output-cluster-size",
            "64K",
            s,
            "out.qcow2",
        ],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("smaller than the target"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn backing_file_problems_are_named() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-f", "raw", "base.raw", "1M"]);
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
            "1M",
        ],
    );
    std::fs::remove_file(p.join("base.raw")).unwrap();
    let o = run_in(p, &["backup", "top.qcow2", "out.raw"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("backing file 'base.raw' not found"),
        "{}",
        stderr(&o)
    );
    // A chain that loops back on itself.
    qemu_img(p, &["create", "-f", "qcow2", "a.qcow2", "1M"]);
    qemu_img(
        p,
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
        ],
    );
    qemu_img(
        p,
        &[
            "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    );
    let o = run_in(p, &["backup", "b.qcow2", "out.raw"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("loops"), "{}", stderr(&o));
    assert!(!p.join("out.raw").exists());
}
