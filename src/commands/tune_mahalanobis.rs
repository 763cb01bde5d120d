//! `mos tune-mahalanobis` (the original's tune_mahalanobis_hyperparameter.py,
//! docs/mahalanobis.md): class means and tied precisions from the training list in one streaming
//! pass (saved before the search, so a rerun resumes after it), FGSM fake OOD from
//! the validation list, the magnitude search with a cross-validated logistic
//! regression, and the parameters `test-baseline --score Mahalanobis` reads.
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::cli::TuneMahalanobisArgs;
use crate::data::list::flat_class_count;
use crate::data::loader::{Item, Loader, LoaderOptions, Mode};
use crate::data::read_flat_list;
use crate::data::ImageTransform;
use crate::logistic::fit_logistic_cv;
use crate::metrics::fpr95;
use crate::model::bit::spatial_mean;
use crate::model::checkpoint::{serialize, write_atomic};
use crate::model::weights::{load_model, with_head_hint};
use crate::model::Network;
use crate::ood::mahalanobis::{fgsm_adversarial, ClassStats, LayerParams, FGSM_STEP};
use crate::pipeline::score::image_pass::regression_inputs;
use crate::pipeline::score::mahalanobis_params::{
    gaussian_layers, named, read_layers, LAYERS, PARAMS,
};
use crate::runlog::RunLog;

/// Class statistics, saved after the first pass.
const STATS: &str = "mahalanobis_stats.safetensors";

/// The tensors `mean.{l}` and `precision.{l}` of the layers, as saved.
fn layer_tensors(params: &[LayerParams]) -> Vec<(String, Tensor)> {
    let mut t = Vec::with_capacity(2 * params.len());
    for (l, p) in params.iter().enumerate() {
        t.push((format!("mean.{l}"), p.mean.shallow_clone()));
        t.push((format!("precision.{l}"), p.precision.shallow_clone()));
    }
    t
}

fn items(list: &Path, datadir: &Path, flag: &str) -> Result<Vec<Item>> {
    Ok(read_flat_list(list, datadir)
        .with_context(|| flag.to_string())?
        .into_iter()
        .map(|e| Item {
            path: e.path,
            target: vec![e.label as i64],
        })
        .collect())
}

fn class_statistics(
    model: &Network,
    train: Vec<Item>,
    classes: i64,
    opts: LoaderOptions,
    transform: ImageTransform,
    device: Device,
    log: &RunLog,
) -> Result<Vec<LayerParams>> {
    let n = train.len() as u64;
    let loader = Loader::new(Arc::new(train), Mode::Eval(transform), opts)?;
    let bar = crate::progress::bar(n, "statistics");
    let mut stats = ClassStats::new(LAYERS, classes)?;
    for batch in loader {
        let batch = batch?;
        bar.inc((batch.len() + batch.skipped.len()) as u64);
        for s in &batch.skipped {
            log.line(format!(
                "skipped unreadable image {}: {}",
                s.path.display(),
                s.reason
            ));
        }
        if batch.is_empty() {
            continue;
        }
        let (x, y) = batch.to_tensors(device);
        let feats: Vec<Tensor> = tch::no_grad(|| model.forward_features(&x))
            .iter()
            .map(|f| spatial_mean(f).to_kind(Kind::Float))
            .collect();
        stats.add_layers(&feats, &y)?;
    }
    bar.finish_and_clear();
    Ok(stats.finish()?)
}

