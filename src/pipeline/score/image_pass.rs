//! The methods that perturb the input images (ODIN with epsilon > 0, Mahalanobis
//! with a noise magnitude > 0): they need the model and the images, not only the
//! network's outputs, so they run on an extraction's batches ([`ImagePass`], a
//! [`BatchPass`] of [`super::super::extract`]) or, in `test-baseline`, a pass of
//! their own ([`mahalanobis`], [`crate::ood::odin`]). Both give the same values
//! (docs/benchmark.md).
use std::time::Instant;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::mahalanobis_params::MahalanobisParams;
use super::Method;
use crate::model::Network;
use crate::ood::mahalanobis::{mahalanobis_features, score_from_regression, GaussianLayer};
use crate::pipeline::extract::{BatchPass, Outputs, PassScores};
use crate::pipeline::vocab::Layers;

/// The methods that perturb the images (ODIN with epsilon > 0, Mahalanobis with
/// a magnitude > 0), run on the batches of an extraction: their first forward pass
/// (with a graph from the input) is the extraction's forward pass.
pub struct ImagePass<'a> {
    pub methods: &'a [Method],
}

impl BatchPass for ImagePass<'_> {
    fn len(&self) -> usize {
        self.methods.len()
    }

    fn forward(
        &self,
        model: &Network,
        x: &Tensor,
        layers: Layers,
    ) -> Result<(Outputs, PassScores)> {
        forward_with_pass(model, x, layers, self)
    }
}

/// One forward pass of `x` with a graph from the input, giving the outputs
/// `layers` asks for (the same values as [`forward_batch`]) and, from the same
/// graph, the input gradients of the image-pass methods, then their perturbed
/// forward passes. ODIN's loss is taken on the logits, Mahalanobis' per layer on
/// the layer's spatial mean, each gradient through the part of the graph its loss
/// depends on: the values of `test-baseline`'s separate passes
/// ([`crate::ood::odin`], [`mahalanobis`]).
pub fn forward_with_pass(
    model: &Network,
    x: &Tensor,
    layers: Layers,
    pass: &ImagePass,
) -> Result<(Outputs, PassScores)> {
    let maha = pass
        .methods
        .iter()
        .any(|m| matches!(m, Method::Mahalanobis(_)));
    let means_needed = maha || layers.mahalanobis;
    let input = x.detach().set_requires_grad(true);
    // As forward_batch computes them.
    let (logits, pooled, means, maps) =
        tch::with_grad(|| model.outputs_maps(&input, means_needed, layers.rankfeat));
    let mut scores = Vec::with_capacity(pass.methods.len());
    let mut seconds = Vec::with_capacity(pass.methods.len());
    for method in pass.methods {
        let t0 = Instant::now();
        let s = match method {
            Method::Odin {
                temperature,
                epsilon,
            } if *epsilon != 0.0 => {
                let loss = crate::ood::scores::odin_loss(&logits, *temperature);
                let grad = crate::ood::mahalanobis::gradient_of(&loss, &input, true, "ODIN")?;
                let perturbed = crate::ood::scores::step_against_gradient(x, &grad, *epsilon);
                crate::ood::scores::odin_score_of(
                    &|t: &Tensor| model.forward(t),
                    &perturbed,
                    *temperature,
                )?
            }
            Method::Mahalanobis(p) if p.magnitude != 0.0 => {
                mahalanobis_from_graph(model, p, x, &input, &means)?
            }
            other => bail!(
                "internal: {} does not perturb the images; it is scored from the outputs",
                other.name()
            ),
        };
        // Wait for the device so the time is the method's.
        let s = s.to_kind(Kind::Double);
        let _ = s.to_device(Device::Cpu);
        scores.push(s);
        seconds.push(t0.elapsed().as_secs_f64());
    }
    let outputs = Outputs {
        logits: logits.detach(),
        features: layers.features.then(|| pooled.detach()),
        layers: if layers.mahalanobis {
            means.iter().map(Tensor::detach).collect()
        } else {
            Vec::new()
        },
        rankfeat: maps.map(|(b3, b4)| {
            tch::no_grad(|| {
                model.rankfeat(&b3.detach(), &b4.detach(), layers.rankfeat_power_iterations)
            })
        }),
    };
    Ok((outputs, PassScores { scores, seconds }))
}

/// Layer-l features (spatial means, [N, D_l]) of `x`.
pub fn layer_features(model: &Network, l: usize, x: &Tensor) -> Tensor {
    model.layer_feature(&model.forward_to(x, l))
}

/// The Mahalanobis score of a batch (docs/scores.md#mahalanobis): M from the perturbed inputs, then
/// -P(OOD) of the logistic regression. [N] float64.
pub fn mahalanobis(model: &Network, p: &MahalanobisParams, x: &Tensor) -> Result<Tensor> {
    let m = regression_inputs(model, &p.layers, x, p.magnitude)?;
    Ok(score_from_regression(&m, &p.lr_weight, p.lr_bias)?)
}

/// M [N, 5], rounded through float32 as the original feeds the regression.
pub(crate) fn regression_inputs(
    model: &Network,
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
/// forward of the perturbed input: the same values as [`mahalanobis`], whose first
/// forward per layer this pass replaces (docs/benchmark.md).
pub fn mahalanobis_from_graph(
    model: &Network,
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
