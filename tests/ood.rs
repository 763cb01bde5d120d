//! ODIN (docs/scores.md#odin) on the small BiT model (ResNetV2-R14x0.5, hash
//! weights) against the PyTorch reference of tests/fixtures/make_ood_fixtures.py:
//! same weights, same input, T = 1000 and 1, epsilon 0 and 0.0014.
mod common;

use common::{
    assert_rows_close, check_each, check_step_signs, fixture, r14, read_named, to_vec, FORWARD_TOL,
    U32,
};
use mos::ood::{odin, scores::odin_perturb};
use tch::{nn, Tensor};

const EPS: f64 = 0.0014;

/// Per image, the bound on |MSP_ours - MSP_torch| of max softmax(f / T) for logits
/// f [N, C] that two float32 forwards compute within FORWARD_TOL max_j |f_j|:
/// |d MSP / d f_j| = MSP |[j = k] - p_j| / T sums to <= 2 MSP / T; each side's
/// softmax shifts exponents by <= 3 u32 |f| / T (f / T and - max), twice, rounds
/// exp within 1 ulp (2 u32), twice, and the C-term sum and division C + 1 times.
fn msp_tolerance(logits: &Tensor, msp: &Tensor, t: f64) -> Vec<f64> {
    let c = logits.size()[1] as f64;
    let fmax = to_vec(&logits.abs().amax(1, false));
    to_vec(msp)
        .iter()
        .zip(&fmax)
        .map(|(s, f)| s * (2.0 * FORWARD_TOL * f / t + 2.0 * U32 * (6.0 * f / t + c + 5.0)))
        .collect()
}

/// |got - want| per entry.
fn abs_diff(got: &Tensor, want: &Tensor) -> Vec<f64> {
    assert_eq!(got.size(), want.size());
    to_vec(got)
        .iter()
        .zip(to_vec(want))
        .map(|(a, b)| (a - b).abs())
        .collect()
}

/// The input gradient of ODIN's loss, mean cross-entropy of f(x) / T against its
/// argmax, computed here with autograd (its size decides which signs may flip).
fn odin_loss_grad(model: &mos::model::ResNetV2, x: &Tensor, t: f64) -> Tensor {
    let input = x.detach().set_requires_grad(true);
    let logits = model.forward(&input);
    let loss = (logits.shallow_clone() / t).cross_entropy_for_logits(&logits.argmax(1, false));
    Tensor::run_backward(&[loss], &[&input], false, false).remove(0)
}

/// No variable of the model has a gradient.
fn assert_no_grads(vs: &nn::VarStore) {
    for (name, var) in vs.variables() {
        assert!(!var.grad().defined(), "{name} got a gradient");
    }
}

#[test]
fn odin_without_perturbation_matches_pytorch_and_builds_no_graph() {
    let (vs, model) = r14();
    let exp = fixture("ood/odin.safetensors");
    let x = read_named(&exp, "x");
    let forward = |x: &Tensor| model.forward(x);
    let score = odin(&forward, &x, 1000.0, 0.0).unwrap();
    assert_eq!((score.size(), score.kind()), (vec![4], tch::Kind::Float));
    assert!(!score.requires_grad());
    assert_no_grads(&vs);
    let want_logits = read_named(&exp, "logits");
    let logits = tch::no_grad(|| model.forward(&x));
    assert_rows_close("logits", &logits, &want_logits, FORWARD_TOL);
    let want = read_named(&exp, "odin_t1000_e0");
    let tol = msp_tolerance(&want_logits, &want, 1000.0);
    check_each("ODIN T=1000 eps=0", &abs_diff(&score, &want), &tol);
}

#[test]
fn odin_with_perturbation_matches_pytorch() {
    let (vs, model) = r14();
    let exp = fixture("ood/odin.safetensors");
    let x = read_named(&exp, "x");
    let forward = |x: &Tensor| model.forward(x);
    let plain = odin(&forward, &x, 1000.0, 0.0).unwrap();
    for (t, key) in [(1000.0, "t1000_e0.0014"), (1.0, "t1_e0.0014")] {
        let xp = odin_perturb(&forward, &x, t, EPS).unwrap();
        assert!(!xp.requires_grad());
        // Every entry moved by one step of EPS: x' is x - EPS or x + EPS, rounded
        // to float32 (one IEEE operation, the same on every CPU).
        let xs = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        let xps = Vec::<f32>::try_from(xp.flatten(0, -1)).unwrap();
        let eps32 = EPS as f32;
        let off = xs
            .iter()
            .zip(&xps)
            .filter(|(a, b)| **b != **a - eps32 && **b != **a + eps32)
            .count();
        assert_eq!(off, 0, "{key}: {off} entries of x' are not x -/+ EPS");
        // The step direction agrees with PyTorch's except where the gradient is
        // within float32 rounding of 0.
        let want_xp = read_named(&exp, &format!("xp_{key}"));
        let grad = odin_loss_grad(&model, &x, t);
        let agree = check_step_signs(&format!("x' for {key}"), &xp, &want_xp, &grad);

        // The score of PyTorch's x' under our forward: logits within FORWARD_TOL.
        let want = read_named(&exp, &format!("odin_{key}"));
        let logits = tch::no_grad(|| model.forward(&want_xp));
        let tol = msp_tolerance(&logits, &want, t);
        let msp = (logits / t).softmax(1, None).amax(1, false);
        check_each(
            &format!("MSP of PyTorch's x' {key}"),
            &abs_diff(&msp, &want),
            &tol,
        );
        // ODIN end to end, on the images whose x' is PyTorch's.
        let score = tch::no_grad(|| odin(&forward, &x, t, EPS)).unwrap();
        assert!(!score.requires_grad());
        let keep: Vec<i64> = (0..4).filter(|&n| agree[n as usize]).collect();
        eprintln!("ODIN {key}: {} of 4 images have PyTorch's x'", keep.len());
        let keep = Tensor::from_slice(&keep);
        let pick =
            |v: &[f64]| -> Vec<f64> { to_vec(&keep).iter().map(|&n| v[n as usize]).collect() };
        check_each(
            &format!("ODIN {key}"),
            &pick(&abs_diff(&score, &want)),
            &pick(&tol),
        );
    }
    // The perturbation raises the score at T = 1000.
    let perturbed = odin(&forward, &x, 1000.0, EPS).unwrap();
    assert!(bool::try_from(perturbed.gt_tensor(&plain).all()).unwrap());
    assert_no_grads(&vs);
}
