//! Errors users can cause, end to end through the `mos` binary: each is an
//! `Error:` line that leads with its cause and names the file, tensor or flag,
//! exit code 1, and never a panic or a backtrace. Also: unreadable validation
//! images in fine-tuning are skipped, logged and counted like training ones.
use std::path::{Path, PathBuf};

mod common;

use common::cli::mos;

use assert_cmd::Command;
use tch::{Kind, Tensor};

/// Runs `cmd` as [`common::cli::fails`] does (exit code 1, an `Error:` message, no
/// panic or backtrace) and checks that the error is short and ends stderr.
fn fails(cmd: &mut Command) -> String {
    let err = common::cli::fails(cmd);
    let first = err.lines().find(|l| l.starts_with("Error:")).unwrap();
    assert!(
        err.ends_with('\n') && err[err.find(first).unwrap()..].lines().count() <= 2,
        "the error is not the end of stderr: {err}"
    );
    err
}

/// The `Error:` line of stderr, without the prefix.
fn error_line(err: &str) -> &str {
    err.lines().find_map(|l| l.strip_prefix("Error: ")).unwrap()
}

/// Writes `n` small PNGs into `dir/class`.
fn images(dir: &Path, class: &str, n: usize, seed: u32) {
    let d = dir.join(class);
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(18 + i as u32, 16, |x, y| {
            let v = (x * 7 + y * 13 + seed * 31 + i as u32 * 17) % 256;
            image::Rgb([v as u8, (255 - v) as u8, ((v * 3) % 256) as u8])
        });
        img.save(d.join(format!("{i}.png"))).unwrap();
    }
}

/// A fine-tuning command on `data` with a tiny model and few steps.
fn finetune(root: &Path, name: &str, train: &Path, val: &Path) -> Command {
    let mut cmd = mos();
    cmd.args([
        "finetune-flat",
        "--name",
        name,
        "--model",
        "ResNetV2-R14x0.5",
    ]);
    cmd.arg("--logdir").arg(root.join("runs"));
    cmd.arg("--datadir").arg(root.join("data"));
    cmd.arg("--train-list")
        .arg(train)
        .arg("--val-list")
        .arg(val);
    cmd.args([
        "--init",
        "none",
        "--batch",
        "4",
        "--crop",
        "16",
        "--precrop",
        "20",
        "--schedule",
        "1,2",
        "--eval-every",
        "1",
        "--num-block-open",
        "0",
        "--workers",
        "2",
        "--device",
        "cpu",
    ]);
    cmd
}

#[test]
fn unreadable_validation_images_are_skipped_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    images(&root.join("data"), "a", 3, 1);
    images(&root.join("data"), "b", 3, 2);
    std::fs::write(root.join("data/b/broken.png"), b"not a png at all").unwrap();
    let good: String = (0..3)
        .flat_map(|i| [format!("a/{i}.png 0\n"), format!("b/{i}.png 1\n")])
        .collect();
    std::fs::write(root.join("train.txt"), &good).unwrap();
    std::fs::write(root.join("val.txt"), format!("{good}b/broken.png 1\n")).unwrap();
    finetune(root, "r", &root.join("train.txt"), &root.join("val.txt"))
        .assert()
        .success();
    let run = root.join("runs/r");
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    let named: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("skipped unreadable validation image"))
        .collect();
    // Named once (with the decoder's reason), although validated twice.
    assert_eq!(named.len(), 1, "{log}");
    assert!(named[0].contains("broken.png"), "{log}");
    assert!(log.contains("val top-1") && log.contains("(6 images; 1 unreadable, skipped)"));
    assert!(log.contains("0 unreadable training images skipped, 1 unreadable validation images"));
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let vals: Vec<_> = records
        .iter()
        .filter(|r| r.get("val_top1").is_some())
        .collect();
    assert_eq!(vals.len(), 2);
    for v in &vals {
        assert_eq!(
            (v["val_images"].as_u64(), v["val_skipped"].as_u64()),
            (Some(6), Some(1)),
            "{v}"
        );
    }
    let steps: Vec<_> = records.iter().filter(|r| r.get("loss").is_some()).collect();
    assert!(steps.iter().all(|s| s["train_skipped"] == 0), "{steps:?}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["skip_bad_images"], true);

    // A validation list that cannot be read at all stops with the file named.
    std::fs::write(root.join("bad_val.txt"), "b/broken.png 1\n").unwrap();
    std::fs::write(root.join("train1.txt"), "a/0.png 0\nb/0.png 1\n").unwrap();
    let err = fails(&mut finetune(
        root,
        "r2",
        &root.join("train1.txt"),
        &root.join("bad_val.txt"),
    ));
    let line = error_line(&err);
    assert!(line.starts_with("--val-list "), "{err}");
    assert!(
        line.contains("none of its 1 images could be read") && line.contains("broken.png"),
        "{err}"
    );
}

