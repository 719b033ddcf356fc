//! `-v`, `-vv`, `-vvv` and IMGBACKUP_LOG: what a person sees on stderr to
//! understand a slow job or a skipped cluster, while stdout stays one JSON
//! document.

use crate::fixture::*;

#[test]
fn debug_lines_go_to_stderr_and_json_stays_clean() {
    let d = tempdir();
    let p = d.path();
    make_raw(p, "src.raw", "4M");
    let o = bin()
        .current_dir(p)
        .args([
            "-vv",
            "--json",
            "backup",
            "--jobs",
            "1",
            "--on-target-error",
            "retry",
            "--retry-delay",
            "1ms",
            "--inject",
            "target:write:EIO@nth=2,once",
            "src.raw",
            "t.qcow2",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let doc: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    assert_eq!(doc["ok"], true);
    let err = stderr(&o);
    for want in [
        "debug: [backup] graph: source chain [src.raw (raw)]",
        "-> fault -> target t.qcow2.partial (qcow2)",
        "phase copy took",
        "phase manifest took",
        "debug: [job] policy:",
        "decision: RetryAfter",
    ] {
        assert!(err.contains(want), "no '{want}' in:\n{err}");
    }
    assert!(!err.contains("trace:"), "-vv shows no trace lines");
    // -vvv: every request of the copy engine, and why a range is skipped.
    let o = run_in(p, &["-vvv", "backup", "--force", "src.raw", "t.qcow2"]);
    let err = stderr(&o);
    assert!(err.contains("trace: [copy] claim 0.."), "{err}");
    assert!(
        err.contains("not read, not written") || err.contains("read as zeros"),
        "{err}"
    );
    // IMGBACKUP_LOG filters: only the copy engine's trace.
    let o = bin()
        .current_dir(p)
        .env("IMGBACKUP_LOG", "imgbackup::copy=trace")
        .args(["backup", "--force", "src.raw", "t.qcow2"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(
        err.contains("trace: [copy]") && !err.contains("debug: [backup]"),
        "{err}"
    );
    // -q: nothing but errors.
    let o = run_in(p, &["-q", "backup", "--force", "src.raw", "t.qcow2"]);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}
