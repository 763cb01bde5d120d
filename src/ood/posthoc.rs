//! Post-hoc scores of later papers from a model's pre-logit features h [N, D],
//! logits f [N, C] and linear head `f = h Wᵀ + b` (docs/scores.md): MaxLogit,
//! GradNorm, ReAct, KNN, ViM, ASH-P/B/S and DICE, each for a whole batch at once,
//! in the kind of its inputs (float32 or float64) on their device. Higher means
//! more in-distribution. The training statistics some of them need (ReAct's
//! threshold, DICE's mean feature, ViM's subspace, KNN's bank) are computed by the
//! `fit` functions here from training features; reading stores and saving what was
//! fitted is `pipeline::score::posthoc_fit`'s job.
use tch::{Device, Kind, Tensor};

use super::{check_matrix, to_score_kind, OodError, Result};

/// The classifier head: `weight` [C, D], `bias` [C].
#[derive(Debug)]
pub struct Head {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Head {
    /// Checks the shapes (a BiT head's `[C, D, 1, 1]` 1x1 convolution weight is
    /// accepted and flattened).
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let size = weight.size();
        let weight = match size[..] {
            [_, _] => weight.shallow_clone(),
            [c, d, 1, 1] => weight.reshape([c, d]),
            _ => {
                return Err(OodError::Shape(format!(
                    "head weight: expected [C, D] or [C, D, 1, 1], got {size:?}"
                )))
            }
        };
        let (c, _) = check_matrix(&weight, "head weight")?;
        if bias.size() != [c] || !bias.is_floating_point() {
            return Err(OodError::Shape(format!(
                "head bias: expected a floating-point vector [{c}], got {:?} of shape {:?}",
                bias.kind(),
                bias.size()
            )));
        }
        Ok(Head {
            weight,
            bias: bias.shallow_clone(),
        })
    }

    /// C, the number of logits.
    pub fn classes(&self) -> i64 {
        self.weight.size()[0]
    }

    /// D, the width of the features.
    pub fn dim(&self) -> i64 {
        self.weight.size()[1]
    }

    /// The head in `kind` on `device`.
    pub fn to(&self, kind: Kind, device: Device) -> Head {
        Head {
            weight: self.weight.to_device(device).to_kind(kind),
            bias: self.bias.to_device(device).to_kind(kind),
        }
    }

    /// `h Wᵀ + b` in the kind of `h`.
    pub fn logits(&self, h: &Tensor) -> Tensor {
        let w = self.weight.to_device(h.device()).to_kind(h.kind());
        let b = self.bias.to_device(h.device()).to_kind(h.kind());
        b.addmm(h, &w.tr())
    }

    /// The head with every weight where `mask` is false set to zero.
    pub fn masked(&self, mask: &Tensor) -> Head {
        Head {
            weight: &self.weight
                * mask
                    .to_device(self.weight.device())
                    .to_kind(self.weight.kind()),
            bias: self.bias.shallow_clone(),
        }
    }
}

/// Checks features [N, D] against the head (D) and, if given, the logits (N).
pub(crate) fn check_features(
    features: &Tensor,
    d: Option<i64>,
    n: Option<i64>,
    what: &str,
) -> Result<Tensor> {
    let (rows, width) = check_matrix(features, &format!("{what} features"))?;
    if let Some(d) = d {
        if width != d {
            return Err(OodError::Shape(format!(
                "{what}: the features have {width} values per image, the head takes {d}"
            )));
        }
    }
    if let Some(n) = n {
        if rows != n {
            return Err(OodError::Shape(format!(
                "{what}: {rows} rows of features for {n} rows of logits"
            )));
        }
    }
    Ok(to_score_kind(features))
}

/// Checks a percentile in (0, 100).
pub fn check_percentile(p: f64, what: &str) -> Result<()> {
    if p.is_finite() && p > 0.0 && p < 100.0 {
        Ok(())
    } else {
        Err(OodError::Invalid(format!(
            "{what}: the percentile must be in (0, 100), got {p}"
        )))
    }
}

/// The energy `logsumexp(f)` (temperature 1) of logits [N, C] -> [N].
fn energy(logits: &Tensor) -> Tensor {
    logits.logsumexp(1, false)
}

/// MaxLogit: `max_k f_k`, logits [N, C] -> [N].
pub fn max_logit(logits: &Tensor) -> Result<Tensor> {
    check_matrix(logits, "MaxLogit logits")?;
    Ok(to_score_kind(logits).amax(1, false))
}

