//! `mos score` with the post-hoc methods (docs/scores.md#post-hoc-methods-from-feature-stores):
//! stores written with the library (random features of a ResNetV2-R14x0.5-sized
//! model, logits from a random head saved as a checkpoint), the scores of the
//! command equal the library's functions on the same tensors, the fit is saved and
//! reused, and bad input is a clear error before any scoring.
mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use common::cli::{mos, ok};
use common::Rng;
use mos::model::checkpoint;
use mos::ood::posthoc::{self as ph, Ash, Head, KnnBlocks};
use mos::pipeline::extract::Extracted;
use mos::pipeline::store::{self, Manifest};
use tch::{Kind, Tensor};

const C: i64 = 10;
const D: i64 = 1024; // ResNetV2-R14x0.5's pre-logit width

/// A random head saved as a checkpoint; returns its path and SHA-256.
fn head_checkpoint(path: &Path, seed: u64) -> (Head, String) {
    let mut rng = Rng::new(seed);
    let w = rng.normal_tensor(&[C, D, 1, 1]) * 0.05;
    let b = rng.normal_tensor(&[C]) * 0.1;
    let meta = std::collections::HashMap::new();
    let bytes = checkpoint::serialize(
        &[
            ("head.conv.weight".to_string(), w.shallow_clone()),
            ("head.conv.bias".to_string(), b.shallow_clone()),
        ],
        meta,
    )
    .unwrap();
    std::fs::write(path, bytes).unwrap();
    (
        Head::new(&w, &b).unwrap(),
        store::sha256_file(path).unwrap(),
    )
}

/// A one-shard store of `rows` random non-negative features (shifted by `shift`)
/// and their logits under `head`.
fn make_store(dir: &Path, ckpt: &Path, sha: &str, head: &Head, rows: usize, seed: u64, shift: f64) {
    let mut rng = Rng::new(seed);
    let features = (rng.normal_tensor(&[rows as i64, D]) + shift).relu();
    let logits = head.logits(&features);
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let mut m = Manifest {
        format: store::FORMAT.into(),
        mos_version: env!("CARGO_PKG_VERSION").into(),
        model: "ResNetV2-R14x0.5".into(),
        checkpoint: ckpt.display().to_string(),
        checkpoint_sha256: sha.into(),
        checkpoint_format: "safetensors".into(),
        head_size: C,
        num_classes: C,
        crop: 32,
        batch: 64,
        precision: "fp32".into(),
        skip_bad_images: false,
        layers: vec!["logits".into(), "features".into()],
        datadir: dir.join("data").display().to_string(),
        list: None,
        dataset: name,
        images: rows,
        data_fingerprint: format!("random-{seed}"),
        num_shards: 1,
        fingerprint: String::new(),
        command: vec!["mos".into(), "extract".into()],
        complete: true,
        group_config: None,
        resize: None,
        feature_dim: None,
        imported: None,
        mean: None,
        std: None,
        head: None,
        rankfeat_power_iterations: None,
    };
    m.fingerprint = m.compute_fingerprint();
    let m = store::prepare(dir, &m).unwrap();
    let ex = Extracted {
        indices: (0..rows).collect(),
        labels: (0..rows as i64).map(|i| i % C).collect(),
        logits,
        features: Some(features),
        layers: vec![],
        rankfeat: None,
        skipped: vec![],
    };
    let paths: Vec<String> = (0..rows)
        .map(|i| format!("c{}/{i}.png", i as i64 % C))
        .collect();
    store::write_shard(dir, &m, 0, &ex, &paths, "cpu").unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ckpt: PathBuf,
    head: Head,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let ckpt = root.join("head.safetensors");
    let (head, sha) = head_checkpoint(&ckpt, 7);
    make_store(&root.join("train"), &ckpt, &sha, &head, 120, 1, 0.3);
    make_store(&root.join("val"), &ckpt, &sha, &head, 40, 2, 0.3);
    make_store(&root.join("ood"), &ckpt, &sha, &head, 30, 3, -0.2);
    Setup {
        _tmp: tmp,
        root,
        ckpt,
        head,
    }
}

