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
    let o = crate::common::bin().arg("--help").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("backup") && text.contains("info") && text.contains("Exit status"));
    assert!(
        !text.contains("generate-docs"),
        "internal command shown in help"
    );
    let o = crate::common::bin().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("imgbackup "));
}
