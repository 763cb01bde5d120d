//! The BiT ResNetV2 against the PyTorch reference of
//! tests/fixtures/make_model_fixtures.py (same weights, same input).
mod common;

use common::{assert_rows_close, fixture, r14, read_named, Rng, FORWARD_TOL};
use mos::model::{Freeze, ResNetV2, Variant};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn logits_and_features_match_pytorch() {
    let (_vs, model) = r14();
    let exp = fixture("model/r14_expected.safetensors");
    let x = read_named(&exp, "x");
    let feats = tch::no_grad(|| model.forward_features(&x));
    assert_eq!(feats.len(), 5);
    for (i, f) in feats.iter().enumerate() {
        let want = read_named(&exp, &format!("feat{i}"));
        assert_rows_close(&format!("feat{i}"), f, &want, FORWARD_TOL);
    }
    let logits = tch::no_grad(|| model.forward(&x));
    assert_eq!(logits.size(), [2, 10]);
    assert_rows_close("logits", &logits, &read_named(&exp, "logits"), FORWARD_TOL);
    // A non-square input goes through the same path.
    let xr = read_named(&exp, "x_rect");
    let lr = tch::no_grad(|| model.forward(&xr));
    let want = read_named(&exp, "logits_rect");
    assert_rows_close("logits_rect", &lr, &want, FORWARD_TOL);
}

#[test]
fn forward_to_k_returns_that_stage() {
    let (_vs, model) = r14();
    let x = Rng::new(1).normal_tensor(&[1, 3, 64, 64]);
    let feats = tch::no_grad(|| model.forward_features(&x));
    let channels = model.variant.feature_channels();
    for k in 0..5 {
        let out = tch::no_grad(|| model.forward_to(&x, k));
        assert_eq!(out.size(), feats[k].size());
        assert_eq!(out.size()[1], channels[k]);
        // The same operations on the same input in one process: bit-identical.
        assert!(out.equal(&feats[k]), "stage {k} differs");
    }
}

#[test]
fn parameter_names_follow_the_paper_state_dict() {
    let vs = nn::VarStore::new(Device::Cpu);
    let variant: Variant = "BiT-S-R50x1".parse().unwrap();
    let _m = ResNetV2::new(&vs.root(), variant, 1000);
    let vars = vs.variables();
    for name in [
        "root.conv.weight",
        "body.block1.unit01.gn1.weight",
        "body.block1.unit01.downsample.weight",
        "body.block1.unit03.conv3.weight",
        "body.block4.unit03.gn3.bias",
        "before_head.gn.weight",
        "head.conv.weight",
        "head.conv.bias",
    ] {
        assert!(vars.contains_key(name), "{name} missing");
    }
    assert!(!vars.contains_key("body.block1.unit02.downsample.weight"));
    assert_eq!(vars["head.conv.weight"].size(), [1000, 2048, 1, 1]);
    // ResNet-50 v2 with a 1000-way head: 25,549,352 parameters, the count of the
    // PyTorch reference in make_model_fixtures.py for units 3,4,6,3, width 64.
    let n: i64 = vars.values().map(|t| t.numel() as i64).sum();
    assert_eq!(n, 25_549_352);
    // Zero head.
    assert_eq!(
        vars["head.conv.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

#[test]
fn freeze_policy_matches_num_block_open() {
    let f = |n| Freeze::from_num_block_open(n).unwrap();
    assert!(Freeze::from_num_block_open(5).is_err());
    assert!(Freeze::from_num_block_open(-2).is_err());
    let all = f(-1);
    assert!(all.trainable("root.conv.weight"));
    let head_only = f(0);
    assert!(head_only.trainable("head.conv.bias"));
    assert!(!head_only.trainable("before_head.gn.weight"));
    assert!(!head_only.trainable("body.block4.unit03.conv3.weight"));
    let one = f(1);
    assert!(!one.trainable("body.block3.unit23.conv3.weight"));
    assert!(!one.trainable("body.block4.unit01.gn1.weight"));
    assert!(one.trainable("body.block4.unit01.gn2.weight"));
    assert!(one.trainable("body.block4.unit02.gn1.weight"));
    assert!(one.trainable("before_head.gn.bias"));
    let two = f(2);
    assert!(!two.trainable("body.block3.unit01.gn1.bias"));
    assert!(two.trainable("body.block3.unit01.conv1.weight"));
    assert!(two.trainable("body.block4.unit01.gn1.weight"));
    assert!(!two.trainable("body.block2.unit04.conv2.weight"));
    let four = f(4);
    assert!(!four.trainable("root.conv.weight"));
    assert!(!four.trainable("body.block1.unit01.gn1.weight"));
    assert!(four.trainable("body.block1.unit02.gn1.weight"));
    assert_eq!(f(0).frozen_stages(), 5);
    assert_eq!(f(1).frozen_stages(), 4);
    assert_eq!(f(4).frozen_stages(), 1);
    assert_eq!(f(-1).frozen_stages(), 0);
}

#[test]
fn frozen_stages_build_no_graph() {
    let (vs, model) = r14();
    let x = Rng::new(2).normal_tensor(&[2, 3, 64, 64]);
    let logits = model.forward_train(&x, Freeze::AllButHead);
    logits.sum(Kind::Float).backward();
    let vars = vs.variables();
    assert!(vars["head.conv.weight"].grad().defined());
    assert!(!vars["body.block4.unit01.conv3.weight"].grad().defined());
    assert!(!vars["root.conv.weight"].grad().defined());
}

/// Logits and the trainable parameters' gradients of one training forward.
fn train_pass(vs: &nn::VarStore, model: &ResNetV2, x: &Tensor, freeze: Freeze) -> Vec<Tensor> {
    let trainable = mos::model::bit::apply_freeze(vs, freeze);
    let logits = model.forward_train(x, freeze);
    let params: Vec<&Tensor> = trainable.iter().map(|(_, t)| t).collect();
    let mut out = Tensor::run_backward(&[logits.sum(Kind::Float)], &params, false, false);
    out.push(logits.detach());
    out
}

#[test]
fn fixed_frozen_weights_give_the_same_numbers() {
    let (vs, mut model) = r14();
    let x = Rng::new(3).normal_tensor(&[2, 3, 64, 64]);
    let freeze = Freeze::OpenBlocks(2);
    let live = train_pass(&vs, &model, &x, freeze);
    model.fix_frozen_weights(freeze);
    let fixed = train_pass(&vs, &model, &x, freeze);
    assert_eq!(live.len(), fixed.len());
    for (a, b) in live.iter().zip(&fixed) {
        assert!(a.equal(b), "fixing the frozen weights changed a number");
    }
    // The copies are what the frozen stages use until they are dropped.
    let root = vs.variables()["root.conv.weight"].shallow_clone();
    let _ = tch::no_grad(|| root.shallow_clone().g_mul_scalar_(2.0).g_add_scalar_(0.01));
    let stale = tch::no_grad(|| model.forward_train(&x, freeze));
    assert!(stale.equal(&fixed[fixed.len() - 1]));
    model.unfix_weights();
    let changed = tch::no_grad(|| model.forward_train(&x, freeze));
    assert!(!changed.equal(&stale));
    // An open stage never uses a copy: fixing for -1 changes nothing.
    model.fix_frozen_weights(Freeze::None);
    let open = tch::no_grad(|| model.forward_train(&x, freeze));
    assert!(open.equal(&changed));
}
