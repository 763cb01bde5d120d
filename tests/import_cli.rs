//! `mos import`: arrays computed anywhere (.npy, .npz, safetensors) become a store
//! that `mos score` reads as it reads an extracted one — the same scores bit for
//! bit — and arrays that cannot be a store are clear errors that write nothing.
use std::path::{Path, PathBuf};

mod common;

use common::cli::{extract_at, fails, mos, ok, pngs};

use assert_cmd::Command;
use tch::{Kind, Tensor};

/// Every tensor of a one-shard store and its rows' paths.
fn shard(store: &Path) -> (Vec<(String, Tensor)>, Vec<String>) {
    let stem = mos::pipeline::store::shard_stem(0, 1);
    let file = store.join(format!("{stem}.safetensors"));
    let tensors = Tensor::read_safetensors(&file).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join(format!("{stem}.json"))).unwrap())
            .unwrap();
    let paths = index["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    (tensors, paths)
}

fn get(tensors: &[(String, Tensor)], name: &str) -> Tensor {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
        .shallow_clone()
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ckpt: PathBuf,
    /// Extracted by mos: the ID set, an OOD set.
    id: PathBuf,
    ood: PathBuf,
}

/// Two stores extracted by mos from a small random model.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    pngs(&root.join("data/id_val"), "a_class", 4, 1);
    pngs(&root.join("data/id_val"), "b_class", 3, 2);
    pngs(&root.join("data/ood_set"), "images", 5, 3);
    let ckpt = root.join("flat.safetensors");
    common::random_checkpoint(&ckpt, 2, None, 7, 0.5);
    let (id, ood) = (root.join("stores/id_val"), root.join("stores/ood_set"));
    ok(&mut extract_at(&root.join("data/id_val"), &ckpt, &id, "32"));
    ok(&mut extract_at(
        &root.join("data/ood_set"),
        &ckpt,
        &ood,
        "32",
    ));
    Setup {
        _dir: dir,
        root,
        ckpt,
        id,
        ood,
    }
}

fn import(output: &Path) -> Command {
    let mut cmd = mos();
    cmd.arg("import").arg("--output").arg(output);
    cmd
}

fn score(root: &Path, id: &Path, ood: &Path, name: &str, extra: &[&str]) -> Command {
    let mut cmd = mos();
    cmd.arg("score")
        .arg("--id")
        .arg(id)
        .arg("--ood")
        .arg(ood)
        .arg("--fit")
        .arg(id)
        .args(["--score", "MSP,Energy,MaxLogit,KL_Div,ReAct,ASH-S,DICE,KNN"])
        .args(["--knn-k", "2", "--dice-percentile", "50"])
        .arg("--logdir")
        .arg(root.join("runs"))
        .args(["--name", name])
        .arg("--save-scores")
        .arg(root.join(format!("runs/{name}/scores.csv")))
        .args(extra);
    cmd
}

fn results(root: &Path, name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root.join(format!("runs/{name}/results.json"))).unwrap();
    serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
}

