//! The Mahalanobis score of src/ood/mahalanobis.rs on the ResNetV2-R14x0.5 (hash
//! weights) against the PyTorch reference of
//! tests/fixtures/make_mahalanobis_fixtures.py: per-layer input pre-processing,
//! the regression features M for three noise magnitudes, the regression score and
//! the FGSM images of the tuning.
mod common;

use common::{check_each, check_step_signs, fixture, r14, read_named, to_vec, FORWARD_TOL, U64};
use mos::model::bit::spatial_mean;
use mos::model::ResNetV2;
use mos::ood::mahalanobis::{
    fgsm_adversarial, mahalanobis_features, perturb_input, regressor_features,
    score_from_regression, GaussianLayer, FGSM_STEP,
};
use tch::{nn, Device, Kind, Tensor};

const MAGNITUDES: [(f64, &str); 3] = [(0.0, "0"), (0.0014, "0.0014"), (0.01, "0.01")];

fn expected() -> std::path::PathBuf {
    fixture("ood/mahalanobis_model.safetensors")
}

/// One layer's Gaussians from the fixture: mean<l> and P = a I + B B^T, with an
/// upper bound a + |B|_F^2 on the spectral norm of P.
struct Layer {
    gaussian: GaussianLayer,
    mean: Tensor,
    p: Tensor,
    p_norm: f64,
}

fn layers() -> Vec<Layer> {
    let exp = expected();
    (0..5)
        .map(|l| {
            let mean = read_named(&exp, &format!("mean{l}"));
            let b = read_named(&exp, &format!("prec_b{l}"));
            let a = read_named(&exp, &format!("prec_a{l}")).double_value(&[]);
            let p = Tensor::eye(b.size()[0], (Kind::Double, Device::Cpu)) * a + b.matmul(&b.tr());
            let p_norm = a + b.square().sum(Kind::Double).double_value(&[]);
            let gaussian = GaussianLayer::new(&mean, &p).unwrap();
            Layer {
                gaussian,
                mean,
                p,
                p_norm,
            }
        })
        .collect()
}

/// Per image, the bound on |m(f) - m(f_ref)| for m = max_c s_c, s_c(f) = -1/2
/// (f - mu_c)^T P (f - mu_c), features f, f_ref [N, D]: with d = f - f_ref, exactly
/// s_c(f) - s_c(f_ref) = -(f_ref - mu_c)^T P d - d^T P d / 2, so it is at most
/// |P (f_ref - mu_c)| |d| + |P| |d|^2 / 2 (the max over c moves no more); plus
/// both sides' float64 rounding, <= 8 D u64 |P| (|f - centre| + |mu_c - centre|)^2
/// (our centred expansion; |P| bounds the norm of |P| too).
fn m_tolerance(f: &Tensor, f_ref: &Tensor, layer: &Layer) -> Vec<f64> {
    let (f, f_ref) = (f.to_kind(Kind::Double), f_ref.to_kind(Kind::Double));
    let (n, d) = (f.size()[0], f.size()[1]);
    let norm = |t: &Tensor, dim: i64| t.square().sum_dim_intlist(dim, false, Kind::Double).sqrt();
    let dist = to_vec(&norm(&(&f - &f_ref), 1));
    let z = f_ref.unsqueeze(1) - layer.mean.unsqueeze(0); // [N, C, D]
    let pz = to_vec(&norm(&z.matmul(&layer.p), 2).amax(1, false));
    let centre = layer.mean.mean_dim(0, true, Kind::Double);
    let fc = to_vec(&norm(&(&f - &centre), 1));
    let mc = norm(&(&layer.mean - &centre), 1).max().double_value(&[]);
    (0..n as usize)
        .map(|i| {
            pz[i] * dist[i]
                + 0.5 * layer.p_norm * dist[i] * dist[i]
                + 8.0 * d as f64 * U64 * layer.p_norm * (fc[i] + mc).powi(2)
        })
        .collect()
}

