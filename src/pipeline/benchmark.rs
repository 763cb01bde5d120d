//! `mos benchmark`: a whole table of methods x OOD sets in one run
//! (docs/benchmark.md). Everything that can go wrong early is checked before any
//! image is forwarded: the sets (and their expected image counts), the methods
//! and their parameter files, the published numbers, and that each checkpoint
//! fits its role (group or flat). Then each (model, set) pair is extracted once
//! into a feature store in the run directory ([`super::extract`], [`super::store`];
//! a rerun finds them complete and recomputes nothing), the methods a store serves
//! are scored from the stores ([`super::score`], the post-hoc methods with
//! [`super::posthoc`]), the methods that perturb the images (ODIN with epsilon > 0,
//! Mahalanobis with magnitude > 0) ride on the flat model's extraction: one pass
//! over each set whose first forward pass, with a graph, gives both the stored
//! outputs and their input gradients ([`super::extract::forward_with_pass`]; a pass
//! of their own when the store is already complete), and the rows go to
//! `results.json` and `report.md`, with the published numbers side by side when given.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::extract::{extract_range_with, ExtractOptions, Extracted, ImagePass, Layers, RangePass};
use super::posthoc;
use super::score::{
    canonical_name, kl_scores, methods_from_names, posthoc_methods, score_store, Method,
    MethodSettings, RowScores,
};
use super::store::{self, Manifest, StoreData};
use crate::data::loader::Item;
use crate::eval::{EvalSet, MethodResult};
use crate::groupconfig::check_split;
use crate::metrics::ood_metrics;
use crate::model::weights::{load_model, resolve_weight_path, with_head_hint, LoadedModel};
use crate::model::Variant;
use crate::report::{merge_results, paper_table, table, ReportFormat};
use crate::runlog::RunLog;

/// An image folder with, optionally, the number of images it must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetSpec {
    pub path: PathBuf,
    pub images: Option<usize>,
    /// The set's name in the results; default: the folder's base name.
    pub name: Option<String>,
}

/// What one benchmark run asks for (the command line and config file of
/// `mos benchmark`, merged).
#[derive(Debug, Clone)]
pub struct BenchmarkRequest {
    pub in_set: SetSpec,
    pub out_sets: Vec<SetSpec>,
    pub model: Variant,
    pub group_model_path: Option<PathBuf>,
    pub flat_model_path: Option<PathBuf>,
    /// Method names as `--score` takes them ([`super::score::METHOD_NAMES`]).
    pub score: Vec<String>,
    /// Method settings (temperatures, epsilon, group config, Mahalanobis parameters).
    pub settings: MethodSettings,
    /// The post-hoc methods' hyper-parameters (docs/scores.md#post-hoc-methods-from-feature-stores).
    pub posthoc: posthoc::Settings,
    /// `--fit`: a store of in-distribution training images extracted with the flat
    /// model, for ReAct, KNN, ViM and DICE.
    pub fit: Option<PathBuf>,
    pub published: Option<PathBuf>,
    /// `<logdir>/<name>`.
    pub run_dir: PathBuf,
    pub batch: usize,
    pub workers: usize,
    pub crop: usize,
    pub skip_bad_images: bool,
    pub device: Device,
}

/// A published number with its tolerance (both in %).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedCell {
    pub method: String,
    /// The OOD set's name (its folder's base name).
    pub set: String,
    pub auroc: f64,
    pub fpr95: f64,
    pub auroc_tolerance: f64,
    pub fpr95_tolerance: f64,
    /// Where this cell comes from, when not from the file's `source` (e.g. a
    /// later paper's row on the same benchmark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A file of published numbers (`--published`; docs/benchmark.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    /// Where the numbers come from (shown in the report).
    pub source: String,
    /// Why the tolerances are what they are (shown in the report).
    #[serde(default)]
    pub tolerance_note: String,
    pub cells: Vec<PublishedCell>,
}

/// Reads and checks a published-numbers file: canonical method names, finite
/// numbers in [0, 100], non-negative tolerances, no cell twice.
pub fn read_published(path: &Path) -> Result<Published> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--published: cannot read {}", path.display()))?;
    let mut p: Published = serde_json::from_str(&text).with_context(|| {
        format!(
            "--published {}: not a published-numbers file",
            path.display()
        )
    })?;
    for (i, c) in p.cells.iter_mut().enumerate() {
        let at = format!("{}: cells[{i}] ({} on {})", path.display(), c.method, c.set);
        let at = || at.clone();
        c.method = canonical_method(&c.method).with_context(at)?;
        for (what, v) in [("auroc", c.auroc), ("fpr95", c.fpr95)] {
            if !(0.0..=100.0).contains(&v) {
                bail!("{}: {what} {v} is not a percentage in [0, 100]", at());
            }
        }
        for (what, v) in [
            ("auroc_tolerance", c.auroc_tolerance),
            ("fpr95_tolerance", c.fpr95_tolerance),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("{}: {what} {v} must be a non-negative number", at());
            }
        }
    }
    for (i, c) in p.cells.iter().enumerate() {
        if p.cells[..i]
            .iter()
            .any(|o| o.method == c.method && o.set == c.set)
        {
            bail!(
                "{}: two cells for {} on {}",
                path.display(),
                c.method,
                c.set
            );
        }
    }
    Ok(p)
}

