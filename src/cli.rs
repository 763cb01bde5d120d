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
use crate::pipeline::import::ArraySource;

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
    /// A feature store from arrays computed anywhere (.npy, .npz, safetensors): logits,
    /// features, labels, the head; then mos score serves them.
    Import(ImportArgs),
    /// Start N local ranks of finetune-group/finetune-flat (data-parallel, c10d) or N
    /// shards of extract (then merge); all stop when one fails.
    Launch(LaunchArgs),
    /// OOD scores, metrics, table and plots from feature stores (no images, no model).
    Score(ScoreArgs),
    /// Group a label space (WordNet taxonomy, feature k-means, random); write group lists.
    MakeGroups(MakeGroupsArgs),
    /// A whole table (methods x OOD sets) in one run: each model and set extracted once,
    /// checked against published numbers.
    Benchmark(Box<BenchmarkArgs>),
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
    /// Methods, comma-separated: MOS, MSP, ODIN, Energy, KL_Div, Mahalanobis, and the
    /// post-hoc MaxLogit, GradNorm, ReAct, KNN, ViM, ASH-P, ASH-B, ASH-S, DICE, SCALE,
    /// NNGuide, fDBD, GEN, Residual, NECO, Entropy, RankFeat (flat model).
    #[arg(long, value_delimiter = ',', value_name = "METHODS")]
    pub score: Vec<String>,
    #[command(flatten)]
    pub baseline: BaselineFlags,
    #[command(flatten)]
    pub posthoc: PostHocFlags,
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
    #[command(flatten)]
    pub transform: TransformArgs,
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
    /// mahalanobis (the 5 feature layers' spatial means), rankfeat (RankFeat's fused
    /// logits; BiT and torchvision's ResNets).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "logits,features",
        value_name = "LAYERS"
    )]
    pub layers: Vec<String>,
    /// RankFeat's rank-1 parts by this many power iterations (its faster option; the
    /// original's 20) instead of an exact SVD; recorded in the manifest.
    #[arg(long, value_name = "N")]
    pub rankfeat_power_iterations: Option<u32>,
    #[command(flatten)]
    pub transform: TransformArgs,
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

/// Arguments of `mos import` (docs/commands.md#import). An array is a `.npy` file, or
/// `FILE:NAME` for an array of an `.npz` or safetensors file; `--arrays FILE` takes
/// every array from one such file under its role's name (logits, features, labels,
/// head_weight, head_bias), and the array flags override it.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The store to write (a directory; created).
    #[arg(long, value_name = "STORE")]
    pub output: PathBuf,
    /// An .npz or safetensors file holding the arrays under their roles' names.
    #[arg(long, value_name = "FILE")]
    pub arrays: Option<PathBuf>,
    /// Logits [N, C], floating point (stored as float32).
    #[arg(long, value_name = "ARRAY")]
    pub logits: Option<ArraySource>,
    /// Pre-logit features [N, D] (the head's input), for the post-hoc methods.
    #[arg(long, value_name = "ARRAY")]
    pub features: Option<ArraySource>,
    /// Class labels [N], integers.
    #[arg(long, value_name = "ARRAY")]
    pub labels: Option<ArraySource>,
    /// No labels (an OOD set): every row is labelled 0, as the manifest records.
    #[arg(long)]
    pub no_labels: bool,
    /// The head's weight [C, D] (logits = features W^T + b), for the methods that apply it.
    #[arg(long, value_name = "ARRAY")]
    pub head_weight: Option<ArraySource>,
    /// The head's bias [C].
    #[arg(long, value_name = "ARRAY")]
    pub head_bias: Option<ArraySource>,
    /// A text file with one path per row (shown in score CSVs) [default: row-0, row-1, ...].
    #[arg(long, value_name = "FILE")]
    pub paths: Option<PathBuf>,
    /// The model the arrays came from; stores scored together must name the same model.
    #[arg(long, value_name = "NAME")]
    pub model_name: String,
    /// The data set's name in tables [default: the store directory's name].
    #[arg(long, value_name = "NAME")]
    pub dataset: Option<String>,
    /// What --paths are relative to (joined to them in score CSVs).
    #[arg(long, value_name = "DIR")]
    pub datadir: Option<PathBuf>,
    /// Classes of the ID set [default: 1 + the largest label].
    #[arg(long, value_name = "N")]
    pub num_classes: Option<i64>,
    /// Rows per batch when scored (as mos extract's --batch: an extracted store's
    /// batch gives the same bits).
    #[arg(long, value_parser = at_least_one, default_value_t = 256, value_name = "N")]
    pub batch: usize,
}

