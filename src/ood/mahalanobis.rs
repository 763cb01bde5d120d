//! The Mahalanobis score (Lee et al. 2018) as the original runs it
//! (docs/scores.md#mahalanobis, docs/mahalanobis.md).
//!
//! - [`ClassStats`] -> [`LayerParams`]: class means and the tied precision per
//!   feature layer, the original's `utils/mahalanobis_lib.py::sample_estimator`
//!   (docs/mahalanobis.md#class-statistics), with [`pinvh`] as `scipy.linalg.pinvh`.
//! - [`GaussianLayer`], [`class_scores`], [`mahalanobis_layer_score`],
//!   [`mahalanobis_features`]: `get_Mahalanobis_score` (docs/scores.md#mahalanobis):
//!   per layer, input pre-processing x~ = x - magnitude * sign(d loss / dx) with
//!   loss = batch mean of 1/2 (f - mu_c*)^T P (f - mu_c*) (the original's
//!   `torch.mean(-pure_gau)`, so the step lowers the distance and raises the
//!   score), then m_l = max_c s_c(f(x~)).
//! - [`regressor_features`], [`score_from_regression`]: M = (m_0..m_4) and
//!   -P(OOD) of the logistic regression (ID labelled 0, adversarial 1).
//! - [`fgsm_adversarial`]: the fake OOD images of `tune_mahalanobis_hyperparameter.py`
//!   (docs/mahalanobis.md#tuning).
//!
//! Differences from the original, all numerical: everything is float64 (the
//! original scores in float32 and returns M as float32; its covariance is float64);
//! [`ClassStats`] streams sums instead of concatenating the features and centres in
//! float64 (the original centres float32 features by float32 means); class scores
//! come from matrix products instead of the diagonal of an N x N matrix per class.
//!
//! Only tch, std and thiserror are used, so the file stands alone.
use tch::{Device, Kind, Reduction, Tensor};

/// Why a Mahalanobis step could not be done. Messages name the argument.
#[derive(Debug, thiserror::Error)]
pub enum MahalanobisError {
    /// A tensor has the wrong rank, size or kind.
    #[error("{0}")]
    Shape(String),
    /// An argument, a label or the model's behaviour is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A class has no training sample, so it has no mean.
    #[error(
        "Mahalanobis statistics, layer {layer}: class {class} has no training image \
         (every one of the {num_classes} classes needs at least one for its mean)"
    )]
    EmptyClass {
        layer: usize,
        class: i64,
        num_classes: i64,
    },
    /// libtorch refused an operation.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result of this module's functions.
pub type Result<T> = std::result::Result<T, MahalanobisError>;

/// FGSM step of the fake OOD images (`adv_noise` in the original; docs/mahalanobis.md#tuning).
pub const FGSM_STEP: f64 = 0.05;

/// Noise magnitudes tried by the tuning, in the original's order (docs/mahalanobis.md#tuning).
pub const TUNING_MAGNITUDES: [f64; 7] = [0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005];

const F64: Kind = Kind::Double;

fn shape_err<T>(msg: String) -> Result<T> {
    Err(MahalanobisError::Shape(msg))
}

/// Checks that a step size is a non-negative finite number.
fn check_step(step: f64, what: &str) -> Result<()> {
    if step.is_finite() && step >= 0.0 {
        Ok(())
    } else {
        Err(MahalanobisError::Invalid(format!(
            "{what} must be a non-negative number, got {step}"
        )))
    }
}

/// Checks a floating-point matrix [N, D] with D >= 1; returns (N, D).
fn check_matrix(t: &Tensor, what: &str) -> Result<(i64, i64)> {
    match t.size()[..] {
        [n, d] if d >= 1 && t.is_floating_point() => Ok((n, d)),
        _ => shape_err(format!(
            "{what}: expected a floating-point matrix [N, D] with D >= 1, got {:?} of shape {:?}",
            t.kind(),
            t.size()
        )),
    }
}

/// Checks integer labels [n] in 0..num_classes; returns them as int64 on `device`.
fn check_labels(labels: &Tensor, n: i64, num_classes: i64, device: Device) -> Result<Tensor> {
    let integer = matches!(
        labels.kind(),
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    );
    if labels.size() != [n] || !integer {
        return shape_err(format!(
            "labels: expected integers [{n}], got {:?} of shape {:?}",
            labels.kind(),
            labels.size()
        ));
    }
    let labels = labels.to_device(device).to_kind(Kind::Int64);
    if n > 0 {
        let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
        if lo < 0 || hi >= num_classes {
            return Err(MahalanobisError::Invalid(format!(
                "labels: values must lie in 0..{num_classes}, got {lo}..={hi}"
            )));
        }
    }
    Ok(labels)
}

/// Streaming sums of one layer, relative to `shift` (the first batch's mean), so
/// that the second moments do not cancel catastrophically.
#[derive(Debug)]
struct LayerSums {
    shift: Tensor,  // [D]
    counts: Tensor, // [C] int64
    sums: Tensor,   // [C, D]: sum of (f - shift) per class
    outer: Tensor,  // [D, D]: sum of (f - shift)(f - shift)^T
}

/// Class means and the tied covariance of `sample_estimator`, accumulated in one
/// pass in float64: per layer, class counts, per-class feature sums [C, D] and the
/// sum of outer products [D, D] (never the features themselves). The sums live on
/// the device of the layer's first batch.
#[derive(Debug)]
pub struct ClassStats {
    num_classes: i64,
    layers: Vec<Option<LayerSums>>,
}

