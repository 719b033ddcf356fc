//! The control socket of a served image (`IMAGE.ctl`): how `imgbackup
//! backup IMAGE ...` reaches the `serve` process that writes IMAGE, so the
//! job runs there, through its copy-before-write filter, while the NBD
//! clients keep writing.
//!
//! One request per connection, one JSON document per line:
//!
//! * client → server: `{"op": "backup", "cwd": DIR, "args": [ARG...]}` (the
//!   command line as typed; relative paths are taken from `cwd`), then
//!   optionally the line `cancel` (Ctrl-C of the client). A client that
//!   goes away cancels its job too.
//! * server → client: `{"progress": [DONE, TOTAL]}` while the job runs,
//!   then `{"end": {"exit_code": N, "summary": {...}, "lines": [...],
//!   "error": [CAUSE...], "hint": TEXT}}` (the `--json` summary, the human
//!   lines, or the failure and what to do).

use super::bitmap::BitmapDoc;
use crate::bitmap::file::{check_name, list_names};
use crate::bitmap::{Bitmap, BitmapError, Identity};
use crate::cli::{BitmapCommand, Cli, Command, GlobalOpts, ProgressMode};
use crate::exit::{Exit, Reported};
use crate::job::JobError;
use crate::job::backup::{BackupConfig, BackupJob, Served};
use crate::job::cancel::{Cancel, Reason};
use crate::report::human_bytes;
use crate::report::{Reporter, print_json};
use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The control socket of `image`: `IMAGE.ctl`.
pub fn socket_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Listen on the Unix socket `path` (non-blocking), replacing the socket
/// of a server that was killed; a live server there, or any other file, is
/// refused. `what` names the socket in messages (with the option that
/// chooses it).
pub fn bind_unix(path: &Path, what: &str) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            anyhow::bail!(
                "{}: exists and is not a socket; remove it or choose another place for {what}",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            return Err(JobError::Refused(format!(
                "{}: another server is listening there; stop it or choose another place for {what}",
                path.display()
            ))
            .into());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {} ({what})", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The serving side: runs the jobs the control clients ask for.
pub struct Control {
    /// The served image, canonical.
    image: PathBuf,
    /// Its graph, for jobs.
    served: Served,
    /// The running job's cancel (one job at a time).
    busy: Mutex<Option<Cancel>>,
    /// Jobs run.
    pub backups: AtomicU64,
}

/// What a request ends with.
#[derive(Default)]
struct End {
    exit: Exit,
    summary: Option<Value>,
    lines: Vec<String>,
    bitmaps: Vec<BitmapDoc>,
}

impl Control {
    /// Control of `image` served as `served`.
    pub fn new(image: &Path, served: Served) -> Control {
        Control {
            image: std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf()),
            served,
            busy: Mutex::new(None),
            backups: AtomicU64::new(0),
        }
    }

    /// Cancel the running job, if any (the server is stopping).
    pub fn cancel_running(&self, reason: Reason) {
        if let Ok(b) = self.busy.lock()
            && let Some(c) = b.as_ref()
        {
            c.cancel(reason);
        }
    }

    /// Serve one control connection.
    pub fn handle(&self, stream: UnixStream) {
        if let Err(e) = self.handle_inner(stream) {
            tracing::warn!("a control client was dropped: {e}");
        }
    }

    fn handle_inner(&self, stream: UnixStream) -> anyhow::Result<()> {
        stream.set_nonblocking(false)?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let out = Mutex::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let req: Value = serde_json::from_str(line.trim()).context("a malformed request")?;
        let cancel = Cancel::new();
        let finished = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            // The client's `cancel`, or its going away, cancels the job.
            s.spawn(|| watch_client(reader, &cancel, &finished));
            let r = match req.get("op").and_then(Value::as_str) {
                Some("backup") => self.backup(&req, &out, &cancel),
                Some("bitmaps") => self.check_image(&req).map(|_| self.bitmaps()),
                Some("bitmap") => self.check_image(&req).and_then(|_| self.bitmap(&req)),
                other => Err(JobError::Usage(format!(
                    "the server of {} cannot do {other:?}",
                    self.image.display()
                ))
                .into()),
            };
            finished.store(true, Ordering::SeqCst);
            r
        });
        let end = match result {
            Ok(end) => json!({
                "exit_code": end.exit.code(),
                "summary": end.summary,
                "lines": end.lines,
                "bitmaps": end.bitmaps,
            }),
            Err(err) => {
                let exit = crate::exit::classify(&err);
                let causes: Vec<String> = err.chain().map(|c| c.to_string()).collect();
                json!({
                    "exit_code": exit.code(),
                    "error": causes,
                    "hint": crate::exit::hint(&err),
                })
            }
        };
        send(&out, &json!({ "end": end }))?;
        Ok(())
    }

    /// Run `imgbackup backup ARGS` on the served image.
    fn backup(&self, req: &Value, out: &Mutex<UnixStream>, cancel: &Cancel) -> anyhow::Result<End> {
        let cwd = PathBuf::from(req.get("cwd").and_then(Value::as_str).unwrap_or("/"));
        let cli = parse(req)?;
        let Command::Backup(mut a) = cli.command else {
            return Err(JobError::Usage("the control socket runs `backup` only".into()).into());
        };
        for p in [&mut a.source, &mut a.target] {
            *p = cwd.join(&*p);
        }
        for p in [&mut a.backing, &mut a.guest_overlay].into_iter().flatten() {
            *p = cwd.join(&*p);
        }
        let source = std::fs::canonicalize(&a.source).unwrap_or_else(|_| a.source.clone());
        if source != self.image {
            return Err(JobError::Usage(format!(
                "{} is not the image this server serves ({})",
                a.source.display(),
                self.image.display()
            ))
            .into());
        }
        let job = BackupJob::prepare_served(BackupConfig::from(&*a), self.served.clone())?;
        let _busy = self.claim(cancel)?;
        if a.dry_run {
            let (s, d) = job.dry_run()?;
            return Ok(End {
                exit: Exit::Success,
                summary: Some(serde_json::to_value(&s)?),
                lines: super::render::dry_run_lines(&s, &d),
                ..End::default()
            });
        }
        self.backups.fetch_add(1, Ordering::Relaxed);
        let mut running = job.start(cancel.clone())?;
        let progress = running.progress();
        let stop = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let (done, total) = progress();
                    if send(out, &json!({ "progress": [done, total] })).is_err() {
                        return;
                    }
                    for _ in 0..5 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
            let r = running.run();
            stop.store(true, Ordering::Relaxed);
            r
        });
        if let Err(e) = result {
            return Err(running.abort(e).into());
        }
        let summary = running.commit()?;
        let mut lines = super::render::human_lines(&summary);
        let exit = if summary.ignored_ranges.is_empty() {
            Exit::Success
        } else {
            lines.push(super::render::skipped_warning(&summary));
            Exit::Skipped
        };
        Ok(End {
            exit,
            summary: Some(serde_json::to_value(&summary)?),
            lines,
            ..End::default()
        })
    }

    /// Every bitmap beside the image: the live ones as this process holds
    /// them, the others (disabled, damaged) as their files say.
    fn bitmaps(&self) -> End {
        let size = self.served.live.size();
        let live: Vec<(Bitmap, bool)> = match self.served.bitmaps.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let id = Identity::of(&self.image).ok();
        let docs = list_names(&self.image)
            .unwrap_or_default()
            .iter()
            .filter_map(|n| match live.iter().find(|(b, _)| &b.name == n) {
                Some((b, consistent)) => {
                    let why = (!consistent || b.inconsistent).then(|| {
                        "it was already inconsistent when the server started; it is marked but cannot be trusted".to_string()
                    });
                    let mut d = super::bitmap::doc_of(b, why, true);
                    d.served = true;
                    Some(d)
                }
                None => id
                    .as_ref()
                    .map(|id| super::bitmap::describe(&self.image, n, size, id, true)),
            })
            .collect();
        End {
            bitmaps: docs,
            ..End::default()
        }
    }

    /// `imgbackup bitmap add|remove|clear|enable|disable` on the served
    /// image, applied to the bitmaps this process marks, with the clients'
    /// writes drained.
    fn bitmap(&self, req: &Value) -> anyhow::Result<End> {
        let a = parse(req)?;
        let Command::Bitmap(cmd) = a.command else {
            return Err(JobError::Usage("not a bitmap command".into()).into());
        };
        // No job may start (and take a bitmap) while one is changed.
        let _busy = self.claim(&Cancel::new())?;
        let image = &self.image;
        let tracked = &self.served.bitmaps;
        let lock = || match tracked.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        let (msg, name) = match &cmd {
            BitmapCommand::Add {
                name,
                granularity,
                disabled,
                ..
            } => {
                check_name(name)?;
                self.add_live(name, *granularity, *disabled)?;
                (
                    format!(
                        "added bitmap '{name}' to {} ({} granularity)",
                        image.display(),
                        human_bytes(*granularity)
                    ),
                    name,
                )
            }
            BitmapCommand::Remove { name, .. } => {
                lock().retain(|(b, _)| &b.name != name);
                Bitmap::remove(image, name)?;
                (
                    format!("removed bitmap '{name}' of {}", image.display()),
                    name,
                )
            }
            BitmapCommand::Clear { name, .. } => {
                self.served.slot.drained(|| -> anyhow::Result<()> {
                    let mut v = lock();
                    let Some((b, consistent)) = v.iter_mut().find(|(b, _)| &b.name == name) else {
                        return Err(self.not_live(name));
                    };
                    if !*consistent || b.inconsistent {
                        return Err(BitmapError::Inconsistent {
                            name: name.clone(),
                            image: image.clone(),
                            reason: "it was already inconsistent when the server started".into(),
                        }
                        .into());
                    }
                    b.bits.clear_range(0, b.bits.len());
                    b.save(image)?;
                    Ok(())
                })?;
                (
                    format!("cleared bitmap '{name}' of {}", image.display()),
                    name,
                )
            }
            BitmapCommand::Enable { name, .. } => {
                self.served.slot.drained(|| -> anyhow::Result<()> {
                    if lock().iter().any(|(b, _)| &b.name == name) {
                        return Ok(());
                    }
                    let mut b = Bitmap::load(image, name)?;
                    self.served.live.flush()?;
                    let now = Identity::of(image)?;
                    let consistent = b.inconsistency(self.served.live.size(), &now).is_none();
                    b.enabled = true;
                    b.in_use = true;
                    b.save(image)?;
                    lock().push((b, consistent));
                    Ok(())
                })?;
                (
                    format!("enabled bitmap '{name}' of {}", image.display()),
                    name,
                )
            }
            BitmapCommand::Disable { name, .. } => {
                self.served.slot.drained(|| -> anyhow::Result<()> {
                    let mut v = lock();
                    let Some(at) = v.iter().position(|(b, _)| &b.name == name) else {
                        return Err(self.not_live(name));
                    };
                    let (mut b, consistent) = v.remove(at);
                    self.served.live.flush()?;
                    if consistent && !b.inconsistent {
                        b.identity = Identity::of(image)?;
                    } else {
                        b.inconsistent = true;
                    }
                    b.enabled = false;
                    b.in_use = false;
                    b.save(image)?;
                    Ok(())
                })?;
                (
                    format!("disabled bitmap '{name}' of {}", image.display()),
                    name,
                )
            }
            _ => return Err(self.offline_only()),
        };
        let bitmaps = self
            .bitmaps()
            .bitmaps
            .into_iter()
            .filter(|d| &d.name == name)
            .map(|mut d| {
                d.dirty_ranges = None;
                d
            })
            .collect();
        Ok(End {
            lines: vec![msg],
            bitmaps,
            ..End::default()
        })
    }

    /// The request names the image this process serves.
    fn check_image(&self, req: &Value) -> anyhow::Result<()> {
        let asked = req.get("image").and_then(Value::as_str).unwrap_or_default();
        if Path::new(asked) != self.image {
            return Err(JobError::Usage(format!(
                "{asked} is not the image this server serves ({})",
                self.image.display()
            ))
            .into());
        }
        Ok(())
    }

    /// What needs the image to itself.
    fn offline_only(&self) -> anyhow::Error {
        Reported {
            exit: Exit::Locked,
            message: format!(
                "{} is served by `imgbackup serve`: bitmap merge, import and rebuild are not available while it is served",
                self.image.display()
            ),
            hint: Some("stop the server (SIGINT or SIGTERM), then run this command".into()),
        }
        .into()
    }

    /// `bitmap add` on the served image: a new bitmap, clean as of now
    /// (writes drained), marked from the next write on when enabled.
    fn add_live(&self, name: &str, granularity: u64, disabled: bool) -> anyhow::Result<()> {
        let image = &self.image;
        self.served.slot.drained(|| -> anyhow::Result<()> {
            if !matches!(Bitmap::load(image, name), Err(BitmapError::Missing { .. })) {
                return Err(BitmapError::Exists {
                    name: name.to_string(),
                    image: image.clone(),
                }
                .into());
            }
            self.served.live.flush()?;
            let id = Identity::of(image)?;
            let mut b = Bitmap::new(name, granularity, self.served.live.size(), id);
            b.enabled = !disabled;
            b.in_use = b.enabled;
            b.save(image)?;
            if b.enabled {
                match self.served.bitmaps.lock() {
                    Ok(mut v) => v.push((b, true)),
                    Err(p) => p.into_inner().push((b, true)),
                }
            }
            Ok(())
        })
    }

    fn not_live(&self, name: &str) -> anyhow::Error {
        match Bitmap::load(&self.image, name) {
            Err(e) => e.into(),
            Ok(_) => BitmapError::Inconsistent {
                name: name.to_string(),
                image: self.image.clone(),
                reason: "it is disabled".into(),
            }
            .into(),
        }
    }

    /// Mark a job (or a bitmap change) running, one at a time; cleared
    /// when the guard drops.
    fn claim(&self, cancel: &Cancel) -> anyhow::Result<BusyGuard<'_>> {
        let mut b = match self.busy.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        if b.is_some() {
            return Err(Reported {
                exit: Exit::Locked,
                message: format!(
                    "a backup of {} is already running in the process serving it",
                    self.image.display()
                ),
                hint: Some("wait for it to finish, then run this command again".into()),
            }
            .into());
        }
        *b = Some(cancel.clone());
        Ok(BusyGuard(&self.busy))
    }
}

