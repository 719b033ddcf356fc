//! NBD exports as SOURCE (SPEC §9), with QEMU on the other side: qemu-nbd
//! serving raw and qcow2 images (sparse, zero clusters, a backing chain,
//! a persistent dirty bitmap). The oracles are QEMU's: `qemu-img convert`
//! of the same export, `qemu-img compare`/`check`/`map`, the server's own
//! trace of the requests it received (so a read of a hole would be seen),
//! and `nbdinfo --map` for QEMU's bitmap.

use crate::fixture::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// qemu-nbd serving `img` read-only as export `disk` on a Unix socket,
/// tracing every request it receives into `trace`; killed when dropped.
pub(crate) struct QemuNbd {
    child: Child,
    sock: PathBuf,
    trace: PathBuf,
}

impl QemuNbd {
    pub(crate) fn start(p: &Path, img: &str, fmt: &str, extra: &[&str]) -> QemuNbd {
        let sock = p.join(format!("{img}.nbd"));
        let trace = p.join(format!("{img}.trace"));
        let log = std::fs::File::create(&trace).unwrap();
        let s = sock.display().to_string();
        let mut args = vec![
            "-r",
            "-t",
            "-f",
            fmt,
            "-x",
            "disk",
            "--socket",
            &s,
            "--trace",
            "nbd_receive_request",
            "--trace",
            "nbd_co_receive_request_decode_type",
            "--trace",
            "nbd_co_send_chunk_read",
        ];
        args.extend_from_slice(extra);
        args.push(img);
        let child = Command::new("qemu-nbd")
            .current_dir(p)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("qemu-nbd");
        let srv = QemuNbd { child, sock, trace };
        srv.wait_ready();
        srv
    }

    fn wait_ready(&self) {
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // That probe was a client: qemu-nbd serves one at a time, and takes
        // the next once it saw the probe go.
        std::thread::sleep(Duration::from_millis(50));
    }

    /// qemu-storage-daemon exporting `img` (with its backing chain)
    /// read-only as `disk`, traced the same way.
    fn start_qsd(p: &Path, img: &str, fmt: &str) -> QemuNbd {
        let sock = p.join(format!("{img}.qsd"));
        let trace = p.join(format!("{img}.qsd-trace"));
        let log = std::fs::File::create(&trace).unwrap();
        let child = Command::new("qemu-storage-daemon")
            .current_dir(p)
            .args([
                "--blockdev",
                &format!("driver=file,node-name=file0,filename={img},read-only=on"),
                "--blockdev",
                &format!("driver={fmt},node-name=disk0,file=file0,read-only=on"),
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", sock.display()),
                "--export",
                "type=nbd,id=e0,node-name=disk0,name=disk",
                "--trace",
                "nbd_receive_request",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("qemu-storage-daemon");
        let srv = QemuNbd { child, sock, trace };
        srv.wait_ready();
        srv
    }

    pub(crate) fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.sock.display())
    }

    /// The READ requests the server received: (offset, length).
    fn reads(&self) -> Vec<(u64, u64)> {
        traced_reads(&std::fs::read_to_string(&self.trace).unwrap())
    }