/// Arguments of `mos merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The store written by mos extract.
    #[arg(value_name = "STORE")]
    pub store: PathBuf,
}

/// Arguments of `mos launch`.
#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Processes on this node (one per GPU, or CPU processes).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: usize,
    /// Nodes of the job (each runs its own `mos launch`).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nnodes: usize,
    /// This node's index, 0-based (node 0 hosts the rendezvous store).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub node_rank: usize,
    /// Host of node 0 (default 127.0.0.1 with one node).
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store (default: a free port with one node, else 29500).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// The mos command the ranks run: finetune-group, finetune-flat or extract (or
    /// bench-train), with its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How `mos make-groups` groups the classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// By the WordNet noun hierarchy (classes are WordNet ids such as n01440764).
    Taxonomy,
    /// k-means++ of the class means of a feature store's pre-logits.
    Kmeans,
    /// A seeded random partition into groups of as-equal-as-possible sizes.
    Random,
}

/// Arguments of `mos make-groups`.
#[derive(Debug, Clone, Args)]
pub struct MakeGroupsArgs {
    /// How to group (makes --output from the classes of --datadir or --classes).
    #[arg(
        long,
        value_enum,
        required_unless_present = "from",
        conflicts_with = "from"
    )]
    pub strategy: Option<Strategy>,
    /// The groups file to write (GROUPS.json, read by --group-config).
    #[arg(long, value_name = "GROUPS.json", requires = "strategy")]
    pub output: Option<PathBuf>,
    /// The classes: the class folders of this ImageFolder directory, sorted as ImageFolder sorts them.
    #[arg(long, value_name = "DIR", conflicts_with = "classes")]
    pub datadir: Option<PathBuf>,
    /// The classes: one name per line, in flat-label order (e.g. configs/imagenet/imagenet1k_classes.txt).
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// taxonomy: the directory of WordNet 3.0's data.noun and index.noun.
    #[arg(long, alias = "wordnet_dir", default_value = crate::groups::wordnet::DEFAULT_DIR, value_name = "DIR")]
    pub wordnet_dir: PathBuf,
    /// taxonomy: the groups' anchor synsets in group order, comma-separated, as ids
    /// (n00015388) or senses (animal.n.01); `rest` places the group of classes no
    /// anchor catches (last if not given). Default: the paper's eight groups.
    #[arg(long, value_delimiter = ',', value_name = "SYNSETS")]
    pub anchors: Option<Vec<String>>,
    /// kmeans: a feature store with pre-logits (mos extract --layers logits,features).
    #[arg(long, value_name = "STORE")]
    pub features: Option<PathBuf>,
    /// kmeans, random: the number of groups.
    #[arg(long, alias = "num_groups", value_name = "K")]
    pub num_groups: Option<usize>,
    /// kmeans, random: the seed.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// kmeans: k-means++ restarts; the lowest inertia wins.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub restarts: usize,
    /// Write the group list of --flat-list with the groups of this file.
    #[arg(long, value_name = "GROUPS.json", requires_all = ["flat_list", "output_list"])]
    pub from: Option<PathBuf>,
    /// The flat list (`path label`); a line's class is its path's folder, or
    /// --classes' name of its label.
    #[arg(long, alias = "flat_list", value_name = "FILE", requires = "from")]
    pub flat_list: Option<PathBuf>,
    /// The group list to write (`path group_index class_index_in_group`).
    #[arg(long, alias = "output_list", value_name = "FILE", requires = "from")]
    pub output_list: Option<PathBuf>,
    /// The inverse map to write (group, class in group -> flat label, class name);
    /// default: --output-list with .map.json for its extension.
    #[arg(long, alias = "output_map", value_name = "FILE", requires = "from")]
    pub output_map: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
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
    /// from stored features MaxLogit, GradNorm, ReAct, KNN, ViM, ASH-P, ASH-B, ASH-S, DICE,
    /// SCALE, NNGuide, fDBD, GEN, Residual, NECO, Entropy; RankFeat from a store's
    /// rankfeat layer.
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
    #[command(flatten)]
    pub baseline: BaselineFlags,
    #[command(flatten)]
    pub posthoc: PostHocFlags,
    /// The checkpoint the stores were extracted with, read for its head (ReAct, ViM,
    /// ASH, DICE, SCALE, fDBD, Residual, NNGuide when it clips); default: the path the
    /// ID store's manifest records. Checked by SHA-256.
    #[arg(long, alias = "model_path", value_name = "FILE")]
    pub model_path: Option<PathBuf>,
    /// Device of the post-hoc methods: auto (CUDA device 0 if available, else CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceSpec,
    /// Published numbers to check every row against (docs/benchmark.md): a cell for
    /// every method and OOD store, the stores' model and transform those of its
    /// setup; the comparison goes to report.md; exit status 1 when a cell is outside
    /// its tolerance.
    #[arg(long, value_name = "FILE")]
    pub published: Option<PathBuf>,
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
    /// torchvision's weights (`--pretrained FILE`, a torchvision model); zero head.
    Torchvision,
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
    /// Where the weights start: bit (BiT's pretrained .npz), torchvision (a
    /// torchvision state-dict file, --pretrained) or none (random); the head is new
    /// and zero [default: bit for BiT models, torchvision for torchvision's].
    #[arg(long, value_enum)]
    pub init: Option<Init>,
    /// --init torchvision: torchvision's weights file of --model (e.g.
    /// resnet50-19c8e357.pth, resnet50-0676ba61.pth, or safetensors); its head is
    /// replaced.
    #[arg(long, value_name = "FILE")]
    pub pretrained: Option<PathBuf>,
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
    /// Side of the training crop and of validation images [default: 480 for BiT,
    /// 224 for torchvision's models].
    #[arg(long, value_parser = at_least_one, value_name = "PIXELS")]
    pub crop: Option<usize>,
    /// Side of the training resize before the random crop [default: 512 for BiT,
    /// 256 for torchvision's models].
    #[arg(long, value_parser = at_least_one, value_name = "PIXELS")]
    pub precrop: Option<usize>,
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
    #[command(flatten)]
    pub transform: TransformArgs,
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
    #[arg(long, value_enum, default_value_t = crate::pipeline::report::ReportFormat::Markdown)]
    pub format: crate::pipeline::report::ReportFormat,
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
    #[command(flatten)]
    pub transform: TransformArgs,
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
    #[command(flatten)]
    pub baseline: BaselineFlags,
    #[command(flatten)]
    pub output: EvalOutputArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// How images are prepared for the model: `--crop`, and `--resize` for torchvision's
