//! `imgbackup bitmap ...`: the dirty bitmaps beside an image.

use super::default_jobs;
use crate::bitmap::file::{check_name, list_names};
use crate::bitmap::{Bitmap, BitmapError, Identity};
use crate::cli::{BitmapCommand, GlobalOpts, LockOpts};
use crate::exit::Exit;
use crate::lock::Locks;
use crate::manifest::{ManifestFile, differing_chunks, hex, manifest_path, unhex};
use crate::node::probe::open_image;
use crate::report::{human_bytes, print_json};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// What `list`, `show` and `info` say of a bitmap.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BitmapDoc {
    /// The bitmap's name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Marked by writes.
    pub enabled: bool,
    /// Marked in use on disk.
    pub in_use: bool,
    /// Dirty bytes.
    pub dirty_bytes: u64,
    /// Dirty granules (bits set).
    pub dirty_granules: u64,
    /// Whether it can be trusted.
    pub consistent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Why it cannot be trusted.
    pub inconsistent_because: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The backup it is anchored to.
    pub anchored_backup: Option<AnchorDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Dirty byte ranges [start, end) (show).
    pub dirty_ranges: Option<Vec<[u64; 2]>>,
    /// Marked live by the process serving the image (`imgbackup serve`):
    /// what it says is the bitmap in that process's memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub served: bool,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
/// The backup a bitmap is anchored to.
pub struct AnchorDoc {
    /// Its path.
    pub path: String,
    /// The manifest's root digest (hex).
    pub root_digest: String,
}

/// Describe bitmap `name` of `image` (a damaged one is described as such).
pub fn describe(
    image: &Path,
    name: &str,
    size: u64,
    identity: &Identity,
    ranges: bool,
) -> BitmapDoc {
    match Bitmap::load(image, name) {
        Ok(b) => {
            let why = b.inconsistency(size, identity);
            doc_of(&b, why, ranges)
        }
        Err(e) => BitmapDoc {
            name: name.to_string(),
            granularity: 0,
            enabled: false,
            in_use: false,
            dirty_bytes: 0,
            dirty_granules: 0,
            consistent: false,
            inconsistent_because: Some(e.to_string()),
            anchored_backup: None,
            dirty_ranges: None,
            served: false,
        },
    }
}

/// What is said of the bitmap `b`; `why` it cannot be trusted, if so.
pub fn doc_of(b: &Bitmap, why: Option<String>, ranges: bool) -> BitmapDoc {
    BitmapDoc {
        name: b.name.clone(),
        granularity: b.granularity,
        enabled: b.enabled,
        in_use: b.in_use,
        dirty_bytes: b.dirty_bytes(),
        dirty_granules: b.bits.count(),
        consistent: why.is_none(),
        inconsistent_because: why,
        anchored_backup: b.anchor.as_ref().map(|a| AnchorDoc {
            path: a.path.display().to_string(),
            root_digest: hex(&a.root),
        }),
        dirty_ranges: ranges.then(|| b.dirty_ranges().into_iter().map(|(s, e)| [s, e]).collect()),
        served: false,
    }
}

/// The image's virtual size and identity.
fn image_facts(image: &Path) -> anyhow::Result<(u64, Identity)> {
    let img = open_image(image, None).context("cannot open the image")?;
    let id = Identity::of(image).with_context(|| format!("cannot stat {}", image.display()))?;
    Ok((img.node.size(), id))
}

fn lock(image: &Path, l: &LockOpts) -> anyhow::Result<Locks> {
    crate::files::check_image_path(image)?;
    let mut locks = Locks::new();
    locks.exclusive(image, l.wait_lock)?;
    for t in crate::bitmap::file::remove_stale_temps(image) {
        tracing::info!(
            "removed a bitmap temporary file left by a killed run: {}",
            t.display()
        );
    }
    Ok(locks)
}

fn done(g: &GlobalOpts, msg: String, doc: Option<BitmapDoc>) -> anyhow::Result<Exit> {
    if g.json {
        print_json(
            &serde_json::json!({"ok": true, "exit_code": 0, "message": msg, "bitmap": doc}),
        )?;
    } else if !g.quiet {
        crate::errln!("imgbackup: {msg}");
    }
    Ok(Exit::Success)
}

