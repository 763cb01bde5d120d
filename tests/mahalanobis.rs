//! The Mahalanobis score of src/ood/mahalanobis.rs on the ResNetV2-R14x0.5 (hash
//! weights) against the PyTorch reference of
//! tests/fixtures/make_mahalanobis_fixtures.py: per-layer input pre-processing,
//! the regression features M for three noise magnitudes, the regression score and
//! the FGSM images of the tuning.
mod common;

use common::{fixture, r14, read_named};
use mos::model::bit::spatial_mean;
use mos::ood::mahalanobis::{
    fgsm_adversarial, mahalanobis_features, perturb_input, regressor_features,
    score_from_regression, GaussianLayer, FGSM_STEP,
};
use tch::{nn, Device, Kind, Tensor};

const MAGNITUDES: [(f64, &str); 3] = [(0.0, "0"), (0.0014, "0.0014"), (0.01, "0.01")];

fn expected() -> std::path::PathBuf {
    fixture("ood/mahalanobis_model.safetensors")
}

/// The fixture's Gaussians: mean<l> and P = a I + B B^T.
fn gaussians() -> Vec<GaussianLayer> {
    let exp = expected();
    (0..5)
        .map(|l| {
            let mean = read_named(&exp, &format!("mean{l}"));
            let b = read_named(&exp, &format!("prec_b{l}"));
            let a = read_named(&exp, &format!("prec_a{l}")).double_value(&[]);
            let p = Tensor::eye(b.size()[0], (Kind::Double, Device::Cpu)) * a + b.matmul(&b.tr());
            GaussianLayer::new(&mean, &p).unwrap()
        })
        .collect()
}

/// Asserts max |got - want| / |want| <= rtol element-wise; returns the largest.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64) -> f64 {
    assert_eq!(got.size(), want.size(), "{what}: shapes differ");
    let want = want.to_kind(Kind::Double);
    let rel = ((got.to_kind(Kind::Double) - &want).abs() / want.abs())
        .max()
        .double_value(&[]);
    eprintln!("{what}: max relative difference {rel:.2e}");
    assert!(
        rel <= rtol,
        "{what}: relative difference {rel:e} > {rtol:e}"
    );
    rel
}

fn assert_no_grads(vs: &nn::VarStore) {
    for (name, var) in vs.variables() {
        assert!(!var.grad().defined(), "{name} got a gradient");
    }
}

/// Number of entries of `got` and `want` farther apart than 1e-6.
fn count_differing(got: &Tensor, want: &Tensor) -> i64 {
    (got - want)
        .abs()
        .gt(1e-6)
        .sum(Kind::Int64)
        .int64_value(&[])
}

#[test]
fn input_preprocessing_steps_against_the_pytorch_gradient_sign() {
    let (vs, model) = r14();
    let exp = expected();
    let x = read_named(&exp, "x");
    let mag = 0.01;
    for (l, g) in gaussians().iter().enumerate() {
        let forward = |x: &Tensor| spatial_mean(&model.forward_to(x, l));
        let xp = perturb_input(&forward, &x, g, mag).unwrap();
        assert!(!xp.requires_grad());
        let sign = read_named(&exp, &format!("sign{l}")).to_kind(Kind::Float);
        let want = &x - sign * mag;
        let differ = count_differing(&xp, &want);
        eprintln!("layer {l}: {differ} of {} steps differ in sign", x.numel());
        assert!(
            differ as f64 <= 1e-3 * x.numel() as f64,
            "{differ} signs differ"
        );
    }
    assert_no_grads(&vs);
}

#[test]
fn regression_features_and_scores_match_pytorch() {
    let (vs, model) = r14();
    let exp = expected();
    let x = read_named(&exp, "x");
    let layers = gaussians();
    let forward = |l: usize, x: &Tensor| spatial_mean(&model.forward_to(x, l));
    let w = Vec::<f64>::try_from(read_named(&exp, "lr_w")).unwrap();
    let b = read_named(&exp, "lr_b").double_value(&[]);
    for (mag, key) in MAGNITUDES {
        let m = mahalanobis_features(&forward, &x, &layers, mag).unwrap();
        assert_eq!((m.size(), m.kind()), (vec![4, 5], Kind::Double));
        assert!(!m.requires_grad());
        assert_close(
            &format!("M, magnitude {key}"),
            &m,
            &read_named(&exp, &format!("m_{key}")),
            1e-5,
        );
        let score = score_from_regression(&m, &w, b).unwrap();
        let want = read_named(&exp, &format!("score_{key}"));
        assert_close(&format!("score, magnitude {key}"), &score, &want, 1e-5);
    }
    // Without noise, one forward pass for all layers gives the same M.
    let feats: Vec<Tensor> = tch::no_grad(|| model.forward_features(&x))
        .iter()
        .map(spatial_mean)
        .collect();
    let m0 = regressor_features(&feats, &layers).unwrap();
    assert_close("M from one pass", &m0, &read_named(&exp, "m_0"), 1e-5);
    assert_no_grads(&vs);
}

#[test]
fn fgsm_images_match_pytorch() {
    let (vs, model) = r14();
    let exp = expected();
    let x = read_named(&exp, "x");
    let labels = read_named(&exp, "fgsm_labels");
    let forward = |x: &Tensor| model.forward(x);
    let adv = fgsm_adversarial(&forward, &x, &labels, FGSM_STEP).unwrap();
    assert!(!adv.requires_grad());
    assert_eq!((adv.size(), adv.kind()), (x.size(), Kind::Float));
    let differ = count_differing(&adv, &read_named(&exp, "x_adv"));
    eprintln!("FGSM: {differ} of {} entries differ", x.numel());
    assert!(
        differ as f64 <= 1e-3 * x.numel() as f64,
        "{differ} entries differ"
    );
    // The original's clamp: everything in [0, 1], though x lies in [-1, 1).
    assert_eq!(adv.min().double_value(&[]), 0.0);
    assert!(adv.max().double_value(&[]) <= 1.0);
    assert_no_grads(&vs);
}
