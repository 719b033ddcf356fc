//! Messages on stderr, through the `tracing` facade: errors always,
//! warnings unless `-q`, what happens with `-v`, debug details with `-vv`
//! (the graph, phase timings, policy decisions, lock waits), and every
//! request of the copy engine with `-vvv`. `IMGBACKUP_LOG` (or `RUST_LOG`)
//! replaces the level with a filter, e.g. `IMGBACKUP_LOG=imgbackup::copy=trace`.
//! Nothing goes to stdout, which belongs to `--json`.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// `imgbackup: warning: ...`, `imgbackup: debug: [copy] ...`.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let module = meta.target().rsplit("::").next().unwrap_or("");
        match *meta.level() {
            Level::ERROR => write!(w, "imgbackup: error: ")?,
            Level::WARN => write!(w, "imgbackup: warning: ")?,
            Level::INFO => write!(w, "imgbackup: ")?,
            Level::DEBUG => write!(w, "imgbackup: debug: [{module}] ")?,
            Level::TRACE => write!(w, "imgbackup: trace: [{module}] ")?,
        }
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Start logging for `-q` (`quiet`) and `-v` repeated `verbose` times.
/// Only the first call in a process takes effect.
pub fn init(quiet: bool, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "imgbackup=debug,info",
        (false, _) => "imgbackup=trace,info",
    };
    let filter = ["IMGBACKUP_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr loses the messages, never the job (tracing's own
        // report of a failed write would panic on that closed stderr).
        .log_internal_errors(false)
        .event_format(Plain)
        .try_init();
}