/// models; for a TorchScript module also `--mean`, `--std` and its head's `--head`
/// (docs/data.md#transforms, docs/model.md#torchscript-modules).
#[derive(Debug, Clone, Default, Args)]
pub struct TransformArgs {
    /// Side of the square images the model sees [default: 480 for BiT (the paper),
    /// 224 for torchvision's models and TorchScript modules].
    #[arg(long, value_parser = at_least_one, value_name = "PIXELS")]
    pub crop: Option<usize>,
    /// torchvision's models and TorchScript modules: Resize's shorter side before the
    /// center crop [default: crop x 256 / 224, 256 for 224]. BiT resizes to crop x crop.
    #[arg(long, value_parser = at_least_one, value_name = "PIXELS")]
    pub resize: Option<usize>,
    /// --model torchscript: the per-channel mean subtracted from pixels in [0, 1]
    /// [default: ImageNet's 0.485,0.456,0.406].
    #[arg(long, value_delimiter = ',', value_name = "R,G,B")]
    pub mean: Option<Vec<f32>>,
    /// --model torchscript: the per-channel standard deviation divided by [default:
    /// ImageNet's 0.229,0.224,0.225].
    #[arg(long, value_delimiter = ',', value_name = "R,G,B")]
    pub std: Option<Vec<f32>>,
    /// --model torchscript: the prefix of the head's parameters, PREFIX.weight [C, D]
    /// and PREFIX.bias [C] [default: fc].
    #[arg(long = "head", value_name = "PREFIX")]
    pub head: Option<String>,
}

