//! mos benchmark end to end on tiny image folders and small random models: its rows
//! equal test-mos / test-baseline's (stores and image passes alike), a rerun
//! recomputes nothing, the published comparison sets the exit status, and bad
//! input stops before anything is computed.
use std::path::{Path, PathBuf};

mod common;

use common::cli::{mos, ok, pngs, run_ok, tune_mahalanobis, SMALL};

use assert_cmd::Command;
use predicates::prelude::*;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    id: PathBuf,
    oods: [PathBuf; 2],
    flat: PathBuf,
    group: PathBuf,
    groups: PathBuf,
}

/// 7 ID images in 2 classes, two OOD sets (5 and 4 images), a flat model (2
/// logits) and a group model (2 groups of 1 class: 4 logits).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let id = root.join("data/id_val");
    let oods = [root.join("data/ood_a"), root.join("data/ood_b")];
    pngs(&id, "a_class", 4, 1);
    pngs(&id, "b_class", 3, 2);
    pngs(&oods[0], "images", 5, 3);
    pngs(&oods[1], "images", 4, 4);
    let flat = root.join("flat.safetensors");
    common::random_checkpoint(&flat, 2, None, 7, 0.5);
    let group = root.join("group.safetensors");
    common::random_checkpoint(&group, 4, Some(vec![1, 1]), 8, 0.5);
    let groups = root.join("groups.json");
    std::fs::write(&groups, r#"{"classes_per_group": [1, 1]}"#).unwrap();
    Setup {
        _dir: dir,
        root,
        id,
        oods,
        flat,
        group,
        groups,
    }
}

fn results(path: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Tuned Mahalanobis parameters with the given magnitudes searched.
fn tune(s: &Setup, name: &str, magnitudes: &str) -> PathBuf {
    tune_mahalanobis(&s.root, &s.id, &s.flat, name, magnitudes)
}

/// `mos benchmark` of the setup with every method, run `name`.
fn benchmark(s: &Setup, name: &str, maha: &Path, epsilon: &str) -> Command {
    let methods = "MOS,MSP,ODIN,Energy,KL_Div,Mahalanobis";
    benchmark_with(s, name, maha, epsilon, methods, [&s.group, &s.flat])
}

/// [`benchmark`] with other methods and models (group, flat).
fn benchmark_with(
    s: &Setup,
    name: &str,
    maha: &Path,
    epsilon: &str,
    methods: &str,
    models: [&Path; 2],
) -> Command {
    let mut cmd = mos();
    cmd.arg("benchmark")
        .arg("--in-datadir")
        .arg(&s.id)
        .arg("--out-datadir")
        .arg(&s.oods[0])
        .arg("--out-datadir")
        .arg(&s.oods[1])
        .arg("--group-model-path")
        .arg(models[0])
        .arg("--group-config")
        .arg(&s.groups)
        .arg("--flat-model-path")
        .arg(models[1])
        .arg("--mahalanobis-param-path")
        .arg(maha)
        .args(["--score", methods])
        .args(["--epsilon-odin", epsilon])
        .arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", name])
        .args(SMALL);
    cmd
}

/// The original way: test-mos, then test-baseline with the five baselines, each
/// over both OOD sets.
fn test_commands(s: &Setup, name: &str, maha: &Path, epsilon: &str) -> Vec<serde_json::Value> {
    let common = |cmd: &mut Command| {
        cmd.arg("--in-datadir")
            .arg(&s.id)
            .arg("--out-datadir")
            .arg(&s.oods[0])
            .arg("--out-datadir")
            .arg(&s.oods[1])
            .arg("--logdir")
            .arg(s.root.join("runs"))
            .args(["--name", name])
            .args(SMALL);
    };
    let mut cmd = mos();
    cmd.arg("test-mos")
        .arg("--model-path")
        .arg(&s.group)
        .arg("--group-config")
        .arg(&s.groups);
    common(&mut cmd);
    ok(&mut cmd);
    let mut cmd = mos();
    cmd.arg("test-baseline")
        .arg("--model-path")
        .arg(&s.flat)
        .args(["--score", "MSP,ODIN,Energy,KL_Div,Mahalanobis"])
        .args(["--epsilon-odin", epsilon])
        .arg("--mahalanobis-param-path")
        .arg(maha);
    common(&mut cmd);
    ok(&mut cmd);
    results(&s.root.join("runs").join(name).join("results.json"))
}

/// Every row of `got` has a row of `want` with the same method and sets and the
/// same metrics, bit for bit (the same scores through the same functions).
fn same_rows(got: &[serde_json::Value], want: &[serde_json::Value]) {
    assert_eq!(got.len(), want.len());
    for g in got {
        let w = want
            .iter()
            .find(|w| w["method"] == g["method"] && w["out_dataset"] == g["out_dataset"])
            .unwrap_or_else(|| panic!("no row for {} {}", g["method"], g["out_dataset"]));
        for k in [
            "in_dataset",
            "num_in",
            "num_out",
            "auroc",
            "aupr_in",
            "aupr_out",
            "fpr95",
            "fpr95_ood_positive",
        ] {
            assert_eq!(g[k], w[k], "{} {} {k}", g["method"], g["out_dataset"]);
        }
    }
}

/// A published file with every measured cell, `shift` added to MSP's AUROC on ood_b.
fn published(s: &Setup, rows: &[serde_json::Value], shift: f64) -> PathBuf {
    let cells: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let round = |x: f64| (x * 10000.0).round() / 100.0;
            let mut a = round(r["auroc"].as_f64().unwrap());
            if r["method"] == "MSP" && r["out_dataset"] == "ood_b" {
                a += shift;
            }
            serde_json::json!({
                "method": r["method"], "set": r["out_dataset"],
                "auroc": a, "fpr95": round(r["fpr95"].as_f64().unwrap()),
                "auroc_tolerance": 0.5, "fpr95_tolerance": 0.5
            })
        })
        .collect();
    let path = s.root.join(format!("published_{shift}.json"));
    // An unchecked copy of MSP on ood_a, shown beside the run and never compared.
    let unchecked = serde_json::json!([{
        "method": "msp", "set": "ood_a", "auroc": 1.0, "fpr95": 99.0,
        "source": "another copy", "why": "a second row"
    }]);
    let doc = serde_json::json!({"source": "this test", "cells": cells, "unchecked": unchecked});
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    path
}