/// The command line of a request, as `imgbackup` parses it.
fn parse(req: &Value) -> anyhow::Result<Cli> {
    let mut argv = vec![std::ffi::OsString::from("imgbackup")];
    for a in req
        .get("args")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        argv.push(a.as_str().unwrap_or_default().into());
    }
    let (argv, _) = crate::cli::deprecated::rewrite(argv);
    Cli::try_parse_from(argv).map_err(|e| {
        let text = e.render().to_string();
        JobError::Usage(
            text.lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_string(),
        )
        .into()
    })
}

/// Clears the running job when dropped.
struct BusyGuard<'a>(&'a Mutex<Option<Cancel>>);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        match self.0.lock() {
            Ok(mut b) => *b = None,
            Err(p) => *p.into_inner() = None,
        }
    }
}

/// Cancel `cancel` when the client sends `cancel` or goes away, until
/// `finished`.
fn watch_client(mut reader: BufReader<UnixStream>, cancel: &Cancel, finished: &AtomicBool) {
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)));
    let mut line = String::new();
    while !finished.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => {
                cancel.cancel(Reason::Interrupt);
                return;
            }
            Ok(_) => {
                if line.trim() == "cancel" {
                    cancel.cancel(Reason::Interrupt);
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                cancel.cancel(Reason::Interrupt);
                return;
            }
        }
    }
}

