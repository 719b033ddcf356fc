//! The qcow2 header: parsing and validation the way QEMU's `qcow2_do_open`
//! validates it, before any library sees the file.
//!
//! Layout (docs/interop/qcow2.rst, all fields big-endian):
//!
//! ```text
//!   0 magic "QFI\xfb"          4 version (2 or 3)
//!   8 backing_file_offset     16 backing_file_size
//!  20 cluster_bits            24 size (virtual, bytes)
//!  32 crypt_method            36 l1_size (entries)
//!  40 l1_table_offset         48 refcount_table_offset
//!  56 refcount_table_clusters 60 nb_snapshots
//!  64 snapshots_offset        -- version 3 only: --
//!  72 incompatible_features   80 compatible_features
//!  88 autoclear_features      96 refcount_order
//! 100 header_length          104 compression_type (if header_length > 104)
//! ```
//!
//! followed by header extensions (type u32, length u32, data padded to 8)
//! up to an end marker of type 0.

use crate::error::BlockError;
use std::path::Path;

/// The qcow2 magic.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of a version 2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Length of a version 3 header (without the compression type).
pub const V3_HEADER_LEN: usize = 104;
/// Smallest cluster_bits (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the active L1 table (QCOW_MAX_L1_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (QCOW_MAX_REFTABLE_SIZE).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on internal snapshots (QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;

/// L1/L2 entry flag: the cluster's refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry flag: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (version 3): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// The host offset bits of an L1 or standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// End of the header extensions.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: encryption.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: external data file.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: dirty (refcounts need a rebuild).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is valid.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// The bitmaps header extension (used by `bitmap import`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Bitmap directory size, bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// A validated qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size, bytes.
    pub size: u64,
    /// Encryption method (0: none).
    pub crypt_method: u32,
    /// L1 table entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header, bytes.
    pub header_length: u32,
    /// Compression type (0 zlib, 1 zstd).
    pub compression_type: u8,
    /// The backing file name as written.
    pub backing_file: Option<String>,
    /// The backing file format as written.
    pub backing_format: Option<String>,
    /// The bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Names from the feature-name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// True when `buf` starts with the qcow2 magic.
