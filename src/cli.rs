//! Command-line definitions only (clap derive). Every flag of the original
//! scripts is spelled in kebab-case and also accepted in the original's
//! snake_case (`--in-datadir` / `--in_datadir`), so the original shell scripts
//! port by changing only the program name. Shared flag groups are flattened
//! structs, never copies.
use clap::{Args, Parser, Subcommand};

use crate::device::DeviceSpec;

/// mos: out-of-distribution detection for large semantic spaces (MOS, Huang & Li, CVPR 2021).
#[derive(Debug, Parser)]
#[command(name = "mos", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the versions, library directory and devices mos runs on.
    Env(EnvArgs),
}

/// Where tensors live: `--device auto|cpu|cuda|cuda:N`.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Compute device: auto (CUDA device 0 if available, else CPU), cpu, cuda, or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, Args)]
pub struct EnvArgs {
    /// Print the report as one JSON object instead of aligned lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}
