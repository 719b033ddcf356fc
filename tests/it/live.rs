//! The live flow of SPEC §9 with QEMU on the other side:
//! qemu-storage-daemon serves a qcow2 with a persistent dirty bitmap to a
//! writer (qemu-io over an NBD export, writing all the time); over QMP the
//! test sets up QEMU's fleecing (a copy-before-write filter inserted above
//! the image, a `snapshot-access` node, an NBD export of it with the
//! bitmap), exactly as docs/live-vms.md tells users to, and imgbackup backs
//! the export up: a full, then an incremental with `--source-bitmap`.
//! Each backup must be the image as it was when its filter went in (the
//! writer's log replayed), and the incremental must hold exactly the
//! clusters QEMU's bitmap names (`nbdinfo --map` as the oracle).

use crate::fixture::*;
use crate::serve::{Logged, Writer};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// A QMP connection.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t.elapsed() < Duration::from_secs(10), "QMP: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut q = Qmp {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        q.reply(); // the greeting
        q.run("qmp_capabilities", json!({}));
        q
    }

    /// The next message that is not an event.
    fn reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            assert!(self.r.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Run `cmd`; it must succeed.
    fn run(&mut self, cmd: &str, args: Value) -> Value {
        let m = json!({"execute": cmd, "arguments": args});
        writeln!(self.w, "{m}").unwrap();
        let r = self.reply();
        assert!(r.get("error").is_none(), "{cmd} {args}: {r}");
        r["return"].clone()
    }
}

/// qemu-storage-daemon with the image opened as node `src`, the writer's
/// export `vm` on a raw node `guest` above it, and an NBD server on
/// `nbd.sock`; READ requests it receives are traced to `qsd.trace`.
struct Daemon {
    child: Child,
    qmp: Qmp,
    dir: PathBuf,
}