    /// The most READ requests the server had received and not yet begun
    /// to answer at once (its trace of decoded requests and sent replies,
    /// by cookie; qemu-nbd only).
    fn most_reads_in_flight(&self) -> usize {
        let text = std::fs::read_to_string(&self.trace).unwrap();
        let cookie = |l: &str| -> Option<u64> {
            let at = l.find("cookie = ")? + "cookie = ".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let mut open = std::collections::BTreeSet::new();
        let mut most = 0;
        for l in text.lines() {
            if l.starts_with("nbd_co_receive_request_decode_type") && l.contains("(read)") {
                open.extend(cookie(l));
                most = most.max(open.len());
            } else if l.starts_with("nbd_co_send_chunk_read")
                && let Some(c) = cookie(l)
            {
                open.remove(&c);
            }
        }
        most
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The [start, end) ranges `qemu-img map` reports as data (not zeros) in
/// `img`, merged.
fn data_ranges(p: &Path, img: &str) -> Vec<(u64, u64)> {
    map_ranges(p, img, |e| e["data"] == true && e["zero"] != true)
}

/// `ranges` rounded out to whole 64 KiB clusters (what the job copies),
/// merged.
fn clusters(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let c = 65536;
    merge_ranges(ranges.iter().map(|&(s, e)| (s / c * c, e.div_ceil(c) * c)))
}

fn within(ranges: &[(u64, u64)], s: u64, l: u64) -> bool {
    ranges.iter().any(|&(a, b)| a <= s && s + l <= b)
}

/// The images of the full/top test: name, format.
fn full_cases(p: &Path) -> Vec<(&'static str, &'static str)> {
    // A sparse raw file: data, an explicitly written zero range, holes.
    make_raw(p, "sparse.raw", "8M");
    qemu_io(p, "raw", "sparse.raw", &["write -P 0 4M 256k"]);
    // A qcow2 with data, a zero cluster range and holes.
    make_qcow2(p, "zeros.qcow2", "");
    // A backing chain: the overlay's zero clusters hide the base's data.
    qemu_img(p, &["create", "-f", "qcow2", "base.qcow2", "16M"]);
    qemu_io(
        p,
        "qcow2",
        "base.qcow2",
        &["write -P 0x61 0 4M", "write -P 0x62 10M 2M"],
    );
    qemu_img(
        p,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "chain.qcow2",
        ],
    );
    qemu_io(
        p,
        "qcow2",
        "chain.qcow2",
        &[
            "write -P 0x71 1M 128k",
            "write -z 2M 1M",
            "write -P 0x72 14M 64k",
        ],
    );
    vec![
        ("sparse.raw", "raw"),
        ("zeros.qcow2", "qcow2"),
        ("chain.qcow2", "qcow2"),
    ]
}

#[test]
fn full_backups_of_qemu_nbd_exports_equal_qemu_img_convert_and_read_no_hole() {
    full_backups_equal_qemu_img_convert(false);
}

#[test]
fn full_backups_of_qemu_storage_daemon_exports_equal_qemu_img_convert_and_read_no_hole() {
    full_backups_equal_qemu_img_convert(true);
}

fn full_backups_equal_qemu_img_convert(qsd: bool) {
    let d = tempdir();
    let p = d.path();
    let serve = |img: &str, fmt: &str| {
        if qsd {
            QemuNbd::start_qsd(p, img, fmt)
        } else {
            QemuNbd::start(p, img, fmt, &[])
        }
    };
    for (img, fmt) in full_cases(p) {
        let exact = data_ranges(p, img);
        let data = clusters(&exact);
        for target in ["full.qcow2", "full.raw"] {
            let srv = serve(img, fmt);
            let uri = srv.uri();
            let s = Backup::new(p, &uri, target).force().ok();
            assert_eq!(s["source"], uri.as_str(), "{img}");
            // The server's own record: every READ lies in the clusters
            // that hold data; those were read once.
            let reads = srv.reads();
            for &(s, l) in &reads {
                assert!(
                    within(&data, s, l),
                    "{img}: READ {s}+{l} outside the data {data:?}"
                );
            }
            let read: u64 = reads.iter().map(|r| r.1).sum();
            let want: u64 = data.iter().map(|(a, b)| b - a).sum();
            assert_eq!(read, want, "{img} -> {target}: bytes read");

            drop(srv);
            // QEMU's own copy of the same export.
            let srv = serve(img, fmt);
            let ofmt = if target.ends_with("qcow2") {
                "qcow2"
            } else {
                "raw"
            };
            let reference = format!("ref.{ofmt}");
            let _ = std::fs::remove_file(p.join(&reference));
            qemu_img(
                p,
                &["convert", "-f", "raw", "-O", ofmt, &srv.uri(), &reference],
            );
            drop(srv);
            assert!(identical(p, target, &reference), "{img} -> {target}");
            assert!(
                identical_fmt(p, target, ofmt, img, fmt),
                "{img} -> {target}"
            );
            if ofmt == "qcow2" {
                check_clean(p, target);
                // Holes stay holes: the target holds no data outside the
                // export's data.
                for (s, e) in data_ranges(p, target) {
                    assert!(
                        within(&data, s, e - s),
                        "{img}: {target} holds data at {s}..{e}, a hole of the export"
                    );
                }
            }
            run_ok(p, &["verify", target]);
        }
    }
}

#[test]
fn top_of_an_export_copies_what_it_reports_allocated() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "zeros.qcow2", "");
    let srv = QemuNbd::start(p, "zeros.qcow2", "qcow2", &[]);
    let s = Backup::new(p, &srv.uri(), "top.qcow2").sync("top").ok();
    drop(srv);
    let data = data_ranges(p, "zeros.qcow2");
    let want: u64 = data.iter().map(|(a, b)| b - a).sum();
    let copied = s["bytes_copied"].as_u64().unwrap();
    assert!(
        copied >= want && copied <= want + 3 * 65536,
        "copied {copied}, data {want}"
    );
    // No backing file: the export's holes read as zeros, as they do from
    // the export.
    assert!(info_json(p, "top.qcow2").get("backing-filename").is_none());
    assert!(identical_fmt(
        p,
        "top.qcow2",
        "qcow2",
        "zeros.qcow2",
        "qcow2"
    ));
    for (s, e) in data_ranges(p, "top.qcow2") {
        assert!(within(&data, s, e - s), "data at {s}..{e}");
    }
}

