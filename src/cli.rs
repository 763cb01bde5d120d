//! Command-line definitions only (clap derive). Every flag of the original
//! scripts is spelled in kebab-case and also accepted in the original's
//! snake_case (`--in-datadir` / `--in_datadir`), so the original shell scripts
//! port by changing only the program name. Shared flag groups are flattened
//! structs, never copies.
use clap::{Args, Parser, Subcommand};

use std::path::PathBuf;

use crate::device::DeviceSpec;
use crate::model::{Precision, Variant};

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
    /// Convert a BiT .npz, a paper .pth.tar or a safetensors file into our checkpoint.
    Convert(ConvertArgs),
    /// List the tensors (name, shape, dtype) and metadata of a weight file.
    Inspect(InspectArgs),
    /// Run the backbone on a tensor file; write logits (and features) as safetensors.
    Forward(ForwardArgs),
}

/// `--model`: the architecture.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Architecture: BiT-{S,M}-R50x1, -R50x3, -R101x1, -R101x3, -R152x2, -R152x4, or the
    /// small ResNetV2-R14x0.5, ResNetV2-R26x0.5, ResNetV2-R50x0.5.
    #[arg(long, default_value = "BiT-S-R101x1", value_name = "NAME")]
    pub model: Variant,
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

#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// Weight file to read: Google BiT .npz, the paper code's .pth.tar, or safetensors.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Our checkpoint to write (.safetensors), atomically.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Architecture; inferred from the tensors when omitted (BiT-S and BiT-M share
    /// architectures: the input's file name decides, else this flag is required).
    #[arg(long, value_name = "NAME")]
    pub model: Option<Variant>,
}

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// Weight file: BiT .npz, paper .pth.tar, or safetensors.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Weights: BiT .npz, paper .pth.tar, or our checkpoint.
    #[arg(long, alias = "model_path", value_name = "FILE")]
    pub model_path: PathBuf,
    /// safetensors file holding the input batch [N, 3, H, W], normalized to [-1, 1]
    /// (e.g. written by `mos data-check --dump`).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Name of the input tensor in --input.
    #[arg(long, default_value = "images", value_name = "NAME")]
    pub input_key: String,
    /// Output safetensors: `logits` [N, head], and with --features `features.{0..4}`
    /// (spatial means of root and block1..4, [N, C]).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Also write the 5 intermediate features.
    #[arg(long)]
    pub features: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub batch: i64,
    /// Inference precision on CUDA: fp32 (reproduces the paper), tf32, or bf16.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Benchmark: after the output is written, time this many further passes over
    /// the input (logits only) and print images/s; the first pass is the warm-up.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub repeat: usize,
    /// Store activations channels-last (NHWC) during the forward pass.
    #[arg(long)]
    pub channels_last: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}
