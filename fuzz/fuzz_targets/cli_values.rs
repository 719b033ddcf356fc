//! The value parsers: SIZE, DURATION, RATE, guest SPEC, --inject RULE.
#![no_main]
use imgbackup::cli::parse::{parse_cluster_size, parse_duration, parse_rate, parse_size};
use imgbackup::guest::GuestSpec;
use imgbackup::node::fault::Rule;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = parse_size(s);
    let _ = parse_cluster_size(s);
    let _ = parse_duration(s);
    let _ = parse_rate(s);
    if let Ok(g) = s.parse::<GuestSpec>() {
        let mut p = imgbackup::guest::Plan::new(&g, 1 << 30, 0);
        for _ in 0..16 {
            let _ = p.next_write();
        }
    }
    let _ = s.parse::<Rule>();
});
