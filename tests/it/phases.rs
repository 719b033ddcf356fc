//! SIGINT, SIGTERM, SIGHUP and `--timeout` in every phase of a command:
//! copy, manifest, verification, guest-overlay export, restore, verify. The
//! test waits for the phase's `-v` line, stops the process (SIGSTOP), queues
//! the signal, and continues it, so the signal lands inside that phase.
//! A second signal ends at once and says what it left behind.

use crate::fixture::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

/// Start imgbackup with `-v`, wait for a stderr line containing `phase`,
/// then deliver `sigs` while the process is stopped. Returns the child and
/// the stderr lines read so far (the rest is collected by `finish`).
fn signal_in_phase(p: &Path, args: &[&str], phase: &str, sigs: &[i32]) -> (Child, Vec<String>) {
    signal_in_phase_after(p, args, phase, sigs, Duration::ZERO)
}

/// As [`signal_in_phase`], keeping the process stopped for `pause` (so a
/// `--timeout` expires inside the phase).
fn signal_in_phase_after(
    p: &Path,
    args: &[&str],
    phase: &str,
    sigs: &[i32],
    pause: Duration,
) -> (Child, Vec<String>) {
    let mut child = bin()
        .current_dir(p)
        .arg("-v")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("{args:?} ended before phase '{phase}': {seen:?}");
        }
        let hit = line.contains(phase);
        seen.push(line);
        if hit {
            break;
        }
    }
    signal(&child, libc::SIGSTOP);
    for &s in sigs {
        signal(&child, s);
    }
    std::thread::sleep(pause);
    signal(&child, libc::SIGCONT);
    for line in err.lines() {
        seen.push(line.unwrap_or_default());
    }
    (child, seen)
}

fn finish(mut child: Child) -> i32 {
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn nothing_left(p: &Path, name: &str) {
    for f in [
        name.to_string(),
        format!("{name}.partial"),
        format!("{name}.manifest"),
        format!("{name}.manifest.partial"),
    ] {
        assert!(!p.join(&f).exists(), "{f} was left behind");
    }
}

/// The directory a phase case runs in: an image of `mib` MiB, a full
/// backup anchoring bitmap b0, and a small top layer over the image.
fn setup(mib: u64) -> tempfile::TempDir {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "disk.raw", mib, 0x3a);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    // The manifest phase of a top backup hashes the whole backing file.
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "disk.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    qemu_io(p, "qcow2", "top.qcow2", &["write -P 1 0 64k"]);
    d
}

/// Run `args` and cancel it in `phase` (signals `sigs`, or a `--timeout`
/// that expires during `pause`); a phase too quick to be caught is tried
/// again on a larger image. Checks the exit code and that nothing is left.
fn cancel_in_phase(
    args: &[&str],
    phase: &str,
    sigs: &[i32],
    pause: Duration,
    want: i32,
    out: &str,
) {
    for mib in [256, 1024] {
        let d = setup(mib);
        let p = d.path();
        let (child, lines) = signal_in_phase_after(p, args, phase, sigs, pause);
        let rc = finish(child);
        if rc == 0 {
            eprintln!(
                "{args:?}: phase '{phase}' ended before the signal on {mib} MiB; trying a larger image"
            );
            continue;
        }
        assert_eq!(rc, want, "{args:?} at {phase}: {lines:?}");
        nothing_left(p, out);
        assert!(!p.join("ov.qcow2").exists() && !p.join("ov.qcow2.partial").exists());
        let b = ok(p, &["bitmap", "show", "disk.raw", "b0"]);
        assert_eq!(
            b["consistent"], true,
            "{args:?}: the bitmap after the cancel: {b}"
        );
        // An incremental is accepted and exact afterwards.
        Backup::new(p, "disk.raw", "inc.qcow2")
            .sync("incremental")
            .bitmap("b0")
            .ok();
        assert!(identical(p, "disk.raw", "inc.qcow2"));
        return;
    }
    panic!("{args:?}: phase '{phase}' was never caught");
}

#[test]
fn a_signal_in_the_copy_phase_cancels_cleanly() {
    cancel_in_phase(
        &[
            "backup", "--jobs", "1", "--bitmap", "b0", "disk.raw", "t.qcow2",
        ],
        "phase: copy",
        &[libc::SIGINT],
        Duration::ZERO,
        130,
        "t.qcow2",
    );
}

