//! `mos benchmark`: merges the `--config` file with the command line into a
//! [`BenchmarkRequest`] and runs it ([`crate::pipeline::benchmark`]).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cli::{BaselineFlags, BenchmarkArgs, PostHocFlags};
use crate::device::DeviceSpec;
use crate::model::Variant;
use crate::pipeline::benchmark::{self, BenchmarkRequest, SetSpec};
use crate::pipeline::score::MethodSettings;

/// A set in a config file: a path, or `{"path", "images", "name"}` (the
/// expected image count, the name in the results).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "serde_json::Value")]
enum ConfigSet {
    Path(PathBuf),
    Object(ConfigSetObject),
}

impl TryFrom<serde_json::Value> for ConfigSet {
    type Error = String;

    /// A path or a set object; a set object's error names its bad key (an
    /// untagged enum would only say that no variant matched).
    fn try_from(v: serde_json::Value) -> std::result::Result<Self, String> {
        match v {
            serde_json::Value::String(p) => Ok(ConfigSet::Path(p.into())),
            serde_json::Value::Object(_) => serde_json::from_value(v)
                .map(ConfigSet::Object)
                .map_err(|e| format!("a set object: {e}")),
            other => Err(format!(
                "a set is a path or {{\"path\": ..., \"images\": N, \"name\": ...}}, not {other}"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigSetObject {
    path: PathBuf,
    #[serde(default)]
    images: Option<usize>,
    #[serde(default)]
    name: Option<String>,
}

impl ConfigSet {
    fn spec(&self) -> SetSpec {
        match self {
            ConfigSet::Path(p) => SetSpec {
                path: p.clone(),
                images: None,
                name: None,
            },
            ConfigSet::Object(o) => SetSpec {
                path: o.path.clone(),
                images: o.images,
                name: o.name.clone(),
            },
        }
    }
}

/// A list given as a JSON array or as one comma-separated string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum Names {
    List(Vec<String>),
    Joined(String),
}

/// The `--config` file: the long flag names of `mos benchmark` in snake_case.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    in_datadir: Option<ConfigSet>,
    out_datadir: Option<Vec<ConfigSet>>,
    expect_images: Option<Vec<String>>,
    model: Option<String>,
    group_model_path: Option<PathBuf>,
    group_config: Option<PathBuf>,
    flat_model_path: Option<PathBuf>,
    mahalanobis_param_path: Option<PathBuf>,
    score: Option<Names>,
    temperature_odin: Option<f64>,
    epsilon_odin: Option<f64>,
    temperature_energy: Option<f64>,
    fit: Option<PathBuf>,
    react_percentile: Option<f64>,
    react_threshold: Option<f64>,
    knn_k: Option<i64>,
    vim_dim: Option<i64>,
    ash_percentile: Option<f64>,
    dice_percentile: Option<f64>,
    scale_percentile: Option<f64>,
    nnguide_k: Option<i64>,
    nnguide_clip: Option<String>,
    gen_gamma: Option<f64>,
    gen_m: Option<i64>,
    residual_dim: Option<i64>,
    neco_dim: Option<i64>,
    neco_max_logit: Option<bool>,
    published: Option<PathBuf>,
    logdir: Option<PathBuf>,
    name: Option<String>,
    workers: Option<usize>,
    batch: Option<usize>,
    crop: Option<usize>,
    resize: Option<usize>,
    mean: Option<Vec<f32>>,
    std: Option<Vec<f32>>,
    head: Option<String>,
    skip_bad_images: Option<bool>,
    device: Option<String>,
}

/// The sets of a config file, each checked alone so that an error says which
/// one it is (`in_datadir`, `out_datadir[i]`) and names its path.
fn check_config_sets(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut sets: Vec<(String, &serde_json::Value)> = Vec::new();
    if let Some(v) = value.get("in_datadir") {
        sets.push(("in_datadir".into(), v));
    }
    if let Some(serde_json::Value::Array(list)) = value.get("out_datadir") {
        for (i, v) in list.iter().enumerate() {
            sets.push((format!("out_datadir[{i}]"), v));
        }
    }
    for (at, v) in sets {
        if let Err(e) = ConfigSet::try_from(v.clone()) {
            let set = v
                .get("path")
                .and_then(|p| p.as_str())
                .map(|p| format!(" (set {p})"))
                .unwrap_or_default();
            bail!("--config {}: {at}{set}: {e}", path.display());
        }
    }
    Ok(())
}

fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--config: cannot read {}", path.display()))?;
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
        check_config_sets(path, &value)?;
    }
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "--config {}: {e}; its keys are the long flags of mos benchmark in snake_case (\"out_datadir\": [...], \"score\": [...]), a set is a path or {{\"path\": ..., \"images\": N}}",
            path.display()
        )
    })
}

