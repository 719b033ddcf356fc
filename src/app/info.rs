//! `imgbackup info IMAGE`.

use crate::cli::{GlobalOpts, InfoArgs};
use crate::exit::Exit;
use crate::node::probe::{LayerInfo, open_image};
use crate::node::{BlockNode, Status};
use crate::report::{human_bytes, print_json};
use anyhow::Context;

/// Allocation of one layer, by status.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Allocation {
    /// Bytes this layer stores as data.
    pub data: u64,
    /// Bytes this layer marks as zero.
    pub zero: u64,
    /// Bytes this layer leaves to the layer below (or that read as zeros).
    pub unallocated: u64,
}

/// Count what `node` (one layer) holds.
pub fn allocation(node: &dyn BlockNode) -> crate::error::Result<Allocation> {
    let mut a = Allocation::default();
    crate::node::for_each_extent(node, 0, node.size(), |_, ext| match ext.status {
        Status::Data => a.data += ext.len,
        Status::Zero => a.zero += ext.len,
        Status::Unallocated => a.unallocated += ext.len,
    })?;
    Ok(a)
}

#[derive(serde::Serialize)]
struct LayerDoc {
    #[serde(flatten)]
    info: LayerInfo,
    allocation: Allocation,
}

#[derive(serde::Serialize)]
struct ManifestDoc {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The manifest describes this very file (see `verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_to_file: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unbound_because: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    meta: Option<crate::manifest::Meta>,
}

#[derive(serde::Serialize)]
struct InfoDoc {
    image: String,
    format: String,
    virtual_size: u64,
    cluster_size: u64,
    disk_usage: u64,
    allocation: Allocation,
    backing_chain: Vec<LayerDoc>,
    /// The dirty bitmaps beside the image.
    bitmaps: Vec<crate::app::bitmap::BitmapDoc>,
    /// The manifest beside the image, when it is a backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<ManifestDoc>,
}

/// Run `imgbackup info`.
pub fn run(args: &InfoArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let image =
        open_image(&args.image, args.format.map(Into::into)).context("cannot open the image")?;
    let mut chain = Vec::new();
    for layer in &image.layers {
        let alloc = allocation(layer.node.as_ref()).with_context(|| {
            format!(
                "cannot read the allocation of {}",
                layer.info.path.display()
            )
        })?;
        chain.push(LayerDoc {
            info: layer.info.clone(),
            allocation: alloc,
        });
    }
    let top = chain[0].info.clone();
    let doc = InfoDoc {
        image: args.image.display().to_string(),
        format: top.format.to_string(),
        virtual_size: top.virtual_size,
        cluster_size: top.cluster_size,
        disk_usage: top.disk_usage,
        allocation: chain[0].allocation,
        backing_chain: chain,
        manifest: manifest_doc(&args.image),
        bitmaps: match super::control::served_bitmaps(&args.image, g) {
            // Served: the bitmaps as the serving process holds them.
            Some(docs) => docs?
                .into_iter()
                .map(|mut d| {
                    d.dirty_ranges = None;
                    d
                })
                .collect(),
            None => {
                let id = crate::bitmap::Identity::of(&args.image).ok();
                crate::bitmap::file::list_names(&args.image)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|n| {
                        id.as_ref().map(|id| {
                            crate::app::bitmap::describe(
                                &args.image,
                                n,
                                top.virtual_size,
                                id,
                                false,
                            )
                        })
                    })
                    .collect()
            }
        },
    };
    if g.json {
        print_json(&doc)?;
        return Ok(Exit::Success);
    }
    let mut out = String::new();
    out += &format!("image:          {}\n", doc.image);
    let version = top
        .qcow2_version
        .map(|v| format!(" (version {v})"))
        .unwrap_or_default();
    out += &format!("format:         {}{version}\n", doc.format);
    out += &format!(
        "virtual size:   {} ({} bytes)\n",
        human_bytes(doc.virtual_size),
        doc.virtual_size
    );
    out += &format!("cluster size:   {}\n", human_bytes(doc.cluster_size));
    out += &format!("disk usage:     {}\n", human_bytes(doc.disk_usage));
    out += &format!(
        "allocated:      {} data, {} zero, {} unallocated\n",
        human_bytes(doc.allocation.data),
        human_bytes(doc.allocation.zero),
        human_bytes(doc.allocation.unallocated)
    );
    if doc.backing_chain.len() > 1 {
        out += "backing chain:\n";
        for (i, l) in doc.backing_chain.iter().enumerate() {
            out += &format!(
                "  {i}: {} ({}, {}, {} data in this layer)\n",
                l.info.path.display(),
                l.info.format,
                human_bytes(l.info.virtual_size),
                human_bytes(l.allocation.data)
            );
        }
    }
    for b in &doc.bitmaps {
        out += &format!(
            "bitmap:         {}: {}, {} dirty, {}{}{}\n",
            b.name,
            match (b.enabled, b.served) {
                (true, true) => "enabled, marked live by the server",
                (true, false) => "enabled",
                (false, _) => "disabled",
            },
            human_bytes(b.dirty_bytes),
            if b.consistent {
                "consistent"
            } else {
                "INCONSISTENT"
            },
            b.inconsistent_because
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            b.anchored_backup
                .as_ref()
                .map(|a| format!(", anchored to {}", a.path))
                .unwrap_or_default()
        );
    }
    if let Some(m) = &doc.manifest {
        out += &render_manifest(m);
    }
    crate::outln!("{}", out.trim_end_matches('\n'));
    Ok(Exit::Success)
}

/// The manifest part of `info`'s human output.
fn render_manifest(m: &ManifestDoc) -> String {
    let mut out = String::new();
    match (&m.meta, &m.error) {
        (Some(meta), _) => {
            out += &format!("manifest:       {}\n", m.path);
            if meta.root_known() {
                out += &format!("  root digest:  {}\n", meta.root_digest);
            } else {
                out += "  root digest:  not recorded (the chunks of the backing file are recorded by its identity)\n";
            }
            if let Some(why) = &m.unbound_because {
                out += &format!("  DOES NOT DESCRIBE THIS FILE: {why}\n");
            }
            if meta.detached {
                out += "  holds:        only the clusters this incremental copied (written with --no-backing); attach it to its parent with `qemu-img rebase -u` before restoring\n";
            }
            out += &format!(
                "  sync mode:    {}{}\n",
                meta.sync,
                meta.bitmap
                    .as_ref()
                    .map(|b| format!(" (bitmap {b})"))
                    .unwrap_or_default()
            );
            out += &format!("  source:       {} ({})\n", meta.source, meta.source_format);
            match &meta.parent {
                Some(p) => out += &format!("  parent:       {} (root {})\n", p.path, p.root_digest),
                None => out += "  parent:       none (a full backup)\n",
            }
            out += &format!("  started:      {}\n", meta.started);
            out += &format!("  finished:     {}\n", meta.finished);
            out += &format!(
                "  chunks:       {} of {}\n",
                meta.chunks,
                human_bytes(meta.chunk_size)
            );
            for b in &meta.backing_files {
                out += &format!("  backing file: {} ({}), by identity\n", b.path, b.format);
            }
            out += &if meta.format_version >= 2 {
                format!(
                    "  stored:       format {}, {} {} digests of data chunks in {} runs\n",
                    meta.format_version, meta.data_chunks, meta.digest, meta.runs
                )
            } else {
                format!(
                    "  stored:       format {}, {} digests of every chunk\n",
                    meta.format_version, meta.digest
                )
            };
        }
        (None, Some(e)) => out += &format!("manifest:       {} is unusable: {e}\n", m.path),
        (None, None) => {}
    }
    out
}

fn manifest_doc(image: &std::path::Path) -> Option<ManifestDoc> {
    use crate::manifest::{ManifestError, ManifestFile, manifest_path};
    let p = manifest_path(image);
    match ManifestFile::open(&p) {
        Ok(m) => {
            let unbound = m.check_bound(image).err().map(|e| e.to_string());
            Some(ManifestDoc {
                path: p.display().to_string(),
                error: None,
                bound_to_file: Some(unbound.is_none()),
                unbound_because: unbound,
                meta: Some(m.meta),
            })
        }
        Err(ManifestError::Missing { .. }) => None,
        Err(e) => Some(ManifestDoc {
            path: p.display().to_string(),
            error: Some(e.to_string()),
            bound_to_file: None,
            unbound_because: None,
            meta: None,
        }),
    }
}
