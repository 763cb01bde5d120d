//! Post-hoc scores that lead the ImageNet OOD benchmarks after ViM and ASH
//! (docs/scores.md#leaderboard-methods): SCALE, NNGuide, fDBD, GEN, Residual,
//! NECO and Entropy, each for a whole batch at once from pre-logit features
//! h [N, D], logits f [N, C] and the head `f = h Wᵀ + b`, as their authors' code
//! computes them. Higher means more in-distribution. The training statistics
//! (NNGuide's guide bank, fDBD's mean feature, Residual's and NECO's subspaces)
//! are fitted by the `fit` functions here; reading stores and saving the fits is
//! `pipeline::score::posthoc_fit`'s job.
use tch::{Kind, Tensor};

use super::posthoc::{
    ash_keep, blockwise_top_k, check_features, check_percentile, residual_space, scatter_matrix,
    vim_origin, Head, KnnBlocks,
};
use super::{check_matrix, to_score_kind, OodError, Result};

/// `--scale-percentile`'s default, SCALE's ImageNet setting (its config and the
/// fitted postprocessor its repository ships).
pub const SCALE_PERCENTILE: f64 = 85.0;
/// `--nnguide-k`'s default (NNGuide's `configs/detector/nnguide.yaml`).
pub const NNGUIDE_K: i64 = 10;
/// NNGuide's ReAct quantile for ResNet-50 (`configs/model/resnet50-react.yaml`).
pub const NNGUIDE_CLIP_QUANTILE: f64 = 0.95;
/// `--gen-gamma`'s and `--gen-m`'s defaults (GEN's `benchmark.py`).
pub const GEN_GAMMA: f64 = 0.1;
pub const GEN_M: i64 = 100;
/// `--neco-dim`'s default (NECO's `test_all_ood.py`).
pub const NECO_DIM: i64 = 100;

/// Entropy: `Σ_k p_k log p_k` (the negative Shannon entropy, so that higher is
/// more in-distribution) with `0 log 0 = 0`, in float64. logits [N, C] -> [N].
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    check_matrix(logits, "Entropy logits")?;
    let logp = logits.to_kind(Kind::Double).log_softmax(1, None);
    // exp(-inf) = 0 and 0 · (the most negative double) = 0: no 0 · -inf.
    let p = logp.exp();
    Ok((p * logp.clamp_min(f64::MIN)).sum_dim_intlist(1, false, None))
}

/// GEN: `−Σ_{top M} p^γ (1 − p)^γ` over the M largest softmax probabilities (all C
/// when M >= C). Computed in float64 in the log domain, `p^γ = exp(γ log p)` and
/// `(1 − p)^γ = exp(γ log(1 − p))`, so that neither the small probabilities of the
/// tail (which γ = 0.1 weighs heavily: p = 1e-10 adds 0.1) nor `1 − p` of a
/// confident image are lost to rounding: `log(1 − p)` is `log(−expm1(log p))`
/// for every class but the most probable, whose `1 − p` (the other classes' mass,
/// below 1e-16 for a confident image, where `1 − p` rounds to 0 even in float64)
/// is their logsumexp minus the whole one. The original's float32 softmax loses
/// both (docs/scores.md). logits [N, C] -> [N].
pub fn gen(logits: &Tensor, gamma: f64, m: i64) -> Result<Tensor> {
    let (_, c) = check_matrix(logits, "GEN logits")?;
    check_gen(gamma, m)?;
    let x = logits.to_kind(Kind::Double);
    let (top1, at) = x.max_dim(1, true);
    // logsumexp of the other classes, and of all of them from it (log1p keeps
    // the others' share when it is below the float64 epsilon).
    let rest = x
        .scatter_value(1, &at, f64::NEG_INFINITY)
        .logsumexp(1, true);
    let lse = &top1 + (&rest - &top1).exp().log1p();
    let logp = &x - &lse;
    let (top, _) = logp.topk(m.min(c), 1, true, true);
    let log_q = (-top.expm1()).log();
    // Column 0 of the sorted top is the most probable class.
    log_q.narrow(1, 0, 1).copy_(&(&rest - &lse));
    Ok(-((top + log_q) * gamma)
        .exp()
        .sum_dim_intlist(1, false, None))
}