/// The Gaussian parameters of one layer: class means [C, D] and the tied
/// precision [D, D], both float64 on the CPU.
#[derive(Debug)]
pub struct LayerParams {
    pub mean: Tensor,
    pub precision: Tensor,
}

impl ClassStats {
    /// Empty statistics for `num_layers` layers and `num_classes` classes.
    pub fn new(num_layers: usize, num_classes: i64) -> Result<Self> {
        if num_layers == 0 || num_classes < 1 {
            return Err(MahalanobisError::Invalid(format!(
                "Mahalanobis statistics need at least one layer and one class, got \
                 {num_layers} layers and {num_classes} classes"
            )));
        }
        let layers = (0..num_layers).map(|_| None).collect();
        Ok(Self {
            num_classes,
            layers,
        })
    }

    /// Adds the features [N, D] (float32 or float64, any device) of layer `layer`
    /// for N images with class labels `[N]` (integers in 0..C).
    pub fn add_batch(&mut self, layer: usize, feats: &Tensor, labels: &Tensor) -> Result<()> {
        let num_layers = self.layers.len();
        let what = format!("Mahalanobis statistics, layer {layer}");
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            MahalanobisError::Invalid(format!("{what}: there are only {num_layers} layers"))
        })?;
        let (n, d) = check_matrix(feats, &what)?;
        let feats = feats.detach().to_kind(F64);
        let num_classes = self.num_classes;
        let acc = slot.get_or_insert_with(|| {
            let device = feats.device();
            LayerSums {
                shift: if n > 0 {
                    feats.mean_dim(&[0i64][..], false, F64)
                } else {
                    Tensor::zeros([d], (F64, device))
                },
                counts: Tensor::zeros([num_classes], (Kind::Int64, device)),
                sums: Tensor::zeros([num_classes, d], (F64, device)),
                outer: Tensor::zeros([d, d], (F64, device)),
            }
        });
        let device = acc.shift.device();
        if acc.shift.size() != [d] {
            return shape_err(format!(
                "{what}: features have {d} dimensions, earlier batches had {:?}",
                acc.shift.size()
            ));
        }
        let labels = check_labels(labels, n, self.num_classes, device)?;
        let centred = feats.to_device(device) - &acc.shift;
        acc.counts += labels.bincount(None::<Tensor>, self.num_classes);
        let _ = acc.sums.index_add_(0, &labels, &centred);
        acc.outer += centred.tr().matmul(&centred);
        Ok(())
    }

    /// Adds one batch for every layer at once: `feats[l]` [N, D_l], labels `[N]`.
    pub fn add_layers(&mut self, feats: &[Tensor], labels: &Tensor) -> Result<()> {
        if feats.len() != self.layers.len() {
            return shape_err(format!(
                "Mahalanobis statistics: got features of {} layers, expected {}",
                feats.len(),
                self.layers.len()
            ));
        }
        for (layer, f) in feats.iter().enumerate() {
            self.add_batch(layer, f, labels)?;
        }
        Ok(())
    }

    /// Class means [C, D] and the covariance [D, D] of layer `layer` (float64, CPU):
    /// with S = sum over samples of (f - mu_c)(f - mu_c)^T
    ///   = sum (f - s)(f - s)^T - sum_c n_c (mu_c - s)(mu_c - s)^T
    /// and m = the mean of the centred features (0 up to rounding),
    /// cov = S / N - m m^T, sklearn's `EmpiricalCovariance(assume_centered=False)`.
    pub fn mean_and_covariance(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let Some(Some(acc)) = self.layers.get(layer) else {
            return Err(MahalanobisError::Invalid(format!(
                "Mahalanobis statistics, layer {layer}: no features were added"
            )));
        };
        let cpu = Device::Cpu;
        let counts = Vec::<i64>::try_from(acc.counts.to_device(cpu))?;
        if let Some(class) = counts.iter().position(|&c| c == 0) {
            return Err(MahalanobisError::EmptyClass {
                layer,
                class: class as i64,
                num_classes: self.num_classes,
            });
        }
        let total = counts.iter().sum::<i64>() as f64;
        let n_c = acc.counts.to_device(cpu).to_kind(F64).unsqueeze(1); // [C, 1]
        let sums = acc.sums.to_device(cpu);
        let rel = &sums / &n_c; // mu_c - shift
        let within = acc.outer.to_device(cpu) - (&rel * &n_c).tr().matmul(&rel);
        let m = (sums.sum_dim_intlist(&[0i64][..], false, F64)
            - (&rel * &n_c).sum_dim_intlist(&[0i64][..], false, F64))
            / total;
        let cov = within / total - m.unsqueeze(1).matmul(&m.unsqueeze(0));
        Ok((rel + acc.shift.to_device(cpu), cov))
    }

    /// Means and precisions (`pinvh` of the covariance) of every layer.
    pub fn finish(&self) -> Result<Vec<LayerParams>> {
        (0..self.layers.len())
            .map(|layer| {
                let (mean, cov) = self.mean_and_covariance(layer)?;
                let (precision, _rank) = pinvh(&cov)?;
                Ok(LayerParams { mean, precision })
            })
            .collect()
    }
}

