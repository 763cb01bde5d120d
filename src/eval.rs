//! The one evaluation loop behind `test-mos` and `test-baseline`: every method
//! asked for is scored over the in- and the out-of-distribution set, methods that
//! need only logits sharing one forward pass per batch (docs/scores.md), then the
//! metrics of docs/metrics.md are computed once per method.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::data::loader::{Item, Loader, LoaderOptions, Mode, Skipped};
use crate::data::{EvalTransform, ImageFolder};
use crate::metrics::{ood_metrics, OodMetrics};
use crate::model::ResNetV2;
use crate::ood::{self, GroupSlices};

/// A scoring method with its settings.
#[derive(Debug, Clone)]
pub enum Method {
    /// MOS: `-min_g p_g(others)` of a group-softmax head.
    Mos(GroupSlices),
    Msp,
    Odin {
        temperature: f64,
        epsilon: f64,
    },
    Energy {
        temperature: f64,
    },
    KlDiv,
    /// Tuned parameters of `tune-mahalanobis`.
    Mahalanobis(std::rc::Rc<crate::commands::tune_mahalanobis::MahalanobisParams>),
}

impl Method {
    /// The name used in results (`MOS`, `MSP`, `ODIN`, `Energy`, `KL_Div`).
    pub fn name(&self) -> &'static str {
        match self {
            Method::Mos(_) => "MOS",
            Method::Msp => "MSP",
            Method::Odin { .. } => "ODIN",
            Method::Energy { .. } => "Energy",
            Method::KlDiv => "KL_Div",
            Method::Mahalanobis(_) => "Mahalanobis",
        }
    }

    /// Whether the method is a function of the shared forward pass's logits.
    fn uses_shared_logits(&self) -> bool {
        match self {
            Method::Odin { epsilon, .. } => *epsilon == 0.0,
            Method::Mahalanobis(_) => false,
            _ => true,
        }
    }
}

/// One evaluation set: an ImageFolder and its name (the folder's base name).
pub struct EvalSet {
    pub name: String,
    pub folder: ImageFolder,
}

impl EvalSet {
    pub fn open(dir: &std::path::Path, flag: &str) -> Result<Self> {
        let folder = ImageFolder::new(dir).with_context(|| format!("{flag} {}", dir.display()))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(EvalSet { name, folder })
    }

    fn items(&self) -> Arc<Vec<Item>> {
        Arc::new(
            self.folder
                .samples
                .iter()
                .map(|(p, l)| Item {
                    path: p.clone(),
                    target: vec![*l as i64],
                })
                .collect(),
        )
    }
}

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
    pub crop: usize,
    pub skip_bad: bool,
    pub device: Device,
}

fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )?)
}

/// Scores every image of `set` with every method.
pub fn score_split(
    model: &ResNetV2,
    set: &EvalSet,
    methods: &[Method],
    opts: &EvalOptions,
    label: &str,
) -> Result<SplitScores> {
    let items = set.items();
    let loader = Loader::new(
        items.clone(),
        Mode::Eval(EvalTransform { size: opts.crop }),
        LoaderOptions {
            batch: opts.batch,
            workers: opts.workers,
            prefetch: 2,
            skip_bad: opts.skip_bad,
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
        let logits = need_shared.then(|| tch::no_grad(|| model.forward(&x)));
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
    model: &ResNetV2,
    method: &Method,
    x: &Tensor,
    logits: Option<&Tensor>,
    probs: &mut Vec<Tensor>,
) -> Result<Tensor> {
    let shared = || logits.context("shared logits were not computed");
    Ok(match method {
        Method::Mos(groups) => groups.mos_score(shared()?)?,
        Method::Msp => ood::msp(shared()?)?,
        Method::Energy { temperature } => ood::energy(shared()?, *temperature)?,
        // With epsilon 0 the input is unchanged: the shared logits are ODIN's.
        Method::Odin {
            temperature,
            epsilon,
        } if *epsilon == 0.0 => ood::msp(&(shared()? / *temperature))?,
        Method::Odin {
            temperature,
            epsilon,
        } => ood::odin(&|t: &Tensor| model.forward(t), x, *temperature, *epsilon)?,
        Method::Mahalanobis(p) => crate::commands::tune_mahalanobis::score(model, p, x)?,
        Method::KlDiv => {
            // Scored once both sets are seen (the templates come from the ID set).
            probs.push(shared()?.softmax(1, Kind::Float).to_device(Device::Cpu));
            Tensor::zeros([x.size()[0]], (Kind::Double, Device::Cpu))
        }
    })
}

/// Fills in the KL-matching scores of both sets: templates from the ID set's
/// probabilities by ImageFolder label (docs/scores.md#kl-matching), then one matrix
/// product per set.
pub fn finish_kl(
    methods: &[Method],
    id: &mut SplitScores,
    ood_set: &mut SplitScores,
    num_classes: i64,
) -> Result<()> {
    let Some(m) = methods.iter().position(|m| matches!(m, Method::KlDiv)) else {
        return Ok(());
    };
    let start = Instant::now();
    let id_probs = Tensor::cat(&id.probs, 0);
    let labels = Tensor::from_slice(&id.labels);
    let templates = ood::kl_templates(&id_probs, &labels, num_classes)?;
    let ood_probs = Tensor::cat(&ood_set.probs, 0);
    for (split, probs) in [(&mut *id, id_probs), (&mut *ood_set, ood_probs)] {
        let mut scores = Vec::with_capacity(split.paths.len());
        for chunk in probs.split(4096, 0) {
            scores.extend(to_f64_vec(&ood::kl_score(&chunk, &templates)?)?);
        }
        split.scores[m] = scores;
        split.probs.clear();
    }
    let secs = start.elapsed().as_secs_f64() / 2.0;
    id.seconds[m] += secs;
    ood_set.seconds[m] += secs;
    Ok(())
}

/// The result of one method on one pair of sets (a row of `results.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MethodResult {
    pub method: String,
    pub in_dataset: String,
    pub out_dataset: String,
    pub num_in: usize,
    pub num_out: usize,
    pub auroc: f64,
    pub aupr_in: f64,
    pub aupr_out: f64,
    /// FPR at 95% ID recall (the paper's convention, ID positive).
    pub fpr95: f64,
    /// FPR at 95% OOD recall (OpenOOD v1.5's convention, OOD positive).
    pub fpr95_ood_positive: f64,
    pub seconds: f64,
    /// Images skipped as unreadable (`--skip-bad-images`), both sets.
    pub skipped: usize,
    pub model: String,
    pub model_path: String,
    pub settings: serde_json::Value,
}

/// Metrics of method `m` from the two sets' scores.
pub fn metrics_of(id: &SplitScores, ood_set: &SplitScores, m: usize) -> Result<OodMetrics> {
    if id.scores[m].is_empty() || ood_set.scores[m].is_empty() {
        bail!("no image was scored in one of the sets (all skipped?)");
    }
    Ok(ood_metrics(&id.scores[m], &ood_set.scores[m])?)
}
