//! The leaderboard's post-hoc scores of src/ood/leaderboard.rs (docs/scores.md):
//! SCALE, NNGuide, fDBD, GEN, Residual, NECO and Entropy against the references of
//! tests/fixtures/make_posthoc_next_fixtures.py, which follow each original
//! repository's code (the commits and lines are in the script), on D = 64
//! features and a C = 10 head (and C = 1000 logits for GEN's tail), from float64
//! and float32 inputs.
mod common;

use common::{check_each, fixture, read_named, to_vec};
use mos::ood::leaderboard as lb;
use mos::ood::posthoc::{self as ph, Head};
use tch::{Kind, Tensor};

fn get(name: &str) -> Tensor {
    read_named(&fixture("posthoc/posthoc_next.safetensors"), name)
}

/// Per-image tolerance `rel × max_i |want_i|` (the score scale).
///
/// float32 inputs (as stores and checkpoints hold them): SCALE and NNGuide are
/// computed in float32, each score a sum, or the energy of sums, of at most
/// D + C = 74 rounded terms (SCALE's e^r adds the rounding of r, itself such a
/// sum), so ~74 u32 = 4.4e-6 of the terms' magnitudes, within 2x the score scale
/// on these data; fDBD, GEN, Entropy, Residual and NECO are computed in float64
/// from the rounded inputs, whose rounding (u32 of each input) moves them by less
/// than that: 1e-5 of the scale, the requirement.
/// float64 inputs: the same sums with u64 (8e-15), plus the eigen-subspaces of
/// Residual and NECO, solved by other LAPACK routines than NumPy's eig and
/// scikit-learn's SVD, whose error is u64 ‖Σ‖ / gap ≲ 1e-13 of the scale for the
/// eigenvalue gaps of these data at the dimensions used: 1e-11 of the scale.
fn rel(kind: Kind) -> f64 {
    if kind == Kind::Float {
        1e-5
    } else {
        1e-11
    }
}

fn compare(what: &str, got: &Tensor, want_name: &str, kind: Kind) {
    let want = get(want_name);
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let scale = want.abs().max().double_value(&[]);
    let errors: Vec<f64> = to_vec(got)
        .iter()
        .zip(to_vec(&want))
        .map(|(a, b)| (a - b).abs())
        .collect();
    let tols = vec![rel(kind) * scale; errors.len()];
    check_each(&format!("{what} ({kind:?} inputs)"), &errors, &tols);
}

struct Inputs {
    train: Tensor,
    train_logits: Tensor,
    h: Tensor,
    logits: Tensor,
    head: Head,
}

fn inputs(kind: Kind) -> Inputs {
    Inputs {
        train: get("train_features").to_kind(kind),
        train_logits: get("train_logits").to_kind(kind),
        h: get("features").to_kind(kind),
        logits: get("logits").to_kind(kind),
        head: Head::new(&get("weight").to_kind(kind), &get("bias").to_kind(kind)).unwrap(),
    }
}

#[test]
fn scores_equal_the_references_of_the_original_code() {
    for kind in [Kind::Double, Kind::Float] {
        let x = inputs(kind);
        for p in [85, 60] {
            compare(
                &format!("SCALE p {p}"),
                &lb::scale(&x.h, &x.head, p as f64).unwrap(),
                &format!("scale_p{p}"),
                kind,
            );
        }
        let bank = lb::nnguide_bank(&x.train, &x.train_logits, None, None).unwrap();
        for k in [10, 3] {
            compare(
                &format!("NNGuide k {k}"),
                &lb::nnguide(&x.h, &x.logits, None, None, &bank, k).unwrap(),
                &format!("nnguide_k{k}"),
                kind,
            );
        }
        // The ResNet-50 variant: clipped at the 0.95 quantile of the bank's features.
        let clip = ph::percentile(&x.train, 95.0).unwrap();
        let want = get("nnguide_clip95_threshold").double_value(&[0]);
        assert!(
            (clip - want).abs() <= 1e-12 * want.abs(),
            "{clip} vs {want}"
        );
        let bank = lb::nnguide_bank(&x.train, &x.train_logits, Some(&x.head), Some(clip)).unwrap();
        compare(
            "NNGuide clipped",
            &lb::nnguide(&x.h, &x.logits, Some(&x.head), Some(clip), &bank, 10).unwrap(),
            "nnguide_clip95_k10",
            kind,
        );
        let mean = ph::feature_mean(&x.train).unwrap();
        let want = get("fdbd_mean");
        assert!(
            (&mean - &want).abs().max().double_value(&[]) < 1e-6,
            "fDBD's mean"
        );
        compare(
            "fDBD",
            &lb::fdbd(&x.logits, &x.h, &mean, &lb::fdbd_denominators(&x.head)).unwrap(),
            "fdbd",
            kind,
        );
        compare(
            "GEN g 0.5 M 5",
            &lb::gen(&x.logits, 0.5, 5).unwrap(),
            "gen_g0.5_m5",
            kind,
        );
        compare(
            "GEN M > C",
            &lb::gen(&x.logits, 0.1, 100).unwrap(),
            "gen_g0.1_m100_small",
            kind,
        );
        compare("Entropy", &lb::entropy(&x.logits).unwrap(), "entropy", kind);
        for dim in [32, 20] {
            let (u, ns) = lb::residual_fit(&x.train, &x.head, dim).unwrap();
            compare(
                &format!("Residual dim {dim}"),
                &lb::residual(&x.h, &u, &ns).unwrap(),
                &format!("residual_d{dim}"),
                kind,
            );
        }
        let signed_train = get("signed_train").to_kind(kind);
        let signed = get("signed_features").to_kind(kind);
        let (u, ns) = lb::residual_fit(&signed_train, &x.head, 32).unwrap();
        compare(
            "Residual, signed features",
            &lb::residual(&signed, &u, &ns).unwrap(),
            "residual_signed_d32",
            kind,
        );
        for (dim, max_logit, key) in [
            (10, false, "neco_d10"),
            (10, true, "neco_d10_maxlogit"),
            (32, false, "neco_d32"),
        ] {
            let p = lb::neco_fit(&x.train, dim).unwrap();
            compare(
                key,
                &lb::neco(&x.h, &x.logits, &p, max_logit).unwrap(),
                key,
                kind,
            );
        }
        let p = lb::neco_fit(&signed_train, 10).unwrap();
        compare(
            "NECO, signed features",
            &lb::neco(&signed, &x.logits, &p, false).unwrap(),
            "neco_signed_d10",
            kind,
        );
    }
}