fn send(out: &Mutex<UnixStream>, v: &Value) -> std::io::Result<()> {
    let mut s = match out.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// The control socket of a server serving `image`: at `--control PATH`
/// (which must answer), else at `IMAGE.ctl` if a server answers there.
pub fn connect(image: &Path, g: &GlobalOpts) -> anyhow::Result<Option<UnixStream>> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(p) = &g.control {
        return match UnixStream::connect(p) {
            Ok(s) => Ok(Some(s)),
            Err(e) => Err(JobError::Usage(format!(
                "--control {}: no `imgbackup serve` answers there ({e}); give the path its `serve --control` was given",
                p.display()
            ))
            .into()),
        };
    }
    let p = socket_path(image);
    let Ok(m) = std::fs::symlink_metadata(&p) else {
        return Ok(None);
    };
    if !m.file_type().is_socket() {
        return Ok(None);
    }
    Ok(UnixStream::connect(&p).ok())
}

/// Ask the server of `image`, if one answers, for `op` (`bitmaps`, or
/// `bitmap` with this process's command line): its `end` document, or the
/// failure it reported.
pub fn ask(image: &Path, op: &str, g: &GlobalOpts) -> Option<anyhow::Result<Value>> {
    let stream = match connect(image, g) {
        Ok(s) => s?,
        Err(e) => return Some(Err(e)),
    };
    Some(ask_on(stream, image, op))
}