/// Checks GEN's γ > 0 and M >= 1.
pub fn check_gen(gamma: f64, m: i64) -> Result<()> {
    if !(gamma.is_finite() && gamma > 0.0) {
        return Err(OodError::Invalid(format!(
            "GEN: gamma must be a positive number, got {gamma}"
        )));
    }
    if m < 1 {
        return Err(OodError::Invalid(format!(
            "GEN: M must be at least 1, got {m}"
        )));
    }
    Ok(())
}

/// SCALE: with k = D − round(D p / 100) (a count, NumPy's rounding, as ASH),
/// `r = Σ h / Σ top-k(h)`, the energy `logsumexp(W (h · e^r) + b)`: the whole h is
/// scaled (ASH-S scales the pruned one). A row whose top k sum to 0 is an error
/// (the original divides by it). features [N, D] -> [N].
pub fn scale(features: &Tensor, head: &Head, p: f64) -> Result<Tensor> {
    check_percentile(p, "SCALE")?;
    let h = check_features(features, Some(head.dim()), None, "SCALE")?;
    let k = ash_keep(h.size()[1], p);
    let (top, _) = h.topk(k, 1, true, false);
    let after = top.sum_dim_intlist(1, true, None);
    let zero = after.eq(0.0).nonzero();
    if zero.size()[0] > 0 {
        return Err(OodError::Invalid(format!(
            "SCALE: row {} has top-{k} activations summing to 0, so e^(sum / top-k sum) is undefined",
            zero.int64_value(&[0, 0])
        )));
    }
    let r = h.sum_dim_intlist(1, true, None) / after;
    Ok(head.logits(&(&h * r.exp())).logsumexp(1, false))
}

/// fDBD's denominators `‖w_i − w_j‖₂` [C, C] in float64, the diagonal set to 1 (its
/// numerator is 0 there).
pub fn fdbd_denominators(head: &Head) -> Tensor {
    let w = head.weight.to_kind(Kind::Double);
    let sq = w.square().sum_dim_intlist(1, false, None);
    let gram = w.matmul(&w.tr());
    let d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - gram * 2.0).clamp_min(0.0);
    let c = head.classes();
    let mut den = d2.sqrt();
    let _ = den.fill_diagonal_(1.0, false);
    debug_assert_eq!(den.size(), [c, c]);
    den
}

/// fDBD: with c = argmax f, `Σ_{j≠c} |f_c − f_j| / ‖w_c − w_j‖` (the distances of h
/// to the decision boundaries of the predicted class, bias included) divided by
/// `‖h − μ‖`, μ the mean training feature; in float64. logits [N, C],
/// features [N, D], mean [D], denominators [C, C] of [`fdbd_denominators`] -> [N].
pub fn fdbd(logits: &Tensor, features: &Tensor, mean: &Tensor, den: &Tensor) -> Result<Tensor> {
    let (n, c) = check_matrix(logits, "fDBD logits")?;
    let d = mean.size()[0];
    let h = check_features(features, Some(d), Some(n), "fDBD")?;
    if den.size() != [c, c] {
        return Err(OodError::Shape(format!(
            "fDBD: {c} logits per image, the head has {} classes",
            den.size()[0]
        )));
    }
    let f = logits.to_kind(Kind::Double);
    let (fc, pred) = f.max_dim(1, true);
    let rows = den
        .to_device(f.device())
        .index_select(0, &pred.squeeze_dim(1));
    let dist = ((fc - &f).abs() / rows).sum_dim_intlist(1, false, None);
    let centred = h.to_kind(Kind::Double) - mean.to_device(h.device()).to_kind(Kind::Double);
    Ok(dist / centred.norm_scalaropt_dim(2, [1i64].as_slice(), false))
}

/// NNGuide's rows `h / max(‖h‖, 1e-12)` (`F.normalize`).
fn normalise(h: &Tensor) -> Tensor {
    let norm = h
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    h / norm
}

