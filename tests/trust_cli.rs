//! State read back from disk is never trusted blindly: a store is verified
//! against its index (SHA-256) and its manifest against its fingerprint on every
//! read, a group split is compared with the one the checkpoint (or store)
//! records, a saved post-hoc fit is reused only for the model settings it was
//! fitted with, and no non-finite number is stored, scored, clustered or fitted.
//! Each case once gave plausible but wrong numbers with exit 0.
use std::path::{Path, PathBuf};

mod common;

use assert_cmd::Command;
use common::cli::{extract_at, fails, mos, ok, pngs, SMALL};

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// 3 classes: a (3 images), b (2), c (2).
    id: PathBuf,
    ood: PathBuf,
    flat: PathBuf,
    /// A group-softmax checkpoint of ours, trained (recorded) with the split [2, 1].
    group: PathBuf,
    /// The split it was trained with, and another one of the same classes and groups.
    right: PathBuf,
    wrong: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let id = root.join("data/id_val");
    let ood = root.join("data/ood_set");
    pngs(&id, "a_class", 3, 1);
    pngs(&id, "b_class", 2, 2);
    pngs(&id, "c_class", 2, 5);
    pngs(&ood, "images", 5, 3);
    let flat = root.join("flat.safetensors");
    common::random_checkpoint(&flat, 3, None, 7, 0.5);
    let group = root.join("group.safetensors");
    common::random_checkpoint(&group, 5, Some(vec![2, 1]), 8, 0.5);
    let right = root.join("right.json");
    std::fs::write(&right, r#"{"classes_per_group": [2, 1]}"#).unwrap();
    let wrong = root.join("wrong.json");
    std::fs::write(&wrong, r#"{"classes_per_group": [1, 2]}"#).unwrap();
    Setup {
        _dir: dir,
        root,
        id,
        ood,
        flat,
        group,
        right,
        wrong,
    }
}

/// `mos extract` of `data` with `ckpt` into `store` at `crop`, with `layers`.
fn extract(data: &Path, ckpt: &Path, store: &Path, crop: &str, layers: &str) -> Command {
    let mut cmd = extract_at(data, ckpt, store, crop);
    cmd.args(["--layers", layers]);
    cmd
}

/// `mos COMMAND` over the setup's ID and OOD sets with the small model, as run `name`.
fn on_sets(s: &Setup, command: &str, name: &str) -> Command {
    let mut cmd = mos();
    cmd.arg(command)
        .arg("--in-datadir")
        .arg(&s.id)
        .arg("--out-datadir")
        .arg(&s.ood)
        .arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", name])
        .args(SMALL);
    cmd
}

/// The flat model's logits of the ID and OOD sets, as stores `id` and `ood`.
fn logit_stores(s: &Setup) -> (PathBuf, PathBuf) {
    let (id, ood) = (s.root.join("id"), s.root.join("ood"));
    ok(&mut extract(&s.id, &s.flat, &id, "32", "logits"));
    ok(&mut extract(&s.ood, &s.flat, &ood, "32", "logits"));
    (id, ood)
}

/// `mos score` of `id` against `ood` as run `name`.
fn score(s: &Setup, id: &Path, ood: &Path, methods: &str, name: &str) -> Command {
    let mut cmd = mos();
    cmd.arg("score")
        .arg("--id")
        .arg(id)
        .arg("--ood")
        .arg(ood)
        .args(["--score", methods, "--device", "cpu"])
        .arg("--logdir")
        .arg(s.root.join("runs"))
        .args(["--name", name]);
    cmd
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&read(path)).unwrap()
}

/// The metrics of every row of a results.json file (no timings).
fn metrics(path: &Path) -> Vec<serde_json::Value> {
    json(path)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let keys = [
                "method",
                "out_dataset",
                "num_in",
                "num_out",
                "auroc",
                "fpr95",
            ];
            serde_json::json!(keys.map(|k| r[k].clone()))
        })
        .collect()
}

/// The (offset, length) of tensor `name`'s bytes in a safetensors file.
fn tensor_bytes(bytes: &[u8], name: &str) -> (usize, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    let (a, b) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
    (8 + n + a as usize, (b - a) as usize)
}

