//! `imgbackup serve`: real NBD clients (qemu-io, qemu-img) against the
//! server, with the image, qemu-img and the bitmaps as oracles.

use crate::fixture::*;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};

/// A running `imgbackup serve`, stopped with SIGTERM when dropped.
pub(crate) struct Served {
    child: Option<Child>,
    pub(crate) socket: std::path::PathBuf,
}

impl Served {
    pub(crate) fn start(p: &Path, image: &str, extra: &[&str]) -> Served {
        let socket = p.join(format!("{image}.sock"));
        let mut args = vec!["serve", image, "--socket"];
        let s = socket.display().to_string();
        args.push(&s);
        args.extend_from_slice(extra);
        let child = bin()
            .current_dir(p)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        // Ready once it accepts (a stale socket may be there before).
        let t = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "the server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Served {
            child: Some(child),
            socket,
        }
    }

    /// The image's NBD URI.
    pub(crate) fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Stop with SIGTERM; the exit code and stderr.
    pub(crate) fn stop(mut self) -> (i32, String) {
        let child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let o = child.wait_with_output().expect("wait");
        (code(&o), stderr(&o))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// qemu-io against an NBD URI (raw protocol); the output.
pub(crate) fn nbd_io(p: &Path, uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    std::process::Command::new("qemu-io")
        .current_dir(p)
        .args(&args)
        .output()
        .expect("qemu-io")
}

#[test]
fn qemu_clients_read_and_write_a_served_raw_image() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    std::fs::copy(p.join("disk.raw"), p.join("want.raw")).unwrap();
    qemu_img(p, &["create", "-q", "-f", "raw", "sparse.raw", "16M"]);
    let s = Served::start(p, "disk.raw", &[]);
    let uri = s.uri();
    // The export is the image.
    let info: serde_json::Value =
        serde_json::from_slice(&qemu_img(p, &["info", "--output=json", &uri]).stdout).unwrap();
    assert_eq!(info["virtual-size"], 16 << 20);
    assert!(identical_fmt(p, &uri, "raw", "disk.raw", "raw"));
    // Writes of every kind, FUA, a flush; the same applied locally.
    let cmds = [
        "write -P 0x11 0 64k",
        "write -P 0x22 -f 5M 100k",
        "write -z 8M 1M",
        "discard 12M 64k",
        "write -P 0x33 16773120 4096",
        "flush",
    ];
    let o = nbd_io(p, &uri, &cmds);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    qemu_io(p, "raw", "want.raw", &cmds);
    let o = nbd_io(p, &uri, &["read -P 0x22 5M 100k", "read -P 0 8M 1M"]);
    assert!(
        o.status.success()
            && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // A converted copy equals the image as qemu-io wrote it locally.
    qemu_img(p, &["convert", "-f", "raw", "-O", "raw", &uri, "copy.raw"]);
    assert!(identical_fmt(p, "copy.raw", "raw", "want.raw", "raw"));
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    assert!(identical_fmt(p, "disk.raw", "raw", "want.raw", "raw"));
    assert!(
        !p.join("disk.raw.sock").exists(),
        "the socket was left behind"
    );
}

#[test]
fn block_status_follows_the_image() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-q", "-f", "raw", "s.raw", "64M"]);
    qemu_io(
        p,
        "raw",
        "s.raw",
        &["write -P 1 1M 1M", "write -P 2 40M 64k"],
    );
    let s = Served::start(p, "s.raw", &["--read-only"]);
    let map = |img: &str| -> Vec<(u64, u64)> {
        let v: Vec<serde_json::Value> = serde_json::from_slice(
            &qemu_img(p, &["map", "-f", "raw", "--output=json", img]).stdout,
        )
        .unwrap();
        v.iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect()
    };
    let served = map(&s.uri());
    assert_eq!(served, map("s.raw"));
    // The data written, and the first 4 KiB qemu-img allocates when it
    // creates a raw file.
    assert_eq!(
        served.iter().map(|e| e.1).sum::<u64>(),
        (1 << 20) + 65536 + 4096
    );
    // Read-only: writes fail, the image is untouched.
    let o = nbd_io(p, &s.uri(), &["write -P 9 0 4k"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("ermission") || out.contains("ead-only") || !o.status.success(),
        "{out}"
    );
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    let o = std::process::Command::new("qemu-io")
        .current_dir(p)
        .args(["-f", "raw", "-c", "read -P 0 0 4k", "s.raw"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&o.stdout).contains("failed"));
}

#[test]
fn a_backup_is_served_read_only_through_its_chain() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    ok(
        p,
        &["guest", "disk.raw", "iops=0,count=30,bs=4K-64K,seed=5"],
    );
    Backup::new(p, "disk.raw", "inc.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    let s = Served::start(p, "inc.qcow2", &["--read-only"]);
    assert!(identical_fmt(p, &s.uri(), "raw", "disk.raw", "raw"));
    // nbdinfo: read-only, no writes (exit 2 for what it cannot do).
    let can = |what: &str| {
        std::process::Command::new("nbdinfo")
            .args(["--can", what, &s.uri()])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(can("read"), Some(0));
    assert_eq!(can("write"), Some(2));
    let o = std::process::Command::new("nbdinfo")
        .args(["--is", "read-only", &s.uri()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // Writable, a backup is refused with the reason.
    let o = run_in(p, &["serve", "inc.qcow2", "--socket", "x.sock"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--read-only"), "{}", stderr(&o));
}

#[test]
fn writes_through_the_server_mark_the_bitmaps_and_the_next_incremental_is_exact() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 32);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    let s = Served::start(p, "disk.raw", &[]);
    let uri = s.uri();
    // Two clients at once, on disjoint ranges.
    let spawn = |cmds: Vec<String>| {
        let mut args = vec!["-f".to_string(), "raw".to_string()];
        for c in cmds {
            args.push("-c".into());
            args.push(c);
        }
        args.push(uri.clone());
        std::process::Command::new("qemu-io")
            .current_dir(p)
            .args(&args)
            .output()
            .unwrap()
    };
    let a: Vec<String> = (0..20)
        .map(|i| format!("write -P {} {} 4k", i + 1, i * (512 << 10)))
        .collect();
    let b: Vec<String> = (0..20)
        .map(|i| format!("write -z {} 64k", (16 << 20) + i * (256 << 10)))
        .collect();
    let (oa, ob) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| spawn(a));
        let hb = sc.spawn(|| spawn(b));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert!(oa.status.success() && ob.status.success());
    // The dirty bitmap as a meta context: dirty ranges are where the
    // clients wrote (QEMU's client shows dirty as "data": false).
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:b0",
        s.socket.display()
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(
        &qemu_img(p, &["map", "--output=json", "--image-opts", &opts]).stdout,
    )
    .unwrap();
    let dirty: u64 = v
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(dirty, 40 * 65536, "{v:?}");
    // A client that sends garbage is dropped; the others go on.
    let mut g = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    let _ = g.write_all(&[0xde; 300]);
    drop(g);
    let o = nbd_io(p, &uri, &["read -P 1 0 4k"]);
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"));
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // The bitmap saw every write: 40 clusters dirty, consistent, and the
    // incremental restores to the image.
    assert_eq!(dirty_granules(p), 40);
    incremental_restores_to_the_image(p, "disk.raw", "inc.qcow2");
}

fn dirty_granules(p: &Path) -> u64 {
    dirty(p, "disk.raw", "b0")
}

#[test]
fn a_killed_server_leaves_its_bitmaps_inconsistent_and_a_second_server_is_refused() {
    killed_server("disk.raw");
}

#[test]
fn a_killed_qcow2_server_leaves_only_leaks_and_bitmap_rebuild_recovers() {
    killed_server("disk.qcow2");
}

fn killed_server(image: &str) {
    let d = tempdir();
    let p = d.path();
    data_disk(p, image, 8);
    Backup::new(p, image, "full.qcow2").bitmap("b0").ok();
    let s = Served::start(p, image, &[]);
    let o = nbd_io(p, &s.uri(), &["write -P 7 0 64k", "write -P 8 7M 4k"]);
    assert!(o.status.success());
    // The image is locked while served.
    let o = run_in(p, &["serve", image, "--socket", "other.sock"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    drop(s); // SIGKILL
    // In use on disk: the next incremental refuses the bitmap (exit 6).
    let o = run_in(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            image,
            "inc.qcow2",
        ],
    );
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    if image.ends_with(".qcow2") {
        // Killed while written: at worst leaked clusters, and marked dirty
        // so that QEMU rebuilds the refcounts when it opens the image.
        let o = std::process::Command::new("qemu-img")
            .current_dir(p)
            .args(["check", image])
            .output()
            .unwrap();
        let rc = o.status.code().unwrap_or(-1);
        assert!(
            matches!(rc, 0 | 3),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(info_json(p, image)["dirty-flag"], true);
        qemu_img(p, &["check", "-q", "-r", "leaks", image]);
        check_clean(p, image);
    }
    // bitmap rebuild against the full backup recovers it: the next
    // incremental holds what the client wrote.
    ok(
        p,
        &[
            "bitmap",
            "rebuild",
            image,
            "b0",
            "--against-backup",
            "full.qcow2",
        ],
    );
    incremental_restores_to_the_image(p, image, "inc.qcow2");
    // The stale socket is replaced by the next server.
    let s = Served::start(p, image, &[]);
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
}

/// A libnbd tool (strict about the protocol) against the server.
fn libnbd(p: &Path, prog: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&tool(p, prog, args).stdout).into_owned()
}

#[test]
fn libnbd_clients_agree() {
    let d = tempdir();
    let p = d.path();
    qemu_img(p, &["create", "-q", "-f", "raw", "disk.raw", "32M"]);
    qemu_io(
        p,
        "raw",
        "disk.raw",
        &["write -P 5 1M 3M", "write -P 6 20M 64k"],
    );
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    let s = Served::start(p, "disk.raw", &["--export-name", "disk"]);
    let uri = format!("nbd+unix:///disk?socket={}", s.socket.display());
    // Size, flags and the contexts offered.
    let info: serde_json::Value =
        serde_json::from_str(&libnbd(p, "nbdinfo", &["--json", &uri])).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 32 << 20, "{info}");
    assert_eq!(e["is_read_only"], false, "{info}");
    assert_eq!(e["can_flush"], true, "{info}");
    assert_eq!(e["can_multi_conn"], true, "{info}");
    let ctx = e["contexts"].to_string();
    assert!(
        ctx.contains("base:allocation") && ctx.contains("qemu:dirty-bitmap:b0"),
        "{info}"
    );
    // nbdinfo --can: exit 0 for what the export supports.
    for what in [
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "multi-conn",
        "structured-reply",
    ] {
        let o = std::process::Command::new("nbdinfo")
            .args(["--can", what, &uri])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "nbdinfo --can {what}");
    }
    let list = libnbd(
        p,
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd+unix://?socket={}", s.socket.display()),
        ],
    );
    assert!(list.contains("\"disk\""), "{list}");
    // The allocation map: data where it was written, holes elsewhere.
    let map: serde_json::Value =
        serde_json::from_str(&libnbd(p, "nbdinfo", &["--map", "--json", &uri])).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == 0)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    // What was written, and the first 4 KiB qemu-img allocates...
    assert_eq!(data, (3 << 20) + 65536 + 4096, "{map}");
    // ... which is what qemu-img map says of the image, extent by extent.
    let extents = |v: &serde_json::Value, key: &str, want: &serde_json::Value| -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in v.as_array().unwrap().iter().filter(|e| &e[key] == want) {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match out.last_mut() {
                Some(last) if last.1 == o => last.1 = o + l,
                _ => out.push((o, o + l)),
            }
        }
        out
    };
    let qmap = map_json(p, "disk.raw");
    assert_eq!(
        extents(&map, "type", &serde_json::json!(0)),
        extents(
            &serde_json::Value::Array(qmap),
            "data",
            &serde_json::json!(true)
        ),
        "{map}"
    );
    // The dirty bitmap as a meta context is the live bitmap `bitmap show`
    // reports through the server.
    let o = nbd_io(p, &uri, &["write -P 9 2M 4k", "write -z 10M 128k"]);
    assert!(o.status.success());
    let dmap: serde_json::Value = serde_json::from_str(&libnbd(
        p,
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:b0", "--json", &uri],
    ))
    .unwrap();
    let shown = ok(p, &["bitmap", "show", "disk.raw", "b0"]);
    let ranges: Vec<(u64, u64)> = shown["dirty_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(
        ranges,
        vec![
            (2 << 20, (2 << 20) + 65536),
            (10 << 20, (10 << 20) + (128 << 10))
        ]
    );
    assert_eq!(
        extents(&dmap, "type", &serde_json::json!(1)),
        ranges,
        "{dmap}"
    );
    // nbdcopy (several connections, requests in flight) copies it exactly.
    tool(
        p,
        "nbdcopy",
        &[&uri, &p.join("copy.raw").display().to_string()],
    );
    assert!(identical_fmt(p, "copy.raw", "raw", "disk.raw", "raw"));
    // ... and writes into it: the bitmap sees it.
    std::fs::write(p.join("patch.raw"), vec![0x77u8; 32 << 20]).unwrap();
    tool(p, "nbdcopy", &["patch.raw", &uri]);
    let dirty = libnbd(
        p,
        "nbdinfo",
        &["--map=qemu:dirty-bitmap:b0", "--totals", &uri],
    );
    assert!(
        dirty.contains("100.0%") || dirty.contains("100%"),
        "{dirty}"
    );
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    assert!(identical_fmt(p, "patch.raw", "raw", "disk.raw", "raw"));
    assert_eq!(dirty_granules(p), 512);
}

