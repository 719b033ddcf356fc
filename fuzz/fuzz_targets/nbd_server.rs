//! A client byte stream from the fuzzer, served by the NBD server over an
//! in-memory 1 MiB export: negotiation, then requests. The server must
//! answer or drop the client, never panic or hang.
#![no_main]
use imgbackup::nbd::{DirtyRuns, Export, Server};
use imgbackup::node::BlockNode;
use imgbackup::node::mem::MemNode;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

fuzz_target!(|data: &[u8]| {
    let node: Arc<dyn BlockNode> = Arc::new(MemNode::new("fuzz", vec![0u8; 1 << 20], 65536));
    let dirty: DirtyRuns = Arc::new(|pos, len| (pos % 3 == 0, len.min(4096)));
    let server = Server::new(
        Export {
            name: String::new(),
            description: "fuzz".into(),
            node,
            read_only: data.first().is_some_and(|b| b & 1 == 1),
            bitmaps: vec![("b".into(), dirty)],
            on_flush: None,
        },
        Arc::new(AtomicBool::new(false)),
    );
    let reader = std::io::Cursor::new(data.to_vec());
    let _ = server.serve(Box::new(reader), Box::new(std::io::sink()));
});
