//! Helpers shared by the integration tests: the real executable, and the
//! QEMU tools as oracles.

#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The imgbackup executable under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imgbackup"))
}

/// Run imgbackup with `args` in `dir`.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    bin()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run imgbackup")
}

/// Exit code (signals as 128+n).
pub fn code(o: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    o.status
        .code()
        .unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0))
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a tool and require success.
pub fn tool(dir: &Path, prog: &str, args: &[&str]) -> Output {
    let o = Command::new(prog)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

pub fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    tool(dir, "qemu-img", args)
}

/// Apply qemu-io commands to an image (format given explicitly).
pub fn qemu_io(dir: &Path, fmt: &str, img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    tool(dir, "qemu-io", &args);
}

/// `qemu-img compare` (formats probed): true when identical.
pub fn identical(dir: &Path, a: &str, b: &str) -> bool {
    let o = Command::new("qemu-img")
        .current_dir(dir)
        .args(["compare", a, b])
        .output()
        .expect("qemu-img compare");
    o.status.code() == Some(0)
}

/// `qemu-img compare` with explicit formats.
pub fn identical_fmt(dir: &Path, a: &str, fa: &str, b: &str, fb: &str) -> bool {
    let o = Command::new("qemu-img")
        .current_dir(dir)
        .args(["compare", "-f", fa, "-F", fb, a, b])
        .output()
        .expect("qemu-img compare");
    o.status.code() == Some(0)
}

/// `qemu-img check` must find no errors and no leaks.
pub fn check_clean(dir: &Path, img: &str) {
    let o = Command::new("qemu-img")
        .current_dir(dir)
        .args(["check", img])
        .output()
        .expect("qemu-img check");
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img check {img}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img info --output=json`.
pub fn info_json(dir: &Path, img: &str) -> serde_json::Value {
    let o = qemu_img(dir, &["info", "--output=json", img]);
    serde_json::from_slice(&o.stdout).expect("qemu-img info json")
}

/// `qemu-img map --output=json` of the image alone (no backing).
pub fn map_json(dir: &Path, img: &str) -> Vec<serde_json::Value> {
    let o = qemu_img(dir, &["map", "--output=json", img]);
    serde_json::from_slice(&o.stdout).expect("qemu-img map json")
}

pub fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex(&Sha256::digest(&data))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The image's content as a guest sees it: `qemu-img convert -O raw`.
pub fn raw_content(dir: &Path, img: &str) -> Vec<u8> {
    let out = dir.join(format!("{img}.content.raw").replace('/', "_"));
    let o = out.to_string_lossy().into_owned();
    qemu_img(dir, &["convert", "-O", "raw", img, &o]);
    let data = std::fs::read(&out).expect("read converted");
    std::fs::remove_file(&out).ok();
    data
}

/// Bytes a file occupies on disk.
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgbackup-test")
        .tempdir()
        .expect("tempdir")
}

/// The repository's testdata directory.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// A small qcow2 with data, a zero range and holes: 16 MiB virtual.
pub fn make_qcow2(dir: &Path, name: &str, opts: &str) {
    let mut args = vec!["create", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(name);
    args.push("16M");
    qemu_img(dir, &args);
    qemu_io(
        dir,
        "qcow2",
        name,
        &[
            "write -P 0x11 0 300k",
            "write -P 0x22 5M 64k",
            "write -z 8M 1M",
            "write -P 0x33 15M 1M",
            "write -P 0x44 12345 777",
        ],
    );
}

/// A sparse raw file with some data: `size` bytes.
pub fn make_raw(dir: &Path, name: &str, size: &str) {
    qemu_img(dir, &["create", "-f", "raw", name, size]);
    qemu_io(
        dir,
        "raw",
        name,
        &[
            "write -P 0x5a 0 64k",
            "write -P 0x6b 1M 200k",
            "write -P 0x7c 3M 4k",
        ],
    );
}

/// Parse a SIZE the way the CLI does (tests only).
pub fn parse_size(s: &str) -> u64 {
    imgbackup::cli::parse::parse_size(s).expect("size")
}

/// The root digest of an image computed independently of imgbackup: sha256
/// over the sha256 of every `chunk`-byte piece of `qemu-img convert -O raw`.
pub fn independent_root(dir: &Path, img: &str, chunk: usize) -> String {
    let data = raw_content(dir, img);
    let mut root = Sha256::new();
    for piece in data.chunks(chunk) {
        root.update(Sha256::digest(piece));
    }
    hex(&root.finalize())
}

/// Run imgbackup with `--json` and parse the document (any exit code).
pub fn json_run(dir: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = run_in(dir, &a);
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (code(&o), v, stderr(&o))
}

/// Wait (up to 10 s) until `path` exists; a daemon's socket, a job's
/// partial file.
pub fn wait_for(path: &Path) {
    let t = std::time::Instant::now();
    while !path.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Send `sig` to a child process.
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: signalling a child process this test started.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Run imgbackup with `--json`, require exit 0, return the document.
pub fn ok(p: &Path, args: &[&str]) -> serde_json::Value {
    let (rc, doc, err) = json_run(p, args);
    assert_eq!(rc, 0, "{args:?}: {err}");
    doc
}

/// Dirty granules of bitmap `name` of `img`.
pub fn dirty(p: &Path, img: &str, name: &str) -> u64 {
    ok(p, &["bitmap", "show", img, name])["dirty_granules"]
        .as_u64()
        .expect("dirty_granules")
}

/// A raw image of `mib` MiB, every MiB filled with its own pattern.
pub fn data_disk(p: &Path, name: &str, mib: u64) {
    qemu_img(p, &["create", "-f", "raw", name, &format!("{mib}M")]);
    let cmds: Vec<String> = (0..mib)
        .map(|i| format!("write -P {} {i}M 1M", i % 250 + 1))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(p, "raw", name, &cmds);
}

/// Wait (up to 10 s) until the bitmap file at `path` is marked in use
/// (flag bit 1 of the big-endian flags at byte 12).
pub fn wait_for_bitmap_in_use(path: &Path) {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(10) {
        if let Ok(b) = std::fs::read(path)
            && b.len() > 16
            && b[15] & 2 != 0
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
