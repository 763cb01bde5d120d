//! torchvision's ViTs (src/model/vit.rs) against torchvision 0.26 itself
//! (tests/fixtures/make_vit_fixtures.py: the same hash weights, the same input).
mod common;

use common::{
    assert_rows_close, assert_state_dict_keys, fill_with, fixture, hash_uniform, read_named,
    vit_hash_tensor, U32,
};
use mos::model::vit::{TorchvisionViT, ViTArch, VITS};
use tch::{nn, Device, Kind, Tensor};

/// Two float32 forward passes of ViT-B/16 (ours and torchvision's, or with other
/// kernels), per sample, relative to the largest entry. They differ only in the
/// order of their sums; a sum of K products errs by about u32 sqrt(K) relative to
/// its scale (rounding errors as a random walk), and the errors of different sums
/// are independent, so they add in quadrature. On the path from the image to a
/// logit: `conv_proj` (K = 768); per block the projections to q, k, v (768), the
/// scores q . k (64), the weighted sum of the values (197), `out_proj` (768),
/// `mlp.0` (768) and `mlp.3` (3,072); the head (768); and 25 LayerNorms whose
/// statistics sum 768 terms. LayerNorm renormalises the input of every block, so a
/// block's errors are relative to the residual stream's scale and do not compound
/// from block to block. The softmax turns an error in a score into a relative error
/// of its weight as large times the scores' spread, at most 1.25 with the fixtures'
/// weights (make_vit_fixtures.py asserts it), a gain applied to the q, k and score
/// sums. That makes u32 sqrt(103,212) = 1.9e-5 per pass, x sqrt(2) for two passes
/// = 2.7e-5; the tolerance is about 3.7 times that. It is still 4 times below the
/// 4.2e-4 by which GELU's tanh approximation moves the logits (printed by the
/// fixture script), so the test tells an exact-erf GELU from it.
const VIT_TOL: f64 = 1e-4;

/// The model's width and the input's size.
const D: i64 = 768;

fn tolerance_estimate() -> f64 {
    let gain = 1.25f64 * 1.25;
    let per_block = gain * (768.0 + 64.0) + 768.0 + 197.0 + 768.0 + 768.0 + 3072.0;
    let terms = 12.0 * per_block + 768.0 + 768.0 + 25.0 * 768.0;
    U32 * terms.sqrt() * 2f64.sqrt()
}

/// `arch` with a 10-way head and the fixtures' hash weights.
fn hashed(arch: &str) -> (nn::VarStore, TorchvisionViT) {
    let vs = nn::VarStore::new(Device::Cpu);
    let arch: ViTArch = arch.parse().unwrap();
    let m = TorchvisionViT::new(&vs.root(), arch, 10);
    fill_with(&vs, vit_hash_tensor);
    (vs, m)
}

/// The fixtures' input: u * 4 of the name "vit_input", [2, 3, 224, 224].
fn input() -> Tensor {
    let v: Vec<f32> = hash_uniform("vit_input", 2 * 3 * 224 * 224)
        .into_iter()
        .map(|u| (u * 4.0) as f32)
        .collect();
    Tensor::from_slice(&v).reshape([2, 3, 224, 224])
}

#[test]
fn the_tolerance_follows_from_float32() {
    let est = tolerance_estimate();
    assert!(3.0 * est < VIT_TOL && VIT_TOL < 4.2e-4 / 2.0, "{est:e}");
}

#[test]
fn logits_features_and_pre_logits_match_torchvision() {
    let exp = fixture("vit/expected.safetensors");
    let (_vs, m) = hashed("vit_b_16");
    let x = input();
    let out = tch::no_grad(|| m.forward_features_and_logits(&x)).unwrap();
    assert_eq!(out.logits.size(), [2, 10]);
    assert_eq!(out.pre_logits.size(), [2, D]);
    assert_eq!(out.features.len(), 5);
    let mut named = vec![
        ("logits".to_string(), &out.logits),
        ("pre_logits".to_string(), &out.pre_logits),
    ];
    for (k, f) in out.features.iter().enumerate() {
        assert_eq!(f.size(), [2, m.arch.feature_dims()[k]], "feat{k}");
        named.push((format!("feat{k}"), f));
    }
    for (name, got) in &named {
        let key = format!("vit_b_16.{name}");
        let want = read_named(&exp, &key);
        assert_rows_close(
            &format!("{key} vs torchvision float32"),
            got,
            &want,
            VIT_TOL,
        );
        let exact = read_named(&exp, &format!("f64.{key}"));
        assert_rows_close(
            &format!("{key} vs torchvision float64"),
            got,
            &exact,
            VIT_TOL,
        );
    }
    let head = tch::no_grad(|| m.head_of_pooled(&out.pre_logits));
    assert!(
        head.equal(&out.logits),
        "the logits are the head on the pre-logits"
    );

    // The second image alone: the same outputs (nothing couples the images of a
    // batch), and `forward` is the staged pass's logits bit for bit.
    let x1 = x.narrow(0, 1, 1);
    let one = tch::no_grad(|| m.forward_features_and_logits(&x1)).unwrap();
    let logits = tch::no_grad(|| m.forward(&x1)).unwrap();
    assert!(logits.equal(&one.logits), "forward is the staged pass");
    assert_rows_close("alone", &one.logits, &out.logits.narrow(0, 1, 1), VIT_TOL);
    for k in 0..5 {
        let what = format!("alone feat{k}");
        let want = out.features[k].narrow(0, 1, 1);
        assert_rows_close(&what, &one.features[k], &want, VIT_TOL);
    }
}

