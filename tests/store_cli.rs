//! mos extract / merge / score end to end on tiny image folders and a small
//! random model: scores from stores equal the test commands' bit for bit, sharded
//! stores (flags, Slurm and Kubernetes environments, separate processes) equal an
//! unsharded one, and broken stores are clear errors that overwrite nothing.
use std::path::{Path, PathBuf};

mod common;

use common::cli::{extract_at, fails, mos, ok, pngs, tune_mahalanobis, SMALL};

use assert_cmd::Command;
use predicates::prelude::*;
use tch::Tensor;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    id: PathBuf,
    ood: PathBuf,
    flat: PathBuf,
}

/// 7 ID images in 2 classes, 5 OOD images, a flat-softmax model with 2 logits.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let id = root.join("data/id_val");
    let ood = root.join("data/ood_set");
    pngs(&id, "a_class", 4, 1);
    pngs(&id, "b_class", 3, 2);
    pngs(&ood, "images", 5, 3);
    let flat = root.join("flat.safetensors");
    common::random_checkpoint(&flat, 2, None, 7, 0.5);
    Setup {
        _dir: dir,
        root,
        id,
        ood,
        flat,
    }
}

/// `mos extract` of `data` with `ckpt` into `store`.
fn extract(data: &Path, ckpt: &Path, store: &Path) -> Command {
    extract_at(data, ckpt, store, "32")
}

/// test-mos / test-baseline on the setup's sets, run `name`.
fn test_command(s: &Setup, command: &str, ckpt: &Path, name: &str) -> Command {
    let mut cmd = mos();
    cmd.arg(command)
        .arg("--in-datadir")
        .arg(&s.id)
        .arg("--out-datadir")
        .arg(&s.ood)
        .arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", name])
        .arg("--model-path")
        .arg(ckpt)
        .args(SMALL);
    cmd
}

/// `mos score` of the ID store against `ood` stores, run `name`.
fn score(s: &Setup, id: &Path, ood: &[&Path], name: &str) -> Command {
    let mut cmd = mos();
    cmd.arg("score").arg("--id").arg(id);
    for o in ood {
        cmd.arg("--ood").arg(o);
    }
    cmd.arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", name]);
    cmd
}

fn results(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The metrics of every row of two results.json files are identical.
fn same_metrics(a: &Path, b: &Path, methods: &[&str]) {
    let (ra, rb) = (results(a), results(b));
    for m in methods {
        let x = ra.iter().find(|r| r["method"] == *m).expect(m);
        let y = rb.iter().find(|r| r["method"] == *m).expect(m);
        for key in [
            "in_dataset",
            "out_dataset",
            "num_in",
            "num_out",
            "auroc",
            "aupr_in",
            "aupr_out",
            "fpr95",
            "fpr95_ood_positive",
            "skipped",
        ] {
            assert_eq!(x[key], y[key], "{m} {key}");
        }
    }
}

/// The score CSVs are the same text: same paths, and scores written as the
/// shortest decimal of the same 64-bit float, so the same bits.
fn same_csv(a: &Path, b: &Path, rows: usize) {
    let (x, y) = (
        std::fs::read_to_string(a).unwrap(),
        std::fs::read_to_string(b).unwrap(),
    );
    assert_eq!(x.lines().count(), 1 + rows, "{x}");
    assert_eq!(x, y, "{} and {} differ", a.display(), b.display());
    // The scores vary between images (a comparison of constants would prove little).
    let col: Vec<&str> = x
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap())
        .collect();
    assert!(col.iter().any(|v| *v != col[0]), "{x}");
}

