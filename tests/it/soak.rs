//! Soak: `--guest` × every error policy × injected faults (source and
//! target, with and without the copy-before-write cache, both
//! `--on-cbw-error` modes) over many seeds. Every run must end within a
//! bound (no deadlock) with an exit code that tells the truth: 0 and a
//! backup equal to the source as it was, 3 and the skipped ranges listed,
//! or 4/5 and no TARGET.

use crate::fixture::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Seeds per combination; `IMGBACKUP_SOAK_SEEDS` runs more (a longer soak).
fn seeds() -> u64 {
    std::env::var("IMGBACKUP_SOAK_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

#[test]
fn guest_with_every_policy_and_fault_terminates_and_tells_the_truth() {
    let d = tempdir();
    let p = d.path();
    data_disk(p, "disk.raw", 8);
    let disk = std::fs::read(p.join("disk.raw")).unwrap();
    let bound = Duration::from_secs(60);
    let mut runs = 0;
    let mut codes = std::collections::BTreeMap::new();
    for policy in ["report", "ignore", "retry", "enospc"] {
        for side in ["source", "target"] {
            for cache in ["0", "1M"] {
                for cbw in ["break-guest-write", "break-snapshot"] {
                    for seed in 0..seeds() {
                        let (op, flag) = if side == "source" {
                            ("read", "--on-source-error")
                        } else {
                            ("write", "--on-target-error")
                        };
                        let errno = if seed % 2 == 0 { "EIO" } else { "ENOSPC" };
                        let rule = format!("{side}:{op}:{errno},prob=0.15,seed={seed}");
                        let guest = format!("iops=0,count=300,bs=4K-128K,threads=2,seed={seed}");
                        let tgt = format!("t-{policy}-{side}-{cache}-{cbw}-{seed}.raw");
                        let t0 = Instant::now();
                        let mut child = bin()
                            .current_dir(p)
                            .args([
                                "--json",
                                "backup",
                                "--guest",
                                &guest,
                                flag,
                                policy,
                                "--retries",
                                "2",
                                "--retry-delay",
                                "1ms",
                                "--inject",
                                &rule,
                                "--cbw-cache",
                                cache,
                                "--on-cbw-error",
                                cbw,
                                "--jobs",
                                "2",
                                "--max-chunk",
                                "256K",
                                "disk.raw",
                                &tgt,
                            ])
                            .stdout(Stdio::piped())
                            .stderr(Stdio::piped())
                            .spawn()
                            .unwrap();
                        let status = loop {
                            if let Some(s) = child.try_wait().unwrap() {
                                break s;
                            }
                            if t0.elapsed() > bound {
                                // Where every thread is, for whoever reads
                                // the failure (gdb, when installed).
                                let stacks = std::process::Command::new("gdb")
                                    .args(["-p", &child.id().to_string(), "-batch"])
                                    .args(["-ex", "thread apply all bt 30"])
                                    .output()
                                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                                    .unwrap_or_default();
                                child.kill().ok();
                                panic!("{tgt}: no end after {bound:?} (deadlock)\n{stacks}");
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        };
                        let o = child.wait_with_output().unwrap();
                        let rc = status.code().unwrap_or(-1);
                        let doc: serde_json::Value =
                            serde_json::from_slice(&o.stdout).unwrap_or_default();
                        *codes.entry(rc).or_insert(0) += 1;
                        runs += 1;
                        let target = p.join(&tgt);
                        match rc {
                            0 => {
                                // The point-in-time image: the source file
                                // itself (the guest writes an overlay).
                                assert_eq!(
                                    std::fs::read(&target).unwrap(),
                                    disk,
                                    "{tgt}: exit 0 but the backup is not the source"
                                );
                            }
                            3 => {
                                assert!(target.exists(), "{tgt}: exit 3 without a target");
                                assert!(
                                    !doc["ignored_ranges"].as_array().unwrap().is_empty(),
                                    "{tgt}: exit 3 lists no skipped range"
                                );
                                assert_eq!(policy, "ignore", "{tgt}: exit 3 without ignore");
                            }
                            4 | 5 => assert!(
                                !target.exists() && !p.join(format!("{tgt}.partial")).exists(),
                                "{tgt}: exit {rc} left a target"
                            ),
                            _ => panic!("{tgt}: exit {rc}: {}", String::from_utf8_lossy(&o.stderr)),
                        }
                        assert!(!stderr(&o).contains("panicked"), "{tgt}: {}", stderr(&o));
                        let _ = std::fs::remove_file(&target);
                        let _ = std::fs::remove_file(p.join(format!("{tgt}.manifest")));
                    }
                }
            }
        }
    }
    eprintln!("soak: {runs} runs, exit codes {codes:?}");
    assert!(
        codes.len() >= 3,
        "the faults did not exercise the policies: {codes:?}"
    );
}
