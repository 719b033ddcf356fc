use clap::Parser;
use imgbackup::app::{self, ErrorDoc};
use imgbackup::cli::Cli;
use imgbackup::exit::{Exit, classify, hint};

fn main() {
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
            eprintln!("imgbackup: error: {}", causes.join(": "));
            if let Some(h) = &hint {
                eprintln!("imgbackup: hint: {h}");
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
                    println!("{s}");
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