/// Run `imgbackup bitmap ...`.
pub fn run(cmd: &BitmapCommand, g: &GlobalOpts) -> anyhow::Result<Exit> {
    if let Some(exit) = run_served(cmd, g) {
        return exit;
    }
    match cmd {
        BitmapCommand::Add {
            image,
            name,
            granularity,
            disabled,
            lock: l,
        } => {
            check_name(name)?;
            let _locks = lock(image, l)?;
            let (size, id) = image_facts(image)?;
            match Bitmap::load(image, name) {
                Err(BitmapError::Missing { .. }) => {}
                _ => {
                    return Err(BitmapError::Exists {
                        name: name.clone(),
                        image: image.clone(),
                    }
                    .into());
                }
            }
            let mut b = Bitmap::new(name, *granularity, size, id);
            b.enabled = !disabled;
            b.save(image)?;
            done(
                g,
                format!(
                    "added bitmap '{name}' to {} ({} granularity)",
                    image.display(),
                    human_bytes(*granularity)
                ),
                Some(describe(image, name, size, &id, false)),
            )
        }
        BitmapCommand::Remove {
            image,
            name,
            lock: l,
        } => {
            let _locks = lock(image, l)?;
            Bitmap::remove(image, name)?;
            done(
                g,
                format!("removed bitmap '{name}' of {}", image.display()),
                None,
            )
        }
        BitmapCommand::Clear {
            image,
            name,
            lock: l,
        } => {
            let _locks = lock(image, l)?;
            let (size, id) = image_facts(image)?;
            let mut b = Bitmap::load_consistent(image, name, size, &id)?;
            b.bits.clear_range(0, b.bits.len());
            b.save(image)?;
            done(
                g,
                format!("cleared bitmap '{name}' of {}", image.display()),
                Some(describe(image, name, size, &id, false)),
            )
        }
        BitmapCommand::Enable {
            image,
            name,
            lock: l,
        } => set_enabled(image, name, true, l, g),
        BitmapCommand::Disable {
            image,
            name,
            lock: l,
        } => set_enabled(image, name, false, l, g),
        BitmapCommand::List { image } => {
            let (size, id) = image_facts(image)?;
            let names = list_names(image)
                .with_context(|| format!("cannot list the bitmaps of {}", image.display()))?;
            let docs: Vec<BitmapDoc> = names
                .iter()
                .map(|n| describe(image, n, size, &id, false))
                .collect();
            print_list(image, &docs, g)
        }
        BitmapCommand::Show { image, name } => {
            let (size, id) = image_facts(image)?;
            // A missing or damaged bitmap is an error here.
            Bitmap::load(image, name)?;
            print_show(&describe(image, name, size, &id, true), g)
        }
        BitmapCommand::Merge {
            image,
            sources,
            into,
            lock: l,
        } => merge(image, sources, into, l, g),
        BitmapCommand::Import {
            image,
            qcow2_bitmap,
            as_name,
            force,
            lock: l,
        } => import(image, qcow2_bitmap, as_name.as_deref(), *force, l, g),
        BitmapCommand::Rebuild {
            image,
            name,
            against_backup,
            granularity,
            lock: l,
        } => rebuild(image, name, against_backup, *granularity, l, g),
    }
}

/// `bitmap enable` and `disable`: an inconsistent bitmap stays so.
/// A bitmap command on an image `imgbackup serve` writes: through its
/// control socket (None: the image is not served).
fn run_served(cmd: &BitmapCommand, g: &GlobalOpts) -> Option<anyhow::Result<Exit>> {
    let image = match cmd {
        BitmapCommand::Add { image, .. }
        | BitmapCommand::Remove { image, .. }
        | BitmapCommand::Clear { image, .. }
        | BitmapCommand::Enable { image, .. }
        | BitmapCommand::Disable { image, .. }
        | BitmapCommand::List { image }
        | BitmapCommand::Show { image, .. }
        | BitmapCommand::Merge { image, .. }
        | BitmapCommand::Import { image, .. }
        | BitmapCommand::Rebuild { image, .. } => image,
    };
    let op = match cmd {
        BitmapCommand::List { .. } | BitmapCommand::Show { .. } => "bitmaps",
        _ => "bitmap",
    };
    let end = super::control::ask(image, op, g)?;
    Some(end.and_then(|end| {
        let mut docs: Vec<BitmapDoc> =
            serde_json::from_value(end.get("bitmaps").cloned().unwrap_or_default())
                .unwrap_or_default();
        match cmd {
            BitmapCommand::List { image } => {
                for d in &mut docs {
                    d.dirty_ranges = None;
                }
                print_list(image, &docs, g)
            }
            BitmapCommand::Show { image, name } => match docs.into_iter().find(|d| &d.name == name)
            {
                Some(d) => print_show(&d, g),
                None => Err(Bitmap::load(image, name).err().map_or_else(
                    || anyhow::anyhow!("bitmap '{name}' of {} cannot be read", image.display()),
                    Into::into,
                )),
            },
            _ => {
                let msg = end
                    .get("lines")
                    .and_then(|l| l.get(0))
                    .and_then(|l| l.as_str())
                    .unwrap_or_default()
                    .to_string();
                done(g, msg, docs.pop())
            }
        }
    }))
}

