//! A qcow2 bitmap directory from the fuzzer.
#![no_main]
use imgbackup::bitmap::qcow2::parse_directory;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let count = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) % 1024;
    let _ = parse_directory(Path::new("fuzz.qcow2"), &data[4..], count);
});
