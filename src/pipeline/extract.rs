//! Stage 1 of the pipeline: images -> the network's outputs.
//!
//! [`forward_batch`] runs one batch and keeps what [`Layers`] asks for; the test
//! commands call it with logits only, once per batch (`pipeline::in_memory`).
//! [`extract_range`] runs the rows `[start, end)` of a data set (a shard) in the
//! batches the test commands use: batch j holds the images `[j B, (j + 1) B)`
//! (B = `--batch`), minus unreadable ones that are skipped. A shard whose edges
//! fall inside a batch reads that whole batch and keeps only its own rows, so every
//! image is forwarded together with the same images whatever the sharding.
//! libtorch's CPU convolutions pick their kernels by the batch's shape (a batch of
//! one small image takes another path than a larger batch, measured on this
//! machine), so this is what makes sharded stores bit-identical to an unsharded
//! one and to the test commands' scores. The cost: at most 2 (B - 1) images read
//! twice per shard, none when the shard's edges are multiples of B.
use std::ops::Range;
use std::sync::Arc;

use std::time::Instant;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::vocab::{to_f64_vec, Layers, FEATURE_LAYERS};

use crate::data::loader::{Item, Loader, LoaderOptions, Mode, Skipped};
use crate::data::ImageTransform;
use crate::model::Network;

/// The outputs of one batch, on the model's device.
pub struct Outputs {
    pub logits: Tensor,
    pub features: Option<Tensor>,
    /// `layer0`..`layer4` (empty unless asked for).
    pub layers: Vec<Tensor>,
    /// RankFeat's fused logits (unless not asked for).
    pub rankfeat: Option<Tensor>,
}

/// One forward pass of `x` (no gradient). With logits only this is
/// `model.forward(x)`; the other outputs come from the same operations on the same
/// values, so the logits are the same bits either way.
/// RankFeat's branches (`layers.rankfeat`) reuse the pass's stage-3 and stage-4
/// maps.
pub fn forward_batch(model: &Network, x: &Tensor, layers: Layers) -> Outputs {
    tch::no_grad(|| {
        if !layers.features && !layers.mahalanobis && !layers.rankfeat {
            return Outputs {
                logits: model.forward(x),
                features: None,
                layers: Vec::new(),
                rankfeat: None,
            };
        }
        let (logits, features, means, maps) =
            model.outputs_maps(x, layers.mahalanobis, layers.rankfeat);
        Outputs {
            logits,
            features: layers.features.then_some(features),
            layers: means,
            rankfeat: maps
                .map(|(b3, b4)| model.rankfeat(&b3, &b4, layers.rankfeat_power_iterations)),
        }
    })
}

/// What a [`BatchPass`] gives besides the outputs: per method, the batch's
/// scores [N] (float64, on the device) and the seconds of its own work (its
/// backward pass and its forward passes of the perturbed input).
pub struct PassScores {
    pub scores: Vec<Tensor>,
    pub seconds: Vec<f64>,
}

/// Methods scored on an extraction's batches, sharing each batch's decoding and
/// first forward pass (the image-pass methods of the score stage,
/// `pipeline::score::image_pass`). The pass runs that forward pass
/// itself and gives the outputs `layers` asks for, the same values as
/// [`forward_batch`], with its methods' scores.
pub trait BatchPass {
    /// How many methods it scores.
    fn len(&self) -> usize;
    /// Whether it scores no method (then [`extract_range_with`] runs [`forward_batch`]).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One batch: the outputs and the methods' scores.
    fn forward(&self, model: &Network, x: &Tensor, layers: Layers)
        -> Result<(Outputs, PassScores)>;
}

/// Why an image with non-finite outputs was left out (`--skip-bad-images`).
pub const NON_FINITE: &str = "the network's outputs are not finite (NaN or infinite)";

/// The log line of an image left out of a store: unreadable, or with outputs
/// that are not finite.
pub fn skip_line(index: usize, s: &Skipped) -> String {
    let what = if s.reason == NON_FINITE {
        "image"
    } else {
        "unreadable image"
    };
    format!(
        "skipped {what} {} (index {index}): {}",
        s.path.display(),
        s.reason
    )
}

