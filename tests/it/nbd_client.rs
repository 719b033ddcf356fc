//! The NBD client (the ground of NBD sources, SPEC §9) against QEMU's own
//! server, qemu-nbd: negotiation, reads with holes, base:allocation
//! against `qemu-img map`, errors, Unix and TCP.

use crate::fixture::*;
use imgbackup::nbd::client::{Client, ClientError, NbdUri};
use imgbackup::nbd::proto::NBD_STATE_ZERO;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// qemu-nbd serving `img` read-only as export `disk`, killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(p: &Path, img: &str, listen: &[&str]) -> QemuNbd {
        let mut args = vec!["-r", "-t", "-f", "qcow2", "-x", "disk"];
        args.extend_from_slice(listen);
        args.push(img);
        QemuNbd(
            Command::new("qemu-nbd")
                .current_dir(p)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-nbd"),
        )
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect(uri: &str, contexts: &[&str]) -> Client {
    let u = NbdUri::parse(uri).unwrap();
    let t = std::time::Instant::now();
    loop {
        match Client::connect(&u, contexts) {
            Ok(c) => return c,
            Err(ClientError::Io(_)) if t.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{uri}: {e}"),
        }
    }
}

#[test]
fn reads_and_block_status_from_qemu_nbd_equal_qemu_img() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "disk.qcow2", "");
    let sock = p.join("nbd.sock");
    let _srv = QemuNbd::start(p, "disk.qcow2", &["--socket", &sock.display().to_string()]);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let c = connect(&uri, &["base:allocation"]);
    assert_eq!(c.info.size, 16 << 20);
    let alloc = c
        .context("base:allocation")
        .expect("base:allocation selected");
    // Every byte, in requests of the server's preferred size or more.
    let want = raw_content(p, "disk.qcow2");
    let chunk = (c.info.block_size.2 as usize).min(4 << 20);
    let mut got = vec![0xffu8; want.len()];
    for (k, part) in got.chunks_mut(chunk).enumerate() {
        c.read((k * chunk) as u64, part, &|| false).unwrap();
    }
    assert!(got == want, "the export read differs from qemu-img convert");
    // base:allocation: what is not reported as zero is qemu-img map's data.
    let mut pos = 0u64;
    let mut nonzero = Vec::new();
    while pos < c.info.size {
        let len = (c.info.size - pos).min(1 << 30) as u32;
        for (n, flags) in c.block_status(pos, len, alloc, &|| false).unwrap() {
            if flags & NBD_STATE_ZERO == 0 {
                nonzero.push((pos, pos + u64::from(n)));
            }
            pos += u64::from(n);
        }
    }
    let qmap = map_json(p, "disk.qcow2");
    let data = qmap
        .iter()
        .filter(|e| e["data"] == true && e["zero"] == false)
        .map(|e| {
            let (o, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            (o, o + l)
        });
    assert_eq!(merge_ranges(nonzero), merge_ranges(data));
    // A request past the end fails with the server's error; the
    // connection goes on.
    let mut buf = vec![0u8; 4096];
    match c.read(c.info.size - 512, &mut buf, &|| false) {
        Err(ClientError::Request { errno, .. }) => assert_ne!(errno, 0),
        other => panic!("a read past the end: {other:?}"),
    }
    c.read(0, &mut buf, &|| false).unwrap();
    assert_eq!(buf[..], want[..4096]);
    c.disconnect().unwrap();
    // An export the server does not have is refused by name.
    let bad = NbdUri::parse(&format!("nbd+unix:///nope?socket={}", sock.display())).unwrap();
    match Client::connect(&bad, &[]) {
        Err(e @ ClientError::Refused { .. }) => assert!(e.to_string().contains("nope"), "{e}"),
        Err(e) => panic!("unknown export: {e}"),
        Ok(_) => panic!("an unknown export was accepted"),
    }
}

#[test]
fn tcp_exports_are_read_too() {
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "disk.qcow2", "");
    // A free port: bind, note it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let _srv = QemuNbd::start(p, "disk.qcow2", &["-b", "127.0.0.1", "-p", &port_s]);
    let c = connect(&format!("nbd://127.0.0.1:{port}/disk"), &[]);
    let want = raw_content(p, "disk.qcow2");
    let mut got = vec![0u8; 1 << 20];
    c.read(5 << 20, &mut got, &|| false).unwrap();
    assert!(got[..] == want[5 << 20..6 << 20]);
    assert!(c.context("base:allocation").is_none());
}

#[test]
fn an_export_as_a_source_node_reads_in_parallel_and_reconnects() {
    use imgbackup::node::nbd::NbdNode;
    use imgbackup::node::{BlockNode, Status, for_each_extent};
    let d = tempdir();
    let p = d.path();
    make_qcow2(p, "disk.qcow2", "");
    let sock = p.join("nbd.sock");
    let sock_s = sock.display().to_string();
    let srv = QemuNbd::start(p, "disk.qcow2", &["--socket", &sock_s]);
    let uri = format!("nbd+unix:///disk?socket={sock_s}");
    drop(connect(&uri, &[])); // wait for the server
    let node =
        std::sync::Arc::new(NbdNode::open(NbdUri::parse(&uri).unwrap(), &uri, &[], None).unwrap());
    assert_eq!(node.size(), 16 << 20);
    let want = std::sync::Arc::new(raw_content(p, "disk.qcow2"));
    // Four readers at once, each its own connection from the pool.
    let readers: Vec<_> = (0..4u64)
        .map(|k| {
            let (node, want) = (node.clone(), want.clone());
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    let at = ((k * 16 + i) % 64) * (256 << 10);
                    let mut buf = vec![0u8; 256 << 10];
                    node.read(at, &mut buf).unwrap();
                    assert!(
                        buf[..] == want[at as usize..at as usize + buf.len()],
                        "at {at}"
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    // Block status: every byte qemu-img maps as data is data here, and
    // what is reported as zeros reads as zeros.
    let mut data = Vec::new();
    let mut zero = Vec::new();
    for_each_extent(node.as_ref(), 0, node.size(), |pos, ext| {
        let r = (pos, pos + ext.len);
        match ext.status {
            Status::Data => data.push(r),
            _ => zero.push(r),
        }
    })
    .unwrap();
    let data = merge_ranges(data);
    for e in map_json(p, "disk.qcow2")
        .iter()
        .filter(|e| e["data"] == true && e["zero"] == false)
    {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert!(
            data.iter().any(|&(a, b)| a <= s && s + l <= b),
            "{s}+{l} is data in qemu-img map but not in the export's status: {data:?}"
        );
    }
    for (a, b) in merge_ranges(zero) {
        assert!(
            want[a as usize..b as usize].iter().all(|&x| x == 0),
            "{a}..{b}"
        );
    }
    // The server goes away: reads fail; it comes back: the next read
    // connects again.
    drop(srv);
    let mut buf = vec![0u8; 4096];
    assert!(node.read(0, &mut buf).is_err());
    let _srv = QemuNbd::start(p, "disk.qcow2", &["--socket", &sock_s]);
    drop(connect(&uri, &[]));
    node.read(0, &mut buf).unwrap();
    assert_eq!(buf[..], want[..4096]);
}
