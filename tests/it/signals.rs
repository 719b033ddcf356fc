//! SIGINT, SIGTERM and --timeout cancel cleanly: the right exit code, no
//! TARGET, no partial file, the source unchanged.

use crate::fixture::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Start a throttled backup, wait until its partial file exists, send `sig`.
fn interrupt(sig: i32, tgt: &str, extra: &[&str]) -> (i32, String, tempfile::TempDir) {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 32, 0x3c);
    let before = sha256_file(&p.join("src.raw"));
    let mut args = vec!["backup", "--speed", "4M"];
    args.extend_from_slice(extra);
    args.extend(["src.raw", tgt]);
    let child = bin()
        .current_dir(p)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let partial = p.join(format!("{tgt}.partial"));
    wait_for(&partial);
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, sig);
    let out = child.wait_with_output().unwrap();
    assert_eq!(sha256_file(&p.join("src.raw")), before, "source changed");
    (code(&out), stderr(&out), d)
}

#[test]
fn sigint_cancels_cleanly() {
    for tgt in ["out.raw", "out.qcow2"] {
        let (rc, err, d) = interrupt(libc::SIGINT, tgt, &[]);
        assert_eq!(rc, 130, "{err}");
        assert!(err.contains("SIGINT"), "{err}");
        assert!(!d.path().join(tgt).exists(), "target left behind");
        assert!(
            !d.path().join(format!("{tgt}.partial")).exists(),
            "partial left behind"
        );
    }
}

#[test]
fn sigterm_cancels_cleanly() {
    let (rc, err, d) = interrupt(libc::SIGTERM, "out.qcow2", &[]);
    assert_eq!(rc, 143, "{err}");
    assert!(!d.path().join("out.qcow2").exists());
    assert!(!d.path().join("out.qcow2.partial").exists());
}

#[test]
fn sigint_with_keep_partial_keeps_only_the_partial() {
    let (rc, _, d) = interrupt(libc::SIGINT, "out.raw", &["--keep-partial"]);
    assert_eq!(rc, 130);
    assert!(!d.path().join("out.raw").exists());
    assert!(d.path().join("out.raw.partial").exists());
}

#[test]
fn timeout_exits_9_without_a_target() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 32, 0x3c);
    let t = Instant::now();
    let o = run_in(
        p,
        &[
            "backup",
            "--speed",
            "2M",
            "--timeout",
            "1s",
            "src.raw",
            "out.qcow2",
        ],
    );
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(8), "timeout not honoured");
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert!(!p.join("out.qcow2").exists() && !p.join("out.qcow2.partial").exists());
}

/// Run imgbackup under `ulimit -f` (KiB), as a cron job or a systemd unit
/// with LimitFSIZE would: writes past the limit must fail with EFBIG (the
/// process ignores SIGXFSZ itself), like a full file system.
fn run_with_file_limit(dir: &Path, kib: u64, args: &[&str]) -> std::process::Output {
    let script = format!("ulimit -f {kib}; exec \"$0\" \"$@\"");
    std::process::Command::new("sh")
        .current_dir(dir)
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_imgbackup"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn target_out_of_space_is_exit_5_without_a_target() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "src.raw", 32, 0x3c);
    let before = sha256_file(&p.join("src.raw"));
    for tgt in ["out.raw", "out.qcow2"] {
        // 4 MiB limit, 32 MiB of data.
        let o = run_with_file_limit(p, 4096, &["backup", "src.raw", tgt]);
        let err = stderr(&o);
        assert_eq!(code(&o), 5, "{tgt}: {err}");
        assert!(
            err.contains("File too large") && err.contains("cannot write the target"),
            "{err}"
        );
        assert!(err.contains("hint:") && err.contains("full"), "{err}");
        assert!(!p.join(tgt).exists(), "target left behind");
        assert!(
            !p.join(format!("{tgt}.partial")).exists(),
            "partial left behind"
        );
    }
    assert_eq!(sha256_file(&p.join("src.raw")), before);
}
