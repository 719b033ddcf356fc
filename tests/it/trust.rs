//! Trust: never a wrong success, never a clobbered file, never a hang.
//! One test per defect class, each tried the way users meet it: planted
//! links, shared directories, replaced backups, devices, pipes, limits.

use crate::fixture::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o777
}

// 1. Files it writes are never opened through a link.
#[test]
fn planted_links_and_leftovers_are_replaced_not_followed() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "src.raw", "4M");
    std::fs::write(p.join("victim"), b"precious").unwrap();
    std::fs::write(p.join("victim2"), b"also precious").unwrap();
    let passwd = std::fs::read("/etc/passwd").ok();
    // A symlink where the partial goes, a hard link where the manifest's
    // partial goes, and a symlink to /etc/passwd for the restore.
    std::os::unix::fs::symlink(p.join("victim"), p.join("t.raw.partial")).unwrap();
    std::fs::hard_link(p.join("victim2"), p.join("t.raw.manifest.partial")).unwrap();
    Backup::new(p, "src.raw", "t.raw").ok();
    assert!(identical(p, "src.raw", "t.raw"));
    ok(p, &["verify", "t.raw"]);
    std::os::unix::fs::symlink("/etc/passwd", p.join("r.raw.partial")).unwrap();
    ok(p, &["restore", "t.raw", "r.raw"]);
    assert!(identical(p, "src.raw", "r.raw"));
    // The overlay of --guest-overlay, too.
    std::os::unix::fs::symlink(p.join("victim"), p.join("ov.qcow2.partial")).unwrap();
    Backup::new(p, "src.raw", "t2.raw")
        .guest("iops=0,count=20,seed=1")
        .args(&["--guest-overlay", "ov.qcow2"])
        .ok();
    check_clean(p, "ov.qcow2");
    assert_eq!(std::fs::read(p.join("victim")).unwrap(), b"precious");
    assert_eq!(std::fs::read(p.join("victim2")).unwrap(), b"also precious");
    assert_eq!(std::fs::metadata(p.join("victim2")).unwrap().nlink(), 1);
    assert_eq!(std::fs::read("/etc/passwd").ok(), passwd);
    assert!(
        !std::fs::symlink_metadata(p.join("r.raw"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

// 2. New files are never more readable than the source.
#[test]
fn new_files_are_no_more_readable_than_the_source() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "src.raw", "4M");
    for m in [0o600, 0o640] {
        std::fs::set_permissions(p.join("src.raw"), std::fs::Permissions::from_mode(m)).unwrap();
        let (t, q, r, o) = (
            format!("t{m:o}.qcow2"),
            format!("t{m:o}.raw"),
            format!("r{m:o}.raw"),
            format!("o{m:o}.qcow2"),
        );
        Backup::new(p, "src.raw", &t).ok();
        Backup::new(p, "src.raw", &q)
            .guest("iops=0,count=5")
            .args(&["--guest-overlay", &o])
            .ok();
        ok(p, &["restore", &t, &r]);
        for f in [t.clone(), format!("{t}.manifest"), q, r, o] {
            assert_eq!(
                mode(&p.join(&f)) & !m,
                0,
                "{f} is {:o}, source {m:o}",
                mode(&p.join(&f))
            );
        }
    }
}

// 3. TARGET may not be anything the backup reads or builds on.
#[test]
fn target_may_not_be_what_the_backup_reads_or_builds_on() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=20,seed=3"]);
    Backup::new(p, "disk.raw", "inc1.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=20,seed=4"]);
    let sums: Vec<String> = ["disk.raw", "full.qcow2", "inc1.qcow2", "disk.raw.b0.bitmap"]
        .iter()
        .map(|f| sha256_file(&p.join(f)))
        .collect();
    let inc = |t: &str| {
        vec![
            "backup",
            "--force",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.raw",
            t,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    for (args, why) in [
        (inc("inc1.qcow2"), "its own parent (the anchored backup)"),
        (inc("./inc1.qcow2"), "the parent through another name"),
        (inc("disk.raw"), "the source"),
        (inc("disk.raw.b0.bitmap"), "the bitmap file"),
        (
            inc("full.qcow2"),
            "the parent of inc1 (it would break that chain)",
        ),
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = json_run(p, &a);
        assert_eq!(code, 2, "{why}: {err}");
        assert!(
            err.contains("would overwrite") || err.contains("is the parent of"),
            "{why}: {err}"
        );
    }
    // The chain is intact and restores the image as of the last backup.
    assert_eq!(sha256_file(&p.join("full.qcow2")), sums[1]);
    assert_eq!(sha256_file(&p.join("inc1.qcow2")), sums[2]);
    ok(p, &["verify", "inc1.qcow2"]);
    check_clean(p, "inc1.qcow2");
    // A source whose name makes TARGET.manifest the source itself.
    std::fs::copy(p.join("disk.raw"), p.join("img.manifest")).unwrap();
    let (code, _, err) = json_run(p, &["backup", "img.manifest", "img"]);
    assert_eq!(code, 2, "{err}");
    assert!(!p.join("img").exists());
    // A backing file named by hand, and a file of the source's chain.
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
    let (code, _, err) = json_run(p, &["backup", "--force", "top.qcow2", "disk.raw"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--force",
            "--backing",
            "full.qcow2",
            "disk.raw",
            "full.qcow2",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(sha256_file(&p.join("full.qcow2")), sums[1]);
}

// 4. Two runs writing the same TARGET: the second is refused with exit 8.
#[test]
fn a_second_run_writing_the_same_target_exits_8() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "a.raw", 16);
    data_disk(p, "b.raw", 4);
    let mut first = bin()
        .current_dir(p)
        .args(["backup", "-q", "--speed", "4M", "a.raw", "shared.raw"])
        .spawn()
        .unwrap();
    wait_for(&p.join("shared.raw.partial"));
    let (code, _, err) = json_run(p, &["backup", "--force", "b.raw", "shared.raw"]);
    assert_eq!(code, 8, "{err}");
    assert!(err.contains("being written by another imgbackup"), "{err}");
    assert!(first.wait().unwrap().success());
    assert!(identical(p, "a.raw", "shared.raw"));
    ok(p, &["verify", "shared.raw"]);
    // With --wait-lock the second run waits and then replaces it.
    let mut first = bin()
        .current_dir(p)
        .args([
            "backup",
            "-q",
            "--force",
            "--speed",
            "8M",
            "a.raw",
            "shared.raw",
        ])
        .spawn()
        .unwrap();
    wait_for(&p.join("shared.raw.partial"));
    Backup::new(p, "b.raw", "shared.raw")
        .force()
        .args(&["--wait-lock", "30s"])
        .ok();
    assert!(first.wait().unwrap().success());
    assert!(identical(p, "b.raw", "shared.raw"));
    ok(p, &["verify", "shared.raw"]);
}

// 5 (binding; the crash test is in crash.rs). A manifest describes one
// file: a replaced backup is refused by verify, anchoring and rebuild.
#[test]
fn a_manifest_is_bound_to_the_file_it_describes() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=30,seed=7"]);
    // Someone puts another backup in its place (same size, other content)
    // and keeps the old manifest.
    Backup::new(p, "disk.raw", "other.qcow2").ok();
    std::fs::rename(p.join("other.qcow2"), p.join("full.qcow2")).unwrap();
    let (code, _, err) = json_run(p, &["verify", "full.qcow2"]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("does not describe"), "{err}");
    let (code, _, err) = json_run(
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
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("full.qcow2"), "{err}");
    assert!(!p.join("inc.qcow2").exists());
    let (code, _, err) = json_run(
        p,
        &[
            "bitmap",
            "rebuild",
            "disk.raw",
            "b0",
            "--against-backup",
            "full.qcow2",
        ],
    );
    assert_eq!(code, 7, "{err}");
    let info = ok(p, &["info", "full.qcow2"]);
    assert_eq!(info["manifest"]["bound_to_file"], false, "{info}");
    // A copy keeps its content: verify says so and checks it all the same.
    Backup::new(p, "disk.raw", "b.qcow2").ok();
    std::fs::copy(p.join("b.qcow2"), p.join("c.qcow2")).unwrap();
    std::fs::copy(p.join("b.qcow2.manifest"), p.join("c.qcow2.manifest")).unwrap();
    let (code, _, err) = json_run(p, &["verify", "c.qcow2"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("does not describe"), "{err}");
    // --force --no-manifest removes the old manifest.
    Backup::new(p, "disk.raw", "b.qcow2")
        .force()
        .args(&["--no-manifest"])
        .ok();
    assert!(!p.join("b.qcow2.manifest").exists());
}

/// A loop device over a file of `mib` MiB in `p`, or None (with the reason
/// printed) where the machine has none.
struct Loop(String);

impl Loop {
    fn new(p: &Path, name: &str, mib: u64) -> Option<Loop> {
        let f = p.join(name);
        std::fs::File::create(&f)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let o = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&f)
            .output();
        match o {
            Ok(o) if o.status.success() => {
                Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
            }
            Ok(o) => {
                eprintln!(
                    "SKIP: no loop device ({}): block-device tests need root and /dev/loop*",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: losetup not available ({e})");
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

// 6. Block devices are real sources and restore targets; special files are
// refused at once.
#[test]
fn block_devices_back_up_and_restore_special_files_are_refused() {
    let d = tempdir();
    let p = d.path();
    // Special files first (no root needed).
    let fifo = p.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(p.join("sock")).unwrap();
    make_raw(p, "src.raw", "4M");
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "fifo",
            "-F",
            "raw",
            "over.qcow2",
            "4M",
        ],
    );
    for args in [
        vec!["backup", "fifo", "t.raw"],
        vec!["backup", "/dev/null", "t.raw"],
        vec!["backup", "sock", "t.raw"],
        vec!["backup", "over.qcow2", "t.raw"],
        vec!["backup", "--force", "src.raw", "fifo"],
        vec!["backup", "--force", "src.raw", "/dev/null"],
        vec!["info", "fifo"],
        vec!["bitmap", "add", "fifo", "b0"],
    ] {
        let t = Instant::now();
        let (code, _, err) = json_run(p, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{args:?} hung");
        assert!(
            err.contains("FIFO") || err.contains("character device") || err.contains("socket"),
            "{args:?}: {err}"
        );
    }
    assert!(!p.join("t.raw").exists() && !p.join("t.raw.partial").exists());

    let Some(src) = Loop::new(p, "lv.img", 32) else {
        return;
    };
    let Some(dst) = Loop::new(p, "lv2.img", 40) else {
        return;
    };
    let dev = src.0.as_str();
    // Data, zeros and a pattern on the "volume".
    qemu_io(
        p,
        "raw",
        dev,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x11 7M 64k",
            "write -P 0x33 31M 1M",
        ],
    );
    let doc = Backup::new(p, dev, "lv.qcow2").ok();
    assert_eq!(doc["virtual_size"], 32u64 << 20);
    check_clean(p, "lv.qcow2");
    assert!(identical_fmt(p, "lv.qcow2", "qcow2", dev, "raw"));
    ok(p, &["verify", "lv.qcow2", "--against-image", dev]);
    let doc = Backup::new(p, dev, "lv.raw").args(&["--no-manifest"]).ok();
    assert!(
        doc["bytes_copied"].as_u64().unwrap() < 3 << 20,
        "zeros are detected: {doc}"
    );
    assert!(identical_fmt(p, "lv.raw", "raw", dev, "raw"));
    // --bitmap on a device is refused: it cannot tell when the device was written.
    let (code, _, err) = json_run(p, &["backup", "--bitmap", "b0", dev, "x.qcow2"]);
    assert_eq!(code, 2, "{err}");
    // Restore onto a device: only with --force, into the device itself.
    let target = dst.0.as_str();
    qemu_io(p, "raw", target, &["write -P 0xee 0 40M"]);
    let (code, _, err) = json_run(p, &["restore", "lv.qcow2", target]);
    assert_eq!(code, 1, "{err}");
    ok(p, &["restore", "--force", "lv.qcow2", target]);
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata(target)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    // The first 32 MiB equal the source (holes written as zeros), the rest
    // of the device is untouched.
    let got = std::fs::read(p.join("lv2.img")).unwrap();
    let want = std::fs::read(p.join("lv.img")).unwrap();
    assert!(got[..32 << 20] == want[..], "restored device differs");
    assert!(got[32 << 20..].iter().all(|&b| b == 0xee));
    // A smaller device is refused.
    let Some(small) = Loop::new(p, "small.img", 16) else {
        return;
    };
    let (code, _, err) = json_run(p, &["restore", "--force", "lv.qcow2", &small.0]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("larger device"), "{err}");
}

// 7. A source written behind the backup's back is exit 4 with no TARGET.
#[test]
fn a_source_changed_during_the_backup_is_exit_4() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    let child = bin()
        .current_dir(p)
        .args(["backup", "--json", "--speed", "8M", "disk.raw", "t.qcow2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&p.join("t.qcow2.partial"));
    // A writer that does not honour the locks.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("disk.raw"))
            .unwrap();
        f.write_all_at(&[0xab; 4096], 12 << 20).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("changed while it was backed up"),
        "{}",
        stderr(&o)
    );
    assert!(!p.join("t.qcow2").exists() && !p.join("t.qcow2.partial").exists());
}

// 8. Empty images back up, verify and restore; damaged L1/L2 entries and
// bitmap tables are refused.
#[test]
fn empty_images_back_up_verify_and_restore() {
    let d = tempdir();
    let p = d.path();
    std::fs::File::create(p.join("e.raw")).unwrap();
    qemu_img(p, &["create", "-f", "qcow2", "e.qcow2", "0"]);
    for src in ["e.raw", "e.qcow2"] {
        for t in ["t.raw", "t.qcow2"] {
            let tgt = format!("{src}.{t}");
            Backup::new(p, src, &tgt).ok();
            ok(p, &["verify", &tgt]);
            if t == "t.qcow2" {
                check_clean(p, &tgt);
            }
            let r = format!("{tgt}.r.raw");
            ok(p, &["restore", &tgt, &r]);
            assert_eq!(std::fs::metadata(p.join(&r)).unwrap().len(), 0);
            assert!(identical(p, src, &r));
        }
    }
}

/// Read a big-endian u64 at `off`.
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// A qcow2 image with data in its first clusters; returns its bytes and
/// the host offset of its first L2 table.
fn qcow2_with_l2(p: &Path, name: &str) -> (Vec<u8>, usize) {
    qemu_img(p, &["create", "-f", "qcow2", name, "4M"]);
    qemu_io(
        p,
        "qcow2",
        name,
        &["write -P 0x42 0 128k", "write -z 192k 64k"],
    );
    let b = std::fs::read(p.join(name)).unwrap();
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    (b, l2)
}

#[test]
fn damaged_l1_and_l2_entries_are_refused_not_read_as_zeros() {
    let d = tempdir();
    let p = d.path();
    let (good, l2) = qcow2_with_l2(p, "img.qcow2");
    let l1 = be64(&good, 40) as usize;
    let data0 = be64(&good, l2) & 0x00ff_ffff_ffff_fe00;
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "zero-cluster entry with an unaligned offset",
            Box::new(move |b| {
                b[l2 + 3 * 8..l2 + 4 * 8].copy_from_slice(&(0x1_0200u64 | 1).to_be_bytes())
            }),
        ),
        (
            "zero-cluster entry with reserved bits",
            Box::new(move |b| {
                b[l2 + 3 * 8..l2 + 4 * 8].copy_from_slice(&(1u64 | 1 << 5).to_be_bytes())
            }),
        ),
        (
            "data entry with reserved bits",
            Box::new(move |b| b[l2 + 7] |= 0x02),
        ),
        (
            "L1 entry pointing at a data cluster",
            Box::new(move |b| b[l1..l1 + 8].copy_from_slice(&(data0 | 1 << 63).to_be_bytes())),
        ),
        (
            "L1 entry with reserved bits",
            Box::new(move |b| b[l1 + 7] |= 0x01),
        ),
    ];
    for (what, f) in cases {
        let mut b = good.clone();
        f(&mut b);
        std::fs::write(p.join("bad.qcow2"), &b).unwrap();
        // qemu-img check calls every one of them corrupt.
        let chk = std::process::Command::new("qemu-img")
            .current_dir(p)
            .args(["check", "bad.qcow2"])
            .output()
            .unwrap();
        assert_eq!(
            chk.status.code(),
            Some(2),
            "{what}: qemu-img check {}",
            String::from_utf8_lossy(&chk.stdout)
        );
        let (code, _, err) = json_run(p, &["backup", "--force", "bad.qcow2", "t.raw"]);
        assert_eq!(code, 4, "{what}: {err}");
        assert!(err.contains("corrupt"), "{what}: {err}");
        assert!(!p.join("t.raw").exists());
        assert_eq!(
            std::fs::read(p.join("bad.qcow2")).unwrap(),
            b,
            "{what}: source changed"
        );
    }
}

#[test]
fn bitmap_import_refuses_reserved_bits_and_unknown_flags() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-f", "qcow2", "img.qcow2", "8M"]);
    qemu_img(p, &["bitmap", "--add", "img.qcow2", "bm0"]);
    qemu_io(p, "qcow2", "img.qcow2", &["write -P 1 1M 64k"]);
    ok(p, &["bitmap", "import", "img.qcow2", "bm0", "--as", "fine"]);
    let good = std::fs::read(p.join("img.qcow2")).unwrap();
    // The bitmaps extension: after the 112-byte header, (type, len, data).
    let mut off = u32::from_be_bytes(good[100..104].try_into().unwrap()) as usize;
    let dir = loop {
        let ty = u32::from_be_bytes(good[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(good[off + 4..off + 8].try_into().unwrap()) as usize;
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            break be64(&good, off + 8 + 16) as usize;
        }
        off += 8 + len.div_ceil(8) * 8;
    };
    let table = be64(&good, dir) as usize;
    for (what, at, bit) in [
        ("unknown directory flag", dir + 15, 0x10u8),
        ("reserved bit in a table entry", table + 7, 0x02u8),
    ] {
        let mut b = good.clone();
        b[at] |= bit;
        std::fs::write(p.join("img.qcow2"), &b).unwrap();
        let (code, _, err) = json_run(p, &["bitmap", "import", "img.qcow2", "bm0", "--as", "x"]);
        assert_eq!(code, 6, "{what}: {err}");
        assert!(!p.join("img.qcow2.x.bitmap").exists());
    }
}

// 9. A ':' in a backup's name works as a parent.
#[test]
fn date_stamped_names_with_colons_work_as_parents() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    let full = "full-2026-01-01T12:00:00.qcow2";
    let inc = "inc-2026-01-02T12:00:00.qcow2";
    Backup::new(p, "disk.raw", full).bitmap("b0").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=40,seed=9"]);
    let doc = Backup::new(p, "disk.raw", inc)
        .sync("incremental")
        .bitmap("b0")
        .ok();
    assert_eq!(doc["backing"], format!("./{full}"));
    // qemu-img reads the names with './' too (as a user must type them).
    let (dfull, dinc) = (format!("./{full}"), format!("./{inc}"));
    let info = info_json(p, &dinc);
    assert_eq!(info["backing-filename"], dfull);
    check_clean(p, &dinc);
    assert!(identical(p, "disk.raw", &dinc));
    ok(p, &["restore", inc, "r.raw"]);
    assert!(identical(p, "disk.raw", "r.raw"));
    // A second incremental on top of the first.
    ok(p, &["guest", "disk.raw", "iops=0,count=40,seed=10"]);
    let inc2 = "inc-2026-01-03T12:00:00.qcow2";
    Backup::new(p, "disk.raw", inc2)
        .sync("incremental")
        .bitmap("b0")
        .ok();
    assert!(identical(p, "disk.raw", &format!("./{inc2}")));
    ok(p, &["verify", inc2]);
}

