//! `mos make-groups` end to end: the taxonomy grouping of ImageNet-1k from the
//! committed WordNet excerpt, the paper's group list reproduced byte for byte with
//! its inverse map, k-means of a real feature store's class means, random groups,
//! and bad input as clear errors.
use std::path::{Path, PathBuf};

mod common;

use common::cli::{fails, mos, ok};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn wordnet() -> PathBuf {
    root().join("tests/fixtures/wordnet")
}

#[test]
fn taxonomy_of_imagenet_and_the_papers_group_list() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("groups.json");
    let classes = root().join("configs/imagenet/imagenet1k_classes.txt");
    ok(mos()
        .args(["make-groups", "--strategy", "taxonomy", "--classes"])
        .arg(&classes)
        .arg("--wordnet-dir")
        .arg(wordnet())
        .arg("--output")
        .arg(&out));
    let g = json(&out);
    assert_eq!(g["strategy"], "taxonomy");
    let names: Vec<&str> = g["group_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "animal",
            "artifact",
            "geological_formation",
            "fungus",
            "rest",
            "natural_object",
            "person",
            "flower"
        ]
    );
    // What --group-config reads.
    let cfg = mos::groupconfig::read_group_config(&out).unwrap();
    assert_eq!(cfg.classes_per_group.iter().sum::<i64>(), 1000);

    // The paper's groups and val list: the group list again, byte for byte.
    let list = dir.path().join("group_val.txt");
    ok(mos()
        .args(["make-groups", "--from"])
        .arg(root().join("configs/imagenet/taxonomy_level0.json"))
        .arg("--flat-list")
        .arg(root().join("configs/imagenet/imagenet2012_val_list.txt"))
        .arg("--output-list")
        .arg(&list));
    let want =
        std::fs::read(root().join("configs/imagenet/imagenet2012_group_softmax_val_list.txt"))
            .unwrap();
    assert!(
        std::fs::read(&list).unwrap() == want,
        "the group list differs"
    );
    let map = json(&dir.path().join("group_val.map.json"));
    // Group 2 (geological formation), class 2 is alp, flat label 360 (line 2 of the lists).
    assert_eq!(map["flat_labels"][2][2], 360);
    assert_eq!(map["classes"][2][2], "n09193705");

    // Our grouping's list: a class's group and in-group index follow the file.
    let ours = dir.path().join("ours.txt");
    ok(mos()
        .args(["make-groups", "--from"])
        .arg(&out)
        .arg("--flat-list")
        .arg(root().join("configs/imagenet/imagenet2012_val_list.txt"))
        .arg("--output-list")
        .arg(&ours)
        .arg("--output-map")
        .arg(dir.path().join("ours_map.json")));
    let first = std::fs::read_to_string(&ours).unwrap();
    let first = first.lines().next().unwrap();
    // n01751748, sea snake: an animal, and the animal group lists it at that index.
    let idx: usize = first.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(first.starts_with("val/n01751748/ILSVRC2012_val_00000001.JPEG 0 "));
    assert_eq!(g["classes"][0][idx], "n01751748");
}

/// Writes `n` small PNGs with distinct content into `dir/class`.
fn images(dir: &Path, class: &str, n: usize, seed: u32) {
    let d = dir.join(class);
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(20 + i as u32, 18, |x, y| {
            let v = (x * 7 + y * 13 + seed * 31 + i as u32 * 17) % 256;
            image::Rgb([v as u8, (255 - v) as u8, ((v * 3 + x * seed) % 256) as u8])
        });
        img.save(d.join(format!("img_{i}.png"))).unwrap();
    }
}

