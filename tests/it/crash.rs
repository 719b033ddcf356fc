//! Crash consistency: SIGKILL at every rename, fsync and unlink of a
//! `--force` full backup, an incremental and a bitmap save (an LD_PRELOAD
//! shim counts those calls and kills the process before call N). After each
//! kill: TARGET is absent or whole, a manifest is bound to its file or
//! refused, a bitmap is consistent (and then exact) or refused with exit 6,
//! and the documented recovery (run again; `bitmap rebuild` as the hint
//! says) leaves a chain that restores to the source.

use crate::fixture::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The compiled shim (built once per test run with the system C compiler).
pub(crate) fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("crash-shim");
        std::fs::create_dir_all(&dir).unwrap();
        let so = dir.join("crash.so");
        // Test processes build it side by side: each builds its own and
        // renames it into place, so none loads a half-written library.
        let tmp = dir.join(format!("crash.so.{}.tmp", std::process::id()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crash/shim.c");
        let o = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&tmp)
            .arg(&src)
            .arg("-ldl")
            .output()
            .expect("a C compiler (cc) is needed to build the crash shim");
        assert!(
            o.status.success(),
            "cc: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::rename(&tmp, &so).unwrap();
        so
    })
}

/// Run imgbackup with the shim: killed before call `at`, or logging calls.
pub(crate) fn run_shim(p: &Path, args: &[&str], at: Option<u64>, log: Option<&Path>) -> Output {
    let mut c = bin();
    c.current_dir(p).env("LD_PRELOAD", shim()).args(args);
    if let Some(n) = at {
        c.env("CRASH_AT", n.to_string());
    }
    if let Some(l) = log {
        c.env("CRASH_LOG", l);
    }
    c.output().unwrap()
}

/// How many crash points `args` passes through after `setup`.
fn count_points(setup: &dyn Fn(&Path), args: &[&str]) -> u64 {
    let d = tempdir();
    let p = d.path();
    setup(p);
    let log = p.join("calls.log");
    let o = run_shim(p, args, None, Some(&log));
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    let n = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count() as u64;
    assert!(n >= 5, "{args:?} passes only {n} crash points");
    n
}

/// `qemu-img convert -O raw` of `img` (with its chain).
fn content(p: &Path, img: &str) -> Vec<u8> {
    raw_content(p, img)
}

/// Follow the hint of a refused bitmap: run its `imgbackup bitmap rebuild`.
fn follow_rebuild_hint(p: &Path, err: &str) {
    let hint = err
        .lines()
        .find(|l| l.contains("hint:"))
        .unwrap_or_else(|| panic!("no hint in: {err}"));
    let cmd = hint
        .split('`')
        .find(|c| c.starts_with("imgbackup bitmap rebuild"))
        .unwrap_or_else(|| panic!("no rebuild command in the hint: {hint}"));
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    ok(p, &args);
}

/// An incremental of `disk.raw` to a new name, recovering a refused bitmap
/// the way the hint says; returns the new backup's name.
fn incremental_with_recovery(p: &Path, name: &str) -> String {
    let args = [
        "backup",
        "--sync",
        "incremental",
        "--bitmap",
        "b0",
        "disk.raw",
        name,
    ];
    let (rc, _, err) = json_run(p, &args);
    match rc {
        0 => {}
        6 => {
            follow_rebuild_hint(p, &err);
            ok(p, &args);
        }
        _ => panic!("{args:?}: exit {rc}: {err}"),
    }
    name.to_string()
}

/// The invariants on a backup file after a crash: absent, or whole and
/// either verified (then equal to one of `states`) or refused.
fn check_backup(p: &Path, name: &str, states: &[&[u8]], at: u64) {
    if !p.join(name).exists() {
        return;
    }
    let got = content(p, name);
    let (rc, _, err) = json_run(p, &["verify", name]);
    match rc {
        0 => assert!(
            states.contains(&got.as_slice()),
            "crash at {at}: {name} verifies but holds none of the expected images"
        ),
        7 | 1 => {}
        _ => panic!("crash at {at}: verify {name}: exit {rc}: {err}"),
    }
    if name.ends_with(".qcow2") {
        check_clean(p, name);
    }
}

