//! The baseline scores of `test_baselines.py` on a flat model with C logits
//! (docs/scores.md): MSP, ODIN (`iterate_data_odin`), Energy (`iterate_data_energy`) and
//! KL matching (`iterate_data_kl_div`), each for a whole batch at once. Higher
//! scores mean more in-distribution. Mahalanobis is with its tuning code.
use tch::{Kind, Reduction, Tensor};

use super::{check_matrix, is_integer, to_score_kind, OodError, Result};

/// Checks that a temperature is a positive finite number.
fn check_temperature(t: f64, what: &str) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(OodError::Invalid(format!(
            "{what}: the temperature must be a positive number, got {t}"
        )))
    }
}

/// Maximum softmax probability: logits [N, C] -> [N] (float32 or float64).
pub fn msp(logits: &Tensor) -> Result<Tensor> {
    check_matrix(logits, "MSP logits")?;
    Ok(to_score_kind(logits).softmax(1, None).amax(1, false))
}

/// Energy score `T * logsumexp(logits / T)`: logits [N, C] -> [N].
pub fn energy(logits: &Tensor, temperature: f64) -> Result<Tensor> {
    check_matrix(logits, "Energy logits")?;
    check_temperature(temperature, "Energy")?;
    Ok((to_score_kind(logits) / temperature).logsumexp(1, false) * temperature)
}

/// Runs `forward` and checks that it gives logits [N, C] for the N inputs.
fn logits_of(forward: &dyn Fn(&Tensor) -> Tensor, x: &Tensor) -> Result<Tensor> {
    let logits = forward(x);
    let (n, _) = check_matrix(&logits, "ODIN: the model's output")?;
    let batch = x.size().first().copied().unwrap_or(0);
    if n != batch {
        return Err(OodError::Shape(format!(
            "ODIN: the model gave {n} rows of logits for a batch of {batch} inputs"
        )));
    }
    Ok(to_score_kind(&logits))
}

/// ODIN's perturbed input `x - epsilon * sign(d loss / dx)` (the sign is +1 where
/// the gradient is >= 0, else -1), with loss = batch-mean cross-entropy of
/// `forward(x) / T` against its own argmax. x [N, ...] (any float shape the model
/// takes) -> a detached tensor of the same shape. Only the input's gradient is
/// computed; the model's parameters get no `.grad()`. Works inside `no_grad`.
pub fn odin_perturb(
    forward: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    temperature: f64,
    epsilon: f64,
) -> Result<Tensor> {
    check_temperature(temperature, "ODIN")?;
    if !x.is_floating_point() || x.dim() == 0 {
        return Err(OodError::Shape(format!(
            "ODIN: expected a floating-point input batch [N, ...], got {:?} of shape {:?}",
            x.kind(),
            x.size()
        )));
    }
    let input = x.detach().set_requires_grad(true);
    let grad = tch::with_grad(|| -> Result<Tensor> {
        let loss = odin_loss(&logits_of(forward, &input)?, temperature);
        // libtorch's engine crashes on a root without a graph: check first.
        if !loss.requires_grad() {
            return Err(OodError::Invalid(
                "ODIN: cannot differentiate the loss with respect to the input: the model's \
                 forward built no graph (it must not run under no_grad)"
                    .into(),
            ));
        }
        let mut grads = Tensor::f_run_backward(&[&loss], &[&input], false, false)?;
        let grad = grads.remove(0);
        if grad.defined() {
            Ok(grad)
        } else {
            Err(OodError::Invalid(
                "ODIN: the model's output does not depend on its input, so the input has no \
                 gradient"
                    .into(),
            ))
        }
    })?;
    Ok(step_against_gradient(x, &grad, epsilon))
}

