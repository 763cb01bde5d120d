//! One module per subcommand; `run` dispatches.
pub mod env;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Env(args) => env::run(&args),
    }
}