/// The results name of a method as `--score` spells it (e.g. `kl` -> `KL_Div`,
/// `gradnorm` -> `GradNorm`): every method `--score` knows.
fn canonical_method(name: &str) -> Result<String> {
    Ok(canonical_name(name)?.to_string())
}

/// One published cell against the measured one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub method: String,
    pub set: String,
    pub published_auroc: f64,
    pub measured_auroc: f64,
    pub published_fpr95: f64,
    pub measured_fpr95: f64,
    pub auroc_tolerance: f64,
    pub fpr95_tolerance: f64,
    pub within: bool,
}

/// What a benchmark produced.
pub struct BenchmarkOutcome {
    pub rows: Vec<MethodResult>,
    pub comparison: Option<Vec<Comparison>>,
    pub report: PathBuf,
    pub results: PathBuf,
}

impl BenchmarkOutcome {
    /// Published cells outside their tolerance (0 without `--published`).
    pub fn outside(&self) -> usize {
        self.comparison
            .as_ref()
            .map_or(0, |c| c.iter().filter(|c| !c.within).count())
    }
}

/// Files under `root` that do not look like images of a data set: no image
/// extension, or hidden (at most `limit`, sorted).
pub fn foreign_files(root: &Path, limit: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let name = e.file_name();
                let hidden = name.to_string_lossy().starts_with('.');
                if hidden || !crate::data::folder::has_image_extension(&name) {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out.truncate(limit);
    out
}

/// Opens a set and checks its expected image count.
fn open_set(spec: &SetSpec, flag: &str) -> Result<EvalSet> {
    let mut set = EvalSet::open(&spec.path, flag)?;
    if let Some(name) = &spec.name {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            bail!(
                "{flag} {}: set name '{name}' must be a plain file name",
                spec.path.display()
            );
        }
        set.name = name.clone();
    }
    if let Some(want) = spec.images {
        let found = set.folder.len();
        if found != want {
            let foreign = foreign_files(&spec.path, 20);
            let listing = if foreign.is_empty() {
                "no file there looks foreign (every file has an image extension)".to_string()
            } else {
                format!(
                    "files that do not look like its images (not counted):\n  {}",
                    foreign
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join("\n  ")
                )
            };
            bail!(
                "{flag} {}: set {} should hold {want} images but holds {found} (image files by extension: {}); {listing}",
                spec.path.display(),
                set.name,
                crate::data::folder::IMG_EXTENSIONS.join(" ")
            );
        }
    }
    Ok(set)
}

/// A model in its role, loaded and checked.
struct RoleModel {
    role: &'static str,
    path: PathBuf,
    sha256: String,
    loaded: LoadedModel,
    /// Indices into the run's methods.
    methods: Vec<usize>,
}

fn load_role(
    req: &BenchmarkRequest,
    role: &'static str,
    path: &Path,
    head: i64,
    hint: String,
    methods: Vec<usize>,
) -> Result<RoleModel> {
    let flag = format!("--{role}-model-path");
    let weights = resolve_weight_path(path).with_context(|| flag.clone())?;
    let loaded = load_model(&weights, Some(req.model), Some(head), req.device)
        .map_err(|e| with_head_hint(e, || hint))
        .with_context(|| format!("{flag} {}", path.display()))?;
    Ok(RoleModel {
        role,
        path: path.to_path_buf(),
        sha256: store::sha256_file(&weights)?,
        loaded,
        methods,
    })
}

/// A store to extract: the set's items, their paths relative to its root, and
/// the store's manifest (before [`store::prepare`]).
struct StorePlan {
    items: Vec<Item>,
    rel: Vec<String>,
    manifest: Manifest,
    dir: PathBuf,
}

