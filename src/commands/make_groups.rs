//! `mos make-groups` (docs/grouping.md): makes a grouping of a label space by the
//! WordNet taxonomy, by k-means of class-mean features or at random, and writes the
//! group-softmax list of a flat list from a groups file.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::cli::{MakeGroupsArgs, Strategy};
use crate::groups::{self, kmeans, wordnet, GroupsFile};
use crate::model::checkpoint::write_atomic;
use crate::pipeline::store;

/// `p` made absolute with its links resolved; a file yet to be made: its resolved
/// folder joined with its name.
fn resolved(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let name = p.file_name()?;
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
    Some(
        dir.unwrap_or(Path::new("."))
            .canonicalize()
            .ok()?
            .join(name),
    )
}

/// Whether two paths name one file: the same file when both exist (hard links
/// too), else the same resolved path.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return (x.dev(), x.ino()) == (y.dev(), y.ino());
    }
    match (resolved(a), resolved(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Refuses outputs that are an input or one another: `(flag, path)` each.
fn check_outputs(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (flag, out)) in outputs.iter().enumerate() {
        for (other, path) in inputs.iter().chain(&outputs[..i]) {
            if same_file(out, path) {
                bail!(
                    "{flag} {} is the same file as {other} {}: refusing to write over it; give {flag} another path",
                    out.display(),
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// The class names and where they came from.
fn class_names(args: &MakeGroupsArgs) -> Result<Option<(Vec<String>, String)>> {
    if let Some(file) = &args.classes {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --classes {}", file.display()))?;
        let mut names = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let name = line.trim();
            if name.is_empty() {
                bail!("{}:{}: an empty class name", file.display(), i + 1);
            }
            if let Some(j) = seen.insert(name, i) {
                bail!(
                    "{}:{}: class '{name}' again (first on line {})",
                    file.display(),
                    i + 1,
                    j + 1
                );
            }
            names.push(name.to_string());
        }
        if names.is_empty() {
            bail!("{}: no classes", file.display());
        }
        return Ok(Some((names, file.display().to_string())));
    }
    if let Some(dir) = &args.datadir {
        let mut names: Vec<String> = Vec::new();
        for e in std::fs::read_dir(dir)
            .with_context(|| format!("cannot read --datadir {}", dir.display()))?
        {
            let e = e?;
            // Directories and symlinks to directories, as ImageFolder finds classes.
            if std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir()) {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        if names.is_empty() {
            bail!("--datadir {}: no class folders", dir.display());
        }
        return Ok(Some((names, format!("folder in {}", dir.display()))));
    }
    Ok(None)
}

/// The mean pre-logit feature of each class of a store, `[classes, d]` in f64.
fn class_means(store_dir: &Path, classes: usize, device: Device) -> Result<(Vec<f64>, usize)> {
    let s = store::load(store_dir)?;
    let features = s.features.as_ref().with_context(|| {
        format!(
            "--features {}: the store has no pre-logits (extract it with --layers logits,features)",
            store_dir.display()
        )
    })?;
    let d = features.size()[1] as usize;
    if let Some(&bad) = s.labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
        bail!(
            "--features {}: a row of label {bad}, but there are {classes} classes",
            store_dir.display()
        );
    }
    let labels = Tensor::from_slice(&s.labels).to_device(device);
    let x = features.to_device(device).to_kind(Kind::Double);
    let sums =
        Tensor::zeros([classes as i64, d as i64], (Kind::Double, device)).index_add(0, &labels, &x);
    let counts = Tensor::zeros([classes as i64], (Kind::Double, device)).index_add(
        0,
        &labels,
        &Tensor::ones([s.labels.len() as i64], (Kind::Double, device)),
    );
    let counts_v = Vec::<f64>::try_from(&counts)?;
    if let Some(c) = counts_v.iter().position(|&n| n == 0.0) {
        bail!(
            "--features {}: class {c} has no rows, so it has no mean feature",
            store_dir.display()
        );
    }
    let means = (sums / counts.unsqueeze(1))
        .to_device(Device::Cpu)
        .contiguous();
    Ok((Vec::<f64>::try_from(means.view([-1]))?, d))
}

fn make(args: &MakeGroupsArgs, strategy: Strategy) -> Result<()> {
    let output = args
        .output
        .as_ref()
        .context("--output GROUPS.json is required with --strategy")?;
    let classes: Vec<(&str, &Path)> = args
        .classes
        .iter()
        .map(|c| ("--classes", c.as_path()))
        .collect();
    check_outputs(&[("--output", output)], &classes)?;
    let (names, source) = class_names(args)?
        .context("give the classes: --datadir DIR (its class folders) or --classes FILE")?;
    let n = names.len();
    let k = match strategy {
        Strategy::Taxonomy => None,
        _ => {
            let k = args
                .num_groups
                .with_context(|| "--num-groups K is required with --strategy kmeans or random")?;
            if k == 0 || k > n {
                bail!(
                    "--num-groups {k}: there are {n} classes ({source}), so K must be in 1..={n}"
                );
            }
            Some(k)
        }
    };
    let (groups, settings) = match strategy {
        Strategy::Taxonomy => {
            let wn = wordnet::WordNet::open(&args.wordnet_dir)?;
            let anchors: Vec<String> = match &args.anchors {
                Some(a) => a.iter().map(|s| s.trim().to_string()).collect(),
                None => groups::DEFAULT_ANCHORS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            };
            let g = groups::taxonomy(&wn, &names, &source, &anchors)?;
            let anchor_ids: Vec<String> = anchors
                .iter()
                .map(|a| match a.as_str() {
                    "rest" => "rest".to_string(),
                    a => wordnet::wnid(wn.resolve(a).expect("resolved above")),
                })
                .collect();
            let empty: Vec<&str> = g
                .iter()
                .filter(|(_, m)| m.is_empty())
                .map(|(name, _)| name.as_str())
                .collect();
            if !empty.is_empty() {
                eprintln!(
                    "note: no class falls in the group(s) {}; they are left out",
                    empty.join(", ")
                );
            }
            let settings = json!({
                "wordnet_dir": args.wordnet_dir.display().to_string(),
                "anchors": anchor_ids,
                "rule": "first anchor on the hypernym path that follows each synset's first-listed hypernym",
                "empty_groups_left_out": empty,
            });
            (g, settings)
        }
        Strategy::Random => {
            let k = k.expect("checked");
            (
                groups::random(n, k, args.seed),
                json!({"num_groups": k, "seed": args.seed}),
            )
        }
        Strategy::Kmeans => {
            let k = k.expect("checked");
            let store_dir = args
                .features
                .as_ref()
                .context("--features STORE is required with --strategy kmeans")?;
            let device = args.device.device.resolve()?;
            let (x, d) = class_means(store_dir, n, device)?;
            if let Some((c, j, v)) = kmeans::first_non_finite(&x, d) {
                bail!(
                    "--features {}: the mean feature of class {c} ({}) is {v} in feature {j}: the store holds non-finite features; extract it again",
                    store_dir.display(),
                    names[c]
                );
            }
            let c = kmeans::kmeans(&x, d, k, args.restarts, args.seed)
                .with_context(|| format!("--features {}", store_dir.display()))?;
            println!(
                "k-means: {k} groups of {n} class means ({d} features), best inertia {:.6e} of {} restarts ({} Lloyd iterations)",
                c.inertia,
                args.restarts.max(1),
                c.iterations
            );
            (
                groups::from_labels(&c.labels, k),
                json!({
                    "num_groups": k,
                    "seed": args.seed,
                    "restarts": args.restarts.max(1),
                    "features": store_dir.display().to_string(),
                    "inertia": c.inertia,
                }),
            )
        }
    };
    let name = match strategy {
        Strategy::Taxonomy => "taxonomy",
        Strategy::Kmeans => "kmeans",
        Strategy::Random => "random",
    };
    let mut settings = settings;
    settings["classes"] = json!(source);
    let file = GroupsFile::new(&names, groups, name, settings);
    file.write(output)?;
    println!(
        "{} groups of {n} classes ({name}): {}",
        file.classes_per_group.len(),
        file.group_names
            .iter()
            .zip(&file.classes_per_group)
            .map(|(g, c)| format!("{g} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("wrote {}", output.display());
    Ok(())
}

fn list(args: &MakeGroupsArgs, from: &Path) -> Result<()> {
    let flat = args.flat_list.as_ref().context("--flat-list is required")?;
    let out = args
        .output_list
        .as_ref()
        .context("--output-list is required")?;
    let map_path = args
        .output_map
        .clone()
        .unwrap_or_else(|| out.with_extension("map.json"));
    let map_flag = if args.output_map.is_some() {
        "--output-map"
    } else {
        "--output-map (by default --output-list with .map.json)"
    };
    let mut inputs: Vec<(&str, &Path)> = vec![("--from", from), ("--flat-list", flat)];
    if let Some(c) = &args.classes {
        inputs.push(("--classes", c));
    }
    check_outputs(&[("--output-list", out), (map_flag, &map_path)], &inputs)?;
    let groups = GroupsFile::read(from)?;
    let names = class_names(args)?;
    let gl = groups::group_list(
        &groups,
        from,
        flat,
        names.as_ref().map(|(n, _)| n.as_slice()),
    )?;
    let map = json!({
        "note": "group g, class c of the group list is flat label flat_labels[g][c], class classes[g][c]",
        "groups": from.display().to_string(),
        "flat_list": flat.display().to_string(),
        "group_names": groups.group_names,
        "flat_labels": gl.flat_labels,
        "classes": gl.classes,
    });
    write_atomic(out, gl.text.as_bytes())?;
    write_atomic(
        &map_path,
        (serde_json::to_string_pretty(&map)? + "\n").as_bytes(),
    )?;
    println!(
        "wrote {} ({} lines, {} groups) and its inverse map {}",
        out.display(),
        gl.text.lines().count(),
        groups.group_names.len(),
        map_path.display()
    );
    Ok(())
}

pub fn run(args: &MakeGroupsArgs) -> Result<()> {
    match (&args.from, args.strategy) {
        (Some(from), _) => list(args, from),
        (None, Some(s)) => make(args, s),
        (None, None) => bail!("give --strategy (make a grouping) or --from (write a group list)"),
    }
}
