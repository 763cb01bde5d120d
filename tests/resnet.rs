//! torchvision's ResNets (src/model/resnet.rs) against torchvision 0.26 itself
//! (tests/fixtures/make_resnet_fixtures.py: the same hash weights, the same input).
mod common;

use std::path::Path;

use common::cli::{fails, mos, ok};
use common::{
    assert_rows_close, assert_state_dict_keys, e2e_folder, fill_with, fixture, read_named,
    tv_hash_tensor, U32,
};
use mos::model::resnet::{is_bookkeeping, ResNetArch, TorchvisionResNet, RESNETS};
use tch::{nn, Device, Kind, Tensor};

/// Two float32 forward passes of a ResNet (ours and torchvision's, or with other
/// kernels), per sample, relative to the largest entry: they differ only in
/// summation order, ~u32 sqrt(K) <= 4.1e-6 per convolution of K <= 4,608 terms.
/// BatchNorm in evaluation mode is an affine map that renormalises nothing, so the
/// relative errors of the <= 53 convolutions on a path add up: <= 53 x 4.1e-6 =
/// 2.2e-4; the tolerance leaves a factor of about 2 over that bound.
const RESNET_TOL: f64 = 5e-4;

/// `arch` with a `head`-way head and the fixtures' hash weights.
fn hashed_with(arch: &str, head: i64) -> (nn::VarStore, TorchvisionResNet) {
    let vs = nn::VarStore::new(Device::Cpu);
    let arch: ResNetArch = arch.parse().unwrap();
    let m = TorchvisionResNet::new(&vs.root(), arch, head);
    fill_with(&vs, tv_hash_tensor);
    (vs, m)
}

/// `arch` with a 10-way head and the fixtures' hash weights.
fn hashed(arch: &str) -> (nn::VarStore, TorchvisionResNet) {
    hashed_with(arch, 10)
}

#[test]
fn the_tolerance_follows_from_float32() {
    let per_conv = U32 * (4608f64).sqrt();
    assert!(53.0 * per_conv * 2.0 < RESNET_TOL, "{per_conv:e}");
}

#[test]
fn logits_features_and_pre_logits_match_torchvision() {
    let exp = fixture("resnet/expected.safetensors");
    let x = read_named(&exp, "x");
    for name in ["resnet18", "resnet50"] {
        let (_vs, m) = hashed(name);
        let mut out = tch::no_grad(|| m.stage(0, &x));
        for k in 0..5 {
            if k > 0 {
                out = tch::no_grad(|| m.stage(k, &out));
            }
            let got = out.mean_dim(&[2i64, 3][..], false, None::<Kind>);
            let want = read_named(&exp, &format!("{name}.feat{k}"));
            assert_eq!(
                got.size()[1],
                m.arch.feature_channels()[k],
                "{name} feat{k}"
            );
            assert_rows_close(&format!("{name}.feat{k}"), &got, &want, RESNET_TOL);
        }
        let pre = m.pre_logits(&out);
        assert_eq!(pre.size(), [2, m.arch.head_in()]);
        let want = read_named(&exp, &format!("{name}.pre_logits"));
        assert_rows_close(&format!("{name}.pre_logits"), &pre, &want, RESNET_TOL);
        let logits = tch::no_grad(|| m.forward(&x));
        let want = read_named(&exp, &format!("{name}.logits"));
        assert_rows_close(&format!("{name}.logits"), &logits, &want, RESNET_TOL);
        // The staged path is the forward pass, bit for bit.
        assert!(m.head_of_pooled(&pre).equal(&logits), "{name}");
    }
    // ResNet-50 at the 224 x 224 of its ImageNet evaluation.
    let (_vs, m) = hashed("resnet50");
    let x = read_named(&exp, "x224");
    let logits = tch::no_grad(|| m.forward(&x));
    let want = read_named(&exp, "resnet50.logits224");
    assert_rows_close("resnet50.logits224", &logits, &want, RESNET_TOL);
}

