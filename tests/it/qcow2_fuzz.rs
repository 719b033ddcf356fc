//! A mutation fuzzer over qcow2 metadata (header, L1, L2, refcount table and
//! blocks, bitmap directory and tables), with qemu-img as the oracle:
//! whatever it makes of a damaged image, imgbackup must either refuse it
//! (never a panic, never a hang, the image unchanged) or read exactly what
//! `qemu-img convert` reads. An exit 0 is only allowed when `qemu-img
//! convert` reads the image too and the backup equals its output.
//!
//! `IMGBACKUP_FUZZ_ITERS` sets the mutations per base image (default 120)
//! and `IMGBACKUP_FUZZ_SEED` varies the seed; a failing image is kept under
//! target/tmp/qcow2-fuzz for replay.

use crate::fixture::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

fn be32(b: &[u8], o: usize) -> u64 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as u64
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// The metadata regions of a qcow2 file: (name, start, length).
fn regions(b: &[u8]) -> Vec<(&'static str, usize, usize)> {
    // A first mutation may have damaged cluster_bits already.
    let bits = be32(b, 20);
    let cs = if (9..=21).contains(&bits) {
        1usize << bits
    } else {
        65536
    };
    let len = b.len();
    let clamp = |s: u64, n: u64| -> Option<(usize, usize)> {
        let s = s as usize;
        (s < len).then(|| (s, (n as usize).min(len - s)))
    };
    let mut r = vec![("header", 0, cs.min(len).min(4096))];
    let l1 = be64(b, 40);
    let l1_size = be32(b, 36);
    if let Some((s, n)) = clamp(l1, l1_size * 8) {
        r.push(("l1", s, n.max(8).min(len - s)));
        for i in 0..(n / 8) {
            let e = be64(b, s + i * 8) & 0x00ff_ffff_ffff_fe00;
            if let Some((ls, ln)) = clamp(e, cs as u64) {
                r.push(("l2", ls, ln));
            }
        }
    }
    let rt = be64(b, 48);
    let rt_clusters = be32(b, 56);
    if let Some((s, n)) = clamp(rt, rt_clusters * cs as u64) {
        r.push(("refcount table", s, n));
        for i in 0..(n / 8).min(64) {
            let e = be64(b, s + i * 8) & !(cs as u64 - 1);
            if e != 0
                && let Some((bs, bn)) = clamp(e, cs as u64)
            {
                r.push(("refcount block", bs, bn));
            }
        }
    }
    // The bitmaps extension: directory and tables.
    let mut off = be32(b, 100) as usize;
    while off + 8 <= cs.min(len) {
        let ty = be32(b, off);
        let l = be32(b, off + 4) as usize;
        if ty == 0 {
            break;
        }
        if ty == 0x2385_2875 && off + 32 <= len {
            let dsize = be64(b, off + 16);
            let doff = be64(b, off + 24);
            if let Some((s, n)) = clamp(doff, dsize) {
                r.push(("bitmap directory", s, n));
                if n >= 12 {
                    let t = be64(b, s);
                    let ts = be32(b, s + 8);
                    if let Some((s2, n2)) = clamp(t, ts * 8) {
                        r.push(("bitmap table", s2, n2));
                    }
                }
            }
        }
        off += 8 + l.div_ceil(8) * 8;
    }
    r.retain(|&(_, _, n)| n > 0);
    r
}

/// Damage `b` in one metadata region; describes what was done.
fn mutate(b: &mut [u8], rng: &mut Rng) -> String {
    let rs = regions(b);
    let (name, start, n) = rs[rng.below(rs.len() as u64) as usize];
    let interesting: [u64; 10] = [
        0,
        1,
        u64::MAX,
        1 << 63,
        1 << 62,
        0x200,
        0x10000,
        0x10001,
        b.len() as u64,
        0x00ff_ffff_ffff_fe00,
    ];
    match rng.below(4) {
        0 => {
            let at = start + rng.below(n as u64) as usize;
            let bit = rng.below(8);
            b[at] ^= 1 << bit;
            format!("{name}: flip bit {bit} of byte {at:#x}")
        }
        1 => {
            let at = start + rng.below(n as u64) as usize;
            let v = rng.next() as u8;
            b[at] = v;
            format!("{name}: byte {at:#x} = {v:#x}")
        }
        2 if n >= 8 => {
            let at = start + (rng.below(n as u64 / 8) as usize) * 8;
            let v = interesting[rng.below(interesting.len() as u64) as usize];
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            format!("{name}: u64 at {at:#x} = {v:#x}")
        }
        _ if n >= 8 => {
            // Nudge an existing entry: +/- a cluster, or set/clear a flag.
            let at = start + (rng.below(n as u64 / 8) as usize) * 8;
            let old = be64(b, at);
            let v = match rng.below(4) {
                0 => old.wrapping_add(0x10000),
                1 => old.wrapping_sub(0x200),
                2 => old ^ (1 << rng.below(64)),
                _ => old | 1,
            };
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
            format!("{name}: u64 at {at:#x} {old:#x} -> {v:#x}")
        }
        _ => {
            let at = start;
            b[at] ^= 0xff;
            format!("{name}: invert byte {at:#x}")
        }
    }
}

