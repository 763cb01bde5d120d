//! `--model torchscript` (src/model/script.rs): a TorchScript export of
//! torchvision's resnet18 (tests/fixtures/make_torchscript_fixtures.py) gives the
//! store the native `--model resnet18` gives on the same weights; ODIN's input
//! gradient runs through it; modules that break the contract are refused saying
//! what is missing.
mod common;

use std::path::{Path, PathBuf};

use common::cli::{fails, mos, ok};
use common::{assert_rows_close, e2e_folder, fixture, read_named, tv_periodic_tensor};
use mos::model::resnet::{ResNetArch, TorchvisionResNet};
use tch::{nn, Device, Tensor};

/// As tests/resnet.rs: two float32 forward passes of a ResNet that differ only in
/// the kernels' summation order stay within 5e-4 of the largest entry.
const RESNET_TOL: f64 = 5e-4;

/// The native resnet18 state dict of the fixture's module: torchvision's names,
/// the periodic hash weights, a 3-way head.
fn native_weights(path: &Path) {
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = TorchvisionResNet::new(&vs.root(), "resnet18".parse::<ResNetArch>().unwrap(), 3);
    common::fill_with(&vs, tv_periodic_tensor);
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    native: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    e2e_folder(&data);
    let native = root.join("resnet18.safetensors");
    native_weights(&native);
    Setup {
        _dir: dir,
        root,
        data,
        native,
    }
}

fn script() -> PathBuf {
    fixture("torchscript/resnet18.pt")
}

/// `mos extract` of the e2e images at Resize 41 / CenterCrop 32.
fn extract(s: &Setup, model: &str, path: &Path, out: &Path, extra: &[&str]) -> assert_cmd::Command {
    let mut c = mos();
    c.args([
        "extract", "--model", model, "--crop", "32", "--resize", "41",
    ])
    .args(["--batch", "4", "--workers", "2", "--device", "cpu"])
    .arg("--model-path")
    .arg(path)
    .arg("--datadir")
    .arg(&s.data)
    .arg("--output")
    .arg(out)
    .args(extra);
    c
}

#[test]
fn a_torchscript_export_gives_the_native_modules_store() {
    let s = setup();
    let (native, scripted) = (s.root.join("native"), s.root.join("scripted"));
    ok(&mut extract(&s, "resnet18", &s.native, &native, &[]));
    ok(&mut extract(
        &s,
        "torchscript",
        &script(),
        &scripted,
        &["--head", "backbone.fc"],
    ));
    let (a, b) = (
        mos::pipeline::store::load(&native).unwrap(),
        mos::pipeline::store::load(&scripted).unwrap(),
    );
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.paths, b.paths);
    let err = assert_rows_close("logits", &b.logits, &a.logits, RESNET_TOL);
    let ferr = assert_rows_close(
        "features",
        b.features.as_ref().unwrap(),
        a.features.as_ref().unwrap(),
        RESNET_TOL,
    );
    eprintln!("TorchScript vs native resnet18: logits {err:.2e}, features {ferr:.2e}");
    // And both are what the module computes in Python on torchvision's pixels.
    let exp = fixture("torchscript/expected.safetensors");
    assert_rows_close(
        "e2e.logits",
        &b.logits,
        &read_named(&exp, "e2e.logits"),
        RESNET_TOL,
    );
    // The manifest records the module's transform and head.
    let m = &b.manifest;
    assert_eq!(m.model, "torchscript");
    assert_eq!((m.crop, m.resize), (32, Some(41)));
    assert_eq!(m.head.as_deref(), Some("backbone.fc"));
    assert_eq!(m.mean.as_deref(), Some(&[0.485f32, 0.456, 0.406][..]));
    assert_eq!(m.std.as_deref(), Some(&[0.229f32, 0.224, 0.225][..]));
    assert_eq!(m.feature_dim, Some(512));
    assert_eq!(m.checkpoint_format, "TorchScript module (torch.jit.save)");

    // mos score reads the head from the module (ASH-S applies it).
    let logdir = s.root.join("runs");
    let score = |id: &Path, name: &str, extra: &[&str]| {
        ok(mos()
            .args([
                "score",
                "--score",
                "MSP,ASH-S",
                "--name",
                name,
                "--device",
                "cpu",
            ])
            .arg("--id")
            .arg(id)
            .arg("--ood")
            .arg(id)
            .arg("--logdir")
            .arg(&logdir)
            .args(extra));
    };
    score(&native, "native", &[]);
    score(&scripted, "scripted", &[]);
    let rows = |name: &str| -> Vec<serde_json::Value> {
        let t = std::fs::read_to_string(logdir.join(name).join("results.json")).unwrap();
        serde_json::from_str(&t).unwrap()
    };
    let (x, y) = (rows("native"), rows("scripted"));
    assert_eq!(y[1]["method"], "ASH-S");
    for (r, q) in x.iter().zip(&y) {
        // The same images against themselves: 50% AUROC either way; the rows run.
        assert_eq!(r["auroc"], q["auroc"], "{}", r["method"]);
    }

    // Other --mean/--std are applied and recorded (another store).
    let norm = s.root.join("norm");
    ok(&mut extract(
        &s,
        "torchscript",
        &script(),
        &norm,
        &[
            "--head",
            "backbone.fc",
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "0.25,0.25,0.25",
        ],
    ));
    let c = mos::pipeline::store::load(&norm).unwrap();
    assert_eq!(c.manifest.mean.as_deref(), Some(&[0.5f32; 3][..]));
    assert!(!c.logits.allclose(&b.logits, 1e-3, 1e-3, false));
    // Stores of two normalizations are not scored together.
    let e = fails(
        mos()
            .args([
                "score", "--score", "MSP", "--name", "mixed", "--device", "cpu",
            ])
            .arg("--id")
            .arg(&scripted)
            .arg("--ood")
            .arg(&norm)
            .arg("--logdir")
            .arg(&logdir),
    );
    assert!(e.contains("normalization"), "{e}");
}

