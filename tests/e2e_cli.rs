//! The main path end to end against the original paper code: `mos test-baseline`
//! and `mos test-mos` run as a user runs them, on the committed fixture images
//! with the fixture model (tests/fixtures/e2e/, written by
//! tests/fixtures/make_e2e_fixtures.py from PyTorch, torchvision and
//! scikit-learn following test_baselines.py, test_mos.py and
//! utils/mahalanobis_lib.py). Every per-image score (matched by path) and every
//! metric of results.json is compared with the reference.
//!
//! Tolerances. The reference computes each score twice: in float32 as the
//! original does and in float64 (model in double, same perturbed inputs);
//! `f32_vs_f64` is the largest difference per method, i.e. the float32 rounding
//! of exactly this computation on these images. mos is another float32
//! evaluation (other kernels on other CPUs), so its scores may differ from the
//! reference by about twice that rounding; the tolerance allows K_ROUND times it.
//! The perturbed scores (ODIN with epsilon > 0, Mahalanobis) add `sign_slack`:
//! a bound, per image, on what flipping the input-gradient sign at pixels whose
//! gradient lies within rounding of zero could change (see the script). The
//! fixture images were drawn so that no forward pass lies within rounding of a
//! ReLU or max-pool branch (else the gradient itself could change) and so that
//! any two scores of a method are further apart than their tolerances: mos's
//! scores then have the reference's order and the metrics, which depend on the
//! order only, must agree to the rounding of their sums.
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use serde_json::Value;

/// Another float32 evaluation differs from the reference by at most its own
/// rounding plus the reference's (about twice `f32_vs_f64`); 10x leaves room for
/// rounding that is larger on another CPU's kernels. Must equal the script's.
const K_ROUND: f64 = 10.0;
/// Metrics are sums of at most 22 terms of counts / 22: rounding ~1e-16.
const METRIC_TOL: f64 = 1e-12;
const METRICS: [&str; 5] = [
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr95",
    "fpr95_ood_positive",
];