impl TransformArgs {
    /// The flags as the library takes them.
    pub fn spec(&self) -> crate::model::input::InputSpec {
        crate::model::input::InputSpec {
            crop: self.crop,
            resize: self.resize,
            mean: self.mean.clone(),
            std: self.std.clone(),
            head: self.head.clone(),
        }
    }

    /// `--crop`, or the model's default.
    pub fn crop(&self, model: Variant) -> usize {
        self.spec().crop(model)
    }

    /// The model's evaluation transform with these flags.
    pub fn resolve(&self, model: Variant) -> anyhow::Result<crate::data::ImageTransform> {
        self.spec().resolve(model)
    }

    /// What loading a TorchScript module needs (its head's prefix, the probe's
    /// size); `None` for the other models.
    pub fn script_spec(&self, model: Variant) -> Option<crate::model::weights::ScriptSpec> {
        self.spec().script_spec(model)
    }
}

/// `--model`: the architecture.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Architecture: BiT-{S,M}-R50x1, -R50x3, -R101x1, -R101x3, -R152x2, -R152x4, the
    /// small ResNetV2-R14x0.5, ResNetV2-R26x0.5, ResNetV2-R50x0.5, or torchvision's
    /// resnet18, resnet34, resnet50, resnet101, resnet152, vit_b_16, vit_b_32,
    /// vit_l_16, vit_l_32, vit_h_14, or torchscript (a TorchScript module as
    /// --model-path: mos extract, test-mos, test-baseline, benchmark).
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
        assert_eq!(
            (
                a.data.workers,
                a.data.batch,
                a.data.transform.crop(a.model.model)
            ),
            (8, 256, 480)
        );
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
            (
                a.baseline.temperature_odin(),
                a.baseline.epsilon_odin(),
                a.baseline.temperature_energy()
            ),
            (100.0, 0.0014, 2.0)
        );
        assert_eq!(a.baseline.mahalanobis_param_path, Some(PathBuf::from("p")));
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
            (
                b.baseline.temperature_odin(),
                b.baseline.epsilon_odin(),
                b.baseline.temperature_energy()
            ),
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