pub fn has_magic(buf: &[u8]) -> bool {
    buf.len() >= 4 && buf[..4] == MAGIC
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of L1 entries needed to map `size` bytes.
    pub fn l1_entries_needed(&self) -> u64 {
        let l2_bytes = self.cluster_size() * (self.cluster_size() / 8);
        self.size.div_ceil(l2_bytes)
    }

    /// Parse and validate. `buf` holds the start of the file (at least the
    /// first cluster, or the whole file if it is shorter); `file_len` is the
    /// file's length.
    pub fn parse(path: &Path, buf: &[u8], file_len: u64) -> Result<Header, BlockError> {
        let corrupt = |detail: String| BlockError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            detail,
        };
        let unsupported = |detail: String| BlockError::Unsupported {
            path: path.to_path_buf(),
            detail,
        };
        if buf.is_empty() {
            return Err(BlockError::Invalid {
                path: path.to_path_buf(),
                detail: "the file is empty, not a qcow2 image".into(),
            });
        }
        if !has_magic(buf) {
            return Err(BlockError::Invalid {
                path: path.to_path_buf(),
                detail: "not a qcow2 image (bad magic); if it is a raw image, pass --format raw"
                    .into(),
            });
        }
        if buf.len() < V2_HEADER_LEN {
            return Err(corrupt(format!(
                "truncated header: the file has {} bytes, a qcow2 header needs at least {}",
                buf.len(),
                V2_HEADER_LEN
            )));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!(
                "qcow2 version {version} (only 2 and 3 exist)"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} is out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
            feature_names: Vec::new(),
        };
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);

        if version == 3 {
            if buf.len() < V3_HEADER_LEN {
                return Err(corrupt(format!(
                    "truncated header: the file has {} bytes, a version 3 header needs {}",
                    buf.len(),
                    V3_HEADER_LEN
                )));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if (h.header_length as usize) < V3_HEADER_LEN {
                return Err(corrupt(format!(
                    "header_length {} is shorter than the version 3 header ({V3_HEADER_LEN})",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(corrupt(format!(
                    "header_length {} is larger than the cluster size {cluster_size}",
                    h.header_length
                )));
            }
            if h.header_length as usize > buf.len() {
                return Err(corrupt(
                    "truncated header: the file ends inside the header".into(),
                ));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }

        let saw_data_file_ext = h.parse_extensions(path, buf, backing_file_offset)?;

        h.check_features(path, saw_data_file_ext)?;
        h.check_tables(path, file_len)?;

        // Backing file name.
        if backing_file_offset != 0 {
            if backing_file_size > 1023 {
                return Err(corrupt(format!(
                    "backing file name too long ({backing_file_size} bytes, at most 1023)"
                )));
            }
            let end = backing_file_offset.saturating_add(u64::from(backing_file_size));
            if end > cluster_size {
                return Err(corrupt(
                    "backing file name lies outside the first cluster".into(),
                ));
            }
            if end as usize > buf.len() {
                return Err(corrupt(
                    "truncated header: the file ends inside the backing file name".into(),
                ));
            }
            let name = &buf[backing_file_offset as usize..end as usize];
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| corrupt("backing file name is not valid UTF-8".into()))?;
            if !name.is_empty() {
                h.backing_file = Some(name);
            }
        }
        Ok(h)
    }

    /// Refuse feature bits, compression, encryption and sizes imgbackup
    /// cannot honour.
    fn check_features(&self, path: &Path, saw_data_file_ext: bool) -> Result<(), BlockError> {
        let corrupt = |detail: String| BlockError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            detail,
        };
        let unsupported = |detail: String| BlockError::Unsupported {
            path: path.to_path_buf(),
            detail,
        };
        let h = self;
        // Incompatible features: anything we cannot honour is refused.
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = h.incompatible_features & !known;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    match h
                        .feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && *bit == b)
                    {
                        Some((_, _, n)) => format!("bit {b} ({n})"),
                        None => format!("bit {b}"),
                    }
                })
                .collect();
            return Err(unsupported(format!(
                "unknown incompatible feature {}",
                names.join(", ")
            )));
        }
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "the image is marked corrupt by QEMU; repair it with `qemu-img check -r all` first"
                    .into(),
            ));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 || saw_data_file_ext {
            return Err(unsupported("external data file (data-file option)".into()));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (extended_l2=on)".into()));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            match h.compression_type {
                0 => {
                    return Err(corrupt(
                        "compression-type feature bit set with the default (zlib) compression type"
                            .into(),
                    ));
                }
                // zstd: compressed clusters are decompressed by the reader.
                1 => {}
                t => return Err(unsupported(format!("compression type {t}"))),
            }
        } else if h.compression_type != 0 {
            return Err(corrupt(format!(
                "compression type {} set without the compression-type feature bit",
                h.compression_type
            )));
        }
        if h.crypt_method != 0 {
            let what = match h.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown method",
            };
            return Err(unsupported(format!("encrypted image ({what} encryption)")));
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {} is out of range (0..=6)",
                h.refcount_order
            )));
        }
        if h.size > (1u64 << 62) {
            return Err(corrupt(format!("virtual size {} is too large", h.size)));
        }

        Ok(())
    }

    /// Check the L1, refcount and snapshot tables the way QEMU does.
    fn check_tables(&self, path: &Path, file_len: u64) -> Result<(), BlockError> {
        let corrupt = |detail: String| BlockError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            detail,
        };
        let h = self;
        let cluster_size = h.cluster_size();
        // L1 table (QEMU: "Active L1 table too large", "L1 table is too small").
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "active L1 table too large ({} entries, at most {})",
                h.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        if u64::from(h.l1_size) < h.l1_entries_needed() {
            return Err(corrupt(format!(
                "L1 table is too small ({} entries) for the virtual size {}",
                h.l1_size, h.size
            )));
        }
        validate_table(
            path,
            "L1 table",
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            cluster_size,
            file_len,
        )?;

        // Refcount table.
        if u64::from(h.refcount_table_clusters) * cluster_size > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table too large ({} clusters)",
                h.refcount_table_clusters
            )));
        }
        if !h.refcount_table_offset.is_multiple_of(cluster_size) {
            return Err(corrupt(
                "refcount table offset is not cluster aligned".into(),
            ));
        }

        // Snapshot table.
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!(
                "too many internal snapshots ({})",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots > 0 && !h.snapshots_offset.is_multiple_of(cluster_size) {
            return Err(corrupt(
                "snapshot table offset is not cluster aligned".into(),
            ));
        }

        Ok(())
    }

    /// Read the header extensions (between the header and the backing file
    /// name, or the end of the first cluster) into `self`; true when an
    /// external data file extension is present.
    fn parse_extensions(
        &mut self,
        path: &Path,
        buf: &[u8],
        backing_file_offset: u64,
    ) -> Result<bool, BlockError> {
        let corrupt = |detail: String| BlockError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            detail,
        };
        let cluster_size = self.cluster_size();
        let h = self;
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        };
        let ext_end = (ext_end as usize).min(buf.len());
        let mut off = h.header_length as usize;
        let mut saw_data_file_ext = false;
        loop {
            if off + 8 > ext_end {
                // QEMU accepts a header without an end marker when the
                // extension area is exhausted.
                break;
            }
            let ty = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            let data_off = off + 8;
            if ty == EXT_END {
                break;
            }
            if data_off + len > ext_end {
                return Err(corrupt(format!(
                    "header extension 0x{ty:08x} at byte {off} runs past the end of the header area"
                )));
            }
            let data = &buf[data_off..data_off + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(
                        String::from_utf8_lossy(data)
                            .trim_end_matches('\0')
                            .to_string(),
                    );
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&entry[2..])
                            .trim_end_matches('\0')
                            .to_string();
                        h.feature_names.push((entry[0], entry[1], name));
                    }
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return Err(corrupt("bitmaps header extension is too short".into()));
                    }
                    h.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                EXT_DATA_FILE => saw_data_file_ext = true,
                EXT_CRYPTO => {}
                _ => {} // unknown extensions are ignored, as QEMU does
            }
            off = data_off + len.div_ceil(8) * 8;
        }

        Ok(saw_data_file_ext)
    }

    /// A copy of the header in the shape the qcow2-rs crate opens safely:
    /// version 3, no backing file (imgbackup builds the chain itself), no
    /// extensions, no feature bits it would refuse for a read-only open (a
    /// dirty lazy-refcount image reads correctly: only refcounts are stale),
    /// an L1 table trimmed to what the virtual size needs, and a one-cluster
    /// refcount table (never used by a read-only device).
    pub fn for_library(&self) -> Vec<u8> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs.max(4096)];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        let l1 = (self.l1_entries_needed() as u32).min(self.l1_size);
        b[36..40].copy_from_slice(&l1.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
        b[100..104].copy_from_slice(&(V3_HEADER_LEN as u32).to_be_bytes());
        // b[104..112] is an end-of-extensions marker (all zero).
        b
    }
}

fn validate_table(
    path: &Path,
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), BlockError> {
    if bytes == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(BlockError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            detail: format!("{what} offset {offset:#x} is not cluster aligned"),
        });
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(BlockError::Corrupt {
            path: path.to_path_buf(),
            offset: None,
            detail: format!(
                "{what} at {offset:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes); the image is truncated or corrupt"
            ),
        }),
    }
}