#[test]
fn benchmark_equals_the_test_commands_resumes_and_compares() {
    let s = setup();
    // Stores serve everything: ODIN with epsilon 0, Mahalanobis with magnitude 0.
    let maha0 = tune(&s, "maha0", "0");
    ok(&mut benchmark(&s, "bench", &maha0, "0"));
    let run = s.root.join("runs/bench");
    let rows = results(&run.join("results.json"));
    assert_eq!(rows.len(), 12);
    same_rows(&rows, &test_commands(&s, "orig", &maha0, "0"));
    assert!(rows.iter().all(|r| r["settings"]["from"]
        .as_str()
        .unwrap()
        .starts_with("stores")));
    let log = std::fs::read_to_string(run.join("benchmark.log")).unwrap();
    // (group, flat) x (id_val, ood_a, ood_b), each extracted once.
    assert_eq!(log.matches("extracted").count(), 6, "{log}");
    // The flat model's store of ood_b: complete, of that model, checkpoint, crop,
    // images and layers (the logits and Mahalanobis' feature layers).
    let text = std::fs::read_to_string(run.join("stores/flat/ood_b/manifest.json")).unwrap();
    let m: mos::pipeline::store::Manifest = serde_json::from_str(&text).unwrap();
    assert!(m.complete, "{text}");
    assert_eq!(
        (m.model.as_str(), m.crop, m.images, m.num_shards),
        ("ResNetV2-R14x0.5", 32, 4, 1),
        "{text}"
    );
    assert_eq!(m.dataset, "ood_b");
    assert_eq!(m.layers, ["logits", "mahalanobis"]);
    assert_eq!(
        m.checkpoint_sha256,
        mos::pipeline::store::sha256_file(&s.flat).unwrap()
    );
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains(
            "| Method | ood_a AUROC / FPR95 | ood_b AUROC / FPR95 | Average AUROC / FPR95 |"
        ),
        "{report}"
    );
    assert!(report.contains("| KL_Div |"), "{report}");

    // A rerun recomputes nothing and gives the same rows.
    ok(&mut benchmark(&s, "bench", &maha0, "0"));
    let log = std::fs::read_to_string(run.join("benchmark.log")).unwrap();
    assert_eq!(log.matches("extracted").count(), 6, "{log}");
    assert_eq!(log.matches("is complete, reused").count(), 6, "{log}");
    same_rows(&results(&run.join("results.json")), &rows);

    // Published numbers: all within tolerance, then one cell 0.6 off (> 0.5).
    let good = published(&s, &rows, 0.0);
    let (out, _) = run_ok(
        benchmark(&s, "bench", &maha0, "0")
            .arg("--published")
            .arg(&good),
    );
    assert!(
        out.contains("all 12 published cells within their tolerance"),
        "{out}"
    );
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    let msp_a = rows
        .iter()
        .find(|r| r["method"] == "MSP" && r["out_dataset"] == "ood_a")
        .unwrap();
    assert!(
        report.contains("## Published elsewhere, not checked")
            && report.contains("1. Source: another copy\n   Not checked: a second row")
            && report.contains(&format!(
                "| MSP | ood_a | 1.00 | {:.2} | 99.00 | {:.2} | 1 |",
                100.0 * msp_a["auroc"].as_f64().unwrap(),
                100.0 * msp_a["fpr95"].as_f64().unwrap()
            )),
        "{report}"
    );
    let bad = published(&s, &rows, 0.6);
    benchmark(&s, "bench", &maha0, "0")
        .arg("--published")
        .arg(&bad)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "1 of 12 published cells are outside their tolerance",
        ));
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("| MSP | ood_b |") && report.contains("| -0.60 | 0.50 |"),
        "{report}"
    );
    assert!(
        report.contains("**no**") && report.contains("11 of 12 cells within"),
        "{report}"
    );
}