/// Run a command with a time bound: (exit code or None on timeout, stderr).
fn bounded(mut c: Command, bound: Duration) -> (Option<i32>, String) {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            use std::os::unix::process::ExitStatusExt;
            return (
                Some(st.code().unwrap_or(128 + st.signal().unwrap_or(0))),
                err,
            );
        }
        if t.elapsed() > bound {
            child.kill().ok();
            child.wait().ok();
            return (None, String::new());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn keep_failure(p: &Path, base: &str, i: u64) -> String {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qcow2-fuzz");
    std::fs::create_dir_all(&dir).ok();
    let to = dir.join(format!("{base}-{i}.qcow2"));
    std::fs::copy(p.join("bad.qcow2"), &to).ok();
    to.display().to_string()
}

fn fuzz(base: &str, make: &dyn Fn(&Path), seed: u64) {
    let iters: u64 = std::env::var("IMGBACKUP_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let d = tempdir();
    let p = d.path();
    make(p);
    let good = std::fs::read(p.join("base.qcow2")).unwrap();
    let extra: u64 = std::env::var("IMGBACKUP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut rng = Rng(seed ^ extra.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut refused, mut read, mut qemu_corrupt) = (0, 0, 0);
    for i in 0..iters {
        let mut b = good.clone();
        let what = (0..1 + rng.below(2))
            .map(|_| mutate(&mut b, &mut rng))
            .collect::<Vec<_>>()
            .join("; ");
        std::fs::write(p.join("bad.qcow2"), &b).unwrap();
        let _ = std::fs::remove_file(p.join("q.raw"));
        let _ = std::fs::remove_file(p.join("o.raw"));
        let mut chk = Command::new("qemu-img");
        chk.current_dir(p)
            .args(["check", "-f", "qcow2", "bad.qcow2"]);
        // Only for the statistics (qemu-img check is slow on some damaged
        // images; the invariant needs convert, not check).
        let (check, _) = bounded(chk, Duration::from_secs(3));
        if check == Some(2) {
            qemu_corrupt += 1;
        }
        let mut conv = Command::new("qemu-img");
        conv.current_dir(p)
            .args(["convert", "-f", "qcow2", "-O", "raw", "bad.qcow2", "q.raw"]);
        let (converted, _) = bounded(conv, Duration::from_secs(20));
        let mut ours = bin();
        ours.current_dir(p).args([
            "backup",
            "-q",
            "--no-manifest",
            "--format",
            "qcow2",
            "bad.qcow2",
            "o.raw",
        ]);
        let (rc, err) = bounded(ours, Duration::from_secs(60));
        let ctx = || {
            format!(
                "{base} #{i} ({what}); qemu-img check {check:?}; image kept as {}",
                keep_failure(p, base, i)
            )
        };
        let rc = rc.unwrap_or_else(|| panic!("imgbackup hung: {}", ctx()));
        assert!(
            !err.contains("panicked") && rc != 101 && rc < 128,
            "imgbackup crashed (exit {rc}): {err}\n{}",
            ctx()
        );
        assert_eq!(
            std::fs::read(p.join("bad.qcow2")).unwrap(),
            b,
            "the source changed: {}",
            ctx()
        );
        if rc == 0 {
            read += 1;
            assert_eq!(
                converted,
                Some(0),
                "imgbackup read an image qemu-img cannot convert: {}",
                ctx()
            );
            let same = Command::new("qemu-img")
                .current_dir(p)
                .args(["compare", "-q", "-f", "raw", "-F", "raw", "q.raw", "o.raw"])
                .status()
                .unwrap();
            assert!(
                same.success(),
                "imgbackup read something else than qemu-img convert: {}",
                ctx()
            );
        } else {
            refused += 1;
            assert!(matches!(rc, 1 | 4 | 5), "exit {rc}: {err}\n{}", ctx());
            assert!(
                !p.join("o.raw").exists() && !p.join("o.raw.partial").exists(),
                "{}",
                ctx()
            );
        }
    }
    eprintln!(
        "qcow2 fuzz {base}: {iters} mutations: {read} read identically to qemu-img convert, {refused} refused; qemu-img check called {qemu_corrupt} corrupt"
    );
    assert!(
        refused > 0 && read > 0,
        "the mutations did not exercise both outcomes"
    );
}

#[test]
fn mutated_v3_images_are_refused_or_read_as_qemu_reads_them() {
    fuzz(
        "v3-64k",
        &|p| {
            qemu_img(p, &["create", "-f", "qcow2", "plain.qcow2", "8M"]);
            qemu_io(
                p,
                "qcow2",
                "plain.qcow2",
                &[
                    "write -P 0x11 0 256k",
                    "write -z 1M 128k",
                    "write -P 0x22 6M 64k",
                ],
            );
            // Compressed clusters and a persistent bitmap too.
            qemu_img(
                p,
                &["convert", "-c", "-O", "qcow2", "plain.qcow2", "base.qcow2"],
            );
            qemu_img(p, &["bitmap", "--add", "base.qcow2", "bm0"]);
            qemu_io(
                p,
                "qcow2",
                "base.qcow2",
                &["write -P 0x33 2M 64k", "write -z 1M 64k"],
            );
        },
        0x9e37_79b9_7f4a_7c15,
    );
}

#[test]
fn mutated_v2_small_cluster_images_are_refused_or_read_as_qemu_reads_them() {
    fuzz(
        "v2-4k",
        &|p| {
            qemu_img(
                p,
                &[
                    "create",
                    "-f",
                    "qcow2",
                    "-o",
                    "compat=0.10,cluster_size=4096",
                    "base.qcow2",
                    "4M",
                ],
            );
            qemu_io(
                p,
                "qcow2",
                "base.qcow2",
                &[
                    "write -P 0x44 0 64k",
                    "write -P 0x55 1M 12k",
                    "write -P 0x66 3M 4k",
                ],
            );
        },
        0x2545_f491_4f6c_dd1d,
    );
}
