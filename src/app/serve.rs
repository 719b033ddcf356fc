//! `imgbackup serve IMAGE (--socket PATH | --listen HOST:PORT)`: export an
//! image over NBD. Writable exports are raw or qcow2 images written in place; every
//! enabled bitmap beside the image is marked before a write is issued (so
//! before it is acknowledged), saved on a flush when it changed, and saved with the
//! image's new identity when the server stops, so an incremental after a
//! served session is exact. Read-only exports take any image (a backup and
//! its chain, a qcow2).

use crate::bitmap::Bitmap;
use crate::bitmap::file::list_names;
use crate::cli::{GlobalOpts, ServeArgs};
use crate::exit::Exit;
use crate::job::JobError;
use crate::lock::{Access, Locks};
use crate::nbd::{DirtyRuns, Export, Server};
use crate::node::BlockNode;
use crate::node::probe::{Format, open_image, probe};
use crate::report::print_json;
use anyhow::{Context, bail};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::marked::Tracked;
use crate::job::backup::Served;
use crate::node::slot::FilterSlot;

/// A listening socket.
enum Listener {
    Unix(std::os::unix::net::UnixListener, PathBuf),
    Tcp(std::net::TcpListener),
}

/// Shuts a connection's socket down.
type Closer = Box<dyn FnOnce() + Send>;

/// An accepted connection, split into halves, and its closer.
type Conn = (Box<dyn io::Read + Send>, Box<dyn io::Write + Send>, Closer);

/// The halves of an accepted stream and its closer; `shutdown` closes a
/// clone of it.
fn split<S>(s: S, try_clone: fn(&S) -> io::Result<S>, shutdown: fn(&S)) -> io::Result<Conn>
where
    S: io::Read + io::Write + Send + 'static,
{
    let (r, w) = (try_clone(&s)?, try_clone(&s)?);
    Ok((Box::new(r), Box::new(w), Box::new(move || shutdown(&s))))
}