fn score(s: &Setup, methods: &str, name: &str) -> Command {
    let mut cmd = mos();
    cmd.arg("score")
        .arg("--id")
        .arg(s.root.join("val"))
        .arg("--ood")
        .arg(s.root.join("ood"))
        .args(["--score", methods, "--device", "cpu", "--name", name])
        .arg("--logdir")
        .arg(s.root.join("runs"));
    cmd
}

/// The error of a command that must fail with exit code 1, before any scoring
/// (no results.json in its run directory).
fn fails(cmd: &mut Command, run: &Path) -> String {
    let err = common::cli::fails(cmd);
    assert!(
        !run.join("results.json").exists(),
        "scored before the error:\n{err}"
    );
    err
}

/// Columns of a score CSV with one method per column: (header, rows of values).
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<f64>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines
        .map(|l| l.split(',').skip(2).map(|v| v.parse().unwrap()).collect())
        .collect();
    (header, rows)
}

fn load(dir: &Path) -> (Tensor, Tensor) {
    let s = store::load(dir).unwrap();
    (s.logits, s.features.unwrap())
}

#[test]
fn scores_of_the_command_equal_the_library_and_the_fit_is_reused() {
    let s = setup();
    let all = "MaxLogit,GradNorm,ReAct,KNN,ViM,ASH-P,ASH-B,ASH-S,DICE";
    let csv = s.root.join("scores.csv");
    let log = ok(score(&s, all, "run")
        .arg("--fit")
        .arg(s.root.join("train"))
        .arg("--model-path")
        .arg(&s.ckpt)
        .args(["--knn-k", "5", "--vim-dim", "100"])
        .arg("--save-scores")
        .arg(&csv));
    assert!(log.contains("training statistics saved"), "{log}");
    let run = s.root.join("runs/run");
    let (header, rows) = read_csv(&csv);
    assert_eq!(header[2..].join(","), all);

    // The library on the same tensors.
    let (tl, tf) = load(&s.root.join("train"));
    let threshold = ph::percentile(&tf, 90.0).unwrap();
    let bank = ph::l2_normalise(&tf);
    let vim = ph::vim_fit(&tf, &tl, &s.head.to(Kind::Double, tch::Device::Cpu), 100).unwrap();
    let mean = ph::feature_mean(&tf).unwrap();
    let mask = ph::dice_mask(&s.head, &mean, 70.0).unwrap();

    // The saved fit holds these statistics, with the settings asked for and the
    // values the log printed.
    let (fit, tensors) = common::read_fit(&run);
    assert_eq!(fit["format"], "mos-posthoc-fit-v1", "{fit}");
    assert_eq!(fit["source"]["rows"], 120, "{fit}");
    assert_eq!(fit["source"]["model"], "ResNetV2-R14x0.5", "{fit}");
    assert_eq!(
        fit["source"]["store"],
        s.root.join("train").display().to_string()
    );
    assert_eq!(fit["react"]["percentile"], 90.0, "{fit}");
    let t = common::logged_number(&log, "the 90th percentile of the training activations is ");
    assert_eq!(t, threshold, "{log}");
    assert!(
        common::json_f64_eq(fit["react"]["threshold"].as_f64().unwrap(), t),
        "{fit}"
    );
    assert_eq!(fit["dice_mean"], true, "{fit}");
    assert_eq!(fit["vim"]["dim"], 100, "{fit}");
    let alpha = common::logged_number(&log, "ViM: dimension 100, alpha ");
    assert_eq!(alpha, vim.alpha, "{log}");
    assert!(
        common::json_f64_eq(fit["vim"]["alpha"].as_f64().unwrap(), alpha),
        "{fit}"
    );
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "dice.mean",
            "react.threshold",
            "vim.alpha",
            "vim.ns",
            "vim.u"
        ]
    );
    let want: [(&Tensor, Vec<i64>); 5] = [
        (&mean, vec![D]),
        (&Tensor::from_slice(&[threshold]), vec![1]),
        (&Tensor::from_slice(&[vim.alpha]), vec![1]),
        (&vim.ns, vec![D, D - 100]),
        (&vim.u, vec![D]),
    ];
    for ((name, got), (w, shape)) in tensors.iter().zip(want) {
        assert_eq!(got.size(), shape, "{name}");
        let (g, w) = (common::to_vec(got), common::to_vec(w));
        let differ = g.iter().zip(&w).position(|(a, b)| a != b);
        assert_eq!(differ, None, "{name}: the first differing element");
    }
    let mut want: Vec<Vec<f64>> = vec![Vec::new(); 9];
    for set in ["val", "ood"] {
        let (l, f) = load(&s.root.join(set));
        let cols = [
            ph::max_logit(&l).unwrap(),
            ph::gradnorm(&l, &f).unwrap(),
            ph::react(&f, &s.head, threshold).unwrap(),
            ph::knn(&ph::l2_normalise(&f), &bank, 5, KnnBlocks::default()).unwrap(),
            ph::vim(&f, &l, &vim).unwrap(),
            ph::ash(&f, &s.head, Ash::P, 90.0).unwrap(),
            ph::ash(&f, &s.head, Ash::B, 90.0).unwrap(),
            ph::ash(&f, &s.head, Ash::S, 90.0).unwrap(),
            ph::dice(&f, &s.head, &mask).unwrap(),
        ];
        for (w, c) in want.iter_mut().zip(cols) {
            w.extend(common::to_vec(&c));
        }
    }
    assert_eq!(rows.len(), 70);
    for (m, name) in header[2..].iter().enumerate() {
        for (i, row) in rows.iter().enumerate() {
            // The same functions on the same tensors, written as the shortest
            // decimal that reads back as the same f64.
            assert_eq!(row[m], want[m][i], "{name} row {i}");
        }
    }
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(results.len(), 9);
    let p = &results[0]["settings"]["posthoc"];
    assert_eq!(p["knn_k"], 5);
    assert_eq!(p["vim_dim"], 100);
    assert_eq!(p["react_percentile"], 90.0);
    assert_eq!(p["ash_percentile"], 90.0);
    assert_eq!(p["dice_percentile"], 70.0);
    assert_eq!(p["fit_rows"], 120);

    // A rerun without --fit reuses the saved statistics (no store read for
    // ReAct, ViM and DICE) and gives the same scores.
    let csv2 = s.root.join("again.csv");
    let log = ok(score(&s, "ReAct,ViM,DICE", "run")
        .args(["--vim-dim", "100"])
        .arg("--model-path")
        .arg(&s.ckpt)
        .arg("--save-scores")
        .arg(&csv2));
    assert!(log.contains("reusing the training statistics"), "{log}");
    assert!(!log.contains("reading the fit store"), "{log}");
    let (_, rows2) = read_csv(&csv2);
    for (r, r2) in rows.iter().zip(&rows2) {
        assert_eq!([r[2], r[4], r[8]], [r2[0], r2[1], r2[2]]);
    }
    // Another ReAct percentile refits from the recorded store.
    let log = ok(score(&s, "ReAct", "run")
        .args(["--react-percentile", "80"])
        .arg("--model-path")
        .arg(&s.ckpt));
    assert!(log.contains("reading the fit store"), "{log}");
    // The saved fit now holds ReAct's threshold at 80, and still DICE's mean and ViM.
    let (fit2, tensors2) = common::read_fit(&run);
    let t80 = common::logged_number(&log, "the 80th percentile of the training activations is ");
    assert_eq!(t80, ph::percentile(&tf, 80.0).unwrap(), "{log}");
    assert!(t80 < threshold, "{t80} {threshold}");
    assert_eq!(fit2["react"]["percentile"], 80.0, "{fit2}");
    assert!(
        common::json_f64_eq(fit2["react"]["threshold"].as_f64().unwrap(), t80),
        "{fit2}"
    );
    assert_eq!(fit2["vim"], fit["vim"]);
    assert_eq!(fit2["dice_mean"], true);
    let react = &tensors2
        .iter()
        .find(|(n, _)| n == "react.threshold")
        .unwrap()
        .1;
    assert_eq!(common::to_vec(react), [t80]);
    assert_eq!(tensors2.len(), 5);

    // A fixed threshold (the original's --threshold) needs no fit: in a fresh run
    // directory, without --fit, ReAct at the percentile's threshold gives the same
    // scores; the setting is recorded instead of a percentile.
    let csv3 = s.root.join("fixed.csv");
    let log = ok(score(&s, "ReAct", "fixed")
        .args(["--react-threshold", &threshold.to_string()])
        .arg("--model-path")
        .arg(&s.ckpt)
        .arg("--save-scores")
        .arg(&csv3));
    assert!(!log.contains("training statistics"), "{log}");
    let (_, rows3) = read_csv(&csv3);
    for (r, r3) in rows.iter().zip(&rows3) {
        assert_eq!(r[2], r3[0]);
    }
    let results: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(s.root.join("runs/fixed/results.json")).unwrap(),
    )
    .unwrap();
    let p = &results[0]["settings"]["posthoc"];
    assert_eq!(p["react_threshold"], threshold);
    assert!(p.get("react_percentile").is_none(), "{p}");
    // Another threshold gives other scores.
    let csv4 = s.root.join("fixed1.csv");
    ok(score(&s, "ReAct", "fixed1")
        .args(["--react-threshold", "0.05"])
        .arg("--model-path")
        .arg(&s.ckpt)
        .arg("--save-scores")
        .arg(&csv4));
    let (_, rows4) = read_csv(&csv4);
    assert!(rows3.iter().zip(&rows4).any(|(a, b)| a[0] != b[0]));
}