#[test]
fn labels_with_gaps_are_refused_naming_lists_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    images(&root.join("data"), "a", 2, 1);
    let train = root.join("train.txt");
    let val = root.join("val.txt");
    std::fs::write(&train, "a/0.png 0\na/1.png 4\n").unwrap();
    std::fs::write(&val, "a/0.png 2\na/1.png 0\n").unwrap();
    let expected = format!(
        "--train-list {} / --val-list {}: labels 0..4 with 1, 3 missing: ",
        train.display(),
        val.display()
    );
    let err = fails(&mut finetune(root, "gap", &train, &val));
    assert!(error_line(&err).starts_with(&expected), "{err}");
    assert!(err.contains("one logit per distinct label"), "{err}");
    // tune-mahalanobis shares the rule (and stops before reading the model).
    let mut cmd = mos();
    cmd.args([
        "tune-mahalanobis",
        "--name",
        "t",
        "--model",
        "ResNetV2-R14x0.5",
    ]);
    cmd.arg("--logdir").arg(root.join("runs"));
    cmd.arg("--datadir").arg(root.join("data"));
    cmd.arg("--train-list")
        .arg(&train)
        .arg("--val-list")
        .arg(&val);
    cmd.arg("--model-path")
        .arg(root.join("no-model.safetensors"));
    cmd.args(["--num-lr-samples", "1", "--device", "cpu"]);
    let err = fails(&mut cmd);
    assert!(error_line(&err).starts_with(&expected), "{err}");
}

#[test]
fn a_libtorch_error_is_an_error_with_a_hint_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("m.safetensors");
    common::random_checkpoint(&ckpt, 3, None, 5, 0.1);
    // Images with no rows: libtorch refuses the 7x7 root convolution.
    let input = dir.path().join("x.safetensors");
    let x = Tensor::zeros([1, 3, 0, 5], (Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("images", &x)], &input).unwrap();
    let mut cmd = mos();
    cmd.args(["forward", "--model", "ResNetV2-R14x0.5", "--device", "cpu"]);
    cmd.arg("--model-path")
        .arg(&ckpt)
        .arg("--input")
        .arg(&input);
    cmd.arg("--output").arg(dir.path().join("out.safetensors"));
    let err = fails(&mut cmd);
    let line = error_line(&err);
    assert!(
        line.starts_with(&format!("--input {}", input.display())),
        "{err}"
    );
    assert!(line.contains("[1, 3, 0, 5]"), "{err}");
    assert!(
        line.contains("libtorch: ") && line.contains("Kernel size"),
        "{err}"
    );
    assert!(
        err.contains("\nhint: the images are too small for the network: raise --crop"),
        "{err}"
    );
    assert!(!dir.path().join("out.safetensors").exists());
}

#[test]
fn sizes_of_zero_are_refused_by_the_flag_parser() {
    let out = mos()
        .args(["test-baseline", "--in-datadir", "a", "--out-datadir", "b"])
        .args([
            "--logdir",
            "c",
            "--name",
            "d",
            "--model-path",
            "e",
            "--crop",
            "0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'--crop <PIXELS>': must be at least 1"),
        "{err}"
    );
}

/// Valid Mahalanobis parameters for ResNetV2-R14x0.5 (2 classes), as named tensors.
fn mahalanobis_params() -> Vec<(String, Tensor)> {
    let cpu = (Kind::Float, tch::Device::Cpu);
    let mut t = Vec::new();
    for (l, d) in [32i64, 128, 256, 512, 1024].into_iter().enumerate() {
        t.push((format!("mean.{l}"), Tensor::zeros([2, d], cpu)));
        t.push((format!("precision.{l}"), Tensor::eye(d, cpu)));
    }
    t.push(("lr_weight".into(), Tensor::from_slice(&[0.1f64; 5])));
    t.push(("lr_bias".into(), Tensor::from_slice(&[0.5f64])));
    t.push(("magnitude".into(), Tensor::from_slice(&[0.001f64])));
    t
}

fn write_params(path: &Path, tensors: &[(String, Tensor)]) {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, path).unwrap();
}

/// A change that spoils a parameter file.
type Mutation = dyn Fn(&mut Vec<(String, Tensor)>);

