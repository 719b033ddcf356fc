//! Value parsers for the command line: the grammar of SIZE, DURATION, RATE
//! and worker counts lives in [`crate::units`] (the `--inject` and `--guest`
//! grammars use it too); clap turns their errors into exit code 2.

use crate::node::qcow2::Compression;
pub use crate::units::{
    parse_cluster_size, parse_duration, parse_jobs, parse_nonzero_size, parse_rate, parse_size,
};

/// `--compress=ALGO[:LEVEL]`.
pub fn parse_compression(s: &str) -> Result<Compression, String> {
    Compression::parse(s)
}