fn e2e() -> PathBuf {
    common::fixture("e2e")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(e2e().join("expected.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["settings"]["k_round"], K_ROUND,
        "script and test disagree"
    );
    v
}

/// Unpacks tests/fixtures/e2e/`name`.gz into `dir`.
fn gunzip(dir: &Path, name: &str) -> PathBuf {
    let src = e2e().join(format!("{name}.gz"));
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(&src).unwrap());
    let mut bytes = Vec::new();
    gz.read_to_end(&mut bytes).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// What one run left: its results.json rows and its saved scores by path
/// relative to tests/fixtures/e2e/, one map per score column.
struct Run {
    rows: Vec<Value>,
    scores: HashMap<String, HashMap<String, f64>>,
}

/// Runs `mos <command> <args>` with the shared data flags as a user would, and
/// reads what it wrote.
fn run_mos(dir: &Path, command: &str, name: &str, args: &[&str]) -> Run {
    let csv = dir.join(format!("{name}.csv"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mos"));
    // The tests start four mos processes at once: one libtorch thread each keeps
    // them from oversubscribing the CPU (spinning OpenMP threads make an
    // oversubscribed run ~10x slower). Set OMP_NUM_THREADS to test other counts.
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        cmd.env("OMP_NUM_THREADS", "1");
    }
    let out = cmd
        .arg(command)
        .arg("--in-datadir")
        .arg(e2e().join("id"))
        .arg("--out-datadir")
        .arg(e2e().join("ood"))
        .arg("--logdir")
        .arg(dir.join("runs"))
        .args([
            "--name",
            name,
            "--model",
            "ResNetV2-R14x0.5",
            "--crop",
            "32",
        ])
        .args(["--batch", "4", "--workers", "2", "--device", "cpu"])
        .arg("--save-scores")
        .arg(&csv)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mos {command} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = dir.join("runs").join(name).join("results.json");
    let rows: Value = serde_json::from_str(&std::fs::read_to_string(results).unwrap()).unwrap();
    let mut reader = csv::Reader::from_path(&csv).unwrap();
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(header[..2], ["split", "path"]);
    let mut scores: HashMap<String, HashMap<String, f64>> = HashMap::new();
    let root = e2e();
    for rec in reader.records() {
        let rec = rec.unwrap();
        let rel = Path::new(&rec[1])
            .strip_prefix(&root)
            .unwrap_or_else(|_| panic!("{} is not under {}", &rec[1], root.display()))
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let split = if rel.starts_with("id/") { "in" } else { "out" };
        assert_eq!(&rec[0], split, "{rel}");
        for (col, name) in header.iter().enumerate().skip(2) {
            let v: f64 = rec[col].parse().unwrap();
            let prev = scores
                .entry(name.clone())
                .or_default()
                .insert(rel.clone(), v);
            assert!(prev.is_none(), "{rel} scored twice");
        }
    }
    Run {
        rows: rows.as_array().unwrap().clone(),
        scores,
    }
}

/// The tolerance of one score: K_ROUND x the method's float32 rounding on these
/// images, plus 2^-22 relative for the rounding of the float32 result itself,
/// plus the image's gradient-sign slack (perturbed scores only).
fn tolerance(f32_vs_f64: f64, score: f64, slack: f64) -> f64 {
    K_ROUND * f32_vs_f64 + 2f64.powi(-22) * score.abs() + slack
}

/// Compares mos's scores of one method (`got`, by path) and its results.json
/// row with the reference entry `key` of expected.json.
fn compare(exp: &Value, key: &str, got: &HashMap<String, f64>, row: &Value) {
    let e = &exp["methods"][key];
    let want = e["scores"].as_object().unwrap();
    assert_eq!(got.len(), want.len(), "{key}: number of images");
    let d = e["f32_vs_f64"].as_f64().unwrap();
    let mut worst: (f64, &str) = (0.0, "");
    let mut largest = 0f64;
    let mut pairs = Vec::new();
    for (path, w) in want {
        let w = w.as_f64().unwrap();
        let g = *got
            .get(path)
            .unwrap_or_else(|| panic!("{key}: mos did not score {path}"));
        let slack = e["sign_slack"][path].as_f64().unwrap_or(0.0);
        let tol = tolerance(d, w, slack);
        let err = (g - w).abs();
        assert!(
            err <= tol,
            "{key} {path}: mos {g:e}, reference {w:e}, |diff| {err:e} > tolerance {tol:e}"
        );
        largest = largest.max(err);
        if err / tol >= worst.0 {
            worst = (err / tol, path);
        }
        pairs.push((w, g, path.as_str()));
    }
    eprintln!(
        "{key}: largest |diff| {largest:.3e}, largest |diff| / tolerance {:.3} ({}), f32_vs_f64 {d:.3e}",
        worst.0, worst.1
    );
    // The fixture keeps scores apart by more than their tolerances, so mos's
    // scores must sort as the reference's; then the metrics agree.
    assert!(e["min_gap_over_tolerance"].as_f64().unwrap() > 1.0);
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in pairs.windows(2) {
        assert!(
            w[0].1 < w[1].1,
            "{key}: {} and {} are in another order than the reference's",
            w[0].2,
            w[1].2
        );
    }
    for m in METRICS {
        let (g, w) = (row[m].as_f64().unwrap(), e["metrics"][m].as_f64().unwrap());
        assert!(
            (g - w).abs() <= METRIC_TOL,
            "{key} {m}: mos {g}, scikit-learn / the original {w}"
        );
    }
    assert_eq!(row["num_in"], 12);
    assert_eq!(row["num_out"], 10);
    assert_eq!(row["in_dataset"], "id");
    assert_eq!(row["out_dataset"], "ood");
}

fn row<'a>(run: &'a Run, method: &str) -> &'a Value {
    run.rows
        .iter()
        .find(|r| r["method"] == method)
        .unwrap_or_else(|| panic!("no {method} row"))
}