/// The bound on |sigmoid(w.M + b) - sigmoid(w.M' + b)| when |M_l - M'_l| <=
/// tol_m[l]: |dz| <= sum |w_l| tol_m[l] plus both sides' float64 rounding of the
/// sum (5 products, 5 additions), and |d sigmoid| <= sigmoid'(z) e^|dz| |dz|
/// (|(log sigmoid')'| <= 1), plus the rounding of the sigmoid (4 u64 each side).
fn score_tolerance(w: &[f64], b: f64, m: &[f64], tol_m: &[f64]) -> f64 {
    let z: f64 = w.iter().zip(m).map(|(w, m)| w * m).sum::<f64>() + b;
    let size: f64 = w.iter().zip(m).map(|(w, m)| (w * m).abs()).sum::<f64>() + b.abs();
    let dz: f64 =
        w.iter().zip(tol_m).map(|(w, t)| w.abs() * t).sum::<f64>() + 2.0 * 10.0 * U64 * size;
    let s = 1.0 / (1.0 + (-z).exp());
    s * (1.0 - s) * dz.exp() * dz + 2.0 * 4.0 * U64 * s
}

/// The input pre-processing's loss, the batch mean of 1/2 (f - mu_c*)^T P (f - mu_c*)
/// with c* the best class, and its input gradient by autograd (its size decides
/// which signs may flip).
fn layer_loss_grad(model: &ResNetV2, x: &Tensor, l: usize, layer: &Layer) -> Tensor {
    let input = x.detach().set_requires_grad(true);
    let f = spatial_mean(&model.forward_to(&input, l)).to_kind(Kind::Double);
    let best = tch::no_grad(|| layer.gaussian.class_scores(&f))
        .unwrap()
        .argmax(1, false);
    let z = &f - layer.mean.index_select(0, &best);
    let loss = (z.matmul(&layer.p) * &z)
        .sum_dim_intlist(1, false, Kind::Double)
        .mean(Kind::Double)
        * 0.5;
    Tensor::run_backward(&[loss], &[&input], false, false).remove(0)
}

