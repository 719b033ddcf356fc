//! Reading a persistent dirty bitmap that QEMU stored inside a qcow2 image
//! (docs/interop/qcow2.rst, "Bitmaps extension"): a big-endian bitmap
//! directory, a bitmap table per bitmap, and bit data LSB-first.

use super::{BitmapError, Bits};
use crate::node::qcow2::Header;
use crate::node::qcow2::header::AUTOCLEAR_BITMAPS;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const IN_USE: u32 = 1;
const AUTO: u32 = 2;
/// The flags QEMU accepts (its BME_RESERVED_FLAGS are all the others,
/// including extra_data_compatible, which it refuses).
const KNOWN_FLAGS: u32 = IN_USE | AUTO;
/// Reserved bits of a bitmap table entry (QEMU's
/// BME_TABLE_ENTRY_RESERVED_MASK).
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
const MAX_DIRECTORY: u64 = 64 << 20;

/// A bitmap read from a qcow2 image.
#[derive(Debug, Clone)]
pub struct Qcow2Bitmap {
    /// Its name in the image.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// The `auto` flag: QEMU keeps the bitmap enabled.
    pub enabled: bool,
    /// The dirty bits.
    pub bits: Bits,
}

/// One entry of the bitmap directory.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Its name.
    pub name: String,
    /// Host offset of its bitmap table.
    pub table_offset: u64,
    /// Entries of its bitmap table.
    pub table_size: u32,
    /// Directory flags (in use, auto).
    pub flags: u32,
    /// Bitmap type (1: dirty tracking).
    pub kind: u8,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Bytes of extra data.
    pub extra_data_size: u32,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(w)
}

