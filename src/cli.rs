//! Command-line definitions only (clap derive). Every flag of the original
//! scripts is spelled in kebab-case and also accepted in the original's
//! snake_case (`--in-datadir` / `--in_datadir`), so the original shell scripts
//! port by changing only the program name. Shared flag groups are flattened
//! structs, never copies.
use clap::{Args, Parser, Subcommand};

use std::path::PathBuf;

use crate::device::DeviceSpec;
use crate::model::{Precision, Variant};
use crate::ood::Score;

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
    /// Fine-tune with a group softmax: one softmax per group plus "others" (finetune.py).
    FinetuneGroup(FinetuneArgs),
    /// Fine-tune with a flat softmax over all classes (finetune.py, flat_softmax).
    FinetuneFlat(FinetuneArgs),
    /// Tune the Mahalanobis detector (tune_mahalanobis_hyperparameter.py).
    TuneMahalanobis(TuneMahalanobisArgs),
    /// OOD detection with the MOS score of a group-softmax model (test_mos.py).
    TestMos(TestMosArgs),
    /// OOD detection with baseline scores of a flat-softmax model (test_baselines.py).
    TestBaseline(TestBaselineArgs),
    /// Check a data set: images per class, unreadable files, loader throughput; dump tensors.
    DataCheck(DataCheckArgs),
    /// Materialise the Fashion-MNIST / MNIST demo data (ImageFolder trees and list files).
    DemoData(DemoDataArgs),
    /// Benchmark training steps (forward, backward, SGD) on random data in memory.
    BenchTrain(BenchTrainArgs),
    /// Metrics of a saved score file (--save-scores), as JSON on stdout.
    Metrics(MetricsArgs),
    /// The paper's table (methods x OOD sets, AUROC / FPR95 in %) from results.json files.
    Report(ReportArgs),
    /// Forward a data set once and keep logits/features in a feature store (one shard of an array job).
    Extract(ExtractArgs),
    /// Check that every shard of a feature store is there and consistent; mark it complete.
    Merge(MergeArgs),
    /// Start N local ranks of finetune-group/finetune-flat (data-parallel, c10d) or N
    /// shards of extract (then merge); all stop when one fails.
    Launch(crate::commands::launch::LaunchArgs),
    /// OOD scores, metrics, table and plots from feature stores (no images, no model).
    Score(ScoreArgs),
    /// Group a label space (WordNet taxonomy, feature k-means, random); write group lists.
    MakeGroups(crate::commands::make_groups::MakeGroupsArgs),
    /// A whole table (methods x OOD sets) in one run: each model and set extracted once,
    /// checked against published numbers.
    Benchmark(BenchmarkArgs),
}