impl Daemon {
    fn start(p: &Path, image: &str) -> Daemon {
        let trace = std::fs::File::create(p.join("qsd.trace")).unwrap();
        let child = Command::new("qemu-storage-daemon")
            .current_dir(p)
            .args([
                "--chardev",
                "socket,id=qmp,path=qmp.sock,server=on,wait=off",
                "--monitor",
                "chardev=qmp",
                "--trace",
                "nbd_receive_request",
            ])
            .stdout(Stdio::null())
            .stderr(trace)
            .spawn()
            .expect("qemu-storage-daemon");
        let mut qmp = Qmp::connect(&p.join("qmp.sock"));
        let sock = p.join("nbd.sock").display().to_string();
        qmp.run(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "src",
                   "file": {"driver": "file", "filename": image}}),
        );
        qmp.run(
            "blockdev-add",
            json!({"driver": "raw", "node-name": "guest", "file": "src"}),
        );
        qmp.run(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        );
        qmp.run(
            "block-export-add",
            json!({"type": "nbd", "id": "vm", "node-name": "guest", "name": "vm",
                   "writable": true}),
        );
        Daemon {
            child,
            qmp,
            dir: p.to_path_buf(),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    /// docs/live-vms.md, steps 1-3: a new bitmap `next` starts (if given),
    /// the copy-before-write filter goes in above the image (that instant
    /// is the backup's point in time: the QMP command's send and reply
    /// times bound it), `done` (if given) stops, and the point-in-time
    /// view is exported as `backup` with `done` as its bitmap.
    fn fleece(&mut self, next: Option<&str>, done: Option<&str>) -> (SystemTime, SystemTime) {
        qemu_img(&self.dir, &["create", "-f", "qcow2", "fleece.qcow2", "32M"]);
        let q = &mut self.qmp;
        if let Some(b) = next {
            q.run(
                "block-dirty-bitmap-add",
                json!({"node": "src", "name": b, "persistent": true}),
            );
        }
        q.run(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "fleece",
                   "file": {"driver": "file", "filename": "fleece.qcow2"}}),
        );
        q.run(
            "blockdev-add",
            json!({"driver": "copy-before-write", "node-name": "cbw",
                   "file": "src", "target": "fleece"}),
        );
        let t0 = SystemTime::now();
        q.run(
            "blockdev-reopen",
            json!({"options": [{"driver": "raw", "node-name": "guest", "file": "cbw"}]}),
        );
        let t1 = SystemTime::now();
        if let Some(b) = done {
            q.run(
                "block-dirty-bitmap-disable",
                json!({"node": "src", "name": b}),
            );
        }
        q.run(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}),
        );
        let mut export = json!({"type": "nbd", "id": "backup", "node-name": "snap",
                                "name": "backup"});
        if let Some(b) = done {
            export["bitmaps"] = json!([{"node": "src", "name": b}]);
        }
        q.run("block-export-add", export);
        (t0, t1)
    }

    /// docs/live-vms.md, step 5: the export and the filter go away.
    fn unfleece(&mut self, done: Option<&str>) {
        let q = &mut self.qmp;
        q.run("block-export-del", json!({"id": "backup"}));
        // The export goes once its clients have.
        let t = Instant::now();
        while q
            .run("query-block-exports", json!({}))
            .as_array()
            .unwrap()
            .len()
            > 1
        {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        }
        q.run("blockdev-del", json!({"node-name": "snap"}));
        q.run(
            "blockdev-reopen",
            json!({"options": [{"driver": "raw", "node-name": "guest", "file": "src"}]}),
        );
        q.run("blockdev-del", json!({"node-name": "cbw"}));
        q.run("blockdev-del", json!({"node-name": "fleece"}));
        if let Some(b) = done {
            q.run(
                "block-dirty-bitmap-remove",
                json!({"node": "src", "name": b}),
            );
        }
        std::fs::remove_file(self.dir.join("fleece.qcow2")).unwrap();
    }

    /// The READ requests traced after the first `from` lines of the
    /// trace, and the lines in it now.
    fn reads(&self, from: usize) -> (Vec<(u64, u64)>, usize) {
        let text = std::fs::read_to_string(self.dir.join("qsd.trace")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let after = lines[from.min(lines.len())..].join("\n");
        (traced_reads(&after), lines.len())
    }

    fn quit(mut self) {
        let _ = self.qmp.run("quit", json!({}));
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Check that `got` is `base` as it was at a moment between `t0` and `t1`:
/// every write completed before `t0` is in it, none sent after `t1` is,
/// and a 4 KiB block written in between holds one of the values it had
/// then.
fn assert_point_in_time(
    what: &str,
    got: &[u8],
    base: &[u8],
    log: &[Logged],
    (t0, t1): (SystemTime, SystemTime),
) {
    let mut img = base.to_vec();
    let mut open: Vec<&Logged> = Vec::new();
    for w in log {
        if w.done < t0 {
            img[w.offset as usize..w.offset as usize + 4096].fill(w.pattern);
        } else if w.sent < t1 {
            open.push(w);
        }
    }
    let mut bad = Vec::new();
    for (k, (g, want)) in got.chunks(4096).zip(img.chunks(4096)).enumerate() {
        if g == want {
            continue;
        }
        let at = (k * 4096) as u64;
        let maybe = open
            .iter()
            .any(|w| w.offset == at && g.iter().all(|&b| b == w.pattern));
        if !maybe {
            bad.push(at);
        }
    }
    assert!(
        bad.is_empty(),
        "{what} is not the image at its point in time: blocks {:?}... differ ({} writes were in flight)",
        &bad[..bad.len().min(8)],
        open.len()
    );
}

#[test]
fn fleecing_exports_of_qemu_storage_daemon_back_up_point_in_time_while_a_writer_writes() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "vm.qcow2", 32);
    let base = raw_content(p, "vm.qcow2");
    let mut qsd = Daemon::start(p, "vm.qcow2");
    let writer = Writer::start(&qsd.uri("vm"), 32 << 20, 0x2545f4914f6cdd1d);
    std::thread::sleep(Duration::from_millis(300));
    // Night 1: a full backup; bitmap b0 starts with it.
    let cut1 = qsd.fleece(Some("b0"), None);
    let backup = qsd.uri("backup");
    let full = ok(p, &["backup", &backup, "full.qcow2", "--speed", "16M"]);
    qsd.unfleece(None);
    std::thread::sleep(Duration::from_millis(600));
    // Night 2: an incremental of what b0 recorded; b1 starts.
    let cut2 = qsd.fleece(Some("b1"), Some("b0"));
    let dirty = nbdinfo_dirty(&backup, "b0");
    let (_, seen) = qsd.reads(0);
    let inc = ok(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--source-bitmap",
            "b0",
            "--backing",
            "full.qcow2",
            &backup,
            "inc.qcow2",
            "--verify",
            "--speed",
            "8M",
        ],
    );
    let (reads, _) = qsd.reads(seen);
    qsd.unfleece(Some("b0"));
    std::thread::sleep(Duration::from_millis(200));
    let (log, failed) = writer.stop();
    assert!(failed.is_none(), "a write failed: {failed:?}");
    qsd.quit();
    // The writer wrote while both backups ran.
    let finished =
        |doc: &Value| humantime::parse_rfc3339(doc["finished"].as_str().unwrap()).unwrap();
    for (cut, doc) in [(cut1, &full), (cut2, &inc)] {
        let during = log
            .iter()
            .filter(|w| w.sent > cut.1 && w.done < finished(doc))
            .count();
        assert!(during > 5, "only {during} writes during a backup");
    }
    // Exactly QEMU's dirty clusters: read from the export (whole
    // clusters of the bitmap, nothing else), and the incremental's own.
    assert!(!dirty.is_empty());
    for &(s, l) in &reads {
        assert!(
            dirty.iter().any(|&(a, b)| a <= s && s + l <= b),
            "READ {s}+{l} outside QEMU's dirty map {dirty:?}"
        );
    }
    assert_eq!(crate::nbd_source::top_layer_ranges(p, "inc.qcow2"), dirty);
    assert_eq!(inc["source_bitmap"], "b0");
    // Each backup is the image at its cut; the chain restores with
    // qemu-img and with imgbackup.
    assert_point_in_time(
        "full.qcow2",
        &raw_content(p, "full.qcow2"),
        &base,
        &log,
        cut1,
    );
    assert_point_in_time("inc.qcow2", &raw_content(p, "inc.qcow2"), &base, &log, cut2);
    qemu_img(p, &["convert", "-O", "raw", "inc.qcow2", "inc.raw"]);
    run_ok(p, &["restore", "inc.qcow2", "restored.raw"]);
    assert!(identical(p, "inc.raw", "restored.raw"));
    check_clean(p, "inc.qcow2");
    run_ok(p, &["verify", "inc.qcow2"]);
    // And it is not the image as it was at the end: the check can fail.
    let end = raw_content(p, "vm.qcow2");
    assert!(end != raw_content(p, "inc.raw"));
}