/// `SET=N` of `--expect-images`.
fn parse_expect(s: &str) -> Result<(String, usize)> {
    let (set, n) = s
        .rsplit_once('=')
        .with_context(|| format!("--expect-images {s}: expected SET=N"))?;
    let n: usize = n
        .trim()
        .parse()
        .with_context(|| format!("--expect-images {s}: {n} is not a count"))?;
    Ok((set.trim().to_string(), n))
}

fn set_name(s: &SetSpec) -> String {
    if let Some(n) = &s.name {
        return n.clone();
    }
    let p = &s.path;
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The command line over the config file, with the defaults.
fn request(args: &BenchmarkArgs) -> Result<BenchmarkRequest> {
    let t = &args.transform;
    let cfg = match &args.config {
        Some(p) => read_config(p)?,
        None => Config::default(),
    };
    let mut in_set = match (&args.in_datadir, &cfg.in_datadir) {
        (Some(p), _) => SetSpec {
            path: p.clone(),
            images: None,
            name: None,
        },
        (None, Some(c)) => c.spec(),
        (None, None) => bail!("--in-datadir is required (on the command line or in --config)"),
    };
    let mut out_sets: Vec<SetSpec> = if !args.out_datadir.is_empty() {
        args.out_datadir
            .iter()
            .map(|p| SetSpec {
                path: p.clone(),
                images: None,
                name: None,
            })
            .collect()
    } else {
        cfg.out_datadir
            .iter()
            .flatten()
            .map(ConfigSet::spec)
            .collect()
    };
    if out_sets.is_empty() {
        bail!("--out-datadir is required (repeat it for each OOD set; or \"out_datadir\": [...] in --config)");
    }
    // Counts and names given in the config's set objects apply to sets given on
    // the command line too, by folder name; --expect-images overrides the counts.
    let cfg_sets: Vec<SetSpec> = cfg
        .in_datadir
        .iter()
        .chain(cfg.out_datadir.iter().flatten())
        .map(ConfigSet::spec)
        .collect();
    let base = |p: &Path| p.file_name().map(|n| n.to_os_string());
    for s in std::iter::once(&mut in_set).chain(out_sets.iter_mut()) {
        if s.name.is_none() {
            s.name = cfg_sets
                .iter()
                .find(|c| base(&c.path) == base(&s.path))
                .and_then(|c| c.name.clone());
        }
    }
    let mut expect: BTreeMap<String, usize> = BTreeMap::new();
    for s in &cfg_sets {
        if let Some(n) = s.images {
            expect.insert(set_name(s), n);
        }
    }
    for e in cfg
        .expect_images
        .iter()
        .flatten()
        .chain(&args.expect_images)
    {
        let (set, n) = parse_expect(e)?;
        expect.insert(set, n);
    }
    let mut all: Vec<&mut SetSpec> = vec![];
    all.push(&mut in_set);
    all.extend(out_sets.iter_mut());
    let known: Vec<String> = all.iter().map(|s| set_name(s)).collect();
    for set in expect.keys() {
        if !known.contains(set) {
            bail!(
                "--expect-images {set}=...: no set named {set}; the sets are {}",
                known.join(", ")
            );
        }
    }
    for s in all {
        if let Some(&n) = expect.get(&set_name(s)) {
            s.images = Some(n);
        }
    }
    let score: Vec<String> = if !args.score.is_empty() {
        args.score.clone()
    } else {
        match &cfg.score {
            Some(Names::List(v)) => v.clone(),
            Some(Names::Joined(s)) => s.split(',').map(|x| x.trim().to_string()).collect(),
            None => bail!("--score is required (e.g. MOS,MSP,ODIN,Energy,KL_Div,Mahalanobis)"),
        }
    };
    let model: Variant = match (&args.model, &cfg.model) {
        (Some(m), _) => *m,
        (None, Some(s)) => s
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--config \"model\": {e}"))?,
        (None, None) => "BiT-S-R101x1".parse().map_err(anyhow::Error::msg)?,
    };
    let device: DeviceSpec = match (&args.device, &cfg.device) {
        (Some(d), _) => *d,
        (None, Some(s)) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("--config \"device\": {e}"))?,
        (None, None) => DeviceSpec::default(),
    };
    let logdir = args
        .logdir
        .clone()
        .or(cfg.logdir)
        .context("--logdir is required (on the command line or in --config)")?;
    let name = args
        .name
        .clone()
        .or(cfg.name)
        .context("--name is required (on the command line or in --config)")?;
    let pick = |a: Option<f64>, c: Option<f64>, d: f64| a.or(c).unwrap_or(d);
    let (b, p) = (&args.baseline, &args.posthoc);
    Ok(BenchmarkRequest {
        in_set,
        out_sets,
        model,
        group_model_path: args.group_model_path.clone().or(cfg.group_model_path),
        flat_model_path: args.flat_model_path.clone().or(cfg.flat_model_path),
        score,
        settings: MethodSettings {
            temperature_odin: pick(
                b.temperature_odin,
                cfg.temperature_odin,
                BaselineFlags::TEMPERATURE_ODIN,
            ),
            epsilon_odin: pick(
                b.epsilon_odin,
                cfg.epsilon_odin,
                BaselineFlags::EPSILON_ODIN,
            ),
            temperature_energy: pick(
                b.temperature_energy,
                cfg.temperature_energy,
                BaselineFlags::TEMPERATURE_ENERGY,
            ),
            group_config: args.group_config.clone().or(cfg.group_config),
            mahalanobis_param_path: b
                .mahalanobis_param_path
                .clone()
                .or(cfg.mahalanobis_param_path),
            model: Some(model),
        },
        posthoc: {
            let keys = PostHocFlags {
                fit: None,
                react_percentile: cfg.react_percentile,
                react_threshold: cfg.react_threshold,
                knn_k: cfg.knn_k,
                vim_dim: cfg.vim_dim,
                ash_percentile: cfg.ash_percentile,
                dice_percentile: cfg.dice_percentile,
                scale_percentile: cfg.scale_percentile,
                nnguide_k: cfg.nnguide_k,
                nnguide_clip: cfg
                    .nnguide_clip
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(|e: String| anyhow::anyhow!("nnguide_clip {e}"))?,
                gen_gamma: cfg.gen_gamma,
                gen_m: cfg.gen_m,
                residual_dim: cfg.residual_dim,
                neco_dim: cfg.neco_dim,
                neco_max_logit: cfg.neco_max_logit,
            };
            p.or(&keys).settings()?
        },
        fit: p.fit.clone().or(cfg.fit),
        published: args.published.clone().or(cfg.published),
        run_dir: logdir.join(name),
        batch: args.batch.or(cfg.batch).unwrap_or(256),
        workers: args.workers.or(cfg.workers).unwrap_or(8),
        crop: t.crop.or(cfg.crop).unwrap_or(model.default_crop()),
        resize: t.resize.or(cfg.resize),
        mean: t.mean.clone().or(cfg.mean),
        std: t.std.clone().or(cfg.std),
        head: t.head.clone().or(cfg.head),
        skip_bad_images: args.skip_bad_images || cfg.skip_bad_images.unwrap_or(false),
        device: device.resolve()?,
    })
}

