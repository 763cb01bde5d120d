//! Tuned Mahalanobis parameters (`mos tune-mahalanobis`'s `mahalanobis.safetensors`,
//! docs/mahalanobis.md) and the Mahalanobis score of a batch of images with the
//! model (docs/scores.md#mahalanobis): read by test-baseline, `mos score` and the
//! tuning itself.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::mahalanobis_params::{check_layers, values};
use crate::model::bit::spatial_mean;
use crate::model::checkpoint;
use crate::model::{ResNetV2, Variant};
use crate::ood::mahalanobis::{
    mahalanobis_features, score_from_regression, GaussianLayer, LayerParams,
};

/// Feature layers: root and block1..block4.
pub const LAYERS: usize = 5;
/// The parameter file in the run directory.
pub const PARAMS: &str = "mahalanobis.safetensors";

/// Tuned Mahalanobis parameters as `test-baseline` uses them.
#[derive(Debug)]
pub struct MahalanobisParams {
    pub layers: Vec<GaussianLayer>,
    pub lr_weight: Vec<f64>,
    pub lr_bias: f64,
    pub magnitude: f64,
}

pub(crate) fn named(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(checkpoint::load(path)?.model)
}

/// The class means and precisions of `path`'s tensors `t`, checked (see
/// [`super::mahalanobis_params`]); with `variant`, against its layers' widths.
pub(crate) fn read_layers(
    t: &[(String, Tensor)],
    path: &Path,
    variant: Option<Variant>,
) -> Result<Vec<LayerParams>> {
    Ok(check_layers(t, LAYERS, path, variant)?
        .into_iter()
        .map(|(mean, precision)| LayerParams {
            mean: mean.to_kind(Kind::Double),
            precision: precision.to_kind(Kind::Double),
        })
        .collect())
}

/// The layers prepared for scoring on `device`.
pub(crate) fn gaussian_layers(
    params: &[LayerParams],
    device: Device,
) -> Result<Vec<GaussianLayer>> {
    Ok(params
        .iter()
        .map(|p| GaussianLayer::new(&p.mean.to_device(device), &p.precision.to_device(device)))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// Reads `mahalanobis.safetensors` (or the run directory holding it) onto `device`,
/// checking every tensor (see [`super::mahalanobis_params`]).
pub fn read_params(path: &Path, device: Device) -> Result<MahalanobisParams> {
    read_params_for(path, device, None)
}

/// [`read_params`], and with `variant` the class means' widths checked against its
/// layers.
pub fn read_params_for(
    path: &Path,
    device: Device,
    variant: Option<Variant>,
) -> Result<MahalanobisParams> {
    let file: PathBuf = if path.is_dir() {
        path.join(PARAMS)
    } else {
        path.to_path_buf()
    };
    let t = named(&file).context("--mahalanobis-param-path")?;
    let layers = gaussian_layers(&read_layers(&t, &file, variant)?, device)?;
    let lr_weight = values(
        &t,
        "lr_weight",
        &[&[LAYERS as i64], &[1, LAYERS as i64]],
        &file,
    )?;
    let lr_bias = values(&t, "lr_bias", &[&[1], &[]], &file)?[0];
    let magnitude = values(&t, "magnitude", &[&[1], &[]], &file)?[0];
    if magnitude < 0.0 {
        bail!(
            "{}: tensor 'magnitude' is {magnitude}; expected a non-negative number",
            file.display()
        );
    }
    Ok(MahalanobisParams {
        layers,
        lr_weight,
        lr_bias,
        magnitude,
    })
}

/// Layer-l features (spatial means, [N, D_l]) of `x`.
pub fn layer_features(model: &ResNetV2, l: usize, x: &Tensor) -> Tensor {
    spatial_mean(&model.forward_to(x, l)).to_kind(Kind::Float)
}

/// The Mahalanobis score of a batch (docs/scores.md#mahalanobis): M from the perturbed inputs, then
/// -P(OOD) of the logistic regression. [N] float64.
pub fn score(model: &ResNetV2, p: &MahalanobisParams, x: &Tensor) -> Result<Tensor> {
    let m = regression_inputs(model, &p.layers, x, p.magnitude)?;
    Ok(score_from_regression(&m, &p.lr_weight, p.lr_bias)?)
}

/// M [N, 5], rounded through float32 as the original feeds the regression.
pub(crate) fn regression_inputs(
    model: &ResNetV2,
    layers: &[GaussianLayer],
    x: &Tensor,
    magnitude: f64,
) -> Result<Tensor> {
    let m = mahalanobis_features(
        &|l, x: &Tensor| layer_features(model, l, x),
        x,
        layers,
        magnitude,
    )?;
    Ok(m.to_kind(Kind::Float).to_kind(Kind::Double))
}

/// The Mahalanobis score of a batch whose first forward pass was already run with
/// a graph from `input` (the batch `x` requiring grad): `feats[l]` are layer l's
/// features [N, D_l] of that pass. Each layer's input pre-processing takes its
/// gradient from that graph (kept for the other layers and methods), then its own
/// forward of the perturbed input: the same values as [`score`], whose first
/// forward per layer this pass replaces (docs/benchmark.md).
pub fn score_from_graph(
    model: &ResNetV2,
    p: &MahalanobisParams,
    x: &Tensor,
    input: &Tensor,
    feats: &[Tensor],
) -> Result<Tensor> {
    if feats.len() != p.layers.len() {
        bail!(
            "internal: {} feature layers for {} Gaussian layers",
            feats.len(),
            p.layers.len()
        );
    }
    let mut cols = Vec::with_capacity(feats.len());
    for (l, (f, g)) in feats.iter().zip(&p.layers).enumerate() {
        let loss = g.loss(f)?;
        let grad = crate::ood::mahalanobis::gradient_of(
            &loss,
            input,
            true,
            "Mahalanobis input pre-processing",
        )?;
        let perturbed = crate::ood::scores::step_against_gradient(x, &grad, p.magnitude);
        cols.push(crate::ood::mahalanobis::layer_score_of(
            &|t: &Tensor| layer_features(model, l, t),
            &perturbed,
            g,
        )?);
    }
    let m = Tensor::stack(&cols, 1)
        .to_kind(Kind::Float)
        .to_kind(Kind::Double);
    Ok(score_from_regression(&m, &p.lr_weight, p.lr_bias)?)
}
