//! Opening a source: one function ([`open`]) that probes the image once,
//! builds its backing chain, and returns the graph's read side (the chain
//! node over every layer). Backing names are resolved by the storage the
//! image lives in ([`SourceSpec::resolve_backing`], imago's
//! `resolve_relative_path`): relative to the directory of a file today, so
//! a source that is not a file (an NBD export) is one more arm here.

use super::BlockNode;
use super::chain::ChainNode;
use super::probe::{Format, Image, Layer, LayerInfo, open_file, probe_file};
use super::qcow2::Qcow2Layer;
use super::raw::RawNode;
use crate::error::{BlockError, Op, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest backing chain imgbackup follows.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Where a source lives, and its format if known (None: probe it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A file or block device.
    File {
        /// Its path.
        path: PathBuf,
        /// Its format (None: probed from its magic).
        format: Option<Format>,
    },
}

impl SourceSpec {
    /// A file source.
    pub fn file(path: &Path, format: Option<Format>) -> SourceSpec {
        SourceSpec::File {
            path: path.to_path_buf(),
            format,
        }
    }

    /// The name to show in messages.
    pub fn display(&self) -> String {
        match self {
            SourceSpec::File { path, .. } => path.display().to_string(),
        }
    }

    /// Where the backing file `name` (with `format`, if the image says)
    /// of this image lives: QEMU's rules for files (a relative name is
    /// relative to this image's directory; protocol prefixes are refused).
    pub fn resolve_backing(&self, name: &str, format: Option<Format>) -> Result<SourceSpec> {
        match self {
            SourceSpec::File { path, .. } => Ok(SourceSpec::File {
                path: resolve_backing(path, name)?,
                format,
            }),
        }
    }
}

/// Open `spec` read-only with its backing chain.
pub fn open(spec: &SourceSpec) -> Result<Image> {
    let mut seen = HashSet::new();
    let (node, layers) = open_chain(spec, &mut seen, 0)?;
    Ok(Image { node, layers })
}

type Opened = (Arc<dyn BlockNode>, Vec<Layer>);

fn open_chain(spec: &SourceSpec, seen: &mut HashSet<PathBuf>, depth: usize) -> Result<Opened> {
    let SourceSpec::File { path, format } = spec;
    let (path, format) = (path.as_path(), *format);
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
            let bspec = spec.resolve_backing(name, bformat)?;
            let SourceSpec::File { path: bpath, .. } = &bspec;
            if !bpath.exists() {
                return Err(BlockError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!(
                        "backing file '{name}' not found (looked for {}); restore it, or rebase the image with `qemu-img rebase`",
                        bpath.display()
                    ),
                });
            }
            let (bnode, mut blayers) = open_chain(&bspec, seen, depth + 1)?;
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