/// The clusters the top layer of `img` holds, data or zeros (depth 0 in
/// `qemu-img map`), merged.
pub(crate) fn top_layer_ranges(p: &Path, img: &str) -> Vec<(u64, u64)> {
    map_ranges(p, img, |e| {
        e["depth"] == 0 && (e["data"] == true || e["zero"] == true)
    })
}

#[test]
fn incrementals_copy_exactly_the_clusters_of_qemus_bitmap_and_never_clear_it() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "vm.qcow2", 32);
    qemu_img(p, &["bitmap", "--add", "vm.qcow2", "b0"]);
    let srv = QemuNbd::start(p, "vm.qcow2", "qcow2", &["-B", "b0"]);
    Backup::new(p, &srv.uri(), "full.qcow2").ok();
    drop(srv);
    let mut nights = vec!["full.qcow2".to_string()];
    let writes: [&[&str]; 2] = [
        &["write -P 0xa1 3M 192k", "write -P 0xa2 20M 64k"],
        &[
            "write -P 0xb1 100k 4k",
            "write -z 8M 1M",
            "write -P 0xb2 31M 1M",
        ],
    ];
    for (night, cmds) in writes.iter().enumerate() {
        qemu_io(p, "qcow2", "vm.qcow2", cmds);
        let srv = QemuNbd::start(p, "vm.qcow2", "qcow2", &["-B", "b0"]);
        let uri = srv.uri();
        let dirty = nbdinfo_dirty(&uri, "b0");
        assert!(!dirty.is_empty());
        let name = format!("inc{night}.qcow2");
        let parent = nights.last().unwrap().clone();
        let s = Backup::new(p, &uri, &name)
            .sync("incremental")
            .args(&["--source-bitmap", "b0", "--backing", &parent])
            .ok();
        // Exactly QEMU's dirty clusters: read from the server (the zeroed
        // MiB excepted: the export reports it as zeros, so it costs no
        // read), and allocated in the new backup.
        let reads: Vec<(u64, u64)> = srv.reads();
        for &(s, l) in &reads {
            assert!(within(&dirty, s, l), "READ {s}+{l} outside {dirty:?}");
        }
        assert_eq!(
            top_layer_ranges(p, &name),
            dirty,
            "night {night}: the backup's own clusters"
        );
        assert_eq!(
            s["backing"].as_str(),
            Some(parent.as_str()),
            "night {night}"
        );
        assert_eq!(s["source_bitmap"], "b0");
        // The bitmap is QEMU's: still there, still dirty.
        assert_eq!(nbdinfo_dirty(&uri, "b0"), dirty);
        drop(srv);
        // The chain restores to the image, by QEMU and by imgbackup.
        check_clean(p, &name);
        assert!(identical_fmt(p, &name, "qcow2", "vm.qcow2", "qcow2"));
        run_ok(p, &["verify", &name]);
        let restored = format!("restored{night}.raw");
        run_ok(p, &["restore", &name, &restored]);
        assert!(identical_fmt(p, &restored, "raw", "vm.qcow2", "qcow2"));
        nights.push(name);
    }
    let info = info_json(p, "vm.qcow2");
    assert!(
        info.to_string().contains("\"b0\""),
        "QEMU's bitmap is still in the image: {info}"
    );
}