/// NNGuide's features and energies of h [N, D]: clipped at `clip` and put through
/// the head when a clip is given (its ResNet-50 "react" model), else the stored
/// logits' energy. Returns (normalised features, energy) in the kind of h.
fn nnguide_inputs(
    features: &Tensor,
    logits: &Tensor,
    head: Option<&Head>,
    clip: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let (n, _) = check_matrix(logits, "NNGuide logits")?;
    let h = check_features(features, head.map(|h| h.dim()), Some(n), "NNGuide")?;
    match clip {
        Some(c) => {
            let head = head.ok_or_else(|| {
                OodError::Invalid("NNGuide: clipping needs the head to recompute the logits".into())
            })?;
            let h = h.clamp_max(c);
            let energy = head.logits(&h).logsumexp(1, false);
            Ok((normalise(&h), energy))
        }
        None => Ok((
            normalise(&h),
            to_score_kind(logits).to_kind(h.kind()).logsumexp(1, false),
        )),
    }
}

/// NNGuide's guide bank from training features and logits: each normalised
/// feature times its own energy. `clip`: see [`nnguide`].
pub fn nnguide_bank(
    features: &Tensor,
    logits: &Tensor,
    head: Option<&Head>,
    clip: Option<f64>,
) -> Result<Tensor> {
    let (x, e) = nnguide_inputs(features, logits, head, clip)?;
    Ok(x * e.unsqueeze(1))
}

/// NNGuide: the mean of the k largest inner products of the normalised feature
/// with the guide bank ([`nnguide_bank`]), times the image's energy. With `clip`
/// (its ResNet-50 model), h is clipped at it first and the logits are the head's
/// on the clipped h, for bank and queries alike. Exact, in blocks of queries and
/// of the bank (memory `2048 × (k + 16384)` values for the similarities).
/// features [N, D], logits [N, C] -> [N].
pub fn nnguide(
    features: &Tensor,
    logits: &Tensor,
    head: Option<&Head>,
    clip: Option<f64>,
    bank: &Tensor,
    k: i64,
) -> Result<Tensor> {
    let (m, d) = check_matrix(bank, "NNGuide bank")?;
    if k < 1 || k > m {
        return Err(OodError::Invalid(format!(
            "NNGuide: k = {k} must be in 1..={m} (the guide bank's size)"
        )));
    }
    let (x, energy) = nnguide_inputs(features, logits, head, clip)?;
    if x.size()[1] != d {
        return Err(OodError::Shape(format!(
            "NNGuide: features of {} values, a bank of {d}",
            x.size()[1]
        )));
    }
    let best = blockwise_top_k(&x, bank, k, KnnBlocks::default(), true, |q, start, len| {
        q.matmul(&bank.narrow(0, start, len).tr())
    })?;
    let guidance = best
        .mean_dim(1, false, None)
        .to_device(energy.device())
        .to_kind(energy.kind());
    Ok(guidance * energy)
}

/// The eigenvectors of a symmetric matrix [D, D] sorted by descending eigenvalue
/// (float64), as ViM's and NECO's code order them.
fn descending_eigenvectors(cov: &Tensor) -> Result<Tensor> {
    let (_, vectors) = cov.f_linalg_eigh("L")?;
    Ok(vectors.flip([1]).contiguous())
}

/// Residual's fit: ViM's origin `u = −W⁺b` and the basis [D, D − dim] of what is
/// left after the `dim` leading eigenvectors of `E[(h − u)(h − u)ᵀ]` (not
/// re-centred), in float64. Needs more than `dim` rows.
pub fn residual_fit(features: &Tensor, head: &Head, dim: i64) -> Result<(Tensor, Tensor)> {
    let h = check_features(features, Some(head.dim()), None, "Residual training")?;
    let u = vim_origin(head)?.to_device(h.device());
    let ns = residual_space(&h, &u, dim, "Residual")?;
    Ok((u, ns))
}

/// Residual: `−‖(h − u) ns‖₂` with the fit of [`residual_fit`]. features [N, D] -> [N].
pub fn residual(features: &Tensor, u: &Tensor, ns: &Tensor) -> Result<Tensor> {
    let h = check_features(features, Some(u.size()[0]), None, "Residual")?;
    let u = u.to_device(h.device()).to_kind(h.kind());
    let ns = ns.to_device(h.device()).to_kind(h.kind());
    Ok(-(h - u)
        .matmul(&ns)
        .norm_scalaropt_dim(2, [1i64].as_slice(), false))
}

/// NECO's fit (float64): the standard scaler (mean, population standard deviation
/// with 1 where it is 0, as scikit-learn's `StandardScaler`), then the principal
/// axes of the scaled training features about their mean (scikit-learn's `PCA`),
/// the leading `dim` kept.
#[derive(Debug)]
pub struct NecoParams {
    pub mean: Tensor,
    pub std: Tensor,
    pub pca_mean: Tensor,
    /// [D, dim], by descending variance.
    pub components: Tensor,
}

