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

/// stderr as indicatif's terminal, whether or not it is one: `--progress
/// bar` draws the bar into a log file or a pipe too (redrawn in place with
/// carriage returns), where `auto` would show nothing.
#[derive(Debug)]
struct StderrBar;

impl indicatif::TermLike for StderrBar {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.write_str(&format!("\x1b[{n}A"))
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.write_str(&format!("\x1b[{n}B"))
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.write_str(&format!("\x1b[{n}C"))
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.write_str(&format!("\x1b[{n}D"))
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        use std::io::Write;
        // A closed stderr loses the bar, not the job.
        let _ = std::io::stderr().lock().write_all(s.as_bytes());
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.write_str("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        use std::io::Write;
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn run_bar(what: &str, counter: &Counter, stop: &AtomicBool) {
    let (_, total) = counter();
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr_with_hz(10)
    } else {
        ProgressDrawTarget::term_like_with_hz(Box::new(StderrBar), 2)
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
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

/// `1.50 GiB`-style sizes (indicatif's binary units).
pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// `52ms` under a second, `4 minutes`-style above (indicatif's
/// HumanDuration).
pub fn human_duration(secs: f64) -> String {
    let d = Duration::from_secs_f64(secs.max(0.0));
    if d < Duration::from_secs(1) {
        format!("{d:.0?}")
    } else {
        indicatif::HumanDuration(d).to_string()
    }
}

/// Print one JSON document on stdout. A reader that went away does not
/// change the outcome of the command (the exit code still tells it).
pub fn print_json<T: serde::Serialize>(doc: &T) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(doc)?;
    crate::outln!("{s}");
    Ok(())
}