#[test]
fn scores_from_stores_equal_the_test_commands_bit_for_bit() {
    let s = setup();
    let (id_store, ood_store) = (s.root.join("stores/id"), s.root.join("stores/ood"));
    let methods = ["MSP", "Energy", "ODIN", "KL_Div"];
    let base_csv = s.root.join("base.csv");
    ok(test_command(&s, "test-baseline", &s.flat, "base")
        .args([
            "--score",
            "MSP,Energy,ODIN,KL_Div",
            "--temperature-odin",
            "7",
        ])
        .arg("--save-scores")
        .arg(&base_csv));
    ok(&mut extract(&s.id, &s.flat, &id_store));
    ok(&mut extract(&s.ood, &s.flat, &ood_store));
    let store_csv = s.root.join("store.csv");
    let err = ok(score(&s, &id_store, &[&ood_store], "store")
        .args([
            "--score",
            "MSP,Energy,ODIN,KL_Div",
            "--temperature-odin",
            "7",
        ])
        .arg("--save-scores")
        .arg(&store_csv)
        .arg("--plot"));
    assert!(err.contains("results in"), "{err}");
    same_csv(&base_csv, &store_csv, 12);
    same_metrics(
        &s.root.join("runs/base/results.json"),
        &s.root.join("runs/store/results.json"),
        &methods,
    );
    let run = s.root.join("runs/store");
    let log = std::fs::read_to_string(run.join("score.log")).unwrap();
    assert!(
        log.contains("plots written to") && log.contains("results in"),
        "{log}"
    );
    // The plots draw the saved scores (the ROC title holds the row's AUROC).
    let (_, id, ood) = mos::pipeline::report::read_scores_csv(&store_csv, Some("KL_Div")).unwrap();
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let kl = rows.iter().find(|r| r["method"] == "KL_Div").unwrap();
    common::svg::assert_roc(
        &run.join("KL_Div_id_val_vs_ood_set_roc.svg"),
        &format!(
            "KL_Div ROC, AUROC {:.2}%",
            100.0 * kl["auroc"].as_f64().unwrap()
        ),
        &id,
        &ood,
    );
    common::svg::assert_histogram(
        &run.join("KL_Div_id_val_vs_ood_set_hist.svg"),
        "KL_Div: id_val vs ood_set",
        &id,
        &ood,
    );
    // The store is a report source like any results.json.
    mos()
        .arg("report")
        .arg(&run)
        .assert()
        .success()
        .stdout(predicate::str::contains("KL_Div"));

    // MOS of a group-softmax model: test-mos and mos score agree too.
    let cfg = s.root.join("groups.json");
    std::fs::write(&cfg, r#"{"classes_per_group": [1, 1]}"#).unwrap();
    let group = s.root.join("group.safetensors");
    common::random_checkpoint(&group, 4, Some(vec![1, 1]), 9, 0.5);
    let mos_csv = s.root.join("mos.csv");
    ok(test_command(&s, "test-mos", &group, "mos")
        .arg("--group-config")
        .arg(&cfg)
        .arg("--save-scores")
        .arg(&mos_csv));
    let (gid, good) = (s.root.join("stores/gid"), s.root.join("stores/good"));
    ok(extract(&s.id, &group, &gid).args(["--layers", "logits"]));
    ok(extract(&s.ood, &group, &good).args(["--layers", "logits"]));
    let smos_csv = s.root.join("smos.csv");
    ok(score(&s, &gid, &[&good], "smos")
        .args(["--score", "mos", "--group-config"])
        .arg(&cfg)
        .arg("--save-scores")
        .arg(&smos_csv));
    same_csv(&mos_csv, &smos_csv, 12);
    same_metrics(
        &s.root.join("runs/mos/results.json"),
        &s.root.join("runs/smos/results.json"),
        &["MOS"],
    );
    // A group config whose class count does not fit the store: named.
    let cfg3 = s.root.join("groups3.json");
    std::fs::write(&cfg3, r#"{"classes_per_group": [2, 1]}"#).unwrap();
    let e = fails(
        score(&s, &gid, &[&good], "bad")
            .args(["--score", "MOS", "--group-config"])
            .arg(&cfg3),
    );
    assert!(
        e.contains(&gid.join("manifest.json").display().to_string())
            && e.contains("2 classes")
            && e.contains("covers 3"),
        "{e}"
    );
    // Baselines on a group-softmax store, MOS without a config: refused.
    let e = fails(score(&s, &gid, &[&good], "bad").args(["--score", "MSP"]));
    assert!(e.contains("flat-softmax"), "{e}");
    // A flat model's store of data with fewer classes than its head (the 1-class
    // OOD set as ID): the message says so, not that it is a group-softmax store.
    let e = fails(score(&s, &ood_store, &[&id_store], "bad").args(["--score", "MSP"]));
    assert!(
        e.contains("head has 2 logits")
            && e.contains("has only 1 class;")
            && e.contains(&format!("--datadir {}", s.ood.display()))
            && e.contains("fewer classes than the model's head"),
        "{e}"
    );
    let e = fails(score(&s, &gid, &[&good], "bad").args(["--score", "MOS"]));
    assert!(e.contains("--group-config"), "{e}");
    // ID and OOD stores of different models: refused, both named.
    let e = fails(score(&s, &id_store, &[&good], "bad").args(["--score", "MSP"]));
    assert!(e.contains("flat-softmax") || e.contains("another"), "{e}");
    // ODIN with a perturbation needs the images.
    let e = fails(score(&s, &id_store, &[&ood_store], "bad").args([
        "--score",
        "ODIN",
        "--epsilon-odin",
        "0.002",
    ]));
    assert!(e.contains("test-baseline"), "{e}");
    assert!(!s.root.join("runs/bad/results.json").exists());

    // Two OOD stores at once: one row per method and OOD set, a CSV per set.
    let ood2 = s.root.join("data/ood_two");
    pngs(&ood2, "x", 3, 5);
    let ood2_store = s.root.join("stores/ood_two");
    ok(&mut extract(&ood2, &s.flat, &ood2_store));
    let csv = s.root.join("two.csv");
    ok(score(&s, &id_store, &[&ood_store, &ood2_store], "two")
        .args(["--score", "MSP,KL_Div"])
        .arg("--save-scores")
        .arg(&csv));
    let rows = results(&s.root.join("runs/two/results.json"));
    assert_eq!(rows.len(), 4);
    assert!(rows
        .iter()
        .any(|r| r["out_dataset"] == "ood_two" && r["num_out"] == 3));
    let one = std::fs::read_to_string(s.root.join("two_ood_set.csv")).unwrap();
    assert_eq!(one.lines().count(), 1 + 12);
    assert!(s.root.join("two_ood_two.csv").exists());
}

#[test]
fn mahalanobis_with_magnitude_zero_from_a_store_equals_test_baseline() {
    let s = setup();
    let params = tune_mahalanobis(&s.root, &s.id, &s.flat, "maha", "0");
    let base_csv = s.root.join("base.csv");
    ok(test_command(&s, "test-baseline", &s.flat, "base")
        .args(["--score", "Mahalanobis,MSP", "--mahalanobis-param-path"])
        .arg(&params)
        .arg("--save-scores")
        .arg(&base_csv));
    let (id_store, ood_store) = (s.root.join("stores/id"), s.root.join("stores/ood"));
    ok(extract(&s.id, &s.flat, &id_store).args(["--layers", "mahalanobis"]));
    ok(extract(&s.ood, &s.flat, &ood_store).args(["--layers", "logits,mahalanobis"]));
    let store_csv = s.root.join("store.csv");
    ok(score(&s, &id_store, &[&ood_store], "store")
        .args(["--score", "Mahalanobis,MSP", "--mahalanobis-param-path"])
        .arg(&params)
        .arg("--save-scores")
        .arg(&store_csv));
    same_csv(&base_csv, &store_csv, 12);
    same_metrics(
        &s.root.join("runs/base/results.json"),
        &s.root.join("runs/store/results.json"),
        &["Mahalanobis", "MSP"],
    );
    // A store without the layers, and parameters with a magnitude: refused.
    let plain = s.root.join("stores/plain");
    ok(&mut extract(&s.id, &s.flat, &plain));
    let e = fails(
        score(&s, &plain, &[&ood_store], "bad")
            .args(["--score", "Mahalanobis", "--mahalanobis-param-path"])
            .arg(&params),
    );
    assert!(e.contains("--layers mahalanobis"), "{e}");
    let file = params.join("mahalanobis.safetensors");
    let mut t = Tensor::read_safetensors(&file).unwrap();
    for (n, v) in &mut t {
        if n == "magnitude" {
            *v = Tensor::from_slice(&[0.01f64]);
        }
    }
    let moved = s.root.join("maha_0.01.safetensors");
    Tensor::write_safetensors(&t, &moved).unwrap();
    let e = fails(
        score(&s, &id_store, &[&ood_store], "bad")
            .args(["--score", "Mahalanobis", "--mahalanobis-param-path"])
            .arg(&moved),
    );
    assert!(
        e.contains("magnitude 0.01") && e.contains("test-baseline"),
        "{e}"
    );
}

/// Every tensor of a store, each concatenated over its shards in order, and the
/// rows' paths.
fn store_tensors(store: &Path) -> (Vec<(String, Tensor)>, Vec<String>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut parts: Vec<(String, Vec<Tensor>)> = Vec::new();
    let mut paths = Vec::new();
    for f in &files {
        let mut t = Tensor::read_safetensors(f).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, v) in t {
            match parts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, list)) => list.push(v),
                None => parts.push((name, vec![v])),
            }
        }
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f.with_extension("json")).unwrap())
                .unwrap();
        for p in index["paths"].as_array().unwrap() {
            paths.push(p.as_str().unwrap().to_string());
        }
    }
    let cat = parts
        .into_iter()
        .map(|(n, v)| (n, Tensor::cat(&v, 0)))
        .collect();
    (cat, paths)
}