/// Arguments of `mos benchmark` (docs/benchmark.md). Every flag can also be given in
/// the `--config` JSON file, keyed by its long name in snake_case; the command line
/// overrides the file. Defaults are applied after both.
#[derive(Debug, Clone, Args)]
pub struct BenchmarkArgs {
    /// A JSON config: {"in_datadir": ..., "out_datadir": [...], "score": [...], ...}; a
    /// set may be {"path": DIR, "images": N} to check its image count.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// In-distribution images (ImageFolder layout).
    #[arg(long, alias = "in_datadir", value_name = "DIR")]
    pub in_datadir: Option<PathBuf>,
    /// Out-of-distribution images (ImageFolder layout); repeat the flag for each set.
    #[arg(long, alias = "out_datadir", value_name = "DIR")]
    pub out_datadir: Vec<PathBuf>,
    /// The number of images a set must hold, as SET=N (SET: the folder's base name);
    /// repeat the flag. Checked before anything is computed.
    #[arg(long, alias = "expect_images", value_name = "SET=N")]
    pub expect_images: Vec<String>,
    /// Architecture of both models [default: BiT-S-R101x1].
    #[arg(long, value_name = "NAME")]
    pub model: Option<Variant>,
    /// The group-softmax checkpoint (for MOS).
    #[arg(long, alias = "group_model_path", value_name = "FILE")]
    pub group_model_path: Option<PathBuf>,
    /// Classes per group (.npy or .json), for MOS.
    #[arg(long, alias = "group_config", value_name = "FILE")]
    pub group_config: Option<PathBuf>,
    /// The flat-softmax checkpoint (every method but MOS).
    #[arg(long, alias = "flat_model_path", value_name = "FILE")]
    pub flat_model_path: Option<PathBuf>,
    /// Tuned Mahalanobis parameters (tune-mahalanobis), for Mahalanobis.
    #[arg(long, alias = "mahalanobis_param_path", value_name = "PATH")]
    pub mahalanobis_param_path: Option<PathBuf>,
    /// Methods, comma-separated: MOS, MSP, ODIN, Energy, KL_Div, Mahalanobis, and the
    /// post-hoc MaxLogit, GradNorm, ReAct, KNN, ViM, ASH-P, ASH-B, ASH-S, DICE (flat model).
    #[arg(long, value_delimiter = ',', value_name = "METHODS")]
    pub score: Vec<String>,
    /// ODIN temperature [default: 1000].
    #[arg(long, alias = "temperature_odin", value_name = "T")]
    pub temperature_odin: Option<f64>,
    /// ODIN input perturbation; > 0 perturbs the images, sharing the flat model's extraction pass [default: 0].
    #[arg(long, alias = "epsilon_odin", value_name = "EPS")]
    pub epsilon_odin: Option<f64>,
    /// Energy temperature [default: 1].
    #[arg(long, alias = "temperature_energy", value_name = "T")]
    pub temperature_energy: Option<f64>,
    /// A store of in-distribution training images extracted with the flat model
    /// (mos extract --layers logits,features), for ReAct, KNN, ViM and DICE; what is
    /// fitted is saved in the run directory (fit.safetensors) and reused.
    #[arg(long, value_name = "STORE")]
    pub fit: Option<PathBuf>,
    /// ReAct: clip at this percentile of the training activations [default: 90].
    #[arg(long, alias = "react_percentile", value_name = "P")]
    pub react_percentile: Option<f64>,
    /// KNN: the k-th nearest training feature [default: 1000, the original's ImageNet k].
    #[arg(long, alias = "knn_k", value_name = "K")]
    pub knn_k: Option<i64>,
    /// ViM: principal dimension [default: 1000 for D >= 2048, 512 for D >= 768, else D/2].
    #[arg(long, alias = "vim_dim", value_name = "DIM")]
    pub vim_dim: Option<i64>,
    /// ASH-P/B/S: prune this percentile of each image's activations [default: 90].
    #[arg(long, alias = "ash_percentile", value_name = "P")]
    pub ash_percentile: Option<f64>,
    /// DICE: keep the head's weights whose contribution is above this percentile [default: 70].
    #[arg(long, alias = "dice_percentile", value_name = "P")]
    pub dice_percentile: Option<f64>,
    /// Published numbers to compare with (JSON, a tolerance per cell); the exit status
    /// is 1 when a cell is outside its tolerance.
    #[arg(long, value_name = "FILE")]
    pub published: Option<PathBuf>,
    /// Directory of runs; this run writes into <logdir>/<name>/.
    #[arg(long, value_name = "DIR")]
    pub logdir: Option<PathBuf>,
    /// Name of this run.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Image decoding threads [default: 8].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Images per batch [default: 256].
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// Side of the square images the model sees [default: 480].
    #[arg(long, value_name = "PIXELS")]
    pub crop: Option<usize>,
    /// Skip unreadable images (listed in the log, counted in the results).
    #[arg(long, alias = "skip_bad_images")]
    pub skip_bad_images: bool,
    /// Compute device: auto, cpu, cuda, or cuda:N [default: auto].
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,
}