/// The store of `set` extracted with `m` into `dir` (one shard), planned.
fn plan_store(
    req: &BenchmarkRequest,
    m: &RoleModel,
    set: &EvalSet,
    layers: Layers,
    dir: PathBuf,
) -> Result<StorePlan> {
    let root = &set.folder.root;
    let items = set.folder.items();
    let rel: Vec<String> = items
        .iter()
        .map(|i| {
            i.path
                .strip_prefix(root)
                .unwrap_or(&i.path)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let labelled: Vec<(String, i64)> = rel
        .iter()
        .zip(&items)
        .map(|(p, i)| (p.clone(), i.target[0]))
        .collect();
    let command: Vec<String> = [
        "mos",
        "extract",
        "--model",
        req.model.name,
        "--model-path",
        &m.path.display().to_string(),
        "--datadir",
        &root.display().to_string(),
        "--output",
        &dir.display().to_string(),
        "--layers",
        &layers.names().join(","),
        "--crop",
        &req.crop.to_string(),
        "--batch",
        &req.batch.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut manifest = Manifest {
        format: store::FORMAT.into(),
        mos_version: env!("CARGO_PKG_VERSION").into(),
        model: req.model.name.into(),
        checkpoint: m.path.display().to_string(),
        checkpoint_sha256: m.sha256.clone(),
        checkpoint_format: m.loaded.state.format.to_string(),
        head_size: m.loaded.model.head_size,
        num_classes: set.folder.classes.len() as i64,
        crop: req.crop,
        batch: req.batch,
        precision: crate::runtime::value_name(&m.loaded.model.precision),
        skip_bad_images: req.skip_bad_images,
        layers: layers.names(),
        datadir: root.display().to_string(),
        list: None,
        dataset: set.name.clone(),
        images: items.len(),
        data_fingerprint: store::data_fingerprint(root, &labelled)?,
        num_shards: 1,
        fingerprint: String::new(),
        command,
        complete: false,
        group_config: m.loaded.state.group_config().map(<[i64]>::to_vec),
    };
    manifest.fingerprint = manifest.compute_fingerprint();
    Ok(StorePlan {
        items,
        rel,
        manifest,
        dir,
    })
}

/// Runs `pass` over the images of `set` with `m`, keeping the outputs `layers`
/// asks for: one decoding and one first forward pass per batch for both.
fn run_pass(
    req: &BenchmarkRequest,
    m: &RoleModel,
    set: &EvalSet,
    items: &[Item],
    layers: Layers,
    pass: &ImagePass,
) -> Result<(Extracted, RangePass)> {
    let label = pass_label(m, pass);
    let bar = crate::progress::bar(items.len() as u64, &format!("{label} {}", set.name));
    let opts = ExtractOptions {
        batch: req.batch,
        workers: req.workers,
        crop: req.crop,
        skip_bad: req.skip_bad_images,
        device: req.device,
        layers,
    };
    let out = crate::runtime::catch_torch(|| {
        extract_range_with(&m.loaded.model, items, 0..items.len(), &opts, pass, &|n| {
            bar.inc(n)
        })
    })
    .with_context(|| {
        format!(
            "{label} of {} (--batch {}, --crop {})",
            set.name, req.batch, req.crop
        )
    })??;
    bar.finish_and_clear();
    Ok(out)
}

/// What a pass over a set does, for messages: "extracting with the flat model",
/// "+ ODIN+Mahalanobis".
fn pass_label(m: &RoleModel, pass: &ImagePass) -> String {
    if pass.methods.is_empty() {
        format!("{} model", m.role)
    } else {
        format!("{} model + {}", m.role, method_names(pass.methods))
    }
}

fn method_names(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::name)
        .collect::<Vec<_>>()
        .join("+")
}

/// The image-pass methods' scores of a set from `pass`'s results.
fn pass_scores(rp: RangePass, skipped: usize) -> SetScores {
    SetScores {
        scores: rp.scores,
        seconds: rp.seconds,
        skipped,
    }
}

/// Notes the stages of a pass over `set`: the shared work (decoding, the first
/// forward pass, and writing the store) as `shared`, the image-pass methods' own.
fn pass_stages(
    stages: &mut Vec<(String, f64)>,
    shared: String,
    pass: &ImagePass,
    set: &EvalSet,
    rp: &RangePass,
) {
    stages.push((shared, rp.shared_seconds));
    if !pass.methods.is_empty() {
        stages.push((
            format!(
                "image pass {}, {}: backward and perturbed forward passes",
                method_names(pass.methods),
                set.name
            ),
            rp.seconds.iter().sum(),
        ));
    }
}

/// The image-pass methods alone over `set` (no store to extract, or it is
/// complete): the same pass as [`extract_store`]'s, its outputs not kept.
fn image_pass(
    req: &BenchmarkRequest,
    m: &RoleModel,
    set: &EvalSet,
    pass: &ImagePass,
    log: &RunLog,
    stages: &mut Vec<(String, f64)>,
) -> Result<SetScores> {
    let items = set.folder.items();
    let (ex, rp) = run_pass(req, m, set, &items, Layers::LOGITS, pass)?;
    log.line(format!(
        "{}: image pass over {} ({} images) in {:.2} s ({:.2} s the methods' own)",
        method_names(pass.methods),
        set.name,
        items.len(),
        rp.shared_seconds + rp.seconds.iter().sum::<f64>(),
        rp.seconds.iter().sum::<f64>()
    ));
    pass_stages(
        stages,
        format!(
            "image pass {}, {}: decoding and first forward pass",
            method_names(pass.methods),
            set.name
        ),
        pass,
        set,
        &rp,
    );
    Ok(pass_scores(rp, ex.skipped.len()))
}

/// Extracts the planned store (one shard) with the image-pass methods of `pass`
/// on the same batches, or finds it complete (then `pass` runs alone,
/// [`image_pass`]). Returns the store's rows and the image-pass methods' scores
/// (None without any).
fn extract_store(
    req: &BenchmarkRequest,
    m: &RoleModel,
    set: &EvalSet,
    plan: &StorePlan,
    pass: &ImagePass,
    log: &RunLog,
    stages: &mut Vec<(String, f64)>,
) -> Result<(StoreData, Option<SetScores>)> {
    let (items, dir) = (&plan.items, plan.dir.as_path());
    let layers = Layers::parse(&plan.manifest.layers)?;
    // Taken away again if the extraction fails (see store::NewStore).
    let (manifest, new_store) =
        store::prepare_new(dir, &plan.manifest, "another --name or --logdir")?;
    let mut pass_sc = None;
    let status = store::complete_shard(dir, &manifest, 0)?;
    if let store::ShardStatus::Damaged(why) = &status {
        log.line(format!(
            "{} model, {}: store {} fails verification, extracting it again: {why}",
            m.role,
            set.name,
            dir.display()
        ));
    }
    if matches!(status, store::ShardStatus::Complete(_)) {
        log.line(format!(
            "{} model, {}: store {} is complete, reused",
            m.role,
            set.name,
            dir.display()
        ));
        stages.push((format!("extract {} model, {}", m.role, set.name), 0.0));
        if !pass.methods.is_empty() {
            pass_sc = Some(image_pass(req, m, set, pass, log, stages)?);
        }
    } else {
        let (ex, mut rp) = run_pass(req, m, set, items, layers, pass)?;
        for (i, s) in &ex.skipped {
            log.line(crate::pipeline::extract::skip_line(*i, s));
        }
        let device = crate::runtime::device_name(req.device);
        let t0 = Instant::now();
        store::write_shard(dir, &manifest, 0, &ex, &plan.rel, &device)?;
        rp.shared_seconds += t0.elapsed().as_secs_f64();
        let own: f64 = rp.seconds.iter().sum();
        let secs = rp.shared_seconds + own;
        let with = if pass.methods.is_empty() {
            String::new()
        } else {
            format!(
                ", with the image pass of {} ({own:.2} s of it their backward and perturbed forward passes)",
                method_names(pass.methods)
            )
        };
        log.line(format!(
            "{} model, {}: extracted {} images into {} in {secs:.2} s ({:.1} images/s){with}",
            m.role,
            set.name,
            items.len(),
            dir.display(),
            items.len() as f64 / secs.max(1e-9)
        ));
        let shared = if pass.methods.is_empty() {
            format!("extract {} model, {}", m.role, set.name)
        } else {
            format!(
                "extract {} model, {} (decoding and forward pass shared with the image pass)",
                m.role, set.name
            )
        };
        pass_stages(stages, shared, pass, set, &rp);
        if !pass.methods.is_empty() {
            pass_sc = Some(pass_scores(rp, ex.skipped.len()));
        }
    }
    if let Some(s) = new_store {
        s.keep();
    }
    let index = store::open(dir, false)?;
    if !index.manifest.complete {
        store::mark_complete(&index)?;
    }
    Ok((store::load(dir)?, pass_sc))
}

/// Scores of one set: per method, per image; seconds per method; images skipped.
struct SetScores {
    scores: Vec<Vec<f64>>,
    seconds: Vec<f64>,
    skipped: usize,
}

impl SetScores {
    fn of_store(r: RowScores, s: &StoreData) -> Self {
        SetScores {
            scores: r.scores,
            seconds: r.seconds,
            skipped: s.skipped.len(),
        }
    }
}

/// Scores of one method: the ID set and each OOD set, with seconds and counts.
struct MethodScores {
    id: Vec<f64>,
    id_seconds: f64,
    oods: Vec<Vec<f64>>,
    ood_seconds: Vec<f64>,
    skipped_id: usize,
    skipped_ood: Vec<usize>,
    image_pass: bool,
}

impl MethodScores {
    /// Method `k`'s scores, taken out of the sets' scores.
    fn take(k: usize, id: &mut SetScores, oods: &mut [SetScores], image_pass: bool) -> Self {
        MethodScores {
            id: std::mem::take(&mut id.scores[k]),
            id_seconds: id.seconds[k],
            oods: oods
                .iter_mut()
                .map(|s| std::mem::take(&mut s.scores[k]))
                .collect(),
            ood_seconds: oods.iter().map(|s| s.seconds[k]).collect(),
            skipped_id: id.skipped,
            skipped_ood: oods.iter().map(|s| s.skipped).collect(),
            image_pass,
        }
    }
}

/// Runs the benchmark end to end (see the module's documentation).
pub fn run(req: &BenchmarkRequest) -> Result<BenchmarkOutcome> {
    // 1. Everything that can be checked before any forward pass.
    if req.batch == 0 || req.workers == 0 || req.crop == 0 {
        bail!(
            "--batch ({}), --workers ({}) and --crop ({}) must be at least 1",
            req.batch,
            req.workers,
            req.crop
        );
    }
    if req.out_sets.is_empty() {
        bail!("no OOD set: give --out-datadir (repeat it for several sets)");
    }
    if req.score.is_empty() {
        bail!("no method: give --score (e.g. MOS,MSP,ODIN,Energy,KL_Div,Mahalanobis)");
    }
    let id = open_set(&req.in_set, "--in-datadir")?;
    let oods = req
        .out_sets
        .iter()
        .map(|s| open_set(s, "--out-datadir"))
        .collect::<Result<Vec<_>>>()?;
    for (i, a) in oods.iter().enumerate() {
        if let Some(b) = oods[..i].iter().find(|b| b.name == a.name) {
            bail!(
                "--out-datadir {} and {}: two OOD sets named {} (the folder's base name names the set)",
                b.folder.root.display(),
                a.folder.root.display(),
                a.name
            );
        }
    }
    let mut settings = req.settings.clone();
    settings.model = Some(req.model);
    // Methods as a store scores them (CPU) and as an image pass runs them (device).
    let methods = methods_from_names(&req.score, &settings, Device::Cpu)?;
    // The post-hoc methods score the flat model's stores with its head (read from
    // --flat-model-path) and the training statistics of --fit, as mos score does.
    let posthoc_req = {
        let list = posthoc_methods(&methods);
        req.posthoc.validate()?;
        (!list.is_empty()).then(|| posthoc::Request {
            methods: list,
            settings: req.posthoc.clone(),
            fit: req.fit.clone(),
            model_path: req.flat_model_path.clone(),
            run_dir: req.run_dir.clone(),
            device: req.device,
        })
    };
    let image_methods = if req.device == Device::Cpu {
        methods.clone()
    } else {
        methods_from_names(&req.score, &settings, req.device)?
    };
    let names: Vec<&str> = methods.iter().map(Method::name).collect();
    let published = match &req.published {
        Some(path) => {
            let p = read_published(path)?;
            for m in &names {
                for o in &oods {
                    if !p.cells.iter().any(|c| c.method == *m && c.set == o.name) {
                        bail!(
                            "--published {}: no published number for {m} on {} (both are run); add the cell, or leave the method or the set out",
                            path.display(),
                            o.name
                        );
                    }
                }
            }
            Some(p)
        }
        None => None,
    };
    let id_classes = id.folder.classes.len();
    let group_idx: Vec<usize> = (0..methods.len())
        .filter(|&m| methods[m].needs_group_model())
        .collect();
    let flat_idx: Vec<usize> = (0..methods.len())
        .filter(|&m| !methods[m].needs_group_model())
        .collect();
    let mut models = Vec::new();
    // Lines for the log, which is opened once every check has passed.
    let mut notes: Vec<String> = Vec::new();
    if !group_idx.is_empty() {
        let Some(path) = &req.group_model_path else {
            bail!("--score MOS needs --group-model-path (the group-softmax checkpoint)");
        };
        let Method::Mos(slices) = &methods[group_idx[0]] else {
            bail!("internal: a group method that is not MOS");
        };
        if slices.num_classes() != id_classes as i64 {
            bail!(
                "--group-config {} covers {} classes but --in-datadir {} has {id_classes} class folders",
                settings.group_config.as_deref().unwrap_or(Path::new("")).display(),
                slices.num_classes(),
                id.folder.root.display()
            );
        }
        let head = slices.total_logits();
        let hint = format!(
            "--group-model-path must be a group-softmax checkpoint with {id_classes} classes + {} groups = {head} logits; a flat-softmax checkpoint (one logit per class) belongs to --flat-model-path",
            slices.num_groups()
        );
        let model = load_role(req, "group", path, head, hint, group_idx)?;
        let recorded = model.loaded.state.group_config();
        let given = settings.group_config.as_deref().unwrap_or(Path::new(""));
        let source = format!("--group-model-path {}", path.display());
        if let Some(line) = check_split(slices.classes_per_group(), given, recorded, &source)? {
            notes.push(line);
        }
        models.push(model);
    }
    if !flat_idx.is_empty() {
        let Some(path) = &req.flat_model_path else {
            bail!(
                "--score {} needs --flat-model-path (the flat-softmax checkpoint)",
                flat_idx
                    .iter()
                    .map(|&m| names[m])
                    .collect::<Vec<_>>()
                    .join(",")
            );
        };
        let hint = format!(
            "--flat-model-path must be a flat-softmax checkpoint with one logit per class of --in-datadir ({id_classes}); a group-softmax checkpoint belongs to --group-model-path"
        );
        models.push(load_role(
            req,
            "flat",
            path,
            id_classes as i64,
            hint,
            flat_idx,
        )?);
    }

    // Which methods each model's stores serve and which take the image pass, and
    // the stores, planned (and the post-hoc methods' statistics checked) before
    // any image is forwarded.
    struct Plan {
        store_methods: Vec<usize>,
        pass_methods: Vec<usize>,
        /// The store methods as the stores score them.
        store_ms: Vec<Method>,
        /// `<run>/stores/<role>`, with one store per set in `stores`.
        base: PathBuf,
        stores: Vec<StorePlan>,
    }
    let mut plans = Vec::new();
    for m in &models {
        let (store_methods, pass_methods): (Vec<usize>, Vec<usize>) = m
            .methods
            .iter()
            .partition(|&&i| methods[i].needs_images().is_none());
        // The stores serve the store methods; with none, nothing is extracted.
        let store_ms: Vec<Method> = store_methods.iter().map(|&i| methods[i].clone()).collect();
        let base = req.run_dir.join("stores").join(m.role);
        let mut stores = Vec::new();
        if !store_methods.is_empty() {
            let layers = super::score::store_layers(&store_ms);
            for set in std::iter::once(&id).chain(&oods) {
                stores.push(plan_store(req, m, set, layers, base.join(&set.name))?);
            }
        }
        if let (Some(r), true) = (&posthoc_req, m.role == "flat") {
            let id_plan = stores.first().context("internal: no flat store planned")?;
            posthoc::precheck(r, &id_plan.manifest, &id_plan.dir)?;
        }
        plans.push(Plan {
            store_methods,
            pass_methods,
            store_ms,
            base,
            stores,
        });
    }

    // 2. Extraction: each (model, set) once, into the run directory's stores.
    let log = RunLog::open(&req.run_dir, "benchmark.log")?;
    let started = Instant::now();
    log.line(format!(
        "mos benchmark: methods {}; in-distribution {} ({} images, {id_classes} classes); out-of-distribution {}; model {}, crop {}, batch {}, on {}",
        names.join(","),
        id.name,
        id.folder.len(),
        oods.iter()
            .map(|o| format!("{} ({} images)", o.name, o.folder.len()))
            .collect::<Vec<_>>()
            .join(", "),
        req.model.name,
        req.crop,
        req.batch,
        crate::runtime::device_name(req.device)
    ));
    for line in notes {
        log.line(line);
    }
    let mut stages: Vec<(String, f64)> = Vec::new();
    let mut scores: Vec<Option<MethodScores>> = (0..methods.len()).map(|_| None).collect();
    let mut store_dirs: Vec<Option<PathBuf>> = vec![None; methods.len()];
    let mut posthoc_settings = None;
    for (m, plan) in models.iter().zip(&plans) {
        let (store_methods, pass_methods) = (&plan.store_methods, &plan.pass_methods);
        // The methods that perturb the images ride on the extraction's pass over
        // each set (or take a pass of their own when nothing is extracted).
        let pass_ms: Vec<Method> = pass_methods
            .iter()
            .map(|&i| image_methods[i].clone())
            .collect();
        let pass = ImagePass { methods: &pass_ms };
        let mut pass_sc: Vec<SetScores> = Vec::new();
        let sets: Vec<&EvalSet> = std::iter::once(&id).chain(&oods).collect();
        if !store_methods.is_empty() {
            let ms = &plan.store_ms;
            let mut stores = Vec::new();
            for (set, p) in sets.iter().zip(&plan.stores) {
                let (s, sc) = extract_store(req, m, set, p, &pass, &log, &mut stages)?;
                stores.push(s);
                pass_sc.extend(sc);
            }
            let (id_store, ood_stores) = (&stores[0], &stores[1..]);
            let t0 = Instant::now();
            let prepared = match (&posthoc_req, m.role == "flat") {
                (Some(r), true) => Some(posthoc::prepare(r, id_store, &log)?),
                _ => None,
            };
            let rows = |s: &StoreData| score_store(s, ms, prepared.as_ref());
            let mut id_sc = rows(id_store)?;
            let mut ood_sc = ood_stores.iter().map(rows).collect::<Result<Vec<_>>>()?;
            if let Some(k) = ms.iter().position(|m| matches!(m, Method::KlDiv)) {
                let t = Instant::now();
                let id_probs = id_sc.probs.take().context("KL probabilities")?;
                let mut sets = vec![&id_probs];
                sets.extend(ood_sc.iter().filter_map(|s| s.probs.as_ref()));
                let mut kl =
                    kl_scores(&id_probs, &id_store.labels, id_classes as i64, &sets)?.into_iter();
                id_sc.scores[k] = kl.next().context("KL scores")?;
                for s in &mut ood_sc {
                    s.scores[k] = kl.next().context("KL scores")?;
                }
                id_sc.seconds[k] += t.elapsed().as_secs_f64();
            }
            stages.push((
                format!("score {} from the {} model's stores", ms.len(), m.role),
                t0.elapsed().as_secs_f64(),
            ));
            if let Some(p) = prepared {
                posthoc_settings = Some(p.settings);
            }
            let mut id_sc = SetScores::of_store(id_sc, id_store);
            let mut ood_sc: Vec<SetScores> = ood_sc
                .into_iter()
                .zip(ood_stores)
                .map(|(r, s)| SetScores::of_store(r, s))
                .collect();
            for (k, &i) in store_methods.iter().enumerate() {
                store_dirs[i] = Some(plan.base.clone());
                scores[i] = Some(MethodScores::take(k, &mut id_sc, &mut ood_sc, false));
            }
        } else if !pass_ms.is_empty() {
            for set in &sets {
                pass_sc.push(image_pass(req, m, set, &pass, &log, &mut stages)?);
            }
        }
        // 3. The image-pass methods' scores, from those passes.
        if !pass_ms.is_empty() {
            let (id_sc, ood_sc) = pass_sc
                .split_first_mut()
                .context("internal: no image pass")?;
            for (k, &i) in pass_methods.iter().enumerate() {
                scores[i] = Some(MethodScores::take(k, id_sc, ood_sc, true));
            }
        }
    }

    // 4. Rows, results.json, report.md.
    let mut rows = Vec::new();
    for (o, ood) in oods.iter().enumerate() {
        for (i, method) in methods.iter().enumerate() {
            let sc = scores[i]
                .as_ref()
                .context("internal: a method was not scored")?;
            let metrics = ood_metrics(&sc.id, &sc.oods[o])
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("metrics of {} on {}", method.name(), ood.name))?;
            let model = models
                .iter()
                .find(|m| m.methods.contains(&i))
                .context("internal: no model")?;
            let row_settings = serde_json::json!({
                "benchmark": true,
                "score": names,
                "temperature_odin": settings.temperature_odin,
                "epsilon_odin": settings.epsilon_odin,
                "temperature_energy": settings.temperature_energy,
                "group_config": settings.group_config,
                "mahalanobis_param_path": settings.mahalanobis_param_path,
                "in_datadir": id.folder.root,
                "out_datadir": ood.folder.root,
                "batch": req.batch,
                "crop": req.crop,
                "skip_bad_images": req.skip_bad_images,
                "device": crate::runtime::device_name(req.device),
                "checkpoint_sha256": model.sha256,
                "from": if sc.image_pass { "images".to_string() } else {
                    format!("stores {}", store_dirs[i].as_deref().unwrap_or(Path::new("")).display())
                },
            });
            let mut row_settings = row_settings;
            if let (Method::PostHoc(_), Some(p)) = (method, &posthoc_settings) {
                row_settings["posthoc"] = p.clone();
            }
            rows.push(MethodResult {
                method: method.name().to_string(),
                in_dataset: id.name.clone(),
                out_dataset: ood.name.clone(),
                num_in: sc.id.len(),
                num_out: sc.oods[o].len(),
                auroc: metrics.auroc,
                aupr_in: metrics.aupr_in,
                aupr_out: metrics.aupr_out,
                fpr95: metrics.fpr95,
                fpr95_ood_positive: metrics.fpr95_ood_positive,
                seconds: sc.id_seconds + sc.ood_seconds[o],
                skipped: sc.skipped_id + sc.skipped_ood[o],
                model: req.model.name.to_string(),
                model_path: model.path.display().to_string(),
                settings: row_settings,
            });
        }
    }
    let results = req.run_dir.join("results.json");
    merge_results(&results, &rows)?;
    print!("{}", table(&rows));
    let comparison = published.as_ref().map(|p| compare(p, &rows));
    let total = started.elapsed().as_secs_f64();
    let report = req.run_dir.join("report.md");
    let text = report_markdown(
        req,
        &rows,
        published.as_ref(),
        comparison.as_deref(),
        &stages,
        total,
    );
    crate::model::checkpoint::write_atomic(&report, text.as_bytes())?;
    for (what, secs) in &stages {
        log.line(format!("time: {what}: {secs:.2} s"));
    }
    log.line(format!(
        "results in {} and {} ({total:.2} s in all)",
        results.display(),
        report.display()
    ));
    Ok(BenchmarkOutcome {
        rows,
        comparison,
        report,
        results,
    })
}

/// Each measured row that has a published cell, against it.
pub fn compare(p: &Published, rows: &[MethodResult]) -> Vec<Comparison> {
    let mut out = Vec::new();
    for r in rows {
        let Some(c) = p
            .cells
            .iter()
            .find(|c| c.method == r.method && c.set == r.out_dataset)
        else {
            continue;
        };
        let (a, f) = (100.0 * r.auroc, 100.0 * r.fpr95);
        // Compared at the two decimals the paper prints.
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let within = (round(a) - c.auroc).abs() <= c.auroc_tolerance + 1e-9
            && (round(f) - c.fpr95).abs() <= c.fpr95_tolerance + 1e-9;
        out.push(Comparison {
            method: r.method.clone(),
            set: r.out_dataset.clone(),
            published_auroc: c.auroc,
            measured_auroc: a,
            published_fpr95: c.fpr95,
            measured_fpr95: f,
            auroc_tolerance: c.auroc_tolerance,
            fpr95_tolerance: c.fpr95_tolerance,
            within,
        });
    }
    out
}

/// The side-by-side table of [`compare`] as Markdown.
pub fn comparison_table(c: &[Comparison]) -> String {
    let mut out = String::from(
        "| Method | OOD set | AUROC published | measured | difference | tolerance | FPR95 published | measured | difference | tolerance | within |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in c {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:+.2} | {:.2} | {:.2} | {:.2} | {:+.2} | {:.2} | {} |\n",
            c.method,
            c.set,
            c.published_auroc,
            c.measured_auroc,
            c.measured_auroc - c.published_auroc,
            c.auroc_tolerance,
            c.published_fpr95,
            c.measured_fpr95,
            c.measured_fpr95 - c.published_fpr95,
            c.fpr95_tolerance,
            if c.within { "yes" } else { "**no**" }
        ));
    }
    out
}

