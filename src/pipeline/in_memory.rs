//! The one evaluation loop behind `test-mos` and `test-baseline`: every method
//! asked for is scored over the in- and the out-of-distribution set, methods that
//! need only logits sharing one forward pass per batch (docs/scores.md), then the
//! metrics of docs/metrics.md are computed once per method. Each batch goes
//! through the pipeline's extract and score stages ([`super::extract`],
//! [`super::score`]), the functions `mos extract` and `mos score` use, in memory:
//! nothing is stored.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::data::loader::Skipped;
use crate::data::EvalSet;
use crate::metrics::{ood_metrics, OodMetrics};
use crate::model::Network;
use crate::ood;
use crate::pipeline::extract;
use crate::pipeline::score::{self, image_pass, Method};
use crate::pipeline::vocab::{to_f64_vec, Layers};

/// Scores of one set: per method, per kept image.
pub struct SplitScores {
    pub paths: Vec<PathBuf>,
    pub scores: Vec<Vec<f64>>,
    pub skipped: Vec<Skipped>,
    /// Seconds spent per method, the shared pass counted for every method using it.
    pub seconds: Vec<f64>,
    labels: Vec<i64>,
    probs: Vec<Tensor>,
}

/// Loader settings of an evaluation.
#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    pub batch: usize,
    pub workers: usize,
    /// The model's evaluation transform.
    pub transform: crate::data::ImageTransform,
    pub skip_bad: bool,
    pub device: Device,
}

/// Scores every image of `set` with every method.
pub fn score_split(
    model: &Network,
    set: &EvalSet,
    methods: &[Method],
    opts: &EvalOptions,
    label: &str,
) -> Result<SplitScores> {
    let items = std::sync::Arc::new(set.folder.items());
    let loader = extract::eval_loader(
        items.clone(),
        &extract::ExtractOptions {
            batch: opts.batch,
            workers: opts.workers,
            transform: opts.transform,
            skip_bad: opts.skip_bad,
            device: opts.device,
            layers: Layers::LOGITS,
        },
    )?;
    let bar = crate::progress::bar(items.len() as u64, label);
    let mut out = SplitScores {
        paths: Vec::with_capacity(items.len()),
        scores: vec![Vec::with_capacity(items.len()); methods.len()],
        skipped: Vec::new(),
        seconds: vec![0.0; methods.len()],
        labels: Vec::with_capacity(items.len()),
        probs: Vec::new(),
    };
    let need_shared = methods.iter().any(Method::uses_shared_logits);
    let mut waited = Instant::now();
    for batch in loader {
        let batch = batch?;
        bar.inc((batch.len() + batch.skipped.len()) as u64);
        out.skipped.extend(batch.skipped.iter().cloned());
        if batch.is_empty() {
            continue;
        }
        let (x, y) = batch.to_tensors(opts.device);
        model.check_input(&x)?;
        let logits = need_shared.then(|| extract::forward_batch(model, &x, Layers::LOGITS).logits);
        if let Some(l) = &logits {
            // Wait for the device so the timing below is per method.
            let _ = l.to_device(Device::Cpu);
        }
        let shared = waited.elapsed().as_secs_f64();
        for (m, method) in methods.iter().enumerate() {
            let start = Instant::now();
            let scores = score_batch(model, method, &x, logits.as_ref(), &mut out.probs)?;
            out.scores[m].extend(to_f64_vec(&scores)?);
            out.seconds[m] += start.elapsed().as_secs_f64();
            if method.uses_shared_logits() {
                out.seconds[m] += shared;
            }
        }
        out.labels
            .extend(Vec::<i64>::try_from(y.to_device(Device::Cpu))?);
        out.paths
            .extend(batch.indices.iter().map(|&i| items[i].path.clone()));
        waited = Instant::now();
    }
    bar.finish_and_clear();
    Ok(out)
}

fn score_batch(
    model: &Network,
    method: &Method,
    x: &Tensor,
    logits: Option<&Tensor>,
    probs: &mut Vec<Tensor>,
) -> Result<Tensor> {
    let shared = || logits.context("shared logits were not computed");
    Ok(match method {
        Method::Odin {
            temperature,
            epsilon,
        } if *epsilon != 0.0 => {
            ood::odin(&|t: &Tensor| model.forward(t), x, *temperature, *epsilon)?
        }
        Method::Mahalanobis(p) => image_pass::mahalanobis(model, p, x)?,
        Method::KlDiv => {
            // Scored once both sets are seen (the templates come from the ID set).
            probs.push(score::kl_probs(shared()?));
            Tensor::zeros([x.size()[0]], (Kind::Double, Device::Cpu))
        }
        _ => score::from_outputs(method, shared()?, &[])?,
    })
}

/// Fills in the KL-matching scores of the ID set and every OOD set: templates
/// from the ID set's probabilities by ImageFolder label
/// (docs/scores.md#kl-matching), then one matrix product per set.
pub fn finish_kl(
    methods: &[Method],
    id: &mut SplitScores,
    ood_sets: &mut [SplitScores],
    num_classes: i64,
) -> Result<()> {
    let Some(m) = methods.iter().position(|m| matches!(m, Method::KlDiv)) else {
        return Ok(());
    };
    let start = Instant::now();
    let id_probs = Tensor::cat(&id.probs, 0);
    let ood_probs: Vec<Tensor> = ood_sets.iter().map(|s| Tensor::cat(&s.probs, 0)).collect();
    let mut sets = vec![&id_probs];
    sets.extend(ood_probs.iter());
    let mut scores = score::kl_scores(&id_probs, &id.labels, num_classes, &sets)?.into_iter();
    id.scores[m] = scores.next().context("KL scores")?;
    id.probs.clear();
    for s in ood_sets.iter_mut() {
        s.scores[m] = scores.next().context("KL scores")?;
        s.probs.clear();
    }
    let secs = start.elapsed().as_secs_f64() / (1 + ood_sets.len()) as f64;
    id.seconds[m] += secs;
    for s in ood_sets.iter_mut() {
        s.seconds[m] += secs;
    }
    Ok(())
}

/// Metrics of method `m` from the two sets' scores.
pub fn metrics_of(id: &SplitScores, ood_set: &SplitScores, m: usize) -> Result<OodMetrics> {
    if id.scores[m].is_empty() || ood_set.scores[m].is_empty() {
        bail!("no image was scored in one of the sets (all skipped?)");
    }
    Ok(ood_metrics(&id.scores[m], &ood_set.scores[m])?)
}