pub fn run(args: &TuneMahalanobisArgs) -> Result<()> {
    let dir = args.run.logdir.join(&args.run.name);
    let log = RunLog::open(&dir, "tune.log")?;
    let device = args.device.device.resolve()?;
    let m = args.num_lr_samples;
    if m == 0 {
        bail!("--num-lr-samples must be at least 1");
    }
    let magnitudes = &args.magnitudes;
    if magnitudes.is_empty() || magnitudes.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
        let list: Vec<String> = magnitudes.iter().map(f64::to_string).collect();
        bail!(
            "--magnitudes: expected non-negative numbers, got {}",
            list.join(",")
        );
    }
    let train = items(&args.train_list, &args.datadir, "--train-list")?;
    let val = items(&args.val_list, &args.datadir, "--val-list")?;
    if val.len() < 2 * m {
        bail!(
            "--val-list has {} images; the regression needs 2 x --num-lr-samples = {}",
            val.len(),
            2 * m
        );
    }
    let labels =
        |items: &[Item]| -> Vec<usize> { items.iter().map(|i| i.target[0] as usize).collect() };
    let classes = flat_class_count(&[
        ("--train-list", &args.train_list, &labels(&train)),
        ("--val-list", &args.val_list, &labels(&val)),
    ])? as i64;
    let loaded = load_model(
        &args.model_path,
        Some(args.model.model),
        Some(classes),
        device,
    )
    .map_err(|e| {
        with_head_hint(e, || {
            format!("tune-mahalanobis needs the flat-softmax checkpoint, one logit per class of the lists ({classes})")
        })
    })?;
    let model = &loaded.model;
    let transform = args.transform.resolve(args.model.model)?;
    log.line(format!(
        "mos tune-mahalanobis: model {} from {}, {} training and {} validation images, {classes} classes",
        args.model.model.name,
        args.model_path.display(),
        train.len(),
        val.len()
    ));
    let opts = LoaderOptions {
        batch: args.batch,
        workers: args.workers,
        prefetch: 2,
        skip_bad: false,
    };
    let stats_path = dir.join(STATS);
    let params = if stats_path.exists() {
        log.line(format!(
            "class statistics from {} (delete it to recompute)",
            stats_path.display()
        ));
        read_layers(&named(&stats_path)?, &stats_path, Some(args.model.model))?
    } else {
        let params = class_statistics(model, train, classes, opts, transform, device, &log)?;
        write_atomic(
            &stats_path,
            &serialize(&layer_tensors(&params), Default::default())?,
        )?;
        log.line(format!(
            "class statistics saved to {}",
            stats_path.display()
        ));
        params
    };
    let layers = gaussian_layers(&params, device)?;

    // M of the first 2m validation images and of their FGSM versions, per magnitude.
    let lr_items: Vec<Item> = val.into_iter().take(2 * m).collect();
    let loader = Loader::new(Arc::new(lr_items), Mode::Eval(transform), opts)?;
    let bar = crate::progress::bar((2 * m) as u64, "magnitudes");
    let (mut id_m, mut adv_m): (Vec<Vec<Tensor>>, Vec<Vec<Tensor>>) = (
        magnitudes.iter().map(|_| Vec::new()).collect(),
        magnitudes.iter().map(|_| Vec::new()).collect(),
    );
    for batch in loader {
        let batch = batch?;
        bar.inc(batch.len() as u64);
        let (x, y) = batch.to_tensors(device);
        let adv = fgsm_adversarial(&|t: &Tensor| model.forward(t), &x, &y, FGSM_STEP)?;
        for (k, &mag) in magnitudes.iter().enumerate() {
            id_m[k].push(regression_inputs(model, &layers, &x, mag)?.to_device(Device::Cpu));
            adv_m[k].push(regression_inputs(model, &layers, &adv, mag)?.to_device(Device::Cpu));
        }
    }
    bar.finish_and_clear();
    let rows = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
        let flat = Vec::<f64>::try_from(t.flatten(0, -1))?;
        Ok(flat.chunks(LAYERS).map(<[f64]>::to_vec).collect())
    };
    let mut best: Option<(usize, f64, crate::logistic::LogisticCv)> = None;
    let mut summary = Vec::new();
    for (k, &mag) in magnitudes.iter().enumerate() {
        let id = rows(&Tensor::cat(&id_m[k], 0))?;
        let adv = rows(&Tensor::cat(&adv_m[k], 0))?;
        let x: Vec<Vec<f64>> = id[..m].iter().chain(&adv[..m]).cloned().collect();
        let y: Vec<u8> = std::iter::repeat_n(0u8, m)
            .chain(std::iter::repeat_n(1u8, m))
            .collect();
        let lr = fit_logistic_cv(&x, &y)
            .with_context(|| format!("logistic regression at magnitude {mag}"))?;
        let score = |r: &[Vec<f64>]| -> Vec<f64> {
            r.iter()
                .map(|row| -lr.predict_proba_positive(row))
                .collect()
        };
        let fpr = fpr95(&score(&id[m..]), &score(&adv[m..]))?;
        log.line(format!(
            "magnitude {mag}: FPR95 {:.4} (C = {:.4e})",
            fpr, lr.best_c
        ));
        summary.push(serde_json::json!({"magnitude": mag, "fpr95": fpr, "C": lr.best_c, "fold_scores": lr.fold_scores}));
        if best.as_ref().is_none_or(|(_, f, _)| fpr < *f) {
            best = Some((k, fpr, lr));
        }
    }
    let (k, fpr, lr) = best.context("no magnitude tried")?;
    let magnitude = magnitudes[k];
    let mut t = layer_tensors(&params);
    t.push(("lr_weight".into(), Tensor::from_slice(&lr.coef)));
    t.push(("lr_bias".into(), Tensor::from_slice(&[lr.intercept])));
    t.push(("magnitude".into(), Tensor::from_slice(&[magnitude])));
    let path = dir.join(PARAMS);
    write_atomic(&path, &serialize(&t, Default::default())?)?;
    let json = serde_json::json!({
        "magnitude": magnitude, "fpr95": fpr, "C": lr.best_c, "lr_weight": lr.coef, "lr_bias": lr.intercept,
        "num_lr_samples": m, "magnitudes": summary, "model": args.model.model.name, "model_path": args.model_path,
    });
    write_atomic(
        &dir.join("mahalanobis.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    log.line(format!(
        "chose magnitude {magnitude} (FPR95 {fpr:.4}); parameters in {}",
        path.display()
    ));
    Ok(())
}