/// GradNorm (temperature 1) in closed form. The original takes, per image, the
/// L1 norm of the gradient of `L = Σ_c −log softmax(f)_c` with respect to the
/// head's weight W. With `f = W h + b`, `∂L/∂f_k = Σ_c (p_k − δ_ck) = C p_k − 1`
/// (p = softmax(f)) and `∂L/∂W_kj = (C p_k − 1) h_j`, so
/// `‖∂L/∂W‖₁ = (Σ_k |C p_k − 1|) (Σ_j |h_j|)`. logits [N, C], features [N, D] -> [N].
pub fn gradnorm(logits: &Tensor, features: &Tensor) -> Result<Tensor> {
    let (n, c) = check_matrix(logits, "GradNorm logits")?;
    let h = check_features(features, None, Some(n), "GradNorm")?;
    let p = to_score_kind(logits).softmax(1, None);
    let kind = p.kind();
    let dl_df = (p * c as f64 - 1.0).abs().sum_dim_intlist(1, false, None);
    Ok(dl_df * h.abs().sum_dim_intlist(1, false, None).to_kind(kind))
}

/// NumPy's `np.percentile(values, p)` (method "linear") over all entries of
/// `values`: the order statistics at `floor(i)` and `floor(i) + 1` of the sorted
/// values, i = (n − 1) p / 100, interpolated as NumPy does, in float64. Uses two
/// selections (`kthvalue`), not a full sort.
pub fn percentile(values: &Tensor, p: f64) -> Result<f64> {
    check_percentile(p, "percentile")?;
    let flat = values.flatten(0, -1);
    let n = flat.size()[0];
    if n == 0 {
        return Err(OodError::Invalid("percentile of no values".into()));
    }
    let index = (n - 1) as f64 * (p / 100.0);
    let lo = index.floor();
    let gamma = index - lo;
    let lo = lo as i64;
    let hi = (lo + 1).min(n - 1);
    let a = flat.kthvalue(lo + 1, 0, false).0.double_value(&[]);
    let b = if hi == lo {
        a
    } else {
        flat.kthvalue(hi + 1, 0, false).0.double_value(&[])
    };
    let diff = b - a;
    Ok(if gamma >= 0.5 {
        b - diff * (1.0 - gamma)
    } else {
        a + diff * gamma
    })
}

/// ReAct: the energy of the head applied to `min(h, threshold)`. features [N, D] -> [N].
pub fn react(features: &Tensor, head: &Head, threshold: f64) -> Result<Tensor> {
    let h = check_features(features, Some(head.dim()), None, "ReAct")?;
    if !threshold.is_finite() {
        return Err(OodError::Invalid(format!(
            "ReAct: the clipping threshold must be finite, got {threshold}"
        )));
    }
    Ok(energy(&head.logits(&h.clamp_max(threshold))))
}

/// The ASH variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ash {
    /// Keep the top k activations, zero the rest.
    P,
    /// The top k activations all set to (sum before pruning) / k.
    B,
    /// The pruned vector times exp(sum before / sum after).
    S,
}

impl Ash {
    /// `ASH-P`, `ASH-B`, `ASH-S`.
    pub fn name(self) -> &'static str {
        match self {
            Ash::P => "ASH-P",
            Ash::B => "ASH-B",
            Ash::S => "ASH-S",
        }
    }
}

/// The activations ASH keeps of n at percentile p: `n − round(n p / 100)`, with
/// NumPy's rounding (half to even); at least 1.
pub fn ash_keep(n: i64, p: f64) -> i64 {
    let pruned = (n as f64 * p / 100.0).round_ties_even() as i64;
    (n - pruned).max(1)
}

/// ASH's activation shaping of features [N, D] (each row on its own).
pub fn ash_shape(features: &Tensor, variant: Ash, p: f64) -> Result<Tensor> {
    check_percentile(p, variant.name())?;
    let h = check_features(features, None, None, variant.name())?;
    let k = ash_keep(h.size()[1], p);
    let (values, index) = h.topk(k, 1, true, false);
    let sum = h.sum_dim_intlist(1, true, None);
    Ok(match variant {
        Ash::P => h.zeros_like().scatter(1, &index, &values),
        Ash::B => {
            let fill = (sum / k as f64).expand_as(&values);
            h.zeros_like().scatter(1, &index, &fill)
        }
        Ash::S => {
            let after = values.sum_dim_intlist(1, true, None);
            h.zeros_like().scatter(1, &index, &values) * (sum / after).exp()
        }
    })
}