#[test]
fn mos_benchmark_runs_a_torchscript_module_as_the_native_one() {
    let s = setup();
    let logdir = s.root.join("runs");
    let same = s.root.join("same");
    e2e_folder(&same);
    let bench = |model: &str, path: &Path, name: &str, extra: &[&str]| {
        let mut c = mos();
        c.args([
            "benchmark",
            "--model",
            model,
            "--crop",
            "32",
            "--resize",
            "41",
        ])
        .args(["--score", "MSP,Energy,ODIN", "--epsilon-odin", "0.002"])
        .args([
            "--name",
            name,
            "--batch",
            "4",
            "--workers",
            "2",
            "--device",
            "cpu",
        ])
        .arg("--flat-model-path")
        .arg(path)
        .arg("--in-datadir")
        .arg(&s.data)
        .arg("--out-datadir")
        .arg(&same)
        .arg("--logdir")
        .arg(&logdir)
        .args(extra);
        c
    };
    ok(&mut bench("resnet18", &s.native, "native", &[]));
    ok(&mut bench(
        "torchscript",
        &script(),
        "scripted",
        &["--head", "backbone.fc"],
    ));
    let rows = |name: &str| -> Vec<serde_json::Value> {
        let t = std::fs::read_to_string(logdir.join(name).join("results.json")).unwrap();
        serde_json::from_str(&t).unwrap()
    };
    let (x, y) = (rows("native"), rows("scripted"));
    assert_eq!(x.len(), 3);
    for (r, q) in x.iter().zip(&y) {
        assert_eq!(r["method"], q["method"]);
        for k in ["auroc", "fpr95", "aupr_in", "aupr_out"] {
            assert_eq!(r[k], q[k], "{} {k}", r["method"]);
        }
    }
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(logdir.join("scripted/stores/flat/data/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (m["model"].as_str(), m["head"].as_str()),
        (Some("torchscript"), Some("backbone.fc"))
    );
    assert_eq!(m["feature_dim"], 512);
    // Mahalanobis needs feature layers a module does not give: refused first.
    let e = fails(&mut bench(
        "torchscript",
        &script(),
        "maha",
        &["--head", "backbone.fc", "--score", "Mahalanobis"],
    ));
    assert!(
        e.contains("--score Mahalanobis needs the feature layers"),
        "{e}"
    );
}

#[test]
fn odin_with_a_perturbation_runs_through_a_torchscript_module() {
    let s = setup();
    let logdir = s.root.join("runs");
    let run = |model: &str, path: &Path, name: &str, extra: &[&str]| {
        ok(mos()
            .args([
                "test-baseline",
                "--model",
                model,
                "--crop",
                "32",
                "--resize",
                "41",
            ])
            .args([
                "--score",
                "ODIN",
                "--epsilon-odin",
                "0.002",
                "--temperature-odin",
                "1000",
            ])
            .args(["--name", name, "--batch", "4", "--device", "cpu"])
            .arg("--model-path")
            .arg(path)
            .arg("--in-datadir")
            .arg(&s.data)
            .arg("--out-datadir")
            .arg(&s.data)
            .arg("--logdir")
            .arg(&logdir)
            .arg("--save-scores")
            .arg(logdir.join(format!("{name}.csv")))
            .args(extra));
    };
    run("resnet18", &s.native, "native", &[]);
    run(
        "torchscript",
        &script(),
        "scripted",
        &["--head", "backbone.fc"],
    );
    let scores = |name: &str| -> Vec<f64> {
        std::fs::read_to_string(logdir.join(format!("{name}.csv")))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
            .collect()
    };
    let (a, b) = (scores("native"), scores("scripted"));
    assert_eq!(a.len(), 12);
    // ODIN's score is a softmax probability at T = 1000 of perturbed images: the
    // two graphs' float32 rounding (RESNET_TOL of the logits, then divided by T)
    // moves it far less than 1e-6.
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
    }
    assert!(a.iter().any(|v| *v != a[0]), "{a:?}");
}