/// Fits NECO on training features [N, D]. scikit-learn's `PCA(n_components=D)` of
/// the original needs N >= D rows; here the leading `dim` axes need only N > dim
/// rows (fewer leave them undetermined, refused).
pub fn neco_fit(features: &Tensor, dim: i64) -> Result<NecoParams> {
    let (n, d) = check_matrix(features, "NECO training features")?;
    if dim < 1 || dim > d {
        return Err(OodError::Invalid(format!(
            "NECO: the dimension must be in 1..={d} (the features' width), got {dim}"
        )));
    }
    if n <= dim {
        return Err(OodError::Invalid(format!(
            "NECO: {n} training rows, but {dim} principal axes need more than {dim} rows"
        )));
    }
    let mean = super::posthoc::feature_mean(features)?;
    let mut var = Tensor::zeros([d], (Kind::Double, features.device()));
    for x in features.split(8192, 0) {
        var += (x.to_kind(Kind::Double) - &mean)
            .square()
            .sum_dim_intlist(0, false, None);
    }
    let std = (var / n as f64).sqrt();
    let std = std.where_self(&std.ne(0.0), &std.ones_like());
    let z = (features.to_kind(Kind::Double) - &mean) / &std;
    let pca_mean = z.mean_dim(0, false, None);
    let cov = scatter_matrix(&z, &pca_mean);
    let components = descending_eigenvectors(&cov)?
        .narrow(1, 0, dim)
        .contiguous();
    Ok(NecoParams {
        mean,
        std,
        pca_mean,
        components,
    })
}

/// NECO: `‖first dim PCA coordinates of z‖ / ‖z‖`, z the scaled h, times the max
/// logit when `max_logit` (the original does so for every backbone but ResNets);
/// float64. features [N, D], logits [N, C] -> [N].
pub fn neco(features: &Tensor, logits: &Tensor, p: &NecoParams, max_logit: bool) -> Result<Tensor> {
    let (n, _) = check_matrix(logits, "NECO logits")?;
    let h = check_features(features, Some(p.mean.size()[0]), Some(n), "NECO")?;
    let dev = h.device();
    let z = (h.to_kind(Kind::Double) - p.mean.to_device(dev)) / p.std.to_device(dev);
    let coords = (&z - p.pca_mean.to_device(dev)).matmul(&p.components.to_device(dev));
    let one = [1i64];
    let ratio = coords.norm_scalaropt_dim(2, one.as_slice(), false)
        / z.norm_scalaropt_dim(2, one.as_slice(), false);
    Ok(if max_logit {
        ratio * logits.to_kind(Kind::Double).amax(1, false)
    } else {
        ratio
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn entropy_is_zero_for_a_certain_row_and_log_c_for_a_flat_one() {
        let l = Tensor::from_slice2(&[[0.0f32, 0.0, 0.0, 0.0], [1e4, 0.0, 0.0, 0.0]]);
        let e = Vec::<f64>::try_from(entropy(&l).unwrap()).unwrap();
        assert!((e[0] + 4f64.ln()).abs() < 1e-12, "{e:?}");
        assert_eq!(e[1], 0.0, "0 log 0 = 0, not NaN");
    }

    #[test]
    fn gen_keeps_the_tail_a_float32_softmax_loses() {
        // p of the second class is e^-200: 0 in float32, (e^-200)^0.1 = e^-20 here.
        let l = Tensor::from_slice2(&[[200.0f32, 0.0]]);
        let g = gen(&l, 0.1, 100).unwrap().double_value(&[0]);
        let want = -(2.0 * (-20.0f64).exp());
        assert!((g - want).abs() < 1e-15, "{g} vs {want}");
        assert!(gen(&l, 0.0, 1).is_err() && gen(&l, 0.1, 0).is_err());
    }

    #[test]
    fn scale_refuses_rows_without_activation() {
        let head = Head::new(
            &Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        )
        .unwrap();
        let h = Tensor::from_slice2(&[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]]);
        let e = scale(&h, &head, 50.0).unwrap_err().to_string();
        assert!(e.contains("row 1"), "{e}");
    }
}
