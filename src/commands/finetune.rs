//! `mos finetune-group` and `mos finetune-flat`: one code path (docs/finetuning.md). BiT
//! initialisation (or random), zero head, freezing by `--num-block-open`,
//! BiT-HyperRule schedule, SGD with momentum and correct gradient accumulation,
//! mixup, validation and atomic checkpoints, exact resume, Ctrl-C saves.
//! Unreadable training and validation images are skipped, named in train.log (those
//! of every rank of a multi-process run: rank 0 gathers them through the rendezvous
//! store) and counted in metrics.jsonl (`train_skipped`, `val_skipped`); validation loss and
//! top-1 are over the images read (`val_images`).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{nn, Kind, Tensor};

use crate::cli::{FinetuneArgs, Init};
use crate::data::list::flat_class_count;
use crate::data::loader::{
    load_batch, shard_range, visit_order, Item, Loader, LoaderOptions, Mode, Skipped,
};
use crate::data::transform::{Rng, TrainTransform, IMAGENET_MEAN, IMAGENET_STD};
use crate::data::{read_flat_list, read_group_list};
use crate::dist::{ProcessGroup, Timeouts};
use crate::groupconfig::read_group_config;
use crate::model::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::model::trainable::TrainNet;
use crate::model::weights::{load_family, load_strict, read_state_dict};
use crate::model::{Family, Freeze, Variant};
use crate::ood::GroupSlices;
use crate::runlog::RunLog;
use crate::train::mixup::{mix, mix_with, MixupSampler};
use crate::train::schedule::{mixup_alpha, parse_supports, Schedule};
use crate::train::sgd::Sgd;

/// Which softmax the head has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    Group,
    Flat,
}

/// The checkpoint file of a fine-tuning run directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Data {
    train: Arc<Vec<Item>>,
    val: Arc<Vec<Item>>,
    head_size: i64,
    slices: Option<GroupSlices>,
}

fn load_data(args: &FinetuneArgs, head: Head) -> Result<Data> {
    let items = |list: &Path, slices: Option<&GroupSlices>| -> Result<Vec<Item>> {
        Ok(match slices {
            Some(s) => read_group_list(list, &args.datadir, s.classes_per_group())?
                .into_iter()
                .map(|e| Item {
                    target: e.target(s.num_groups()),
                    path: e.path,
                })
                .collect(),
            None => read_flat_list(list, &args.datadir)?
                .into_iter()
                .map(|e| Item {
                    path: e.path,
                    target: vec![e.label as i64],
                })
                .collect(),
        })
    };
    let slices = match (head, &args.group_config) {
        (Head::Group, Some(cfg)) => {
            let c = read_group_config(cfg).context("--group-config")?;
            Some(
                GroupSlices::new(&c.classes_per_group)
                    .with_context(|| format!("--group-config {}", cfg.display()))?,
            )
        }
        (Head::Group, None) => bail!("finetune-group needs --group-config"),
        (Head::Flat, Some(_)) => {
            bail!("finetune-flat takes no --group-config (that is finetune-group)")
        }
        (Head::Flat, None) => None,
    };
    let train = items(&args.train_list, slices.as_ref()).context("--train-list")?;
    let val = items(&args.val_list, slices.as_ref()).context("--val-list")?;
    let head_size = match &slices {
        Some(s) => s.total_logits(),
        None => {
            let labels = |items: &[Item]| -> Vec<usize> {
                items.iter().map(|i| i.target[0] as usize).collect()
            };
            flat_class_count(&[
                ("--train-list", &args.train_list, &labels(&train)),
                ("--val-list", &args.val_list, &labels(&val)),
            ])? as i64
        }
    };
    Ok(Data {
        train: Arc::new(train),
        val: Arc::new(val),
        head_size,
        slices,
    })
}

fn loss_of(logits: &Tensor, targets: &Tensor, slices: Option<&GroupSlices>) -> Result<Tensor> {
    Ok(match slices {
        Some(s) => s.group_loss(logits, targets)?,
        None => logits.cross_entropy_for_logits(targets),
    })
}