/// Arguments of `mos extract` (docs/cluster.md).
#[derive(Debug, Clone, Args)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The model: the paper's .pth.tar, our checkpoint, or a run directory.
    #[arg(long, alias = "model_path", value_name = "FILE")]
    pub model_path: PathBuf,
    /// Image folder (ImageFolder layout), or the root the --list paths are relative to.
    #[arg(long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// A flat list file (`path label`) instead of the folder's classes.
    #[arg(long, value_name = "FILE")]
    pub list: Option<PathBuf>,
    /// The store (a directory; created if needed, shared by all shards).
    #[arg(long, value_name = "STORE")]
    pub output: PathBuf,
    /// What to keep, comma-separated: logits (always), features (the pre-logits),
    /// mahalanobis (the 5 feature layers' spatial means).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "logits,features",
        value_name = "LAYERS"
    )]
    pub layers: Vec<String>,
    /// Side of the square images the model sees (the paper: 480).
    #[arg(long, value_parser = at_least_one, default_value_t = 480, value_name = "PIXELS")]
    pub crop: usize,
    /// Images per batch (as the test commands' --batch: the same batches give the same bits).
    #[arg(long, value_parser = at_least_one, default_value_t = 256, value_name = "N")]
    pub batch: usize,
    /// Image decoding threads.
    #[arg(long, value_parser = at_least_one, default_value_t = 8, value_name = "N")]
    pub workers: usize,
    /// Inference precision on CUDA: fp32 (reproduces the paper), tf32, or bf16.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Skip unreadable images (listed in the shard's index) instead of stopping.
    #[arg(long, alias = "skip_bad_images")]
    pub skip_bad_images: bool,
    /// Number of shards; default from SLURM_ARRAY_TASK_COUNT, else 1.
    #[arg(long, value_name = "N")]
    pub num_shards: Option<usize>,
    /// This process's shard, 0-based; default from SLURM_ARRAY_TASK_ID -
    /// SLURM_ARRAY_TASK_MIN or JOB_COMPLETION_INDEX.
    #[arg(long, value_name = "K")]
    pub shard_index: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Arguments of `mos merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The store written by mos extract.
    #[arg(value_name = "STORE")]
    pub store: PathBuf,
}

/// Arguments of `mos score`.
#[derive(Debug, Clone, Args)]
pub struct ScoreArgs {
    /// The in-distribution store.
    #[arg(long, value_name = "STORE")]
    pub id: PathBuf,
    /// Out-of-distribution stores (repeat the flag), each scored against --id.
    #[arg(long, required = true, value_name = "STORE")]
    pub ood: Vec<PathBuf>,
    /// Score(s), comma-separated: MOS, MSP, ODIN, Energy, KL_Div, Mahalanobis, and
    /// from stored features MaxLogit, GradNorm, ReAct, KNN, ViM, ASH-P, ASH-B, ASH-S, DICE.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "MSP",
        value_name = "METHODS"
    )]
    pub score: Vec<String>,
    /// Classes per group (.npy or .json), for MOS.
    #[arg(long, alias = "group_config", value_name = "FILE")]
    pub group_config: Option<PathBuf>,
    /// ODIN temperature.
    #[arg(
        long,
        alias = "temperature_odin",
        default_value_t = 1000.0,
        value_name = "T"
    )]
    pub temperature_odin: f64,
    /// ODIN input perturbation: only 0 can be computed from a store.
    #[arg(
        long,
        alias = "epsilon_odin",
        default_value_t = 0.0,
        value_name = "EPS"
    )]
    pub epsilon_odin: f64,
    /// Energy temperature.
    #[arg(
        long,
        alias = "temperature_energy",
        default_value_t = 1.0,
        value_name = "T"
    )]
    pub temperature_energy: f64,
    /// Tuned Mahalanobis parameters with magnitude 0 (needs stores with --layers mahalanobis).
    #[arg(long, alias = "mahalanobis_param_path", value_name = "PATH")]
    pub mahalanobis_param_path: Option<PathBuf>,
    #[command(flatten)]
    pub posthoc: PostHocArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub output: EvalOutputArgs,
}

/// Where fine-tuning starts from (`--init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Init {
    /// Google's BiT weights, `<bit-pretrained-dir>/<model>.npz` (the paper); zero head.
    Bit,
    /// Random weights (training from scratch, e.g. for small data); zero head.
    None,
}

