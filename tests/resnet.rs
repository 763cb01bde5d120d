//! torchvision's ResNets (src/model/resnet.rs) against torchvision 0.26 itself
//! (tests/fixtures/make_resnet_fixtures.py: the same hash weights, the same input).
mod common;

use common::{assert_rows_close, fixture, read_named, tv_hash_tensor, U32};
use mos::model::resnet::{is_bookkeeping, ResNetArch, TorchvisionResNet, RESNETS};
use tch::{nn, Device, Kind, Tensor};

/// Two float32 forward passes of a ResNet (ours and torchvision's, or with other
/// kernels), per sample, relative to the largest entry: they differ only in
/// summation order, ~u32 sqrt(K) <= 4.1e-6 per convolution of K <= 4,608 terms.
/// BatchNorm in evaluation mode is an affine map that renormalises nothing, so the
/// relative errors of the <= 53 convolutions on a path add up: <= 53 x 4.1e-6 =
/// 2.2e-4; the tolerance leaves a factor of about 2 over that bound.
const RESNET_TOL: f64 = 5e-4;

/// `arch` with a 10-way head and the fixtures' hash weights.
fn hashed(arch: &str) -> (nn::VarStore, TorchvisionResNet) {
    let vs = nn::VarStore::new(Device::Cpu);
    let arch: ResNetArch = arch.parse().unwrap();
    let m = TorchvisionResNet::new(&vs.root(), arch, 10);
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(&tv_hash_tensor(&name, &var.size()).to_kind(Kind::Float));
        }
    });
    (vs, m)
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
        let want = &keys["models"][arch.name];
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = TorchvisionResNet::new(&vs.root(), *arch, 1000);
        let vars = vs.variables();
        let mut expected = Vec::new();
        for kv in want["keys"].as_array().unwrap() {
            let k = kv[0].as_str().unwrap();
            if is_bookkeeping(k) {
                continue;
            }
            let shape: Vec<i64> = kv[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            let var = vars
                .get(k)
                .unwrap_or_else(|| panic!("{}: no variable '{k}'", arch.name));
            assert_eq!(var.size(), shape, "{}: {k}", arch.name);
            expected.push(k.to_string());
        }
        let mut ours: Vec<&String> = vars.keys().collect();
        ours.sort();
        expected.sort();
        assert_eq!(
            ours,
            expected.iter().collect::<Vec<_>>(),
            "{}: the same names, none more",
            arch.name
        );
        let params: i64 = vars
            .iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, v)| v.numel() as i64)
            .sum();
        assert_eq!(
            params,
            want["parameters"].as_i64().unwrap(),
            "{}",
            arch.name
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
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
}