#[test]
fn a_signal_in_the_manifest_phase_cancels_cleanly() {
    cancel_in_phase(
        &[
            "backup",
            "--jobs",
            "1",
            "--sync",
            "top",
            "--bitmap",
            "b0",
            "top.qcow2",
            "t.qcow2",
        ],
        "phase: manifest",
        &[libc::SIGTERM],
        Duration::ZERO,
        143,
        "t.qcow2",
    );
}

#[test]
fn a_timeout_in_the_manifest_phase_cancels_cleanly() {
    cancel_in_phase(
        &[
            "backup",
            "--jobs",
            "1",
            "--timeout",
            "3s",
            "--sync",
            "top",
            "top.qcow2",
            "t.qcow2",
        ],
        "phase: manifest",
        &[],
        Duration::from_secs(4),
        9,
        "t.qcow2",
    );
}

#[test]
fn a_signal_in_the_verify_phase_cancels_cleanly() {
    cancel_in_phase(
        &[
            "backup", "--jobs", "1", "--verify", "--bitmap", "b0", "disk.raw", "t.qcow2",
        ],
        "phase: verify",
        &[libc::SIGHUP],
        Duration::ZERO,
        129,
        "t.qcow2",
    );
}

#[test]
fn a_signal_in_the_overlay_export_cancels_cleanly() {
    cancel_in_phase(
        &[
            "backup",
            "--guest",
            "iops=0,count=3000,bs=64K,seed=3",
            "--guest-overlay",
            "ov.qcow2",
            "disk.raw",
            "t.qcow2",
        ],
        "phase: export",
        &[libc::SIGINT],
        Duration::ZERO,
        130,
        "t.qcow2",
    );
}

#[test]
fn a_signal_during_restore_and_verify_cancels_cleanly() {
    cancel_in_phase(
        &["restore", "--jobs", "1", "full.qcow2", "r.raw"],
        "phase: restore",
        &[libc::SIGINT],
        Duration::ZERO,
        130,
        "r.raw",
    );
    cancel_in_phase(
        &["verify", "--jobs", "1", "full.qcow2"],
        "phase: verify",
        &[libc::SIGTERM],
        Duration::ZERO,
        143,
        "none",
    );
}

#[test]
fn a_second_signal_ends_at_once_and_names_what_it_left() {
    let d = tempdir();
    let p = d.path();
    filled_disk(p, "disk.raw", 128, 0x3a);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    let (child, lines) = signal_in_phase(
        p,
        &[
            "backup", "--speed", "16M", "--bitmap", "b0", "disk.raw", "t.qcow2",
        ],
        "phase: copy",
        &[libc::SIGINT, libc::SIGTERM],
    );
    let rc = finish(child);
    let text = lines.join("");
    assert!(rc == 143 || rc == 130, "exit {rc}: {text}");
    // Which signal the process took first is up to the kernel; the second
    // one, if it arrived before the clean cancel ended, printed the line.
    let Some(line) = lines.iter().find(|l| l.contains("second signal")) else {
        nothing_left(p, "t.qcow2");
        return;
    };
    // The line says exactly what is on disk (the cleanup the first signal
    // started may have got some way).
    let partial_left = p.join("t.qcow2.partial").exists();
    assert_eq!(line.contains("t.qcow2.partial"), partial_left, "{line}");
    let in_use = ok(p, &["bitmap", "show", "disk.raw", "b0"])["in_use"] == true;
    assert_eq!(line.contains("bitmap 'b0'"), in_use, "{line}");
    if !partial_left && !in_use {
        assert!(line.contains("nothing was left behind"), "{line}");
    }
    if in_use {
        assert!(
            line.contains("bitmap rebuild disk.raw b0 --against") && line.contains("full.qcow2"),
            "{line}"
        );
        // The documented recovery: the command the line names.
        let (code1, _, err) = json_run(
            p,
            &[
                "backup",
                "--sync",
                "incremental",
                "--bitmap",
                "b0",
                "disk.raw",
                "t.qcow2",
            ],
        );
        assert_eq!(code1, 6, "{err}");
        let cmd = line
            .split('`')
            .find(|c| c.starts_with("imgbackup bitmap rebuild"))
            .unwrap();
        let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
        ok(p, &args);
    }
    // The next run on that target removes a leftover partial.
    Backup::new(p, "disk.raw", "t.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    assert!(identical(p, "disk.raw", "t.qcow2"));
    assert!(!p.join("t.qcow2.partial").exists());
}