#[test]
fn other_input_sizes_are_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = TorchvisionViT::new(&vs.root(), "vit_b_32".parse().unwrap(), 10);
    let small = Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    let e = m.forward(&small).unwrap_err().to_string();
    assert!(
        e.contains("[N, 3, 224, 224]") && e.contains("[1, 3, 64, 64]") && e.contains("50 rows"),
        "{e}"
    );
    let gray = Tensor::zeros([1, 1, 224, 224], (Kind::Float, Device::Cpu));
    assert!(m.feature_layers(&gray).is_err());
    let tokens = Tensor::zeros([1, 49, 768], (Kind::Float, Device::Cpu));
    let e = m.stage(1, &tokens).unwrap_err().to_string();
    assert!(e.contains("[N, 50, 768]"), "{e}");
    assert!(m.stage(5, &tokens).is_err());
    // Built for 384 (vit_b_16's SWAG weights): 577 position rows, 224 refused.
    let vs = nn::VarStore::new(Device::Cpu);
    let arch: ViTArch = "vit_b_16".parse().unwrap();
    let m = TorchvisionViT::with_image_size(&vs.root(), arch, 10, 384).unwrap();
    assert_eq!(m.seq_len(), 577);
    let x = Tensor::zeros([1, 3, 224, 224], (Kind::Float, Device::Cpu));
    let e = m.forward(&x).unwrap_err().to_string();
    assert!(e.contains("[N, 3, 384, 384]"), "{e}");
}

#[test]
fn variables_are_torchvisions_state_dict_keys() {
    let text = std::fs::read_to_string(fixture("vit/keys.json")).unwrap();
    let keys: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(keys["models"]["vit_b_16"]["parameters"], 86_567_656);
    for arch in VITS {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = TorchvisionViT::new(&vs.root(), *arch, 1000);
        let want = &keys["models"][arch.name];
        assert_state_dict_keys(arch.name, &vs, want, &|_| false, &|_| true);
    }
}

/// `mos extract --model vit_b_16` of a torchvision-named file: the stored logits
/// and pre-logits are torchvision's on torchvision's pixels, and a crop the model
/// does not take is refused before anything is read.
#[test]
fn extract_runs_a_torchvision_vit() {
    use common::cli::{fails, mos, ok};
    let dir = tempfile::tempdir().unwrap();
    let (data, w) = (dir.path().join("data"), dir.path().join("vit.safetensors"));
    common::e2e_folder(&data);
    {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = TorchvisionViT::new(&vs.root(), "vit_b_16".parse().unwrap(), 3);
        fill_with(&vs, vit_hash_tensor);
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&named, &w).unwrap();
    }
    let store = dir.path().join("store");
    let extract = |extra: &[&str]| {
        let mut c = mos();
        c.args([
            "extract",
            "--model",
            "vit_b_16",
            "--layers",
            "logits,features",
        ])
        .args([
            "--batch",
            "3",
            "--workers",
            "2",
            "--device",
            "cpu",
            "--model-path",
        ])
        .arg(&w)
        .arg("--datadir")
        .arg(&data)
        .arg("--output")
        .arg(&store)
        .args(extra);
        c
    };
    let e = fails(&mut extract(&["--crop", "200"]));
    assert!(
        e.contains("--crop 200: vit_b_16 takes 224 x 224 images"),
        "{e}"
    );
    ok(&mut extract(&[]));
    let s = mos::pipeline::store::load(&store).unwrap();
    assert_eq!((s.manifest.crop, s.manifest.resize), (224, Some(256)));
    let exp = fixture("vit/expected.safetensors");
    assert_rows_close(
        "e2e.logits",
        &s.logits,
        &read_named(&exp, "e2e.logits"),
        VIT_TOL,
    );
    let feats = s.features.as_ref().unwrap();
    assert_rows_close(
        "e2e.features",
        feats,
        &read_named(&exp, "e2e.features"),
        VIT_TOL,
    );
}

