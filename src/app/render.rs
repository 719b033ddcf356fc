//! The human lines of a backup's summary and of a dry run: printed by
//! `backup`, and sent back over a served image's control socket.

use crate::job::backup::{DryRun, Summary};
use crate::report::{human_bytes, human_duration};

/// The warning of a backup an ignore policy left incomplete.
pub fn skipped_warning(summary: &Summary) -> String {
    format!(
        "imgbackup: warning: the backup is incomplete: {} range(s) were skipped by an ignore policy (they stay to be copied): {}",
        summary.ignored_ranges.len(),
        summary
            .ignored_ranges
            .iter()
            .map(|r| format!("{}-{}", r[0], r[1]))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// What a dry run says, line by line.
pub fn dry_run_lines(s: &Summary, d: &DryRun) -> Vec<String> {
    let mut out = Vec::new();
    let backing = s
        .backing
        .as_ref()
        .map(|b| format!(", backed by {b}"))
        .unwrap_or_default();
    match s.sync.copies_in_background() {
        false => out.push(format!(
            "imgbackup: dry run: {} backup of {} into {}{backing} would copy only the clusters the guest overwrites. Nothing was written.",
            s.sync.article(),
            s.source,
            s.target
        )),
        true => out.push(format!(
            "imgbackup: dry run: {} backup of {} into {} ({}{backing}) would examine {} clusters of {}: {} hold data ({} to read and write), the rest read as zeros ({}, not written as data){}. Nothing was written.",
            s.sync.article(),
            s.source,
            s.target,
            s.target_format,
            d.clusters,
            human_bytes(s.cluster_size),
            d.data_clusters,
            human_bytes(d.data),
            human_bytes(d.zero),
            if s.bytes_clean > 0 {
                format!("; {} are clean and not copied", human_bytes(s.bytes_clean))
            } else {
                String::new()
            }
        )),
    }
    out
}

/// The summary of a finished backup, line by line (stderr).
pub fn human_lines(s: &Summary) -> Vec<String> {
    let mut out = Vec::new();
    out.push(format!(
        "imgbackup: backup {} -> {} ({}, sync {}) {}{}",
        s.source,
        s.target,
        s.target_format,
        s.sync,
        if s.ignored_ranges.is_empty() {
            "complete"
        } else {
            "finished with skipped ranges"
        },
        if s.verified { ", verified" } else { "" }
    ));
    out.push(format!(
        "  target:            {} ({} on disk)",
        s.target,
        human_bytes(s.target_disk_usage)
    ));
    out.push(format!(
        "  copied:            {}",
        human_bytes(s.bytes_copied)
    ));
    if s.retries > 0 {
        out.push(format!("  retries:           {}", s.retries));
    }
    if !s.ignored_ranges.is_empty() {
        out.push(format!(
            "  skipped:           {} (ignored errors)",
            s.ignored_ranges
                .iter()
                .map(|r| format!("{}-{}", r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out.push(format!(
        "  zero:              {} (not written as data)",
        human_bytes(s.bytes_skipped_zero)
    ));
    if s.bytes_clean > 0 {
        out.push(format!(
            "  clean:             {} (not copied: {})",
            human_bytes(s.bytes_clean),
            s.sync.clean_means()
        ));
    }
    guest_lines(s, &mut out);
    if let Some(r) = &s.manifest_root_digest {
        out.push(format!("  manifest root:     {r}"));
    }
    if let Some(b) = &s.backing {
        out.push(format!("  backing file:      {b}"));
    }
    if let Some(b) = &s.bitmap {
        out.push(format!(
            "  bitmap:            {} ({}): {} dirty{}",
            b.name,
            b.mode,
            human_bytes(b.dirty_bytes),
            b.anchored_backup
                .as_ref()
                .map(|a| format!(", anchored to {a}"))
                .unwrap_or_default()
        ));
    }
    out.push(format!("  started:           {}", s.started));
    if !s.point_in_time.is_empty() {
        out.push(format!("  point in time:     {}", s.point_in_time));
    }
    out.push(format!("  finished:          {}", s.finished));
    out.push(format!(
        "  elapsed:           {} ({}/s)",
        human_duration(s.elapsed_seconds),
        human_bytes(s.throughput_bytes_per_second as u64)
    ));
    out
}

fn guest_lines(s: &Summary, out: &mut Vec<String>) {
    for (label, g) in [("guest:  ", &s.guest), ("clients:", &s.clients)] {
        let Some(g) = g else { continue };
        out.push(format!(
            "  copy-before-write: {} copies, {} (cache peak {})",
            s.copy_before_write_copies,
            human_bytes(s.copy_before_write_bytes),
            human_bytes(s.cbw_cache_peak_bytes)
        ));
        out.push(format!(
            "  {label}           {} writes ({} zero), {}, {} failed; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            g.writes,
            g.zero_writes,
            human_bytes(g.bytes),
            g.failed_writes,
            g.latency_ms.p50,
            g.latency_ms.p99,
            g.latency_ms.max
        ));
    }
    if let Some(o) = &s.guest_overlay {
        out.push(format!("  guest overlay:     {o}"));
    }
}
