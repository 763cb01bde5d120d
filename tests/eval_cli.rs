//! test-mos / test-baseline / metrics / report end to end on tiny image folders
//! and a small random model, plus the errors users hit most.
use std::path::{Path, PathBuf};

mod common;

use common::cli::{mos, SMALL};

use assert_cmd::Command;
use predicates::prelude::*;

/// Writes `n` small PNGs with distinct content into `dir/class`.
fn images(dir: &Path, class: &str, n: usize, seed: u32) {
    let d = dir.join(class);
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(20 + i as u32, 18, |x, y| {
            let v = (x * 7 + y * 13 + seed * 31 + i as u32 * 17) % 256;
            image::Rgb([v as u8, (255 - v) as u8, ((v * 3) % 256) as u8])
        });
        img.save(d.join(format!("img_{i}.png"))).unwrap();
    }
}

/// A random ResNetV2-R14x0.5 with `head` outputs, saved as our checkpoint.
fn checkpoint(dir: &Path, head: i64, group_config: Option<Vec<i64>>) -> PathBuf {
    let path = dir.join(format!("model_{head}.safetensors"));
    common::random_checkpoint(&path, head, group_config, 7, 0.5);
    path
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    id: PathBuf,
    ood: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let id = root.join("data/id_val");
    let ood = root.join("data/ood_set");
    images(&id, "a_class", 3, 1);
    images(&id, "b_class", 2, 2);
    images(&ood, "images", 4, 3);
    Setup {
        _dir: dir,
        root,
        id,
        ood,
    }
}

fn common(cmd: &mut Command, s: &Setup, name: &str) {
    cmd.arg("--in-datadir")
        .arg(&s.id)
        .arg("--out_datadir")
        .arg(&s.ood);
    cmd.arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", name]);
    cmd.args(SMALL);
}

/// Checks the table `mos` printed against the rows of results.json: one line per
/// row, `method in -> out` and the metrics as percentages with two decimals.
fn check_table(stdout: &str, rows: &[serde_json::Value]) {
    for r in rows {
        let method = r["method"].as_str().unwrap();
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(method))
            .unwrap_or_else(|| panic!("no table line for {method} in\n{stdout}"));
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let (i, o) = (&r["in_dataset"], &r["out_dataset"]);
        assert_eq!(
            tokens[1..4],
            [i.as_str().unwrap(), "->", o.as_str().unwrap()]
        );
        let keys = [
            "auroc",
            "aupr_in",
            "aupr_out",
            "fpr95",
            "fpr95_ood_positive",
        ];
        for (k, key) in keys.iter().enumerate() {
            let want = format!("{:.2}", 100.0 * r[key].as_f64().unwrap());
            assert_eq!(tokens[4 + k], want, "{method} {key} in {line}");
        }
        let seconds = format!("{:.1}", r["seconds"].as_f64().unwrap());
        assert_eq!(tokens[9..], [seconds, r["skipped"].to_string()], "{line}");
    }
}