#[test]
fn imported_arrays_score_as_the_extracted_store_bit_for_bit() {
    let s = setup();
    let arrays = s.root.join("arrays");
    std::fs::create_dir_all(&arrays).unwrap();
    // The head as a framework would export it: W [C, D], b [C].
    let w = common::read_named(&s.ckpt, "head.conv.weight").flatten(1, -1);
    let b = common::read_named(&s.ckpt, "head.conv.bias");
    // The ID set as separate .npy files (labels as int32), the OOD set as one .npz.
    let (t, paths) = shard(&s.id);
    let id_paths = arrays.join("id_paths.txt");
    std::fs::write(&id_paths, paths.join("\n") + "\n").unwrap();
    get(&t, "logits")
        .write_npy(arrays.join("id_logits.npy"))
        .unwrap();
    get(&t, "features")
        .write_npy(arrays.join("id_features.npy"))
        .unwrap();
    get(&t, "labels")
        .to_kind(Kind::Int)
        .write_npy(arrays.join("id_labels.npy"))
        .unwrap();
    w.write_npy(arrays.join("w.npy")).unwrap();
    b.write_npy(arrays.join("b.npy")).unwrap();
    let (t, paths) = shard(&s.ood);
    let ood_paths = arrays.join("ood_paths.txt");
    std::fs::write(&ood_paths, paths.join("\n") + "\n").unwrap();
    Tensor::write_npz(
        &[
            ("logits", get(&t, "logits")),
            ("feats", get(&t, "features")),
        ],
        arrays.join("ood.npz"),
    )
    .unwrap();
    let id_datadir = s.root.join("data/id_val");
    let ood_datadir = s.root.join("data/ood_set");
    let (id2, ood2) = (s.root.join("imported/id"), s.root.join("imported/ood"));
    let a = |p: &str| arrays.join(p);
    ok(import(&id2)
        .arg("--logits")
        .arg(a("id_logits.npy"))
        .arg("--features")
        .arg(a("id_features.npy"))
        .arg("--labels")
        .arg(a("id_labels.npy"))
        .arg("--head-weight")
        .arg(a("w.npy"))
        .arg("--head-bias")
        .arg(a("b.npy"))
        .arg("--paths")
        .arg(&id_paths)
        .arg("--datadir")
        .arg(&id_datadir)
        .args(["--model-name", "r14", "--dataset", "id_val", "--batch", "2"]));
    let ood_import = |output: &Path, head: bool| -> Command {
        let mut cmd = import(output);
        cmd.arg("--arrays")
            .arg(a("ood.npz"))
            .arg("--features")
            .arg(format!("{}:feats", a("ood.npz").display()))
            .arg("--no-labels")
            .arg("--paths")
            .arg(&ood_paths)
            .arg("--datadir")
            .arg(&ood_datadir)
            .args([
                "--model-name",
                "r14",
                "--dataset",
                "ood_set",
                "--batch",
                "2",
            ]);
        if head {
            cmd.arg("--head-weight")
                .arg(a("w.npy"))
                .arg("--head-bias")
                .arg(a("b.npy"));
        }
        cmd
    };
    ok(&mut ood_import(&ood2, true));
    // The manifest records each array's file, type and content.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(id2.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["model"], "imported:r14");
    assert_eq!(m["complete"], true);
    let rec = m["imported"]["arrays"].as_array().unwrap();
    assert_eq!(rec.len(), 5, "{rec:?}");
    let labels = rec.iter().find(|r| r["array"] == "labels").unwrap();
    assert_eq!(labels["dtype"], "i32");
    assert_eq!(labels["shape"], serde_json::json!([7]));
    let sha = mos::pipeline::store::sha256_file(&a("id_labels.npy")).unwrap();
    assert_eq!(labels["sha256"], sha.as_str());
    // mos score: the extracted stores (head from the checkpoint) and the imported
    // ones (head from the store) give the same metrics and the same score files.
    let mp = s.ckpt.display().to_string();
    ok(&mut score(
        &s.root,
        &s.id,
        &s.ood,
        "extracted",
        &["--model-path", &mp],
    ));
    ok(&mut score(&s.root, &id2, &ood2, "imported", &[]));
    let (x, y) = (results(&s.root, "extracted"), results(&s.root, "imported"));
    assert_eq!(x.len(), 8);
    for (r, q) in x.iter().zip(&y) {
        for key in [
            "method",
            "in_dataset",
            "out_dataset",
            "num_in",
            "num_out",
            "auroc",
            "aupr_in",
            "aupr_out",
            "fpr95",
            "fpr95_ood_positive",
        ] {
            assert_eq!(r[key], q[key], "{} {key}", r["method"]);
        }
    }
    assert_eq!(y[0]["model"], "imported:r14");
    published_numbers_check_the_imported_stores(&s, &id2, &ood2, &x);
    let csv = |name: &str| {
        std::fs::read_to_string(s.root.join(format!("runs/{name}/scores.csv"))).unwrap()
    };
    let (cx, cy) = (csv("extracted"), csv("imported"));
    assert_eq!(cx.lines().count(), 1 + 7 + 5);
    assert_eq!(cx, cy);
    // Importing the same arrays again writes nothing; other arrays into it are refused.
    let before = std::fs::read(ood2.join(format!(
        "{}.safetensors",
        mos::pipeline::store::shard_stem(0, 1)
    )))
    .unwrap();
    ok(&mut ood_import(&ood2, true));
    let e = fails(
        import(&ood2)
            .arg("--logits")
            .arg(a("id_logits.npy"))
            .arg("--no-labels")
            .args([
                "--model-name",
                "r14",
                "--dataset",
                "ood_set",
                "--batch",
                "2",
            ]),
    );
    assert!(e.contains("other settings"), "{e}");
    assert_eq!(
        std::fs::read(ood2.join(format!(
            "{}.safetensors",
            mos::pipeline::store::shard_stem(0, 1)
        )))
        .unwrap(),
        before
    );
    // An OOD store imported without the model's head is not scored with the ID store.
    let headless = s.root.join("imported/headless");
    ok(&mut ood_import(&headless, false));
    let e = fails(&mut score(&s.root, &id2, &headless, "headless", &[]));
    assert!(e.contains("head SHA-256"), "{e}");
    // Stores of two models are not scored together.
    let other = s.root.join("imported/other");
    ok(import(&other)
        .arg("--arrays")
        .arg(a("ood.npz"))
        .arg("--features")
        .arg(format!("{}:feats", a("ood.npz").display()))
        .arg("--no-labels")
        .args(["--model-name", "another", "--batch", "2"]));
    let e = fails(&mut score(&s.root, &id2, &other, "mixed", &[]));
    assert!(
        e.contains("imported:r14") && e.contains("imported:another"),
        "{e}"
    );
}

