//! Deflate of 64 KiB clusters with QEMU's 4 KiB window: imgbackup's
//! encoder ([`imgbackup::node::qcow2::deflate::Deflater`]) at levels 1, 6
//! and 9 against zlib-rs (what imgbackup used before) at 6 and 9, on
//! realistic data: the first 16 MiB of files under /usr/lib and
//! /usr/share (binaries, libraries, text). Prints each one's output size
//! once, then times them.
//!
//! `cargo bench --bench deflate`

use divan::counter::BytesCount;
use imgbackup::node::qcow2::deflate::Deflater;
use std::sync::OnceLock;

fn main() {
    let data = clusters();
    let total = data.len() * CLUSTER;
    eprintln!("{} clusters, {total} bytes from /usr", data.len());
    for level in [1, 6, 9] {
        eprintln!("imgbackup level {level}: {} bytes", ours(level));
    }
    for level in [6, 9] {
        eprintln!("zlib-rs level {level}: {} bytes", zlib_rs(level));
    }
    divan::main();
}

const CLUSTER: usize = 64 << 10;
const SAMPLE: usize = 16 << 20;

/// Non-zero 64 KiB clusters of files under /usr, in a fixed order.
fn clusters() -> &'static Vec<Vec<u8>> {
    static DATA: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    DATA.get_or_init(|| {
        let mut files = Vec::new();
        let mut dirs = vec![
            std::path::PathBuf::from("/usr/lib"),
            std::path::PathBuf::from("/usr/share"),
        ];
        while let Some(d) = dirs.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            entries.sort();
            for p in entries {
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => dirs.push(p),
                    Ok(m) if m.is_file() => files.push(p),
                    _ => {}
                }
            }
        }
        let mut bytes = Vec::new();
        for f in files {
            if bytes.len() >= SAMPLE {
                break;
            }
            if let Ok(b) = std::fs::read(&f) {
                bytes.extend_from_slice(&b);
            }
        }
        bytes
            .chunks_exact(CLUSTER)
            .filter(|c| c.iter().any(|&b| b != 0))
            .map(<[u8]>::to_vec)
            .take(SAMPLE / CLUSTER)
            .collect()
    })
}

fn ours(level: u32) -> usize {
    let mut d = Deflater::new();
    let mut out = vec![0u8; CLUSTER - 1];
    clusters()
        .iter()
        .map(|c| d.compress(c, level, &mut out).unwrap_or(CLUSTER))
        .sum()
}

fn zlib_rs(level: u32) -> usize {
    let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::new(level), false, 12);
    let mut out = vec![0u8; CLUSTER - 1];
    clusters()
        .iter()
        .map(|c| {
            z.reset();
            match z.compress(c, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => z.total_out() as usize,
                _ => CLUSTER,
            }
        })
        .sum()
}

#[divan::bench(args = [1, 6, 9], sample_count = 5)]
fn imgbackup(b: divan::Bencher, level: u32) {
    b.counter(BytesCount::new(clusters().len() * CLUSTER))
        .bench(|| ours(divan::black_box(level)));
}

#[divan::bench(args = [6, 9], sample_count = 5)]
fn zlib_rs_deflate(b: divan::Bencher, level: u32) {
    b.counter(BytesCount::new(clusters().len() * CLUSTER))
        .bench(|| zlib_rs(divan::black_box(level)));
}