/// The settings of ODIN, Energy and Mahalanobis, shared by `mos score`,
/// `mos test-baseline` and `mos benchmark` (docs/scores.md). A flag not given
/// takes the original's default ([`BaselineFlags::temperature_odin`] and the
/// others); `mos benchmark` reads it from its config file first.
#[derive(Debug, Clone, Default, Args)]
pub struct BaselineFlags {
    /// ODIN temperature [default: 1000].
    #[arg(long, alias = "temperature_odin", value_name = "T")]
    pub temperature_odin: Option<f64>,
    /// ODIN input perturbation [default: 0]. At 0 there is no backward pass; a
    /// positive value perturbs the images, so it needs the model and the images
    /// (test-baseline; benchmark, sharing the flat model's extraction pass): a store
    /// gives ODIN only at 0.
    #[arg(long, alias = "epsilon_odin", value_name = "EPS")]
    pub epsilon_odin: Option<f64>,
    /// Energy temperature [default: 1].
    #[arg(long, alias = "temperature_energy", value_name = "T")]
    pub temperature_energy: Option<f64>,
    /// Tuned Mahalanobis parameters: the tune-mahalanobis run directory or its
    /// mahalanobis.safetensors. From stores (extracted with --layers mahalanobis) only
    /// parameters with noise magnitude 0 can be used.
    #[arg(long, alias = "mahalanobis_param_path", value_name = "PATH")]
    pub mahalanobis_param_path: Option<PathBuf>,
}

impl BaselineFlags {
    /// `--temperature-odin`'s default (the original's).
    pub const TEMPERATURE_ODIN: f64 = 1000.0;
    /// `--epsilon-odin`'s default (the original's).
    pub const EPSILON_ODIN: f64 = 0.0;
    /// `--temperature-energy`'s default (the original's).
    pub const TEMPERATURE_ENERGY: f64 = 1.0;

    pub fn temperature_odin(&self) -> f64 {
        self.temperature_odin.unwrap_or(Self::TEMPERATURE_ODIN)
    }

    pub fn epsilon_odin(&self) -> f64 {
        self.epsilon_odin.unwrap_or(Self::EPSILON_ODIN)
    }

    pub fn temperature_energy(&self) -> f64 {
        self.temperature_energy.unwrap_or(Self::TEMPERATURE_ENERGY)
    }
}

/// The settings of the post-hoc methods, shared by `mos score` and
/// `mos benchmark` (docs/scores.md#post-hoc-methods-from-feature-stores). A flag not
/// given takes the default of [`crate::pipeline::score::posthoc_fit::Settings`];
/// `mos benchmark` reads it from its config file first.
#[derive(Debug, Clone, Default, Args)]
pub struct PostHocFlags {
    /// A store of in-distribution training images extracted with the same (flat)
    /// model (mos extract --layers logits,features), for ReAct, KNN, ViM, DICE,
    /// NNGuide, fDBD, Residual and NECO;
    /// what is fitted is saved in the run directory (fit.safetensors) and reused.
    #[arg(long, value_name = "STORE")]
    pub fit: Option<PathBuf>,
    /// ReAct: clip at this percentile of the training activations [default: 90].
    #[arg(long, alias = "react_percentile", value_name = "P")]
    pub react_percentile: Option<f64>,
    /// ReAct: clip at this number instead of a percentile of the training
    /// activations (no --fit needed), as the original's --threshold (1.0 for its
    /// ImageNet ResNet-50 results).
    #[arg(
        long,
        alias = "react_threshold",
        value_name = "C",
        conflicts_with = "react_percentile"
    )]
    pub react_threshold: Option<f64>,
    /// KNN: the k-th nearest training feature [default: 1000, the original's ImageNet
    /// k; OpenOOD uses 50].
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
    /// SCALE: keep the top (100 - P)% of each image's activations to compute its
    /// scale [default: 85].
    #[arg(long, alias = "scale_percentile", value_name = "P")]
    pub scale_percentile: Option<f64>,
    /// NNGuide: the k nearest guide-bank features averaged [default: 10].
    #[arg(long, alias = "nnguide_k", value_name = "K")]
    pub nnguide_k: Option<i64>,
    /// NNGuide: clip the features (ReAct) at this quantile of the guide bank's, or
    /// none; auto: 0.95 for torchvision's ResNets (the original's ResNet-50), none
    /// for the others [default: auto].
    #[arg(long, alias = "nnguide_clip", value_name = "auto|none|Q")]
    pub nnguide_clip: Option<crate::pipeline::score::posthoc_fit::NnGuideClip>,
    /// GEN: the exponent gamma [default: 0.1].
    #[arg(long, alias = "gen_gamma", value_name = "G")]
    pub gen_gamma: Option<f64>,
    /// GEN: the M largest probabilities summed [default: 100].
    #[arg(long, alias = "gen_m", value_name = "M")]
    pub gen_m: Option<i64>,
    /// Residual: principal dimension [default: as ViM's].
    #[arg(long, alias = "residual_dim", value_name = "DIM")]
    pub residual_dim: Option<i64>,
    /// NECO: principal dimensions kept [default: 100].
    #[arg(long, alias = "neco_dim", value_name = "DIM")]
    pub neco_dim: Option<i64>,
    /// NECO: multiply by the max logit [default: as the original, yes for ViTs,
    /// no for ResNets; required for other models].
    #[arg(long, alias = "neco_max_logit", value_name = "true|false", action = clap::ArgAction::Set)]
    pub neco_max_logit: Option<bool>,
}