fn setup_force(p: &Path) {
    data_disk(p, "disk.raw", 4);
    Backup::new(p, "disk.raw", "t.qcow2").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=30,seed=5"]);
}

#[test]
fn kill_at_every_step_of_a_forced_full_backup() {
    let args = ["backup", "-q", "--force", "disk.raw", "t.qcow2"];
    let n = count_points(&setup_force, &args);
    for at in 1..=n {
        let d = tempdir();
        let p = d.path();
        setup_force(p);
        let old = content(p, "t.qcow2");
        let new = std::fs::read(p.join("disk.raw")).unwrap();
        let o = run_shim(p, &args, Some(at), None);
        assert_eq!(code(&o), 137, "crash at {at}: {}", stderr(&o));
        // TARGET is whole (old or new), its manifest bound or refused.
        assert!(
            p.join("t.qcow2").exists(),
            "crash at {at}: the old backup is gone"
        );
        check_backup(p, "t.qcow2", &[&old, &new], at);
        let info = ok(p, &["info", "t.qcow2"]);
        if info["manifest"]["bound_to_file"] == false {
            let (rc, _, _) = json_run(p, &["verify", "t.qcow2"]);
            assert_eq!(rc, 7, "crash at {at}: an unbound manifest verified");
        }
        // Recovery: run it again.
        Backup::new(p, "disk.raw", "t.qcow2").force().ok();
        assert_eq!(content(p, "t.qcow2"), new, "crash at {at}: recovery");
        ok(p, &["verify", "t.qcow2"]);
        assert!(
            !p.join("t.qcow2.partial").exists() && !p.join("t.qcow2.manifest.partial").exists()
        );
    }
}

fn setup_inc(p: &Path) {
    data_disk(p, "disk.raw", 4);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=30,seed=6"]);
}

#[test]
fn kill_at_every_step_of_an_incremental() {
    let args = [
        "backup",
        "-q",
        "--sync",
        "incremental",
        "--bitmap",
        "b0",
        "disk.raw",
        "inc.qcow2",
    ];
    let n = count_points(&setup_inc, &args);
    for at in 1..=n {
        let d = tempdir();
        let p = d.path();
        setup_inc(p);
        let now = std::fs::read(p.join("disk.raw")).unwrap();
        let o = run_shim(p, &args, Some(at), None);
        assert_eq!(code(&o), 137, "crash at {at}: {}", stderr(&o));
        check_backup(p, "inc.qcow2", &[&now], at);
        // The bitmap is consistent (and then exact) or refused with exit 6.
        let name = incremental_with_recovery(p, "inc-after.qcow2");
        assert_eq!(
            content(p, &name),
            now,
            "crash at {at}: the chain after recovery"
        );
        ok(p, &["verify", &name]);
        ok(p, &["restore", &name, "r.raw"]);
        assert_eq!(std::fs::read(p.join("r.raw")).unwrap(), now);
    }
}

fn setup_guest(p: &Path) {
    data_disk(p, "disk.raw", 4);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
}

#[test]
fn kill_at_every_step_of_a_bitmap_save() {
    let args = [
        "guest",
        "-q",
        "disk.raw",
        "iops=0,count=40,bs=4K-128K,seed=8",
    ];
    let n = count_points(&setup_guest, &args);
    for at in 1..=n {
        let d = tempdir();
        let p = d.path();
        setup_guest(p);
        let o = run_shim(p, &args, Some(at), None);
        assert_eq!(code(&o), 137, "crash at {at}: {}", stderr(&o));
        // Whatever the guest wrote before the kill: a consistent bitmap
        // gives an exact incremental, an inconsistent one is refused.
        let now = std::fs::read(p.join("disk.raw")).unwrap();
        let name = incremental_with_recovery(p, "inc.qcow2");
        assert_eq!(
            content(p, &name),
            now,
            "crash at {at}: the incremental is not the image"
        );
        assert!(
            p.read_dir()
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().contains(".bitmap.tmp")),
            "crash at {at}: a bitmap temporary file was left"
        );
    }
}