/// A count or a size that must be at least 1 (`--batch`, `--crop`, `--workers`).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Directory of Google's BiT weights, read as <dir>/<model>.npz with --init bit.
    #[arg(
        long,
        alias = "bit_pretrained_dir",
        default_value = "bit_pretrained_models",
        value_name = "DIR"
    )]
    pub bit_pretrained_dir: PathBuf,
    /// Where the weights start: bit (pretrained .npz) or none (random).
    #[arg(long, value_enum, default_value_t = Init::Bit)]
    pub init: Init,
    /// Name of the dataset (recorded in the run's config, as the original's flag).
    #[arg(long, default_value = "imagenet2012", value_name = "NAME")]
    pub dataset: String,
    /// Root that the list files' paths are relative to.
    #[arg(long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// Training list (`path label`, or `path group class` for finetune-group).
    #[arg(long, alias = "train_list", value_name = "FILE")]
    pub train_list: PathBuf,
    /// Validation list, same format. Unreadable images of either list do not stop
    /// the run: each is skipped, named in train.log and counted in metrics.jsonl
    /// (train_skipped per step, val_skipped and val_images per validation).
    #[arg(long, alias = "val_list", value_name = "FILE")]
    pub val_list: PathBuf,
    /// Classes per group (.npy or .json); finetune-group only.
    #[arg(long, alias = "group_config", value_name = "FILE")]
    pub group_config: Option<PathBuf>,
    /// Images per optimizer update.
    #[arg(long, value_parser = at_least_one, default_value_t = 512, value_name = "N")]
    pub batch: usize,
    /// Micro-batches per update (gradients accumulate; memory / batch_split).
    #[arg(long, alias = "batch_split", default_value_t = 1, value_name = "N")]
    pub batch_split: usize,
    /// Peak learning rate of the BiT-HyperRule schedule.
    #[arg(long, alias = "base_lr", default_value_t = 0.003, value_name = "LR")]
    pub base_lr: f64,
    /// Schedule supports s0,s1,...: warm-up to s0, lr / 10 after each later support,
    /// stop at the last. Default: by training-set size (BiT-HyperRule).
    #[arg(long, value_name = "STEPS")]
    pub schedule: Option<String>,
    /// Stop (with a checkpoint) after this step even if the schedule goes on; a rerun
    /// resumes.
    #[arg(long, value_name = "STEP")]
    pub max_steps: Option<u64>,
    /// Validate (and checkpoint) every N steps, besides at the end.
    #[arg(long, alias = "eval_every", value_name = "N")]
    pub eval_every: Option<u64>,
    /// Image decoding threads.
    #[arg(long, value_parser = at_least_one, default_value_t = 8, value_name = "N")]
    pub workers: usize,
    /// Do not write checkpoints.
    #[arg(long, alias = "no_save")]
    pub no_save: bool,
    /// Trainable blocks: -1 all, 0 head only, 1..4 the last k blocks (docs/model.md#freezing).
    #[arg(
        long,
        alias = "num_block_open",
        default_value_t = 0,
        allow_negative_numbers = true,
        value_name = "K"
    )]
    pub num_block_open: i64,
    /// Side of the training crop and of validation images.
    #[arg(long, value_parser = at_least_one, default_value_t = 480, value_name = "PIXELS")]
    pub crop: usize,
    /// Side of the training resize before the random crop.
    #[arg(long, value_parser = at_least_one, default_value_t = 512, value_name = "PIXELS")]
    pub precrop: usize,
    /// Seed of the data order, crops, flips, mixup and random init.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Several processes (docs/distributed.md): a rank whose heartbeat stops for this
    /// many seconds is reported lost and every rank stops.
    #[arg(long, value_parser = positive_number, default_value_t = 30.0, value_name = "SECS")]
    pub dist_timeout: f64,
    /// Several processes: gradients are all-reduced in buckets of this many MiB.
    #[arg(long, value_parser = positive_number, default_value_t = crate::dist::DEFAULT_BUCKET_MB, value_name = "MIB")]
    pub bucket_mb: f64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn positive_number(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a number > 0, got {s:?}")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct TuneMahalanobisArgs {
    /// Root that the list files' paths are relative to.
    #[arg(long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// Training list (`path label`): class means and the tied covariance.
    #[arg(long, alias = "train_list", value_name = "FILE")]
    pub train_list: PathBuf,
    /// Validation list (`path label`): its first 2 x --num-lr-samples images, in file
    /// order, train and validate the logistic regression.
    #[arg(long, alias = "val_list", value_name = "FILE")]
    pub val_list: PathBuf,
    /// Image decoding threads.
    #[arg(long, value_parser = at_least_one, default_value_t = 8, value_name = "N")]
    pub workers: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The flat-softmax model: the paper's .pth.tar, our checkpoint, or a run directory.
    #[arg(long, alias = "model_path", value_name = "FILE")]
    pub model_path: PathBuf,
    #[command(flatten)]
    pub run: RunArgs,
    /// Images per batch.
    #[arg(long, value_parser = at_least_one, default_value_t = 32, value_name = "N")]
    pub batch: usize,
    /// Side of the square images the model sees.
    #[arg(long, value_parser = at_least_one, default_value_t = 480, value_name = "PIXELS")]
    pub crop: usize,
    /// Images of the validation list for each half of the regression data.
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub num_lr_samples: usize,
    /// Noise magnitudes to search, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.0,0.01,0.005,0.002,0.0014,0.001,0.0005",
        value_name = "LIST"
    )]
    pub magnitudes: Vec<f64>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Arguments of `mos demo-data`.