impl PostHocFlags {
    /// These flags, each one not given taken from `fallback` (a config file's keys).
    pub fn or(&self, fallback: &PostHocFlags) -> PostHocFlags {
        PostHocFlags {
            fit: self.fit.clone().or(fallback.fit.clone()),
            react_percentile: self.react_percentile.or(fallback.react_percentile),
            react_threshold: self.react_threshold.or(fallback.react_threshold),
            knn_k: self.knn_k.or(fallback.knn_k),
            vim_dim: self.vim_dim.or(fallback.vim_dim),
            ash_percentile: self.ash_percentile.or(fallback.ash_percentile),
            dice_percentile: self.dice_percentile.or(fallback.dice_percentile),
            scale_percentile: self.scale_percentile.or(fallback.scale_percentile),
            nnguide_k: self.nnguide_k.or(fallback.nnguide_k),
            nnguide_clip: self.nnguide_clip.or(fallback.nnguide_clip),
            gen_gamma: self.gen_gamma.or(fallback.gen_gamma),
            gen_m: self.gen_m.or(fallback.gen_m),
            residual_dim: self.residual_dim.or(fallback.residual_dim),
            neco_dim: self.neco_dim.or(fallback.neco_dim),
            neco_max_logit: self.neco_max_logit.or(fallback.neco_max_logit),
        }
    }

    /// The settings, defaults for what is not given, checked.
    pub fn settings(&self) -> anyhow::Result<crate::pipeline::score::posthoc_fit::Settings> {
        let d = crate::pipeline::score::posthoc_fit::Settings::default();
        if let (Some(t), Some(q)) = (self.react_threshold, self.react_percentile) {
            anyhow::bail!(
                "react_threshold {t} and react_percentile {q}: ReAct clips at one of them; give one (flag or config key)"
            );
        }
        let s = crate::pipeline::score::posthoc_fit::Settings {
            react_percentile: self.react_percentile.unwrap_or(d.react_percentile),
            react_threshold: self.react_threshold,
            knn_k: self.knn_k.unwrap_or(d.knn_k),
            vim_dim: self.vim_dim,
            ash_percentile: self.ash_percentile.unwrap_or(d.ash_percentile),
            dice_percentile: self.dice_percentile.unwrap_or(d.dice_percentile),
            scale_percentile: self.scale_percentile.unwrap_or(d.scale_percentile),
            nnguide_k: self.nnguide_k.unwrap_or(d.nnguide_k),
            nnguide_clip: self.nnguide_clip.unwrap_or(d.nnguide_clip),
            gen_gamma: self.gen_gamma.unwrap_or(d.gen_gamma),
            gen_m: self.gen_m.unwrap_or(d.gen_m),
            residual_dim: self.residual_dim,
            neco_dim: self.neco_dim.unwrap_or(d.neco_dim),
            neco_max_logit: self.neco_max_logit,
        };
        s.validate()?;
        Ok(s)
    }
}
