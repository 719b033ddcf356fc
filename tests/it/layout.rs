//! The layout ARCHITECTURE.md describes, kept true: the core never reaches
//! the command line, sync modes are decided in one module, the command
//! layer stays thin, and every source file is in ARCHITECTURE.md.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn src_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    rust_files(&root().join("src"), &mut v);
    v.sort();
    v
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Lines of code (comments dropped).
fn code_lines(p: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

#[test]
fn the_core_never_imports_the_command_line() {
    let core = [
        "src/node/",
        "src/copy/",
        "src/job/",
        "src/bitmap/",
        "src/target/",
        "src/manifest/",
        "src/nbd/",
        "src/compare.rs",
        "src/files.rs",
        "src/units.rs",
    ];
    let mut bad = Vec::new();
    for f in src_files() {
        let r = rel(&f);
        if !core.iter().any(|c| r.starts_with(c)) {
            continue;
        }
        for (n, l) in code_lines(&f) {
            if ["crate::cli", "crate::exit", "crate::app", "anyhow", "clap"]
                .iter()
                .any(|w| l.contains(w))
            {
                bad.push(format!("{r}:{n}: {}", l.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the core reaches the edge:\n{}",
        bad.join("\n")
    );
}

#[test]
fn sync_modes_are_decided_in_one_module() {
    let allowed = ["src/job/sync_mode.rs", "src/cli/values.rs"];
    let mut bad = Vec::new();
    for f in src_files() {
        let r = rel(&f);
        if allowed.contains(&r.as_str()) {
            continue;
        }
        for (n, l) in code_lines(&f) {
            if l.contains("SyncMode::") {
                bad.push(format!("{r}:{n}: {}", l.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "SyncMode used outside job/sync_mode.rs:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_backup_command_stays_thin() {
    let n = std::fs::read_to_string(root().join("src/app/backup.rs"))
        .unwrap()
        .lines()
        .count();
    assert!(
        n < 250,
        "src/app/backup.rs has {n} lines: move job logic into src/job/"
    );
}

#[test]
fn architecture_md_names_every_source_file() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let missing: Vec<String> = src_files()
        .iter()
        .map(|f| rel(f))
        .filter(|r| !doc.contains(&format!("`{r}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name: {missing:?}"
    );
    // And names no file that is gone.
    for part in doc.split('`').skip(1).step_by(2) {
        if part.starts_with("src/") && part.ends_with(".rs") {
            assert!(
                root().join(part).exists(),
                "ARCHITECTURE.md names {part}, which does not exist"
            );
        }
    }
}