/// `mos score --published` on imported stores: the rows of `measured` as published
/// numbers (all within), one shifted (exit 1), a method missing, another model.
fn published_numbers_check_the_imported_stores(
    s: &Setup,
    id: &Path,
    ood: &Path,
    measured: &[serde_json::Value],
) {
    let write = |name: &str, model: &str, shift: f64, skip: Option<&str>| -> PathBuf {
        let round = |x: f64| (x * 10000.0).round() / 100.0;
        let cells: Vec<serde_json::Value> = measured
            .iter()
            .filter(|r| Some(r["method"].as_str().unwrap()) != skip)
            .map(|r| {
                let a = round(r["auroc"].as_f64().unwrap());
                let a = if r["method"] == "Energy" {
                    a + shift
                } else {
                    a
                };
                serde_json::json!({"method": r["method"], "set": "ood_set", "auroc": a,
                    "fpr95": round(r["fpr95"].as_f64().unwrap()),
                    "auroc_tolerance": 0.5, "fpr95_tolerance": 0.5})
            })
            .collect();
        let doc = serde_json::json!({"source": "this test",
            "setup": {"model": model, "crop": 224, "resize": 256}, "cells": cells,
            "unchecked": [{"method": "DICE+ReAct", "set": "ood_set", "auroc": 50.0,
                "source": "a copy", "why": "not run"}]});
        let path = s.root.join(name);
        std::fs::write(&path, serde_json::to_string(&doc).unwrap()).unwrap();
        path
    };
    let arg = |p: &Path| p.display().to_string();
    let good = write("good.json", "R14", 0.0, None);
    let out = score(&s.root, id, ood, "pub_good", &["--published", &arg(&good)])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("all 8 published cells within their tolerance"),
        "{stdout}"
    );
    // An imported store records no transform: said, not silently passed.
    assert!(
        stderr.contains("the stores are imported, which records no transform, so its crop 224 and resize 256 are taken on trust"),
        "{stderr}"
    );
    let report = std::fs::read_to_string(s.root.join("runs/pub_good/report.md")).unwrap();
    assert!(
        report.contains("8 of 8 cells within their tolerance")
            && report.contains("| DICE+ReAct | ood_set | 50.00 | - | - | - | 1 |"),
        "{report}"
    );
    let bad = write("bad.json", "r14", 0.6, None);
    let e = fails(&mut score(
        &s.root,
        id,
        ood,
        "pub_bad",
        &["--published", &arg(&bad)],
    ));
    assert!(
        e.contains("1 of 8 published cells are outside their tolerance"),
        "{e}"
    );
    let missing = write("missing.json", "r14", 0.0, Some("KNN"));
    let e = fails(&mut score(
        &s.root,
        id,
        ood,
        "pub_missing",
        &["--published", &arg(&missing)],
    ));
    assert!(e.contains("no published number for KNN on ood_set"), "{e}");
    let other = write("other.json", "resnet50", 0.0, None);
    let e = fails(&mut score(
        &s.root,
        id,
        ood,
        "pub_other",
        &["--published", &arg(&other)],
    ));
    assert!(
        e.contains("measured with --model resnet50, the stores were imported as r14"),
        "{e}"
    );
    // Extracted stores record their model and transform, which are checked.
    let mp = s.ckpt.display().to_string();
    let e = fails(&mut score(
        &s.root,
        &s.id,
        &s.ood,
        "pub_extracted",
        &["--model-path", &mp, "--published", &arg(&good)],
    ));
    assert!(
        e.contains(
            "its numbers were measured with --model r14, this run has --model resnetv2-r14x0.5"
        ),
        "{e}"
    );
}

