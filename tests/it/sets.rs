//! Backup sets (SPEC §10): `list`, `prune` with retention rules and
//! consolidation, `consolidate`. Backups are dated with `IMGBACKUP_NOW`
//! (the clock the manifests record), so nights are simulated without
//! waiting for them.

use crate::fixture::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

/// imgbackup with the clock set to `now`.
fn at(p: &Path, now: &str, args: &[&str]) -> Output {
    bin()
        .current_dir(p)
        .env("IMGBACKUP_NOW", now)
        .args(args)
        .output()
        .unwrap()
}

fn at_ok(p: &Path, now: &str, args: &[&str]) {
    let o = at(p, now, args);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
}

fn night(d: u32) -> String {
    format!("2026-11-{d:02}T02:00:00Z")
}

/// The backup files in `dir` (manifests and the rest apart).
fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A full backup and `n` nightly incrementals of `disk` into `b/`, each
/// night's image kept as `ref-NN.raw`.
fn chain(p: &Path, disk: &str, prefix: &str, n: u32) {
    std::fs::create_dir_all(p.join("b")).unwrap();
    for d in 1..=n {
        if d > 1 {
            ok(p, &["guest", disk, &format!("iops=0,count=12,seed={d}")]);
        }
        let name = format!("b/{prefix}-{d:02}.qcow2");
        let mut args = vec!["backup", "-q", "--bitmap", "nightly"];
        if d > 1 {
            args.extend_from_slice(&["--sync", "incremental"]);
        }
        args.extend_from_slice(&[disk, &name]);
        at_ok(p, &night(d), &args);
        std::fs::copy(p.join(disk), p.join(format!("ref-{prefix}-{d:02}.raw"))).unwrap();
    }
}

/// `name` restores to the image as it was that night, by imgbackup and
/// by qemu-img, verifies, and checks clean.
fn restores(p: &Path, name: &str, reference: &str, why: &str) {
    let out = format!("{name}.restored.raw");
    let _ = std::fs::remove_file(p.join(&out));
    let o = run_in(p, &["restore", "-q", name, &out]);
    assert_eq!(code(&o), 0, "{why}: restore {name}: {}", stderr(&o));
    assert!(
        identical(p, &out, reference),
        "{why}: {name} restored is not {reference}"
    );
    std::fs::remove_file(p.join(&out)).unwrap();
    assert!(
        identical_fmt(p, name, "qcow2", reference, "raw"),
        "{why}: qemu-img reads {name} as other than {reference}"
    );
    let o = run_in(p, &["verify", "-q", name]);
    assert_eq!(code(&o), 0, "{why}: verify {name}: {}", stderr(&o));
    check_clean(p, name);
}

#[test]
fn twenty_nights_pruned_daily_and_weekly_keep_exactly_what_the_rules_keep() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    std::fs::create_dir_all(p.join("b")).unwrap();
    let mut survivors: Vec<u32> = Vec::new();
    for n in 1..=20u32 {
        if n > 1 {
            ok(
                p,
                &["guest", "disk.raw", &format!("iops=0,count=12,seed={n}")],
            );
        }
        let name = format!("b/n{n:02}.qcow2");
        let mut args = vec!["backup", "-q", "--bitmap", "nightly"];
        if n > 1 {
            args.extend_from_slice(&["--sync", "incremental"]);
        }
        args.extend_from_slice(&["disk.raw", &name]);
        at_ok(p, &night(n), &args);
        std::fs::copy(p.join("disk.raw"), p.join(format!("ref-{n:02}.raw"))).unwrap();
        at_ok(
            p,
            &night(n),
            &[
                "prune",
                "-q",
                "b",
                "--keep-daily",
                "7",
                "--keep-weekly",
                "2",
            ],
        );
        // What the rules keep, worked out here: one backup a night, so the
        // 7 newest days are the 7 newest backups; weeks run Monday to
        // Sunday (2026-11-02 is a Monday), the newest of each of the 2
        // newest weeks is kept.
        survivors.push(n);
        let week = |d: u32| (i64::from(d) - 2).div_euclid(7);
        let mut keep: BTreeSet<u32> = survivors.iter().rev().take(7).copied().collect();
        let mut weeks: Vec<i64> = survivors.iter().map(|&d| week(d)).collect();
        weeks.dedup();
        for w in weeks.iter().rev().take(2) {
            keep.insert(*survivors.iter().filter(|&&d| week(d) == *w).max().unwrap());
        }
        survivors.retain(|d| keep.contains(d));
        let want: BTreeSet<String> = survivors
            .iter()
            .flat_map(|d| [format!("n{d:02}.qcow2"), format!("n{d:02}.qcow2.manifest")])
            .collect();
        assert_eq!(files(&p.join("b")), want, "night {n}");
        for &k in &survivors {
            restores(
                p,
                &format!("b/n{k:02}.qcow2"),
                &format!("ref-{k:02}.raw"),
                &format!("night {n}"),
            );
        }
    }
    // The bitmap still works on the pruned chain.
    ok(p, &["guest", "disk.raw", "iops=0,count=12,seed=99"]);
    at_ok(
        p,
        &night(21),
        &[
            "backup",
            "-q",
            "--sync",
            "incremental",
            "--bitmap",
            "nightly",
            "disk.raw",
            "b/n21.qcow2",
        ],
    );
    assert!(identical_fmt(p, "b/n21.qcow2", "qcow2", "disk.raw", "raw"));
}

