//! Progress display and summaries. The core keeps plain counters; this
//! module renders them: an indicatif bar, a plain line every few seconds, or
//! nothing.

use crate::cli::ProgressMode;

/// `println!` that never panics: a closed stdout (`imgbackup ... | head`)
/// loses the text, not the job.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `eprintln!` that never panics: a closed stderr loses the text, not the
/// job.
#[macro_export]
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default interval between plain progress lines; the environment variable
/// `IMGBACKUP_PROGRESS_INTERVAL` (a duration such as `30s`) overrides it.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

fn plain_interval() -> Duration {
    std::env::var("IMGBACKUP_PROGRESS_INTERVAL")
        .ok()
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(PLAIN_INTERVAL)
}

/// Reads (done, total) from the core.
pub type Counter = Arc<dyn Fn() -> (u64, u64) + Send + Sync>;

/// A running progress display.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Reporter {
    /// Start showing progress of `what` (e.g. "backup").
    pub fn start(mode: ProgressMode, quiet: bool, what: &str, counter: Counter) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let mode = match mode {
            _ if quiet => ProgressMode::None,
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::None,
            m => m,
        };
        let handle = match mode {
            ProgressMode::None | ProgressMode::Auto => None,
            ProgressMode::Bar => {
                let stop = stop.clone();
                let what = what.to_string();
                Some(std::thread::spawn(move || run_bar(&what, &counter, &stop)))
            }
            ProgressMode::Plain => {
                let stop = stop.clone();
                let what = what.to_string();
                Some(std::thread::spawn(move || {
                    run_plain(&what, &counter, &stop)
                }))
            }
        };
        Reporter { stop, handle }
    }

    /// Stop the display (the bar is cleared).
    pub fn finish(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn run_bar(what: &str, counter: &Counter, stop: &AtomicBool) {
    let (_, total) = counter();
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(10));
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    while !stop.load(Ordering::Relaxed) {
        let (done, total) = counter();
        bar.set_length(total);
        bar.set_position(done);
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

fn run_plain(what: &str, counter: &Counter, stop: &AtomicBool) {
    let start = Instant::now();
    let interval = plain_interval();
    let mut next = start + interval;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            let (done, total) = counter();
            let secs = start.elapsed().as_secs_f64();
            let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            let pct = if total > 0 {
                done as f64 * 100.0 / total as f64
            } else {
                100.0
            };
            let eta = if rate > 0.0 && total > done {
                format!(", ETA {}", human_duration((total - done) as f64 / rate))
            } else {
                String::new()
            };
            crate::errln!(
                "imgbackup: {what} {pct:.0}% ({} of {}) {}/s{eta}",
                human_bytes(done),
                human_bytes(total),
                human_bytes(rate as u64)
            );
            next += interval;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `2.3s`, `4m 10s`.
pub fn human_duration(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{}m {}s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!(
            "{}h {}m",
            (secs / 3600.0) as u64,
            ((secs % 3600.0) / 60.0) as u64
        )
    }
}

/// Print one JSON document on stdout. A reader that went away does not
/// change the outcome of the command (the exit code still tells it).
pub fn print_json<T: serde::Serialize>(doc: &T) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(doc)?;
    crate::outln!("{s}");
    Ok(())
}