/// Pseudo-inverse of a symmetric matrix [D, D] as `scipy.linalg.pinvh` with its
/// defaults (scipy 1.17): eigendecomposition from the lower triangle; eigenvalues
/// with |s| <= D * eps * max|s| are dropped (atol 0, rtol = D * eps); B = U
/// diag(1/s) U^T over the rest. Computed in float64, as sklearn hands pinvh a
/// float64 covariance (eps = 2.2e-16). Returns (B float64, rank).
pub fn pinvh(a: &Tensor) -> Result<(Tensor, i64)> {
    let (n, d) = check_matrix(a, "pinvh")?;
    if n != d {
        return shape_err(format!("pinvh: expected a square matrix, got {n} x {d}"));
    }
    let (s, u) = a.to_kind(F64).f_linalg_eigh("L")?;
    let cutoff = s.abs().max().double_value(&[]) * d as f64 * f64::EPSILON;
    let keep = s.abs().gt(cutoff);
    let rank = keep.sum(Kind::Int64).int64_value(&[]);
    let inv = s.reciprocal().where_self(&keep, &s.zeros_like());
    Ok(((&u * inv.unsqueeze(0)).matmul(&u.tr()), rank))
}

/// One layer's class-conditional Gaussians with a tied precision, prepared for
/// batched scoring: everything is float64 on the device of `mean`, centred on the
/// mean of the class means, with `mu_c^T P mu_c` precomputed.
#[derive(Debug)]
pub struct GaussianLayer {
    mean: Tensor,   // [C, D]
    p: Tensor,      // [D, D], symmetrised
    centre: Tensor, // [D]
    mcp: Tensor,    // [C, D]: (mu_c - centre)^T P
    mpm: Tensor,    // [C]: (mu_c - centre)^T P (mu_c - centre)
}

impl GaussianLayer {
    /// From class means [C, D] and a precision [D, D] (any float kind). The
    /// precision is symmetrised, (P + P^T) / 2, which leaves quadratic forms unchanged.
    pub fn new(mean: &Tensor, precision: &Tensor) -> Result<Self> {
        let (_, d) = check_matrix(mean, "Mahalanobis class means")?;
        let (pr, pc) = check_matrix(precision, "Mahalanobis precision")?;
        if (pr, pc) != (d, d) {
            return shape_err(format!(
                "Mahalanobis precision: expected [{d}, {d}] for means with {d} dimensions, got [{pr}, {pc}]"
            ));
        }
        let mean = mean.detach().to_kind(F64);
        let p = precision.detach().to_device(mean.device()).to_kind(F64);
        let p = (&p + p.tr()) * 0.5;
        let centre = mean.mean_dim(&[0i64][..], false, F64);
        let mc = &mean - &centre;
        let mcp = mc.matmul(&p);
        let mpm = (&mcp * &mc).sum_dim_intlist(&[1i64][..], false, F64);
        Ok(Self {
            mean,
            p,
            centre,
            mcp,
            mpm,
        })
    }

    /// Number of classes and of feature dimensions.
    pub fn dims(&self) -> (i64, i64) {
        let s = self.mean.size();
        (s[0], s[1])
    }

    fn features(&self, feats: &Tensor, what: &str) -> Result<Tensor> {
        let (_, d) = check_matrix(feats, what)?;
        if d != self.dims().1 {
            return shape_err(format!(
                "{what}: features have {d} dimensions, the class means {}",
                self.dims().1
            ));
        }
        Ok(feats.to_device(self.mean.device()).to_kind(F64))
    }

    /// s_c = -1/2 (f - mu_c)^T P (f - mu_c) for features [N, D] -> [N, C] float64,
    /// as f'^T P f' - 2 f'^T P mu'_c + mu'_c^T P mu'_c with f' = f - centre.
    pub fn class_scores(&self, feats: &Tensor) -> Result<Tensor> {
        let f = self.features(feats, "Mahalanobis class scores")? - &self.centre;
        let ff = (f.matmul(&self.p) * &f).sum_dim_intlist(&[1i64][..], true, F64);
        Ok((ff - f.matmul(&self.mcp.tr()) * 2.0 + self.mpm.unsqueeze(0)) * -0.5)
    }

    /// max_c s_c: [N, D] -> `[N]` float64.
    pub fn max_score(&self, feats: &Tensor) -> Result<Tensor> {
        Ok(self.class_scores(feats)?.amax(1, false))
    }

    /// The loss of the input pre-processing, differentiable in `feats`: the batch
    /// mean of 1/2 (f - mu_c*)^T P (f - mu_c*) with c* = argmax_c s_c (the
    /// original's `torch.mean(-pure_gau)`).
    pub fn loss(&self, feats: &Tensor) -> Result<Tensor> {
        let best = tch::no_grad(|| self.class_scores(feats))?.argmax(1, false);
        let z = self.features(feats, "Mahalanobis loss")? - self.mean.index_select(0, &best);
        Ok((z.matmul(&self.p) * &z)
            .sum_dim_intlist(&[1i64][..], false, F64)
            .mean(F64)
            * 0.5)
    }
}

/// Class scores s_c = -1/2 (f - mu_c)^T P (f - mu_c): feats [N, D], mean [C, D],
/// precision [D, D] -> [N, C] float64. For repeated use build a [`GaussianLayer`].
pub fn class_scores(feats: &Tensor, mean: &Tensor, precision: &Tensor) -> Result<Tensor> {
    GaussianLayer::new(mean, precision)?.class_scores(feats)
}