#[test]
fn kmeans_of_a_feature_store_and_random_groups() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let classes = ["cat", "dog", "eel", "fox", "gnu"];
    for (i, c) in classes.iter().enumerate() {
        images(&data, c, 2 + i % 2, i as u32 + 1);
    }
    let ckpt = dir.path().join("flat.safetensors");
    common::random_checkpoint(&ckpt, classes.len() as i64, None, 3, 0.5);
    let store = dir.path().join("store");
    let extract = |layers: &str, store: &Path| {
        ok(mos()
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .args(["extract", "--datadir"])
            .arg(&data)
            .arg("--model-path")
            .arg(&ckpt)
            .arg("--output")
            .arg(store)
            .args([
                "--model",
                "ResNetV2-R14x0.5",
                "--crop",
                "32",
                "--batch",
                "4",
            ])
            .args(["--workers", "1", "--device", "cpu", "--layers", layers]));
    };
    extract("logits,features", &store);
    let out = dir.path().join("km.json");
    let kmeans = |k: &str, out: &Path| {
        let mut cmd = mos();
        cmd.args(["make-groups", "--strategy", "kmeans", "--num-groups", k])
            .args([
                "--seed",
                "3",
                "--restarts",
                "4",
                "--device",
                "cpu",
                "--datadir",
            ])
            .arg(&data)
            .arg("--features")
            .arg(&store)
            .arg("--output")
            .arg(out);
        cmd
    };
    ok(&mut kmeans("2", &out));
    let g = json(&out);
    assert_eq!(g["strategy"], "kmeans");

    // The same from the library: class means of the store's features, k-means.
    let s = mos::pipeline::store::load(&store).unwrap();
    let f = common::to_vec(s.features.as_ref().unwrap());
    let d = f.len() / s.labels.len();
    let mut means = vec![0.0; classes.len() * d];
    let mut counts = vec![0.0; classes.len()];
    for (row, &l) in s.labels.iter().enumerate() {
        counts[l as usize] += 1.0;
        for j in 0..d {
            means[l as usize * d + j] += f[row * d + j];
        }
    }
    for (c, n) in counts.iter().enumerate() {
        for v in &mut means[c * d..(c + 1) * d] {
            *v /= n;
        }
    }
    let c = mos::groups::kmeans::kmeans(&means, d, 2, 4, 3).unwrap();
    let groups = mos::groups::from_labels(&c.labels, 2);
    let want: Vec<Vec<&str>> = groups
        .iter()
        .map(|(_, m)| m.iter().map(|&i| classes[i]).collect())
        .collect();
    let got: Vec<Vec<&str>> = g["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cs| {
            cs.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(got, want);
    // Means summed in another order (f64 of f32 features): within 1e-9 relative.
    let inertia = g["settings"]["inertia"].as_f64().unwrap();
    assert!((inertia - c.inertia).abs() <= 1e-9 * c.inertia.max(1e-300));

    // More groups than classes; a store without pre-logits.
    let e = fails(&mut kmeans("6", &out));
    assert!(
        e.contains("--num-groups 6") && e.contains("5 classes"),
        "{e}"
    );
    let logits_only = dir.path().join("logits_store");
    extract("logits", &logits_only);
    let e = fails(
        mos()
            .args([
                "make-groups",
                "--strategy",
                "kmeans",
                "--num-groups",
                "2",
                "--datadir",
            ])
            .arg(&data)
            .arg("--features")
            .arg(&logits_only)
            .arg("--output")
            .arg(&out),
    );
    assert!(
        e.contains("no pre-logits") && e.contains("logits_store"),
        "{e}"
    );

    // Random: 5 classes in 2 groups of 3 and 2, seeded.
    let r = dir.path().join("r.json");
    let random = |seed: &str| {
        ok(mos()
            .args([
                "make-groups",
                "--strategy",
                "random",
                "--num-groups",
                "2",
                "--seed",
                seed,
            ])
            .arg("--datadir")
            .arg(&data)
            .arg("--output")
            .arg(&r));
        json(&r)
    };
    let a = random("1");
    assert_eq!(a["classes_per_group"], serde_json::json!([3, 2]));
    assert_eq!(a, random("1"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for c in ["n01440764", "tabby"] {
        std::fs::create_dir_all(data.join(c)).unwrap();
    }
    let out = dir.path().join("g.json");
    let taxonomy = |data: &Path, wn: &Path| {
        let mut cmd = mos();
        cmd.args(["make-groups", "--strategy", "taxonomy", "--datadir"])
            .arg(data)
            .arg("--wordnet-dir")
            .arg(wn)
            .arg("--output")
            .arg(&out);
        cmd
    };
    let e = fails(&mut taxonomy(&data, &wordnet()));
    assert!(
        e.contains("'tabby'") && e.contains("not a WordNet noun id"),
        "{e}"
    );
    std::fs::remove_dir(data.join("tabby")).unwrap();
    std::fs::create_dir_all(data.join("n00000042")).unwrap();
    let e = fails(&mut taxonomy(&data, &wordnet()));
    assert!(
        e.contains("n00000042") && e.contains("no such synset"),
        "{e}"
    );
    let e = fails(&mut taxonomy(&data, &dir.path().join("nowhere")));
    assert!(
        e.contains("nowhere/data.noun") && e.contains("wordnet-base"),
        "{e}"
    );
    let corrupt = dir.path().join("wn");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::copy(wordnet().join("index.noun"), corrupt.join("index.noun")).unwrap();
    std::fs::write(
        corrupt.join("data.noun"),
        "00001740 03 n 01 entity 0 0x1 | \n",
    )
    .unwrap();
    let e = fails(&mut taxonomy(&data, &corrupt));
    assert!(
        e.contains("data.noun:1") && e.contains("pointer count"),
        "{e}"
    );

    // A class named twice in --classes.
    let list = dir.path().join("classes.txt");
    std::fs::write(&list, "n01440764\nn02084071\nn01440764\n").unwrap();
    let e = fails(
        mos()
            .args([
                "make-groups",
                "--strategy",
                "random",
                "--num-groups",
                "2",
                "--classes",
            ])
            .arg(&list)
            .arg("--output")
            .arg(&out),
    );
    assert!(
        e.contains("classes.txt:3") && e.contains("first on line 1"),
        "{e}"
    );

    // A flat list with a class the groups do not cover.
    let flat = dir.path().join("flat.txt");
    std::fs::write(&flat, "val/n01440764/a.JPEG 0\nval/n99999999/b.JPEG 1\n").unwrap();
    let e = fails(
        mos()
            .args(["make-groups", "--from"])
            .arg(root().join("configs/imagenet/taxonomy_level0.json"))
            .arg("--flat-list")
            .arg(&flat)
            .arg("--output-list")
            .arg(dir.path().join("g.txt")),
    );
    assert!(
        e.contains("flat.txt:2") && e.contains("'n99999999'") && e.contains("no group"),
        "{e}"
    );
}

/// The bytes of a file.
fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn outputs_never_overwrite_an_input_and_are_written_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let classes = d.join("classes.txt");
    std::fs::write(&classes, "n01440764\nn01443537\nn01484850\n").unwrap();
    let random = |out: &Path| {
        let mut cmd = mos();
        cmd.args([
            "make-groups",
            "--strategy",
            "random",
            "--num-groups",
            "2",
            "--classes",
        ])
        .arg(&classes)
        .arg("--output")
        .arg(out);
        cmd
    };
    let from = d.join("groups.json");
    ok(&mut random(&from));
    let flat = d.join("flat.txt");
    std::fs::write(
        &flat,
        "val/n01440764/a.JPEG 0\nval/n01443537/b.JPEG 1\nval/n01484850/c.JPEG 2\n",
    )
    .unwrap();
    let (from_bytes, flat_bytes) = (bytes(&from), bytes(&flat));
    let list = |out_list: &Path, out_map: Option<&Path>| {
        let mut cmd = mos();
        cmd.args(["make-groups", "--from"])
            .arg(&from)
            .arg("--flat-list")
            .arg(&flat)
            .arg("--output-list")
            .arg(out_list);
        if let Some(m) = out_map {
            cmd.arg("--output-map").arg(m);
        }
        cmd
    };
    // The group list onto the flat list, by another spelling of its path.
    let e = fails(&mut list(
        &d.join(".").join("flat.txt"),
        Some(&d.join("m.json")),
    ));
    assert!(
        e.contains("--output-list") && e.contains("same file as --flat-list"),
        "{e}"
    );
    // The map onto the groups file, named or by default (--output-list h.txt: h.map.json).
    let e = fails(&mut list(&d.join("g.txt"), Some(&from)));
    assert!(
        e.contains("--output-map") && e.contains("same file as --from"),
        "{e}"
    );
    let from2 = d.join("h.map.json");
    std::fs::copy(&from, &from2).unwrap();
    let e = fails(
        mos()
            .args(["make-groups", "--from"])
            .arg(&from2)
            .arg("--flat-list")
            .arg(&flat)
            .arg("--output-list")
            .arg(d.join("h.txt")),
    );
    assert!(
        e.contains("--output-map (by default") && e.contains("same file as --from"),
        "{e}"
    );
    assert_eq!(bytes(&from2), from_bytes);
    // The list and the map onto one file.
    let e = fails(&mut list(&d.join("g.txt"), Some(&d.join("g.txt"))));
    assert!(
        e.contains("--output-map") && e.contains("same file as --output-list"),
        "{e}"
    );
    // A hard link to an input is the input.
    std::fs::hard_link(&flat, d.join("alias.txt")).unwrap();
    let e = fails(&mut list(&d.join("alias.txt"), Some(&d.join("m.json"))));
    assert!(e.contains("same file as --flat-list"), "{e}");
    assert_eq!(bytes(&from), from_bytes);
    assert_eq!(bytes(&flat), flat_bytes);
    assert!(!d.join("g.txt").exists() && !d.join("m.json").exists());

    // Outputs replace earlier ones by a rename: a second name of the old file keeps
    // its bytes (a write in place would change them, and a full disk would leave a
    // truncated file).
    let (out_list, out_map) = (d.join("g.txt"), d.join("m.json"));
    for p in [&out_list, &out_map] {
        std::fs::write(p, "old").unwrap();
        std::fs::hard_link(p, p.with_extension("old")).unwrap();
    }
    ok(&mut list(&out_list, Some(&out_map)));
    for p in [&out_list, &out_map] {
        assert_eq!(bytes(&p.with_extension("old")), b"old");
        assert_ne!(bytes(p), b"old");
    }
    assert!(std::fs::read_to_string(&out_list)
        .unwrap()
        .starts_with("val/n01440764/a.JPEG "));

    // --strategy: --output onto --classes is refused; a groups file is replaced atomically.
    let e = fails(&mut random(&classes));
    assert!(
        e.contains("--output") && e.contains("same file as --classes"),
        "{e}"
    );
    assert!(bytes(&classes).starts_with(b"n01440764\n"));
    let out = d.join("random.json");
    std::fs::write(&out, "old").unwrap();
    std::fs::hard_link(&out, d.join("random.old")).unwrap();
    ok(&mut random(&out));
    assert_eq!(bytes(&d.join("random.old")), b"old");
    assert_eq!(json(&out)["strategy"], "random");
}