pub fn run(args: &BenchmarkArgs) -> Result<()> {
    let req = request(args)?;
    let out = benchmark::run(&req)?;
    if let Some(c) = &out.comparison {
        benchmark::published::verdict(c, &out.report)?;
    } else {
        println!("report in {}", out.report.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::score::posthoc_fit;
    use clap::CommandFactory;

    /// `mos benchmark` parsed from `flags`.
    fn args(flags: &[&str]) -> BenchmarkArgs {
        let argv = ["mos", "benchmark"].iter().chain(flags);
        match <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .command
        {
            crate::cli::Command::Benchmark(a) => *a,
            _ => panic!("not mos benchmark"),
        }
    }

    /// Every config key is a long flag of `mos benchmark`, in snake_case.
    #[test]
    fn config_keys_are_the_long_flags() {
        let cmd = crate::cli::Cli::command();
        let bench = cmd.find_subcommand("benchmark").unwrap();
        let flags: Vec<String> = bench
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(|l| l.replace('-', "_"))
            .collect();
        // serde names every field it accepts in its unknown-field message.
        let e = serde_json::from_str::<Config>(r#"{"no_such_key": 1}"#)
            .unwrap_err()
            .to_string();
        let list = e.split("expected one of").nth(1).unwrap();
        let list = list.split(" at line").next().unwrap();
        let keys: Vec<&str> = list
            .split(',')
            .map(|k| k.trim().trim_start_matches("or ").trim_matches('`'))
            .collect();
        assert!(keys.len() >= 20, "{e}");
        for k in &keys {
            assert!(flags.iter().any(|f| f == k), "config key {k} is no flag");
        }
        for f in &flags {
            if f != "config" && f != "help" {
                assert!(keys.contains(&f.as_str()), "flag {f} has no config key");
            }
        }
    }

    #[test]
    fn the_leaderboard_methods_settings_are_config_keys_under_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.json");
        std::fs::write(
            &cfg,
            r#"{"in_datadir": "d/val", "out_datadir": ["d/a"], "score": "SCALE,NNGuide,GEN,NECO", "scale_percentile": 80, "nnguide_k": 20, "nnguide_clip": "none", "gen_gamma": 0.5, "gen_m": 10, "residual_dim": 50, "neco_dim": 30, "neco_max_logit": true, "logdir": "runs", "name": "x", "device": "cpu"}"#,
        )
        .unwrap();
        let c = cfg.to_str().unwrap();
        let p = request(&args(&["--config", c])).unwrap().posthoc;
        assert_eq!(
            (p.scale_percentile, p.nnguide_k, p.nnguide_clip),
            (80.0, 20, posthoc_fit::NnGuideClip::None)
        );
        assert_eq!((p.gen_gamma, p.gen_m), (0.5, 10));
        assert_eq!(
            (p.residual_dim, p.neco_dim, p.neco_max_logit),
            (Some(50), 30, Some(true))
        );
        let p = request(&args(&[
            "--config",
            c,
            "--nnguide-clip",
            "0.95",
            "--gen-m",
            "5",
        ]))
        .unwrap()
        .posthoc;
        assert_eq!(p.nnguide_clip, posthoc_fit::NnGuideClip::Quantile(0.95));
        assert_eq!(p.gen_m, 5);
        std::fs::write(
            &cfg,
            r#"{"in_datadir": "d/val", "out_datadir": ["d/a"], "score": "NNGuide", "nnguide_clip": "most", "logdir": "runs", "name": "x", "device": "cpu"}"#,
        )
        .unwrap();
        let e = request(&args(&["--config", c])).err().unwrap().to_string();
        assert!(e.contains("nnguide_clip 'most'"), "{e}");
    }

    #[test]
    fn a_react_threshold_and_percentile_are_one_too_many() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.json");
        std::fs::write(
            &cfg,
            r#"{"in_datadir": "d/val", "out_datadir": ["d/a"], "score": "ReAct", "react_threshold": 1.0, "logdir": "runs", "name": "x", "device": "cpu"}"#,
        )
        .unwrap();
        let c = cfg.to_str().unwrap();
        let r = request(&args(&["--config", c])).unwrap();
        assert_eq!(r.posthoc.react_threshold, Some(1.0));
        let e = request(&args(&["--config", c, "--react-percentile", "80"]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("react_threshold 1 and react_percentile 80"),
            "{e}"
        );
    }

    #[test]
    fn command_line_overrides_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.json");
        std::fs::write(
            &cfg,
            r#"{"in_datadir": {"path": "d/val", "images": 5}, "out_datadir": ["d/a", {"path": "d/b", "images": 3}],
                "score": "MSP,Energy", "batch": 4, "crop": 32, "logdir": "runs", "name": "x", "device": "cpu"}"#,
        )
        .unwrap();
        let parse = |extra: &[&str]| {
            let mut flags = vec!["--config", cfg.to_str().unwrap()];
            flags.extend(extra);
            request(&args(&flags))
        };
        let r = parse(&[]).unwrap();
        assert_eq!(r.in_set.images, Some(5));
        assert_eq!(r.out_sets.len(), 2);
        assert_eq!(r.out_sets[1].images, Some(3));
        assert_eq!(r.score, ["MSP", "Energy"]);
        assert_eq!((r.batch, r.crop, r.workers), (4, 32, 8));
        assert_eq!(r.run_dir, PathBuf::from("runs/x"));
        let r = parse(&[
            "--batch",
            "2",
            "--out-datadir",
            "e/b",
            "--score",
            "ODIN",
            "--expect-images",
            "val=6",
        ])
        .unwrap();
        assert_eq!(r.batch, 2);
        assert_eq!(r.out_sets.len(), 1);
        // The config's count for set b applies to the command line's e/b.
        assert_eq!(r.out_sets[0].images, Some(3));
        assert_eq!(r.in_set.images, Some(6));
        assert_eq!(r.score, ["ODIN"]);
        let e = parse(&["--expect-images", "nope=1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no set named nope"), "{e}");
        std::fs::write(&cfg, r#"{"in-datadir": "x"}"#).unwrap();
        let e = parse(&[]).unwrap_err().to_string();
        assert!(
            e.contains("unknown field `in-datadir`") && e.contains("snake_case"),
            "{e}"
        );
        // A set object's unknown key is named, with the set and the file.
        std::fs::write(
            &cfg,
            r#"{"in_datadir": "d/val", "out_datadir": ["d/a", {"path": "d/b", "imgs": 3}]}"#,
        )
        .unwrap();
        let e = parse(&[]).unwrap_err().to_string();
        assert!(
            e.contains("unknown field `imgs`")
                && e.contains("out_datadir[1] (set d/b)")
                && e.contains(cfg.to_str().unwrap())
                && !e.contains("untagged"),
            "{e}"
        );
        std::fs::write(
            &cfg,
            r#"{"in_datadir": {"pth": "d/val"}, "out_datadir": ["d/a"]}"#,
        )
        .unwrap();
        let e = parse(&[]).unwrap_err().to_string();
        assert!(
            e.contains("in_datadir: a set object: unknown field `pth`"),
            "{e}"
        );
        std::fs::write(&cfg, r#"{"in_datadir": "d/val", "out_datadir": [3]}"#).unwrap();
        let e = parse(&[]).unwrap_err().to_string();
        assert!(e.contains("out_datadir[0]: a set is a path"), "{e}");
        // Parsed directly, the set's own error is still the key, not the enum.
        let e = serde_json::from_str::<Config>(r#"{"in_datadir": {"path": "x", "n": 1}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `n`"), "{e}");
    }

    /// The shipped configs read, and their published numbers cover every method
    /// and OOD set they run; the paper's config also runs GradNorm, whose published
    /// row (its own paper's) is read.
    #[test]
    fn shipped_configs_are_complete() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (file, sets, methods) in [
            (
                "mos_cvpr21.json",
                vec!["iNaturalist", "SUN", "Places", "Textures"],
                "MSP,ODIN,Mahalanobis,Energy,KL_Div,MOS,GradNorm,RankFeat",
            ),
            (
                "demo.json",
                vec!["mnist", "fashion_inverted"],
                "MSP,ODIN,Energy,KL_Div,Mahalanobis,MOS",
            ),
            (
                "imagenet_resnet50.json",
                vec!["iNaturalist", "SUN", "Places", "Textures"],
                "MSP,ODIN,Energy,ReAct,ASH-S",
            ),
        ] {
            let cfg = root.join("configs/benchmarks").join(file);
            let cfg = cfg.to_str().unwrap();
            let r = request(&args(&["--config", cfg, "--device", "cpu"])).unwrap();
            let mut got = r.score.clone();
            got.sort();
            let mut want: Vec<&str> = methods.split(',').collect();
            want.sort();
            assert_eq!(got, want, "{file}");
            let names: Vec<String> = r.out_sets.iter().map(set_name).collect();
            assert_eq!(names, sets, "{file}");
            assert!(r.out_sets.iter().all(|s| s.images.is_some()), "{file}");
            if let Some(p) = &r.published {
                let path = root.join(p);
                let p = benchmark::read_published(&path).unwrap();
                // The config runs the setup its published numbers were measured with.
                if let Some(setup) = &p.setup {
                    let resize = r.transform().unwrap().resize();
                    benchmark::published::check_setup(setup, &path, r.model.name, r.crop, resize)
                        .unwrap();
                }
                for m in &r.score {
                    for s in &sets {
                        assert!(
                            p.cells.iter().any(|c| &c.method == m && c.set == *s),
                            "{file}: {m} on {s}"
                        );
                    }
                }
            }
        }
        // ReAct's Table 1 (its repository's figs/results.png), ResNet-50: the averages
        // of the cells are the table's Average column.
        let r = benchmark::read_published(
            &root.join("configs/benchmarks/imagenet_resnet50_published.json"),
        )
        .unwrap();
        for (m, fpr, auroc) in [
            ("MSP", 66.95, 81.99),
            ("ODIN", 56.48, 85.41),
            ("Energy", 58.41, 86.17),
            ("ReAct", 31.43, 92.95),
            // The ASH authors' recorded ash_s@90 run (ash.ipynb) prints its average.
            ("ASH-S", 22.72, 95.14),
        ] {
            let cells: Vec<_> = r.cells.iter().filter(|c| c.method == m).collect();
            assert_eq!(cells.len(), 4, "{m}");
            let mean = |f: &dyn Fn(&&benchmark::PublishedCell) -> f64| {
                cells.iter().map(f).sum::<f64>() / 4.0
            };
            assert!((mean(&|c| c.fpr95) - fpr).abs() < 0.006, "{m} FPR95");
            assert!((mean(&|c| c.auroc) - auroc).abs() < 0.006, "{m} AUROC");
        }
        // The unchecked rows: their printed averages, where the cells give them
        // (CoVer's ASH-B row prints 39.04 for cells that average 38.04).
        for (m, source, fpr, auroc) in [
            ("ODIN", "CoVer", 50.80, 87.57),
            ("DICE", "CoVer", 34.75, 90.77),
            ("DICE+ReAct", "CoVer", 27.25, 93.40),
            ("ASH-S", "Papers-with-Code", 22.80, 95.12),
            ("ASH-S", "CoVer", 22.74, 95.14),
            ("ASH-B", "CoVer", 38.04, 90.91),
            // ReAct's own Mahalanobis row, whose tuned parameters are not published.
            ("Mahalanobis", "ReAct (NeurIPS 2021)", 87.43, 55.47),
        ] {
            let cells: Vec<_> = r
                .unchecked
                .iter()
                .filter(|c| c.method == m && c.source.contains(source))
                .collect();
            assert_eq!(cells.len(), 4, "{m} {source}");
            let mean = |f: &dyn Fn(&&benchmark::UncheckedCell) -> Option<f64>| {
                cells.iter().map(|c| f(c).unwrap()).sum::<f64>() / 4.0
            };
            assert!(
                (mean(&|c| c.fpr95) - fpr).abs() < 0.006,
                "{m} {source} FPR95"
            );
            assert!(
                (mean(&|c| c.auroc) - auroc).abs() < 0.006,
                "{m} {source} AUROC"
            );
        }
        let p =
            benchmark::read_published(&root.join("configs/benchmarks/mos_cvpr21_published.json"))
                .unwrap();
        let gradnorm: Vec<(&str, f64, f64)> = p
            .cells
            .iter()
            .filter(|c| c.method == "GradNorm")
            .map(|c| (c.set.as_str(), c.fpr95, c.auroc))
            .collect();
        // GradNorm (NeurIPS 2021), Table 1: FPR95 / AUROC.
        assert_eq!(
            gradnorm,
            [
                ("iNaturalist", 50.03, 90.33),
                ("SUN", 46.48, 89.03),
                ("Places", 60.86, 84.82),
                ("Textures", 61.42, 81.07)
            ]
        );
        assert!(p.cells.iter().filter(|c| c.method == "GradNorm").all(|c| c
            .source
            .as_deref()
            .is_some_and(|s| s.contains("NeurIPS 2021"))));
        // RankFeat (NeurIPS 2022), Table 2, Block 3 + 4 (its repository's
        // resnetv2.png): FPR95 / AUROC; the average is the table's 36.80 / 92.15.
        let rankfeat: Vec<(&str, f64, f64)> = p
            .cells
            .iter()
            .filter(|c| c.method == "RankFeat")
            .map(|c| (c.set.as_str(), c.fpr95, c.auroc))
            .collect();
        assert_eq!(
            rankfeat,
            [
                ("iNaturalist", 41.31, 91.91),
                ("SUN", 29.27, 94.07),
                ("Places", 39.34, 90.93),
                ("Textures", 37.29, 91.70)
            ]
        );
        let mean = |f: fn(&(&str, f64, f64)) -> f64| rankfeat.iter().map(f).sum::<f64>() / 4.0;
        assert!((mean(|c| c.1) - 36.80).abs() < 0.006 && (mean(|c| c.2) - 92.15).abs() < 0.006);
    }
}
