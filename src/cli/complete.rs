//! Shell completion through clap_complete's dynamic engine: the scripts in
//! `completions/` (or `source <(COMPLETE=bash imgbackup)`) ask imgbackup
//! itself, so completions know what is on disk: the bitmaps beside the image
//! named on the command line for `--bitmap` and the `bitmap` commands, image
//! files for images, and backups (files with a manifest beside them) for
//! backups.

use clap::CommandFactory;
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Answer a completion request (`COMPLETE=<shell>` in the environment) and
/// exit; do nothing otherwise.
pub fn run_if_requested() {
    clap_complete::CompleteEnv::with_factory(super::Cli::command).complete();
}

/// The words of the command line being completed: after the `--` that the
/// registration scripts pass.
fn words() -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--") {
        Some(i) => args[i + 1..].to_vec(),
        None => Vec::new(),
    }
}

/// Bitmap names beside the first existing image among `words`, starting
/// with `current`.
pub fn bitmaps_for(words: &[String], current: &str) -> Vec<String> {
    let image = words
        .iter()
        .skip(1)
        .filter(|w| !w.starts_with('-'))
        .map(PathBuf::from)
        .find(|p| std::fs::metadata(p).is_ok_and(|m| !m.is_dir()));
    let Some(image) = image else {
        return Vec::new();
    };
    crate::bitmap::file::list_names(&image)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(current))
        .collect()
}

fn bitmap_candidates(current: &OsStr) -> Vec<CompletionCandidate> {
    let cur = current.to_string_lossy();
    bitmaps_for(&words(), &cur)
        .into_iter()
        .map(CompletionCandidate::new)
        .collect()
}

/// Complete bitmap names (the image is found on the command line).
pub fn bitmaps() -> ArgValueCompleter {
    ArgValueCompleter::new(bitmap_candidates)
}

/// Files and directories starting with `current` that `keep` accepts.
fn paths(current: &OsStr, keep: fn(&Path) -> bool) -> Vec<CompletionCandidate> {
    let cur = current.to_string_lossy();
    let (dir, prefix) = match cur.rfind('/') {
        Some(i) => (cur[..=i].to_string(), cur[i + 1..].to_string()),
        None => (String::new(), cur.to_string()),
    };
    let read = if dir.is_empty() { "." } else { dir.as_str() };
    let Ok(entries) = std::fs::read_dir(read) else {
        return Vec::new();
    };
    let mut out: Vec<CompletionCandidate> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) || (name.starts_with('.') && !prefix.starts_with('.')) {
                return None;
            }
            let path = e.path();
            if path.is_dir() {
                return Some(CompletionCandidate::new(format!("{dir}{name}/")));
            }
            keep(&path).then(|| CompletionCandidate::new(format!("{dir}{name}")))
        })
        .collect();
    out.sort_by(|a, b| a.get_value().cmp(b.get_value()));
    out
}

/// Disk images: qcow2 and raw files by their extension, and block devices.
fn is_image(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(ext, "qcow2" | "qcow" | "raw" | "img" | "bin" | "disk")
        || std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// Backups: files with a manifest beside them.
fn is_backup(p: &Path) -> bool {
    crate::manifest::manifest_path(p).exists()
}

/// Complete image file names (`.qcow2`, `.raw`, `.img`, ...; block devices).
pub fn images() -> ArgValueCompleter {
    ArgValueCompleter::new(|c: &OsStr| paths(c, is_image))
}

/// Complete backups (files with a `.manifest` beside them).
pub fn backups() -> ArgValueCompleter {
    ArgValueCompleter::new(|c: &OsStr| paths(c, is_backup))
}

/// Complete the name of a file to write: images, so an existing backup's
/// name is offered for `--force`, and directories.
pub fn outputs() -> ArgValueCompleter {
    ArgValueCompleter::new(|c: &OsStr| paths(c, is_image))
}

/// The registration script for `shell` (what `COMPLETE=<shell> imgbackup`
/// prints), as committed in `completions/`.
pub fn registration(shell: &str) -> std::io::Result<Vec<u8>> {
    use clap_complete::env::{Bash, EnvCompleter, Fish, Zsh};
    let mut buf = Vec::new();
    let sh: &dyn EnvCompleter = match shell {
        "bash" => &Bash,
        "zsh" => &Zsh,
        _ => &Fish,
    };
    sh.write_registration("COMPLETE", "imgbackup", "imgbackup", "imgbackup", &mut buf)?;
    Ok(buf)
}