#[test]
fn nbd_sources_refuse_what_they_cannot_do() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "a.qcow2", "");
    qemu_img(p, &["bitmap", "--add", "a.qcow2", "b0"]);
    make_qcow2(p, "other.qcow2", "");
    Backup::new(p, "other.qcow2", "other-full.qcow2").ok();
    let srv = QemuNbd::start(p, "a.qcow2", "qcow2", &["-B", "b0"]);
    let uri = srv.uri();
    Backup::new(p, &uri, "full.qcow2").ok();
    let inc = |extra: &[&str]| {
        let mut args = vec!["backup", "--sync", "incremental"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&uri, "inc.qcow2"]);
        run_in(p, &args)
    };
    for (args, want, says) in [
        (vec!["--source-bitmap", "b0"], 2, "needs --backing PARENT"),
        (vec!["--backing", "full.qcow2"], 2, "needs --source-bitmap"),
        (
            vec!["--source-bitmap", "nope", "--backing", "full.qcow2"],
            6,
            "qemu:dirty-bitmap:nope",
        ),
        (
            vec!["--source-bitmap", "b0", "--backing", "other-full.qcow2"],
            6,
            "not of this export",
        ),
        (
            vec!["--source-bitmap", "b0", "--backing", "missing.qcow2"],
            6,
            "missing.qcow2",
        ),
    ] {
        let o = inc(&args);
        assert_eq!(code(&o), want, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(!p.join("inc.qcow2").exists());
    }
    for (args, says) in [
        (
            vec!["backup", "--bitmap", "b", &uri, "x.qcow2"],
            "--source-bitmap NAME",
        ),
        (vec!["backup", "-f", "qcow2", &uri, "x.qcow2"], "raw"),
        (
            vec!["backup", "--source-bitmap", "b0", &uri, "x.qcow2"],
            "--sync incremental or bitmap",
        ),
        (
            vec!["backup", "--source-bitmap", "b0", "a.qcow2", "x.qcow2"],
            "NBD URI",
        ),
        (vec!["backup", "nbds://host/disk", "x.qcow2"], "TLS"),
        (vec!["backup", "nbd+unix:///disk", "x.qcow2"], "socket=PATH"),
        (
            vec!["backup", "--guest", "iops=10,count=1", &uri, "x.qcow2"],
            "--guest",
        ),
    ] {
        let o = run_in(p, &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(!p.join("x.qcow2").exists());
    }
    drop(srv);
    // No server: the source cannot be opened (exit 1, as for a missing
    // file), the message names the export and says what to check.
    let o = run_in(p, &["backup", &uri, "x.qcow2"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&uri) && stderr(&o).contains("NBD server"),
        "{}",
        stderr(&o)
    );
}

/// A running backup of `uri` (slowed down so that it can be interfered
/// with), its stderr captured.
fn slow_backup(p: &Path, uri: &str, target: &str, extra: &[&str]) -> Child {
    let mut args = vec![
        "backup".to_string(),
        "--speed".into(),
        "16M".into(),
        "--progress".into(),
        "none".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(uri.into());
    args.push(target.into());
    bin()
        .current_dir(p)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: Child) -> (i32, String) {
    let o = c.wait_with_output().unwrap();
    (code(&o), stderr(&o))
}

#[test]
fn a_server_killed_mid_backup_is_a_read_error_and_retry_connects_again() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "vm.raw", 64);
    // report: exit 4, nothing left behind.
    let mut srv = QemuNbd::start(p, "vm.raw", "raw", &[]);
    let job = slow_backup(p, &srv.uri(), "a.qcow2", &[]);
    std::thread::sleep(Duration::from_millis(1200));
    srv.kill();
    let (rc, err) = finish(job);
    assert_eq!(rc, 4, "{err}");
    assert!(err.contains(&srv.uri()), "{err}");
    assert!(!p.join("a.qcow2").exists() && !p.join("a.qcow2.partial").exists());
    // retry: the server comes back; the job connects again and finishes.
    let srv = QemuNbd::start(p, "vm.raw", "raw", &[]);
    let uri = srv.uri();
    let job = slow_backup(
        p,
        &uri,
        "b.qcow2",
        &[
            "--on-source-error",
            "retry",
            "--retries",
            "8",
            "--retry-delay",
            "200ms",
            "-v",
        ],
    );
    std::thread::sleep(Duration::from_millis(1200));
    drop(srv);
    std::thread::sleep(Duration::from_millis(500));
    let srv = QemuNbd::start(p, "vm.raw", "raw", &[]);
    let (rc, err) = finish(job);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("connected again"), "{err}");
    drop(srv);
    assert!(identical_fmt(p, "b.qcow2", "qcow2", "vm.raw", "raw"));
    run_ok(p, &["verify", "b.qcow2"]);
}