#[test]
fn variables_are_torchvisions_state_dict_keys() {
    let text = std::fs::read_to_string(fixture("resnet/keys.json")).unwrap();
    let keys: serde_json::Value = serde_json::from_str(&text).unwrap();
    for arch in RESNETS {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = TorchvisionResNet::new(&vs.root(), *arch, 1000);
        let buffer = |k: &str| k.ends_with("running_mean") || k.ends_with("running_var");
        assert_state_dict_keys(
            arch.name,
            &vs,
            &keys["models"][arch.name],
            &is_bookkeeping,
            &|k| !buffer(k),
        );
    }
}

#[test]
fn evaluation_mode_uses_the_running_statistics() {
    // The same batch twice, or one image of it alone: evaluation mode keeps each
    // image's output independent of the others (no batch statistics).
    let (_vs, m) = hashed("resnet18");
    let exp = fixture("resnet/expected.safetensors");
    let x = read_named(&exp, "x");
    let both = tch::no_grad(|| m.forward(&x));
    let first = tch::no_grad(|| m.forward(&x.narrow(0, 0, 1)));
    assert_rows_close("alone", &first, &both.narrow(0, 0, 1), RESNET_TOL);
}

/// A torchvision-named resnet18 state dict (3-way head, the fixtures' hash
/// weights, BatchNorm counters included as torchvision writes them) as safetensors.
fn resnet18_file(path: &Path) {
    let (vs, _m) = hashed_with("resnet18", 3);
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    named.push((
        "bn1.num_batches_tracked".into(),
        Tensor::from_slice(&[0i64]).reshape([]),
    ));
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path).unwrap();
}

#[test]
fn extract_score_and_test_baseline_run_a_torchvision_resnet() {
    let dir = tempfile::tempdir().unwrap();
    let (data, w) = (
        dir.path().join("data"),
        dir.path().join("resnet18.safetensors"),
    );
    e2e_folder(&data);
    resnet18_file(&w);
    let store = dir.path().join("store");
    let extract = |out: &Path| {
        let mut c = mos();
        c.args([
            "extract", "--model", "resnet18", "--crop", "32", "--resize", "41",
        ])
        .args([
            "--layers",
            "logits,features",
            "--batch",
            "4",
            "--workers",
            "2",
        ])
        .args(["--device", "cpu", "--model-path"])
        .arg(&w)
        .arg("--datadir")
        .arg(&data)
        .arg("--output")
        .arg(out);
        c
    };
    ok(&mut extract(&store));
    // The stored outputs are torchvision's on torchvision's pixels.
    let s = mos::pipeline::store::load(&store).unwrap();
    let exp = fixture("resnet/expected.safetensors");
    assert_eq!(s.labels, [0, 0, 1, 1, 2, 2]);
    assert_eq!(s.manifest.resize, Some(41));
    assert_eq!(
        (s.manifest.crop, s.manifest.model.as_str()),
        (32, "resnet18")
    );
    let want = read_named(&exp, "e2e.logits");
    assert_rows_close("e2e.logits", &s.logits, &want, RESNET_TOL);
    let feats = s.features.as_ref().unwrap();
    assert_rows_close(
        "e2e.features",
        feats,
        &read_named(&exp, "e2e.features"),
        RESNET_TOL,
    );

    // mos score from the stores, the post-hoc methods reading the head (fc) from
    // the checkpoint; test-baseline's MSP from the images equals the store's.
    let ood = dir.path().join("ood");
    ok(&mut extract(&ood));
    let logdir = dir.path().join("runs");
    ok(mos()
        .args([
            "score",
            "--score",
            "MSP,MaxLogit,ASH-S",
            "--name",
            "s",
            "--device",
            "cpu",
        ])
        .arg("--id")
        .arg(&store)
        .arg("--ood")
        .arg(&ood)
        .arg("--logdir")
        .arg(&logdir));
    ok(mos()
        .args([
            "test-baseline",
            "--model",
            "resnet18",
            "--crop",
            "32",
            "--resize",
            "41",
        ])
        .args([
            "--score", "MSP", "--name", "t", "--batch", "4", "--device", "cpu",
        ])
        .arg("--model-path")
        .arg(&w)
        .arg("--in-datadir")
        .arg(&data)
        .arg("--out-datadir")
        .arg(&data)
        .arg("--logdir")
        .arg(&logdir));
    let rows = |name: &str| -> serde_json::Value {
        let t = std::fs::read_to_string(logdir.join(name).join("results.json")).unwrap();
        serde_json::from_str(&t).unwrap()
    };
    let (s_rows, t_rows) = (rows("s"), rows("t"));
    let names: Vec<&str> = s_rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["MSP", "MaxLogit", "ASH-S"]);
    assert_eq!(t_rows[0]["settings"]["resize"], 41);
    for k in ["auroc", "fpr95", "aupr_in"] {
        assert_eq!(s_rows[0][k], t_rows[0][k], "{k}");
    }
    // mos benchmark: the same transform from --crop and --resize, the same rows.
    let same = dir.path().join("same");
    e2e_folder(&same);
    ok(mos()
        .args([
            "benchmark",
            "--model",
            "resnet18",
            "--crop",
            "32",
            "--resize",
            "41",
        ])
        .args([
            "--score", "MSP", "--name", "b", "--batch", "4", "--device", "cpu",
        ])
        .arg("--flat-model-path")
        .arg(&w)
        .arg("--in-datadir")
        .arg(&data)
        .arg("--out-datadir")
        .arg(&same)
        .arg("--logdir")
        .arg(&logdir));
    let b_rows = rows("b");
    for k in ["auroc", "fpr95", "aupr_in"] {
        assert_eq!(s_rows[0][k], b_rows[0][k], "{k}");
    }
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(logdir.join("b/stores/flat/data/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (m["crop"].as_u64(), m["resize"].as_u64()),
        (Some(32), Some(41))
    );
}