#[test]
fn arrays_that_cannot_be_a_store_are_clear_errors_that_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let logits = Tensor::from_slice(&[1.0f32, 2.0, 0.5, 0.1, 3.0, -1.0]).reshape([3, 2]);
    logits.write_npy(d.join("logits.npy")).unwrap();
    Tensor::from_slice(&[0i64, 1, 1])
        .write_npy(d.join("labels.npy"))
        .unwrap();
    Tensor::ones([2, 4], (Kind::Float, tch::Device::Cpu))
        .write_npy(d.join("short.npy"))
        .unwrap();
    Tensor::from_slice(&[0.5f32, 1.0, 2.0])
        .write_npy(d.join("float_labels.npy"))
        .unwrap();
    let nan = Tensor::from_slice(&[1.0f32, 2.0, f32::NAN, 0.1, 3.0, -1.0]).reshape([3, 2]);
    nan.write_npy(d.join("nan.npy")).unwrap();
    Tensor::write_npz(&[("logits", logits.shallow_clone())], d.join("a.npz")).unwrap();
    Tensor::ones([3, 4], (Kind::Float, tch::Device::Cpu))
        .write_npy(d.join("feat.npy"))
        .unwrap();
    Tensor::ones([2, 5], (Kind::Float, tch::Device::Cpu))
        .write_npy(d.join("w.npy"))
        .unwrap();
    Tensor::ones([2], (Kind::Float, tch::Device::Cpu))
        .write_npy(d.join("b.npy"))
        .unwrap();
    std::fs::write(d.join("two_paths.txt"), "a.png\nb.png\n").unwrap();
    let out = d.join("store");
    let run = |args: &[&str]| -> String {
        let mut cmd = import(&out);
        cmd.current_dir(d).args(["--model-name", "m"]).args(args);
        fails(&mut cmd)
    };
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "--logits",
                "logits.npy",
                "--labels",
                "labels.npy",
                "--features",
                "short.npy",
            ],
            vec![
                "--features short.npy has 2 rows",
                "--logits logits.npy has 3",
            ],
        ),
        (
            vec!["--logits", "logits.npy", "--labels", "float_labels.npy"],
            vec!["--labels float_labels.npy", "expected integers"],
        ),
        (
            vec!["--logits", "nan.npy", "--no-labels"],
            vec!["--logits nan.npy: row 1", "NaN"],
        ),
        (
            vec!["--logits", "logits.npy"],
            vec!["no labels", "--no-labels"],
        ),
        (
            vec!["--logits", "a.npz:scores", "--no-labels"],
            vec!["a.npz has no array 'scores'", "it has: logits"],
        ),
        (
            vec![
                "--logits",
                "logits.npy",
                "--no-labels",
                "--features",
                "feat.npy",
                "--head-weight",
                "w.npy",
                "--head-bias",
                "b.npy",
            ],
            vec!["--head-weight w.npy: shape [2, 5], expected [2, 4]"],
        ),
        (
            vec![
                "--logits",
                "logits.npy",
                "--no-labels",
                "--head-weight",
                "w.npy",
            ],
            vec!["both --head-weight and --head-bias"],
        ),
        (
            vec![
                "--logits",
                "logits.npy",
                "--no-labels",
                "--paths",
                "two_paths.txt",
            ],
            vec!["--paths two_paths.txt: 2 lines", "3 rows"],
        ),
        (
            vec!["--arrays", "logits.npy", "--no-labels"],
            vec!["--arrays logits.npy: a .npy file holds one array"],
        ),
        (
            vec!["--logits", "logits.txt", "--no-labels"],
            vec!["logits.txt: not a .npy, .npz or .safetensors file"],
        ),
        (
            vec!["--logits", "missing.npy", "--no-labels"],
            vec!["missing.npy"],
        ),
        (
            vec![
                "--logits",
                "logits.npy",
                "--labels",
                "labels.npy",
                "--num-classes",
                "1",
            ],
            vec!["--num-classes 1: the labels go up to 1"],
        ),
    ];
    for (args, want) in cases {
        let e = run(&args);
        for w in want {
            assert!(e.contains(w), "{args:?}: wanted '{w}' in: {e}");
        }
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // A safetensors file under the roles' names (float64 logits are stored as float32).
    Tensor::write_safetensors(
        &[
            ("logits", logits.to_kind(Kind::Double)),
            ("labels", Tensor::from_slice(&[2i64, 0, 1])),
        ],
        d.join("all.safetensors"),
    )
    .unwrap();
    ok(import(&out)
        .current_dir(d)
        .args(["--arrays", "all.safetensors", "--model-name", "m"]));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (m["images"].as_u64(), m["num_classes"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(m["imported"]["arrays"][0]["dtype"], "f64");
    let log = std::fs::read_to_string(out.join("store.log")).unwrap();
    assert!(log.contains("f64 values stored as float32"), "{log}");
    // A model name with a space is refused.
    let e = fails(import(&d.join("spaced")).current_dir(d).args([
        "--logits",
        "logits.npy",
        "--no-labels",
        "--model-name",
        "a b",
    ]));
    assert!(e.contains("--model-name 'a b'"), "{e}");
}
