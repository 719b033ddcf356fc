//! A manifest's chunk digests: 64 KiB chunks hashed one by one (SHA-256,
//! BLAKE3) against SHA-256 of several chunks at once
//! ([`imgbackup::manifest::sha256x::digest_many`]), 2 MiB (a copy request's
//! worth) per iteration.
//!
//! `cargo bench --bench digests`

use divan::counter::BytesCount;
use imgbackup::manifest::DigestAlgo;
use imgbackup::manifest::sha256x::digest_many;

fn main() {
    divan::main();
}

const CHUNK: usize = 64 << 10;
const REQUEST: usize = 2 << 20;

fn request() -> Vec<u8> {
    imgbackup::noise(1, REQUEST)
}

#[divan::bench]
fn sha256_one_by_one(b: divan::Bencher) {
    let data = request();
    b.counter(BytesCount::new(REQUEST)).bench(|| {
        data.chunks(CHUNK)
            .map(|c| DigestAlgo::Sha256.hash(divan::black_box(c)))
            .collect::<Vec<_>>()
    });
}

#[divan::bench]
fn sha256_many(b: divan::Bencher) {
    let data = request();
    let msgs: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let mut out = vec![[0u8; 32]; msgs.len()];
    b.counter(BytesCount::new(REQUEST)).bench_local(|| {
        digest_many(divan::black_box(&msgs), &mut out);
    });
}

#[divan::bench]
fn blake3_one_by_one(b: divan::Bencher) {
    let data = request();
    b.counter(BytesCount::new(REQUEST)).bench(|| {
        data.chunks(CHUNK)
            .map(|c| DigestAlgo::Blake3.hash(divan::black_box(c)))
            .collect::<Vec<_>>()
    });
}
