//! The `mos` command-line tool: parse, dispatch, print the error chain once.
use clap::Parser;

fn main() {
    let cli = mos::cli::Cli::parse();
    if let Err(e) = mos::commands::run(cli) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