/// The metrics of every score column of a `--save-scores` CSV, recomputed with
/// the library: the same scores through the same function give the same bits
/// (up to how serde_json reads them back).
fn check_metrics_from_csv(csv: &Path, rows: &[serde_json::Value]) {
    let text = std::fs::read_to_string(csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let records: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    for (col, name) in header.iter().enumerate().skip(2) {
        let scores = |split: &str| -> Vec<f64> {
            let of_split = records.iter().filter(|r| r[0] == split);
            of_split.map(|r| r[col].parse().unwrap()).collect()
        };
        let m = mos::metrics::ood_metrics(&scores("in"), &scores("out")).unwrap();
        let row = if *name == "score" {
            assert_eq!(rows.len(), 1);
            &rows[0]
        } else {
            rows.iter().find(|r| r["method"] == *name).unwrap()
        };
        let got = [
            m.auroc,
            m.aupr_in,
            m.aupr_out,
            m.fpr95,
            m.fpr95_ood_positive,
        ];
        let keys = [
            "auroc",
            "aupr_in",
            "aupr_out",
            "fpr95",
            "fpr95_ood_positive",
        ];
        for (key, value) in keys.iter().zip(got) {
            let json = row[key].as_f64().unwrap();
            assert!(
                common::json_f64_eq(json, value),
                "{name} {key}: {json} vs {value}"
            );
        }
        assert_eq!(row["num_in"], scores("in").len());
        assert_eq!(row["num_out"], scores("out").len());
    }
}

#[test]
fn baselines_share_a_pass_and_write_everything() {
    let s = setup();
    let ckpt = checkpoint(&s.root, 2, None);
    let csv = s.root.join("scores.csv");
    let mut cmd = mos();
    cmd.arg("test-baseline");
    common(&mut cmd, &s, "base");
    cmd.arg("--model_path").arg(&ckpt).args([
        "--score",
        "MSP,Energy,ODIN,KL_Div",
        "--epsilon_odin",
        "0.002",
        "--plot",
    ]);
    cmd.arg("--save-scores").arg(&csv);
    let out = cmd.assert().success().get_output().clone();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("FPR95(ID+)"), "{stdout}");
    let run = s.root.join("runs/base");
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["MSP", "Energy", "ODIN", "KL_Div"]);
    let settings = serde_json::json!({
        "score": ["MSP", "Energy", "ODIN", "KL_Div"],
        "temperature_odin": 1000.0,
        "epsilon_odin": 0.002,
        "temperature_energy": 1.0,
        "in_datadir": s.id,
        "out_datadir": s.ood,
        "batch": 2,
        "crop": 32,
        "skip_bad_images": false,
        "device": "cpu",
    });
    for r in rows {
        assert_eq!(r["num_in"], 5);
        assert_eq!(r["num_out"], 4);
        assert_eq!(r["skipped"], 0);
        assert_eq!(r["in_dataset"], "id_val");
        assert_eq!(r["out_dataset"], "ood_set");
        assert_eq!(r["model"], "ResNetV2-R14x0.5");
        assert_eq!(r["model_path"], ckpt.display().to_string());
        assert_eq!(r["settings"], settings);
        assert!(r["seconds"].as_f64().unwrap() >= 0.0);
    }
    check_table(&stdout, rows);
    check_metrics_from_csv(&csv, rows);
    assert!(std::fs::read_to_string(run.join("test.log"))
        .unwrap()
        .contains("results in"));
    // The plots draw the saved scores: MSP's histogram and KL_Div's ROC curve.
    let (_, id, ood) = mos::pipeline::report::read_scores_csv(&csv, Some("MSP")).unwrap();
    common::svg::assert_histogram(
        &run.join("MSP_id_val_vs_ood_set_hist.svg"),
        "MSP: id_val vs ood_set",
        &id,
        &ood,
    );
    let (_, id, ood) = mos::pipeline::report::read_scores_csv(&csv, Some("KL_Div")).unwrap();
    let auroc = rows[3]["auroc"].as_f64().unwrap();
    common::svg::assert_roc(
        &run.join("KL_Div_id_val_vs_ood_set_roc.svg"),
        &format!("KL_Div ROC, AUROC {:.2}%", 100.0 * auroc),
        &id,
        &ood,
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(
        text.starts_with("split,path,MSP,Energy,ODIN,KL_Div\n"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1 + 9);
    // mos metrics on the saved scores reproduces the results row.
    let out = mos()
        .args(["metrics", "--method", "Energy", "--scores"])
        .arg(&csv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let energy = rows.iter().find(|r| r["method"] == "Energy").unwrap();
    for key in [
        "auroc",
        "aupr_in",
        "aupr_out",
        "fpr95",
        "fpr95_ood_positive",
    ] {
        assert_eq!(m[key], energy[key], "{key}");
    }
    mos()
        .args(["metrics", "--scores"])
        .arg(&csv)
        .assert()
        .failure()
        .stderr(predicate::str::contains("--method"));
    // A second run with another method adds its row.
    let mut cmd = mos();
    cmd.arg("test-baseline");
    common(&mut cmd, &s, "base");
    cmd.arg("--model-path").arg(&ckpt).args(["--score", "MSP"]);
    cmd.assert().success();
    let text = std::fs::read_to_string(run.join("results.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        4
    );
    for format in ["markdown", "csv", "latex"] {
        mos()
            .arg("report")
            .arg(&run)
            .args(["--format", format])
            .assert()
            .success()
            .stdout(predicate::str::contains("ood\\_set").or(predicate::str::contains("ood_set")));
    }
}

#[test]
fn mos_score_runs_with_a_json_group_config() {
    let s = setup();
    let cfg = s.root.join("groups.json");
    std::fs::write(&cfg, r#"{"classes_per_group": [1, 1]}"#).unwrap();
    let ckpt = checkpoint(&s.root, 4, Some(vec![1, 1]));
    let mut cmd = mos();
    cmd.arg("test-mos");
    common(&mut cmd, &s, "mos");
    let csv = s.root.join("mos_scores.csv");
    cmd.arg("--model-path")
        .arg(&ckpt)
        .arg("--group_config")
        .arg(&cfg)
        .arg("--save-scores")
        .arg(&csv);
    let out = cmd.assert().success().get_output().clone();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let text = std::fs::read_to_string(s.root.join("runs/mos/results.json")).unwrap();
    let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r["method"], "MOS");
    assert_eq!(
        (&r["num_in"], &r["num_out"], &r["skipped"]),
        (&5.into(), &4.into(), &0.into())
    );
    assert_eq!(r["settings"]["group_config"], serde_json::json!(cfg));
    assert_eq!(
        r["settings"]["classes_per_group"],
        serde_json::json!([1, 1])
    );
    assert_eq!(r["settings"]["crop"], 32);
    check_table(&stdout, rows);
    check_metrics_from_csv(&csv, rows);
    // A flat checkpoint is refused with the reason.
    let flat = checkpoint(&s.root, 2, None);
    let mut cmd = mos();
    cmd.arg("test-mos");
    common(&mut cmd, &s, "mos2");
    cmd.arg("--model-path")
        .arg(&flat)
        .arg("--group-config")
        .arg(&cfg);
    cmd.assert()
        .code(1)
        .stderr(predicate::str::contains(
            "head has 2 outputs but 4 are needed",
        ))
        .stderr(predicate::str::contains(
            "flat-softmax checkpoint belongs to test-baseline",
        ));
    // A group config that does not cover the ID classes names both numbers.
    std::fs::write(&cfg, r#"{"classes_per_group": [2, 1]}"#).unwrap();
    let mut cmd = mos();
    cmd.arg("test-mos");
    common(&mut cmd, &s, "mos3");
    cmd.arg("--model-path")
        .arg(&ckpt)
        .arg("--group-config")
        .arg(&cfg);
    cmd.assert()
        .code(1)
        .stderr(predicate::str::contains(
            "covers 3 classes but --in-datadir",
        ))
        .stderr(predicate::str::contains("has 2 class folders"));
    // And a group checkpoint is refused by test-baseline.
    let mut cmd = mos();
    cmd.arg("test-baseline");
    common(&mut cmd, &s, "base2");
    cmd.arg("--model-path").arg(&ckpt);
    cmd.assert().code(1).stderr(predicate::str::contains(
        "group-softmax checkpoint belongs to test-mos",
    ));
}

#[test]
fn bad_inputs_fail_clearly() {
    let s = setup();
    let ckpt = checkpoint(&s.root, 2, None);
    // Missing folder.
    let mut cmd = mos();
    cmd.arg("test-baseline")
        .arg("--in-datadir")
        .arg(s.root.join("nope"))
        .arg("--out-datadir")
        .arg(&s.ood);
    cmd.arg("--logdir").arg(s.root.join("runs")).args([
        "--name",
        "x",
        "--model",
        "ResNetV2-R14x0.5",
        "--crop",
        "32",
    ]);
    cmd.arg("--model-path").arg(&ckpt);
    cmd.assert()
        .code(1)
        .stderr(predicate::str::contains("--in-datadir"))
        .stderr(predicate::str::contains("nope"));
    // Empty OOD folder.
    let empty = s.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut cmd = mos();
    cmd.arg("test-baseline")
        .arg("--in-datadir")
        .arg(&s.id)
        .arg("--out-datadir")
        .arg(&empty);
    cmd.arg("--logdir").arg(s.root.join("runs")).args([
        "--name",
        "x",
        "--model",
        "ResNetV2-R14x0.5",
        "--crop",
        "32",
    ]);
    cmd.arg("--model-path").arg(&ckpt);
    cmd.assert()
        .code(1)
        .stderr(predicate::str::contains("--out-datadir"))
        .stderr(predicate::str::contains("class folder"));
    // An unreadable image stops the run and is named; --skip-bad-images skips and counts it.
    std::fs::write(s.ood.join("images/broken.jpg"), b"not a jpeg at all").unwrap();
    let mut cmd = mos();
    cmd.arg("test-baseline");
    common(&mut cmd, &s, "bad");
    cmd.arg("--model-path").arg(&ckpt);
    cmd.assert()
        .code(1)
        .stderr(predicate::str::contains("broken.jpg"))
        .stderr(predicate::str::contains("--skip-bad-images"));
    let mut cmd = mos();
    cmd.arg("test-baseline");
    common(&mut cmd, &s, "bad");
    cmd.arg("--model-path").arg(&ckpt).arg("--skip-bad-images");
    cmd.assert().success();
    let rows: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.root.join("runs/bad/results.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rows[0]["skipped"], 1);
    assert_eq!(rows[0]["num_out"], 4);
    assert!(std::fs::read_to_string(s.root.join("runs/bad/test.log"))
        .unwrap()
        .contains("skipped unreadable image"));
    // Unknown score and bad temperature.
    let mut cmd = mos();
    cmd.arg("test-baseline");
    common(&mut cmd, &s, "y");
    cmd.arg("--model-path")
        .arg(&ckpt)
        .args(["--score", "MSP,Foo"]);
    cmd.assert()
        .code(2)
        .stderr(predicate::str::contains("unknown score 'Foo'"));
}

#[test]
fn data_check_reports_classes_bad_files_and_dumps() {
    let s = setup();
    let dump = s.root.join("dump.safetensors");
    mos()
        .args([
            "data-check",
            "--crop",
            "24",
            "--workers",
            "2",
            "--limit",
            "3",
            "--datadir",
        ])
        .arg(&s.id)
        .arg("--dump")
        .arg(&dump)
        .assert()
        .success()
        .stdout(predicate::str::contains("5 images, 2 classes"))
        .stdout(predicate::str::contains("a_class: 3"))
        .stdout(predicate::str::contains("all 5 images are readable"))
        .stdout(predicate::str::contains("images/s"));
    let t = tch::Tensor::read_safetensors(&dump).unwrap();
    let images = &t.iter().find(|(n, _)| n == "images").unwrap().1;
    let labels = &t.iter().find(|(n, _)| n == "labels").unwrap().1;
    assert_eq!(images.size(), [3, 3, 24, 24]);
    assert_eq!(Vec::<i64>::try_from(labels).unwrap(), vec![0, 0, 0]);
    let (lo, hi) = (
        images.min().double_value(&[]),
        images.max().double_value(&[]),
    );
    assert!((-1.0..=1.0).contains(&lo) && (-1.0..=1.0).contains(&hi));
    // A list with a bad image: listed, exit 1.
    std::fs::write(s.id.join("b_class/zero.jpg"), b"").unwrap();
    let list = s.root.join("list.txt");
    std::fs::write(
        &list,
        "a_class/img_0.png 0\nb_class/zero.jpg 1\nb_class/img_1.png 1\n",
    )
    .unwrap();
    mos()
        .args(["data-check", "--crop", "24", "--workers", "2", "--datadir"])
        .arg(&s.id)
        .arg("--list")
        .arg(&list)
        .assert()
        .code(1)
        .stdout(predicate::str::contains("1 unreadable images"))
        .stdout(predicate::str::contains("zero.jpg"));
    // A malformed list line is named by file and line.
    std::fs::write(&list, "a_class/img_0.png 0\nb_class/img_1.png x\n").unwrap();
    mos()
        .args(["data-check", "--datadir"])
        .arg(&s.id)
        .arg("--list")
        .arg(&list)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("list.txt:2"));
}