// 10. Only a full/top backup with --bitmap, or a rebuild, makes an
// inconsistent bitmap consistent.
#[test]
fn no_command_but_a_full_backup_or_rebuild_launders_a_stale_bitmap() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["bitmap", "add", "disk.raw", "other"]);
    // Written without marking the bitmaps: they are stale.
    qemu_io(p, "raw", "disk.raw", &["write -P 0x77 3M 64k"]);
    let consistent = |name: &str| -> bool {
        ok(p, &["bitmap", "show", "disk.raw", name])["consistent"]
            .as_bool()
            .unwrap()
    };
    assert!(!consistent("b0"));
    let (code, _, err) = json_run(p, &["bitmap", "disable", "disk.raw", "b0"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stays inconsistent"), "{err}");
    assert!(!consistent("b0"), "disable laundered it");
    ok(p, &["bitmap", "enable", "disk.raw", "b0"]);
    assert!(!consistent("b0"), "disable + enable laundered it");
    let list = ok(p, &["bitmap", "list", "disk.raw"]);
    assert_eq!(list["bitmaps"][0]["consistent"], false);
    for args in [
        vec![
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.raw",
            "inc.qcow2",
        ],
        vec!["bitmap", "clear", "disk.raw", "b0"],
        vec!["bitmap", "merge", "disk.raw", "b0", "--into", "other"],
    ] {
        let (code, _, err) = json_run(p, &args);
        assert_eq!(code, 6, "{args:?}: {err}");
    }
    ok(p, &["guest", "disk.raw", "iops=0,count=5"]);
    assert!(!consistent("b0"), "guest laundered it");
    // The recovery the hint names works.
    ok(
        p,
        &[
            "bitmap",
            "rebuild",
            "disk.raw",
            "b0",
            "--against-backup",
            "full.qcow2",
        ],
    );
    assert!(consistent("b0"));
    Backup::new(p, "disk.raw", "inc.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    assert!(identical(p, "disk.raw", "inc.qcow2"));
}

// 11. --backing must be the anchored backup (or hold the same image);
// --no-backing incrementals keep zeros as zero flags.
#[test]
fn backing_must_be_the_anchored_backup() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    Backup::new(p, "disk.raw", "a.qcow2").bitmap("b0").ok();
    // Same content, another file: same root digest.
    Backup::new(p, "disk.raw", "a-copy.qcow2").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=30,seed=5"]);
    Backup::new(p, "disk.raw", "other.qcow2").ok();
    ok(p, &["guest", "disk.raw", "iops=0,count=30,seed=6"]);
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "--backing",
            "other.qcow2",
            "disk.raw",
            "inc.qcow2",
        ],
    );
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("a.qcow2"), "names the anchored backup: {err}");
    assert!(!p.join("inc.qcow2").exists());
    Backup::new(p, "disk.raw", "inc.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .args(&["--backing", "a-copy.qcow2"])
        .ok();
    assert!(identical(p, "disk.raw", "inc.qcow2"));
    ok(p, &["verify", "inc.qcow2"]);
}