/// ASH: the energy of the head on the shaped features. features [N, D] -> [N].
pub fn ash(features: &Tensor, head: &Head, variant: Ash, p: f64) -> Result<Tensor> {
    let _ = check_features(features, Some(head.dim()), None, variant.name())?;
    Ok(energy(&head.logits(&ash_shape(features, variant, p)?)))
}

/// The mean of features [N, D] over the rows, in float64 (blocks of rows, so a
/// float32 set is never copied whole): DICE's `m`.
pub fn feature_mean(features: &Tensor) -> Result<Tensor> {
    let (n, d) = check_matrix(features, "mean features")?;
    if n == 0 {
        return Err(OodError::Invalid("the mean of no features".into()));
    }
    let mut sum = Tensor::zeros([d], (Kind::Double, features.device()));
    for x in features.split(8192, 0) {
        sum += x.to_kind(Kind::Double).sum_dim_intlist(0, false, None);
    }
    Ok(sum / n as f64)
}

/// DICE's weight mask: contribution `m ⊙ W` (m = the mean training feature [D],
/// broadcast over the C rows), kept where it is above its p-th percentile (over
/// all C·D entries, computed in float64).
pub fn dice_mask(head: &Head, mean: &Tensor, p: f64) -> Result<Tensor> {
    check_percentile(p, "DICE")?;
    if mean.size() != [head.dim()] {
        return Err(OodError::Shape(format!(
            "DICE: the mean feature has shape {:?}, the head takes {} values",
            mean.size(),
            head.dim()
        )));
    }
    let w = head.weight.to_kind(Kind::Double);
    let contrib = mean
        .to_device(w.device())
        .to_kind(Kind::Double)
        .unsqueeze(0)
        * w;
    let threshold = percentile(&contrib, p)?;
    Ok(contrib.gt(threshold))
}

/// DICE: the energy of the sparsified head (`mask` of [`dice_mask`]).
/// features [N, D] -> [N].
pub fn dice(features: &Tensor, head: &Head, mask: &Tensor) -> Result<Tensor> {
    let h = check_features(features, Some(head.dim()), None, "DICE")?;
    if mask.size() != head.weight.size() {
        return Err(OodError::Shape(format!(
            "DICE: mask {:?} for a head weight {:?}",
            mask.size(),
            head.weight.size()
        )));
    }
    Ok(energy(&head.masked(mask).logits(&h)))
}

/// KNN's normalisation `x / (‖x‖₂ + 1e-10)` of each row.
pub fn l2_normalise(x: &Tensor) -> Tensor {
    let x = to_score_kind(x);
    let norm = x.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    &x / (norm + 1e-10)
}

/// Blocks of [`knn`]: queries and bank rows per step.
#[derive(Debug, Clone, Copy)]
pub struct KnnBlocks {
    pub queries: i64,
    pub bank: i64,
}

impl Default for KnnBlocks {
    fn default() -> Self {
        KnnBlocks {
            queries: 2048,
            bank: 16384,
        }
    }
}

/// KNN: `−d_k`, d_k the squared L2 distance from each normalised query to its
/// k-th nearest row of the normalised `bank` (both from [`l2_normalise`]), as
/// faiss's `IndexFlatL2` returns it. Exact: for each block of queries, squared
/// distances `‖q‖² + ‖x‖² − 2 q·x` (clamped at 0; ‖q‖² and the clamp applied
/// after the ranking, which they do not change) to one block of the bank at a
/// time, merged into a running top-k; memory stays within
/// `blocks.queries × (k + blocks.bank)` values. Computed on the bank's device, in
/// the bank's kind. queries [N, D], bank [M, D] -> [N] on the queries' device.
pub fn knn(queries: &Tensor, bank: &Tensor, k: i64, blocks: KnnBlocks) -> Result<Tensor> {
    let (m, d) = check_matrix(bank, "KNN bank")?;
    let (_, dq) = check_matrix(queries, "KNN queries")?;
    if dq != d {
        return Err(OodError::Shape(format!(
            "KNN: queries of {dq} values, a bank of {d}"
        )));
    }
    if k < 1 || k > m {
        return Err(OodError::Invalid(format!(
            "KNN: k = {k} must be in 1..={m} (the bank's size)"
        )));
    }
    let bank_sq = bank.square().sum_dim_intlist(1, false, None);
    // ‖q‖² is the same for a whole row, so the ranking needs only ‖x‖² − 2 q·x,
    // one matrix product with -2q (beta = 1 adds ‖x‖²); ‖q‖² and the clamp at 0
    // are applied to the k-th value at the end.
    blockwise_top_k(queries, bank, k, blocks, false, |q, start, len| {
        let x_sq = bank_sq.narrow(0, start, len).unsqueeze(0);
        x_sq.addmm(&(q * -2.0), &bank.narrow(0, start, len).tr())
    })
    .map(|best| {
        let q_sq = queries
            .to_kind(bank.kind())
            .square()
            .sum_dim_intlist(1, false, None)
            .to_device(bank.device());
        (-(best.amax(1, false) + q_sq).clamp_min(0.0)).to_device(queries.device())
    })
}

