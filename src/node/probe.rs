//! Opening an image: format probing, the backing chain, and a description
//! of every layer for `info`.

use super::BlockNode;
use super::qcow2::header;
use crate::error::{BlockError, Op, Result};
use crate::files::Kind;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use super::graph::MAX_CHAIN_DEPTH;

/// An image format imgbackup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A raw image: the bytes are the disk.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// The format of a new file named `path`: qcow2 when it ends in `.qcow2`,
/// else `otherwise`.
pub fn format_for(path: &Path, otherwise: Format) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("qcow2") => Format::Qcow2,
        _ => otherwise,
    }
}

/// What `info` shows of one layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerInfo {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// Cluster size, bytes (512 for raw).
    pub cluster_size: u64,
    /// Length of the file on the host.
    pub file_length: u64,
    /// Bytes the file occupies on disk.
    pub disk_usage: u64,
    /// The backing file name as written in the image, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The backing file format as written.
    pub backing_format: Option<String>,
    /// qcow2 version (2 or 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_version: Option<u32>,
}

/// One layer of an opened image.
#[derive(Clone)]
pub struct Layer {
    /// What info shows of it.
    pub info: LayerInfo,
    /// The layer alone (Unallocated where it holds nothing).
    pub node: Arc<dyn BlockNode>,
}

/// An opened image: the whole view and its chain of layers.
#[derive(Clone)]
pub struct Image {
    /// Reads the image as a guest sees it (through its backing chain).
    pub node: Arc<dyn BlockNode>,
    /// Top first.
    pub layers: Vec<Layer>,
}

impl Image {
    /// The top layer alone.
    pub fn top(&self) -> &Arc<dyn BlockNode> {
        &self.layers[0].node
    }
}

/// Probe the format of `path` by its magic: qcow2 or else raw.
pub fn probe(path: &Path) -> Result<Format> {
    let (f, _) = open_file(path)?;
    probe_file(path, &f)
}

pub(super) fn probe_file(path: &Path, f: &File) -> Result<Format> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read_at(&mut magic[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BlockError::io(Op::Read, path, 0, 4, e)),
        }
    }
    Ok(if got == 4 && header::has_magic(&magic) {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Open an image file read-only: a regular file or a block device, never
/// a directory, character device, FIFO or socket (refused without
/// blocking).
pub fn open_file(path: &Path) -> Result<(File, Kind)> {
    crate::files::open_image_file(path, false).map_err(|e| match e {
        crate::files::KindError::NotAnImage { what, .. } => BlockError::Invalid {
            path: path.to_path_buf(),
            detail: format!("{what}, not a disk image; name a regular file or a block device"),
        },
        crate::files::KindError::Io { source, .. } => BlockError::io(Op::Open, path, 0, 0, source),
    })
}

/// Open `path` read-only with its backing chain (see [`super::graph::open`]).
pub fn open_image(path: &Path, format: Option<Format>) -> Result<Image> {
    super::graph::open(&super::graph::SourceSpec::file(path, format))
}