#[test]
fn malformed_mahalanobis_parameters_name_the_file_and_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ckpt = root.join("m.safetensors");
    common::random_checkpoint(&ckpt, 2, None, 5, 0.1);
    let run = |params: &Path| -> String {
        let mut cmd = mos();
        cmd.args([
            "test-baseline",
            "--model",
            "ResNetV2-R14x0.5",
            "--name",
            "m",
        ]);
        cmd.args(["--score", "Mahalanobis", "--device", "cpu", "--crop", "16"]);
        cmd.arg("--in-datadir").arg(root.join("id"));
        cmd.arg("--out-datadir").arg(root.join("ood"));
        cmd.arg("--logdir").arg(root.join("runs"));
        cmd.arg("--model-path").arg(&ckpt);
        cmd.arg("--mahalanobis-param-path").arg(params);
        fails(&mut cmd)
    };
    let cases: Vec<(&str, Box<Mutation>, &str)> = vec![
        (
            "lr_bias",
            Box::new(|t| t[11].1 = Tensor::zeros([0], (Kind::Double, tch::Device::Cpu))),
            "tensor 'lr_bias' has shape [0]; expected [1] or a scalar",
        ),
        (
            "precision.2",
            Box::new(|t| {
                let _ = t[5].1.get(3).get(7).fill_(f64::NAN);
            }),
            "tensor 'precision.2' holds NaN or infinite values",
        ),
        (
            "mean.1",
            Box::new(|t| t[2].1 = Tensor::zeros([2, 100], (Kind::Float, tch::Device::Cpu))),
            "tensor 'precision.1' has shape [128, 128]; expected [100, 100]",
        ),
        (
            "mean.3 classes",
            Box::new(|t| t[6].1 = Tensor::zeros([3, 512], (Kind::Float, tch::Device::Cpu))),
            "tensor 'mean.3' has 3 classes (rows) but mean.0 has 2",
        ),
        (
            "widths",
            Box::new(|t| {
                t[8].1 = Tensor::zeros([2, 64], (Kind::Float, tch::Device::Cpu));
                t[9].1 = Tensor::eye(64, (Kind::Float, tch::Device::Cpu));
            }),
            "tensor 'mean.4' has 64 features but layer 4 of --model ResNetV2-R14x0.5 has 1024",
        ),
        (
            "lr_weight kind",
            Box::new(|t| t[10].1 = Tensor::from_slice(&[1i64; 5])),
            "tensor 'lr_weight' is int64; expected floating point",
        ),
        (
            "magnitude",
            Box::new(|t| t[12].1 = Tensor::from(-0.5f64)),
            "tensor 'magnitude' is -0.5; expected a non-negative number",
        ),
    ];
    for (what, mutate, expected) in cases {
        let mut t = mahalanobis_params();
        mutate(&mut t);
        let path = root.join(format!("{}.safetensors", what.replace(' ', "_")));
        write_params(&path, &t);
        let err = run(&path);
        let line = error_line(&err);
        assert!(
            line.starts_with(&format!("{}: {expected}", path.display())),
            "{what}: {err}"
        );
    }
    // The names the test relies on.
    let names: Vec<String> = mahalanobis_params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        [&names[2], &names[5], &names[6], &names[8], &names[10], &names[11], &names[12]],
        [
            "mean.1",
            "precision.2",
            "mean.3",
            "mean.4",
            "lr_weight",
            "lr_bias",
            "magnitude"
        ]
    );
}

struct EvalSetup {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn eval_setup() -> EvalSetup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    images(&root.join("id"), "a", 2, 1);
    images(&root.join("id"), "b", 2, 2);
    images(&root.join("ood"), "x", 2, 3);
    std::fs::write(root.join("groups.json"), r#"{"classes_per_group": [2]}"#).unwrap();
    EvalSetup { _dir: dir, root }
}

fn eval(s: &EvalSetup, command: &str, model: &Path) -> Command {
    let mut cmd = mos();
    cmd.args([command, "--model", "ResNetV2-R14x0.5", "--name", command]);
    cmd.args(["--device", "cpu", "--crop", "16", "--workers", "1"]);
    cmd.arg("--in-datadir").arg(s.root.join("id"));
    cmd.arg("--out-datadir").arg(s.root.join("ood"));
    cmd.arg("--logdir").arg(s.root.join("runs"));
    cmd.arg("--model-path").arg(model);
    if command == "test-mos" {
        cmd.arg("--group-config").arg(s.root.join("groups.json"));
    }
    cmd
}

#[test]
fn model_errors_lead_with_their_cause_and_hint_only_at_a_wrong_head() {
    let s = eval_setup();
    let garbage = s.root.join("bad.pth.tar");
    std::fs::write(&garbage, b"this is not a checkpoint, just some text").unwrap();
    // A checkpoint with 5 logits: test-baseline needs 2, test-mos 2 + 1.
    let wrong = s.root.join("wrong.safetensors");
    common::random_checkpoint(&wrong, 5, None, 5, 0.1);
    for (command, hint) in [
        (
            "test-baseline",
            "test-baseline needs a flat-softmax checkpoint",
        ),
        ("test-mos", "test-mos needs a group-softmax checkpoint"),
    ] {
        let err = fails(&mut eval(&s, command, &garbage));
        let line = error_line(&err);
        assert!(
            line.starts_with(&format!("{}: unknown weight format", garbage.display())),
            "{command}: {err}"
        );
        assert!(
            !err.contains("needs a"),
            "{command}: a head hint for a garbage file: {err}"
        );
        let err = fails(&mut eval(&s, command, &wrong));
        let line = error_line(&err);
        assert!(
            line.starts_with(&format!(
                "{}: the checkpoint's head has 5 outputs but",
                wrong.display()
            )),
            "{command}: {err}"
        );
        assert!(line.contains(hint), "{command}: {err}");
    }
}