/// The k best values of `score(q, start, len)` (the [Nq, len] scores of a block of
/// queries against rows `start..start + len` of a bank of M rows) for every query:
/// the largest when `largest`, else the smallest, in no particular order, as
/// [N, k] on the bank's device and in its kind. Queries go in blocks of
/// `blocks.queries` and the bank in blocks of `blocks.bank`, merged into a running
/// top-k, so memory stays within `blocks.queries × (k + blocks.bank)` values.
/// Shared by [`knn`] and NNGuide. Needs 1 ≤ k ≤ M (checked by the callers).
pub(crate) fn blockwise_top_k(
    queries: &Tensor,
    bank: &Tensor,
    k: i64,
    blocks: KnnBlocks,
    largest: bool,
    score: impl Fn(&Tensor, i64, i64) -> Tensor,
) -> Result<Tensor> {
    if blocks.queries < 1 || blocks.bank < 1 {
        return Err(OodError::Invalid(
            "KNN/NNGuide: blocks must be at least 1 row".into(),
        ));
    }
    let m = bank.size()[0];
    let (device, kind) = (bank.device(), bank.kind());
    let mut out = Vec::new();
    for q in queries.split(blocks.queries, 0) {
        let q = q.to_device(device).to_kind(kind);
        let mut best: Option<Tensor> = None;
        let mut start = 0;
        while start < m {
            let len = blocks.bank.min(m - start);
            let s = score(&q, start, len);
            let cand = match &best {
                Some(b) => Tensor::cat(&[b, &s], 1),
                None => s,
            };
            let keep = k.min(cand.size()[1]);
            best = Some(cand.topk(keep, 1, largest, false).0);
            start += len;
        }
        out.push(best.expect("a non-empty bank"));
    }
    if out.is_empty() {
        return Ok(Tensor::zeros([0, k], (kind, device)));
    }
    Ok(Tensor::cat(&out, 0))
}

/// ViM's principal dimension for features of width d: 1000 when d >= 2048, 512
/// when d >= 768, else d / 2.
pub fn vim_default_dim(d: i64) -> i64 {
    if d >= 2048 {
        1000
    } else if d >= 768 {
        512
    } else {
        d / 2
    }
}

/// What ViM fits on training features: the origin `u = −W⁺b` [D], the basis of
/// the residual space `ns` [D, D − dim] (eigenvectors of the D − dim smallest
/// eigenvalues of `E[(h − u)(h − u)ᵀ]`) and α = mean max-logit / mean residual
/// norm on the training features. float64.
#[derive(Debug)]
pub struct VimParams {
    pub u: Tensor,
    pub ns: Tensor,
    pub alpha: f64,
}

/// The origin `u = −W⁺b` of ViM (float64).
pub fn vim_origin(head: &Head) -> Result<Tensor> {
    let w = head.weight.to_kind(Kind::Double);
    let b = head.bias.to_kind(Kind::Double).to_device(w.device());
    Ok(-w.f_linalg_pinv(1e-15, false)?.mv(&b))
}

/// Residual norms `‖(h − u) ns‖` [N] in the kind of `h`, in blocks of rows.
fn vim_residual(h: &Tensor, u: &Tensor, ns: &Tensor) -> Tensor {
    let u = u.to_device(h.device()).to_kind(h.kind());
    let ns = ns.to_device(h.device()).to_kind(h.kind());
    let parts: Vec<Tensor> = h
        .split(8192, 0)
        .iter()
        .map(|x| {
            (x - &u)
                .matmul(&ns)
                .norm_scalaropt_dim(2, [1i64].as_slice(), false)
        })
        .collect();
    if parts.is_empty() {
        Tensor::zeros([0], (h.kind(), h.device()))
    } else {
        Tensor::cat(&parts, 0)
    }
}

/// `Σ xᵀx` over blocks of rows of `h − centre`, in float64 [D, D].
pub(crate) fn scatter_matrix(h: &Tensor, centre: &Tensor) -> Tensor {
    let d = h.size()[1];
    let mut s = Tensor::zeros([d, d], (Kind::Double, h.device()));
    for x in h.split(8192, 0) {
        let x = x.to_kind(Kind::Double) - centre;
        s += x.tr().matmul(&x);
    }
    s
}