fn print_list(image: &Path, docs: &[BitmapDoc], g: &GlobalOpts) -> anyhow::Result<Exit> {
    if g.json {
        print_json(&serde_json::json!({"image": image.display().to_string(), "bitmaps": docs}))?;
    } else if docs.is_empty() {
        crate::outln!("{} has no bitmaps", image.display());
    } else {
        for d in docs {
            crate::outln!("{}", line(d));
        }
    }
    Ok(Exit::Success)
}

fn print_show(d: &BitmapDoc, g: &GlobalOpts) -> anyhow::Result<Exit> {
    if g.json {
        print_json(d)?;
    } else {
        crate::outln!("{}", line(d));
        for r in d.dirty_ranges.iter().flatten() {
            crate::outln!("  dirty {}-{} ({})", r[0], r[1], human_bytes(r[1] - r[0]));
        }
    }
    Ok(Exit::Success)
}

fn set_enabled(
    image: &Path,
    name: &str,
    enable: bool,
    l: &LockOpts,
    g: &GlobalOpts,
) -> anyhow::Result<Exit> {
    let _locks = lock(image, l)?;
    let (size, id) = image_facts(image)?;
    let mut b = Bitmap::load(image, name)?;
    if b.in_use {
        return Err(BitmapError::Inconsistent {
            name: name.to_string(),
            image: image.to_path_buf(),
            reason: b.inconsistency(size, &id).unwrap_or_default(),
        }
        .into());
    }
    // An inconsistent bitmap stays so, enabled or not: only a full
    // backup with --bitmap or `bitmap rebuild` starts it afresh.
    if let Some(why) = b.inconsistency(size, &id) {
        b.inconsistent = true;
        tracing::warn!(
            "bitmap '{name}' of {} is inconsistent ({why}); it stays inconsistent: recover with {}",
            image.display(),
            crate::leftovers::recover_bitmap(
                image,
                name,
                b.anchor.as_ref().map(|a| a.path.as_path())
            )
        );
    }
    if enable && !b.enabled {
        // It tracks writes from now on.
        b.identity = id;
    }
    b.enabled = enable;
    b.save(image)?;
    done(
        g,
        format!(
            "{} bitmap '{name}' of {}",
            if enable { "enabled" } else { "disabled" },
            image.display()
        ),
        Some(describe(image, name, size, &id, false)),
    )
}

/// `bitmap merge`: set in `into` every bit set in `sources`.
fn merge(
    image: &Path,
    sources: &[String],
    into: &str,
    l: &LockOpts,
    g: &GlobalOpts,
) -> anyhow::Result<Exit> {
    let _locks = lock(image, l)?;
    let (size, id) = image_facts(image)?;
    let mut target = Bitmap::load_consistent(image, into, size, &id)?;
    for s in sources {
        // An inconsistent source would make the target lie too.
        let src = Bitmap::load_consistent(image, s, size, &id)?;
        if src.granularity != target.granularity || src.image_size != target.image_size {
            anyhow::bail!(
                "cannot merge bitmap '{s}' into '{into}': their granularity or image size differ ({} / {} bytes vs {} / {} bytes)",
                src.granularity,
                src.image_size,
                target.granularity,
                target.image_size
            );
        }
        target.bits.merge(&src.bits);
    }
    target.save(image)?;
    done(
        g,
        format!(
            "merged {} into bitmap '{into}' of {}",
            sources.join(", "),
            image.display()
        ),
        Some(describe(image, into, size, &id, false)),
    )
}