impl Listener {
    fn accept(&self) -> io::Result<Option<Conn>> {
        use std::net::Shutdown;
        let conn = match self {
            Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                split(s, std::os::unix::net::UnixStream::try_clone, |s| {
                    let _ = s.shutdown(Shutdown::Both);
                })
            }),
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                let _ = s.set_nodelay(true);
                split(s, std::net::TcpStream::try_clone, |s| {
                    let _ = s.shutdown(Shutdown::Both);
                })
            }),
        };
        match conn {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Bind `--socket PATH` (a stale socket of a killed server is replaced; a
/// live one or any other file is refused) or `--listen HOST:PORT`.
fn listen(args: &ServeArgs) -> anyhow::Result<(Listener, String)> {
    let name = &args.export_name;
    if let Some(path) = &args.socket {
        let l = super::control::bind_unix(path, "the --socket")?;
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        let uri = format!("nbd+unix:///{name}?socket={}", abs.display());
        return Ok((Listener::Unix(l, path.clone()), uri));
    }
    let Some(spec) = &args.listen else {
        return Err(JobError::Usage("give --socket PATH or --listen HOST:PORT".into()).into());
    };
    // A bare port listens on loopback only.
    let addr = if spec.parse::<u16>().is_ok() {
        format!("127.0.0.1:{spec}")
    } else {
        spec.clone()
    };
    let l =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    l.set_nonblocking(true)?;
    let local = l.local_addr()?;
    let uri = format!("nbd://{local}/{name}");
    Ok((Listener::Tcp(l), uri))
}

/// Run `imgbackup serve`.
pub fn run(args: &ServeArgs, g: &GlobalOpts) -> anyhow::Result<Exit> {
    let image = &args.image;
    let probed = probe(image).context("cannot open the image")?;
    let format = args.format.map(Format::from).unwrap_or(probed);
    if format == Format::Raw && probed == Format::Qcow2 {
        bail!(
            "{}: --format raw, but the file is a qcow2 image; serving it as raw would expose (and let clients destroy) its metadata",
            image.display()
        );
    }
    let writable = !args.read_only;
    if writable && crate::files::check_image_path(image)? == crate::files::Kind::Block {
        return Err(JobError::Usage(format!(
            "{}: a block device can only be served --read-only (its bitmaps could not tell what wrote it)",
            image.display()
        ))
        .into());
    }
    let mut locks = Locks::new();
    // With --overlay the image is read (and locked) shared, and the
    // overlay is the image written in place.
    let (image, format) = match &args.overlay {
        Some(ov) => {
            locks.qemu(image, Access::Read, false, args.lock.wait_lock)?;
            prepare_overlay(image, format, ov)?;
            (ov, Format::Qcow2)
        }
        None => (image, format),
    };
    if writable {
        locks.exclusive(image, args.lock.wait_lock)?;
        locks.qemu(image, Access::Write, false, args.lock.wait_lock)?;
    } else {
        locks.qemu(image, Access::Read, false, args.lock.wait_lock)?;
    }
    let (export, tracked, raw, served) = if writable {
        let (e, t, r, sv) = writable_export(args, image, format)?;
        (e, Some(t), r, Some(sv))
    } else {
        let img = open_image(image, Some(format)).context("cannot open the image")?;
        let bitmaps = offered_bitmaps(image, img.node.size(), None);
        (
            Export {
                name: args.export_name.clone(),
                description: format!("{} (read-only)", image.display()),
                node: img.node.clone(),
                read_only: true,
                bitmaps,
                on_flush: None,
            },
            None,
            img.node,
            None,
        )
    };
    let (listener, uri) = listen(args)?;
    // A writable export's control socket: `backup IMAGE` runs its job here.
    let ctl_path = g
        .control
        .clone()
        .unwrap_or_else(|| super::control::socket_path(image));
    let control = match served {
        Some(sv) => {
            let l = super::control::bind_unix(&ctl_path, "the control socket (--control)")?;
            Some((l, Arc::new(super::control::Control::new(image, sv))))
        }
        None => None,
    };
    let cancel = super::cancel_on_signals()?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let server = Arc::new(Server::new(export, shutdown.clone()));
    if !g.quiet {
        crate::errln!(
            "imgbackup: serving {} ({}{}) at {uri}",
            args.image.display(),
            format,
            match &args.overlay {
                Some(ov) => format!(", writes into the overlay {}", ov.display()),
                None if writable => String::new(),
                None => ", read-only".into(),
            }
        );
    }
    // Each connection's thread, and how to close its socket at shutdown
    // (dropped with the thread once it ends, so no descriptor is kept).
    let mut conns: Vec<(std::thread::JoinHandle<()>, Closer)> = Vec::new();
    let mut ctl_conns: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while cancel.reason().is_none() {
        if let Some((l, ctl)) = &control
            && let Ok((s, _)) = l.accept()
        {
            let ctl = ctl.clone();
            ctl_conns.push(std::thread::spawn(move || ctl.handle(s)));
        }
        ctl_conns.retain(|t| !t.is_finished());
        match listener.accept() {
            Ok(Some((r, w, close))) => {
                let server = server.clone();
                let t = std::thread::spawn(move || {
                    if let Err(e) = server.serve(r, w) {
                        tracing::warn!("a client was dropped: {e}");
                    }
                });
                conns.push((t, close));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => tracing::warn!("cannot accept a connection: {e}"),
        }
        conns.retain(|(t, _)| !t.is_finished());
    }
    // Stop: no new connections or requests; what is in flight finishes,
    // then the connections are closed.
    shutdown.store(true, Ordering::SeqCst);
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    // A backup running here is cancelled (its client reports it).
    if let Some((_, ctl)) = &control {
        let _ = std::fs::remove_file(&ctl_path);
        ctl.cancel_running(
            cancel
                .reason()
                .unwrap_or(crate::job::cancel::Reason::Terminate),
        );
    }
    for t in ctl_conns {
        let _ = t.join();
    }
    std::thread::sleep(Duration::from_millis(50));
    for (t, close) in conns {
        close();
        let _ = t.join();
    }
    let flushed = raw.close();
    if let Some(tracked) = &tracked {
        super::marked::save(image, tracked, flushed.is_ok(), false)?;
    }
    flushed.context("cannot flush the image")?;
    let backups = control
        .as_ref()
        .map(|(_, c)| c.backups.load(Ordering::Relaxed))
        .unwrap_or(0);
    report(g, image, &uri, &server.counters, backups)?;
    Ok(Exit::Success)
}

/// What `serve` says when it stops.
fn report(
    g: &GlobalOpts,
    image: &Path,
    uri: &str,
    c: &crate::nbd::Counters,
    backups: u64,
) -> anyhow::Result<()> {
    if g.json {
        print_json(&serde_json::json!({
            "ok": true,
            "exit_code": 0,
            "command": "serve",
            "image": image.display().to_string(),
            "uri": uri,
            "connections": c.connections.load(Ordering::Relaxed),
            "requests": c.requests.load(Ordering::Relaxed),
            "bytes_written": c.bytes_written.load(Ordering::Relaxed),
            "bytes_read": c.bytes_read.load(Ordering::Relaxed),
            "clients_dropped": c.dropped.load(Ordering::Relaxed),
            "backups": backups,
        }))?;
    } else if !g.quiet {
        crate::errln!(
            "imgbackup: stopped serving {}: {} connections, {} requests",
            image.display(),
            c.connections.load(Ordering::Relaxed),
            c.requests.load(Ordering::Relaxed)
        );
    }
    Ok(())
}

/// Make `overlay` a qcow2 backed by `image` (of `format`): created when
/// missing (the backing file named relative to it, as `backup` names a
/// parent), reused when it is one already, refused otherwise.
fn prepare_overlay(image: &Path, format: Format, overlay: &Path) -> anyhow::Result<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if overlay.exists() {
        let ov = open_image(overlay, None)
            .with_context(|| format!("cannot open the overlay {}", overlay.display()))?;
        let backed_by = ov.layers.get(1).map(|l| canonical(&l.info.path));
        if ov.layers[0].info.format != Format::Qcow2 || backed_by != Some(canonical(image)) {
            return Err(JobError::Usage(format!(
                "{} exists and is not a qcow2 overlay of {}; name a new file for --overlay (it is created), or remove it",
                overlay.display(),
                image.display()
            ))
            .into());
        }
        return Ok(());
    }
    let size = open_image(image, Some(format))
        .context("cannot open the image")?
        .node
        .size();
    let opts = crate::node::qcow2::CreateOptions {
        size,
        cluster_size: 65536,
        backing: Some((
            crate::job::backup::backing_name(overlay, image)?,
            format.to_string(),
        )),
        compression: Default::default(),
    };
    let w = crate::node::qcow2::Qcow2Writer::create(overlay, &opts)
        .with_context(|| format!("cannot create the overlay {}", overlay.display()))?;
    w.finish()
        .with_context(|| format!("cannot create the overlay {}", overlay.display()))?;
    Ok(())
}

/// The export of an image written in place (raw, or qcow2 through the
/// in-place writer): every enabled bitmap beside
/// it marked in use, marked by every write, saved on a flush when it changed.
fn writable_export(
    args: &ServeArgs,
    image: &Path,
    format: Format,
) -> anyhow::Result<(Export, Tracked, Arc<dyn BlockNode>, Served)> {
    // The bitmaps are checked against the image before it is opened for
    // writing (opening a qcow2 writable may rewrite its header).
    let opened = open_image(image, Some(format)).context("cannot open the image")?;
    let size = opened.node.size();
    let tracked = super::marked::track_enabled(image, size)?;
    let raw = match super::marked::open_writable(image, format) {
        Ok(r) => r,
        Err(e) => {
            // Put the bitmaps back as they were (no longer in use).
            let _ = super::marked::save(image, &tracked, false, false);
            return Err(e);
        }
    };
    // clients -> filter slot (a backup's copy-before-write) -> marking -> image
    let live: Arc<dyn BlockNode> = Arc::new(super::marked::marking(raw.clone(), &tracked));
    let slot = Arc::new(FilterSlot::new(live.clone()));
    let node: Arc<dyn BlockNode> = slot.clone();
    let bitmaps = offered_bitmaps(image, size, Some(&tracked));
    let (t, img) = (tracked.clone(), image.to_path_buf());
    // A flush saves the bitmaps only when they changed since the last save:
    // a guest that flushes often and writes where it wrote before pays
    // nothing (what is on disk stays marked in use until the server stops,
    // so no reader trusts it meanwhile anyway).
    let last_saved: std::sync::Mutex<Option<Vec<BitmapState>>> = std::sync::Mutex::new(None);
    let export = Export {
        name: args.export_name.clone(),
        description: image.display().to_string(),
        node,
        read_only: false,
        bitmaps,
        on_flush: Some(Arc::new(move || {
            let mut last = match last_saved.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if last.as_deref().is_some_and(|l| unchanged_since(&t, l)) {
                return Ok(());
            }
            let now = bitmap_states(&t);
            super::marked::save(&img, &t, true, true)
                .map(|_| ())
                .map_err(io::Error::other)?;
            *last = Some(now);
            Ok(())
        })),
    };
    let served = Served {
        live,
        slot,
        bitmaps: tracked.clone(),
        image: opened,
    };
    Ok((export, tracked, raw, served))
}

/// What a bitmap save writes that can change while served: name, bits,
/// enabled, inconsistent.
type BitmapState = (String, crate::bitmap::Bits, bool, bool);

/// True when the bitmaps are as `last` recorded them (compared in place:
/// a flush that finds nothing new copies nothing).
fn unchanged_since(t: &Tracked, last: &[BitmapState]) -> bool {
    let v = match t.lock() {
        Ok(v) => v,
        Err(p) => p.into_inner(),
    };
    v.len() == last.len()
        && v.iter()
            .zip(last)
            .all(|((b, consistent), (n, bits, en, inc))| {
                b.name == *n
                    && b.enabled == *en
                    && (!*consistent || b.inconsistent) == *inc
                    && b.bits == *bits
            })
}

fn bitmap_states(t: &Tracked) -> Vec<BitmapState> {
    let v = match t.lock() {
        Ok(v) => v,
        Err(p) => p.into_inner(),
    };
    v.iter()
        .map(|(b, consistent)| {
            (
                b.name.clone(),
                b.bits.clone(),
                b.enabled,
                !*consistent || b.inconsistent,
            )
        })
        .collect()
}

/// `qemu:dirty-bitmap:NAME` for the bitmaps beside `image`: the live ones
/// of a writable export (`tracked`, including the writes of this session),
/// else every bitmap that loads, as saved.
fn offered_bitmaps(image: &Path, size: u64, tracked: Option<&Tracked>) -> Vec<(String, DirtyRuns)> {
    let runs = |bits: &crate::bitmap::Bits, gran: u64, pos: u64, len: u64| -> (bool, u64) {
        let (first, last) = (pos / gran, (pos + len).div_ceil(gran));
        let dirty = bits.get(first);
        let end_bit = if dirty {
            bits.next_clear_in(first, last)
        } else {
            bits.next_set_in(first, last)
        }
        .unwrap_or(last);
        (dirty, (end_bit * gran).min(pos + len).max(pos + 1) - pos)
    };
    match tracked {
        Some(t) => {
            let names: Vec<String> = match t.lock() {
                Ok(v) => v.iter().map(|(b, _)| b.name.clone()).collect(),
                Err(_) => Vec::new(),
            };
            names
                .into_iter()
                .map(|name| {
                    let (t, n) = (t.clone(), name.clone());
                    let f: DirtyRuns = Arc::new(move |pos, len| match t.lock() {
                        Ok(v) => match v.iter().find(|(b, _)| b.name == n) {
                            Some((b, _)) => runs(&b.bits, b.granularity, pos, len),
                            None => (false, len),
                        },
                        Err(_) => (true, len),
                    });
                    (name, f)
                })
                .collect()
        }
        None => list_names(image)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|name| {
                let b = Bitmap::load(image, &name).ok()?;
                if b.image_size != size {
                    return None;
                }
                let b = Arc::new(b);
                let f: DirtyRuns = Arc::new(move |pos, len| runs(&b.bits, b.granularity, pos, len));
                Some((name, f))
            })
            .collect(),
    }
}