fn report_markdown(
    req: &BenchmarkRequest,
    rows: &[MethodResult],
    published: Option<&Published>,
    comparison: Option<&[Comparison]>,
    stages: &[(String, f64)],
    total: f64,
) -> String {
    let mut s = format!(
        "# Benchmark: {}\n\nIn-distribution {} ({} images); model {}, crop {}, batch {}, device {}.\n\n## AUROC / FPR95 (%), FPR95 at 95% ID recall\n\n",
        req.run_dir.display(),
        rows.first().map_or("", |r| r.in_dataset.as_str()),
        rows.first().map_or(0, |r| r.num_in),
        req.model.name,
        req.crop,
        req.batch,
        crate::runtime::device_name(req.device)
    );
    s.push_str(&paper_table(rows, ReportFormat::Markdown));
    if let (Some(p), Some(c)) = (published, comparison) {
        s.push_str(&format!(
            "\n## Against the published numbers\n\nSource: {}\n\n",
            p.source
        ));
        let mut others: Vec<(&str, &str)> = Vec::new();
        for cell in &p.cells {
            if let Some(src) = &cell.source {
                if !others.contains(&(cell.method.as_str(), src.as_str())) {
                    others.push((&cell.method, src));
                }
            }
        }
        for (method, src) in others {
            s.push_str(&format!("Source of {method}'s cells: {src}\n\n"));
        }
        if !p.tolerance_note.is_empty() {
            s.push_str(&format!("Tolerances: {}\n\n", p.tolerance_note));
        }
        s.push_str(&comparison_table(c));
        let ok = c.iter().filter(|c| c.within).count();
        s.push_str(&format!(
            "\n{ok} of {} cells within their tolerance.\n",
            c.len()
        ));
    }
    s.push_str("\n## Where the time went\n\n| stage | seconds |\n|---|---|\n");
    for (what, secs) in stages {
        s.push_str(&format!("| {what} | {secs:.2} |\n"));
    }
    s.push_str(&format!("| total | {total:.2} |\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, set: &str, auroc: f64, fpr95: f64) -> MethodResult {
        MethodResult {
            method: method.into(),
            in_dataset: "val".into(),
            out_dataset: set.into(),
            num_in: 1,
            num_out: 1,
            auroc,
            aupr_in: 0.0,
            aupr_out: 0.0,
            fpr95,
            fpr95_ood_positive: 0.0,
            seconds: 0.0,
            skipped: 0,
            model: "m".into(),
            model_path: "p".into(),
            settings: serde_json::Value::Null,
        }
    }

    #[test]
    fn comparison_uses_each_cells_tolerance() {
        let cell = |m: &str, a, f, ta, tf| PublishedCell {
            method: m.into(),
            set: "SUN".into(),
            auroc: a,
            fpr95: f,
            auroc_tolerance: ta,
            fpr95_tolerance: tf,
            source: None,
        };
        let p = Published {
            source: "s".into(),
            tolerance_note: String::new(),
            cells: vec![
                cell("MSP", 80.0, 70.0, 1.0, 2.0),
                cell("MOS", 90.0, 40.0, 0.5, 0.5),
            ],
        };
        // MSP: 80.9 within 1.0, 71.5 within 2.0; MOS: 90.6 outside 0.5.
        let rows = [
            row("MSP", "SUN", 0.809, 0.715),
            row("MOS", "SUN", 0.906, 0.40),
            row("Energy", "SUN", 0.5, 0.5),
        ];
        let c = compare(&p, &rows);
        assert_eq!(
            c.len(),
            2,
            "a method without a published cell is not compared"
        );
        assert!(c[0].within);
        assert!(!c[1].within);
        let t = comparison_table(&c);
        assert!(
            t.contains("| MOS | SUN | 90.00 | 90.60 | +0.60 | 0.50 |"),
            "{t}"
        );
    }

    #[test]
    fn published_file_errors_name_the_cell() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        let write = |t: &str| std::fs::write(&f, t).unwrap();
        write(
            r#"{"source": "x", "cells": [{"method": "KL", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        assert_eq!(read_published(&f).unwrap().cells[0].method, "KL_Div");
        // Every method --score knows, post-hoc ones included, with a cell's source.
        write(
            r#"{"source": "x", "cells": [{"method": "gradnorm", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1, "source": "y"},
                {"method": "ash_s", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        let p = read_published(&f).unwrap();
        assert_eq!(
            (p.cells[0].method.as_str(), p.cells[0].source.as_deref()),
            ("GradNorm", Some("y"))
        );
        assert_eq!(
            (p.cells[1].method.as_str(), p.cells[1].source.as_deref()),
            ("ASH-S", None)
        );
        write(
            r#"{"source": "x", "cells": [{"method": "Foo", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        let e = format!("{:#}", read_published(&f).unwrap_err());
        assert!(
            e.contains("cells[0] (Foo on SUN)") && e.contains("unknown score 'Foo'"),
            "{e}"
        );
        write(
            r#"{"source": "x", "cells": [{"method": "MSP", "set": "SUN", "auroc": 150, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        let e = format!("{:#}", read_published(&f).unwrap_err());
        assert!(e.contains("auroc 150 is not a percentage"), "{e}");
        write(r#"{"source": "x", "cels": []}"#);
        let e = format!("{:#}", read_published(&f).unwrap_err());
        assert!(e.contains("unknown field `cels`"), "{e}");
    }

    #[test]
    fn foreign_files_are_hidden_or_not_images() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("images");
        std::fs::create_dir_all(&d).unwrap();
        for f in ["a.jpg", "b.JPEG", ".directory", "notes.txt"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let f = foreign_files(dir.path(), 10);
        assert_eq!(f, [d.join(".directory"), d.join("notes.txt")]);
        assert_eq!(foreign_files(dir.path(), 1).len(), 1);
    }
}