/// ODIN's loss, differentiable in the logits: the batch mean of the cross-entropy
/// of `logits / T` against its own argmax. `logits` [N, C] as the model gave them
/// (in the score's kind, see [`odin_perturb`]).
pub fn odin_loss(logits: &Tensor, temperature: f64) -> Tensor {
    let logits = to_score_kind(logits);
    let pseudo = logits.argmax(1, false);
    (logits / temperature)
        .log_softmax(1, None)
        .g_nll_loss::<Tensor>(&pseudo, None, Reduction::Mean, -100)
}

/// `x - step * sign(grad)` with the sign +1 where the gradient is >= 0, else -1
/// (the input pre-processing of ODIN and of Mahalanobis), detached, in the kind of x.
pub fn step_against_gradient(x: &Tensor, grad: &Tensor, step: f64) -> Tensor {
    let sign = grad.ge(0.0).to_kind(x.kind()) * 2.0 - 1.0;
    x.detach() - sign * step
}

/// ODIN's score of an input already perturbed: `max softmax(forward(x') / T)`
/// without a graph. x' [N, ...] -> [N].
pub fn odin_score_of(
    forward: &dyn Fn(&Tensor) -> Tensor,
    perturbed: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let logits = logits_of(forward, perturbed)?;
        Ok((logits / temperature).softmax(1, None).amax(1, false))
    })
}

/// ODIN score (docs/scores.md#odin): `max softmax(forward(x') / T)` with x' =
/// [`odin_perturb`]`(forward, x, T, epsilon)`; x [N, ...] -> [N]. With
/// `epsilon == 0` x' = x, so no graph is built and no backward pass runs.
/// The result never requires grad.
pub fn odin(
    forward: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    temperature: f64,
    epsilon: f64,
) -> Result<Tensor> {
    check_temperature(temperature, "ODIN")?;
    if !(epsilon.is_finite() && epsilon >= 0.0) {
        return Err(OodError::Invalid(format!(
            "ODIN: epsilon must be a non-negative number, got {epsilon}"
        )));
    }
    let input = if epsilon == 0.0 {
        x.shallow_clone()
    } else {
        odin_perturb(forward, x, temperature, epsilon)?
    };
    odin_score_of(forward, &input, temperature)
}

/// Checks an integer label vector [n] with values in 0..num_classes; returns it as
/// int64 on `device`.
fn check_labels(labels: &Tensor, n: i64, num_classes: i64, device: tch::Device) -> Result<Tensor> {
    if labels.size() != [n] || !is_integer(labels) {
        return Err(OodError::Shape(format!(
            "KL matching: expected integer labels [{n}], got {:?} of shape {:?}",
            labels.kind(),
            labels.size()
        )));
    }
    let labels = labels.to_device(device).to_kind(Kind::Int64);
    let bad = labels.lt(0).logical_or(&labels.ge(num_classes));
    if bad.any().int64_value(&[]) != 0 {
        let i = bad.nonzero().int64_value(&[0, 0]);
        return Err(OodError::Invalid(format!(
            "KL matching: label {} of image {i} is outside 0..{num_classes}",
            labels.int64_value(&[i])
        )));
    }
    Ok(labels)
}

/// Checks softmax probabilities [N, C] (no negative or NaN entry); returns them as
/// float64 and (N, C).
fn probs_f64(probs: &Tensor, what: &str) -> Result<(Tensor, i64, i64)> {
    let (n, c) = check_matrix(probs, what)?;
    let p = probs.to_kind(Kind::Double);
    if p.lt(0.0).logical_or(&p.isnan()).any().int64_value(&[]) != 0 {
        return Err(OodError::Invalid(format!(
            "{what}: probabilities must not be negative or NaN"
        )));
    }
    Ok((p, n, c))
}