fn correct_of(logits: &Tensor, targets: &Tensor, slices: Option<&GroupSlices>) -> Result<Tensor> {
    Ok(match slices {
        Some(s) => s.group_accuracy(logits, targets)?,
        None => logits.argmax(1, false).eq_tensor(targets),
    })
}

/// What one validation pass measured.
struct Validation {
    /// Mean loss over the images read.
    loss: f64,
    /// Top-1 accuracy over the images read.
    top1: f64,
    /// Images read (the loss and top-1 are over these).
    images: usize,
    /// Images that could not be read, skipped like unreadable training images
    /// (this process's; `skipped_count` counts those of all processes).
    skipped: Vec<Skipped>,
    skipped_count: usize,
    /// On rank 0, the other ranks' unreadable images: (rank, path, reason).
    others_skipped: Vec<(usize, String, String)>,
}

/// The data-parallel side of a run: the process group and the bucket size.
struct Dist {
    pg: ProcessGroup,
    bucket_bytes: usize,
    /// Calls of [`Dist::gather`] so far (each call's store keys are new).
    gathers: std::cell::Cell<u64>,
}

impl Dist {
    fn sum(&self, values: &[f64], device: tch::Device) -> Result<Vec<f64>> {
        Ok(crate::dist::all_reduce_values(&self.pg, values, device)?)
    }

    /// `values` summed over the ranks, followed by every rank's `count` (one slot per
    /// rank): one all-reduce.
    fn sum_with_counts(
        &self,
        values: &[f64],
        count: usize,
        device: tch::Device,
    ) -> Result<(Vec<f64>, Vec<usize>)> {
        let mut v = values.to_vec();
        v.extend(
            (0..self.pg.world_size).map(|r| if r == self.pg.rank { count as f64 } else { 0.0 }),
        );
        let s = self.sum(&v, device)?;
        let counts = s[values.len()..].iter().map(|&c| c as usize).collect();
        Ok((s[..values.len()].to_vec(), counts))
    }

    /// Hands rank 0 the items of the ranks whose `counts` are not zero (all ranks agree
    /// on `counts`, from [`Dist::sum_with_counts`]), through the rendezvous store, so
    /// that train.log names what every rank skipped. Every rank calls it at the same
    /// points; `what` names the items, and each call's store keys are new.
    fn gather<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        what: &str,
        counts: &[usize],
        mine: &[T],
    ) -> Result<Vec<(usize, Vec<T>)>> {
        let n = self.gathers.get();
        self.gathers.set(n + 1);
        let tag = format!("{what}/{n}");
        let has: Vec<bool> = counts.iter().map(|&c| c > 0).collect();
        if !has.iter().skip(1).any(|&h| h) {
            return Ok(Vec::new());
        }
        let bytes = match has[self.pg.rank] && self.pg.rank != 0 {
            true => serde_json::to_vec(mine)?,
            false => Vec::new(),
        };
        self.pg
            .gather_to_root(&tag, &has, &bytes)?
            .into_iter()
            .map(|(r, b)| {
                let items = serde_json::from_slice(&b)
                    .with_context(|| format!("rank {r}'s {tag} from the rendezvous store"))?;
                Ok((r, items))
            })
            .collect()
    }
}