#[test]
fn image_pass_methods_equal_test_baseline() {
    let s = setup();
    // ODIN with epsilon > 0 and Mahalanobis with magnitude > 0 need the images.
    let maha = tune(&s, "maha", "0.01");
    ok(&mut benchmark(&s, "bench", &maha, "0.002"));
    let run = s.root.join("runs/bench");
    let rows = results(&run.join("results.json"));
    same_rows(&rows, &test_commands(&s, "orig", &maha, "0.002"));
    for r in &rows {
        let image_pass = r["method"] == "ODIN" || r["method"] == "Mahalanobis";
        assert_eq!(r["settings"]["from"] == "images", image_pass, "{r}");
    }
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("image pass ODIN+Mahalanobis, ood_b"),
        "{report}"
    );
    // The flat model's extraction carried the image pass: one pass over each set.
    let log = std::fs::read_to_string(run.join("benchmark.log")).unwrap();
    assert_eq!(
        log.matches("with the image pass of ODIN+Mahalanobis")
            .count(),
        3,
        "{log}"
    );
    assert_eq!(log.matches("image pass over").count(), 0, "{log}");
    // A rerun finds the stores complete: the image pass runs alone, same rows.
    ok(&mut benchmark(&s, "bench", &maha, "0.002"));
    let log = std::fs::read_to_string(run.join("benchmark.log")).unwrap();
    assert_eq!(log.matches("is complete, reused").count(), 6, "{log}");
    assert_eq!(
        log.matches("ODIN+Mahalanobis: image pass over").count(),
        3,
        "{log}"
    );
    same_rows(&results(&run.join("results.json")), &rows);
}