#[test]
fn no_backing_incrementals_keep_zeros_and_are_described_truthfully() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    // Data becomes zeros, and other data changes.
    ok(
        p,
        &["guest", "disk.raw", "iops=0,count=60,bs=64K,zero=50,seed=8"],
    );
    let doc = Backup::new(p, "disk.raw", "inc.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .args(&["--no-backing"])
        .ok();
    assert!(doc["backing"].is_null());
    check_clean(p, "inc.qcow2");
    // verify checks what it holds and says so; restore refuses it alone.
    let v = ok(p, &["verify", "inc.qcow2"]);
    assert!(v["detached_chunks_checked"].as_u64().unwrap() > 0, "{v}");
    let (code, _, err) = json_run(p, &["restore", "inc.qcow2", "r.raw"]);
    assert_ne!(code, 0);
    assert!(err.contains("qemu-img rebase"), "{err}");
    let info = ok(p, &["info", "inc.qcow2"]);
    assert_eq!(info["manifest"]["detached"], true, "{info}");
    // Attached to its parent, the chain is the image.
    qemu_img(
        p,
        &[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "full.qcow2",
            "inc.qcow2",
        ],
    );
    assert!(identical(p, "disk.raw", "inc.qcow2"));
    ok(p, &["verify", "inc.qcow2"]);
}

