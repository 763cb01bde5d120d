//! RankFeat (docs/scores.md#rankfeat): the fused logits of `Network::rankfeat`
//! against the original's `iterate_data_rankfeat` (tests/fixtures/
//! make_rankfeat_fixtures.py) on BiT's ResNetV2-R14x0.5 and torchvision's
//! resnet18 with the fixtures' hash weights; `mos extract --layers rankfeat` and
//! `mos score --score RankFeat` from the stored layer; the refusals.
mod common;

use common::cli::{extract_at, fails, mos, ok, pngs};
use common::{fill_with, fixture, read_named, tv_hash_tensor};
use mos::model::resnet::{ResNetArch, TorchvisionResNet};
use mos::model::Network;
use tch::{nn, Device, Tensor};

fn get(name: &str) -> Tensor {
    read_named(&fixture("rankfeat/rankfeat.safetensors"), name)
}

/// Tolerance, relative to the largest fused logit. The plain forward passes differ
/// from PyTorch's by the summation order of their convolutions, at most 5e-4 of
/// the largest entry (tests/resnet.rs and tests/model.rs derive it). Removing the
/// rank-1 part of a map X + E moves s₁u₁v₁ᵀ by at most about ‖E‖ (1 + 2 s₁ / (s₁ − s₂))
/// (the first singular pair's sensitivity to E grows as the gap closes; the
/// fixture records s₁ / (s₁ − s₂) per image and branch), and the branch then goes
/// through the rest of the network like E itself: 5e-4 × (1 + 2 × the largest
/// ratio).
fn tolerance(gap: &Tensor) -> f64 {
    5e-4 * (1.0 + 2.0 * gap.max().double_value(&[]))
}

fn check(net: &Network, key: &str) {
    let x = get(&format!("{key}_x"));
    let want = get(&format!("{key}_rankfeat"));
    let (logits, _, _, maps) = tch::no_grad(|| net.outputs_maps(&x, false, true));
    let (b3, b4) = maps.expect("the stage maps were kept");
    let got = tch::no_grad(|| net.rankfeat(&b3, &b4, 0));
    let plain = get(&format!("{key}_logits"));
    let scale = want.abs().max().double_value(&[]);
    let rel = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) / scale;
    let tol = tolerance(&get(&format!("{key}_gap")));
    eprintln!(
        "{key}: plain logits {:.2e}, fused {:.2e} of the scale (tolerance {tol:.2e})",
        rel(&logits, &plain),
        rel(&got, &want)
    );
    assert!(rel(&logits, &plain) <= 5e-4, "{key}: the plain forward");
    assert!(rel(&got, &want) <= tol, "{key}: RankFeat's fused logits");
    // The removal moves the logits beyond the tolerance: a missing branch or
    // removal would be seen.
    eprintln!(
        "{key}: fused - plain {:.2e} of the scale",
        rel(&got, &plain)
    );
    assert!(rel(&got, &plain) > 4.0 * tol, "{key}: fused = plain?");
    // The power-iteration option: the original's 20 iterations from the same start.
    let pi = tch::no_grad(|| net.rankfeat(&b3, &b4, 20));
    let want_pi = get(&format!("{key}_rankfeat_pi20"));
    eprintln!(
        "{key}: power iteration {:.2e} of the scale, {:.2e} from the exact SVD's",
        rel(&pi, &want_pi),
        rel(&pi, &got)
    );
    assert!(rel(&pi, &want_pi) <= tol, "{key}: power iteration");
    let score = got.logsumexp(1, false);
    let want_score = get(&format!("{key}_score"));
    assert!(
        (score - &want_score).abs().max().double_value(&[])
            <= tol * scale * 2.0 + 1e-6 * want_score.abs().max().double_value(&[]),
        "{key}: score"
    );
}

#[test]
fn fused_logits_equal_the_original_on_bit_and_torchvision() {
    let (_vs, bit) = common::r14();
    let net = Network::Bit(bit);
    net.variant().require_rankfeat_maps("test").unwrap();
    check(&net, "bit");
    let vs = nn::VarStore::new(Device::Cpu);
    let arch: ResNetArch = "resnet18".parse().unwrap();
    let tv = TorchvisionResNet::new(&vs.root(), arch, 10);
    fill_with(&vs, tv_hash_tensor);
    check(&Network::TorchvisionResNet(tv), "tv");
}

#[test]
fn extract_stores_the_fused_logits_and_score_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    pngs(&root.join("data/id_val"), "a_class", 3, 1);
    pngs(&root.join("data/id_val"), "b_class", 2, 2);
    let ckpt = root.join("flat.safetensors");
    common::random_checkpoint(&ckpt, 2, None, 7, 0.5);
    let (with, without) = (root.join("stores/rf"), root.join("stores/plain"));
    ok(extract_at(&root.join("data/id_val"), &ckpt, &with, "64")
        .args(["--layers", "logits,rankfeat"]));
    ok(&mut extract_at(
        &root.join("data/id_val"),
        &ckpt,
        &without,
        "64",
    ));
    let s = mos::pipeline::store::load(&with).unwrap();
    assert_eq!(s.manifest.layers, ["logits", "rankfeat"]);
    let rf = s.rankfeat.as_ref().expect("a rankfeat layer");
    assert_eq!(rf.size(), [5, 2]);
    // The plain logits are those of a store without the layer, bit for bit.
    let p = mos::pipeline::store::load(&without).unwrap();
    assert!(s.logits.equal(&p.logits));
    assert!(!rf.allclose(&s.logits, 1e-3, 1e-3, false), "fused = plain?");
    // mos score: RankFeat is the energy of the stored fused logits.
    let csv = root.join("s.csv");
    ok(mos()
        .arg("score")
        .arg("--id")
        .arg(&with)
        .arg("--ood")
        .arg(&with)
        .args([
            "--score",
            "RankFeat,Energy",
            "--device",
            "cpu",
            "--name",
            "r",
        ])
        .arg("--logdir")
        .arg(root.join("runs"))
        .arg("--save-scores")
        .arg(&csv));
    let text = std::fs::read_to_string(&csv).unwrap();
    let want = common::to_vec(&rf.logsumexp(1, false));
    let got: Vec<f64> = text
        .lines()
        .skip(1)
        .take(5)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, want);
    // With power iterations: recorded (and fingerprinted), another layer's values.
    let pi = root.join("stores/pi");
    ok(
        extract_at(&root.join("data/id_val"), &ckpt, &pi, "64").args([
            "--layers",
            "logits,rankfeat",
            "--rankfeat-power-iterations",
            "20",
        ]),
    );
    let q = mos::pipeline::store::load(&pi).unwrap();
    assert_eq!(q.manifest.rankfeat_power_iterations, Some(20));
    assert_ne!(q.manifest.fingerprint, s.manifest.fingerprint);
    assert!(q.logits.equal(&s.logits));
    let e = fails(
        extract_at(
            &root.join("data/id_val"),
            &ckpt,
            &root.join("stores/bad"),
            "64",
        )
        .args(["--rankfeat-power-iterations", "20"]),
    );
    assert!(e.contains("with --layers ...,rankfeat"), "{e}");
    // A store without the layer is refused before scoring, naming it.
    let e = fails(
        mos()
            .arg("score")
            .arg("--id")
            .arg(&with)
            .arg("--ood")
            .arg(&without)
            .args(["--score", "RankFeat", "--device", "cpu", "--name", "r2"])
            .arg("--logdir")
            .arg(root.join("runs")),
    );
    assert!(
        e.contains("no rankfeat layer, which --score RankFeat needs") && e.contains("stores/plain"),
        "{e}"
    );
}
