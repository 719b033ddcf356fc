//! A qcow2 file from the fuzzer: header validation, then the L1/L2 checks
//! and reads of the first clusters. Nothing may panic or hang.
#![no_main]
use imgbackup::node::probe::{Format, open_image};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let Ok(mut f) = tempfile::NamedTempFile::new() else { return };
    if f.write_all(data).is_err() {
        return;
    }
    let Ok(img) = open_image(f.path(), Some(Format::Qcow2)) else { return };
    let node = &img.node;
    let size = node.size();
    let mut pos = 0;
    let mut buf = vec![0u8; 65536];
    // Walk the first 8 MiB: block status and reads.
    while pos < size.min(8 << 20) {
        let Ok(ext) = node.block_status(pos, size.min(8 << 20) - pos) else { break };
        let n = ext.len.min(buf.len() as u64) as usize;
        if node.read(pos, &mut buf[..n]).is_err() {
            break;
        }
        pos += n as u64;
    }
});