/// Two fine-tuning steps of a small torchvision ViT (image 32, patch 8, 4 blocks,
/// width 32) with `--num-block-open 1`: the embedding and blocks 0..2 frozen,
/// block 3, `encoder.ln` and the zero head trained; mos's TrainNet and Sgd against
/// the same steps in PyTorch (make_tv_train_fixtures.py).
#[test]
fn fine_tuning_steps_equal_torchvision_trained_in_pytorch() {
    use mos::model::trainable::TrainNet;
    use mos::model::Freeze;
    let exp = fixture("vit/train_step.safetensors");
    // The small architecture under vit_b_16's name (only the shapes differ).
    let arch = ViTArch {
        patch: 8,
        layers: 4,
        heads: 2,
        hidden: 32,
        mlp: 64,
        ..VITS[0]
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let m = TorchvisionViT::with_image_size(&vs.root(), arch, 3, 32).unwrap();
    fill_with(&vs, vit_hash_tensor);
    let mut model = TrainNet::TorchvisionViT(m);
    if let TrainNet::TorchvisionViT(m) = &mut model {
        m.zero_head();
    }
    let freeze = Freeze::from_num_block_open(1).unwrap();
    let trainable = model.apply_freeze(&vs, freeze);
    let names: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("encoder.layers.encoder_layer_3.")
                || n.starts_with("encoder.ln.")
                || n.starts_with("heads.")),
        "{names:?}"
    );
    assert_eq!(names.len(), 12 + 2 + 2);
    let mut sgd = mos::train::sgd::Sgd::new(trainable, 1).unwrap();
    let (x, y) = (read_named(&exp, "x"), read_named(&exp, "y"));
    for (k, lr) in [0.5, 0.25].into_iter().enumerate() {
        let logits = model.forward_train(&x, freeze);
        let loss = logits.cross_entropy_for_logits(&y);
        if k == 1 {
            assert_rows_close(
                "logits1",
                &logits.detach(),
                &read_named(&exp, "logits1"),
                VIT_TOL,
            );
        }
        let want = read_named(&exp, &format!("loss{k}")).double_value(&[]);
        let got = loss.double_value(&[]);
        assert!(
            (got - want).abs() <= VIT_TOL * want.abs(),
            "loss{k}: {got} vs {want}"
        );
        sgd.backward(&loss).unwrap();
        sgd.step(lr).unwrap();
    }
    let vars = vs.variables();
    for name in [
        "heads.head.weight",
        "heads.head.bias",
        "encoder.ln.weight",
        "encoder.layers.encoder_layer_3.mlp.0.weight",
        "encoder.layers.encoder_layer_2.mlp.0.weight",
    ] {
        let (g, w) = (
            vars[name].detach().reshape([1, -1]),
            read_named(&exp, name).reshape([1, -1]),
        );
        assert_rows_close(name, &g, &w, VIT_TOL);
    }
    let frozen = "encoder.layers.encoder_layer_2.mlp.0.weight";
    assert!(vars[frozen].equal(&vit_hash_tensor(frozen, &[64, 32])));
    let open = "encoder.layers.encoder_layer_3.mlp.0.weight";
    assert!(!vars[open].equal(&vit_hash_tensor(open, &[64, 32])));
}

/// The input gradient (ODIN and Mahalanobis noise on a ViT): with a graph the
/// forward gives the inference pass's logits bit for bit (inference writes its sums
/// and GELU in place, a graph keeps them apart), backward runs, and the gradient's
/// length matches a central difference of the score along it.
#[test]
fn input_gradients_flow_through_the_blocks() {
    let (_vs, m) = hashed("vit_b_16");
    let x = input();
    let plain = tch::no_grad(|| m.forward(&x)).unwrap();
    let xg = x.copy().set_requires_grad(true);
    let logits = m.forward(&xg).unwrap();
    assert_eq!(
        (&logits.detach() - &plain).abs().max().double_value(&[]),
        0.0
    );
    let score = |l: &Tensor| l.logsumexp(1, false).sum(Kind::Float);
    score(&logits).backward();
    let grad = xg.grad();
    assert!(grad.isfinite().all().int64_value(&[]) == 1);
    // Along the gradient the derivative is largest, |grad|, well above float32's
    // rounding of the score (about 1e-6 of it, over a step of 2h).
    let d = &grad / grad.norm();
    let h = 5e-2;
    let f = |t: &Tensor| tch::no_grad(|| score(&m.forward(t).unwrap()).double_value(&[]));
    let fd = (f(&(&x + &d * h)) - f(&(&x - &d * h))) / (2.0 * h);
    let analytic = (&grad * &d).sum(Kind::Double).double_value(&[]);
    assert!(analytic.abs() > 1e-6, "{analytic}");
    assert!(
        (fd - analytic).abs() <= 0.05 * analytic.abs(),
        "directional derivative {analytic}, central difference {fd}"
    );
}
