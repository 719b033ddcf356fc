//! The committed man pages and completions match the clap definition.
//! Regenerate with `cargo run -- generate-docs .`.

use std::path::Path;

#[test]
fn docs_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = imgbackup::cli::docs::render().expect("render docs");
    assert!(files.iter().any(|(p, _)| p.ends_with("imgbackup.1")));
    assert!(files.iter().any(|(p, _)| p.ends_with("imgbackup-backup.1")));
    let mut stale = Vec::new();
    for (rel, content) in files {
        match std::fs::read(root.join(&rel)) {
            Ok(old) if old == content => {}
            _ => stale.push(rel.display().to_string()),
        }
    }
    assert!(
        stale.is_empty(),
        "out of date: {stale:?}; run `cargo run -- generate-docs .` and commit the result"
    );
}

#[test]
fn help_and_version() {
    let o = crate::fixture::bin().arg("--help").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("backup") && text.contains("info") && text.contains("Exit status"));
    assert!(
        !text.contains("generate-docs"),
        "internal command shown in help"
    );
    let o = crate::fixture::bin().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("imgbackup "));
}

/// Every subcommand's `--help`: global options under their own heading,
/// every positional described, and no option outside the naming
/// convention.
#[test]
fn every_help_follows_the_conventions() {
    use clap::CommandFactory;
    // Options that read or write an image's format or cluster size, and
    // the words they must use (imgbackup(1), OPTION NAMES).
    let forbidden = [
        "--target-format",
        "--source-format",
        "--target-cluster-size",
        "--cluster-size",
        "--against-format",
        "--against ",
    ];
    let cmd = imgbackup::cli::Cli::command();
    let mut paths: Vec<Vec<String>> = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        paths.push(vec![sub.get_name().to_string()]);
        for nested in sub.get_subcommands() {
            paths.push(vec![
                sub.get_name().to_string(),
                nested.get_name().to_string(),
            ]);
        }
    }
    assert!(paths.len() >= 16, "{paths:?}");
    for path in paths {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = crate::fixture::bin().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let global = text
            .find("Global options:")
            .unwrap_or_else(|| panic!("{args:?}: no 'Global options' heading:\n{text}"));
        for g in ["--json", "--quiet", "--verbose"] {
            let at = text.find(g).unwrap_or_else(|| panic!("{args:?}: no {g}"));
            assert!(at > global, "{args:?}: {g} is not under Global options");
        }
        for bad in forbidden {
            assert!(!text.contains(bad), "{args:?}: uses {bad}:\n{text}");
        }
        // Progress only where there is progress to show.
        let copies = matches!(path[0].as_str(), "backup" | "restore");
        assert_eq!(text.contains("--progress"), copies, "{args:?}: --progress");
        // Every positional argument has a description.
        if let Some(a) = text.find("Arguments:") {
            let end = text[a..]
                .find("\nOptions:")
                .map(|e| a + e)
                .unwrap_or(text.len());
            let lines: Vec<&str> = text[a..end].lines().skip(1).collect();
            for (i, line) in lines.iter().enumerate() {
                let t = line.trim();
                if t.starts_with('<') {
                    let same_line = t.split_once('>').is_some_and(|(_, d)| !d.trim().is_empty());
                    let next_line = lines
                        .get(i + 1)
                        .is_some_and(|n| !n.trim().is_empty() && !n.trim().starts_with('<'));
                    assert!(
                        same_line || next_line,
                        "{args:?}: positional without a description: {t}"
                    );
                }
            }
        }
    }
    // The long help has the whole exit-code table.
    let o = crate::fixture::bin().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    for code in [
        "0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 ", "8 ", "9 ", "129", "130", "143",
    ] {
        assert!(
            text.contains(&format!("    {code}")),
            "exit code {code} missing:\n{text}"
        );
    }
}

/// Every man page has EXIT STATUS, EXAMPLES and a SEE ALSO whose every
/// reference is a page in man/.
#[test]
fn man_pages_are_whole_and_see_also_points_at_pages_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    let pages: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for sub in [
        "backup",
        "verify",
        "restore",
        "info",
        "guest",
        "bitmap",
        "bitmap-add",
        "bitmap-remove",
        "bitmap-clear",
        "bitmap-enable",
        "bitmap-disable",
        "bitmap-list",
        "bitmap-show",
        "bitmap-merge",
        "bitmap-import",
        "bitmap-rebuild",
    ] {
        assert!(
            pages.contains(&format!("imgbackup-{sub}.1")),
            "no page for {sub}"
        );
    }
    for p in &pages {
        let text = std::fs::read_to_string(root.join(p)).unwrap();
        for section in [
            ".SH \"EXIT STATUS\"",
            ".SH EXAMPLES",
            ".SH \"SEE ALSO\"",
            "\\-\\-json",
        ] {
            assert!(text.contains(section), "{p}: no {section}");
        }
        let see = &text[text.find(".SH \"SEE ALSO\"").unwrap()..];
        let refs: Vec<&str> = see
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with(".SH"))
            .flat_map(|l| l.split(", "))
            .filter(|r| !r.trim().is_empty())
            .collect();
        assert!(!refs.is_empty(), "{p}: empty SEE ALSO");
        for r in refs {
            let name = r.trim().trim_end_matches("(1)");
            assert!(
                pages.contains(&format!("{name}.1")),
                "{p}: SEE ALSO {r} does not exist"
            );
        }
        // clap's "help" subcommand has no page and is not referred to.
        assert!(!text.contains("help(1)"), "{p} refers to a help page");
    }
    let backup = std::fs::read_to_string(root.join("imgbackup-backup.1")).unwrap();
    assert!(backup.contains("FAULT INJECTION") && backup.contains("nth="));
    assert!(
        backup.contains("crontab"),
        "the backup page has a cron recipe"
    );
}