#[test]
fn torchvision_models_refuse_what_they_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let (data, w) = (
        dir.path().join("data"),
        dir.path().join("resnet18.safetensors"),
    );
    e2e_folder(&data);
    resnet18_file(&w);
    let extract = |model: &str, extra: &[&str]| {
        let mut c = mos();
        c.args([
            "extract",
            "--model",
            model,
            "--device",
            "cpu",
            "--model-path",
        ])
        .arg(&w)
        .arg("--datadir")
        .arg(&data)
        .arg("--output")
        .arg(dir.path().join(format!("s-{model}")))
        .args(extra);
        c
    };
    // resnet18 weights for resnet50: the tensors that do not fit are named.
    let e = fails(&mut extract("resnet50", &[]));
    assert!(
        e.contains("layer1.0.conv1.weight") && e.contains("resnet50"),
        "{e}"
    );
    // BiT resizes to crop x crop: --resize is refused, naming the flag.
    let e = fails(&mut extract("ResNetV2-R14x0.5", &["--resize", "40"]));
    assert!(e.contains("--resize 40"), "{e}");
    let e = fails(&mut extract(
        "resnet18",
        &["--crop", "64", "--resize", "48"],
    ));
    assert!(e.contains("--resize 48 is smaller than --crop 64"), "{e}");
    let e = fails(&mut extract("resnet18", &["--precision", "bf16"]));
    assert!(e.contains("float32 only"), "{e}");
    // Published numbers of another setup are refused before anything is computed.
    let published = dir.path().join("published.json");
    std::fs::write(
        &published,
        r#"{"source": "s", "setup": {"model": "resnet50", "crop": 224, "resize": 256}, "cells": [{"method": "MSP", "set": "data", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
    )
    .unwrap();
    let e = fails(
        mos()
            .args([
                "benchmark",
                "--model",
                "resnet18",
                "--score",
                "MSP",
                "--name",
                "b",
            ])
            .args(["--device", "cpu", "--flat-model-path"])
            .arg(&w)
            .arg("--in-datadir")
            .arg(&data)
            .arg("--out-datadir")
            .arg(&data)
            .arg("--published")
            .arg(&published)
            .arg("--logdir")
            .arg(dir.path()),
    );
    assert!(
        e.contains("measured with --model resnet50, this run has --model resnet18"),
        "{e}"
    );
    // mos forward is BiT's.
    let e = fails(
        mos()
            .args([
                "forward",
                "--model",
                "resnet18",
                "--device",
                "cpu",
                "--model-path",
            ])
            .arg(&w)
            .args(["--input", "x.safetensors", "--output", "y.safetensors"]),
    );
    assert!(e.contains("mos forward runs BiT models"), "{e}");
}