#[test]
fn timeout_and_signals_end_a_read_blocked_on_a_silent_server() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "vm.raw", 64);
    let srv = QemuNbd::start(p, "vm.raw", "raw", &[]);
    let pid = srv.child.id() as i32;
    for (how, want) in [("timeout", 9), ("SIGINT", 130)] {
        let extra: &[&str] = if how == "timeout" {
            &["--timeout", "2s"]
        } else {
            &[]
        };
        let job = slow_backup(p, &srv.uri(), "t.qcow2", extra);
        std::thread::sleep(Duration::from_millis(800));
        // The server stops answering: reads block on the socket.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let t = Instant::now();
        if how == "SIGINT" {
            std::thread::sleep(Duration::from_millis(500));
            signal(&job, libc::SIGINT);
        }
        let (rc, err) = finish(job);
        unsafe { libc::kill(pid, libc::SIGCONT) };
        assert_eq!(rc, want, "{how}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "{how}: took {:?}",
            t.elapsed()
        );
        assert!(!p.join("t.qcow2").exists() && !p.join("t.qcow2.partial").exists());
    }
}

#[test]
fn a_read_error_in_the_servers_image_is_a_source_read_error_under_every_policy() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "e.raw", 8);
    // QEMU's blkdebug under qemu-nbd: every read touching 1 MiB fails
    // with EIO inside the server.
    std::fs::write(
        p.join("bd.conf"),
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"2048\"\n",
    )
    .unwrap();
    // Reads throttled to 16 MiB/s above it, so that requests queue in the
    // server and several are in flight when the damaged one fails.
    let opts = format!(
        "driver=throttle,throttle-group=tg,file.driver=raw,file.file.driver=blkdebug,\
         file.file.config={},file.file.image.filename={}",
        p.join("bd.conf").display(),
        p.join("e.raw").display()
    );
    let sock = p.join("e.sock");
    let child = Command::new("qemu-nbd")
        .current_dir(p)
        .args(["-r", "-t", "-x", "disk", "--socket"])
        .arg(&sock)
        .args(["--object", "throttle-group,id=tg,x-bps-read=16777216"])
        .args(["--image-opts", &opts])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let srv = QemuNbd {
        child,
        sock,
        trace: p.join("unused"),
    };
    srv.wait_ready();
    let uri = srv.uri();
    // report: exit 4, the export named, nothing left behind.
    let o = run_in(p, &["backup", &uri, "r.qcow2"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&uri) && stderr(&o).contains("NBD server"),
        "{}",
        stderr(&o)
    );
    assert!(!p.join("r.qcow2").exists() && !p.join("r.qcow2.partial").exists());
    // retry: it stays broken, so the retries run out: exit 4.
    let o = run_in(
        p,
        &[
            "backup",
            "--on-source-error",
            "retry",
            "--retries",
            "2",
            "--retry-delay",
            "50ms",
            &uri,
            "t.qcow2",
        ],
    );
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(!p.join("t.qcow2").exists());
    // ignore: exit 3; the cluster at 1 MiB, and only it, is skipped, and
    // everything else is the image's. QEMU's server drops the connection
    // when the read fails, failing every request in flight with it (four
    // workers, 256 KiB requests: several are); those are sent again alone
    // on a new connection and only the damaged one fails again.
    let (rc, doc, err) = json_run(
        p,
        &[
            "backup",
            "--on-source-error",
            "ignore",
            "--jobs",
            "4",
            "--max-chunk",
            "256K",
            &uri,
            "i.qcow2",
        ],
    );
    assert_eq!(rc, 3, "{err}");
    let skipped: Vec<(u64, u64)> = doc["ignored_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(skipped, vec![(1 << 20, (1 << 20) + 65536)], "{err}");
    let got = raw_content(p, "i.qcow2");
    let want = raw_content(p, "e.raw");
    for k in 0..(8u64 << 20) / 65536 {
        let at = k * 65536;
        if skipped.iter().any(|&(s, e)| s <= at && at < e) {
            continue;
        }
        let r = at as usize..at as usize + 65536;
        assert!(got[r.clone()] == want[r], "cluster at {at}");
    }
    drop(srv);
}