/// Validation loss and top-1 accuracy over the readable images of `val` (all of
/// them, or this rank's shard, summed over the ranks); the unreadable ones are
/// returned, for the caller to log and count.
fn validate(
    model: &TrainNet,
    data: &Data,
    val: &Arc<Vec<Item>>,
    args: &FinetuneArgs,
    device: tch::Device,
    micro: usize,
    dist: Option<&Dist>,
) -> Result<Validation> {
    let loader = Loader::new(
        val.clone(),
        Mode::Eval(
            args.model
                .model
                .eval_transform(crop_of(args), None)
                .map_err(anyhow::Error::msg)?,
        ),
        LoaderOptions {
            batch: micro,
            workers: args.workers,
            prefetch: 2,
            skip_bad: true,
        },
    )?;
    let (mut loss_sum, mut correct, mut n) = (0.0, 0i64, 0usize);
    let mut skipped = Vec::new();
    for batch in loader {
        let mut batch = batch?;
        skipped.append(&mut batch.skipped);
        if batch.is_empty() {
            continue;
        }
        let (x, y) = batch.to_tensors(device);
        tch::no_grad(|| -> Result<()> {
            let logits = model.forward(&x);
            loss_sum +=
                loss_of(&logits, &y, data.slices.as_ref())?.double_value(&[]) * batch.len() as f64;
            correct += correct_of(&logits, &y, data.slices.as_ref())?
                .sum(Kind::Int64)
                .int64_value(&[]);
            Ok(())
        })?;
        n += batch.len();
    }
    let mut skipped_count = skipped.len();
    let mut others_skipped = Vec::new();
    if let Some(d) = dist {
        let (v, counts) =
            d.sum_with_counts(&[loss_sum, correct as f64, n as f64], skipped.len(), device)?;
        (loss_sum, correct, n) = (v[0], v[1] as i64, v[2] as usize);
        skipped_count = counts.iter().sum();
        let mine: Vec<(String, String)> = skipped
            .iter()
            .map(|s| (s.path.to_string_lossy().into_owned(), s.reason.clone()))
            .collect();
        for (r, items) in d.gather("val-skipped", &counts, &mine)? {
            others_skipped.extend(items.into_iter().map(|(p, why)| (r, p, why)));
        }
    }
    if n == 0 {
        let first = skipped
            .first()
            .map(|s| format!(": {}: {}", s.path.display(), s.reason))
            .unwrap_or_default();
        bail!(
            "--val-list {}: none of its {} images could be read{first}",
            args.val_list.display(),
            data.val.len()
        );
    }
    Ok(Validation {
        loss: loss_sum / n as f64,
        top1: correct as f64 / n as f64,
        images: n,
        skipped,
        skipped_count,
        others_skipped,
    })
}

/// Where a run stands: optimizer steps, and the position in the data order.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
struct Position {
    step: u64,
    epoch: u64,
    /// Micro-batches of `epoch` already consumed.
    batch_in_epoch: usize,
}

struct Run<'a> {
    args: &'a FinetuneArgs,
    dir: PathBuf,
    log: RunLog,
    /// `None` on the ranks other than 0.
    metrics: Option<std::fs::File>,
    history: Vec<serde_json::Value>,
    config: serde_json::Value,
    /// Unreadable validation images already named in train.log (each is named
    /// once, and counted at every validation).
    val_skipped: std::collections::BTreeSet<PathBuf>,
    /// Rank 0 (or the only process): it alone writes metrics, checkpoints, plots.
    rank0: bool,
}

impl Run<'_> {
    fn record(&mut self, v: serde_json::Value) -> Result<()> {
        let Some(metrics) = &mut self.metrics else {
            return Ok(());
        };
        writeln!(metrics, "{v}").context("metrics.jsonl")?;
        self.history.push(v);
        Ok(())
    }

    fn save(&self, vs: &nn::VarStore, sgd: &Sgd, meta: CheckpointMeta) -> Result<()> {
        if self.args.no_save || !self.rank0 {
            return Ok(());
        }
        let mut model: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        model.sort_by(|a, b| a.0.cmp(&b.0));
        let path = self.dir.join(CHECKPOINT);
        checkpoint::save(
            &path,
            &Checkpoint {
                meta: Some(meta),
                model,
                momentum: sgd.buffers(),
            },
        )?;
        self.log
            .line(format!("checkpoint saved: {}", path.display()));
        Ok(())
    }
}