/// Send `req` (one line) on a clone of `stream`, which is returned for
/// what the client writes later.
fn send_request(stream: &UnixStream, req: &Value) -> anyhow::Result<UnixStream> {
    let mut w = stream.try_clone()?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line)
        .context("cannot reach the server of the image")?;
    Ok(w)
}

/// The `end` document of a request: its exit, or the failure the server
/// reported (exit code, causes, hint) as this process's error.
fn end_result(end: Value) -> anyhow::Result<(Exit, Value)> {
    let exit = Exit::from_code(end.get("exit_code").and_then(Value::as_i64).unwrap_or(1) as i32);
    if let Some(causes) = end.get("error").and_then(Value::as_array) {
        return Err(Reported {
            exit,
            message: causes
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(": "),
            hint: end.get("hint").and_then(Value::as_str).map(str::to_string),
        }
        .into());
    }
    Ok((exit, end))
}

fn ask_on(stream: UnixStream, image: &Path, op: &str) -> anyhow::Result<Value> {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    send_request(
        &stream,
        &json!({
            "op": op,
            "args": args,
            "image": image.display().to_string(),
        }),
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(Reported {
                exit: Exit::Failure,
                message: "the server of the image closed the connection".into(),
                hint: None,
            }
            .into());
        }
        let mut v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
        if let Some(end) = v.get_mut("end") {
            return end_result(end.take()).map(|(_, end)| end);
        }
    }
}