#[derive(Debug, Clone, Args)]
pub struct DemoDataArgs {
    /// Folder of the compact demo files (t10k-*-ubyte.gz, mnist_5k.csv.gz).
    #[arg(long, default_value = "dataset/demo", value_name = "DIR")]
    pub src: PathBuf,
    /// Output folder: fashion/{train,test}/<class>/, mnist/digits/, lists/ (reused if complete).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Training images: the first N of Fashion-MNIST's 10,000 test images.
    #[arg(long, default_value_t = crate::demo::DEFAULT_TRAIN, value_name = "N")]
    pub train: usize,
    /// Validation images: the N after the training images.
    #[arg(long, default_value_t = crate::demo::DEFAULT_VAL, value_name = "N")]
    pub val: usize,
    /// In-distribution test images: the last N of the file.
    #[arg(long, default_value_t = crate::demo::DEFAULT_TEST, value_name = "N")]
    pub test: usize,
    /// OOD images: MNIST digits, equally many of each digit (at most 5,000).
    #[arg(long, default_value_t = crate::demo::DEFAULT_OOD, value_name = "N")]
    pub ood: usize,
}

#[derive(Debug, Clone, Args)]
pub struct DataCheckArgs {
    /// Image folder (ImageFolder layout), or the root the --list paths are relative to.
    #[arg(long, value_name = "DIR")]
    pub datadir: PathBuf,
    /// A list file (`path label`, or `path group class` with --group-config).
    #[arg(long, value_name = "FILE")]
    pub list: Option<PathBuf>,
    /// Read --list as a group list checked against this group config (.npy or .json).
    #[arg(long, alias = "group_config", value_name = "FILE")]
    pub group_config: Option<PathBuf>,
    /// Use the training transform (resize to --precrop, random crop, flip) and order.
    #[arg(long)]
    pub train: bool,
    /// Seed of the training transform and order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the first --limit preprocessed images (`images` [N,3,H,W] f32) and their
    /// labels (`labels` [N] or [N,G] i64), in dataset order, to this safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    pub dump: Option<PathBuf>,
    /// Images to dump.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub limit: usize,
    /// Image decoding threads.
    #[arg(long, value_parser = at_least_one, default_value_t = 8, value_name = "N")]
    pub workers: usize,
    /// Images per batch.
    #[arg(long, value_parser = at_least_one, default_value_t = 64, value_name = "N")]
    pub batch: usize,
    /// Side of the square images (eval resize, train crop).
    #[arg(long, value_parser = at_least_one, default_value_t = 480, value_name = "PIXELS")]
    pub crop: usize,
    /// Side of the training resize before the random crop.
    #[arg(long, value_parser = at_least_one, default_value_t = 512, value_name = "PIXELS")]
    pub precrop: usize,
}

#[derive(Debug, Clone, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per step.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub batch: i64,
    /// Side of the square random images.
    #[arg(long, default_value_t = 224, value_name = "PIXELS")]
    pub size: i64,
    /// Logits of the (flat) head.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub head: i64,
    /// Trainable blocks, as fine-tuning's flag.
    #[arg(
        long,
        default_value_t = 0,
        allow_negative_numbers = true,
        value_name = "K"
    )]
    pub num_block_open: i64,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub steps: usize,
    /// Under `mos launch` (several processes): the all-reduce's bucket size in MiB;
    /// the gradients are all-reduced every step and the all-reduce's time reported.
    #[arg(long, value_parser = positive_number, default_value_t = crate::dist::DEFAULT_BUCKET_MB, value_name = "MIB")]
    pub bucket_mb: f64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// CSV written by --save-scores (split,path,score or one column per method).
    #[arg(long, value_name = "FILE.csv")]
    pub scores: PathBuf,
    /// Score column to use when the file has several.
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// results.json files (or run directories holding one).
    #[arg(required = true, value_name = "RESULTS")]
    pub results: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::report::ReportFormat::Markdown)]
    pub format: crate::report::ReportFormat,
}

/// Where the run's outputs go: `<logdir>/<name>/`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Directory of runs; this run writes into <logdir>/<name>/.
    #[arg(long, value_name = "DIR")]
    pub logdir: PathBuf,
    /// Name of this run.
    #[arg(long, value_name = "NAME")]
    pub name: String,
}

