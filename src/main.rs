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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
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
            exit
        }
    };
    std::process::exit(if code == Exit::Success {
        0
    } else {
        code.code()
    });
}