/// The spellings of 0.1 still work for one release, with a note.
#[test]
fn old_option_spellings_work_with_a_deprecation_note() {
    let d = crate::fixture::tempdir();
    let p = d.path();
    crate::fixture::make_raw(p, "src.raw", "4M");
    let o = crate::fixture::run_in(
        p,
        &[
            "backup",
            "--target-format",
            "qcow2",
            "--cluster-size",
            "128K",
            "--source-format",
            "raw",
            "src.raw",
            "t.img",
        ],
    );
    let err = crate::fixture::stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("--target-format is deprecated") && err.contains("--output-format"),
        "{err}"
    );
    assert!(
        err.contains("--cluster-size is deprecated") && err.contains("--granularity"),
        "{err}"
    );
    assert_eq!(crate::fixture::info_json(p, "t.img")["format"], "qcow2");
    let o = crate::fixture::run_in(p, &["verify", "t.img", "--against", "src.raw"]);
    assert_eq!(o.status.code(), Some(0), "{}", crate::fixture::stderr(&o));
    let o = crate::fixture::run_in(
        p,
        &[
            "restore",
            "--format",
            "qcow2",
            "--cluster-size",
            "4K",
            "t.img",
            "r.qcow2",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", crate::fixture::stderr(&o));
    assert_eq!(
        crate::fixture::info_json(p, "r.qcow2")["cluster-size"],
        4096
    );
    // -q silences the note.
    let o = crate::fixture::run_in(p, &["-q", "verify", "t.img", "--against", "src.raw"]);
    assert!(
        crate::fixture::stderr(&o).is_empty(),
        "{}",
        crate::fixture::stderr(&o)
    );
}

/// Usage errors: exit 2, and with --json the error document on stdout;
/// -q with -v is one.
#[test]
fn usage_errors_with_json_and_quiet_verbose() {
    let (rc, doc, err) =
        crate::fixture::json_run(Path::new("."), &["backup", "--speed", "fast", "a", "b"]);
    assert_eq!(rc, 2, "{err}");
    assert_eq!(doc["ok"], false, "{doc}");
    assert_eq!(doc["exit_code"], 2);
    assert!(doc["error"].as_str().unwrap().contains("fast"), "{doc}");
    let o = crate::fixture::bin()
        .args(["-q", "-v", "info", "x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        crate::fixture::stderr(&o).contains("cannot be used with"),
        "{}",
        crate::fixture::stderr(&o)
    );
}

/// Shell completion knows the bitmaps beside the image on the command line,
/// and offers images for images.
#[test]
fn completion_offers_bitmap_names_and_images() {
    let d = crate::fixture::tempdir();
    let p = d.path();
    crate::fixture::make_raw(p, "disk.raw", "4M");
    crate::fixture::ok(p, &["bitmap", "add", "disk.raw", "nightly"]);
    crate::fixture::ok(p, &["bitmap", "add", "disk.raw", "weekly"]);
    std::fs::write(p.join("notes.txt"), b"x").unwrap();
    let complete = |words: &[&str]| -> Vec<String> {
        let o = crate::fixture::bin()
            .current_dir(p)
            .env("COMPLETE", "bash")
            .env("_CLAP_COMPLETE_INDEX", (words.len() - 1).to_string())
            .env("_CLAP_IFS", "\n")
            .arg("--")
            .args(words)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", crate::fixture::stderr(&o));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with('-'))
            .map(String::from)
            .collect()
    };
    let got = complete(&["imgbackup", "bitmap", "show", "disk.raw", ""]);
    assert_eq!(got, ["nightly", "weekly"], "{got:?}");
    let got = complete(&[
        "imgbackup",
        "backup",
        "disk.raw",
        "t.qcow2",
        "--bitmap",
        "w",
    ]);
    assert_eq!(got, ["weekly"], "{got:?}");
    let got = complete(&["imgbackup", "info", ""]);
    assert!(
        got.contains(&"disk.raw".to_string()) && !got.contains(&"notes.txt".to_string()),
        "{got:?}"
    );
}
