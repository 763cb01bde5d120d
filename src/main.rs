//! The `mos` command-line tool: parse, dispatch, print the error chain once.
use clap::Parser;

fn main() {
    // Die quietly on a closed pipe (`mos inspect F | head`) like other Unix tools,
    // instead of panicking in println!.
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    mos::runtime::tune_malloc();
    let cli = mos::cli::Cli::parse();
    if let Err(e) = mos::commands::run(cli) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