// 12. QEMU's refusals; no new bitmap after a failed full; temp files of
// killed runs cleaned.
#[test]
fn bitmap_leftovers_and_meaningless_options() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 4);
    for sync in ["full", "top"] {
        let (code, _, err) = json_run(
            p,
            &[
                "backup",
                "--sync",
                sync,
                "--bitmap",
                "b0",
                "--bitmap-mode",
                "never",
                "disk.raw",
                "x.qcow2",
            ],
        );
        assert_eq!(code, 2, "{sync}: {err}");
    }
    // A failed full backup does not leave a new bitmap behind.
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--bitmap",
            "b0",
            "--inject",
            "source:read:EIO@nth=2,once",
            "disk.raw",
            "f.qcow2",
        ],
    );
    assert_eq!(code, 4, "{err}");
    assert!(!p.join("disk.raw.b0.bitmap").exists());
    // A temp file of a killed run is removed by the next run.
    std::fs::write(p.join(".disk.raw.b0.bitmap.tmpAbC123"), b"half").unwrap();
    Backup::new(p, "disk.raw", "f.qcow2").bitmap("b0").ok();
    assert!(!p.join(".disk.raw.b0.bitmap.tmpAbC123").exists());
    // guest --format raw on a qcow2 image is refused.
    make_qcow2(p, "img.qcow2", "");
    let before = sha256_file(&p.join("img.qcow2"));
    let (code, _, err) = json_run(
        p,
        &["guest", "--format", "raw", "img.qcow2", "iops=0,count=5"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("qcow2"), "{err}");
    assert_eq!(sha256_file(&p.join("img.qcow2")), before);
}