/// KL-matching templates: the mean softmax probabilities of the images of each
/// class. probs [N, C] (softmax of the logits), labels [N] (integer, ImageFolder
/// labels in 0..num_classes) -> [num_classes, C] float64. Errors if a class has
/// no image.
pub fn kl_templates(probs: &Tensor, labels: &Tensor, num_classes: i64) -> Result<Tensor> {
    let (p, n, c) = probs_f64(probs, "KL matching: softmax probabilities")?;
    if num_classes < 1 {
        return Err(OodError::Invalid(format!(
            "KL matching: the number of classes must be positive, got {num_classes}"
        )));
    }
    let labels = check_labels(labels, n, num_classes, p.device())?;
    let counts = labels.bincount::<Tensor>(None, num_classes);
    let empty = counts.eq(0);
    if empty.any().int64_value(&[]) != 0 {
        return Err(OodError::EmptyClass {
            class: empty.nonzero().int64_value(&[0, 0]),
            num_classes,
        });
    }
    let sums =
        Tensor::zeros([num_classes, c], (Kind::Double, p.device())).index_add(0, &labels, &p);
    Ok(sums / counts.to_kind(Kind::Double).unsqueeze(1))
}

/// KL-matching score `-min_c KL(p || d_c)` with `KL(p || q) = sum over p_i != 0 of
/// p_i log(p_i / q_i)`, for all images and classes at once (one matrix product):
/// probs [N, C], templates [K, C] -> [N] float64. A class with `q_i == 0` where
/// `p_i > 0` is at KL = +inf; if every class is, the score is -inf (never NaN).
pub fn kl_score(probs: &Tensor, templates: &Tensor) -> Result<Tensor> {
    let (p, _, c) = probs_f64(probs, "KL matching: softmax probabilities")?;
    let (d, k, ct) = probs_f64(templates, "KL matching: class templates")?;
    if ct != c || k < 1 {
        return Err(OodError::Shape(format!(
            "KL matching: templates [{k}, {ct}] do not fit probabilities with {c} columns"
        )));
    }
    let d = d.to_device(p.device());
    // sum_i p_i log p_i, with 0 log 0 = 0: [N].
    let self_term = p.xlogy(&p).sum_dim_intlist(1, false, None::<Kind>);
    // sum_i p_i log d_ci over d_ci > 0 (p_i = 0 terms vanish): [N, K].
    let positive = d.gt(0.0);
    let log_d = d.log().where_self(&positive, &d.zeros_like());
    let cross = p.matmul(&log_d.tr());
    let kl = self_term.unsqueeze(1) - cross;
    if bool::try_from(positive.all())? {
        // No template has a zero: no divergence is infinite (and the second
        // matrix product below, as costly as the first, is not needed).
        return Ok(-kl.amin(1, false));
    }
    // Some i with p_i != 0 and d_ci == 0 makes KL(p || d_c) infinite.
    let missing = p
        .ne(0.0)
        .to_kind(Kind::Double)
        .matmul(&positive.logical_not().to_kind(Kind::Double).tr())
        .gt(0.0);
    let kl = kl.masked_fill(&missing, f64::INFINITY);
    Ok(-kl.amin(1, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ood::testutil::{assert_close, check_each, fixture, get, to_vec, Rng, U32, U64};
    use tch::Device;

    const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// Per row of logits z [N, C], the bound on |MSP_a - MSP_b| of two float32
    /// computations of max softmax(z / T) from the same float32 logits, relative:
    /// z / T and - max shift each exponent by <= 3 u32 |z| / T (numerator and
    /// denominator: twice), exp is within 1 ulp (2 u32, twice), the C-term sum
    /// and the division round C + 1 times.
    fn msp_rounding(z: &[f64], c: usize, msp: f64, t: f64) -> f64 {
        let zmax = z.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        2.0 * U32 * msp * (6.0 * zmax / t + c as f64 + 5.0)
    }

    #[test]
    fn msp_and_energy_match_pytorch() {
        let t = fixture("scores.safetensors");
        let logits = get(&t, "logits");
        let (n, c) = (logits.size()[0] as usize, logits.size()[1] as usize);
        let z = to_vec(&logits);
        let rows: Vec<&[f64]> = z.chunks(c).collect();
        let m = msp(&logits).unwrap();
        assert_eq!((m.size(), m.kind()), (vec![40], Kind::Float));
        let (got, want) = (to_vec(&m), to_vec(&get(&t, "msp")));
        let errs: Vec<f64> = (0..n).map(|i| (got[i] - want[i]).abs()).collect();
        let tols: Vec<f64> = (0..n)
            .map(|i| msp_rounding(rows[i], c, want[i], 1.0))
            .collect();
        check_each("msp", &errs, &tols);
        for (temp, key) in [(1.0, "energy_t1"), (2.5, "energy_t2_5")] {
            let got = to_vec(&energy(&logits, temp).unwrap());
            let want = to_vec(&get(&t, key));
            let errs: Vec<f64> = (0..n).map(|i| (got[i] - want[i]).abs()).collect();
            // T (m + log sum exp(z / T - m)) in float32 on both sides: z / T and
            // - m shift exponents by <= 3 u32 |z| / T, exp (1 ulp), the C-term sum
            // and log by (C + 4) u32 relative (log turns that absolute), + m and * T
            // by u32 |E| each.
            let tols: Vec<f64> = (0..n)
                .map(|i| {
                    let zmax = rows[i].iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    2.0 * U32 * (3.0 * zmax + temp * (c as f64 + 4.0) + 2.0 * want[i].abs())
                })
                .collect();
            check_each(&format!("energy T={temp}"), &errs, &tols);
        }
        // Row 0 is all ties: exp(0) / 10 = 1 / 10 correctly rounded to float32;
        // row 34 a one-hot softmax (exp(-120) underflows in float32): exactly 1.
        assert_eq!(m.double_value(&[0]), f64::from(0.1f32));
        assert_eq!(m.double_value(&[34]), 1.0);
    }

    #[test]
    fn kl_matching_matches_the_per_sample_loop() {
        let t = fixture("scores.safetensors");
        let (probs, labels) = (get(&t, "probs"), get(&t, "labels"));
        let templates = kl_templates(&probs, &labels, 6).unwrap();
        assert_eq!(
            (templates.size(), templates.kind()),
            (vec![6, 10], Kind::Double)
        );
        // Class means of at most 40 float32 values converted exactly: both sides
        // round each of <= 40 additions and the division by u64 (all terms >= 0).
        let rtol = 2.0 * 41.0 * U64;
        assert_close("kl templates", &templates, &get(&t, "templates"), rtol, 0.0);
        // Class 5's template has exact zeros: KL to it is +inf for most images.
        assert_eq!(
            templates.get(5).eq(0.0).sum(Kind::Int64).int64_value(&[]),
            9
        );
        let score = kl_score(&probs, &templates).unwrap();
        assert_eq!((score.size(), score.kind()), (vec![40], Kind::Double));
        // KL(p || d_c) = sum p_i log p_i - sum p_i log d_ci (here), sum p_i log(p_i /
        // d_ci) (numpy): each of the C terms, its log and the C-term sums round by
        // u64 relative, so both differ by <= 2 (C + 3) u64 sum p_i (|log p_i| +
        // |log d_ci|) + u64, for every class with a finite KL (so for the min).
        let (p, d) = (to_vec(&probs), to_vec(&templates));
        let c = 10;
        let tols: Vec<f64> = p
            .chunks(c)
            .map(|p| {
                let size = d
                    .chunks(c)
                    .map(|d| {
                        let terms = p.iter().zip(d).filter(|(p, _)| **p > 0.0);
                        terms
                            .map(|(p, d)| p * (p.ln().abs() + d.ln().abs()))
                            .sum::<f64>()
                    })
                    .filter(|s| s.is_finite())
                    .fold(0.0f64, f64::max);
                2.0 * (c as f64 + 3.0) * U64 * size + U64
            })
            .collect();
        let (got, want) = (to_vec(&score), to_vec(&get(&t, "kl")));
        let errs: Vec<f64> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        check_each("kl score", &errs, &tols);
    }

    #[test]
    fn kl_keeps_float64_probabilities() {
        // p_0 = 1e-50 is 0 in float32: as float64 it meets the template's d_0 = 0,
        // so KL = +inf; rounded to float32 p would match the template exactly.
        let d = Tensor::from_slice(&[0.0f64, 1.0]).reshape([1, 2]);
        let p = Tensor::from_slice(&[1e-50f64, 1.0 - 1e-50]).reshape([1, 2]);
        let s = kl_score(&p, &d).unwrap().double_value(&[0]);
        assert_eq!(s, f64::NEG_INFINITY);
        let s32 = kl_score(&p.to_kind(Kind::Float), &d)
            .unwrap()
            .double_value(&[0]);
        assert_eq!(s32, 0.0);
    }

    #[test]
    fn kl_infinite_divergences_never_give_nan() {
        let d = Tensor::from_slice(&[1.0f64, 0.0, 0.0, 1.0, 0.5, 0.0]).reshape([3, 2]);
        let p = Tensor::from_slice(&[0.5f64, 0.5, 1.0, 0.0, 0.0, 1.0]).reshape([3, 2]);
        let s = Vec::<f64>::try_from(kl_score(&p, &d).unwrap()).unwrap();
        assert_eq!(s[0], f64::NEG_INFINITY); // every template misses a class of p
        assert_eq!(s[1], 0.0); // exact match with template 0
        assert_eq!(s[2], 0.0); // exact match with template 1
                               // Hand value: p = [0.25, 0.75] against q = [0.5, 0.5] and [1, 0].
        let p = Tensor::from_slice(&[0.25f64, 0.75]).reshape([1, 2]);
        let d = Tensor::from_slice(&[0.5f64, 0.5, 1.0, 0.0]).reshape([2, 2]);
        let want = 0.25 * (0.5f64).ln() + 0.75 * (1.5f64).ln();
        let got = kl_score(&p, &d).unwrap().double_value(&[0]);
        // A few float64 roundings of terms of size <= |log 0.25| + |log 0.5| each.
        let tol = 8.0 * U64 * (0.25f64.ln().abs() + 0.5f64.ln().abs());
        check_each("kl hand value", &[(got + want).abs()], &[tol]);
    }

    #[test]
    fn kl_input_errors() {
        let probs = Tensor::full([4, 3], 1.0 / 3.0, F32);
        let labels = Tensor::from_slice(&[0i64, 1, 1, 3]);
        match kl_templates(&probs, &labels, 4) {
            Err(OodError::EmptyClass {
                class: 2,
                num_classes: 4,
            }) => {}
            other => panic!("expected class 2 to be empty, got {other:?}"),
        }
        let err = kl_templates(&probs, &labels, 3).unwrap_err().to_string();
        assert!(err.contains("label 3 of image 3 is outside 0..3"), "{err}");
        let err = kl_templates(&probs, &labels.narrow(0, 0, 3), 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected integer labels [4]"), "{err}");
        let err = kl_templates(&probs, &labels.to_kind(Kind::Float), 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("integer labels"), "{err}");
        let err = kl_score(&probs, &Tensor::ones([2, 4], F32))
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
        let err = kl_score(&(-probs), &Tensor::ones([2, 3], F32))
            .unwrap_err()
            .to_string();
        assert!(err.contains("negative"), "{err}");
    }

    #[test]
    fn argument_errors() {
        let logits = Tensor::zeros([2, 3], F32);
        assert!(energy(&logits, 0.0).is_err());
        assert!(energy(&logits, f64::NAN).is_err());
        assert!(msp(&Tensor::zeros([2, 3, 1], F32)).is_err());
        assert!(msp(&Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu))).is_err());
        let f = |x: &Tensor| x.shallow_clone();
        assert!(odin(&f, &logits, 1000.0, -0.1).is_err());
        assert!(odin(&f, &logits, -1.0, 0.0).is_err());
    }

    /// A linear model x [N, D] -> x W^T + b with trainable W [5, 8] and b [5], and
    /// inputs x [6, 8], all float32 from a generator of this test.
    fn linear() -> (Tensor, Tensor, Tensor) {
        let mut rng = Rng::new(7);
        let w = rng
            .normal_tensor(&[5, 8], Kind::Float)
            .set_requires_grad(true);
        let b = rng.normal_tensor(&[5], Kind::Float).set_requires_grad(true);
        let x = rng.normal_tensor(&[6, 8], Kind::Float);
        (w, b, x)
    }

    /// The linear model in float64 from the float32 values: per row of x, the
    /// logits z, a bound on the float32 logits' error (9 roundings of terms up to
    /// sum |x_i w_ji| + |b_j|), and softmax(z / T).
    struct Reference {
        z: Vec<Vec<f64>>,
        dz: Vec<f64>,
        p: Vec<Vec<f64>>,
    }

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, t: f64) -> Reference {
        let (xs, ws, bs) = (to_vec(x), to_vec(w), to_vec(b));
        let (d, c) = (8, 5);
        let (mut z, mut dz, mut p) = (vec![], vec![], vec![]);
        for row in xs.chunks(d) {
            let zr: Vec<f64> = (0..c)
                .map(|j| (0..d).map(|i| row[i] * ws[j * d + i]).sum::<f64>() + bs[j])
                .collect();
            let size = (0..c)
                .map(|j| (0..d).map(|i| (row[i] * ws[j * d + i]).abs()).sum::<f64>() + bs[j].abs())
                .fold(0.0, f64::max);
            let m = zr.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = zr.iter().map(|v| ((v - m) / t).exp()).collect();
            let sum: f64 = e.iter().sum();
            p.push(e.iter().map(|v| v / sum).collect());
            dz.push((d as f64 + 1.0) * U32 * size);
            z.push(zr);
        }
        Reference { z, dz, p }
    }

    /// The largest softmax probability of each row of the reference.
    fn max_prob(r: &Reference) -> Vec<f64> {
        r.p.iter()
            .map(|p| p.iter().cloned().fold(0.0, f64::max))
            .collect()
    }

    /// Per row, the bound on |float32 MSP - reference|: the logits' error moves the
    /// MSP by <= 2 MSP dz / T, the float32 softmax rounds as in [`msp_rounding`].
    fn msp_tolerance(r: &Reference, t: f64) -> Vec<f64> {
        max_prob(r)
            .iter()
            .zip(&r.z)
            .zip(&r.dz)
            .map(|((s, z), dz)| 2.0 * s * dz / t + msp_rounding(z, 5, *s, t))
            .collect()
    }

    #[test]
    fn odin_without_perturbation_builds_no_graph() {
        let (w, b, x) = linear();
        let f = |x: &Tensor| x.matmul(&w.tr()) + &b;
        let s = odin(&f, &x, 1000.0, 0.0).unwrap();
        assert!(!s.requires_grad());
        assert!(!w.grad().defined() && !b.grad().defined());
        let r = reference(&x, &w, &b, 1000.0);
        let want = max_prob(&r);
        let errs: Vec<f64> = to_vec(&s)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .collect();
        check_each("odin eps=0", &errs, &msp_tolerance(&r, 1000.0));
    }

    #[test]
    fn odin_steps_against_the_input_gradient_sign() {
        let (w, b, x) = linear();
        let f = |x: &Tensor| x.matmul(&w.tr()) + &b;
        let (t, eps, n) = (2.0, 0.05, 6.0);
        // Analytic input gradient of mean CE(f(x)/T, argmax), in float64:
        // g = (softmax(z / T) - onehot) W / (T N).
        let r = reference(&x, &w, &b, t);
        let ws = to_vec(&w);
        let mut want_xp = to_vec(&x);
        let mut margin = f64::INFINITY;
        for (k, (z, p)) in r.z.iter().zip(&r.p).enumerate() {
            // The pseudo-label: the top two logits are further apart than the
            // float32 logits' errors.
            let mut sorted = z.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            margin = margin.min((sorted[0] - sorted[1]) / (2.0 * r.dz[k]));
            let top = z.iter().position(|v| *v == sorted[0]).unwrap();
            let dp: Vec<f64> = (0..5)
                .map(|j| p[j] - f64::from(u8::from(j == top)))
                .collect();
            // The float32 softmax's relative rounding, as in `msp_rounding`.
            let zmax = z.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let soft = U32 * (6.0 * zmax / t + 10.0);
            for i in 0..8 {
                let g: f64 = (0..5).map(|j| dp[j] * ws[j * 8 + i]).sum::<f64>() / (t * n);
                // The float32 gradient's error: each p_j off by <= p_j (2 dz / T +
                // soft), each of the 5 products and sums by u32, over T N.
                let err: f64 = (0..5)
                    .map(|j| {
                        (p[j] * (2.0 * r.dz[k] / t + soft) + 6.0 * U32 * dp[j].abs())
                            * ws[j * 8 + i].abs()
                    })
                    .sum::<f64>()
                    / (t * n);
                margin = margin.min(g.abs() / err);
                let step = if g >= 0.0 { eps } else { -eps };
                want_xp[k * 8 + i] = f64::from(want_xp[k * 8 + i] as f32 - step as f32);
            }
        }
        // Every sign is decided by at least 10x its float32 error: signs must agree.
        eprintln!("odin: smallest |gradient| / its float32 error bound {margin:.1}");
        assert!(
            margin >= 10.0,
            "the test's input has a gradient near 0: {margin}"
        );
        // Inside no_grad too: the perturbation turns gradients back on.
        let got_xp = tch::no_grad(|| odin_perturb(&f, &x, t, eps)).unwrap();
        assert_eq!(to_vec(&got_xp), want_xp, "odin x'");
        let s = tch::no_grad(|| odin(&f, &x, t, eps)).unwrap();
        assert!(!s.requires_grad());
        assert!(!w.grad().defined() && !b.grad().defined());
        let xp = Tensor::from_slice(&want_xp)
            .reshape([6, 8])
            .to_kind(Kind::Float);
        let rp = reference(&xp, &w, &b, t);
        let want = max_prob(&rp);
        let errs: Vec<f64> = to_vec(&s)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .collect();
        check_each("odin eps>0", &errs, &msp_tolerance(&rp, t));
        // The perturbation raises the confidence.
        let s0 = odin(&f, &x, t, 0.0).unwrap();
        assert!(bool::try_from(s.gt_tensor(&s0).all()).unwrap());
    }

    #[test]
    fn odin_model_errors_are_results() {
        let (w, b, x) = linear();
        let detached = |x: &Tensor| x.detach().matmul(&w.tr()) + &b;
        let err = odin(&detached, &x, 1000.0, 0.01).unwrap_err().to_string();
        assert!(err.contains("does not depend on its input"), "{err}");
        let graphless = |x: &Tensor| tch::no_grad(|| x.matmul(&w.tr()) + &b);
        let err = odin(&graphless, &x, 1000.0, 0.01).unwrap_err().to_string();
        assert!(err.contains("cannot differentiate"), "{err}");
        let short = |x: &Tensor| x.narrow(0, 0, 2).matmul(&w.tr());
        let err = odin(&short, &x, 1000.0, 0.0).unwrap_err().to_string();
        assert!(err.contains("2 rows of logits for a batch of 6"), "{err}");
        let err = odin(&short, &x, 1000.0, 0.01).unwrap_err().to_string();
        assert!(err.contains("2 rows of logits for a batch of 6"), "{err}");
    }
}
