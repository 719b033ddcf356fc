//! qcow2: header validation, the read-only source layer (qcow2-rs behind an
//! adapter) and imgbackup's own writer for new files.

pub mod deflate;
pub mod header;
pub mod inplace;
pub mod reader;
pub mod writer;

pub use header::Header;
pub use reader::Qcow2Layer;
pub use writer::{Compression, CreateOptions, Qcow2Writer};