/// GEN and Entropy over 1,000 classes with confident rows: equal to the float64
/// reference; the original's float32 softmax (1 - p rounded to 0 on the confident
/// rows) is measurably off, which is why mos computes in float64.
#[test]
fn gen_and_entropy_keep_the_tail_of_a_thousand_classes() {
    let wide = get("wide_logits");
    assert_eq!(wide.kind(), Kind::Float);
    let got = lb::gen(&wide, 0.1, 100).unwrap();
    compare(
        "GEN, 1000 classes",
        &got,
        "gen_g0.1_m100_wide_exact",
        Kind::Double,
    );
    let f32_original = to_vec(&get("gen_g0.1_m100_wide_f32"));
    let worst = to_vec(&got)
        .iter()
        .zip(&f32_original)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst > 0.05,
        "the float32 original should lose the confident rows' terms: {worst}"
    );
    compare(
        "Entropy, 1000 classes",
        &lb::entropy(&wide).unwrap(),
        "entropy_wide",
        Kind::Double,
    );
}

/// NNGuide over more queries than one block (2,048) and a bank of several rows per
/// query: equal to one pass of normalise, product with the bank, top k and mean,
/// within the worst-case difference of two float32 summation orders of D terms.
#[test]
fn nnguide_in_query_blocks_equals_one_pass() {
    tch::manual_seed(7);
    let (n, d, c, m, k) = (4500, 32, 7, 300, 10);
    let h = Tensor::rand([n, d], (Kind::Float, tch::Device::Cpu));
    let logits = Tensor::randn([n, c], (Kind::Float, tch::Device::Cpu)) * 3.0;
    let train = Tensor::rand([m, d], (Kind::Float, tch::Device::Cpu));
    let train_logits = Tensor::randn([m, c], (Kind::Float, tch::Device::Cpu)) * 3.0;
    let bank = lb::nnguide_bank(&train, &train_logits, None, None).unwrap();
    let got = lb::nnguide(&h, &logits, None, None, &bank, k).unwrap();
    let x = &h / h.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    let energy = logits.logsumexp(1, false);
    let want = x
        .matmul(&bank.tr())
        .topk(k, 1, true, false)
        .0
        .mean_dim(1, false, None)
        * &energy;
    let bank_norm = bank
        .norm_scalaropt_dim(2, [1i64].as_slice(), false)
        .max()
        .double_value(&[]);
    let e_max = energy.abs().max().double_value(&[]);
    let tol = 2.0 * d as f64 * f64::from(f32::EPSILON) * bank_norm * e_max;
    let worst = (&got - &want).abs().max().double_value(&[]);
    assert_eq!(got.size(), [n]);
    assert!(
        worst <= tol,
        "NNGuide in blocks differs by {worst} (tolerance {tol})"
    );
    // The guidance really varies between rows, so a swapped or dropped block shows.
    let spread = (&want - want.roll([1i64].as_slice(), [0i64].as_slice()))
        .abs()
        .max();
    assert!(spread.double_value(&[]) > 100.0 * tol);
}

#[test]
fn bad_settings_and_small_fits_are_named_errors() {
    let x = inputs(Kind::Float);
    let bank = lb::nnguide_bank(&x.train, &x.train_logits, None, None).unwrap();
    let e = lb::nnguide(&x.h, &x.logits, None, None, &bank, 201)
        .unwrap_err()
        .to_string();
    assert!(e.contains("k = 201 must be in 1..=200"), "{e}");
    let e = lb::scale(&x.h, &x.head, 100.0).unwrap_err().to_string();
    assert!(e.contains("SCALE") && e.contains("(0, 100)"), "{e}");
    let e = lb::neco_fit(&x.train, 65).unwrap_err().to_string();
    assert!(e.contains("in 1..=64"), "{e}");
    let few = x.train.narrow(0, 0, 10);
    let e = lb::neco_fit(&few, 10).unwrap_err().to_string();
    assert!(e.contains("10 training rows"), "{e}");
    let e = lb::residual_fit(&few, &x.head, 32).unwrap_err().to_string();
    assert!(e.contains("10 training rows"), "{e}");
    let e = lb::gen(&x.logits, -1.0, 5).unwrap_err().to_string();
    assert!(e.contains("gamma"), "{e}");
}