/// Per row of `[start, start + len)`: whether every output of the row (logits,
/// features, Mahalanobis layers) is finite. One copy to the CPU per batch.
fn finite_rows(out: &Outputs, start: i64, len: i64) -> Result<Vec<bool>> {
    let rows = |t: &Tensor| {
        t.narrow(0, start, len)
            .isfinite()
            .flatten(1, -1)
            .all_dim(1, false)
    };
    let mut ok = rows(&out.logits);
    if let Some(f) = &out.features {
        ok = ok.logical_and(&rows(f));
    }
    for t in &out.layers {
        ok = ok.logical_and(&rows(t));
    }
    if let Some(r) = &out.rankfeat {
        ok = ok.logical_and(&rows(r));
    }
    Ok(Vec::<bool>::try_from(ok.to_device(Device::Cpu))?)
}

/// The loader of evaluation images in dataset order.
pub fn eval_loader(items: Arc<Vec<Item>>, opts: &ExtractOptions) -> Result<Loader> {
    Ok(Loader::new(
        items,
        Mode::Eval(opts.transform),
        LoaderOptions {
            batch: opts.batch,
            workers: opts.workers,
            prefetch: 2,
            skip_bad: opts.skip_bad,
        },
    )?)
}

/// Loader and device settings of an extraction.
#[derive(Clone, Copy, Debug)]
pub struct ExtractOptions {
    pub batch: usize,
    pub workers: usize,
    /// The model's evaluation transform.
    pub transform: ImageTransform,
    pub skip_bad: bool,
    pub device: Device,
    pub layers: Layers,
}

/// The outputs of a range of images, on the CPU, one row per kept image.
pub struct Extracted {
    /// Dataset index of each row.
    pub indices: Vec<usize>,
    pub labels: Vec<i64>,
    pub logits: Tensor,
    pub features: Option<Tensor>,
    pub layers: Vec<Tensor>,
    /// RankFeat's fused logits [N, head] (`--layers rankfeat`).
    pub rankfeat: Option<Tensor>,
    /// Skipped images of the range, with their dataset index.
    pub skipped: Vec<(usize, Skipped)>,
}

/// Extracts the images `range` of `items` in the global batches of
/// `opts.batch` (see the module's documentation); `on_batch` is told how many of the
/// range's images each batch settled (for a progress bar).
pub fn extract_range(
    model: &Network,
    items: &[Item],
    range: Range<usize>,
    opts: &ExtractOptions,
    on_batch: &dyn Fn(u64),
) -> Result<Extracted> {
    Ok(extract_range_with(model, items, range, opts, None, on_batch)?.0)
}

/// The scores of the image-pass methods of [`extract_range_with`]: per method, per
/// kept row; seconds per method (its own work, see [`PassScores`]); and the seconds
/// of everything else (decoding, waiting for the loader, the shared forward pass,
/// copying the outputs).
pub struct RangePass {
    pub scores: Vec<Vec<f64>>,
    pub seconds: Vec<f64>,
    pub shared_seconds: f64,
}