#[test]
fn modules_that_break_the_contract_are_refused_saying_what_is_missing() {
    let s = setup();
    let out = s.root.join("store");
    let try_extract = |model: &str, path: &Path, extra: &[&str]| -> String {
        fails(&mut extract(&s, model, path, &out, extra))
    };
    let cases: Vec<(&str, PathBuf, Vec<&str>, Vec<&str>)> = vec![
        // The default head prefix `fc` is not the wrapped module's.
        (
            "torchscript",
            script(),
            vec![],
            vec![
                "no parameters 'fc.weight' and 'fc.bias'",
                "backbone.fc.bias",
                "--head",
            ],
        ),
        (
            "torchscript",
            fixture("torchscript/logits_only.pt"),
            vec![],
            vec!["forward returned one tensor", "(logits, features)"],
        ),
        (
            "torchscript",
            fixture("torchscript/three.pt"),
            vec![],
            vec!["forward returned 3 values"],
        ),
        (
            "torchscript",
            fixture("torchscript/wrong_head.pt"),
            vec![],
            vec!["its logits are not its features through the head 'fc'"],
        ),
        // A state dict is not a TorchScript module, and the other way round.
        (
            "torchscript",
            s.native.clone(),
            vec![],
            vec!["resnet18.safetensors: not a TorchScript module"],
        ),
        (
            "resnet18",
            script(),
            vec![],
            vec!["a TorchScript module", "--model torchscript"],
        ),
        (
            "torchscript",
            script(),
            vec!["--head", "backbone.fc", "--layers", "logits,mahalanobis"],
            vec!["--layers mahalanobis needs the feature layers"],
        ),
        (
            "torchscript",
            script(),
            vec!["--head", "backbone.fc", "--mean", "0.5,0.5"],
            vec!["--mean: 2 value(s); give 3"],
        ),
        (
            "torchscript",
            script(),
            vec!["--head", "backbone.fc", "--std", "0.2,0,0.2"],
            vec!["--std: 0 is not a positive number"],
        ),
        (
            "resnet18",
            s.native.clone(),
            vec!["--mean", "0.5,0.5,0.5"],
            vec!["--mean applies to --model torchscript"],
        ),
    ];
    for (model, path, extra, want) in cases {
        let e = try_extract(model, &path, &extra);
        for w in want {
            assert!(
                e.contains(w),
                "{model} {path:?} {extra:?}: wanted '{w}' in:\n{e}"
            );
        }
        assert!(
            !out.join("manifest.json").exists(),
            "{extra:?} left a store"
        );
    }
    // Mahalanobis from the images is refused before anything is read.
    let e = fails(
        mos()
            .args([
                "test-baseline",
                "--model",
                "torchscript",
                "--head",
                "backbone.fc",
            ])
            .args(["--score", "Mahalanobis", "--name", "m", "--device", "cpu"])
            .arg("--model-path")
            .arg(script())
            .arg("--in-datadir")
            .arg(&s.data)
            .arg("--out-datadir")
            .arg(&s.data)
            .arg("--logdir")
            .arg(s.root.join("runs")),
    );
    assert!(
        e.contains("--score Mahalanobis needs the feature layers"),
        "{e}"
    );
}
