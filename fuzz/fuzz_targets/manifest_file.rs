//! A manifest file from the fuzzer (version 1 or 2): open (validate), then
//! read digests, its data runs and its root.
#![no_main]
use imgbackup::manifest::ManifestFile;
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let Ok(mut f) = tempfile::NamedTempFile::new() else { return };
    if f.write_all(data).is_err() {
        return;
    }
    if let Ok(m) = ManifestFile::open(f.path()) {
        let _ = m.digests(0, m.meta.chunks.min(1000));
        let _ = m.data_runs(0, m.meta.chunks);
        let _ = m.compute_root();
    }
});