/// The in- and out-of-distribution image folders and how to read them.
#[derive(Debug, Clone, Args)]
pub struct EvalDataArgs {
    /// In-distribution images (ImageFolder layout: one subfolder per class).
    #[arg(long, alias = "in_datadir", value_name = "DIR")]
    pub in_datadir: PathBuf,
    /// Out-of-distribution images (ImageFolder layout). Repeat the flag for several
    /// sets: the in-distribution set is scored once for all of them.
    #[arg(long, alias = "out_datadir", required = true, value_name = "DIR")]
    pub out_datadir: Vec<PathBuf>,
    /// Image decoding threads.
    #[arg(long, value_parser = at_least_one, default_value_t = 8, value_name = "N")]
    pub workers: usize,
    /// Images per batch.
    #[arg(long, value_parser = at_least_one, default_value_t = 256, value_name = "N")]
    pub batch: usize,
    /// Side of the square images the model sees (the paper: 480).
    #[arg(long, value_parser = at_least_one, default_value_t = 480, value_name = "PIXELS")]
    pub crop: usize,
    /// Skip unreadable images (listed in the log, counted in the results) instead of
    /// stopping at the first one.
    #[arg(long, alias = "skip_bad_images")]
    pub skip_bad_images: bool,
}

/// Optional outputs of an evaluation.
#[derive(Debug, Clone, Args)]
pub struct EvalOutputArgs {
    /// Also write every image's score(s) as CSV: split,path,score (one column per method).
    #[arg(long, alias = "save_scores", value_name = "FILE.csv")]
    pub save_scores: Option<PathBuf>,
    /// Also write, per method, the ID-vs-OOD score histogram and the ROC curve (SVG).
    #[arg(long)]
    pub plot: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TestMosArgs {
    #[command(flatten)]
    pub data: EvalDataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The group-softmax model: the paper's .pth.tar or our checkpoint.
    #[arg(long, alias = "model_path", value_name = "FILE")]
    pub model_path: PathBuf,
    /// Classes per group: the original's .npy (1-D int) or a JSON config. The paper's
    /// ImageNet taxonomy is configs/imagenet/taxonomy_level0.npy (the default is the
    /// original's path).
    #[arg(
        long,
        alias = "group_config",
        default_value = "group_config/taxonomy_level0.npy",
        value_name = "FILE"
    )]
    pub group_config: PathBuf,
    #[command(flatten)]
    pub output: EvalOutputArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TestBaselineArgs {
    #[command(flatten)]
    pub data: EvalDataArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The flat-softmax model: the paper's .pth.tar or our checkpoint.
    #[arg(long, alias = "model_path", value_name = "FILE")]
    pub model_path: PathBuf,
    /// Score(s), comma-separated: MSP, ODIN, Energy, Mahalanobis, KL_Div. Methods that
    /// need only logits share one forward pass.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "MSP",
        value_name = "METHODS"
    )]
    pub score: Vec<Score>,
    /// ODIN temperature.
    #[arg(
        long,
        alias = "temperature_odin",
        default_value_t = 1000.0,
        value_name = "T"
    )]
    pub temperature_odin: f64,
    /// ODIN input-perturbation magnitude (0: no perturbation and no backward pass).
    #[arg(
        long,
        alias = "epsilon_odin",
        default_value_t = 0.0,
        value_name = "EPS"
    )]
    pub epsilon_odin: f64,
    /// Energy temperature.
    #[arg(
        long,
        alias = "temperature_energy",
        default_value_t = 1.0,
        value_name = "T"
    )]
    pub temperature_energy: f64,
    /// Tuned Mahalanobis parameters: the tune-mahalanobis run directory or its
    /// mahalanobis.safetensors.
    #[arg(long, alias = "mahalanobis_param_path", value_name = "PATH")]
    pub mahalanobis_param_path: Option<PathBuf>,
    #[command(flatten)]
    pub output: EvalOutputArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("mos").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    #[test]
    fn test_mos_accepts_the_original_snake_case_flags_and_defaults() {
        let Command::TestMos(a) = parse(&[
            "test-mos",
            "--name",
            "n",
            "--in_datadir",
            "id",
            "--out_datadir",
            "ood",
            "--logdir",
            "log",
            "--model_path",
            "m.pth.tar",
            "--group_config",
            "g.npy",
            "--skip_bad_images",
            "--save_scores",
            "s.csv",
        ]) else {
            panic!("not test-mos")
        };
        assert_eq!(a.data.in_datadir, PathBuf::from("id"));
        assert_eq!(a.data.out_datadir, [PathBuf::from("ood")]);
        assert_eq!(a.model_path, PathBuf::from("m.pth.tar"));
        assert_eq!(a.group_config, PathBuf::from("g.npy"));
        assert!(a.data.skip_bad_images);
        assert_eq!(a.output.save_scores, Some(PathBuf::from("s.csv")));
        // The original's defaults.
        assert_eq!((a.data.workers, a.data.batch, a.data.crop), (8, 256, 480));
        assert_eq!(a.model.model.name, "BiT-S-R101x1");
        assert_eq!(a.device.device, DeviceSpec::Auto);
        let Command::TestMos(b) = parse(&[
            "test-mos",
            "--name",
            "n",
            "--in-datadir",
            "id",
            "--out-datadir",
            "ood",
            "--logdir",
            "log",
            "--model-path",
            "m",
        ]) else {
            panic!("not test-mos")
        };
        assert_eq!(
            b.group_config,
            PathBuf::from("group_config/taxonomy_level0.npy")
        );
    }

    #[test]
    fn test_baseline_accepts_the_original_snake_case_flags_and_defaults() {
        let Command::TestBaseline(a) = parse(&[
            "test-baseline",
            "--name",
            "n",
            "--in_datadir",
            "id",
            "--out_datadir",
            "ood",
            "--logdir",
            "log",
            "--model_path",
            "m",
            "--score",
            "ODIN",
            "--temperature_odin",
            "100",
            "--epsilon_odin",
            "0.0014",
            "--temperature_energy",
            "2",
            "--mahalanobis_param_path",
            "p",
            "--batch",
            "32",
            "--device",
            "cuda:1",
        ]) else {
            panic!("not test-baseline")
        };
        assert_eq!(a.score, vec![Score::Odin]);
        assert_eq!(
            (a.temperature_odin, a.epsilon_odin, a.temperature_energy),
            (100.0, 0.0014, 2.0)
        );
        assert_eq!(a.mahalanobis_param_path, Some(PathBuf::from("p")));
        assert_eq!(a.data.batch, 32);
        assert_eq!(a.device.device, DeviceSpec::Cuda(1));
        let Command::TestBaseline(b) = parse(&[
            "test-baseline",
            "--name",
            "n",
            "--in-datadir",
            "id",
            "--out-datadir",
            "ood",
            "--logdir",
            "log",
            "--model-path",
            "m",
            "--score",
            "MSP,energy,KL_Div",
        ]) else {
            panic!("not test-baseline")
        };
        assert_eq!(b.score, vec![Score::Msp, Score::Energy, Score::KlDiv]);
        assert_eq!(
            (b.temperature_odin, b.epsilon_odin, b.temperature_energy),
            (1000.0, 0.0, 1.0)
        );
        let Command::TestBaseline(c) = parse(&[
            "test-baseline",
            "--name",
            "n",
            "--in-datadir",
            "id",
            "--out-datadir",
            "ood",
            "--logdir",
            "log",
            "--model-path",
            "m",
        ]) else {
            panic!("not test-baseline")
        };
        assert_eq!(c.score, vec![Score::Msp]);
    }

    #[test]
    fn finetune_and_tune_mahalanobis_accept_the_original_scripts_flags() {
        let Command::FinetuneGroup(a) = parse(&[
            "finetune-group",
            "--name",
            "g",
            "--model",
            "BiT-S-R101x1",
            "--logdir",
            "ck",
            "--dataset",
            "imagenet2012",
            "--eval_every",
            "200",
            "--datadir",
            "d",
            "--train_list",
            "t.txt",
            "--val_list",
            "v.txt",
            "--num_block_open",
            "0",
            "--group_config",
            "g.npy",
            "--batch_split",
            "4",
            "--base_lr",
            "0.001",
            "--bit_pretrained_dir",
            "bp",
            "--no_save",
        ]) else {
            panic!("not finetune-group")
        };
        assert_eq!(
            (a.eval_every, a.num_block_open, a.batch_split, a.base_lr),
            (Some(200), 0, 4, 0.001)
        );
        assert_eq!(a.group_config, Some(PathBuf::from("g.npy")));
        assert_eq!(a.bit_pretrained_dir, PathBuf::from("bp"));
        assert!(a.no_save);
        let Command::FinetuneFlat(b) = parse(&[
            "finetune-flat",
            "--name",
            "f",
            "--logdir",
            "ck",
            "--datadir",
            "d",
            "--train-list",
            "t",
            "--val-list",
            "v",
            "--num-block-open",
            "-1",
        ]) else {
            panic!("not finetune-flat")
        };
        // The original's defaults.
        assert_eq!(
            (b.batch, b.batch_split, b.base_lr, b.workers),
            (512, 1, 0.003, 8)
        );
        assert_eq!(
            (b.eval_every, b.num_block_open, b.no_save),
            (None, -1, false)
        );
        assert_eq!(b.bit_pretrained_dir, PathBuf::from("bit_pretrained_models"));
        assert_eq!(b.dataset, "imagenet2012");
        assert_eq!(b.model.model.name, "BiT-S-R101x1");
        let Command::TuneMahalanobis(c) = parse(&[
            "tune-mahalanobis",
            "--name",
            "m",
            "--model",
            "BiT-S-R101x1",
            "--model_path",
            "ck/bit.pth.tar",
            "--logdir",
            "ck",
            "--datadir",
            "d",
            "--train_list",
            "t",
            "--val_list",
            "v",
        ]) else {
            panic!("not tune-mahalanobis")
        };
        assert_eq!((c.batch, c.workers, c.num_lr_samples), (32, 8, 500));
        assert_eq!(
            c.magnitudes,
            vec![0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005]
        );
        assert_eq!(c.model_path, PathBuf::from("ck/bit.pth.tar"));
    }

    #[test]
    fn required_flags_and_bad_values_are_refused() {
        let err = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("mos").chain(args.iter().copied()))
                .unwrap_err()
                .to_string()
        };
        let e = err(&[
            "test-mos",
            "--in-datadir",
            "id",
            "--out-datadir",
            "ood",
            "--model-path",
            "m",
        ]);
        assert!(e.contains("--logdir") && e.contains("--name"), "{e}");
        let e = err(&[
            "forward",
            "--model",
            "R18",
            "--model-path",
            "m",
            "--input",
            "x",
            "--output",
            "y",
        ]);
        assert!(e.contains("unknown model 'R18'"), "{e}");
        let e = err(&["env", "--device", "tpu"]);
        assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
    }
}