#[test]
fn baselines_match_the_original() {
    let exp = expected();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = gunzip(dir.path(), "flat.pth.tar");
    // Default temperatures (1000, 1) and epsilon (0), as the original's script.
    let run = run_mos(
        dir.path(),
        "test-baseline",
        "baselines",
        &[
            "--model-path",
            ckpt.to_str().unwrap(),
            "--score",
            "MSP,ODIN,Energy,KL_Div",
        ],
    );
    let settings = &row(&run, "ODIN")["settings"];
    assert_eq!(
        settings["temperature_odin"],
        exp["settings"]["temperature_odin"]
    );
    assert_eq!(settings["epsilon_odin"], 0.0);
    assert_eq!(
        settings["temperature_energy"],
        exp["settings"]["temperature_energy"]
    );
    // MSP: a softmax probability in [0, 1], compared absolutely; its rounding is
    // that of the logits (~1.4e-5 on |logits| <= 7.4) through the 1/2-Lipschitz
    // softmax, which f32_vs_f64 measures.
    compare(&exp, "MSP", &run.scores["MSP"], row(&run, "MSP"));
    // ODIN, T = 1000, epsilon 0: softmax of logits / 1000, so the logits'
    // rounding enters divided by 1000 and the float32 rounding of the result
    // itself (~3e-8 at 1/3) dominates.
    compare(&exp, "ODIN_eps0", &run.scores["ODIN"], row(&run, "ODIN"));
    // Energy, T = 1: logsumexp is 1-Lipschitz in the max norm, so its error is
    // the logits' (relative ~1e-6 of |logits|).
    compare(&exp, "Energy", &run.scores["Energy"], row(&run, "Energy"));
    // KL matching: mos sums in float64, the original in float32 per pair;
    // f32_vs_f64 is the distance of the original's float32 value from the exact
    // one, which includes both the probabilities' and the formula's rounding
    // (docs/differences.md).
    compare(&exp, "KL_Div", &run.scores["KL_Div"], row(&run, "KL_Div"));
}

#[test]
fn odin_with_input_perturbation_matches_the_original() {
    let exp = expected();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = gunzip(dir.path(), "flat.pth.tar");
    let run = run_mos(
        dir.path(),
        "test-baseline",
        "odin",
        &[
            "--model-path",
            ckpt.to_str().unwrap(),
            "--score",
            "ODIN",
            "--epsilon-odin",
            "0.0014",
        ],
    );
    // ODIN, epsilon 0.0014: the perturbed input x - eps * sign(grad) is exact
    // wherever both evaluations agree on the gradient's sign; where |grad| is
    // within rounding of zero the sign may flip, moving that pixel by 2 eps and
    // the score by at most sign_slack (2 x first order). The fixture has no such
    // pixel (slack 0), so the tolerance is the rounding of softmax(z / 1000).
    compare(
        &exp,
        "ODIN_eps0.0014",
        &run.scores["score"],
        row(&run, "ODIN"),
    );
}

#[test]
fn mahalanobis_matches_the_original() {
    let exp = expected();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = gunzip(dir.path(), "flat.pth.tar");
    let params = gunzip(dir.path(), "mahalanobis.safetensors");
    let run = run_mos(
        dir.path(),
        "test-baseline",
        "maha",
        &[
            "--model-path",
            ckpt.to_str().unwrap(),
            "--score",
            "Mahalanobis",
            "--mahalanobis-param-path",
            params.to_str().unwrap(),
        ],
    );
    // Mahalanobis, magnitude 0.0014: score = -sigmoid(w.M + b), so
    // |d score| <= 1/4 sum_l |w_l| |d M_l|; f32_vs_f64 measures that for the
    // rounding of the features and of the original's float32 quadratic forms
    // (mos's are float64). Each layer perturbs the input by its own gradient
    // sign; sign_slack bounds the flips at pixels whose gradient is within
    // rounding of zero (1/4 |w_l| x 2 magnitude |dm_l/dx| per pixel, doubled).
    compare(
        &exp,
        "Mahalanobis",
        &run.scores["score"],
        row(&run, "Mahalanobis"),
    );
    let slack = exp["methods"]["Mahalanobis"]["sign_slack"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(0.0, f64::max);
    eprintln!("Mahalanobis: largest sign slack {slack:.3e}");
}

#[test]
fn mos_score_matches_the_original() {
    let exp = expected();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = gunzip(dir.path(), "group.pth.tar");
    let cfg = e2e().join("group_config.npy");
    let run = run_mos(
        dir.path(),
        "test-mos",
        "mos",
        &[
            "--model-path",
            ckpt.to_str().unwrap(),
            "--group-config",
            cfg.to_str().unwrap(),
        ],
    );
    // MOS = -min_g p_g(others): softmax probabilities in [0, 1], compared
    // absolutely, with the logits' rounding through the 1/2-Lipschitz softmax.
    compare(&exp, "MOS", &run.scores["score"], row(&run, "MOS"));
    assert_eq!(
        row(&run, "MOS")["settings"]["classes_per_group"],
        exp["settings"]["classes_per_group"]
    );
}