#[test]
fn tcp_listens_on_loopback_and_stops_on_sigint() {
    use std::io::BufRead;
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 4);
    // Port 0: the kernel picks one; the server says which.
    let mut child = bin()
        .current_dir(p)
        .args(["serve", "disk.raw", "--listen", "0", "--export-name", "d"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uri = line.trim().rsplit(" at ").next().unwrap().to_string();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/d"),
        "{line}"
    );
    assert!(identical_fmt(p, &uri, "raw", "disk.raw", "raw"));
    let o = nbd_io(p, &uri, &["write -P 0x42 1M 64k", "flush"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    signal(&child, libc::SIGINT);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let bytes = std::fs::read(p.join("disk.raw")).unwrap();
    assert!(bytes[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x42));
    // A bare port never listens beyond loopback; a name that is not a
    // socket is refused.
    std::fs::write(p.join("file"), b"x").unwrap();
    let o = run_in(p, &["serve", "disk.raw", "--socket", "file"]);
    assert_ne!(code(&o), 0);
    assert!(stderr(&o).contains("not a socket"), "{}", stderr(&o));
}

/// One write of [`Writer`]: when it was sent and when its reply arrived.
#[derive(Clone, Copy)]
pub(crate) struct Logged {
    pub(crate) sent: std::time::SystemTime,
    pub(crate) done: std::time::SystemTime,
    pub(crate) offset: u64,
    pub(crate) pattern: u8,
}

/// A real NBD client (qemu-io, one command at a time through its prompt)
/// writing 4 KiB at random offsets until stopped, logging every write.
pub(crate) struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<Logged>, Option<String>)>,
}