/// Settings of the post-hoc methods of `mos score` (docs/scores.md#post-hoc-methods-from-feature-stores).
#[derive(Debug, Clone, Args)]
pub struct PostHocArgs {
    /// A store of in-distribution training images (same model) for ReAct, KNN, ViM
    /// and DICE; what is fitted is saved in the run directory (fit.safetensors) and reused.
    #[arg(long, value_name = "STORE")]
    pub fit: Option<PathBuf>,
    /// The checkpoint the stores were extracted with, read for its head (ReAct, ViM,
    /// ASH, DICE); default: the path the ID store's manifest records. Checked by SHA-256.
    #[arg(long, alias = "model_path", value_name = "FILE")]
    pub model_path: Option<PathBuf>,
    /// ReAct: clip at this percentile of the training activations.
    #[arg(long, default_value_t = crate::pipeline::posthoc::REACT_PERCENTILE, value_name = "P")]
    pub react_percentile: f64,
    /// KNN: the k-th nearest training feature (the original's ImageNet k; OpenOOD uses 50).
    #[arg(long, default_value_t = crate::pipeline::posthoc::KNN_K, value_name = "K")]
    pub knn_k: i64,
    /// ViM: principal dimension; default 1000 for D >= 2048, 512 for D >= 768, else D/2.
    #[arg(long, value_name = "DIM")]
    pub vim_dim: Option<i64>,
    /// ASH-P/B/S: prune this percentile of each image's activations.
    #[arg(long, default_value_t = crate::pipeline::posthoc::ASH_PERCENTILE, value_name = "P")]
    pub ash_percentile: f64,
    /// DICE: keep the head's weights whose contribution is above this percentile.
    #[arg(long, default_value_t = crate::pipeline::posthoc::DICE_PERCENTILE, value_name = "P")]
    pub dice_percentile: f64,
    /// Device of the post-hoc methods: auto (CUDA device 0 if available, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceSpec,
}