/// d loss / dx. Only the input's gradient is computed; works inside `no_grad`.
fn input_gradient(
    what: &str,
    x: &Tensor,
    loss_of: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let input = x.detach().set_requires_grad(true);
    tch::with_grad(|| gradient_of(&loss_of(&input)?, &input, false, what))
}

/// d loss / d input (`input` a leaf that requires grad), with libtorch's engine
/// guarded: a loss without a graph is an error (the engine would crash), and so is
/// an input the loss does not depend on. `keep_graph` keeps the graph for further
/// gradients (the shared image pass of `mos benchmark` takes several).
pub fn gradient_of(loss: &Tensor, input: &Tensor, keep_graph: bool, what: &str) -> Result<Tensor> {
    if !loss.requires_grad() {
        return Err(MahalanobisError::Invalid(format!(
            "{what}: the loss does not depend on the input through a graph (the model \
             must not run under no_grad or detach its input)"
        )));
    }
    let mut grads = Tensor::f_run_backward(&[loss], &[input], keep_graph, false)?;
    let grad = grads.remove(0);
    if !grad.defined() {
        return Err(MahalanobisError::Invalid(format!(
            "{what}: the model's output does not depend on its input"
        )));
    }
    Ok(grad)
}

fn check_batch(out: &Tensor, x: &Tensor, what: &str) -> Result<()> {
    let (n, _) = check_matrix(out, what)?;
    let batch = x.size().first().copied().unwrap_or(-1);
    if n != batch {
        return shape_err(format!(
            "{what}: got {n} rows for a batch of {batch} inputs"
        ));
    }
    Ok(())
}

/// The pre-processed input x - magnitude * sign(d loss / dx) of
/// `get_Mahalanobis_score` for one layer (loss: [`GaussianLayer`]'s, on
/// `forward_layer(x)` [N, D]). The original steps by the plain sign; Lee et al.'s
/// deep_Mahalanobis_detector also divides the gradient by the normalisation std
/// per channel, which MOS's copy dropped (docs/scores.md#mahalanobis). Returns a detached tensor.
pub fn perturb_input(
    forward_layer: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    layer: &GaussianLayer,
    magnitude: f64,
) -> Result<Tensor> {
    check_step(magnitude, "Mahalanobis: the noise magnitude")?;
    let loss_of = |input: &Tensor| {
        let f = forward_layer(input);
        check_batch(&f, input, "Mahalanobis: the layer's features")?;
        layer.loss(&f)
    };
    let grad = input_gradient("Mahalanobis input pre-processing", x, &loss_of)?;
    Ok(crate::ood::scores::step_against_gradient(
        x, &grad, magnitude,
    ))
}

/// m_l = max_c s_c(f(x~)) with x~ the pre-processed input (x itself when
/// `magnitude` is 0: then no graph is built). `forward_layer`: x -> the
/// spatial-mean features [N, D] of the layer. Returns `[N]` float64.
pub fn mahalanobis_layer_score(
    forward_layer: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    layer: &GaussianLayer,
    magnitude: f64,
) -> Result<Tensor> {
    check_step(magnitude, "Mahalanobis: the noise magnitude")?;
    let input = if magnitude == 0.0 {
        x.shallow_clone()
    } else {
        perturb_input(forward_layer, x, layer, magnitude)?
    };
    layer_score_of(forward_layer, &input, layer)
}

/// m_l = max_c s_c(f(x~)) of an input already pre-processed, without a graph.
/// Returns `[N]` float64.
pub fn layer_score_of(
    forward_layer: &dyn Fn(&Tensor) -> Tensor,
    input: &Tensor,
    layer: &GaussianLayer,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let f = forward_layer(input);
        check_batch(&f, input, "Mahalanobis: the layer's features")?;
        layer.max_score(&f)
    })
}

/// M = (m_0..m_{L-1}) [N, L] float64 of `get_Mahalanobis_score`: each layer
/// pre-processes the input on its own. `forward_layer(l, x)`: features [N, D_l] of
/// layer l. With magnitude 0, [`regressor_features`] on one forward pass is cheaper.
pub fn mahalanobis_features(
    forward_layer: &dyn Fn(usize, &Tensor) -> Tensor,
    x: &Tensor,
    layers: &[GaussianLayer],
    magnitude: f64,
) -> Result<Tensor> {
    let cols = layers
        .iter()
        .enumerate()
        .map(|(l, g)| mahalanobis_layer_score(&|x: &Tensor| forward_layer(l, x), x, g, magnitude))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&cols, 1))
}

/// M [N, L] from features already computed (`feats[l]`: [N, D_l]), e.g. of one
/// forward pass when the magnitude is 0.
pub fn regressor_features(feats: &[Tensor], layers: &[GaussianLayer]) -> Result<Tensor> {
    if feats.len() != layers.len() || layers.is_empty() {
        return shape_err(format!(
            "Mahalanobis: {} feature layers for {} Gaussian layers",
            feats.len(),
            layers.len()
        ));
    }
    let cols = feats
        .iter()
        .zip(layers)
        .map(|(f, g)| tch::no_grad(|| g.max_score(f)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&cols, 1))
}

/// The score -P(OOD) = -sigmoid(M w + b) of the logistic regression (ID labelled
/// 0, adversarial 1; sklearn's binary `predict_proba(M)[:, 1]`): M [N, L] -> `[N]`
/// float64.
pub fn score_from_regression(m: &Tensor, w: &[f64], b: f64) -> Result<Tensor> {
    let (_, l) = check_matrix(m, "Mahalanobis regression features")?;
    if l as usize != w.len() {
        return shape_err(format!(
            "Mahalanobis regression: {l} features but {} weights",
            w.len()
        ));
    }
    let w = Tensor::from_slice(w).to_device(m.device());
    Ok(-(m.to_kind(F64).matmul(&w) + b).sigmoid())
}

