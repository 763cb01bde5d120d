//! ODIN (docs/scores.md#odin) on the small BiT model (ResNetV2-R14x0.5, hash weights) against
//! the PyTorch reference of tests/fixtures/make_ood_fixtures.py: same weights,
//! same input, T = 1000 and 1, epsilon 0 and 0.0014.
mod common;

use common::{fixture, r14, read_named};
use mos::ood::{odin, scores::odin_perturb};
use tch::{nn, Kind, Tensor};

const EPS: f64 = 0.0014;

/// Element-wise `|got - want| <= rtol |want|`; returns the largest relative difference.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64) -> f64 {
    assert_eq!(got.size(), want.size(), "{what}: shapes differ");
    let rel = ((got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs()
        / want.to_kind(Kind::Double).abs())
    .max()
    .double_value(&[]);
    eprintln!("{what}: max relative difference {rel:.3e}");
    assert!(
        rel <= rtol,
        "{what}: relative difference {rel}\n{got}\n{want}"
    );
    rel
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
    assert_eq!((score.size(), score.kind()), (vec![4], Kind::Float));
    assert!(!score.requires_grad());
    assert_no_grads(&vs);
    assert_close(
        "ODIN T=1000 eps=0",
        &score,
        &read_named(&exp, "odin_t1000_e0"),
        1e-5,
    );
    // The same as the logits' max softmax at temperature T.
    let logits = tch::no_grad(|| model.forward(&x));
    assert_close("logits", &logits, &read_named(&exp, "logits"), 1e-4);
    let msp = (logits / 1000.0).softmax(1, None).amax(1, false);
    assert_close("ODIN eps=0 vs MSP(f/T)", &score, &msp, 0.0);
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
        // Every entry moved by exactly one step; the step direction (the sign of the
        // input gradient) agrees with PyTorch's except, at most, where the gradient
        // is too close to 0 for float32 to tell.
        let step = (&xp - &x).abs();
        assert!((step - EPS).abs().max().double_value(&[]) < 1e-6);
        let want_xp = read_named(&exp, &format!("xp_{key}"));
        let differ = (&xp - &want_xp)
            .abs()
            .gt(1e-6)
            .sum(Kind::Int64)
            .int64_value(&[]);
        eprintln!(
            "x' for {key}: {differ} of {} steps differ in sign",
            x.numel()
        );
        assert!(
            differ as f64 <= 1e-3 * x.numel() as f64,
            "{differ} signs differ"
        );

        let score = tch::no_grad(|| odin(&forward, &x, t, EPS)).unwrap();
        assert!(!score.requires_grad());
        assert_close(
            &format!("ODIN {key}"),
            &score,
            &read_named(&exp, &format!("odin_{key}")),
            1e-5,
        );
    }
    // The perturbation matters at T = 1000 (by about 1e-3 relative, 100x the tolerance).
    let perturbed = odin(&forward, &x, 1000.0, EPS).unwrap();
    assert!(bool::try_from(perturbed.gt_tensor(&plain).all()).unwrap());
    assert_no_grads(&vs);
}