/// Zeroes tensor `name` in the single-shard store `store` (same size: only the
/// SHA-256 tells).
fn zero_tensor(store: &Path, name: &str) -> PathBuf {
    let file = store.join("shard-00000-of-00001.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let (at, len) = tensor_bytes(&bytes, name);
    bytes[at..at + len].fill(0);
    std::fs::write(&file, bytes).unwrap();
    file
}

/// Writes a NaN into float32 tensor `name` at flat element `element` of shard
/// 0 of 1 and updates the shard's index (SHA-256, size) as the extraction of an
/// older mos would have written it: only the values tell.
fn plant_nan(store: &Path, name: &str, element: usize) {
    let file = store.join("shard-00000-of-00001.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let (at, _) = tensor_bytes(&bytes, name);
    let at = at + 4 * element;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let index = store.join("shard-00000-of-00001.json");
    let mut idx = json(&index);
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    idx["sha256"] = sha.into();
    std::fs::write(&index, idx.to_string()).unwrap();
}

/// B1: a group config that splits the same classes differently from the split the
/// checkpoint was trained with is refused by test-mos, mos score and mos benchmark.
#[test]
fn a_group_split_other_than_the_checkpoints_is_refused() {
    let s = setup();
    let test_mos = |config: &Path, ckpt: &Path, name: &str| {
        let mut cmd = on_sets(&s, "test-mos", name);
        cmd.arg("--model-path")
            .arg(ckpt)
            .arg("--group-config")
            .arg(config);
        cmd
    };
    let e = fails(&mut test_mos(&s.wrong, &s.group, "wrong"));
    assert!(
        e.contains("[1, 2]") && e.contains("[2, 1]") && e.contains("wrong.json"),
        "{e}"
    );
    assert!(!s.root.join("runs/wrong/results.json").exists());
    ok(&mut test_mos(&s.right, &s.group, "right"));
    // A checkpoint that records no split (as the paper's .pth.tar): accepted, said.
    let unrecorded = s.root.join("unrecorded.safetensors");
    common::random_checkpoint(&unrecorded, 5, None, 8, 0.5);
    ok(&mut test_mos(&s.wrong, &unrecorded, "unrecorded"));
    let log = read(&s.root.join("runs/unrecorded/test.log"));
    assert!(log.contains("could not be checked"), "{log}");

    // Stores record the split; mos score compares it.
    let (id, ood) = (s.root.join("stores/id"), s.root.join("stores/ood"));
    ok(&mut extract(&s.id, &s.group, &id, "32", "logits"));
    ok(&mut extract(&s.ood, &s.group, &ood, "32", "logits"));
    assert_eq!(
        json(&id.join("manifest.json"))["group_config"],
        serde_json::json!([2, 1])
    );
    let e = fails(
        score(&s, &id, &ood, "MOS", "score-wrong")
            .arg("--group-config")
            .arg(&s.wrong),
    );
    assert!(e.contains("[1, 2]") && e.contains("[2, 1]"), "{e}");
    ok(score(&s, &id, &ood, "MOS", "score-right")
        .arg("--group-config")
        .arg(&s.right));

    // mos benchmark, before any image is forwarded.
    let bench = |config: &Path, name: &str| {
        let mut cmd = on_sets(&s, "benchmark", name);
        cmd.arg("--group-model-path")
            .arg(&s.group)
            .arg("--group-config")
            .arg(config)
            .args(["--score", "MOS"]);
        cmd
    };
    let e = fails(&mut bench(&s.wrong, "bench-wrong"));
    assert!(e.contains("[1, 2]") && e.contains("[2, 1]"), "{e}");
    assert!(!s.root.join("runs/bench-wrong/stores").exists());
    ok(&mut bench(&s.right, "bench-right"));
}

/// B2: a store whose tensor file changed after merge (same size) is not scored;
/// mos merge refuses it too; extracting the shard again mends it.
#[test]
fn a_store_changed_after_merge_is_not_scored() {
    let s = setup();
    let (id, ood) = logit_stores(&s);
    ok(mos().arg("merge").arg(&id));
    ok(&mut score(&s, &id, &ood, "MSP", "good"));
    let good = metrics(&s.root.join("runs/good/results.json"));
    let file = zero_tensor(&id, "logits");
    let e = fails(&mut score(&s, &id, &ood, "MSP", "bad"));
    assert!(
        e.contains(&file.display().to_string()) && e.contains("SHA-256"),
        "{e}"
    );
    assert!(!s.root.join("runs/bad/results.json").exists());
    let e = fails(mos().arg("merge").arg(&id));
    assert!(e.contains("SHA-256"), "{e}");
    // The rerun of the extraction recomputes the damaged shard (never skips it).
    ok(&mut extract(&s.id, &s.flat, &id, "32", "logits"));
    let log = read(&id.join("store.log"));
    assert!(
        log.contains("fails verification, extracting it again"),
        "{log}"
    );
    ok(&mut score(&s, &id, &ood, "MSP", "mended"));
    assert_eq!(metrics(&s.root.join("runs/mended/results.json")), good);
}

/// B2b: mos benchmark reruns over a store whose logits were zeroed: the store is
/// extracted again, never reused, and the results are the first run's.
#[test]
fn a_benchmark_rerun_recomputes_a_corrupted_store() {
    let s = setup();
    let bench = || {
        let mut cmd = on_sets(&s, "benchmark", "b");
        cmd.arg("--flat-model-path")
            .arg(&s.flat)
            .args(["--score", "MSP,Energy"]);
        cmd
    };
    ok(&mut bench());
    let run = s.root.join("runs/b");
    let first = metrics(&run.join("results.json"));
    zero_tensor(&run.join("stores/flat/id_val"), "logits");
    ok(&mut bench());
    let log = read(&run.join("benchmark.log"));
    assert!(
        log.contains("fails verification, extracting it again"),
        "{log}"
    );
    assert_eq!(log.matches("is complete, reused").count(), 1, "{log}");
    assert_eq!(metrics(&run.join("results.json")), first);
}

/// An edited manifest is an error naming the edited field, in every reader.
#[test]
fn an_edited_manifest_is_refused_naming_the_field() {
    let s = setup();
    let (id, ood) = logit_stores(&s);
    let manifest = id.join("manifest.json");
    let original = read(&manifest);
    for (field, value) in [
        ("checkpoint_sha256", serde_json::json!("0".repeat(64))),
        ("mos_version", serde_json::json!("0.0.1")),
        ("crop", serde_json::json!(64)),
    ] {
        let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
        m[field] = value;
        std::fs::write(&manifest, m.to_string()).unwrap();
        let e = fails(mos().arg("merge").arg(&id));
        assert!(e.contains(field) && e.contains("edited"), "{field}: {e}");
        let e = fails(&mut score(&s, &id, &ood, "MSP", "edited"));
        assert!(e.contains(field), "{field}: {e}");
    }
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    m["fingerprint"] = "f".repeat(64).into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let e = fails(mos().arg("merge").arg(&id));
    assert!(e.contains("fingerprint field was edited"), "{e}");
    std::fs::write(&manifest, &original).unwrap();
    ok(mos().arg("merge").arg(&id));
}

/// B3: a fit saved in the run directory is not reused for stores of another crop;
/// a fit store of that crop fits again; a fit recorded from a relative path is
/// found from another working directory.
#[test]
fn a_saved_fit_is_reused_only_for_its_model_settings() {
    let s = setup();
    let st = s.root.join("stores");
    for crop in ["32", "48"] {
        for (name, data) in [("fit", &s.id), ("id", &s.id), ("ood", &s.ood)] {
            let store = st.join(format!("{name}{crop}"));
            ok(&mut extract(data, &s.flat, &store, crop, "logits,features"));
        }
    }
    // The post-hoc methods on the stores of `crop`, in run r.
    let posthoc = |crop: &str, methods: &str| {
        let (id, ood) = (st.join(format!("id{crop}")), st.join(format!("ood{crop}")));
        let mut cmd = score(&s, &id, &ood, methods, "r");
        cmd.arg("--model-path").arg(&s.flat);
        cmd
    };
    // Fitted on the crop-32 fit store, given relative to the working directory.
    ok(posthoc("32", "ReAct,DICE,KNN")
        .current_dir(&st)
        .args(["--fit", "fit32", "--knn-k", "2"]));
    let fit = json(&s.root.join("runs/r/fit.json"));
    let recorded = fit["source"]["store"].as_str().unwrap().to_string();
    assert!(Path::new(&recorded).is_absolute(), "{recorded}");
    assert_eq!(fit["source"]["crop"], 32);
    // Reused from another working directory: KNN reads its bank again from there.
    ok(posthoc("32", "ReAct,DICE,KNN")
        .current_dir(&s.root)
        .args(["--knn-k", "2"]));
    // The crop-48 stores with the crop-32 fit: refused, naming the crop.
    let e = fails(&mut posthoc("48", "ReAct,DICE"));
    assert!(e.contains("crop 32") && e.contains("crop 48"), "{e}");
    // With a crop-48 fit store: fitted again.
    let log = ok(posthoc("48", "ReAct,DICE")
        .arg("--fit")
        .arg(st.join("fit48")));
    assert!(log.contains("fitting again"), "{log}");
    assert_eq!(json(&s.root.join("runs/r/fit.json"))["source"]["crop"], 48);
}

/// B4 and B5: a NaN in a stored tensor is refused by every reader (scoring,
/// fitting, k-means), naming the store, shard, tensor, row and image.
#[test]
fn a_nan_in_a_store_is_never_scored_fitted_or_clustered() {
    let s = setup();
    let st = s.root.join("stores");
    for (name, data) in [("fit", &s.id), ("id", &s.id), ("ood", &s.ood)] {
        ok(&mut extract(
            data,
            &s.flat,
            &st.join(name),
            "32",
            "logits,features",
        ));
    }
    // Row 4 is b_class/img_1.png (a_class has 3 images); 1024 features a row.
    plant_nan(&st.join("fit"), "features", 4 * 1024 + 17);
    let expect = |e: &str| {
        for part in [
            "stores/fit",
            "shard-00000-of-00001.safetensors",
            "'features'",
            "row 4",
            "b_class/img_1.png",
        ] {
            assert!(e.contains(part), "{part:?} not in {e}");
        }
    };
    let mut fit = score(&s, &st.join("id"), &st.join("ood"), "ReAct,DICE", "nan");
    fit.arg("--model-path")
        .arg(&s.flat)
        .arg("--fit")
        .arg(st.join("fit"));
    expect(&fails(&mut fit));
    assert!(!s.root.join("runs/nan/fit.safetensors").exists());
    let out = s.root.join("groups.json");
    let e = fails(
        mos()
            .args(["make-groups", "--strategy", "kmeans", "--num-groups", "2"])
            .args(["--device", "cpu", "--datadir"])
            .arg(&s.id)
            .arg("--features")
            .arg(st.join("fit"))
            .arg("--output")
            .arg(&out),
    );
    expect(&e);
    assert!(!out.exists());
    plant_nan(&st.join("ood"), "logits", 2 * 3 + 1);
    let e = fails(&mut score(
        &s,
        &st.join("id"),
        &st.join("ood"),
        "MSP",
        "nan-ood",
    ));
    assert!(
        e.contains("'logits'") && e.contains("row 2") && e.contains("images/img_2.png"),
        "{e}"
    );
}

/// mos extract refuses an image whose outputs are not finite, naming it; with
/// --skip-bad-images it leaves such images out and reports each.
#[test]
fn extraction_refuses_non_finite_outputs() {
    let s = setup();
    // A checkpoint whose head bias holds a NaN: every image's logits are NaN.
    let ckpt = s.root.join("nan.safetensors");
    let mut c = mos::model::checkpoint::load(&s.flat).unwrap();
    for (name, t) in c.model.iter_mut() {
        if name == "head.conv.bias" {
            let _ = t.get(1).fill_(f64::NAN);
        }
    }
    mos::model::checkpoint::save(&ckpt, &c).unwrap();
    let store = s.root.join("nan_store");
    let e = fails(&mut extract(&s.id, &ckpt, &store, "32", "logits"));
    assert!(
        e.contains("a_class/img_0.png") && e.contains("not finite"),
        "{e}"
    );
    assert!(!store.join("shard-00000-of-00001.json").exists());
    ok(extract(&s.id, &ckpt, &store, "32", "logits").arg("--skip-bad-images"));
    let idx = json(&store.join("shard-00000-of-00001.json"));
    assert_eq!(idx["rows"], 0);
    assert_eq!(idx["skipped"].as_array().unwrap().len(), 7);
    let log = read(&store.join("store.log"));
    assert_eq!(log.matches("not finite").count(), 7, "{log}");
}

/// ViM refuses a fit store with no more rows than its principal dimension.
#[test]
fn vim_needs_more_fit_rows_than_its_dimension() {
    let s = setup();
    let st = s.root.join("stores");
    let one = s.root.join("data/one");
    pngs(&one, "a_class", 1, 9);
    ok(&mut extract(
        &one,
        &s.flat,
        &st.join("fit"),
        "32",
        "logits,features",
    ));
    for (name, data) in [("id", &s.id), ("ood", &s.ood)] {
        ok(&mut extract(
            data,
            &s.flat,
            &st.join(name),
            "32",
            "logits,features",
        ));
    }
    let mut cmd = score(&s, &st.join("id"), &st.join("ood"), "ViM", "vim");
    cmd.arg("--model-path")
        .arg(&s.flat)
        .arg("--fit")
        .arg(st.join("fit"))
        .args(["--vim-dim", "4"]);
    let e = fails(&mut cmd);
    assert!(
        e.contains("needs more fit rows than 4") && e.contains("has 1 images"),
        "{e}"
    );
}
