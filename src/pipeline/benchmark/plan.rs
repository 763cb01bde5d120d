//! Steps 1 and 2 of `mos benchmark`: [`plan`] (the sets, the methods, the
//! published numbers) and [`check`] (the models in their roles, the stores planned),
//! so that everything that can go wrong early does so before any image is forwarded.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::Device;

use super::published::{check_coverage, check_setup, read_published, Published};
use super::{BenchmarkRequest, SetSpec};
use crate::data::loader::Item;
use crate::data::EvalSet;
use crate::groupconfig::check_split;
use crate::model::weights::{load_network, resolve_weight_path, with_head_hint, LoadedModel};
use crate::pipeline::score::posthoc_fit as posthoc;
use crate::pipeline::score::{
    methods_from_names, posthoc_methods, store_layers, Method, MethodSettings,
};
use crate::pipeline::store::{self, Manifest};
use crate::pipeline::vocab::Layers;

/// Step 1's result: what the run computes, before any model is read.
pub(super) struct Plan {
    pub id: EvalSet,
    pub oods: Vec<EvalSet>,
    /// The method settings, with the request's model.
    pub settings: MethodSettings,
    /// The methods as a store scores them (on the CPU).
    pub methods: Vec<Method>,
    /// The methods as an image pass runs them (on the device).
    pub image_methods: Vec<Method>,
    pub names: Vec<&'static str>,
    /// The post-hoc methods' request, when any is asked for.
    pub posthoc_req: Option<posthoc::Request>,
    pub published: Option<Published>,
    pub id_classes: usize,
}

impl Plan {
    /// The ID set, then the OOD sets.
    pub fn sets(&self) -> Vec<&EvalSet> {
        std::iter::once(&self.id).chain(&self.oods).collect()
    }
}

/// Step 1, plan: the sets opened (their expected image counts checked), the
/// methods built from their names with their parameter files read and checked,
/// and the published numbers read (a cell for every method and set run).
pub(super) fn plan(req: &BenchmarkRequest) -> Result<Plan> {
    if req.batch == 0 || req.workers == 0 || req.crop == 0 {
        bail!(
            "--batch ({}), --workers ({}) and --crop ({}) must be at least 1",
            req.batch,
            req.workers,
            req.crop
        );
    }
    req.transform()?;
    if req.out_sets.is_empty() {
        bail!("no OOD set: give --out-datadir (repeat it for several sets)");
    }
    if req.score.is_empty() {
        bail!("no method: give --score (e.g. MOS,MSP,ODIN,Energy,KL_Div,Mahalanobis)");
    }
    if req
        .score
        .iter()
        .any(|m| m.trim().eq_ignore_ascii_case("mahalanobis"))
    {
        req.model
            .require_feature_layers("--score Mahalanobis")
            .map_err(anyhow::Error::msg)?;
    }
    if req
        .score
        .iter()
        .any(|m| m.trim().eq_ignore_ascii_case("rankfeat"))
    {
        req.model
            .require_rankfeat_maps("--score RankFeat")
            .map_err(anyhow::Error::msg)?;
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
    let names: Vec<&'static str> = methods.iter().map(Method::name).collect();
    let published = match &req.published {
        Some(path) => {
            let p = read_published(path)?;
            if let Some(setup) = &p.setup {
                let resize = req.transform()?.resize();
                check_setup(setup, path, req.model.name, req.crop, resize)?;
            }
            let sets: Vec<&str> = oods.iter().map(|o| o.name.as_str()).collect();
            check_coverage(&p, path, &names, &sets)?;
            Some(p)
        }
        None => None,
    };
    let id_classes = id.folder.classes.len();
    Ok(Plan {
        id,
        oods,
        settings,
        methods,
        image_methods,
        names,
        posthoc_req,
        published,
        id_classes,
    })
}

/// The stores of one model: which of the run's methods they serve and which take
/// the image pass, and the stores planned (one per set, ID first).
pub(super) struct ModelStores {
    pub store_methods: Vec<usize>,
    pub pass_methods: Vec<usize>,
    /// The store methods as the stores score them.
    pub store_ms: Vec<Method>,
    /// `<run>/stores/<role>`, with one store per set in `stores`.
    pub base: PathBuf,
    pub stores: Vec<StorePlan>,
}

/// Step 2's result: the models in their roles and their stores, checked.
pub(super) struct Checked {
    pub models: Vec<RoleModel>,
    /// One per model, in the same order.
    pub stores: Vec<ModelStores>,
    /// Lines for the run's log, which is opened once every check has passed.
    pub notes: Vec<String>,
}

/// Step 2, check: each checkpoint loaded in its role (group or flat) and checked
/// against it (head size, the group split it records), then the stores planned and
/// the post-hoc methods' training statistics checked, all before any image is
/// forwarded.
pub(super) fn check(req: &BenchmarkRequest, plan: &Plan) -> Result<Checked> {
    let (methods, settings, id, id_classes) =
        (&plan.methods, &plan.settings, &plan.id, plan.id_classes);
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
                    .map(|&m| plan.names[m])
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
    // the stores, planned (and the post-hoc methods' statistics checked).
    let mut stores_of = Vec::new();
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
            let layers = store_layers(&store_ms);
            for set in plan.sets() {
                stores.push(plan_store(req, m, set, layers, base.join(&set.name))?);
            }
        }
        if let (Some(r), true) = (&plan.posthoc_req, m.role == "flat") {
            let id_plan = stores.first().context("internal: no flat store planned")?;
            posthoc::precheck(r, &id_plan.manifest, &id_plan.dir)?;
        }
        stores_of.push(ModelStores {
            store_methods,
            pass_methods,
            store_ms,
            base,
            stores,
        });
    }
    Ok(Checked {
        models,
        stores: stores_of,
        notes,
    })
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
pub(super) struct RoleModel {
    pub role: &'static str,
    pub path: PathBuf,
    pub sha256: String,
    pub loaded: LoadedModel,
    /// Indices into the run's methods.
    pub methods: Vec<usize>,
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
    let script = req.input_spec().script_spec(req.model);
    let loaded = load_network(&weights, req.model, script.as_ref(), Some(head), req.device)
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
pub(super) struct StorePlan {
    pub items: Vec<Item>,
    pub rel: Vec<String>,
    pub manifest: Manifest,
    pub dir: PathBuf,
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
    let transform = req.transform()?;
    let mut manifest = Manifest {
        format: store::FORMAT.into(),
        mos_version: env!("CARGO_PKG_VERSION").into(),
        model: req.model.name.into(),
        checkpoint: m.path.display().to_string(),
        checkpoint_sha256: m.sha256.clone(),
        checkpoint_format: m.loaded.state.format.to_string(),
        head_size: m.loaded.model.head_size(),
        num_classes: set.folder.classes.len() as i64,
        crop: req.crop,
        batch: req.batch,
        precision: crate::runtime::value_name(&m.loaded.model.precision()),
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
        resize: transform.resize(),
        feature_dim: None,
        imported: None,
        mean: None,
        std: None,
        head: None,
        rankfeat_power_iterations: None,
    };
    // A TorchScript module's transform and head are flags: the store records them.
    if let Some(s) = req.input_spec().script_spec(req.model) {
        manifest.record_script(&transform, &s.head, m.loaded.model.feature_dim());
    }
    manifest.fingerprint = manifest.compute_fingerprint();
    Ok(StorePlan {
        items,
        rel,
        manifest,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
