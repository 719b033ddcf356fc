//! The `imgbackup` command: parse the command line, run, print the error
//! chain once, and exit with the code of SPEC §5.

use clap::Parser;
use imgbackup::app::{self, ErrorDoc};
use imgbackup::cli::Cli;
use imgbackup::exit::{Exit, classify, hint};

fn main() {
    // A file-size limit (`ulimit -f`, systemd's LimitFSIZE) must fail the
    // write with EFBIG (a target write error, exit 5), not kill the process.
    // SAFETY: setting a signal's disposition to SIG_IGN at start-up, before
    // any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Shell completion requests (COMPLETE=bash imgbackup ...) end here.
    imgbackup::cli::complete::run_if_requested();
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let json = raw.iter().any(|a| a == "--json");
    let quiet = raw.iter().any(|a| a == "-q" || a == "--quiet");
    let (args, deprecated) = imgbackup::cli::deprecated::rewrite(raw);
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => usage_error(e, json),
    };
    if !quiet {
        for note in &deprecated {
            imgbackup::errln!("imgbackup: warning: {note}");
        }
    }
    let code = match app::run(&cli) {
        Ok(exit) => exit,
        Err(err) => {
            let exit = classify(&err);
            let causes: Vec<String> = err.chain().map(|c| c.to_string()).collect();
            let hint = hint(&err);
            imgbackup::errln!("imgbackup: error: {}", causes.join(": "));
            if let Some(h) = &hint {
                imgbackup::errln!("imgbackup: hint: {h}");
            }
            if cli.global.json {
                print_error_doc(exit, causes, hint);
            }
            exit
        }
    };
    std::process::exit(if code == Exit::Success {
        0
    } else {
        code.code()
    });
}

/// A command line clap refused: its message on stderr (help and version on
/// stdout), and with `--json` the error document on stdout too.
fn usage_error(e: clap::Error, json: bool) -> ! {
    use clap::error::ErrorKind;
    if !json
        || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        e.exit()
    }
    let text = e.render().to_string();
    imgbackup::errln!("{}", text.trim_end());
    let first = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    print_error_doc(
        Exit::Usage,
        vec![first],
        Some("see `imgbackup --help`".into()),
    );
    std::process::exit(Exit::Usage.code())
}

fn print_error_doc(exit: Exit, causes: Vec<String>, hint: Option<String>) {
    let doc = ErrorDoc {
        ok: false,
        exit_code: exit.code(),
        error: causes.first().cloned().unwrap_or_default(),
        causes,
        hint,
    };
    if let Ok(s) = serde_json::to_string_pretty(&doc) {
        imgbackup::outln!("{s}");
    }
}