#[test]
fn several_reads_are_in_flight_on_one_connection() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "d.raw", 32);
    // qemu-nbd serves one client and offers no multi-conn: one connection.
    let srv = QemuNbd::start(p, "d.raw", "raw", &[]);
    Backup::new(p, &srv.uri(), "d.qcow2")
        .jobs(4)
        .max_chunk("256K")
        .ok();
    assert_eq!(srv.reads().len(), 128, "32 MiB in 256 KiB reads");
    let most = srv.most_reads_in_flight();
    assert!(most >= 2, "one READ at a time on the connection ({most})");
    drop(srv);
    assert!(identical_fmt(p, "d.qcow2", "qcow2", "d.raw", "raw"));
}

#[test]
fn a_tcp_export_is_backed_up_too() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "t.qcow2", "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("qemu-nbd")
        .current_dir(p)
        .args([
            "-r",
            "-t",
            "-f",
            "qcow2",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg("t.qcow2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let s = Backup::new(p, &uri, "t-backup.qcow2").ok();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(s["source"], uri.as_str());
    assert!(identical_fmt(
        p,
        "t-backup.qcow2",
        "qcow2",
        "t.qcow2",
        "qcow2"
    ));
    run_ok(p, &["verify", "t-backup.qcow2"]);
}

#[test]
fn a_server_that_never_answers_the_handshake_ends_at_the_timeout() {
    let d = tempdir();
    let p = d.path();
    // Accepts, then says nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(5));
        drop(s);
    });
    let t = Instant::now();
    let o = run_in(
        p,
        &[
            "backup",
            "--timeout",
            "1s",
            &format!("nbd://127.0.0.1:{port}/x"),
            "x.qcow2",
        ],
    );
    assert_eq!(code(&o), 9, "{}", stderr(&o));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    assert!(!p.join("x.qcow2").exists());
    held.join().unwrap();
}
