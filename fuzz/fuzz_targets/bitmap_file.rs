//! An imgbackup bitmap file from the fuzzer: parse, and round-trip what
//! parses.
#![no_main]
use imgbackup::bitmap::Bitmap;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Bitmap::from_bytes("fuzz", Path::new("fuzz.bitmap"), data) {
        let again = Bitmap::from_bytes("fuzz", Path::new("fuzz.bitmap"), &b.to_bytes()).expect("round trip");
        assert_eq!(again, b);
        let _ = b.dirty_ranges();
    }
});
