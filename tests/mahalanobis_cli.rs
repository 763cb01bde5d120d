//! tune-mahalanobis end to end, resumable after the statistics pass, and its
//! parameters read by test-baseline --score Mahalanobis.
use std::path::Path;

mod common;

use assert_cmd::Command;
use predicates::prelude::*;

fn write_images(root: &Path) -> String {
    let mut list = String::new();
    for c in 0..3u32 {
        let d = root.join(format!("data/c{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..5u32 {
            let img = image::RgbImage::from_fn(16 + i, 15, |x, y| {
                let v = (x * (c + 3) * 11 + y * 5 + i * 23 + c * 70) % 256;
                image::Rgb([v as u8, (v / 2) as u8, (255 - v) as u8])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
            list.push_str(&format!("c{c}/{i}.png {c}\n"));
        }
    }
    list
}

#[test]
fn tunes_saves_resumes_and_scores() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let list = write_images(root);
    std::fs::write(root.join("list.txt"), &list).unwrap();
    let ckpt = root.join("flat.safetensors");
    common::random_checkpoint(&ckpt, 3, None, 11, 0.3);
    let tune = || {
        let mut cmd = Command::cargo_bin("mos").unwrap();
        cmd.arg("tune-mahalanobis")
            .arg("--datadir")
            .arg(root.join("data"));
        cmd.arg("--train_list")
            .arg(root.join("list.txt"))
            .arg("--val_list")
            .arg(root.join("list.txt"));
        cmd.args([
            "--model",
            "ResNetV2-R14x0.5",
            "--name",
            "maha",
            "--batch",
            "4",
            "--crop",
            "24",
            "--workers",
            "2",
        ]);
        cmd.args([
            "--num-lr-samples",
            "5",
            "--magnitudes",
            "1,0.01,0",
            "--device",
            "cpu",
        ]);
        cmd.arg("--model_path")
            .arg(&ckpt)
            .arg("--logdir")
            .arg(root.join("runs"));
        cmd
    };
    tune()
        .assert()
        .success()
        .stderr(predicate::str::contains("chose magnitude"));
    let run = root.join("runs/maha");
    let t = tch::Tensor::read_safetensors(run.join("mahalanobis.safetensors")).unwrap();
    let get = |n: &str| {
        t.iter()
            .find(|(k, _)| k == n)
            .unwrap_or_else(|| panic!("{n}"))
            .1
            .shallow_clone()
    };
    for (l, d) in [32i64, 128, 256, 512, 1024].iter().enumerate() {
        assert_eq!(get(&format!("mean.{l}")).size(), [3, *d]);
        assert_eq!(get(&format!("precision.{l}")).size(), [*d, *d]);
    }
    assert_eq!(get("lr_weight").size(), [5]);
    assert_eq!(get("lr_bias").size(), [1]);
    let magnitude = get("magnitude").double_value(&[0]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("mahalanobis.json")).unwrap())
            .unwrap();
    // The chosen magnitude is the one with the lowest FPR95 of those tried, in the
    // order given (the first one on ties).
    let tried = summary["magnitudes"].as_array().unwrap();
    let tried_mags: Vec<f64> = tried
        .iter()
        .map(|t| t["magnitude"].as_f64().unwrap())
        .collect();
    assert_eq!(tried_mags, [1.0, 0.01, 0.0]);
    let fprs: Vec<f64> = tried.iter().map(|t| t["fpr95"].as_f64().unwrap()).collect();
    let best = (1..fprs.len()).fold(0, |b, k| if fprs[k] < fprs[b] { k } else { b });
    eprintln!(
        "FPR95 per magnitude {fprs:?}: magnitude {} must win",
        tried_mags[best]
    );
    assert_eq!(magnitude, tried_mags[best]);
    assert_eq!(summary["magnitude"].as_f64().unwrap(), magnitude);
    assert_eq!(summary["fpr95"], tried[best]["fpr95"]);
    assert_eq!(summary["C"], tried[best]["C"]);
    // The saved regression is the one reported.
    let weights: Vec<f64> = summary["lr_weight"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let saved = Vec::<f64>::try_from(get("lr_weight")).unwrap();
    assert_eq!(saved.len(), weights.len());
    for (a, b) in saved.iter().zip(&weights) {
        assert!(common::json_f64_eq(*b, *a), "lr_weight {a} vs {b}");
    }
    let bias = get("lr_bias").double_value(&[0]);
    assert!(common::json_f64_eq(
        summary["lr_bias"].as_f64().unwrap(),
        bias
    ));
    assert_eq!(summary["num_lr_samples"], 5);
    // A rerun reuses the saved statistics.
    tune()
        .assert()
        .success()
        .stderr(predicate::str::contains("class statistics from"));
    // test-baseline reads the parameters (directory or file).
    std::fs::create_dir_all(root.join("ood/x")).unwrap();
    for i in 0..4u32 {
        let img = image::RgbImage::from_fn(20, 20 + i, |x, y| {
            image::Rgb([(x * y) as u8, 30, (i * 50) as u8])
        });
        img.save(root.join(format!("ood/x/{i}.png"))).unwrap();
    }
    let base = |param: &Path| {
        let mut cmd = Command::cargo_bin("mos").unwrap();
        cmd.arg("test-baseline")
            .arg("--in-datadir")
            .arg(root.join("data"))
            .arg("--out-datadir")
            .arg(root.join("ood"));
        cmd.args([
            "--model",
            "ResNetV2-R14x0.5",
            "--name",
            "tb",
            "--crop",
            "24",
            "--batch",
            "4",
            "--workers",
            "2",
            "--device",
            "cpu",
        ]);
        cmd.args(["--score", "Mahalanobis,MSP"])
            .arg("--model-path")
            .arg(&ckpt)
            .arg("--logdir")
            .arg(root.join("runs"));
        cmd.arg("--mahalanobis_param_path").arg(param);
        cmd
    };
    base(&run)
        .assert()
        .success()
        .stdout(predicate::str::contains("Mahalanobis"));
    base(&run.join("mahalanobis.safetensors"))
        .assert()
        .success();
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("runs/tb/results.json")).unwrap())
            .unwrap();
    let rows = rows.as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["Mahalanobis", "MSP"]);
    for r in rows {
        assert_eq!((&r["num_in"], &r["num_out"]), (&15.into(), &4.into()));
    }
    // Without parameters: a clear error.
    let mut cmd = Command::cargo_bin("mos").unwrap();
    cmd.arg("test-baseline")
        .arg("--in-datadir")
        .arg(root.join("data"))
        .arg("--out-datadir")
        .arg(root.join("ood"));
    cmd.args([
        "--model",
        "ResNetV2-R14x0.5",
        "--name",
        "tb2",
        "--score",
        "Mahalanobis",
        "--crop",
        "24",
    ]);
    cmd.arg("--model-path")
        .arg(&ckpt)
        .arg("--logdir")
        .arg(root.join("runs"));
    cmd.assert()
        .code(1)
        .stderr(predicate::str::contains("--mahalanobis-param-path"));
}