/// FGSM fake-OOD images of the tuning (docs/mahalanobis.md#tuning): loss = batch-mean
/// cross-entropy of `forward_logits(x)` [N, K] against the labels `[N]`;
/// x_adv = clamp(x + step * sign(d loss / dx), 0, 1). The clamp to [0, 1] though
/// inputs lie in [-1, 1] is the original's. Returns a detached tensor like x.
pub fn fgsm_adversarial(
    forward_logits: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    labels: &Tensor,
    step: f64,
) -> Result<Tensor> {
    check_step(step, "FGSM: the step")?;
    let loss_of = |input: &Tensor| {
        let logits = forward_logits(input);
        check_batch(&logits, input, "FGSM: the model's logits")?;
        let (n, k) = (logits.size()[0], logits.size()[1]);
        let labels = check_labels(labels, n, k, logits.device())?;
        Ok(logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0))
    };
    let g = input_gradient("FGSM", x, &loss_of)?;
    let sign = g.ge(0.0).to_kind(x.kind()) * 2.0 - 1.0;
    Ok((x.detach() + sign * step).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU64: (Kind, Device) = (Kind::Double, Device::Cpu);

    use crate::ood::testutil::{check_each, get, to_vec, Rng, U32, U64};

    fn fixture() -> Vec<(String, Tensor)> {
        crate::ood::testutil::fixture("mahalanobis_stats.safetensors")
    }

    /// max |got - want| / max |want|, asserted <= tol; returns it.
    fn rel(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
        assert_eq!(got.size(), want.size(), "{what}: shapes differ");
        let want = want.to_kind(F64);
        let d = (got.to_kind(F64) - &want).abs().max().double_value(&[]);
        let r = d / want.abs().max().double_value(&[]).max(1e-300);
        eprintln!(
            "{what}: error {r:.3e} of the largest entry, tolerance {tol:.3e} (margin {:.1}x)",
            tol / r
        );
        assert!(r <= tol, "{what}: {r:e} > {tol:e}");
        r
    }

    /// max |f - s| over the features of layer l (every sample), s their mean:
    /// the size of the centred terms the statistics sum.
    fn spread(fx: &[(String, Tensor)], l: usize) -> f64 {
        let f = get(fx, &format!("feat{l}")).to_kind(F64);
        (&f - f.mean_dim(&[0i64][..], true, F64))
            .abs()
            .max()
            .double_value(&[])
    }

    /// Condition number of a covariance on the eigenvalues pinvh keeps.
    fn kept_condition(cov: &Tensor) -> f64 {
        let s = to_vec(&cov.linalg_eigvalsh("L").abs());
        let max = s.iter().cloned().fold(0.0, f64::max);
        let cutoff = max * s.len() as f64 * f64::EPSILON;
        let min = s
            .iter()
            .cloned()
            .filter(|v| *v > cutoff)
            .fold(max, f64::min);
        max / min
    }

    fn stats_of(fx: &[(String, Tensor)], batches: &[i64]) -> ClassStats {
        let labels = get(fx, "labels");
        let mut stats = ClassStats::new(5, 4).unwrap();
        let mut start = 0;
        for &n in batches {
            let feats: Vec<Tensor> = (0..5)
                .map(|l| get(fx, &format!("feat{l}")).narrow(0, start, n))
                .collect();
            stats
                .add_layers(&feats, &labels.narrow(0, start, n))
                .unwrap();
            start += n;
        }
        stats
    }

    #[test]
    fn means_covariance_and_precision_match_sklearn() {
        let fx = fixture();
        let stats = stats_of(&fx, &[24]);
        let params = stats.finish().unwrap();
        let n = 24.0;
        for (l, p) in params.iter().enumerate() {
            let (_, cov) = stats.mean_and_covariance(l).unwrap();
            let want_mean = get(&fx, &format!("mean{l}"));
            let want_cov = get(&fx, &format!("cov{l}"));
            let size = spread(&fx, l);
            // Sums of <= N centred terms of size `size`, both sides: (N + 3) u64 each.
            let scale = want_mean.abs().max().double_value(&[]);
            let tol = 2.0 * (n + 3.0) * U64 * (size + scale) / scale;
            rel(&format!("mean{l}"), &p.mean, &want_mean, tol);
            // Sums of <= N outer products of centred terms (<= size^2), less the
            // class-mean terms of the same size: (N + 3) u64 size^2 per side.
            let scale = want_cov.abs().max().double_value(&[]);
            let cov_tol = 2.0 * (n + 3.0) * U64 * size * size / scale;
            rel(&format!("cov{l}"), &cov, &want_cov, cov_tol);
            // The pseudo-inverse moves by the condition number (on the kept
            // eigenvalues) times the covariance's error plus eigh's, D u64 each side.
            let d = cov.size()[0] as f64;
            let prec_tol = kept_condition(&want_cov) * (cov_tol + 2.0 * d * U64) * 4.0;
            let want = get(&fx, &format!("precision{l}"));
            rel(&format!("precision{l}"), &p.precision, &want, prec_tol);
            let rank = get(&fx, &format!("rank{l}")).int64_value(&[]);
            assert_eq!(pinvh(&cov).unwrap().1, rank, "rank of layer {l}");
            assert_eq!((p.mean.kind(), p.precision.device()), CPU64);
        }
    }

    #[test]
    fn streaming_batches_equal_one_batch() {
        let fx = fixture();
        let one = stats_of(&fx, &[24]);
        let many = stats_of(&fx, &[5, 0, 1, 11, 7]);
        let n = 24.0;
        for l in 0..5 {
            let (mean_a, cov_a) = one.mean_and_covariance(l).unwrap();
            let (mean_b, cov_b) = many.mean_and_covariance(l).unwrap();
            // Another shift (the first batch's mean): the same sums rounded
            // differently, <= 2 (N + 3) u64 size (size + the first mean's offset).
            let size = 2.0 * spread(&fx, l);
            let scale = mean_a.abs().max().double_value(&[]);
            let tol = 2.0 * (n + 3.0) * U64 * (size + scale) / scale;
            rel(&format!("streamed mean{l}"), &mean_b, &mean_a, tol);
            let scale = cov_a.abs().max().double_value(&[]);
            let cov_tol = 2.0 * (n + 3.0) * U64 * size * size / scale;
            rel(&format!("streamed cov{l}"), &cov_b, &cov_a, cov_tol);
            let d = cov_a.size()[0] as f64;
            let prec_tol = kept_condition(&cov_a) * (cov_tol + 2.0 * d * U64) * 4.0;
            let (pa, pb) = (pinvh(&cov_a).unwrap().0, pinvh(&cov_b).unwrap().0);
            rel(&format!("streamed precision{l}"), &pb, &pa, prec_tol);
        }
    }

    #[test]
    fn pinvh_matches_scipy() {
        let fx = fixture();
        let a = get(&fx, "pinvh_a");
        let (b, rank) = pinvh(&a).unwrap();
        // Condition 5 / 1e-6 on the kept eigenvalues times eigh's backward error,
        // D u64 relative on each side.
        let tol = kept_condition(&a) * 2.0 * 10.0 * U64 * 4.0;
        rel("pinvh", &b, &get(&fx, "pinvh_b"), tol);
        assert_eq!(rank, get(&fx, "pinvh_rank").int64_value(&[]));
        // Only the lower triangle is read, as scipy's default: bit for bit the same.
        let upper = a.tril(0) + Tensor::ones([10, 10], CPU64).triu(1) * 1e3;
        assert!(pinvh(&upper).unwrap().0.equal(&b));
        assert!(pinvh(&Tensor::zeros([2, 3], CPU64)).is_err());
    }

    /// -1/2 (f - mu_c)^T P (f - mu_c), one class at a time, the direct way.
    fn direct_scores(f: &Tensor, mean: &Tensor, p: &Tensor) -> Tensor {
        let cols: Vec<Tensor> = (0..mean.size()[0])
            .map(|c| {
                let z = f.to_kind(F64) - mean.get(c);
                (z.matmul(p) * &z).sum_dim_intlist(&[1i64][..], false, F64) * -0.5
            })
            .collect();
        Tensor::stack(&cols, 1)
    }

    /// Bound on the float64 rounding of any form of -1/2 (f - mu_c)^T P (f - mu_c)
    /// (direct, diagonal of a product, or our centred expansion), both sides: <= 8 D
    /// u64 |P|_F (|f - centre| + |mu_c - centre|)^2 (|P|_F bounds the norm of |P|).
    fn score_rounding(f: &Tensor, mean: &Tensor, p: &Tensor) -> f64 {
        let norm = |t: &Tensor| t.square().sum_dim_intlist(&[1i64][..], false, F64).sqrt();
        let centre = mean.mean_dim(&[0i64][..], true, F64);
        let fc = norm(&(f.to_kind(F64) - &centre)).max().double_value(&[]);
        let mc = norm(&(mean - &centre)).max().double_value(&[]);
        let pf = p.square().sum(F64).sqrt().double_value(&[]);
        8.0 * p.size()[0] as f64 * U64 * pf * (fc + mc).powi(2)
    }

    #[test]
    fn batched_class_scores_match_the_direct_form() {
        let fx = fixture();
        for l in 0..5 {
            let f = get(&fx, &format!("feat{l}"));
            let mean = get(&fx, &format!("mean{l}"));
            let p = get(&fx, &format!("precision{l}"));
            let got = class_scores(&f, &mean, &p).unwrap();
            let want = get(&fx, &format!("class_scores{l}"));
            let tol = score_rounding(&f, &mean, &p) / want.abs().max().double_value(&[]);
            rel(&format!("class_scores{l} vs torch"), &got, &want, tol);
            let direct = direct_scores(&f, &mean, &p);
            rel(&format!("class_scores{l} vs direct"), &got, &direct, tol);
        }
        // Far from the origin and close to a mean: still accurate.
        let mut rng = Rng::new(11);
        let mean = rng.normal_tensor(&[3, 6], F64) + 1e4;
        let a = rng.normal_tensor(&[6, 6], F64);
        let p = a.matmul(&a.tr()) + Tensor::eye(6, CPU64);
        let f = mean.get(1).unsqueeze(0) + rng.normal_tensor(&[5, 6], F64) * 1e-3;
        let f = f.to_kind(Kind::Float);
        let got = class_scores(&f, &mean, &p).unwrap();
        let want = direct_scores(&f, &mean, &p);
        let tol = score_rounding(&f, &mean, &p) / want.abs().max().double_value(&[]);
        rel("far scores", &got, &want, tol);
    }

    #[test]
    fn bad_statistics_inputs_are_errors() {
        let mut stats = ClassStats::new(2, 3).unwrap();
        let f = Rng::new(3).normal_tensor(&[4, 5], Kind::Float);
        let labels = Tensor::from_slice(&[0i64, 1, 0, 1]);
        stats.add_batch(0, &f, &labels).unwrap();
        let err = stats.finish().unwrap_err().to_string();
        assert!(
            err.contains("layer 0: class 2 has no training image"),
            "{err}"
        );
        let bad = Tensor::from_slice(&[0i64, 1, 3, 1]);
        assert!(stats
            .add_batch(0, &f, &bad)
            .unwrap_err()
            .to_string()
            .contains("0..3"));
        let short = Tensor::from_slice(&[0i64, 1]);
        assert!(stats.add_batch(0, &f, &short).is_err());
        assert!(stats.add_batch(0, &f.narrow(1, 0, 4), &labels).is_err());
        assert!(stats.add_batch(2, &f, &labels).is_err());
        assert!(stats
            .add_batch(0, &f, &labels.to_kind(Kind::Float))
            .is_err());
        assert!(ClassStats::new(0, 3).is_err());
        assert!(stats.mean_and_covariance(1).is_err());
    }

    /// A linear "layer" x [N, 4] -> x W [N, 3] and its Gaussians (5 classes), from
    /// a generator of this test.
    fn linear(seed: u64) -> (Tensor, Tensor, GaussianLayer) {
        let mut rng = Rng::new(seed);
        let w = rng
            .normal_tensor(&[4, 3], Kind::Float)
            .set_requires_grad(true);
        let x = rng.normal_tensor(&[6, 4], Kind::Float);
        let a = rng.normal_tensor(&[3, 3], F64);
        let p = a.matmul(&a.tr()) + Tensor::eye(3, CPU64);
        let g = GaussianLayer::new(&rng.normal_tensor(&[5, 3], F64), &p).unwrap();
        (w, x, g)
    }

    /// max_c of [`direct_scores`] and the bound on its rounding.
    fn direct_max(f: &Tensor, g: &GaussianLayer) -> (Vec<f64>, f64) {
        let s = direct_scores(f, &g.mean, &g.p).amax(1, false);
        (to_vec(&s), score_rounding(f, &g.mean, &g.p))
    }

    /// Checks `got` [N] against `want` within `tol` each.
    fn check_all(what: &str, got: &Tensor, want: &[f64], tol: f64) {
        let errs: Vec<f64> = to_vec(got)
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .collect();
        check_each(what, &errs, &vec![tol; errs.len()]);
    }

    /// x - step sign(g) (+ when `up`) per entry, in float32 as the library steps,
    /// from the gradient `grad` [N, 4] in float64 and a bound `err` on the
    /// library's float32 gradient error per entry. Asserts that every |g| is at
    /// least 10x its bound, so that the signs are decided.
    fn signed_step(x: &Tensor, grad: &[f64], err: &[f64], step: f64, up: bool) -> Vec<f64> {
        let margin = grad
            .iter()
            .zip(err)
            .map(|(g, e)| g.abs() / e)
            .fold(f64::INFINITY, f64::min);
        eprintln!("smallest |gradient| / its float32 error bound: {margin:.1}");
        assert!(
            margin >= 10.0,
            "the test's input has a gradient near 0: {margin}"
        );
        let xs = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        xs.iter()
            .zip(grad)
            .map(|(x, g)| {
                let s = if *g >= 0.0 { step as f32 } else { -step as f32 };
                f64::from(if up { x + s } else { x - s })
            })
            .collect()
    }

    #[test]
    fn layer_score_steps_against_the_distance_gradient() {
        let (w, x, g) = linear(5);
        let f = |x: &Tensor| x.matmul(&w);
        let fx = tch::no_grad(|| f(&x));
        let s0 = mahalanobis_layer_score(&f, &x, &g, 0.0).unwrap();
        assert!(!s0.requires_grad() && !w.grad().defined());
        let (want0, tol) = direct_max(&fx, &g);
        check_all("magnitude 0", &s0, &want0, tol);
        // d loss / dx = P (f - mu_c*) W^T / N in float64 from the float32 f; the
        // library rounds P (f - mu_c*) / N to float32 (u32) and sums 3 float32
        // products (3 u32): error <= 4 u32 sum_k |(P z)_k W_ik| / N.
        let scores = direct_scores(&fx, &g.mean, &g.p);
        let sorted = scores.sort(1, true).0;
        let gap = (sorted.select(1, 0) - sorted.select(1, 1))
            .min()
            .double_value(&[]);
        assert!(
            gap >= 10.0 * tol,
            "the best class is not decided: {gap} vs {tol}"
        );
        let best = scores.argmax(1, false);
        let z = fx.to_kind(F64) - g.mean.index_select(0, &best);
        let pz = z.matmul(&g.p) / 6.0;
        let wd = w.detach().to_kind(F64);
        let grad = to_vec(&pz.matmul(&wd.tr()));
        let err = to_vec(&(pz.abs().matmul(&wd.abs().tr()) * (4.0 * U32)));
        let mag = 0.01;
        let want_x = signed_step(&x, &grad, &err, mag, false);
        let got_x = perturb_input(&f, &x, &g, mag).unwrap();
        assert_eq!(to_vec(&got_x), want_x, "perturbed input");
        let s = tch::no_grad(|| mahalanobis_layer_score(&f, &x, &g, mag)).unwrap();
        assert!(!s.requires_grad() && !w.grad().defined());
        let xp = Tensor::from_slice(&want_x)
            .reshape([6, 4])
            .to_kind(Kind::Float);
        let (want, tol) = direct_max(&tch::no_grad(|| f(&xp)), &g);
        check_all("perturbed score", &s, &want, tol);
        assert!(bool::try_from(s.gt_tensor(&s0).all()).unwrap());
        // M and the regression score.
        let both = [g, linear(6).2];
        let layer = |_: usize, x: &Tensor| x.matmul(&w);
        let m = mahalanobis_features(&layer, &x, &both, 0.0).unwrap();
        assert_eq!(m.size(), [6, 2]);
        for (l, g) in both.iter().enumerate() {
            let (want, tol) = direct_max(&fx, g);
            check_all(&format!("M column {l}"), &m.select(1, l as i64), &want, tol);
        }
        let (wr, br) = ([0.5, -0.25], 0.1);
        let score = to_vec(&score_from_regression(&m, &wr, br).unwrap());
        let (mut errs, mut tols) = (vec![], vec![]);
        for (row, got) in to_vec(&m).chunks(2).zip(&score) {
            let z = wr[0] * row[0] + wr[1] * row[1] + br;
            let sig = 1.0 / (1.0 + (-z).exp());
            errs.push((got + sig).abs());
            // z: 2 products and 2 sums per side; the sigmoid: a few u64 relative.
            let size = (wr[0] * row[0]).abs() + (wr[1] * row[1]).abs() + br;
            tols.push(sig * (1.0 - sig) * 2.0 * 4.0 * U64 * size + 2.0 * 4.0 * U64 * sig);
        }
        check_each("regression score", &errs, &tols);
        assert!(score_from_regression(&m, &[0.5], 0.1).is_err());
    }

    #[test]
    fn gradient_failures_are_errors() {
        let (w, x, g) = linear(5);
        // No graph at all (tch would crash in run_backward): an error.
        let no_graph = |x: &Tensor| tch::no_grad(|| x.matmul(&w));
        let err = mahalanobis_layer_score(&no_graph, &x, &g, 0.01).unwrap_err();
        assert!(err.to_string().contains("graph"), "{err}");
        let err = fgsm_adversarial(
            &no_graph,
            &x,
            &Tensor::zeros([6], (Kind::Int64, Device::Cpu)),
            0.05,
        );
        assert!(err.unwrap_err().to_string().contains("graph"));
        // A graph that does not reach the input (undefined gradient): an error.
        let detached = |x: &Tensor| x.detach().matmul(&w);
        let err = mahalanobis_layer_score(&detached, &x, &g, 0.01).unwrap_err();
        assert!(
            err.to_string().contains("does not depend on its input"),
            "{err}"
        );
        let wrong = |x: &Tensor| x.matmul(&w).narrow(0, 0, 2);
        assert!(mahalanobis_layer_score(&wrong, &x, &g, 0.01).is_err());
        assert!(mahalanobis_layer_score(&wrong, &x, &g, 0.0).is_err());
        let f = |x: &Tensor| x.matmul(&w);
        assert!(mahalanobis_layer_score(&f, &x, &g, -0.1).is_err());
        assert!(mahalanobis_layer_score(&f, &x, &g, f64::NAN).is_err());
        assert!(GaussianLayer::new(&Tensor::zeros([2, 3], CPU64), &Tensor::eye(4, CPU64)).is_err());
    }

    #[test]
    fn fgsm_steps_along_the_cross_entropy_gradient_and_clamps() {
        let (w, x, _) = linear(5);
        let f = |x: &Tensor| x.matmul(&w);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 2, 1, 0]);
        let adv = fgsm_adversarial(&f, &x, &labels, FGSM_STEP).unwrap();
        assert!(!adv.requires_grad() && !w.grad().defined());
        // d CE / dx = (softmax(f) - onehot) W^T / N in float64 from the float32 f.
        // The library's float32 softmax is off by <= p_j u32 (4 max|f| + 3 + 5)
        // (as for MSP), and each of the 3-term products and sums by u32.
        let fx = tch::no_grad(|| f(&x)).to_kind(F64);
        let p = fx.softmax(1, F64);
        let d = &p - labels.one_hot(3).to_kind(F64);
        let fmax = fx.abs().amax(1, true);
        let dp = &p * (fmax * 4.0 + 8.0) * U32 + d.abs() * (4.0 * U32);
        let wd = w.detach().to_kind(F64);
        let grad = to_vec(&(d.matmul(&wd.tr()) / 6.0));
        let err = to_vec(&(dp.matmul(&wd.abs().tr()) / 6.0));
        let want: Vec<f64> = signed_step(&x, &grad, &err, FGSM_STEP, true)
            .iter()
            .map(|v| v.clamp(0.0, 1.0))
            .collect();
        assert_eq!(to_vec(&adv), want, "fgsm");
        assert!(fgsm_adversarial(&f, &x, &labels.narrow(0, 0, 3), FGSM_STEP).is_err());
        assert!(fgsm_adversarial(&f, &x, &(labels + 1), FGSM_STEP).is_err());
    }
}