#[test]
fn bad_input_is_a_clear_error_before_any_scoring() {
    let s = setup();
    let runs = s.root.join("runs");
    let train = s.root.join("train");
    // A method that needs --fit, without it.
    for m in ["ReAct", "KNN", "ViM", "DICE"] {
        let e = fails(
            score(&s, m, "nofit").arg("--model-path").arg(&s.ckpt),
            &runs.join("nofit"),
        );
        assert!(
            e.contains("needs training statistics: give --fit STORE"),
            "{m}: {e}"
        );
    }
    // Percentiles outside (0, 100), k < 1, named by their flag.
    for (flag, v) in [
        ("--react-percentile", "100"),
        ("--react-percentile", "0"),
        ("--ash-percentile", "-1"),
        ("--dice-percentile", "100.5"),
        ("--ash-percentile", "nan"),
        ("--knn-k", "0"),
    ] {
        let e = fails(
            score(&s, "ReAct,ASH-S,DICE,KNN", "pct")
                .arg("--fit")
                .arg(&train)
                .arg(format!("{flag}={v}")),
            &runs.join("pct"),
        );
        assert!(
            e.contains(&format!("{flag} {v}")) || e.contains(&format!("{flag} NaN")),
            "{e}"
        );
    }
    // k larger than the bank (120 training images).
    let e = fails(
        score(&s, "KNN", "bigk")
            .arg("--fit")
            .arg(&train)
            .args(["--knn-k", "121"]),
        &runs.join("bigk"),
    );
    assert!(
        e.contains("--knn-k 121: larger than the bank") && e.contains("120 images"),
        "{e}"
    );
    // A fit store of another model: another checkpoint.
    let other = s.root.join("other.safetensors");
    let (head2, sha2) = head_checkpoint(&other, 8);
    make_store(&s.root.join("train2"), &other, &sha2, &head2, 50, 4, 0.3);
    let e = fails(
        score(&s, "ReAct", "other")
            .arg("--fit")
            .arg(s.root.join("train2"))
            .arg("--model-path")
            .arg(&s.ckpt),
        &runs.join("other"),
    );
    assert!(
        e.contains("--fit") && e.contains("another checkpoint SHA-256"),
        "{e}"
    );
    // A head from another checkpoint than the stores'.
    let e = fails(
        score(&s, "ASH-S", "head").arg("--model-path").arg(&other),
        &runs.join("head"),
    );
    assert!(e.contains("--model-path") && e.contains("SHA-256"), "{e}");
    // A ReAct threshold that is no positive number, and both ways of setting it.
    let e = fails(
        score(&s, "ReAct", "rt")
            .args(["--react-threshold", "0"])
            .arg("--model-path")
            .arg(&s.ckpt),
        &runs.join("rt"),
    );
    assert!(
        e.contains("--react-threshold 0: must be a positive number"),
        "{e}"
    );
    let out = score(&s, "ReAct", "rt2")
        .args(["--react-threshold", "1", "--react-percentile", "80"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("cannot be used with"), "{e}");
    // A ViM dimension that leaves no residual space.
    let e = fails(
        score(&s, "ViM", "vim")
            .arg("--fit")
            .arg(&train)
            .args(["--vim-dim", "1024"]),
        &runs.join("vim"),
    );
    assert!(e.contains("--vim-dim 1024"), "{e}");
    // Unknown names list the post-hoc methods.
    let e = fails(&mut score(&s, "ASH-Q", "name"), &runs.join("name"));
    assert!(e.contains("ASH-S") && e.contains("GradNorm"), "{e}");
}

/// The leaderboard's methods (SCALE, NNGuide, fDBD, GEN, Residual, NECO, Entropy)
/// from stores: the command's scores equal the library's functions on the same
/// tensors, their settings are recorded, their fit is saved and reused, and bad
/// settings are named errors before any scoring.
#[test]
fn leaderboard_methods_from_stores_equal_the_library() {
    use mos::ood::leaderboard as lb;
    let s = setup();
    let all = "SCALE,NNGuide,fDBD,GEN,Residual,NECO,Entropy";
    let csv = s.root.join("lb.csv");
    let log = ok(score(&s, all, "lb")
        .arg("--fit")
        .arg(s.root.join("train"))
        .arg("--model-path")
        .arg(&s.ckpt)
        .args([
            "--nnguide-k",
            "5",
            "--residual-dim",
            "100",
            "--neco-dim",
            "20",
        ])
        .arg("--save-scores")
        .arg(&csv));
    assert!(log.contains("Residual: dimension 100") && log.contains("NECO: dimension 20"));
    // ResNetV2 is a ResNet: no clipping for NNGuide, no max logit for NECO.
    assert!(!log.contains("NNGuide: clipping"), "{log}");
    let (header, rows) = read_csv(&csv);
    assert_eq!(header[2..].join(","), all);
    let (tl, tf) = load(&s.root.join("train"));
    let bank = lb::nnguide_bank(&tf, &tl, None, None).unwrap();
    let mean = ph::feature_mean(&tf).unwrap();
    let den = lb::fdbd_denominators(&s.head.to(Kind::Double, tch::Device::Cpu));
    let (u, ns) = lb::residual_fit(&tf, &s.head.to(Kind::Double, tch::Device::Cpu), 100).unwrap();
    let neco = lb::neco_fit(&tf, 20).unwrap();
    let mut want: Vec<Vec<f64>> = vec![Vec::new(); 7];
    for set in ["val", "ood"] {
        let (l, f) = load(&s.root.join(set));
        let cols = [
            lb::scale(&f, &s.head, 85.0).unwrap(),
            lb::nnguide(&f, &l, None, None, &bank, 5).unwrap(),
            lb::fdbd(&l, &f, &mean, &den).unwrap(),
            lb::gen(&l, 0.1, 100).unwrap(),
            lb::residual(&f, &u, &ns).unwrap(),
            lb::neco(&f, &l, &neco, false).unwrap(),
            lb::entropy(&l).unwrap(),
        ];
        for (w, c) in want.iter_mut().zip(cols) {
            w.extend(common::to_vec(&c));
        }
    }
    for (m, name) in header[2..].iter().enumerate() {
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row[m], want[m][i], "{name} row {i}");
        }
    }
    let run = s.root.join("runs/lb");
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let p = &results[0]["settings"]["posthoc"];
    for (key, v) in [
        ("scale_percentile", serde_json::json!(85.0)),
        ("nnguide_k", serde_json::json!(5)),
        ("nnguide_clip_quantile", serde_json::Value::Null),
        ("gen_gamma", serde_json::json!(0.1)),
        ("gen_m", serde_json::json!(100)),
        ("residual_dim", serde_json::json!(100)),
        ("neco_dim", serde_json::json!(20)),
        ("neco_max_logit", serde_json::json!(false)),
    ] {
        assert_eq!(p[key], v, "{key}: {p}");
    }
    let (fit, tensors) = common::read_fit(&run);
    assert_eq!(fit["residual"]["dim"], 100, "{fit}");
    assert_eq!(fit["neco"]["dim"], 20, "{fit}");
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    for n in [
        "dice.mean",
        "neco.components",
        "neco.mean",
        "neco.pca_mean",
        "neco.std",
        "residual.ns",
        "residual.u",
    ] {
        assert!(names.contains(&n), "{n}: {names:?}");
    }
    // A rerun without --fit reuses them: the same scores, no store read.
    let csv2 = s.root.join("lb2.csv");
    let log = ok(score(&s, "fDBD,Residual,NECO", "lb")
        .arg("--model-path")
        .arg(&s.ckpt)
        .args(["--residual-dim", "100", "--neco-dim", "20"])
        .arg("--save-scores")
        .arg(&csv2));
    assert!(!log.contains("reading the fit store"), "{log}");
    let (_, rows2) = read_csv(&csv2);
    for (r, r2) in rows.iter().zip(&rows2) {
        assert_eq!([r[2], r[4], r[5]], [r2[0], r2[1], r2[2]]);
    }
    // NNGuide clipped at a quantile of the bank's features, NECO with the max logit.
    let csv3 = s.root.join("lb3.csv");
    let log = ok(score(&s, "NNGuide,NECO", "lb3")
        .arg("--fit")
        .arg(s.root.join("train"))
        .arg("--model-path")
        .arg(&s.ckpt)
        .args(["--nnguide-k", "5", "--nnguide-clip", "0.9"])
        .args(["--neco-dim", "20", "--neco-max-logit", "true"])
        .arg("--save-scores")
        .arg(&csv3));
    let clip = ph::percentile(&tf, 90.0).unwrap();
    let logged = common::logged_number(
        &log,
        "NNGuide: clipping at the 0.9 quantile of the guide bank's features, ",
    );
    assert_eq!(logged, clip, "{log}");
    let (_, rows3) = read_csv(&csv3);
    let head = Some(&s.head);
    let bank = lb::nnguide_bank(&tf, &tl, head, Some(clip)).unwrap();
    let (l, f) = load(&s.root.join("val"));
    let g = common::to_vec(&lb::nnguide(&f, &l, head, Some(clip), &bank, 5).unwrap());
    let n = common::to_vec(&lb::neco(&f, &l, &neco, true).unwrap());
    for i in 0..g.len() {
        assert_eq!([rows3[i][0], rows3[i][1]], [g[i], n[i]], "row {i}");
    }

    // Bad settings: named, before any scoring.
    let runs = s.root.join("runs");
    for (args, want) in [
        (
            vec!["--score", "GEN", "--gen-gamma", "0"],
            "--gen-gamma 0: must be a positive number",
        ),
        (
            vec!["--score", "GEN", "--gen-m", "0"],
            "--gen-m 0: must be at least 1",
        ),
        (
            vec!["--score", "SCALE", "--scale-percentile", "100"],
            "--scale-percentile 100: must be a percentile in (0, 100)",
        ),
        (
            vec!["--score", "NECO", "--neco-dim", "2000"],
            "--neco-dim 2000: must be at most the features' width 1024",
        ),
        (vec!["--score", "NNGuide"], "NNGuide"),
        (
            vec!["--score", "NNGuide", "--nnguide-k", "500", "--fit", "FIT"],
            "--nnguide-k 500: larger than the guide bank",
        ),
    ] {
        let name = format!("bad{}", want.len());
        let mut cmd = mos();
        cmd.arg("score")
            .arg("--id")
            .arg(s.root.join("val"))
            .arg("--ood")
            .arg(s.root.join("ood"))
            .arg("--model-path")
            .arg(&s.ckpt)
            .args(["--device", "cpu", "--name", &name])
            .arg("--logdir")
            .arg(&runs);
        for a in &args {
            if *a == "FIT" {
                cmd.arg(s.root.join("train"));
            } else {
                cmd.arg(a);
            }
        }
        let e = fails(&mut cmd, &runs.join(&name));
        assert!(e.contains(want), "{args:?}: {e}");
    }
    // A clip quantile outside (0, 1) is a usage error (clap's exit status 2).
    score(&s, "NNGuide", "badclip")
        .args(["--nnguide-clip", "1.5"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains(
            "give auto, none, or a quantile in (0, 1)",
        ));
}