/// [`extract_range`], with the methods of `pass` scored on the same batches,
/// sharing each batch's decoding and first forward pass ([`BatchPass`]).
pub fn extract_range_with(
    model: &Network,
    items: &[Item],
    range: Range<usize>,
    opts: &ExtractOptions,
    pass: Option<&dyn BatchPass>,
    on_batch: &dyn Fn(u64),
) -> Result<(Extracted, RangePass)> {
    let started = Instant::now();
    if opts.layers.rankfeat {
        model
            .variant()
            .require_rankfeat_maps("--layers rankfeat")
            .map_err(anyhow::Error::msg)?;
    }
    let pass = pass.filter(|p| !p.is_empty());
    let n = pass.map_or(0, |p| p.len());
    let mut rp = RangePass {
        scores: vec![Vec::new(); n],
        seconds: vec![0.0; n],
        shared_seconds: 0.0,
    };
    let b = opts.batch.max(1);
    let first = range.start / b * b;
    let last = range.end.div_ceil(b) * b;
    let last = last.min(items.len());
    let window: Arc<Vec<Item>> = Arc::new(items[first..last.max(first)].to_vec());
    let loader = eval_loader(window.clone(), opts)?;
    let (mut indices, mut labels, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    let (mut logits, mut features, mut rankfeat) = (Vec::new(), Vec::new(), Vec::new());
    let mut layers: Vec<Vec<Tensor>> = (0..FEATURE_LAYERS).map(|_| Vec::new()).collect();
    let cpu = |t: &Tensor| t.to_device(Device::Cpu);
    for (j, batch) in loader.enumerate() {
        let batch = batch?;
        let own = |i: usize| range.contains(&(first + i));
        // Batch j holds the window's images [j b, (j + 1) b) in order: the ones
        // not kept are the skipped ones, in the same order.
        let chunk = j * b..((j + 1) * b).min(window.len());
        let missing = chunk.filter(|i| !batch.indices.contains(i));
        let mut settled = 0;
        for (i, s) in missing.zip(&batch.skipped) {
            if own(i) {
                skipped.push((first + i, s.clone()));
                settled += 1;
            }
        }
        let keep: Vec<usize> = (0..batch.len())
            .filter(|&r| own(batch.indices[r]))
            .collect();
        on_batch((keep.len() + settled) as u64);
        if keep.is_empty() {
            continue;
        }
        let (x, _) = batch.to_tensors(opts.device);
        model.check_input(&x)?;
        // Kept rows are contiguous: the range is an interval of the batch's order.
        let (start, len) = (keep[0] as i64, keep.len() as i64);
        let (out, pass_scores) = match pass {
            None => (forward_batch(model, &x, opts.layers), None),
            Some(p) => {
                let (out, ps) = p.forward(model, &x, opts.layers)?;
                (out, Some(ps))
            }
        };
        // An image whose outputs are not finite is refused, or left out and
        // reported with --skip-bad-images: nothing non-finite is ever stored.
        let finite = finite_rows(&out, start, len)?;
        let mut rows: Vec<usize> = Vec::with_capacity(keep.len());
        for (j, &r) in keep.iter().enumerate() {
            if finite[j] {
                rows.push(r);
                continue;
            }
            let i = batch.indices[r];
            let path = window[i].path.clone();
            if !opts.skip_bad {
                bail!(
                    "{} (dataset index {}): the network's outputs for this image are not finite (NaN or infinite); refusing to store them (pass --skip-bad-images to leave such images out, reported)",
                    path.display(),
                    first + i
                );
            }
            skipped.push((
                first + i,
                Skipped {
                    path,
                    reason: NON_FINITE.into(),
                },
            ));
        }
        // The kept rows' positions in the batch (all of [start, start + len) as a rule).
        let select = |t: &Tensor| -> Tensor {
            if rows.len() == keep.len() {
                t.narrow(0, start, len)
            } else {
                let at: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                t.index_select(0, &Tensor::from_slice(&at).to_device(t.device()))
            }
        };
        if let Some(ps) = pass_scores {
            for (m, s) in ps.scores.iter().enumerate() {
                rp.scores[m].extend(to_f64_vec(&select(s))?);
                rp.seconds[m] += ps.seconds[m];
            }
        }
        if rows.is_empty() {
            continue;
        }
        logits.push(cpu(&select(&out.logits)));
        if let Some(f) = &out.features {
            features.push(cpu(&select(f)));
        }
        for (l, t) in out.layers.iter().enumerate() {
            layers[l].push(cpu(&select(t)));
        }
        if let Some(r) = &out.rankfeat {
            rankfeat.push(cpu(&select(r)));
        }
        for &r in &rows {
            indices.push(first + batch.indices[r]);
            labels.push(batch.targets[r][0]);
        }
    }
    let cat = |v: &[Tensor]| -> Option<Tensor> { (!v.is_empty()).then(|| Tensor::cat(v, 0)) };
    let head = model.head_size();
    rp.shared_seconds = started.elapsed().as_secs_f64() - rp.seconds.iter().sum::<f64>();
    let ex = Extracted {
        indices,
        labels,
        logits: cat(&logits)
            .unwrap_or_else(|| Tensor::zeros([0, head], (Kind::Float, Device::Cpu))),
        features: if opts.layers.features {
            Some(cat(&features).unwrap_or_else(|| {
                Tensor::zeros([0, model.feature_dim()], (Kind::Float, Device::Cpu))
            }))
        } else {
            None
        },
        layers: if opts.layers.mahalanobis {
            let ch = model.variant().feature_channels();
            layers
                .iter()
                .enumerate()
                .map(|(l, v)| {
                    cat(v).unwrap_or_else(|| Tensor::zeros([0, ch[l]], (Kind::Float, Device::Cpu)))
                })
                .collect()
        } else {
            Vec::new()
        },
        rankfeat: opts.layers.rankfeat.then(|| {
            cat(&rankfeat).unwrap_or_else(|| Tensor::zeros([0, head], (Kind::Float, Device::Cpu)))
        }),
        skipped,
    };
    Ok((ex, rp))
}
