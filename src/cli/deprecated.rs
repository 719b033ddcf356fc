//! Old option spellings, kept for one release as hidden aliases: the
//! command line is rewritten to the new spelling before clap parses it, and
//! each use prints a deprecation note on stderr (unless `-q`).
//!
//! The naming convention (imgbackup(1), OPTION NAMES): `--format` is the
//! format of an image a command reads, `--output-format` the format of the
//! file it writes, `--output-cluster-size` the qcow2 cluster size of that
//! file, `--granularity` the unit a job or bitmap tracks, `--against-image`
//! an image to compare with and `--against-backup` a backup to compare with.

use std::ffi::OsString;

/// (command, old spelling, new spelling), removed in 0.3.
pub const RENAMED: &[(&str, &str, &str)] = &[
    ("backup", "--target-format", "--output-format"),
    ("backup", "--source-format", "--format"),
    ("backup", "--target-cluster-size", "--output-cluster-size"),
    ("backup", "--cluster-size", "--granularity"),
    ("restore", "--format", "--output-format"),
    ("restore", "--cluster-size", "--output-cluster-size"),
    ("verify", "--against", "--against-image"),
    ("verify", "--against-format", "--format"),
    ("bitmap rebuild", "--against", "--against-backup"),
];

/// The command a command line runs (`backup`, `bitmap rebuild`, ...):
/// its first one or two words that are not options.
fn command_of(args: &[OsString]) -> String {
    let words: Vec<&str> = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .filter(|a| !a.starts_with('-'))
        .take(2)
        .collect();
    match words.as_slice() {
        ["bitmap", sub, ..] => format!("bitmap {sub}"),
        [cmd, ..] => (*cmd).to_string(),
        [] => String::new(),
    }
}

/// Rewrite old spellings to new ones; returns the new command line and one
/// deprecation note per rewritten option.
pub fn rewrite(args: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    let cmd = command_of(&args);
    let mut notes = Vec::new();
    let mut out = Vec::with_capacity(args.len());
    let mut after_dashes = false;
    for a in args {
        let Some(t) = a.to_str().filter(|_| !after_dashes) else {
            out.push(a);
            continue;
        };
        if t == "--" {
            after_dashes = true;
            out.push(a);
            continue;
        }
        let (name, value) = match t.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (t, None),
        };
        match RENAMED.iter().find(|(c, old, _)| *c == cmd && *old == name) {
            Some((_, old, new)) => {
                notes.push(format!(
                    "{old} is deprecated and will be removed in imgbackup 0.3; use {new}"
                ));
                out.push(match value {
                    Some(v) => OsString::from(format!("{new}={v}")),
                    None => OsString::from(*new),
                });
            }
            None => out.push(a),
        }
    }
    (out, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn old_spellings_follow_their_command() {
        let (a, n) = rewrite(os(&[
            "imgbackup",
            "-q",
            "backup",
            "--cluster-size=128K",
            "s",
            "t",
        ]));
        assert_eq!(
            a,
            os(&["imgbackup", "-q", "backup", "--granularity=128K", "s", "t"])
        );
        assert_eq!(n.len(), 1);
        let (a, _) = rewrite(os(&["imgbackup", "restore", "--format", "qcow2", "b", "o"]));
        assert_eq!(
            a,
            os(&["imgbackup", "restore", "--output-format", "qcow2", "b", "o"])
        );
        // info's --format is the new convention already.
        let (a, n) = rewrite(os(&["imgbackup", "info", "--format", "raw", "x"]));
        assert_eq!(a, os(&["imgbackup", "info", "--format", "raw", "x"]));
        assert!(n.is_empty());
        let (a, _) = rewrite(os(&[
            "imgbackup",
            "bitmap",
            "rebuild",
            "i",
            "b",
            "--against",
            "f",
        ]));
        assert_eq!(a[5], "--against-backup");
        let (a, _) = rewrite(os(&["imgbackup", "verify", "--", "--against"]));
        assert_eq!(a[3], "--against");
    }
}
