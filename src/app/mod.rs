//! One module per command: build the graph, run, report. This layer owns
//! `--json`, `--quiet` and the progress display.

pub mod backup;
pub mod bitmap;
pub mod control;
pub mod guest;
pub mod info;
pub mod marked;
pub mod render;
pub mod restore;
pub mod serve;
pub mod sets;
pub mod verify;

use crate::cli::{Cli, Command};
use crate::exit::Exit;

/// Run a parsed command line; the error (if any) is printed by `main`.
pub fn run(cli: &Cli) -> anyhow::Result<Exit> {
    let g = &cli.global;
    crate::logging::init(g.quiet, g.verbose);
    match &cli.command {
        Command::Backup(a) => backup::run(a, g),
        Command::Verify(a) => verify::run(a, g),
        Command::Restore(a) => restore::run(a, g),
        Command::Info(a) => info::run(a, g),
        Command::Bitmap(c) => bitmap::run(c, g),
        Command::Guest(a) => guest::run(a, g),
        Command::Serve(a) => serve::run(a, g),
        Command::List(a) => sets::list(a, g),
        Command::Prune(a) => sets::prune(a, g),
        Command::Consolidate(a) => sets::consolidate(a, g),
        Command::GenerateDocs { dir } => {
            for p in crate::cli::docs::write_all(dir)? {
                if !g.quiet {
                    crate::errln!("wrote {}", dir.join(p).display());
                }
            }
            Ok(Exit::Success)
        }
    }
}

/// A cancellation token that SIGINT, SIGTERM and SIGHUP cancel.
pub fn cancel_on_signals() -> Result<crate::job::cancel::Cancel, crate::job::JobError> {
    let cancel = crate::job::cancel::Cancel::new();
    crate::signals::install(&cancel).map_err(crate::job::JobError::context(
        "cannot install the SIGINT/SIGTERM/SIGHUP handlers",
    ))?;
    Ok(cancel)
}

/// The default number of workers.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A JSON document describing a failure, for `--json`.
#[derive(serde::Serialize)]
pub struct ErrorDoc {
    /// Always false.
    pub ok: bool,
    /// The exit code.
    pub exit_code: i32,
    /// The outermost error.
    pub error: String,
    /// The error and its causes, outermost first.
    pub causes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// What to do next.
    pub hint: Option<String>,
}