fn inconsistent(image: &Path, name: &str, reason: &str) -> BitmapError {
    BitmapError::Inconsistent {
        name: name.to_string(),
        image: image.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn damaged(image: &Path, detail: String) -> BitmapError {
    BitmapError::Damaged {
        path: image.to_path_buf(),
        detail,
    }
}

/// Parse a bitmap directory.
pub fn parse_directory(image: &Path, dir: &[u8], count: u32) -> Result<Vec<DirEntry>, BitmapError> {
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..count {
        if off + 24 > dir.len() {
            return Err(damaged(image, "the bitmap directory is truncated".into()));
        }
        let name_size = u16::from_be_bytes([dir[off + 18], dir[off + 19]]) as usize;
        let extra = be32(dir, off + 20) as usize;
        let end = off + 24 + extra + name_size;
        if name_size == 0 || name_size > 1023 || extra > (16 << 20) || end > dir.len() {
            return Err(damaged(
                image,
                "a bitmap directory entry is out of bounds".into(),
            ));
        }
        let name = String::from_utf8_lossy(&dir[off + 24 + extra..end]).into_owned();
        out.push(DirEntry {
            name,
            table_offset: be64(dir, off),
            table_size: be32(dir, off + 8),
            flags: be32(dir, off + 12),
            kind: dir[off + 16],
            granularity_bits: dir[off + 17],
            extra_data_size: extra as u32,
        });
        off = end.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Read the directory of the qcow2 `image`.
pub fn directory(image: &Path) -> Result<(Header, File, Vec<DirEntry>), BitmapError> {
    let ioerr = |e| BitmapError::Io {
        path: image.to_path_buf(),
        source: e,
    };
    let file = File::open(image).map_err(ioerr)?;
    let len = file.metadata().map_err(ioerr)?.len();
    let mut head = vec![0u8; len.min(2 << 20) as usize];
    file.read_exact_at(&mut head, 0).map_err(ioerr)?;
    let h = Header::parse(image, &head, len).map_err(|e| damaged(image, e.to_string()))?;
    let Some(ext) = h.bitmaps else {
        return Ok((h, file, Vec::new()));
    };
    if ext.directory_size > MAX_DIRECTORY
        || ext.directory_offset.saturating_add(ext.directory_size) > len
    {
        return Err(damaged(
            image,
            "the bitmap directory lies outside the file".into(),
        ));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_exact_at(&mut dir, ext.directory_offset)
        .map_err(ioerr)?;
    let entries = parse_directory(image, &dir, ext.nb_bitmaps)?;
    Ok((h, file, entries))
}

/// Read bitmap `name` of the qcow2 `image`, refusing one QEMU marks in use
/// or one the image says is stale.
pub fn read_bitmap(image: &Path, name: &str) -> Result<Qcow2Bitmap, BitmapError> {
    let (h, file, entries) = directory(image)?;
    let Some(e) = entries.iter().find(|e| e.name == name) else {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        return Err(BitmapError::Missing {
            name: name.to_string(),
            image: image.to_path_buf(),
            path: PathBuf::from(format!(
                "{} (its bitmaps: {})",
                image.display(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )),
        });
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Err(inconsistent(
            image,
            name,
            "the image's autoclear bit says its bitmaps are stale (a program unaware of bitmaps wrote it)",
        ));
    }
    if e.flags & IN_USE != 0 {
        return Err(inconsistent(
            image,
            name,
            "QEMU marks it in use (the image is open in a QEMU, or one stopped without saving it)",
        ));
    }
    check_shape(image, &h, e)?;
    let bits = load_bits(image, &file, &h, e)?;
    Ok(Qcow2Bitmap {
        name: name.to_string(),
        granularity: 1u64 << e.granularity_bits,
        enabled: e.flags & AUTO != 0,
        bits,
    })
}

/// The checks QEMU makes of a bitmap directory entry when it opens the
/// image (`check_dir_entry`), and ours: the shape of the table.
fn check_shape(image: &Path, h: &Header, e: &DirEntry) -> Result<(), BitmapError> {
    let name = &e.name;
    if e.flags & !KNOWN_FLAGS != 0 {
        return Err(damaged(
            image,
            format!(
                "bitmap '{name}' has unknown flags {:#x} in the bitmap directory",
                e.flags & !KNOWN_FLAGS
            ),
        ));
    }
    if e.kind != 1 {
        return Err(damaged(
            image,
            format!("bitmap '{name}' has type {}, not a dirty bitmap", e.kind),
        ));
    }
    if !(9..=31).contains(&e.granularity_bits) {
        return Err(damaged(
            image,
            format!(
                "bitmap '{name}' has granularity bits {}",
                e.granularity_bits
            ),
        ));
    }
    if e.extra_data_size != 0 {
        return Err(damaged(
            image,
            format!("bitmap '{name}' has extra data (QEMU refuses it too)"),
        ));
    }
    let g = 1u64 << e.granularity_bits;
    let cs = h.cluster_size();
    let want_entries = h.size.div_ceil(g).div_ceil(cs * 8);
    if u64::from(e.table_size) != want_entries
        || e.table_offset == 0
        || !e.table_offset.is_multiple_of(cs)
    {
        return Err(damaged(
            image,
            format!(
                "bitmap '{name}' has a table of {} entries at {:#x}, {want_entries} cluster-aligned entries expected",
                e.table_size, e.table_offset
            ),
        ));
    }
    Ok(())
}

/// Read a bitmap's table and bits, checking every table entry as QEMU does
/// (`check_table_entry`): no reserved bits, aligned, inside the file, and
/// the all-ones flag only without an offset.
fn load_bits(image: &Path, file: &File, h: &Header, e: &DirEntry) -> Result<Bits, BitmapError> {
    let name = &e.name;
    let ioerr = |err| BitmapError::Io {
        path: image.to_path_buf(),
        source: err,
    };
    let len = file.metadata().map_err(ioerr)?.len();
    let g = 1u64 << e.granularity_bits;
    let cs = h.cluster_size();
    let nbits = h.size.div_ceil(g);
    let bits_per_cluster = cs * 8;
    let tbytes = u64::from(e.table_size) * 8;
    if e.table_offset.saturating_add(tbytes) > len {
        return Err(damaged(
            image,
            format!("bitmap '{name}' has its table outside the file"),
        ));
    }
    let mut table = vec![0u8; tbytes as usize];
    file.read_exact_at(&mut table, e.table_offset)
        .map_err(ioerr)?;
    let mut bits = Bits::new(nbits);
    let mut data = vec![0u8; cs as usize];
    for (i, ent) in table.chunks_exact(8).enumerate() {
        let v = u64::from_be_bytes(ent.try_into().unwrap_or([0; 8]));
        let host = v & 0x00ff_ffff_ffff_fe00;
        if v & TABLE_ENTRY_RESERVED != 0 || (host != 0 && v & 1 != 0) {
            return Err(damaged(
                image,
                format!("bitmap '{name}' has a bitmap table entry with reserved bits set ({v:#x})"),
            ));
        }
        let first = i as u64 * bits_per_cluster;
        let last = (first + bits_per_cluster).min(nbits);
        if host == 0 {
            if v & 1 != 0 {
                bits.set_range(first, last);
            }
            continue;
        }
        if host % cs != 0 || host.saturating_add(cs) > len {
            return Err(damaged(
                image,
                format!("bitmap '{name}' points to data outside the file"),
            ));
        }
        file.read_exact_at(&mut data, host).map_err(ioerr)?;
        for k in first..last {
            let j = k - first;
            if data[(j / 8) as usize] & (1 << (j % 8)) != 0 {
                bits.set(k);
            }
        }
    }
    Ok(bits)
}

/// Check the persistent bitmaps of the qcow2 `image` the way QEMU does when
/// it opens the image (it refuses the whole image when one is damaged):
/// only while the image says its bitmaps are valid (the autoclear bit).
pub fn check_image_bitmaps(image: &Path) -> Result<(), BitmapError> {
    let (h, file, entries) = directory(image)?;
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(());
    }
    for e in &entries {
        check_shape(image, &h, e)?;
        if e.flags & IN_USE == 0 {
            load_bits(image, &file, &h, e)?;
        }
    }
    Ok(())
}
