//! One module per subcommand; `run` dispatches.
pub mod convert;
pub mod env;
pub mod forward;
pub mod inspect;

use crate::cli::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Env(args) => env::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Forward(args) => forward::run(&args),
    }
}
