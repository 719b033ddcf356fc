//! The copy bitmap and the claim path at terabyte scale: the cost of a
//! whole job's claims must follow the number of claims (linear in the
//! image for data, in the extents for holes), never the image squared.
//!
//! `cargo bench --bench claims`

use imgbackup::bitmap::Bits;
use imgbackup::copy::{BlockCopy, Config};
use imgbackup::error::Result;
use imgbackup::job::cancel::Cancel;
use imgbackup::node::{BlockNode, Extent, Status};
use std::path::Path;
use std::sync::Arc;

fn main() {
    divan::main();
}

const CS: u64 = 64 << 10;
const GIB: u64 = 1 << 30;

/// An image of `size` bytes that holds data everywhere, or nothing.
struct Virtual {
    size: u64,
    data: bool,
}

impl BlockNode for Virtual {
    fn path(&self) -> &Path {
        Path::new("virtual")
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> u64 {
        CS
    }
    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> Result<Extent> {
        let status = if self.data {
            Status::Data
        } else {
            Status::Unallocated
        };
        Ok(Extent { status, len })
    }
}

fn state(size: u64, data: bool) -> BlockCopy {
    let src = Arc::new(Virtual { size, data });
    let tgt = Arc::new(Virtual { size, data: false });
    BlockCopy::new(
        src,
        tgt,
        Config {
            cluster_size: CS,
            max_chunk: 2 << 20,
            write_zeroes: false,
            speed: None,
            compress: false,
            cbw_cache: 0,
            copy_range: false,
        },
        Bits::full(size / CS),
        Cancel::new(),
        None,
    )
}

/// Every claim of a full copy bitmap, claimed and released (no copying):
/// 2 MiB claims over images of 64 GiB to 1 TiB.
#[divan::bench(args = [64, 256, 1024])]
fn claim_all_data(bencher: divan::Bencher, gib: u64) {
    bencher
        .with_inputs(|| state(gib * GIB, true))
        .bench_local_refs(|bc| {
            while let Some(c) = bc.claim_next() {
                bc.release(c, true);
            }
        });
}

/// An empty image: the hole map, then every claim (each covers up to
/// 64 MiB of hole).
#[divan::bench(args = [64, 256, 1024])]
fn claim_all_holes(bencher: divan::Bencher, gib: u64) {
    bencher
        .with_inputs(|| state(gib * GIB, false))
        .bench_local_refs(|bc| {
            bc.map_holes();
            while let Some(c) = bc.claim_next() {
                bc.release(c, true);
            }
        });
}

/// The end of a run in a full bitmap of a 1 TiB image, looked for with
/// and without a bound.
#[divan::bench]
fn next_clear_bounded(bencher: divan::Bencher) {
    let b = Bits::full(16 << 20);
    bencher.bench_local(|| b.next_clear_in(divan::black_box(1000), 1032));
}

/// The same search unbounded: the whole bitmap (what every claim cost
/// before the bound).
#[divan::bench]
fn next_clear_unbounded(bencher: divan::Bencher) {
    let b = Bits::full(16 << 20);
    bencher.bench_local(|| b.next_clear(divan::black_box(1000)));
}