impl Writer {
    pub(crate) fn start(uri: &str, size: u64, seed: u64) -> Writer {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, uri) = (stop.clone(), uri.to_string());
        let handle = std::thread::spawn(move || {
            let mut child = std::process::Command::new("qemu-io")
                .args(["-f", "raw", &uri])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-io");
            let mut input = child.stdin.take().unwrap();
            let mut output = child.stdout.take().unwrap();
            let mut log = Vec::new();
            let mut x = seed;
            let mut i = 0u64;
            while !st.load(Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = (x % (size / 4096)) * 4096;
                let pattern = (i % 250) as u8 + 1;
                i += 1;
                let sent = std::time::SystemTime::now();
                writeln!(input, "write -P {pattern} {offset} 4k").unwrap();
                input.flush().unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let done = |g: &[u8]| {
                    let t = String::from_utf8_lossy(g);
                    t.contains("ops/sec") || t.contains("failed")
                };
                while !done(&got) {
                    let n = output.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&got).into_owned();
                if !text.contains("wrote 4096/4096") {
                    // A failed write: reported once the server has stopped
                    // (with what it logged).
                    drop(input);
                    let _ = child.wait();
                    return (log, Some(format!("write {i} at {offset}: {text}")));
                }
                log.push(Logged {
                    sent,
                    done: std::time::SystemTime::now(),
                    offset,
                    pattern,
                });
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            drop(input);
            let _ = child.wait();
            (log, None)
        });
        Writer { stop, handle }
    }