/// `bitmap import`: copy a persistent bitmap QEMU keeps in the image.
fn import(
    image: &Path,
    qcow2_bitmap: &str,
    as_name: Option<&str>,
    force: bool,
    l: &LockOpts,
    g: &GlobalOpts,
) -> anyhow::Result<Exit> {
    let name = as_name.unwrap_or(qcow2_bitmap).to_string();
    check_name(&name)?;
    let _locks = lock(image, l)?;
    // The bitmap first: a damaged one is a bitmap error (exit 6),
    // not a refusal to open the image.
    let q = crate::bitmap::qcow2::read_bitmap(image, qcow2_bitmap)?;
    let (size, id) = image_facts(image)?;
    if !force && Bitmap::load(image, &name).is_ok() {
        return Err(BitmapError::Exists {
            name,
            image: image.to_path_buf(),
        }
        .into());
    }
    let mut b = Bitmap::new(&name, q.granularity, size, id);
    b.enabled = q.enabled;
    b.bits = q.bits;
    b.save(image)?;
    done(
        g,
        format!(
            "imported bitmap '{qcow2_bitmap}' of {} as '{name}': {} dirty",
            image.display(),
            human_bytes(b.dirty_bytes())
        ),
        Some(describe(image, &name, size, &id, false)),
    )
}

/// `bitmap rebuild`: mark what differs from `against`'s manifest and
/// anchor the bitmap to that backup.
fn rebuild(
    image: &Path,
    name: &str,
    against: &Path,
    granularity: u64,
    l: &LockOpts,
    g: &GlobalOpts,
) -> anyhow::Result<Exit> {
    check_name(name)?;
    let _locks = lock(image, l)?;
    let (size, id) = image_facts(image)?;
    let manifest = ManifestFile::open(&manifest_path(against))?;
    // The manifest must describe the backup file it sits beside:
    // the bitmap is anchored to that file.
    manifest.check_bound(against)?;
    if manifest.meta.virtual_size != size {
        anyhow::bail!(
            "{} is {size} bytes but the backup {} is {}: it is not a backup of this image",
            image.display(),
            against.display(),
            manifest.meta.virtual_size
        );
    }
    let img = open_image(image, None).context("cannot open the image")?;
    let cancel = super::cancel_on_signals()?;
    let diff = differing_chunks(img.node.as_ref(), &manifest, default_jobs(), &cancel);
    if let Some(r) = cancel.reason() {
        return Err(crate::job::JobError::Cancelled(r).into());
    }
    let diff = diff?;
    let mut b = match Bitmap::load(image, name) {
        Ok(b) if b.image_size == size => b,
        _ => Bitmap::new(name, granularity, size, id),
    };
    b.bits.clear_range(0, b.bits.len());
    let geo = manifest.geometry();
    for (s, e) in diff.runs() {
        b.mark(s * geo.chunk, (e * geo.chunk).min(size) - s * geo.chunk);
    }
    b.identity = id;
    b.in_use = false;
    b.inconsistent = false;
    b.anchor = Some(crate::job::parent::anchor_for(
        against,
        unhex(&manifest.meta.root_digest),
    ));
    b.save(image)?;
    done(
        g,
        format!(
            "rebuilt bitmap '{name}' of {} against {}: {} differ",
            image.display(),
            against.display(),
            human_bytes(b.dirty_bytes())
        ),
        Some(describe(image, name, size, &id, false)),
    )
}

/// The absolute path of `p` (as given, if it cannot be resolved).
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn line(d: &BitmapDoc) -> String {
    let state = if d.consistent {
        "consistent".to_string()
    } else {
        format!(
            "INCONSISTENT: {}",
            d.inconsistent_because.clone().unwrap_or_default()
        )
    };
    format!(
        "{}: granularity {}, {}, {} dirty ({} granules), {}{}",
        d.name,
        human_bytes(d.granularity),
        match (d.enabled, d.served) {
            (true, true) => "enabled, marked live by the server",
            (true, false) => "enabled",
            (false, _) => "disabled",
        },
        human_bytes(d.dirty_bytes),
        d.dirty_granules,
        state,
        d.anchored_backup
            .as_ref()
            .map(|a| format!(", anchored to {}", a.path))
            .unwrap_or_default()
    )
}