/// The bitmaps of `image` as the process serving it holds them, if one
/// serves it.
pub fn served_bitmaps(image: &Path, g: &GlobalOpts) -> Option<anyhow::Result<Vec<BitmapDoc>>> {
    let end = ask(image, "bitmaps", g)?;
    Some(end.and_then(|e| {
        Ok(serde_json::from_value(
            e.get("bitmaps").cloned().unwrap_or(Value::Null),
        )?)
    }))
}

/// Run this process's `backup` command in the server at the other end of
/// `stream`: progress shown here, Ctrl-C cancels the job (never the
/// server), the summary or error printed here with the server's exit code.
pub fn backup(stream: UnixStream, g: &GlobalOpts, progress: ProgressMode) -> anyhow::Result<Exit> {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
        .map_err(|a| {
            JobError::Usage(format!(
                "{}: arguments for a served image must be UTF-8",
                a.to_string_lossy()
            ))
        })?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cancel = super::cancel_on_signals()?;
    let mut w = send_request(
        &stream,
        &json!({
            "op": "backup",
            "cwd": cwd.display().to_string(),
            "args": args,
        }),
    )?;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let counters = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let c = counters.clone();
    let reporter = Reporter::start(
        progress,
        g.quiet || g.json && progress == ProgressMode::Auto,
        "backup",
        Arc::new(move || (c.0.load(Ordering::Relaxed), c.1.load(Ordering::Relaxed))),
    );
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut cancel_sent = false;
    let end = loop {
        if cancel.is_cancelled() && !cancel_sent {
            cancel_sent = true;
            let _ = w.write_all(b"cancel\n");
        }
        match reader.read_line(&mut line) {
            Ok(0) => break None,
            Ok(_) => {
                let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
                line.clear();
                if let Some([d, t]) = v.get("progress").and_then(Value::as_array).map(|a| {
                    [
                        a.first().and_then(Value::as_u64).unwrap_or(0),
                        a.get(1).and_then(Value::as_u64).unwrap_or(0),
                    ]
                }) {
                    counters.0.store(d, Ordering::Relaxed);
                    counters.1.store(t, Ordering::Relaxed);
                } else if let Some(e) = v.get("end") {
                    break Some(e.clone());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break None,
        }
    };
    reporter.finish();
    let Some(end) = end else {
        // The image being backed up went away with its server: the source
        // could not be read to the end (SPEC §5: exit 4).
        return Err(Reported {
            exit: Exit::SourceRead,
            message: "the server of the image stopped during the backup".into(),
            hint: Some(
                "the backup was not made (a TARGET.partial it left is not a backup); run it again once the image is served or idle".into(),
            ),
        }
        .into());
    };
    let (exit, end) = end_result(end)?;
    if g.json {
        if let Some(s) = end.get("summary") {
            print_json(s)?;
        }
    } else if !g.quiet {
        for l in end
            .get("lines")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            crate::errln!("{}", l.as_str().unwrap_or_default());
        }
    }
    Ok(exit)
}