/// ViM's residual space of training features h [N, D] about `u` (float64): the
/// eigenvectors of the D − dim smallest eigenvalues of `E[(h − u)(h − u)ᵀ]` (not
/// re-centred), [D, D − dim]. Needs 1 <= dim < D and more than dim rows (`what`
/// names the method in the errors).
pub(crate) fn residual_space(h: &Tensor, u: &Tensor, dim: i64, what: &str) -> Result<Tensor> {
    let (n, d) = (h.size()[0], h.size()[1]);
    if dim < 1 || dim >= d {
        return Err(OodError::Invalid(format!(
            "{what}: the principal dimension must be in 1..{d} (the features' width), got {dim}"
        )));
    }
    if n <= dim {
        // With N <= dim rows the covariance has rank < dim + 1: part of the
        // principal space is an arbitrary basis of its null space, so the
        // residual space would be arbitrary too.
        return Err(OodError::Invalid(format!(
            "{what}: {n} training rows, but fitting a principal space of dimension {dim} needs more than {dim} rows (the covariance of fewer rows leaves the residual space undetermined)"
        )));
    }
    let cov = scatter_matrix(h, u) / n as f64;
    let (_, vectors) = cov.f_linalg_eigh("L")?;
    // Ascending eigenvalues: the first D - dim vectors span the residual space.
    Ok(vectors.narrow(1, 0, d - dim).contiguous())
}

/// Fits ViM on training features [N, D] and their logits [N, C], in float64.
pub fn vim_fit(features: &Tensor, logits: &Tensor, head: &Head, dim: i64) -> Result<VimParams> {
    let (n, c) = check_matrix(logits, "ViM training logits")?;
    let h = check_features(features, Some(head.dim()), Some(n), "ViM training")?;
    if c != head.classes() {
        return Err(OodError::Shape(format!(
            "ViM: {c} logits per image, the head has {}",
            head.classes()
        )));
    }
    let u = vim_origin(head)?.to_device(h.device());
    let ns = residual_space(&h, &u, dim, "ViM")?;
    let residual = vim_residual(&h.to_kind(Kind::Double), &u, &ns);
    let max_logit = to_score_kind(logits).to_kind(Kind::Double).amax(1, false);
    let alpha = max_logit.mean(None).double_value(&[]) / residual.mean(None).double_value(&[]);
    if !alpha.is_finite() {
        return Err(OodError::Invalid(format!(
            "ViM: α = mean max-logit / mean residual norm is {alpha} on the training features"
        )));
    }
    Ok(VimParams { u, ns, alpha })
}

/// ViM: `logsumexp(f) − α ‖(h − u) ns‖`. features [N, D], logits [N, C] -> [N].
pub fn vim(features: &Tensor, logits: &Tensor, params: &VimParams) -> Result<Tensor> {
    let (n, _) = check_matrix(logits, "ViM logits")?;
    let d = params.u.size()[0];
    let h = check_features(features, Some(d), Some(n), "ViM")?;
    let residual = vim_residual(&h, &params.u, &params.ns);
    Ok(energy(&to_score_kind(logits))
        - residual.to_kind(to_score_kind(logits).kind()) * params.alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ash_keeps_numpy_rounding() {
        // 2048 * 0.9 = 1843.2 -> 1843 pruned; 64 * 0.9 = 57.6 -> 58; 10 * 0.25 = 2.5 -> 2.
        assert_eq!(ash_keep(2048, 90.0), 205);
        assert_eq!(ash_keep(64, 90.0), 6);
        assert_eq!(ash_keep(10, 25.0), 8);
        assert_eq!(ash_keep(10, 35.0), 6); // 3.5 -> 4
        assert_eq!(ash_keep(4, 99.0), 1);
    }

    #[test]
    fn percentile_is_numpy_linear() {
        let v = Tensor::from_slice(&[4.0f32, 1.0, 3.0, 2.0]);
        // np.percentile([1, 2, 3, 4], 90) = 3.7; 50 -> 2.5; 10 -> 1.3.
        for (p, want) in [(90.0, 3.7), (50.0, 2.5), (10.0, 1.3)] {
            assert!((percentile(&v, p).unwrap() - want).abs() < 1e-12, "{p}");
        }
        assert!(percentile(&v, 0.0).is_err() && percentile(&v, 100.0).is_err());
    }

    #[test]
    fn knn_rejects_k_above_the_bank() {
        let bank = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
        let e = knn(&bank, &bank, 4, KnnBlocks::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("1..=3"), "{e}");
    }
}