fn read_history(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `--crop`, or the family's default (480 BiT, 224 torchvision).
fn crop_of(args: &FinetuneArgs) -> usize {
    args.crop.unwrap_or(args.model.model.default_crop())
}

/// `--precrop`, or the family's default (512 BiT, 256 torchvision).
fn precrop_of(args: &FinetuneArgs) -> usize {
    args.precrop.unwrap_or(match args.model.model.family {
        Family::Bit => crate::data::transform::PRECROP,
        _ => 256,
    })
}

/// `--init` checked against `--model` and `--pretrained` (default: the family's
/// pretrained weights), before anything is read.
fn resolve_init(args: &FinetuneArgs, command: &str) -> Result<Init> {
    let model: Variant = args.model.model;
    if !crate::model::trainable::can_finetune(model) {
        bail!(
            "--model {}: {command} runs BiT models and torchvision's ResNets and ViTs; a TorchScript module is evaluated only",
            model.name
        );
    }
    if model.family == Family::TorchvisionViT && crop_of(args) != model.default_crop() {
        bail!(
            "--crop {}: --model {} takes {s} x {s} images; give --crop {s} or leave it out",
            crop_of(args),
            model.name,
            s = model.default_crop()
        );
    }
    let bit = model.family == Family::Bit;
    let init = args
        .init
        .unwrap_or(if bit { Init::Bit } else { Init::Torchvision });
    match (init, bit, &args.pretrained) {
        (Init::Bit, false, _) => bail!(
            "--init bit loads Google's BiT weights; --model {} starts from torchvision's: --init torchvision --pretrained FILE (or --init none)",
            model.name
        ),
        (Init::Torchvision, true, _) => bail!(
            "--init torchvision loads torchvision's weights; --model {} is a BiT model: --init bit (or none)",
            model.name
        ),
        (Init::Torchvision, false, None) => bail!(
            "--init torchvision needs --pretrained FILE (torchvision's {} weights, e.g. from https://download.pytorch.org/models/)",
            model.name
        ),
        (Init::Bit | Init::None, _, Some(p)) => bail!(
            "--pretrained {} is read with --init torchvision only",
            p.display()
        ),
        _ => Ok(init),
    }
}

pub fn run(args: &FinetuneArgs, head: Head) -> Result<()> {
    let command = match head {
        Head::Group => "finetune-group",
        Head::Flat => "finetune-flat",
    };
    let init = resolve_init(args, command)?;
    let freeze = Freeze::from_num_block_open(args.num_block_open).map_err(anyhow::Error::msg)?;
    if args.batch_split == 0 || args.batch == 0 || args.batch % args.batch_split != 0 {
        bail!(
            "--batch {} must be a positive multiple of --batch-split {}",
            args.batch,
            args.batch_split
        );
    }
    let micro = args.batch / args.batch_split;
    let mut device = args.device.device.resolve()?;
    // Several processes (docs/distributed.md): one device each.
    let dist =
        crate::dist::join_from_env(&mut device, Timeouts::with_heartbeat(args.dist_timeout))?.map(
            |pg| Dist {
                pg,
                bucket_bytes: ((args.bucket_mb * (1 << 20) as f64) as usize).max(1),
                gathers: Default::default(),
            },
        );
    let (rank, world) = dist
        .as_ref()
        .map_or((0, 1), |d| (d.pg.rank, d.pg.world_size));
    let rank0 = rank == 0;
    let dir = args.run.logdir.join(&args.run.name);
    let log = if rank0 {
        RunLog::open(&dir, "train.log")?
    } else {
        RunLog::silent()
    };
    let data = load_data(args, head)?;
    let supports = match &args.schedule {
        Some(s) => parse_supports(s).context("--schedule")?,
        None => crate::train::schedule::supports_for(data.train.len()).to_vec(),
    };
    let schedule = Schedule::new(supports, args.base_lr).context("--base-lr / --schedule")?;
    let alpha = mixup_alpha(data.train.len());
    let config = serde_json::json!({
        "command": command, "model": args.model.model.name, "init": crate::runtime::value_name(&init),
        "pretrained": args.pretrained,
        "dataset": args.dataset, "datadir": args.datadir, "train_list": args.train_list, "val_list": args.val_list,
        "group_config": args.group_config, "train_images": data.train.len(), "val_images": data.val.len(),
        "head_size": data.head_size, "batch": args.batch, "batch_split": args.batch_split, "base_lr": args.base_lr,
        "schedule": schedule.supports(), "mixup_alpha": alpha, "num_block_open": args.num_block_open,
        "crop": crop_of(args), "precrop": precrop_of(args), "seed": args.seed, "device": args.device.device.to_string(),
        "skip_bad_images": true, "world_size": world,
    });
    if rank0 {
        checkpoint::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
    }
    log.line(format!("mos {command} {config}"));

    tch::manual_seed(args.seed as i64);
    let vs = nn::VarStore::new(device);
    let mut model = TrainNet::new(&vs.root(), args.model.model, data.head_size)?;
    let ckpt_path = dir.join(CHECKPOINT);
    let mut pos = Position::default();
    let mut momentum = Vec::new();
    // With several processes rank 0 alone reads the checkpoint or the BiT weights,
    // then broadcasts the weights, the position and the momentum buffers.
    if !rank0 {
    } else if ckpt_path.exists() {
        let sd = read_state_dict(&ckpt_path)?;
        let meta = sd
            .meta
            .as_ref()
            .with_context(|| format!("{}: not a mos checkpoint", ckpt_path.display()))?;
        if meta.model != args.model.model.name || meta.head_size != data.head_size {
            bail!(
                "{} holds {} with head {}, but this run asks for {} with head {}; use another --name",
                ckpt_path.display(), meta.model, meta.head_size, args.model.model.name, data.head_size
            );
        }
        pos = serde_json::from_value(meta.config["position"].clone())
            .context("checkpoint position")?;
        load_strict(&vs, &sd.tensors, &ckpt_path, args.model.model.name, &|_| {
            false
        })?;
        momentum = sd.momentum;
        log.line(format!(
            "resuming from {} at step {}",
            ckpt_path.display(),
            pos.step
        ));
    } else if init == Init::Torchvision {
        let file = args
            .pretrained
            .as_ref()
            .context("internal: --init torchvision without --pretrained")?;
        let sd = read_state_dict(file).context("--pretrained")?;
        let head = model.head_prefix();
        load_family(&vs, &sd.tensors, file, args.model.model, &|n| {
            n.starts_with(head)
        })?;
        log.line(format!(
            "initialised from {} ({}; its head replaced by a zero {}-way head)",
            file.display(),
            sd.format,
            data.head_size
        ));
    } else if init == Init::Bit {
        let npz = args
            .bit_pretrained_dir
            .join(format!("{}.npz", args.model.model.name));
        if !npz.is_file() {
            bail!(
                "--init bit: {} not found (put Google's BiT weights there, or pass --init none)",
                npz.display()
            );
        }
        let sd = read_state_dict(&npz)?;
        load_strict(&vs, &sd.tensors, &npz, args.model.model.name, &|n| {
            n.starts_with("head.")
        })?;
        log.line(format!("initialised from {} (zero head)", npz.display()));
    } else {
        log.line("initialised randomly (--init none; zero head)");
    }
    let mut has_momentum = !momentum.is_empty();
    if let Some(d) = &dist {
        let p = Tensor::from_slice(&[
            pos.step as i64,
            pos.epoch as i64,
            pos.batch_in_epoch as i64,
            i64::from(has_momentum),
        ])
        .to_device(device);
        d.pg.broadcast(&p, 0)?;
        let p = Vec::<i64>::try_from(p.to_device(tch::Device::Cpu))?;
        pos = Position {
            step: p[0] as u64,
            epoch: p[1] as u64,
            batch_in_epoch: p[2] as usize,
        };
        has_momentum = p[3] != 0;
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let vars: Vec<Tensor> = vars.into_iter().map(|(_, t)| t).collect();
        crate::dist::broadcast(&d.pg, &vars, 0, d.bucket_bytes)?;
        if rank0 {
            log.line(format!(
                "{world} processes ({:?}): weights broadcast from rank 0",
                d.pg.backend
            ));
        }
    }
    let trainable = model.apply_freeze(&vs, freeze);
    // The weights are final (initialised or resumed): frozen stages keep theirs.
    model.fix_frozen_weights(freeze);
    if !rank0 && has_momentum {
        momentum = trainable
            .iter()
            .map(|(n, p)| (n.clone(), p.zeros_like()))
            .collect();
    }
    let mut sgd = Sgd::new(trainable, args.batch_split)?;
    if has_momentum {
        sgd.set_buffers(momentum)?;
    }
    if let (Some(d), true) = (&dist, has_momentum) {
        let bufs: Vec<Tensor> = sgd.buffers().into_iter().map(|(_, t)| t).collect();
        crate::dist::broadcast(&d.pg, &bufs, 0, d.bucket_bytes)?;
    }
    let metrics_path = dir.join("metrics.jsonl");
    let (history, metrics) = if rank0 {
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot open {}", metrics_path.display()))?;
        (read_history(&metrics_path), Some(metrics))
    } else {
        (Vec::new(), None)
    };
    let mut run = Run {
        args,
        dir: dir.clone(),
        log,
        metrics,
        history,
        config,
        val_skipped: Default::default(),
        rank0,
    };
    let end = args
        .max_steps
        .map_or(schedule.total_steps(), |m| m.min(schedule.total_steps()));
    if pos.step >= end {
        run.log.line(format!(
            "nothing to do: the run is at step {} of {end}",
            pos.step
        ));
        if let Some(d) = dist {
            d.pg.finish()?;
        }
        return Ok(());
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    let val = match &dist {
        Some(_) => Arc::new(data.val[shard_range(data.val.len(), rank, world)].to_vec()),
        None => data.val.clone(),
    };
    train_loop(
        &mut run,
        &vs,
        &model,
        &mut sgd,
        &data,
        &val,
        &schedule,
        alpha,
        freeze,
        micro,
        pos,
        end,
        device,
        dist.as_ref(),
    )?;
    if let Some(d) = dist {
        d.pg.finish()?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn train_loop(
    run: &mut Run,
    vs: &nn::VarStore,
    model: &TrainNet,
    sgd: &mut Sgd,
    data: &Data,
    val: &Arc<Vec<Item>>,
    schedule: &Schedule,
    alpha: Option<f64>,
    freeze: Freeze,
    micro: usize,
    mut pos: Position,
    end: u64,
    device: tch::Device,
    dist: Option<&Dist>,
) -> Result<()> {
    let args = run.args;
    let (rank, world) = dist.map_or((0, 1), |d| (d.pg.rank, d.pg.world_size));
    let slices = data.slices.as_ref();
    let bar = match run.rank0 {
        true => crate::progress::bar(end, "training"),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_position(pos.step);
    let transform = TrainTransform {
        precrop: precrop_of(args),
        crop: crop_of(args),
        normalize: match args.model.model.family {
            Family::Bit => None,
            _ => Some((IMAGENET_MEAN, IMAGENET_STD)),
        },
    };
    let opts = LoaderOptions {
        batch: micro,
        workers: args.workers,
        prefetch: 2,
        skip_bad: true,
    };
    let meta = |pos: Position, run: &Run| CheckpointMeta {
        model: args.model.model.name.to_string(),
        head_size: data.head_size,
        group_config: slices.map(|s| s.classes_per_group().to_vec()),
        step: pos.step as i64,
        config: serde_json::json!({ "position": pos, "run": run.config }),
    };
    let (mut loss_acc, mut images, mut last) = (0.0, 0usize, Instant::now());
    // Unreadable training images: in all steps done (all ranks), and in the current
    // step (this rank's until the step's all-reduce, then all ranks').
    let (mut skipped, mut step_skipped) = (0usize, 0usize);
    // Another rank's lines on unreadable images of the current step, for rank 0's log.
    let mut step_lines: Vec<String> = Vec::new();
    let n_train = data.train.len();
    loop {
        let mode = Mode::Train {
            transform,
            seed: args.seed,
            epoch: pos.epoch,
        };
        // Several processes: each loads its slice of every global micro-batch.
        let order = match dist {
            Some(_) => visit_order(n_train, &mode),
            None => Vec::new(),
        };
        let loader = Loader::sharded(
            data.train.clone(),
            mode,
            opts,
            pos.batch_in_epoch,
            rank,
            world,
        )?;
        for batch in loader {
            let batch = batch?;
            let chunk_start = pos.batch_in_epoch * micro;
            pos.batch_in_epoch += 1;
            for s in &batch.skipped {
                step_skipped += 1;
                let line = format!(
                    "skipped unreadable training image {}: {}",
                    s.path.display(),
                    s.reason
                );
                match run.rank0 {
                    true => run.log.line(line),
                    false => step_lines.push(line),
                }
            }
            // The global micro-batch: the positions (in the order) of the images
            // read by all ranks, in order. One process: this batch.
            let kept = match dist {
                None => None,
                Some(d) => {
                    let len = micro.min(n_train - chunk_start);
                    let slice = shard_range(len, rank, world);
                    let mut mask = vec![0.0; len];
                    let mut read = batch.indices.iter().peekable();
                    for p in slice {
                        if read.peek() == Some(&&order[chunk_start + p]) {
                            mask[p] = 1.0;
                            read.next();
                        }
                    }
                    let mask = d.sum(&mask, device)?;
                    Some((0..len).filter(|&p| mask[p] > 0.5).collect::<Vec<usize>>())
                }
            };
            let global_len = kept.as_ref().map_or(batch.len(), Vec::len);
            if global_len == 0 {
                continue;
            }
            let lr = schedule.lr(pos.step).context("schedule ended")?;
            let micro_index = (pos.step * args.batch_split as u64) + sgd.accumulated() as u64;
            let loss = if batch.is_empty() {
                None
            } else {
                let (x, y) = batch.to_tensors(device);
                let loss = match (alpha, &kept) {
                    (Some(a), None) => {
                        let mut sampler =
                            MixupSampler::new(a, Rng::derive(args.seed, micro_index).next_u64())?;
                        let lambda = sampler.sample_lambda();
                        let perm = sampler.sample_permutation(batch.len(), device);
                        let logits = model.forward_train(&mix(&x, lambda, &perm)?, freeze);
                        let y_perm = y.index_select(0, &perm);
                        loss_of(&logits, &y, slices)? * lambda
                            + loss_of(&logits, &y_perm, slices)? * (1.0 - lambda)
                    }
                    (Some(a), Some(kept)) => {
                        // The permutation of the global micro-batch, as one process
                        // draws it; this rank loads the partners of its images.
                        let mut sampler =
                            MixupSampler::new(a, Rng::derive(args.seed, micro_index).next_u64())?;
                        let lambda = sampler.sample_lambda();
                        let perm = Vec::<i64>::try_from(
                            sampler.sample_permutation(kept.len(), tch::Device::Cpu),
                        )?;
                        let first = kept
                            .iter()
                            .position(|&p| order[chunk_start + p] == batch.indices[0])
                            .context("mixup: this rank's images are not in the global batch")?;
                        let partners: Vec<usize> = (first..first + batch.len())
                            .map(|k| order[chunk_start + kept[perm[k] as usize]])
                            .collect();
                        let pb = load_batch(&data.train, &partners, &mode, false)?;
                        let (xp, yp) = pb.to_tensors(device);
                        let logits = model.forward_train(&mix_with(&x, &xp, lambda)?, freeze);
                        loss_of(&logits, &y, slices)? * lambda
                            + loss_of(&logits, &yp, slices)? * (1.0 - lambda)
                    }
                    (None, _) => loss_of(&model.forward_train(&x, freeze), &y, slices)?,
                };
                // This rank's share of the global micro-batch's mean loss: the
                // gradients are summed over the ranks.
                Some(match kept {
                    Some(_) => loss * (batch.len() as f64 / global_len as f64),
                    None => loss,
                })
            };
            let mut value = loss.as_ref().map_or(0.0, |l| l.double_value(&[]));
            if let Some(d) = dist {
                value = d.sum(&[value], device)?[0];
            }
            if !value.is_finite() {
                bail!(
                    "the loss is {value} at step {} (lr {lr}): stopping; the last checkpoint in {} is intact",
                    pos.step,
                    run.dir.display()
                );
            }
            match &loss {
                Some(l) => sgd.backward(l)?,
                None => sgd.skip_micro()?,
            };
            loss_acc += value;
            images += batch.len();
            if sgd.accumulated() < args.batch_split {
                continue;
            }
            let mut interrupted = INTERRUPTED.load(Ordering::SeqCst);
            if let Some(d) = dist {
                let grads = sgd.gradients_for_reduce();
                crate::dist::all_reduce_sum(&d.pg, &grads, d.bucket_bytes)?;
                // All ranks agree on the skipped count and on stopping; rank 0 logs
                // what the others skipped.
                let (v, counts) = d.sum_with_counts(
                    &[f64::from(u8::from(interrupted)), images as f64],
                    step_skipped,
                    device,
                )?;
                interrupted = v[0] > 0.0;
                images = v[1] as usize;
                step_skipped = counts.iter().sum();
                for (r, lines) in d.gather("train-skipped", &counts, &step_lines)? {
                    for line in lines {
                        run.log.line(format!("rank {r}: {line}"));
                    }
                }
                step_lines.clear();
            }
            sgd.step(lr)?;
            pos.step += 1;
            let train_loss = loss_acc / args.batch_split as f64;
            run.record(serde_json::json!({
                "step": pos.step, "lr": lr, "loss": train_loss, "train_skipped": step_skipped,
            }))?;
            skipped += step_skipped;
            step_skipped = 0;
            let secs = last.elapsed().as_secs_f64();
            bar.set_position(pos.step);
            bar.set_message(format!(
                "loss {train_loss:.4} lr {lr:.2e} {:.1} img/s",
                images as f64 / secs.max(1e-9)
            ));
            (loss_acc, images, last) = (0.0, 0, Instant::now());
            let done = pos.step >= end;
            if done || args.eval_every.is_some_and(|e| e > 0 && pos.step % e == 0) {
                let v = validate(model, data, val, args, device, micro, dist)?;
                let own = v.skipped.iter().map(|s| (None, s.path.clone(), &s.reason));
                let others = v
                    .others_skipped
                    .iter()
                    .map(|(r, p, why)| (Some(*r), PathBuf::from(p), why));
                for (r, path, why) in own.chain(others) {
                    if run.val_skipped.insert(path.clone()) {
                        let from = r.map(|r| format!("rank {r}: ")).unwrap_or_default();
                        run.log.line(format!(
                            "{from}skipped unreadable validation image {}: {why}",
                            path.display()
                        ));
                    }
                }
                if !v.loss.is_finite() {
                    bail!(
                        "the validation loss is {} at step {}: stopping without saving; the last checkpoint in {} is intact",
                        v.loss,
                        pos.step,
                        run.dir.display()
                    );
                }
                let unread = match v.skipped_count {
                    0 => String::new(),
                    k => format!(" ({} images; {k} unreadable, skipped)", v.images),
                };
                run.log.line(format!(
                    "step {}: train loss {train_loss:.5}, val loss {:.5}, val top-1 {:.2}%{unread}",
                    pos.step,
                    v.loss,
                    100.0 * v.top1
                ));
                run.record(serde_json::json!({
                    "step": pos.step, "val_loss": v.loss, "val_top1": v.top1,
                    "val_images": v.images, "val_skipped": v.skipped_count,
                }))?;
                run.save(vs, sgd, meta(pos, run))?;
                if run.rank0 {
                    crate::plot::training_curves(&run.dir.join("training.svg"), &run.history)?;
                }
            } else if interrupted {
                run.save(vs, sgd, meta(pos, run))?;
            }
            if done {
                bar.finish_and_clear();
                run.log.line(format!(
                    "done at step {} ({skipped} unreadable training images skipped, {} unreadable validation images)",
                    pos.step,
                    run.val_skipped.len()
                ));
                return Ok(());
            }
            if interrupted {
                bar.abandon();
                bail!("interrupted at step {}; the checkpoint is saved, rerun the same command to resume", pos.step);
            }
        }
        pos.epoch += 1;
        pos.batch_in_epoch = 0;
    }
}