#[test]
fn bad_input_stops_before_any_work() {
    let s = setup();
    let maha = s.root.join("no_params_needed");
    let fails = |cmd: &mut Command, what: &[&str]| {
        let out = cmd.assert().code(1).get_output().clone();
        let err = String::from_utf8(out.stderr).unwrap();
        for w in what {
            assert!(err.contains(w), "{w} not in {err}");
        }
        assert!(!s.root.join("runs/bad/stores").exists(), "{err}");
    };
    let (group, flat) = (s.group.as_path(), s.flat.as_path());
    let with = |models: [&Path; 2]| benchmark_with(&s, "bad", &maha, "0", "MOS,MSP,Energy", models);
    let base = |_: &Setup| with([group, flat]);
    // A missing set directory.
    fails(
        base(&s).arg("--out-datadir").arg(s.root.join("data/nope")),
        &["--out-datadir", "data/nope"],
    );
    // A set with the wrong count, and what looks foreign in it.
    std::fs::write(s.oods[1].join("images/.directory"), "[Dolphin]").unwrap();
    fails(
        base(&s).args(["--expect-images", "ood_b=5"]),
        &["set ood_b should hold 5 images but holds 4", ".directory"],
    );
    // Checkpoints that do not fit their roles.
    fails(
        &mut with([flat, flat]),
        &[
            "--group-model-path",
            "a flat-softmax checkpoint",
            "belongs to --flat-model-path",
        ],
    );
    fails(
        &mut with([group, group]),
        &[
            "--flat-model-path",
            "a group-softmax checkpoint belongs to --group-model-path",
        ],
    );
    // A published file without a cell of a method that is run.
    let p = s.root.join("p.json");
    std::fs::write(
        &p,
        r#"{"source": "x", "cells": [{"method": "MSP", "set": "ood_a", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
    )
    .unwrap();
    fails(
        base(&s).arg("--published").arg(&p),
        &["no published number for MOS on ood_a"],
    );
    // A malformed config key.
    let cfg = s.root.join("c.json");
    std::fs::write(&cfg, "{\n  \"scores\": [\"MSP\"]\n}").unwrap();
    fails(
        base(&s).arg("--config").arg(&cfg),
        &["c.json", "unknown field `scores`", "line 2", "snake_case"],
    );
}

