//! Opening an image: format probing, the backing chain, and a description
//! of every layer for `info`.

use super::BlockNode;
use super::chain::ChainNode;
use super::qcow2::{Qcow2Layer, header};
use super::raw::RawNode;
use crate::error::{BlockError, Op, Result};
use crate::files::Kind;
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest backing chain imgbackup follows.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// An image format imgbackup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
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
pub struct Layer {
    /// What info shows of it.
    pub info: LayerInfo,
    /// The layer alone (Unallocated where it holds nothing).
    pub node: Arc<dyn BlockNode>,
}

/// An opened image: the whole view and its chain of layers.
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

fn probe_file(path: &Path, f: &File) -> Result<Format> {
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

/// Open `path` read-only with its backing chain. `format` skips probing of
/// the top image.
pub fn open_image(path: &Path, format: Option<Format>) -> Result<Image> {
    let mut seen = HashSet::new();
    let (node, layers) = open_chain(path, format, &mut seen, 0)?;
    Ok(Image { node, layers })
}

type Opened = (Arc<dyn BlockNode>, Vec<Layer>);

fn open_chain(
    path: &Path,
    format: Option<Format>,
    seen: &mut HashSet<PathBuf>,
    depth: usize,
) -> Result<Opened> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(BlockError::Unsupported {
            path: path.to_path_buf(),
            detail: format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
        });
    }
    let canon = std::fs::canonicalize(path).map_err(|e| BlockError::io(Op::Open, path, 0, 0, e))?;
    if !seen.insert(canon) {
        return Err(BlockError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            detail: "the backing chain loops back to this image".into(),
        });
    }
    let (file, kind) = open_file(path)?;
    let format = match format {
        Some(f) => f,
        None => probe_file(path, &file)?,
    };
    let disk_usage = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
    };
    match format {
        Format::Raw => {
            let raw = Arc::new(RawNode::from_image_file(path, file, kind)?);
            let file_length = raw.file_len();
            let info = LayerInfo {
                path: path.to_path_buf(),
                format,
                virtual_size: raw.size(),
                cluster_size: raw.cluster_size(),
                file_length,
                disk_usage: disk_usage(path),
                backing_file: None,
                backing_format: None,
                qcow2_version: None,
            };
            let node: Arc<dyn BlockNode> = raw;
            Ok((node.clone(), vec![Layer { info, node }]))
        }
        Format::Qcow2 => {
            let layer = Arc::new(Qcow2Layer::open_file(path, file, kind)?);
            let h = layer.header().clone();
            let info = LayerInfo {
                path: path.to_path_buf(),
                format,
                virtual_size: h.size,
                cluster_size: h.cluster_size(),
                file_length: layer.file_len(),
                disk_usage: disk_usage(path),
                backing_file: h.backing_file.clone(),
                backing_format: h.backing_format.clone(),
                qcow2_version: Some(h.version),
            };
            let top: Arc<dyn BlockNode> = layer;
            let Some(name) = &h.backing_file else {
                return Ok((top.clone(), vec![Layer { info, node: top }]));
            };
            let bpath = resolve_backing(path, name)?;
            let bformat = match h.backing_format.as_deref() {
                None => None,
                Some("raw") => Some(Format::Raw),
                Some("qcow2") => Some(Format::Qcow2),
                Some(other) => {
                    return Err(BlockError::Unsupported {
                        path: path.to_path_buf(),
                        detail: format!(
                            "backing file format '{other}' (imgbackup reads raw and qcow2)"
                        ),
                    });
                }
            };
            if !bpath.exists() {
                return Err(BlockError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!(
                        "backing file '{name}' not found (looked for {}); restore it, or rebase the image with `qemu-img rebase`",
                        bpath.display()
                    ),
                });
            }
            let (bnode, mut blayers) = open_chain(&bpath, bformat, seen, depth + 1)?;
            let node: Arc<dyn BlockNode> = Arc::new(ChainNode::new(top.clone(), Some(bnode)));
            let mut layers = vec![Layer { info, node: top }];
            layers.append(&mut blayers);
            Ok((node, layers))
        }
    }
}

/// Resolve a backing file name the way QEMU does: relative names are
/// relative to the directory of the image that names them.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf> {
    let is_protocol = name.starts_with("json:")
        || name.split_once(':').is_some_and(|(p, _)| {
            !p.is_empty()
                && !p.contains('/')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-')
        });
    if is_protocol {
        return Err(BlockError::Unsupported {
            path: image.to_path_buf(),
            detail: format!(
                "backing file '{name}' names a protocol; imgbackup follows plain file names only"
            ),
        });
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let dir = image.parent().unwrap_or(Path::new("."));
    Ok(dir.join(p))
}