// 13. A file-size limit is exit 5, never a kill; a full file system under
// the bitmap is exit 5.
#[test]
fn a_file_size_limit_is_exit_5_and_leaves_nothing() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    for t in ["t.raw", "t.qcow2"] {
        let o = std::process::Command::new("sh")
            .current_dir(p)
            .arg("-c")
            .arg("ulimit -f 4096; exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_imgbackup"))
            .args(["backup", "disk.raw", t])
            .output()
            .unwrap();
        assert_eq!(code(&o), 5, "{t}: {}", stderr(&o));
        assert!(stderr(&o).contains("File too large"), "{}", stderr(&o));
        assert!(!p.join(t).exists() && !p.join(format!("{t}.partial")).exists());
        assert!(!p.join(format!("{t}.manifest.partial")).exists());
    }
}

#[test]
fn a_full_file_system_under_the_bitmap_is_exit_5() {
    let d = tempdir();
    let p = d.path();
    let mnt = p.join("small");
    std::fs::create_dir(&mnt).unwrap();
    let m = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2M", "tmpfs"])
        .arg(&mnt)
        .output();
    if !matches!(&m, Ok(o) if o.status.success()) {
        eprintln!("SKIP: cannot mount a small tmpfs here (needs root): {m:?}");
        return;
    }
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(mnt.clone());
    qemu_img(&mnt, &["create", "-f", "raw", "disk.raw", "1M"]);
    qemu_io(&mnt, "raw", "disk.raw", &["write -P 1 0 1M"]);
    // Fill the file system.
    let _ = std::fs::write(mnt.join("fill"), vec![1u8; 4 << 20]);
    let tgt = p.join("t.qcow2");
    let (code, _, err) = json_run(
        &mnt,
        &[
            "backup",
            "--bitmap",
            "b0",
            "disk.raw",
            tgt.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert!(!tgt.exists());
}

// 14. A closed stdout or stderr never panics and never leaves a job half done.
#[test]
fn closed_stdout_and_stderr_do_not_break_a_backup() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    // The JSON reader went away before the end.
    let mut child = bin()
        .current_dir(p)
        .args(["--json", "backup", "disk.raw", "t.qcow2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(identical(p, "disk.raw", "t.qcow2"));
    ok(p, &["verify", "t.qcow2"]);
    // stderr closed while progress lines and warnings are printed.
    let mut child = bin()
        .current_dir(p)
        .env("IMGBACKUP_PROGRESS_INTERVAL", "1ms")
        .args([
            "-vv",
            "backup",
            "--progress",
            "plain",
            "--speed",
            "32M",
            "disk.raw",
            "t2.qcow2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(identical(p, "disk.raw", "t2.qcow2"));
    // `imgbackup bitmap list | head -0` style: a reader that never reads.
    let mut child = bin()
        .current_dir(p)
        .args(["info", "t2.qcow2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert_eq!(code(&o), 0);
}

// 16. --guest with every error policy terminates (the soak test runs many
// seeds: see soak.rs). A skipped cluster under copy-before-write ends in exit 3.
#[test]
fn guest_with_ignore_policies_finishes_with_exit_3() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    for (side, policy) in [
        ("target", "--on-target-error"),
        ("source", "--on-source-error"),
    ] {
        let op = if side == "target" { "write" } else { "read" };
        let rule = format!("{side}:{op}:EIO,prob=0.3,seed=2");
        let t = Instant::now();
        let (code, _, err) = json_run(
            p,
            &[
                "backup",
                "--force",
                "--guest",
                "iops=0,count=500,seed=1",
                policy,
                "ignore",
                "--inject",
                &rule,
                "--jobs",
                "2",
                // 256 requests: some are sure to fail at prob=0.3.
                "--max-chunk",
                "64K",
                "--cbw-cache",
                "0",
                "disk.raw",
                "t.raw",
            ],
        );
        assert_eq!(code, 3, "{side}: {err}");
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}

// 17. The in-kernel copy (raw to raw without a manifest) goes through the
// error policies, --inject and --max-chunk like every other copy.
#[test]
fn in_kernel_copies_go_through_policies_and_injection() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    let doc = Backup::new(p, "disk.raw", "t.raw")
        .jobs(1)
        .max_chunk("64K")
        .inject("target:write:ENOSPC@nth=3,once")
        .args(&[
            "--no-manifest",
            "--on-target-error",
            "retry",
            "--retries",
            "2",
            "--retry-delay",
            "1ms",
        ])
        .ok();
    assert_eq!(doc["retries"], 1, "{doc}");
    assert_eq!(doc["retry_events"][0]["offset"], 128 << 10, "{doc}");
    assert_eq!(doc["retry_events"][0]["length"], 64 << 10, "{doc}");
    assert!(doc["bytes_copied_in_kernel"].as_u64().unwrap() > 0, "{doc}");
    assert!(identical(p, "disk.raw", "t.raw"));
    // Without a retry: exit 5 naming the request (one cluster of 64 KiB).
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--no-manifest",
            "--jobs",
            "1",
            "--max-chunk",
            "64K",
            "--inject",
            "target:write:ENOSPC@nth=3",
            "disk.raw",
            "t2.raw",
        ],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("65536 bytes at offset 131072"), "{err}");
    assert!(!p.join("t2.raw").exists());
    // Source read errors on that path are source errors (exit 4).
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--no-manifest",
            "--inject",
            "source:read:EIO@nth=2",
            "disk.raw",
            "t3.raw",
        ],
    );
    assert_eq!(code, 4, "{err}");
}

// 18. Hints carry the real names.
#[test]
fn hints_name_the_real_image_bitmap_and_backup() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 4);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(p, &["bitmap", "add", "disk.raw", "b1"]);
    // A missing bitmap lists the ones that exist.
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "nope",
            "disk.raw",
            "i.qcow2",
        ],
    );
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("b0, b1"), "{err}");
    // A stale bitmap: the hint names the image, the bitmap and the backup.
    qemu_io(p, "raw", "disk.raw", &["write -P 9 0 64k"]);
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.raw",
            "i.qcow2",
        ],
    );
    assert_eq!(code, 6, "{err}");
    let hint = err
        .lines()
        .find(|l| l.contains("hint:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        hint.contains("bitmap rebuild disk.raw b0 --against"),
        "{hint}"
    );
    assert!(hint.contains("full.qcow2"), "{hint}");
    for placeholder in ["LAST_BACKUP", "IMAGE ", " NAME"] {
        assert!(!err.contains(placeholder), "{placeholder} in {err}");
    }
    let show = ok(p, &["bitmap", "show", "disk.raw", "b0"]);
    assert_eq!(show["consistent"], false);
    // A kept partial: the hint says where it is.
    let (code, _, err) = json_run(
        p,
        &[
            "backup",
            "--keep-partial",
            "--inject",
            "target:write:EIO@nth=2",
            "disk.raw",
            "k.qcow2",
        ],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("kept: k.qcow2.partial"), "{err}");
    assert!(!err.contains("No target was left behind"), "{err}");
    assert!(p.join("k.qcow2.partial").exists());
}