/// The post-hoc methods in `mos benchmark`: the flat model's stores keep the
/// pre-logit features, the head comes from --flat-model-path, the statistics
/// from --fit (saved in the run directory, reused on a rerun), and the rows equal
/// `mos score`'s on the benchmark's own stores with the same flags.
#[test]
fn posthoc_methods_equal_mos_score_on_the_stores() {
    let s = setup();
    let fit = s.root.join("fit_store");
    ok(mos()
        .arg("extract")
        .arg("--model-path")
        .arg(&s.flat)
        .arg("--datadir")
        .arg(&s.id)
        .arg("--output")
        .arg(&fit)
        .args(["--layers", "logits,features"])
        .args(SMALL));
    let methods = "MSP,MaxLogit,GradNorm,ReAct,KNN,ViM,ASH-S,DICE";
    // ViM's principal space needs more fit rows (7 images) than its dimension.
    let hyper = ["--knn-k", "3", "--react-percentile", "80", "--vim-dim", "4"];
    let no_maha = s.root.join("unused");
    let bench = || {
        let mut cmd = benchmark_with(&s, "ph", &no_maha, "0", methods, [&s.group, &s.flat]);
        cmd.arg("--fit").arg(&fit).args(hyper);
        cmd
    };
    ok(&mut bench());
    let run = s.root.join("runs/ph");
    let rows = results(&run.join("results.json"));
    assert_eq!(rows.len(), 16);
    // The saved fit: ReAct's threshold at --react-percentile 80 as logged, DICE's
    // mean and ViM at --vim-dim 4 (1024 features: 1020 residual directions), fitted
    // on the 7 images of the fit store.
    let (fit_json, tensors) = common::read_fit(&run);
    let log = std::fs::read_to_string(run.join("benchmark.log")).unwrap();
    assert_eq!(fit_json["source"]["rows"], 7, "{fit_json}");
    assert_eq!(fit_json["source"]["store"], fit.display().to_string());
    assert_eq!(fit_json["react"]["percentile"], 80.0, "{fit_json}");
    let t = common::logged_number(&log, "the 80th percentile of the training activations is ");
    assert!(t.is_finite() && t > 0.0, "{log}");
    let saved = fit_json["react"]["threshold"].as_f64().unwrap();
    assert!(common::json_f64_eq(saved, t), "{fit_json} vs {log}");
    assert_eq!(fit_json["dice_mean"], true, "{fit_json}");
    assert_eq!(fit_json["vim"]["dim"], 4, "{fit_json}");
    let alpha = common::logged_number(&log, "ViM: dimension 4, alpha ");
    let saved = fit_json["vim"]["alpha"].as_f64().unwrap();
    assert!(common::json_f64_eq(saved, alpha), "{fit_json} vs {log}");
    let shapes: Vec<(&str, Vec<i64>)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.size()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("dice.mean", vec![1024]),
            ("react.threshold", vec![1]),
            ("vim.alpha", vec![1]),
            ("vim.ns", vec![1024, 1020]),
            ("vim.u", vec![1024]),
        ]
    );
    assert_eq!(common::to_vec(&tensors[1].1), [t]);
    assert_eq!(common::to_vec(&tensors[2].1), [alpha]);
    let knn = rows.iter().find(|r| r["method"] == "KNN").unwrap();
    assert_eq!(knn["settings"]["posthoc"]["knn_k"], 3, "{knn}");
    let react = rows.iter().find(|r| r["method"] == "ReAct").unwrap();
    assert_eq!(react["settings"]["posthoc"]["react_percentile"], 80.0);

    // mos score on the benchmark's flat stores, with the same checkpoint and fit.
    let stores = run.join("stores/flat");
    ok(mos()
        .arg("score")
        .arg("--id")
        .arg(stores.join("id_val"))
        .arg("--ood")
        .arg(stores.join("ood_a"))
        .arg("--ood")
        .arg(stores.join("ood_b"))
        .args(["--score", methods, "--device", "cpu"])
        .arg("--model-path")
        .arg(&s.flat)
        .arg("--fit")
        .arg(&fit)
        .args(hyper)
        .arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", "score"]));
    same_rows(&rows, &results(&s.root.join("runs/score/results.json")));

    // A rerun reuses the stores and what was fitted (KNN reads its bank again).
    ok(&mut bench());
    let log = std::fs::read_to_string(run.join("benchmark.log")).unwrap();
    assert_eq!(log.matches("is complete, reused").count(), 3, "{log}");
    for fitted in ["ReAct: the 80th percentile", "ViM: dimension"] {
        assert_eq!(log.matches(fitted).count(), 1, "{log}");
    }
    same_rows(&results(&run.join("results.json")), &rows);
    // Other settings for the same run directory: a store not yet complete is not
    // mixed, and the hint names the benchmark's flags. (A complete store extracted
    // without --skip-bad-images skipped nothing and would serve the flag.)
    std::fs::remove_file(stores.join("ood_b/shard-00000-of-00001.json")).unwrap();
    bench()
        .arg("--skip-bad-images")
        .assert()
        .code(1)
        .stderr(predicate::str::contains("extracted with other settings"))
        .stderr(predicate::str::contains("Use another --name or --logdir"));

    // A method that needs --fit without it, and a bad percentile: errors before
    // any store is extracted.
    for (extra, what) in [
        (
            vec![],
            "--score ReAct,DICE needs training statistics: give --fit",
        ),
        (
            vec!["--fit", "x", "--dice-percentile", "100"],
            "--dice-percentile 100: must be a percentile in (0, 100)",
        ),
    ] {
        let mut cmd = benchmark_with(
            &s,
            "ph_bad",
            &no_maha,
            "0",
            "MSP,ReAct,DICE",
            [&s.group, &s.flat],
        );
        let out = cmd.args(&extra).assert().code(1).get_output().clone();
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(what), "{what} not in {err}");
        assert!(!s.root.join("runs/ph_bad/stores").exists(), "{err}");
    }
}