    pub(crate) fn stop(self) -> (Vec<Logged>, Option<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}

/// The image at `at`: `base` with the logged writes completed before `at`
/// applied; the writes sent before it but completed after may or may not
/// be in it, so every combination of those is a candidate.
fn candidates(base: &[u8], log: &[Logged], at: std::time::SystemTime) -> Vec<Vec<u8>> {
    let mut img = base.to_vec();
    let mut open = Vec::new();
    for w in log {
        if w.done < at {
            img[w.offset as usize..w.offset as usize + 4096].fill(w.pattern);
        } else if w.sent < at {
            open.push(*w);
        }
    }
    assert!(open.len() <= 4, "{} writes in flight at once", open.len());
    (0..1u32 << open.len())
        .map(|mask| {
            let mut c = img.clone();
            for (k, w) in open.iter().enumerate() {
                if mask & (1 << k) != 0 {
                    c[w.offset as usize..w.offset as usize + 4096].fill(w.pattern);
                }
            }
            c
        })
        .collect()
}

fn point_in_time(doc: &serde_json::Value) -> std::time::SystemTime {
    humantime::parse_rfc3339(doc["point_in_time"].as_str().expect("point_in_time")).unwrap()
}

#[test]
fn a_backup_of_a_served_image_runs_in_the_server_and_is_point_in_time_while_a_client_writes() {
    point_in_time_while_a_client_writes("disk.raw");
}

#[test]
fn a_backup_of_a_served_qcow2_is_point_in_time_and_the_image_checks_clean() {
    point_in_time_while_a_client_writes("disk.qcow2");
}

fn point_in_time_while_a_client_writes(image: &str) {
    let d = tempdir();
    let p = d.path();
    data_disk(p, image, 32);
    let orig = raw_content(p, image);
    let s = Served::start(p, image, &[]);
    let w = Writer::start(&s.uri(), 32 << 20, 0x9e3779b97f4a7c15);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // A full backup anchoring b0, slowed down so that the client writes
    // all through it; then an incremental of what it wrote meanwhile.
    let full = ok(
        p,
        &[
            "backup",
            image,
            "full.qcow2",
            "--bitmap",
            "b0",
            "--speed",
            "16M",
            "--verify",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let inc = ok(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            image,
            "inc.qcow2",
            "--verify",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (log, failed) = w.stop();
    if let Some(f) = failed {
        let (rc, err) = s.stop();
        panic!("a client write failed: {f}\nthe server (exit {rc}) said: {err}");
    }
    // The client wrote during the full backup, through its filter.
    let during = log
        .iter()
        .filter(|l| l.sent > point_in_time(&full))
        .filter(|l| l.done < humantime::parse_rfc3339(full["finished"].as_str().unwrap()).unwrap())
        .count();
    assert!(during > 50, "only {during} writes during the job");
    assert!(full["clients"]["writes"].as_u64().unwrap() > 50, "{full}");
    assert!(
        full["copy_before_write_copies"].as_u64().unwrap() > 0,
        "{full}"
    );
    // Each backup is the image as it was at its point in time.
    for (doc, file) in [(&full, "full.qcow2"), (&inc, "inc.qcow2")] {
        let got = raw_content(p, file);
        let want = candidates(&orig, &log, point_in_time(doc));
        assert!(
            want.contains(&got),
            "{file} is not the image at its point in time"
        );
    }
    // The check tells: the image as it was when the full backup finished
    // is not what it holds.
    let got = raw_content(p, "full.qcow2");
    let end = humantime::parse_rfc3339(full["finished"].as_str().unwrap()).unwrap();
    assert!(!candidates(&orig, &log, end).contains(&got));
    // The incremental copied only what was written since the full.
    assert!(inc["bytes_copied"].as_u64().unwrap() < 32 << 20);
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // After the server: the bitmap is consistent, the next incremental
    // restores to the image.
    incremental_restores_to_the_image(p, image, "inc2.qcow2");
    check_clean(p, "inc2.qcow2");
    if image.ends_with(".qcow2") {
        check_clean(p, image);
    }
}

#[test]
fn ctrl_c_of_a_backup_cancels_its_job_never_the_server_and_one_job_runs_at_a_time() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 32);
    let s = Served::start(p, "disk.raw", &[]);
    let slow = |target: &str| {
        bin()
            .current_dir(p)
            .args([
                "backup", "disk.raw", target, "--bitmap", "b0", "--speed", "2M",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = slow("a.qcow2");
    wait_for(&p.join("a.qcow2.partial"));
    // A second job on the same served image is refused while one runs.
    let o = run_in(p, &["backup", "disk.raw", "b.qcow2"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("already running"), "{}", stderr(&o));
    // So is a change to the bitmaps while the job holds one.
    let o = run_in(p, &["bitmap", "add", "disk.raw", "b9"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    // What a served image cannot do is refused, naming why.
    let o = run_in(p, &["backup", "disk.raw", "g.qcow2", "--guest", "count=10"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("served over NBD"), "{}", stderr(&o));
    let o = run_in(p, &["backup", "--sync", "top", "disk.raw", "t.qcow2"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // Ctrl-C of the backup: exit 130, nothing left.
    signal(&first, libc::SIGINT);
    let o = first.wait_with_output().unwrap();
    assert_eq!(code(&o), 130, "{}", stderr(&o));
    for f in [
        "a.qcow2",
        "a.qcow2.partial",
        "a.qcow2.manifest",
        "disk.raw.b0.bitmap",
    ] {
        assert!(!p.join(f).exists(), "{f} was left");
    }
    // The server goes on: a client writes, a backup runs.
    let o = nbd_io(p, &s.uri(), &["write -P 9 0 64k"]);
    assert!(o.status.success());
    let doc = ok(
        p,
        &[
            "backup",
            "disk.raw",
            "c.qcow2",
            "--bitmap",
            "b0",
            "--cbw-cache",
            "1M",
            "--cbw-timeout",
            "10s",
        ],
    );
    assert_eq!(
        doc["bitmap"]["anchored_backup"],
        p.join("c.qcow2")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()
    );
    assert!(identical_fmt(p, "c.qcow2", "qcow2", "disk.raw", "raw"));
    // Stopping the server cancels a running job (exit 143), leaves no
    // target, and the bitmap stays usable.
    let third = slow("d.qcow2");
    wait_for(&p.join("d.qcow2.partial"));
    let o = nbd_io(p, &s.uri(), &["write -P 10 1M 64k"]);
    assert!(o.status.success());
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    let o = third.wait_with_output().unwrap();
    assert_eq!(code(&o), 143, "{}", stderr(&o));
    assert!(!p.join("d.qcow2").exists() && !p.join("d.qcow2.partial").exists());
    // Not served any more: copy-before-write options need --guest.
    let o = run_in(p, &["backup", "disk.raw", "e.qcow2", "--cbw-cache", "1M"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--cbw-cache needs --guest"),
        "{}",
        stderr(&o)
    );
    incremental_restores_to_the_image(p, "disk.raw", "inc.qcow2");
}

#[test]
fn a_backup_served_with_an_overlay_takes_writes_and_never_changes() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    Backup::new(p, "disk.raw", "full.qcow2").ok();
    std::fs::copy(p.join("disk.raw"), p.join("want.raw")).unwrap();
    let before = sha256_file(&p.join("full.qcow2"));
    // Writable without --overlay is refused: it is a backup.
    let o = run_in(p, &["serve", "full.qcow2", "--socket", "x.sock"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let s = Served::start(p, "full.qcow2", &["--overlay", "ov.qcow2"]);
    let cmds = [
        "write -P 0x61 1M 64k",
        "write -z 3M 128k",
        "discard 5M 64k",
        "flush",
    ];
    let o = nbd_io(p, &s.uri(), &cmds);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    qemu_io(
        p,
        "raw",
        "want.raw",
        &[
            "write -P 0x61 1M 64k",
            "write -z 3M 128k",
            "write -z 5M 64k",
        ],
    );
    assert!(identical_fmt(p, &s.uri(), "raw", "want.raw", "raw"));
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // The backup never changed; the overlay holds the writes over it.
    assert_eq!(sha256_file(&p.join("full.qcow2")), before);
    run_ok(p, &["verify", "full.qcow2"]);
    check_clean(p, "ov.qcow2");
    assert!(identical_fmt(p, "ov.qcow2", "qcow2", "want.raw", "raw"));
    let info = info_json(p, "ov.qcow2");
    assert_eq!(info["backing-filename"], "full.qcow2");
    // The overlay is reused by the next session.
    let s = Served::start(p, "full.qcow2", &["--overlay", "ov.qcow2"]);
    assert!(identical_fmt(p, &s.uri(), "raw", "want.raw", "raw"));
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // An existing file that is not an overlay of this image is refused.
    let o = run_in(
        p,
        &[
            "serve",
            "disk.raw",
            "--overlay",
            "ov.qcow2",
            "--socket",
            "y.sock",
        ],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("not a qcow2 overlay"), "{}", stderr(&o));
}

#[test]
fn bitmap_and_info_commands_on_a_served_image_go_through_the_server() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    Backup::new(p, "disk.raw", "full.qcow2").bitmap("b0").ok();
    let s = Served::start(p, "disk.raw", &[]);
    let o = nbd_io(p, &s.uri(), &["write -P 7 1M 4k"]);
    assert!(o.status.success());
    // The live bitmap, not the file the server keeps marked in use.
    let b0 = ok(p, &["bitmap", "show", "disk.raw", "b0"]);
    assert_eq!(b0["served"], true, "{b0}");
    assert_eq!(b0["consistent"], true, "{b0}");
    assert_eq!(b0["dirty_granules"], 1, "{b0}");
    assert_eq!(b0["dirty_ranges"][0][0], 1 << 20, "{b0}");
    let info = ok(p, &["info", "disk.raw"]);
    assert_eq!(info["bitmaps"][0]["served"], true, "{info}");
    assert_eq!(info["bitmaps"][0]["dirty_granules"], 1, "{info}");
    // A bitmap added through the server is marked by the next writes.
    ok(p, &["bitmap", "add", "disk.raw", "b1"]);
    let o = nbd_io(p, &s.uri(), &["write -P 8 3M 4k", "write -P 9 5M 4k"]);
    assert!(o.status.success());
    let list = ok(p, &["bitmap", "list", "disk.raw"]);
    let dirty = |name: &str| {
        list["bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap()["dirty_granules"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((dirty("b0"), dirty("b1")), (3, 2), "{list}");
    // What needs the image to itself is refused while it is served.
    let o = run_in(
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
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("stop the server"), "{}", stderr(&o));
    // Disabled through the server: no longer marked.
    ok(p, &["bitmap", "disable", "disk.raw", "b1"]);
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // After the server: b0 holds every write, consistent; b1 its two,
    // disabled.
    assert_eq!(dirty_granules(p), 3);
    let b1 = ok(p, &["bitmap", "show", "disk.raw", "b1"]);
    assert_eq!(
        (b1["enabled"].as_bool(), b1["dirty_granules"].as_u64()),
        (Some(false), Some(2)),
        "{b1}"
    );
    assert!(b1.get("served").is_none(), "{b1}");
    incremental_restores_to_the_image(p, "disk.raw", "inc.qcow2");
}

#[test]
fn control_names_where_the_server_listens_and_where_commands_reach_it() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    data_disk(p, "other.raw", 8);
    let ctl = p.join("run").join("disk.ctl");
    std::fs::create_dir(p.join("run")).unwrap();
    let ctl_s = ctl.display().to_string();
    let s = Served::start(p, "disk.raw", &["--control", &ctl_s]);
    wait_for(&ctl);
    assert!(!p.join("disk.raw.ctl").exists());
    // Without --control nothing answers beside the image: the image is
    // locked by the server (exit 8).
    let o = run_in(p, &["backup", "disk.raw", "a.qcow2"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    // With it, the job runs in the server.
    let doc = ok(
        p,
        &[
            "--control",
            &ctl_s,
            "backup",
            "disk.raw",
            "a.qcow2",
            "--bitmap",
            "b0",
        ],
    );
    assert!(!doc["point_in_time"].as_str().unwrap().is_empty());
    assert!(doc.get("clients").is_some(), "{doc}");
    let b0 = ok(
        p,
        &["--control", &ctl_s, "bitmap", "show", "disk.raw", "b0"],
    );
    assert_eq!(b0["served"], true, "{b0}");
    // Another image through this server, or a socket nobody serves, is
    // refused.
    let (rc, _, err) = json_run(p, &["--control", &ctl_s, "bitmap", "list", "other.raw"]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("not the image this server serves"), "{err}");
    let (rc, _, err) = json_run(p, &["--control", &ctl_s, "backup", "other.raw", "o.qcow2"]);
    assert_eq!(rc, 2, "{err}");
    let (rc, _, err) = json_run(
        p,
        &["--control", "nowhere.sock", "backup", "disk.raw", "b.qcow2"],
    );
    assert_eq!(rc, 2, "{err}");
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    assert!(!ctl.exists(), "the control socket was left");
}

/// An incremental of `image` with bitmap b0 into `target`, restored by
/// qemu-img, equals the image: the bitmap saw every write.
fn incremental_restores_to_the_image(p: &Path, image: &str, target: &str) {
    Backup::new(p, image, target)
        .sync("incremental")
        .bitmap("b0")
        .ok();
    qemu_img(p, &["convert", "-O", "raw", target, "flat.raw"]);
    assert!(identical(p, "flat.raw", image));
}

#[test]
fn a_server_killed_during_a_backup_in_it_is_a_source_read_error() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 32);
    let mut s = Served::start(p, "disk.raw", &[]);
    let job = bin()
        .current_dir(p)
        .args([
            "backup",
            "--speed",
            "4M",
            "--progress",
            "none",
            "disk.raw",
            "b.qcow2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let server = s.child.take().unwrap();
    signal(&server, libc::SIGKILL);
    let _ = server.wait_with_output();
    let o = job.wait_with_output().unwrap();
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stopped during the backup"),
        "{}",
        stderr(&o)
    );
    assert!(!p.join("b.qcow2").exists());
}

#[test]
fn a_flush_saves_the_bitmaps_only_when_they_changed() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    ok(p, &["bitmap", "add", "disk.raw", "b0"]);
    let s = Served::start(p, "disk.raw", &[]);
    let file = p.join("disk.raw.b0.bitmap");
    let stamp = || {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&file).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec(), sha256_file(&file))
    };
    let o = nbd_io(p, &s.uri(), &["write -P 1 0 64k", "flush"]);
    assert!(o.status.success());
    let first = stamp();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The same granule again: nothing new to save.
    let o = nbd_io(p, &s.uri(), &["write -P 2 4k 4k", "flush"]);
    assert!(o.status.success());
    assert_eq!(stamp(), first, "a flush rewrote an unchanged bitmap");
    // A new granule: saved.
    let o = nbd_io(p, &s.uri(), &["write -P 3 4M 4k", "flush"]);
    assert!(o.status.success());
    assert_ne!(stamp().3, first.3, "a flush did not save a changed bitmap");
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // After the server, the bitmap holds both granules.
    assert_eq!(dirty(p, "disk.raw", "b0"), 2);
}

#[test]
fn a_copy_before_write_that_fails_after_the_workers_passed_is_copied_before_the_end() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 16);
    let orig = raw_content(p, "disk.raw");
    let s = Served::start(p, "disk.raw", &[]);
    // The first read at 8 MiB waits 3 s and fails: that is the copy-
    // before-write of the client's write below, which holds the cluster
    // while the (slowed) workers go past it.
    let job = bin()
        .current_dir(p)
        .args([
            "--json",
            "backup",
            "--inject",
            "source:read:EIO@8M,once,delay=3s",
            "--on-source-error",
            "ignore",
            "--speed",
            "4M",
            "--progress",
            "none",
            "disk.raw",
            "t.qcow2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Its copy-before-write fails: the write fails (break-guest-write).
    let w = nbd_io(p, &s.uri(), &["write -P 0x77 8M 4k"]);
    let o = job.wait_with_output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(
        code(&o),
        0,
        "{}\n{doc}\nclient: {}",
        stderr(&o),
        String::from_utf8_lossy(&w.stdout)
    );
    assert!(
        String::from_utf8_lossy(&w.stdout).contains("failed"),
        "the client's write went through: {}",
        String::from_utf8_lossy(&w.stdout)
    );
    // The cluster the filter gave back was copied after all: the backup
    // is the image at its point in time, whole.
    assert_eq!(raw_content(p, "t.qcow2"), orig);
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
}