/// Two fine-tuning steps of resnet18 with `--num-block-open 1` (the stem and
/// layer1..3 frozen in evaluation mode, layer4 in training mode, a zero head),
/// mos's TrainNet and Sgd against the same steps in PyTorch
/// (make_tv_train_fixtures.py): logits, losses, the updated parameters and the
/// BatchNorm running statistics, updated in layer4 and kept in the frozen stages.
#[test]
fn fine_tuning_steps_equal_torchvision_trained_in_pytorch() {
    use mos::model::trainable::TrainNet;
    use mos::model::Freeze;
    let exp = fixture("resnet/train_step.safetensors");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = TrainNet::new(&vs.root(), "resnet18".parse().unwrap(), 3).unwrap();
    fill_with(&vs, tv_hash_tensor);
    tch::no_grad(|| {
        for (n, mut v) in vs.variables() {
            if n.starts_with("fc.") {
                let _ = v.zero_();
            }
        }
    });
    let freeze = Freeze::from_num_block_open(1).unwrap();
    let trainable = model.apply_freeze(&vs, freeze);
    // layer4's parameters and the head; no running statistics.
    assert!(trainable
        .iter()
        .all(|(n, _)| n.starts_with("layer4.") || n.starts_with("fc.")));
    assert!(!trainable.iter().any(|(n, _)| n.contains("running_")));
    assert_eq!(trainable.len(), 2 * 2 * 3 + 3 + 2);
    let mut sgd = mos::train::sgd::Sgd::new(trainable, 1).unwrap();
    let (x, y) = (read_named(&exp, "x"), read_named(&exp, "y"));
    for (k, lr) in [0.5, 0.25].into_iter().enumerate() {
        let logits = model.forward_train(&x, freeze);
        let loss = logits.cross_entropy_for_logits(&y);
        let want = read_named(&exp, &format!("logits{k}"));
        if k == 0 {
            // A zero head: zero logits on both sides.
            assert!(logits.detach().equal(&want) && want.abs().max().double_value(&[]) == 0.0);
        } else {
            assert_rows_close(&format!("logits{k}"), &logits.detach(), &want, RESNET_TOL);
        }
        let want = read_named(&exp, &format!("loss{k}")).double_value(&[]);
        let got = loss.double_value(&[]);
        assert!(
            (got - want).abs() <= RESNET_TOL * want.abs(),
            "loss{k}: {got} vs {want}"
        );
        sgd.backward(&loss).unwrap();
        sgd.step(lr).unwrap();
    }
    let vars = vs.variables();
    for name in [
        "fc.weight",
        "fc.bias",
        "layer4.0.bn1.weight",
        "layer4.0.bn1.bias",
        "layer4.0.bn1.running_mean",
        "layer4.0.bn1.running_var",
        "layer4.1.bn2.running_mean",
        "layer4.1.bn2.running_var",
        "layer3.1.bn2.running_mean",
        "bn1.running_var",
        "layer4.0.conv1.weight.head4",
        "layer4.1.conv2.weight.head4",
    ] {
        let key = name.trim_end_matches(".head4");
        let mut got = vars[key].detach();
        if name.ends_with(".head4") {
            got = got.narrow(0, 0, 4);
        }
        let want = read_named(&exp, name);
        // Each a vector (or rows) compared relative to its largest entry.
        let (g, w) = (got.reshape([1, -1]), want.reshape([1, -1]));
        assert_rows_close(name, &g, &w, RESNET_TOL);
    }
    // The frozen stages' statistics are exactly the loaded ones.
    assert!(vars["layer3.1.bn2.running_mean"]
        .equal(&tv_hash_tensor("layer3.1.bn2.running_mean", &[256])));
    // layer4's changed (trained in training mode).
    assert!(!vars["layer4.0.bn1.running_mean"]
        .equal(&tv_hash_tensor("layer4.0.bn1.running_mean", &[512])));
}