/// A benchmark that fails on an unreadable image, saying "pass --skip-bad-images",
/// leaves no store manifest of its own behind, so that the retry with the flag runs
/// (it was refused: "extracted with other settings").
#[test]
fn a_failed_extraction_does_not_block_the_retry_its_error_suggests() {
    let s = setup();
    // The first set extracted (the ID set) holds the unreadable image.
    std::fs::write(s.id.join("a_class/img_9.png"), b"\x89PNG truncated").unwrap();
    let maha = s.root.join("unused");
    let bench = || benchmark_with(&s, "skip", &maha, "0", "MSP", [&s.group, &s.flat]);
    let out = bench().assert().code(1).get_output().clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("img_9.png") && err.contains("pass --skip-bad-images"),
        "{err}"
    );
    let err = ok(bench().arg("--skip-bad-images"));
    assert!(err.contains("skipped unreadable image"), "{err}");
    let rows = results(&s.root.join("runs/skip/results.json"));
    assert_eq!(rows[0]["num_in"], 7, "{rows:?}");

    // A bad image in an OOD set, extracted after the ID set: the retry with
    // --skip-bad-images reuses the complete ID store, which skipped nothing.
    std::fs::remove_file(s.id.join("a_class/img_9.png")).unwrap();
    std::fs::write(s.oods[1].join("images/img_9.png"), b"\x89PNG truncated").unwrap();
    let bench = || benchmark_with(&s, "ood-skip", &maha, "0", "MSP", [&s.group, &s.flat]);
    let err = String::from_utf8(bench().assert().code(1).get_output().stderr.clone()).unwrap();
    assert!(
        err.contains("img_9.png") && err.contains("pass --skip-bad-images"),
        "{err}"
    );
    let err = ok(bench().arg("--skip-bad-images"));
    assert!(
        err.contains("id_val: store") && err.contains("is complete, reused"),
        "{err}"
    );
    let rows = results(&s.root.join("runs/ood-skip/results.json"));
    let b = rows.iter().find(|r| r["out_dataset"] == "ood_b").unwrap();
    assert_eq!(
        (rows[0]["num_in"].clone(), b["num_out"].clone()),
        (7.into(), 4.into())
    );
}

/// RankFeat in `mos benchmark`: the flat model's stores keep the fused logits
/// (extracted with the rest, `--layers` rankfeat), the rows equal `mos score`'s on
/// those stores, alongside methods without a fit (SCALE, GEN); a ViT is refused
/// before anything is read.
#[test]
fn rankfeat_is_extracted_into_the_flat_stores() {
    let s = setup();
    let methods = "MSP,RankFeat,SCALE,GEN";
    let no_maha = s.root.join("unused");
    ok(&mut benchmark_with(
        &s,
        "rf",
        &no_maha,
        "0",
        methods,
        [&s.group, &s.flat],
    ));
    let run = s.root.join("runs/rf");
    let rows = results(&run.join("results.json"));
    assert_eq!(rows.len(), 8);
    let stores = run.join("stores/flat");
    let m = mos::pipeline::store::read_manifest(&stores.join("ood_a")).unwrap();
    assert_eq!(m.layers, ["logits", "features", "rankfeat"]);
    ok(mos()
        .arg("score")
        .arg("--id")
        .arg(stores.join("id_val"))
        .arg("--ood")
        .arg(stores.join("ood_a"))
        .arg("--ood")
        .arg(stores.join("ood_b"))
        .args(["--score", methods, "--device", "cpu"])
        .arg("--model-path")
        .arg(&s.flat)
        .arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", "rf_score"]));
    let want = results(&s.root.join("runs/rf_score/results.json"));
    for r in &rows {
        let w = want
            .iter()
            .find(|w| w["method"] == r["method"] && w["out_dataset"] == r["out_dataset"])
            .unwrap();
        for k in ["auroc", "fpr95", "aupr_in", "aupr_out"] {
            assert_eq!(r[k], w[k], "{} {} {k}", r["method"], r["out_dataset"]);
        }
    }
    let e = common::cli::fails(
        mos()
            .arg("benchmark")
            .arg("--in-datadir")
            .arg(&s.id)
            .arg("--out-datadir")
            .arg(&s.oods[0])
            .arg("--flat-model-path")
            .arg(&s.flat)
            .args([
                "--score", "RankFeat", "--model", "vit_b_16", "--device", "cpu",
            ])
            .arg("--logdir")
            .arg(s.root.join("runs"))
            .args(["--name", "rf_vit"]),
    );
    assert!(
        e.contains("--score RankFeat") && e.contains("not on vit_b_16"),
        "{e}"
    );
}