fn assert_no_grads(vs: &nn::VarStore) {
    for (name, var) in vs.variables() {
        assert!(!var.grad().defined(), "{name} got a gradient");
    }
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

/// PyTorch's pre-processed input of layer l: x - magnitude sign<l>.
fn torch_input(x: &Tensor, l: usize, mag: f64) -> Tensor {
    let sign = read_named(&expected(), &format!("sign{l}")).to_kind(Kind::Float);
    x - sign * mag
}

#[test]
fn input_preprocessing_steps_against_the_pytorch_gradient_sign() {
    let (vs, model) = r14();
    let x = read_named(&expected(), "x");
    let mag = 0.01;
    for (l, layer) in layers().iter().enumerate() {
        let forward = |x: &Tensor| spatial_mean(&model.forward_to(x, l));
        let xp = perturb_input(&forward, &x, &layer.gaussian, mag).unwrap();
        assert!(!xp.requires_grad());
        let grad = layer_loss_grad(&model, &x, l, layer);
        check_step_signs(
            &format!("layer {l} step"),
            &xp,
            &torch_input(&x, l, mag),
            &grad,
        );
    }
    assert_no_grads(&vs);
}

#[test]
fn regression_features_and_scores_match_pytorch() {
    let (vs, model) = r14();
    let exp = expected();
    let x = read_named(&exp, "x");
    let layers = layers();
    let gaussians: Vec<GaussianLayer> = layers
        .iter()
        .map(|l| GaussianLayer::new(&l.mean, &l.p).unwrap())
        .collect();
    let forward = |l: usize, x: &Tensor| spatial_mean(&model.forward_to(x, l));
    let w = Vec::<f64>::try_from(read_named(&exp, "lr_w")).unwrap();
    let b = read_named(&exp, "lr_b").double_value(&[]);
    for (mag, key) in MAGNITUDES {
        let m = mahalanobis_features(&forward, &x, &gaussians, mag).unwrap();
        assert_eq!((m.size(), m.kind()), (vec![4, 5], Kind::Double));
        assert!(!m.requires_grad());
        let want = read_named(&exp, &format!("m_{key}"));
        let want_score = to_vec(&read_named(&exp, &format!("score_{key}")));
        // Per layer, PyTorch's features at its pre-processed input; entries whose
        // input is not ours (a sign flipped where the gradient is ~0) are left out.
        let (mut f_err, mut f_tol) = (vec![], vec![]);
        let (mut m_err, mut m_tol, mut ref_err, mut ref_tol) = (vec![], vec![], vec![], vec![]);
        let mut tol_m = vec![vec![0.0; 5]; 4];
        let mut same = [true; 4];
        for (l, layer) in layers.iter().enumerate() {
            let xl = if mag == 0.0 {
                x.shallow_clone()
            } else {
                let f = |x: &Tensor| forward(l, x);
                perturb_input(&f, &x, &layer.gaussian, mag).unwrap()
            };
            let out = tch::no_grad(|| model.forward_to(&xl, l));
            let f = spatial_mean(&out);
            let f_ref = read_named(&exp, &format!("feat{l}_{key}"));
            let col = |t: &Tensor| to_vec(&t.select(1, l as i64));
            // M from PyTorch's own features: only float64 rounding apart.
            let m_ref = layer.gaussian.max_score(&f_ref).unwrap();
            ref_err.extend(abs_diff(&m_ref, &want.select(1, l as i64)));
            ref_tol.extend(m_tolerance(&f_ref, &f_ref, layer));
            let torch_x = torch_input(&x, l, mag);
            let tol = m_tolerance(&f, &f_ref, layer);
            let (got_m, want_m) = (col(&m), col(&want));
            let out_max = to_vec(&out.abs().reshape([4, -1]).amax(1, false));
            let f_diff = to_vec(&(&f - &f_ref).abs().amax(1, false));
            for n in 0..4 {
                tol_m[n][l] = tol[n];
                if mag == 0.0 || xl.get(n as i64).equal(&torch_x.get(n as i64)) {
                    // Each feature is a spatial mean of entries within FORWARD_TOL.
                    f_err.push(f_diff[n]);
                    f_tol.push(FORWARD_TOL * out_max[n]);
                    m_err.push((got_m[n] - want_m[n]).abs());
                    m_tol.push(tol[n]);
                } else {
                    same[n] = false;
                }
            }
        }
        eprintln!(
            "magnitude {key}: {} of 20 (image, layer) inputs are PyTorch's",
            m_err.len()
        );
        check_each(&format!("features, magnitude {key}"), &f_err, &f_tol);
        check_each(
            &format!("M of PyTorch's features, magnitude {key}"),
            &ref_err,
            &ref_tol,
        );
        check_each(&format!("M, magnitude {key}"), &m_err, &m_tol);

        // The regression score of PyTorch's M, and of ours.
        let want_m: Vec<Vec<f64>> = (0..4).map(|n| to_vec(&want.get(n))).collect();
        let got = to_vec(&score_from_regression(&want, &w, b).unwrap());
        let errs: Vec<f64> = (0..4).map(|n| (got[n] - want_score[n]).abs()).collect();
        let tols: Vec<f64> = (0..4)
            .map(|n| score_tolerance(&w, b, &want_m[n], &[0.0; 5]))
            .collect();
        check_each(
            &format!("score of PyTorch's M, magnitude {key}"),
            &errs,
            &tols,
        );
        let got = to_vec(&score_from_regression(&m, &w, b).unwrap());
        let keep: Vec<usize> = (0..4).filter(|&n| same[n]).collect();
        let errs: Vec<f64> = keep
            .iter()
            .map(|&n| (got[n] - want_score[n]).abs())
            .collect();
        let tols: Vec<f64> = keep
            .iter()
            .map(|&n| score_tolerance(&w, b, &want_m[n], &tol_m[n]))
            .collect();
        check_each(&format!("score, magnitude {key}"), &errs, &tols);
    }
    // Without noise, one forward pass for all layers gives M too.
    let outs = tch::no_grad(|| model.forward_features(&x));
    let feats: Vec<Tensor> = outs.iter().map(spatial_mean).collect();
    let m0 = regressor_features(&feats, &gaussians).unwrap();
    let want = read_named(&exp, "m_0");
    let (mut errs, mut tols) = (vec![], vec![]);
    for (l, layer) in layers.iter().enumerate() {
        errs.extend(abs_diff(&m0.select(1, l as i64), &want.select(1, l as i64)));
        let f_ref = read_named(&exp, &format!("feat{l}_0"));
        tols.extend(m_tolerance(&feats[l], &f_ref, layer));
    }
    check_each("M from one pass", &errs, &tols);
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
    let grad = {
        let input = x.detach().set_requires_grad(true);
        let loss = model.forward(&input).cross_entropy_for_logits(&labels);
        Tensor::run_backward(&[loss], &[&input], false, false).remove(0)
    };
    check_step_signs("FGSM", &adv, &read_named(&exp, "x_adv"), &grad);
    // The original's clamp: everything in [0, 1], though x lies in [-1, 1).
    assert_eq!(adv.min().double_value(&[]), 0.0);
    assert!(adv.max().double_value(&[]) <= 1.0);
    assert_no_grads(&vs);
}

/// `mos benchmark`'s shared pass (pipeline::score::image_pass::forward_with_pass): one
/// forward pass with a graph gives the stored outputs and, from the same graph,
/// the input gradients of ODIN and Mahalanobis; every value equals the separate
/// passes of test-baseline (ood::odin, pipeline::score::image_pass::mahalanobis) and the
/// extraction's no-grad forward (forward_batch) bit for bit: the same operations on
/// the same values, each gradient through the part of the graph its loss depends on.
#[test]
fn shared_pass_equals_the_separate_passes() {
    use mos::pipeline::extract::forward_batch;
    use mos::pipeline::score::image_pass::{forward_with_pass, ImagePass};
    use mos::pipeline::score::MahalanobisParams;
    use mos::pipeline::score::Method;
    use mos::pipeline::vocab::Layers;
    let (vs, model) = r14();
    let model = mos::model::Network::Bit(model);
    let exp = expected();
    let x = read_named(&exp, "x");
    let gaussians = || layers().into_iter().map(|l| l.gaussian).collect();
    let w = Vec::<f64>::try_from(read_named(&exp, "lr_w")).unwrap();
    let b = read_named(&exp, "lr_b").double_value(&[]);
    let params = MahalanobisParams {
        layers: gaussians(),
        lr_weight: w,
        lr_bias: b,
        magnitude: 0.0014,
    };
    let (t, eps) = (1000.0, 0.002);
    let methods = [
        Method::Odin {
            temperature: t,
            epsilon: eps,
        },
        Method::Mahalanobis(std::rc::Rc::new(params)),
    ];
    let all = Layers {
        logits: true,
        features: true,
        mahalanobis: true,
        rankfeat: false,
        rankfeat_power_iterations: 0,
    };
    for layers in [Layers::LOGITS, all] {
        let (out, ps) =
            forward_with_pass(&model, &x, layers, &ImagePass { methods: &methods }).unwrap();
        let want = forward_batch(&model, &x, layers);
        assert!(out.logits.equal(&want.logits), "logits");
        assert_eq!(out.features.is_some(), want.features.is_some());
        if let (Some(a), Some(b)) = (&out.features, &want.features) {
            assert!(a.equal(b), "features");
        }
        assert_eq!(out.layers.len(), want.layers.len());
        for (l, (a, b)) in out.layers.iter().zip(&want.layers).enumerate() {
            assert!(a.equal(b), "layer {l}");
        }
        assert!(!out.logits.requires_grad());
        let odin = mos::ood::odin(&|t: &Tensor| model.forward(t), &x, t, eps).unwrap();
        assert!(ps.scores[0].equal(&odin.to_kind(Kind::Double)), "ODIN");
        let Method::Mahalanobis(p) = &methods[1] else {
            unreachable!()
        };
        let maha = mos::pipeline::score::image_pass::mahalanobis(&model, p, &x).unwrap();
        assert!(ps.scores[1].equal(&maha), "Mahalanobis");
        assert_eq!(ps.seconds.len(), 2);
    }
    assert_no_grads(&vs);
}