#[test]
fn list_shows_two_chains_an_orphan_and_a_missing_parent() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "a.raw", 4);
    data_disk(p, "c.raw", 4);
    chain(p, "a.raw", "a", 3);
    chain(p, "c.raw", "c", 3);
    // An orphan: a manifest whose file is gone. A broken chain: c-02 gone
    // whole, so c-03's parent is missing.
    std::fs::remove_file(p.join("b/a-03.qcow2")).unwrap();
    std::fs::remove_file(p.join("b/c-02.qcow2")).unwrap();
    std::fs::remove_file(p.join("b/c-02.qcow2.manifest")).unwrap();
    // For cron: the orphan and the broken chain make it exit 7, with one
    // line naming them.
    let (rc, doc, err) = json_run(p, &["list", "b"]);
    assert_eq!(rc, 7, "{err}");
    assert!(
        err.contains("2 backup(s) cannot be restored")
            && err.contains("a-03.qcow2 (file missing)")
            && err.contains("c-03.qcow2 (parent missing)"),
        "{err}"
    );
    let by_name = |n: &str| {
        doc["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {doc}"))
            .clone()
    };
    let a_src = std::fs::canonicalize(p.join("a.raw")).unwrap();
    let c_src = std::fs::canonicalize(p.join("c.raw")).unwrap();
    let sources = doc["sources"].as_object().unwrap();
    assert_eq!(sources.len(), 2, "{doc}");
    assert_eq!(
        sources[&a_src.display().to_string()],
        serde_json::json!(["a-01.qcow2", "a-02.qcow2", "a-03.qcow2"])
    );
    assert_eq!(
        sources[&c_src.display().to_string()],
        serde_json::json!(["c-01.qcow2", "c-03.qcow2"])
    );
    let a1 = by_name("a-01.qcow2");
    assert_eq!(a1["sync"], "full");
    assert_eq!(a1["parent"], serde_json::Value::Null);
    assert_eq!(a1["started"], night(1));
    assert_eq!(a1["present"], true);
    assert_eq!(a1["bound"], true);
    assert!(a1["disk_usage"].as_u64().unwrap() > 0);
    assert_eq!(a1["virtual_size"], 4 << 20);
    let a2 = by_name("a-02.qcow2");
    assert_eq!(a2["parent"], "a-01.qcow2");
    assert_eq!(a2["sync"], "incremental");
    let a3 = by_name("a-03.qcow2");
    assert_eq!(a3["orphan"], true);
    assert_eq!(a3["present"], false);
    // The bitmap is anchored to the newest of each chain.
    assert_eq!(
        a3["bitmaps"],
        serde_json::json!([format!("{}:nightly", a_src.display())])
    );
    let c3 = by_name("c-03.qcow2");
    assert_eq!(c3["parent_missing"], true);
    assert_eq!(c3["parent"], "c-02.qcow2");
    assert_eq!(by_name("c-01.qcow2")["parent_missing"], false);
    // Root digests are the manifests'.
    let m = std::fs::read(p.join("b/a-02.qcow2.manifest")).unwrap();
    assert!(!m.is_empty());
    assert_eq!(a2["root_digest"].as_str().unwrap().len(), 64, "{a2}");
    // --verify checks each present backup; the human listing says what is
    // wrong.
    let (rc, v, err) = json_run(p, &["list", "--verify", "b/a-01.qcow2", "b/a-02.qcow2"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(v["backups"].as_array().unwrap().len(), 2);
    assert!(
        v["backups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["verified"] == true)
    );
    let text = stdout(&run_in(p, &["list", "b"]));
    assert!(
        text.contains("ORPHAN") && text.contains("PARENT MISSING"),
        "{text}"
    );
    // A damaged backup fails --verify with exit 7.
    let f = p.join("b/a-01.qcow2");
    let len = std::fs::metadata(&f).unwrap().len();
    let mut data = std::fs::read(&f).unwrap();
    let at = (len / 2) as usize;
    data[at] ^= 0xff;
    std::fs::write(&f, data).unwrap();
    let (rc, v, _) = json_run(p, &["list", "--verify", "b"]);
    assert_eq!(rc, 7);
    let a1 = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "a-01.qcow2")
        .unwrap()
        .clone();
    assert_eq!(a1["verified"], false, "{a1}");
}

fn sha_all(dir: &Path) -> Vec<(String, String)> {
    files(dir)
        .into_iter()
        .map(|f| {
            let h = sha256_file(&dir.join(&f));
            (f, h)
        })
        .collect()
}

#[test]
fn a_dry_run_changes_nothing_and_prints_the_plan() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "a.raw", 4);
    chain(p, "a.raw", "a", 5);
    let before = sha_all(&p.join("b"));
    let o = at(
        p,
        &night(5),
        &["prune", "b", "--keep-last", "2", "--dry-run"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let plan = stdout(&o);
    for (name, verb) in [
        ("a-01", "remove"),
        ("a-02", "remove"),
        ("a-03", "remove"),
        ("a-04", "consolidate"),
        ("a-05", "keep"),
    ] {
        assert!(
            plan.lines()
                .any(|l| l.starts_with(verb) && l.contains(name)),
            "{name} should be {verb}: {plan}"
        );
    }
    let (rc, doc, _) = json_run(p, &["prune", "b", "--keep-last", "2", "--dry-run"]);
    assert_eq!(rc, 0);
    assert_eq!(doc["dry_run"], true);
    assert!(doc["freed_bytes"].as_u64().unwrap() > 0);
    assert_eq!(sha_all(&p.join("b")), before);
    // No rule: refused, nothing changed.
    let o = run_in(p, &["prune", "b"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(sha_all(&p.join("b")), before);
}

#[test]
fn prune_and_backups_into_the_directory_exclude_each_other() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "a.raw", 32);
    chain(p, "a.raw", "a", 2);
    // A backup writing into b/ (slowed down): prune is refused (exit 8),
    // or waits for it with --wait-lock.
    let slow = bin()
        .current_dir(p)
        .args(["backup", "-q", "--speed", "8M", "a.raw", "b/slow.qcow2"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let o = run_in(p, &["prune", "b", "--keep-last", "1"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    let o = run_in(p, &["prune", "b", "--keep-last", "5", "--wait-lock", "30s"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success());
    // A prune holding b/ (here: its lock, as `flock` takes it): a backup
    // into b/ is refused with exit 8, nothing written.
    let holder = std::process::Command::new("flock")
        .args(["-x"])
        .arg(p.join("b"))
        .args(["sleep", "3"])
        .spawn()
        .expect("flock (util-linux)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let o = run_in(p, &["backup", "a.raw", "b/during.qcow2"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("pruned"), "{}", stderr(&o));
    assert!(!p.join("b/during.qcow2").exists());
    let mut holder = holder;
    holder.wait().unwrap();
}

#[test]
fn consolidate_makes_a_synthetic_full_without_touching_the_source() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "a.raw", 8);
    chain(p, "a.raw", "a", 4);
    let src = sha256_file(&p.join("a.raw"));
    let before = sha_all(&p.join("b"));
    let doc = ok(p, &["consolidate", "b/a-03.qcow2", "full.qcow2"]);
    assert_eq!(sha256_file(&p.join("a.raw")), src);
    assert_eq!(sha_all(&p.join("b")), before);
    assert!(info_json(p, "full.qcow2").get("backing-filename").is_none());
    assert!(identical_fmt(
        p,
        "full.qcow2",
        "qcow2",
        "ref-a-03.raw",
        "raw"
    ));
    check_clean(p, "full.qcow2");
    ok(p, &["verify", "full.qcow2"]);
    // Its manifest describes the same point in time: same root, the
    // original source and start time, no parent.
    let inc = ok(p, &["list", "b/a-03.qcow2"]);
    let full = ok(p, &["list", "full.qcow2"]);
    let (i, f) = (&inc["backups"][0], &full["backups"][0]);
    assert_eq!(f["root_digest"], i["root_digest"]);
    assert_eq!(f["started"], night(3));
    assert_eq!(f["source"], i["source"]);
    assert_eq!(f["parent"], serde_json::Value::Null);
    assert_eq!(doc["manifest_root_digest"], i["root_digest"]);
    // It needs the chain no more.
    for n in 1..=3 {
        std::fs::remove_file(p.join(format!("b/a-{n:02}.qcow2"))).unwrap();
    }
    restores(p, "full.qcow2", "ref-a-03.raw", "after removing the chain");
}

fn setup_prune(p: &Path) {
    data_disk(p, "a.raw", 8);
    chain(p, "a.raw", "a", 4);
}

/// The files of `b/` that a finished prune --keep-last 2 leaves.
fn final_files() -> BTreeSet<String> {
    [
        "a-03.qcow2",
        "a-03.qcow2.manifest",
        "a-04.qcow2",
        "a-04.qcow2.manifest",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn a_prune_killed_at_any_step_leaves_every_kept_backup_restorable_and_a_rerun_finishes_it() {
    let args = ["prune", "-q", "b", "--keep-last", "2"];
    let n = {
        let d = tempdir();
        let p = d.path();
        setup_prune(p);
        let log = p.join("calls.log");
        let o = crate::crash::run_shim(p, &args, None, Some(&log));
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert_eq!(files(&p.join("b")), final_files());
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count() as u64
    };
    assert!(
        n >= 10,
        "a prune with a consolidation passes only {n} crash points"
    );
    eprintln!("prune --keep-last 2 with one consolidation: {n} crash points");
    for at in 1..=n {
        let d = tempdir();
        let p = d.path();
        setup_prune(p);
        let o = crate::crash::run_shim(p, &args, Some(at), None);
        assert_eq!(code(&o), 137, "crash at {at}: {}", stderr(&o));
        let why = format!("after a kill at step {at} of {n}");
        // Every backup the plan keeps restores, by imgbackup and qemu-img.
        for k in ["a-03", "a-04"] {
            restores(
                p,
                &format!("b/{k}.qcow2"),
                &format!("ref-a-{}.raw", &k[2..]),
                &why,
            );
        }
        // A rerun finishes the plan: the same final state as without a kill.
        let o = run_in(p, &args);
        assert_eq!(code(&o), 0, "{why}: rerun: {}", stderr(&o));
        assert_eq!(files(&p.join("b")), final_files(), "{why}");
        for k in ["a-03", "a-04"] {
            restores(
                p,
                &format!("b/{k}.qcow2"),
                &format!("ref-a-{}.raw", &k[2..]),
                &why,
            );
        }
        assert!(
            info_json(p, "b/a-03.qcow2")
                .get("backing-filename")
                .is_none(),
            "{why}"
        );
        // The bitmap goes on from the newest backup.
        ok(p, &["guest", "a.raw", "iops=0,count=5,seed=77"]);
        at_ok(
            p,
            &night(5),
            &[
                "backup",
                "-q",
                "--sync",
                "incremental",
                "--bitmap",
                "nightly",
                "a.raw",
                "b/a-05.qcow2",
            ],
        );
        assert!(
            identical_fmt(p, "b/a-05.qcow2", "qcow2", "a.raw", "raw"),
            "{why}"
        );
    }
}

#[test]
fn a_chain_that_does_not_hold_its_manifest_is_never_pruned_into() {
    let d = tempdir();
    let p = d.path();
    setup_prune(p);
    // a-01 (to be removed) is damaged where a-03 reads it: a-03 read
    // through its chain is not the image its manifest describes, so it
    // cannot be consolidated.
    let from_a01 = map_json(p, "b/a-03.qcow2")
        .into_iter()
        .find(|e| e["depth"] == 2 && e["data"] == true && e["offset"].is_u64())
        .expect("a cluster a-03 reads from a-01");
    let at = from_a01["offset"].as_u64().unwrap() as usize;
    let f = p.join("b/a-01.qcow2");
    let mut data = std::fs::read(&f).unwrap();
    data[at] ^= 0x5a;
    std::fs::write(&f, data).unwrap();
    let before = sha_all(&p.join("b"));
    let o = run_in(p, &["prune", "b", "--keep-last", "2"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing was removed"), "{}", stderr(&o));
    // Nothing removed, nothing left over, no plan pending.
    let after = sha_all(&p.join("b"));
    let names = |v: &[(String, String)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&after), names(&before));
    for (f, h) in &before {
        if f != "a-03.qcow2" && f != "a-03.qcow2.manifest" {
            assert_eq!(
                after.iter().find(|x| &x.0 == f).unwrap().1,
                *h,
                "{f} changed"
            );
        }
    }
}

#[test]
fn list_verify_reads_each_backup_once_and_still_finds_damage() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "a.raw", 8);
    chain(p, "a.raw", "a", 5);
    let (rc, doc, err) = json_run(p, &["list", "--verify", "b"]);
    assert_eq!(rc, 0, "{err}");
    let b = doc["backups"].as_array().unwrap();
    let full = b[0]["chunks_checked"].as_u64().unwrap();
    assert_eq!(full, 128, "{doc}");
    for inc in &b[1..] {
        assert_eq!(inc["verified"], true);
        // An incremental over a verified parent checks what it holds
        // (12 guest writes, each within two chunks), not the whole image.
        let n = inc["chunks_checked"].as_u64().unwrap();
        assert!(n <= 24, "{}: {n} chunks checked", inc["name"]);
    }
    // Damage in a-03's own clusters: it fails, and so do the backups that
    // read through it (their parent did not verify, so they are checked
    // whole); the ones below stay good.
    let own = map_json(p, "b/a-03.qcow2")
        .into_iter()
        .find(|e| e["depth"] == 0 && e["data"] == true && e["offset"].is_u64())
        .expect("a cluster of a-03's own");
    let f = p.join("b/a-03.qcow2");
    let mut data = std::fs::read(&f).unwrap();
    data[own["offset"].as_u64().unwrap() as usize] ^= 0x5a;
    std::fs::write(&f, data).unwrap();
    let (rc, doc, _) = json_run(p, &["list", "--verify", "b"]);
    assert_eq!(rc, 7);
    let verdict: Vec<bool> = doc["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["verified"] == true)
        .collect();
    assert_eq!(verdict, vec![true, true, false, false, false], "{doc}");
}

#[test]
fn the_backing_file_of_a_backup_with_an_unreadable_manifest_is_kept() {
    let d = tempdir();
    let p = d.path();
    setup_prune(p);
    // a-03's manifest is unreadable: prune leaves a-03 alone, and keeps
    // a-02, which a-03's qcow2 header names as its backing file.
    let m = p.join("b/a-03.qcow2.manifest");
    let mut data = std::fs::read(&m).unwrap();
    data[..8].copy_from_slice(b"XXXXXXXX");
    std::fs::write(&m, data).unwrap();
    let o = at(
        p,
        &night(4),
        &["prune", "b", "--keep-last", "1", "--dry-run"],
    );
    let plan = stdout(&o);
    assert!(
        plan.lines().any(|l| l.starts_with("consolidate")
            && l.contains("a-02")
            && l.contains("whose manifest cannot be read")),
        "{plan}"
    );
    assert!(
        plan.lines()
            .any(|l| l.starts_with("remove") && l.contains("a-01")),
        "{plan}"
    );
    assert!(
        plan.lines()
            .any(|l| l.starts_with("left") && l.contains("a-03")),
        "{plan}"
    );
    let o = run_in(p, &["prune", "-q", "b", "--keep-last", "1"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!p.join("b/a-01.qcow2").exists());
    // The chain a-04 -> a-03 -> a-02 still reads as the image of night 4.
    for (n, f) in [
        (2, "b/a-02.qcow2"),
        (3, "b/a-03.qcow2"),
        (4, "b/a-04.qcow2"),
    ] {
        assert!(
            identical_fmt(p, f, "qcow2", &format!("ref-a-{n:02}.raw"), "raw"),
            "{f}"
        );
        check_clean(p, f);
    }
}