fn assert_same_store(a: &Path, b: &Path) {
    let ((ta, pa), (tb, pb)) = (store_tensors(a), store_tensors(b));
    assert_eq!(pa, pb, "paths of {} and {}", a.display(), b.display());
    let names: Vec<&String> = ta.iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        tb.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "tensor names"
    );
    assert!(names.contains(&&"logits".to_string()) && names.contains(&&"labels".to_string()));
    for ((n, x), (_, y)) in ta.iter().zip(&tb) {
        assert_eq!(x.size(), y.size(), "{n}");
        // Bit for bit: equal values and no NaN.
        assert!(
            x.equal(y),
            "{n} of {} and {} differ",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn sharded_stores_equal_an_unsharded_one() {
    let s = setup();
    let all = s.root.join("stores/all");
    let layers = ["--layers", "logits,features,mahalanobis"];
    ok(extract(&s.id, &s.flat, &all).args(layers));
    ok(mos().arg("merge").arg(&all));
    // Flags: 2 shards (edges on batch boundaries) and 3 (edges inside batches).
    for n in [2usize, 3] {
        let store = s.root.join(format!("stores/flags{n}"));
        for k in (0..n).rev() {
            ok(extract(&s.id, &s.flat, &store).args(layers).args([
                "--num-shards",
                &n.to_string(),
                "--shard-index",
                &k.to_string(),
            ]));
        }
        ok(mos().arg("merge").arg(&store));
        assert_same_store(&all, &store);
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(store.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["complete"], true);
        assert_eq!(manifest["num_shards"], n);
    }
    // A Slurm array (task ids 1..3) as three processes started together.
    let slurm = s.root.join("stores/slurm");
    let children: Vec<_> = (1..=3)
        .map(|id| {
            let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("mos"));
            cmd.arg("extract")
                .arg("--datadir")
                .arg(&s.id)
                .arg("--model-path")
                .arg(&s.flat)
                .arg("--output")
                .arg(&slurm)
                .args(SMALL)
                .args(layers)
                .env("SLURM_ARRAY_TASK_ID", id.to_string())
                .env("SLURM_ARRAY_TASK_MIN", "1")
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .env_remove("JOB_COMPLETION_INDEX")
                .stderr(std::process::Stdio::piped());
            cmd.spawn().unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ok(mos().arg("merge").arg(&slurm));
    assert_same_store(&all, &slurm);
    // A Kubernetes Indexed Job: JOB_COMPLETION_INDEX with --num-shards.
    let k8s = s.root.join("stores/k8s");
    let job = |k: usize| {
        let mut cmd = extract(&s.id, &s.flat, &k8s);
        cmd.args(layers)
            .args(["--num-shards", "2"])
            .env("JOB_COMPLETION_INDEX", k.to_string());
        cmd
    };
    let log = ok(&mut job(1));
    assert!(log.contains("JOB_COMPLETION_INDEX=1"), "{log}");
    // Missing shards are named with the command that computes them.
    let e = fails(mos().arg("merge").arg(&k8s));
    assert!(
        e.contains("1 of 2 shards missing") && e.contains("--num-shards 2 --shard-index 0"),
        "{e}"
    );
    assert!(e.contains("mos extract --datadir"), "{e}");
    ok(&mut job(0));
    // A rerun skips a complete shard.
    let again = ok(&mut job(0));
    assert!(again.contains("already complete"), "{again}");
    ok(mos().arg("merge").arg(&k8s));
    assert_same_store(&all, &k8s);
    // Without --num-shards the index alone is refused.
    let mut cmd = extract(&s.id, &s.flat, &k8s);
    cmd.env("JOB_COMPLETION_INDEX", "0");
    let e = fails(&mut cmd);
    assert!(e.contains("--num-shards"), "{e}");

    // An interrupted shard (tensors written, no index; a temporary left over)
    // counts as missing and is recomputed by a rerun.
    let store = s.root.join("stores/flags3");
    std::fs::remove_file(store.join("shard-00001-of-00003.json")).unwrap();
    std::fs::write(
        store.join(".shard-00001-of-00003.safetensors.tmp-99"),
        b"partial",
    )
    .unwrap();
    let e = fails(mos().arg("merge").arg(&store));
    assert!(
        e.contains("shard 1") && e.contains("--num-shards 3 --shard-index 1"),
        "{e}"
    );
    let e = fails(score(&s, &store, &[&store], "x").args(["--score", "MSP"]));
    assert!(e.contains("--shard-index 1"), "{e}");
    let log = ok(extract(&s.id, &s.flat, &store).args(layers).args([
        "--num-shards",
        "3",
        "--shard-index",
        "1",
    ]));
    assert!(log.contains("wrote"), "{log}");
    ok(mos().arg("merge").arg(&store));
    assert_same_store(&all, &store);
}

#[test]
fn skipped_images_are_recorded_and_scores_still_match() {
    let s = setup();
    // An unreadable image, the 5th of the data set (a_class/img_9.png sorts last).
    std::fs::write(s.id.join("a_class/img_9.png"), b"\x89PNG truncated").unwrap();
    let base_csv = s.root.join("base.csv");
    ok(test_command(&s, "test-baseline", &s.flat, "base")
        .args(["--score", "MSP,KL_Div", "--skip-bad-images"])
        .arg("--save-scores")
        .arg(&base_csv));
    let (all, ood) = (s.root.join("stores/all"), s.root.join("stores/ood"));
    ok(extract(&s.id, &s.flat, &all).arg("--skip-bad-images"));
    ok(extract(&s.ood, &s.flat, &ood).arg("--skip-bad-images"));
    let store_csv = s.root.join("store.csv");
    ok(score(&s, &all, &[&ood], "store")
        .args(["--score", "MSP,KL_Div"])
        .arg("--save-scores")
        .arg(&store_csv));
    same_csv(&base_csv, &store_csv, 12);
    same_metrics(
        &s.root.join("runs/base/results.json"),
        &s.root.join("runs/store/results.json"),
        &["MSP", "KL_Div"],
    );
    // 8 images in 3 shards: [0, 3), [3, 6), [6, 8); the bad one (index 4) in shard 1.
    let three = s.root.join("stores/three");
    for k in ["2", "0", "1"] {
        ok(extract(&s.id, &s.flat, &three)
            .arg("--skip-bad-images")
            .args(["--num-shards", "3", "--shard-index", k]));
    }
    ok(mos().arg("merge").arg(&three));
    assert_same_store(&all, &three);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(three.join("shard-00001-of-00003.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["rows"], 2);
    assert_eq!(index["indices"], serde_json::json!([3, 5]));
    assert_eq!(index["skipped"][0]["index"], 4);
    assert_eq!(index["skipped"][0]["path"], "a_class/img_9.png");
    assert!(index["skipped"][0]["reason"].as_str().unwrap().len() > 3);
    let log = std::fs::read_to_string(three.join("store.log")).unwrap();
    assert!(log.contains("skipped unreadable image"), "{log}");
    // Without --skip-bad-images the shard holding it fails, naming the file.
    let e = fails(&mut extract(&s.id, &s.flat, &s.root.join("stores/strict")));
    assert!(e.contains("img_9.png"), "{e}");
}

/// The bytes of every file of a directory, to check that nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with("store.log"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn broken_stores_are_clear_errors_and_nothing_is_overwritten() {
    let s = setup();
    let store = s.root.join("stores/a");
    let two = ["--num-shards", "2", "--shard-index"];
    for k in ["0", "1"] {
        ok(extract(&s.id, &s.flat, &store).args(two).arg(k));
    }
    ok(mos().arg("merge").arg(&store));
    let before = snapshot(&store);

    // A rerun with other settings is refused, naming every difference.
    let e = fails(
        extract_at(&s.id, &s.flat, &store, "24")
            .args(["--layers", "logits"])
            .args(two)
            .arg("0"),
    );
    assert!(
        e.contains("crop: the store has 32, this run 24")
            && e.contains("layers: the store has logits,features, this run logits"),
        "{e}"
    );
    let other = s.root.join("other.safetensors");
    common::random_checkpoint(&other, 2, None, 8, 0.5);
    let e = fails(extract(&s.id, &other, &store).args(two).arg("0"));
    assert!(e.contains("checkpoint SHA-256: the store has"), "{e}");
    let e = fails(extract(&s.ood, &s.flat, &store).args(two).arg("0"));
    assert!(e.contains("data fingerprint"), "{e}");
    let e =
        fails(extract(&s.id, &s.flat, &store).args(["--num-shards", "3", "--shard-index", "0"]));
    assert!(e.contains("shards: the store has 2, this run 3"), "{e}");
    assert_eq!(
        snapshot(&store),
        before,
        "a refused rerun changed the store"
    );

    // Shards of two models: another model's shard copied in.
    let b = s.root.join("stores/b");
    for k in ["0", "1"] {
        ok(extract(&s.id, &other, &b).args(two).arg(k));
    }
    let mixed = s.root.join("stores/mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for (from, name) in [
        (&store, "manifest.json"),
        (&store, "shard-00000-of-00002.json"),
        (&store, "shard-00000-of-00002.safetensors"),
        (&b, "shard-00001-of-00002.json"),
        (&b, "shard-00001-of-00002.safetensors"),
    ] {
        std::fs::copy(from.join(name), mixed.join(name)).unwrap();
    }
    let e = fails(mos().arg("merge").arg(&mixed));
    assert!(
        e.contains("shard-00001-of-00002.json") && e.contains("other settings"),
        "{e}"
    );
    // ID and OOD stores of two models.
    let ood_b = s.root.join("stores/ood_b");
    ok(&mut extract(&s.ood, &other, &ood_b));
    let e = fails(score(&s, &store, &[&ood_b], "bad").args(["--score", "MSP"]));
    assert!(
        e.contains("checkpoint SHA-256") && e.contains("ood_b"),
        "{e}"
    );

    // A truncated shard: merge and score name the file; nothing is overwritten.
    let cut = s.root.join("stores/cut");
    copy_dir(&store, &cut);
    let f = cut.join("shard-00001-of-00002.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..len as usize / 2]).unwrap();
    let before = snapshot(&cut);
    let e = fails(mos().arg("merge").arg(&cut));
    assert!(
        e.contains(&f.display().to_string()) && e.contains("truncated"),
        "{e}"
    );
    let e = fails(score(&s, &cut, &[&store], "bad").args(["--score", "MSP"]));
    assert!(e.contains(&f.display().to_string()), "{e}");
    // Same size, other content: merge's SHA-256 check names it.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(&f, &flipped).unwrap();
    let e = fails(mos().arg("merge").arg(&cut));
    assert!(
        e.contains(&f.display().to_string()) && e.contains("SHA-256"),
        "{e}"
    );
    std::fs::write(&f, &bytes[..len as usize / 2]).unwrap();
    assert_eq!(snapshot(&cut), before);

    // Foreign files: a manifest that is not JSON, a shard index that is not one,
    // a manifest of another format version, a shard of another shard count.
    let foreign = s.root.join("stores/foreign");
    copy_dir(&store, &foreign);
    std::fs::write(foreign.join("manifest.json"), "{ not json").unwrap();
    let e = fails(mos().arg("merge").arg(&foreign));
    assert!(
        e.contains(&foreign.join("manifest.json").display().to_string()),
        "{e}"
    );
    std::fs::copy(store.join("manifest.json"), foreign.join("manifest.json")).unwrap();
    std::fs::write(foreign.join("shard-00000-of-00002.json"), "[1, 2]").unwrap();
    let e = fails(mos().arg("merge").arg(&foreign));
    assert!(
        e.contains("shard-00000-of-00002.json") && e.contains("index"),
        "{e}"
    );
    std::fs::copy(
        store.join("shard-00000-of-00002.json"),
        foreign.join("shard-00000-of-00002.json"),
    )
    .unwrap();
    let text = std::fs::read_to_string(store.join("manifest.json")).unwrap();
    std::fs::write(
        foreign.join("manifest.json"),
        text.replace("\"mos-store-v1\"", "\"mos-store-v9\""),
    )
    .unwrap();
    let e = fails(score(&s, &foreign, &[&store], "bad").args(["--score", "MSP"]));
    assert!(
        e.contains(&foreign.join("manifest.json").display().to_string())
            && e.contains("mos-store-v9")
            && e.contains("reads mos-store-v1"),
        "{e}"
    );
    std::fs::copy(store.join("manifest.json"), foreign.join("manifest.json")).unwrap();
    std::fs::write(foreign.join("shard-00002-of-00003.json"), "{}").unwrap();
    let e = fails(mos().arg("merge").arg(&foreign));
    assert!(
        e.contains("shard-00002-of-00003.json") && e.contains("mixes"),
        "{e}"
    );
    // A shard index beyond the store's count, of the same count: said as it is.
    std::fs::remove_file(foreign.join("shard-00002-of-00003.json")).unwrap();
    std::fs::write(foreign.join("shard-00005-of-00002.json"), "{}").unwrap();
    let e = fails(mos().arg("merge").arg(&foreign));
    assert!(
        e.contains("shard-00005-of-00002.json")
            && e.contains("shard 5 of 2 is not a shard of this extraction")
            && e.contains("move the file away")
            && !e.contains("2-shard extraction"),
        "{e}"
    );
    // Not a store at all.
    let e = fails(mos().arg("merge").arg(&s.id));
    assert!(e.contains("not a mos feature store"), "{e}");
    assert!(!s.root.join("runs/bad/results.json").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_failed_extraction_does_not_block_the_retry_its_error_suggests() {
    let s = setup();
    // An unreadable image, index 4 of 8: in shard 1 of 2.
    std::fs::write(s.id.join("a_class/img_9.png"), b"\x89PNG truncated").unwrap();
    let store = s.root.join("stores/new");
    let e = fails(&mut extract(&s.id, &s.flat, &store));
    assert!(
        e.contains("img_9.png") && e.contains("pass --skip-bad-images"),
        "{e}"
    );
    // The failed run took its manifest and its directory away again (it made
    // the directory, but the store log of the run is kept).
    assert!(!store.join("manifest.json").exists());
    let log = std::fs::read_to_string(store.join("store.log")).unwrap();
    assert!(log.contains("removed"), "{log}");
    // The retry the error suggests works.
    ok(extract(&s.id, &s.flat, &store).arg("--skip-bad-images"));
    ok(mos().arg("merge").arg(&store));

    // A store that another run began keeps its manifest when a shard fails.
    let two = s.root.join("stores/two");
    let shards = ["--num-shards", "2", "--shard-index"];
    ok(extract(&s.id, &s.flat, &two).args(shards).arg("0"));
    let manifest = std::fs::read(two.join("manifest.json")).unwrap();
    fails(extract(&s.id, &s.flat, &two).args(shards).arg("1"));
    assert_eq!(std::fs::read(two.join("manifest.json")).unwrap(), manifest);
    // So does a store with another process's shard in it, though this run wrote
    // the manifest.
    let other = s.root.join("stores/other");
    std::fs::create_dir_all(&other).unwrap();
    for ext in ["json", "safetensors"] {
        let name = format!("shard-00000-of-00002.{ext}");
        std::fs::copy(two.join(&name), other.join(&name)).unwrap();
    }
    fails(extract(&s.id, &s.flat, &other).args(shards).arg("1"));
    assert!(other.join("manifest.json").is_file());
}
