//! The post-hoc methods of [`crate::ood::posthoc`] from feature stores
//! (docs/scores.md#post-hoc-methods-from-feature-stores): which methods with which
//! settings ([`Request`]), the model's head (read from the checkpoint the stores
//! were extracted with, checked by its SHA-256), the training statistics fitted
//! on a store of in-distribution training images (`--fit`), saved in the run
//! directory (`fit.safetensors`, `fit.json`) and reused, and the batched scoring
//! of stored rows on the device.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::checkpoint::{self, write_atomic};
use crate::model::variant::{Family, Variant};
use crate::ood::leaderboard::{self as lb, NecoParams};
use crate::ood::posthoc::{self as ph, Ash, Head, KnnBlocks, VimParams};
use crate::pipeline::store::{self, Manifest, StoreData, MANIFEST};
use crate::pipeline::vocab::PostHoc;
use crate::runlog::RunLog;

/// The fitted statistics' file in the run directory.
pub const FIT_FILE: &str = "fit.safetensors";
/// What they were fitted on and with which settings (also in FIT_FILE's metadata).
pub const FIT_JSON: &str = "fit.json";
/// `format` of [`FIT_JSON`].
pub const FIT_FORMAT: &str = "mos-posthoc-fit-v1";
/// Rows scored at once.
const CHUNK: i64 = 8192;

/// `--react-percentile`'s default: the original's ImageNet setting.
pub const REACT_PERCENTILE: f64 = 90.0;
/// `--knn-k`'s default: the original's ImageNet k (OpenOOD uses 50).
pub const KNN_K: i64 = 1000;
/// `--ash-percentile`'s default: the original's ImageNet setting.
pub const ASH_PERCENTILE: f64 = 90.0;
/// `--dice-percentile`'s default: the original's ImageNet setting.
pub const DICE_PERCENTILE: f64 = 70.0;

/// The methods' hyper-parameters (`--react-percentile`, `--knn-k`, `--vim-dim`,
/// `--ash-percentile`, `--dice-percentile`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub react_percentile: f64,
    /// ReAct's clipping threshold given as a number (`--react-threshold`), instead
    /// of the percentile of the training activations: then ReAct needs no fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub react_threshold: Option<f64>,
    pub knn_k: i64,
    /// None: ViM's default for the features' width ([`ph::vim_default_dim`]).
    pub vim_dim: Option<i64>,
    pub ash_percentile: f64,
    pub dice_percentile: f64,
    pub scale_percentile: f64,
    pub nnguide_k: i64,
    /// NNGuide's ReAct clipping ([`NnGuideClip`]).
    pub nnguide_clip: NnGuideClip,
    pub gen_gamma: f64,
    pub gen_m: i64,
    /// None: ViM's default for the features' width ([`ph::vim_default_dim`]).
    pub residual_dim: Option<i64>,
    pub neco_dim: i64,
    /// Whether NECO multiplies by the max logit; None: as the original for the
    /// store's model (ViTs yes, ResNets no), a given value for other models.
    pub neco_max_logit: Option<bool>,
}

/// NNGuide's clipping of the features (`--nnguide-clip`): `auto` as the original
/// for the store's model (its ResNet-50 at the 0.95 quantile of the guide bank's
/// features; no clipping for its other backbones), `none`, or a quantile in (0, 1).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NnGuideClip {
    #[default]
    Auto,
    None,
    Quantile(f64),
}

impl std::str::FromStr for NnGuideClip {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(NnGuideClip::Auto),
            "none" => Ok(NnGuideClip::None),
            q => match q.parse::<f64>() {
                Ok(q) if q > 0.0 && q < 1.0 => Ok(NnGuideClip::Quantile(q)),
                _ => Err(format!(
                    "'{s}': give auto, none, or a quantile in (0, 1) such as 0.95"
                )),
            },
        }
    }
}

impl NnGuideClip {
    /// The quantile for a store of model `model`: `auto` clips torchvision's ResNets
    /// (the original's ResNet-50 engine) at 0.95 and nothing else.
    pub fn quantile_for(self, model: &str) -> Option<f64> {
        match self {
            NnGuideClip::Quantile(q) => Some(q),
            NnGuideClip::None => None,
            NnGuideClip::Auto => (family_of(model) == Some(Family::TorchvisionResNet))
                .then_some(lb::NNGUIDE_CLIP_QUANTILE),
        }
    }
}

/// The family of a store's model, when mos builds it.
fn family_of(model: &str) -> Option<Family> {
    model.parse::<Variant>().ok().map(|v| v.family)
}

impl Default for Settings {
    /// The original repositories' ImageNet settings.
    fn default() -> Self {
        Settings {
            react_percentile: REACT_PERCENTILE,
            react_threshold: None,
            knn_k: KNN_K,
            vim_dim: None,
            ash_percentile: ASH_PERCENTILE,
            dice_percentile: DICE_PERCENTILE,
            scale_percentile: lb::SCALE_PERCENTILE,
            nnguide_k: lb::NNGUIDE_K,
            nnguide_clip: NnGuideClip::Auto,
            gen_gamma: lb::GEN_GAMMA,
            gen_m: lb::GEN_M,
            residual_dim: None,
            neco_dim: lb::NECO_DIM,
            neco_max_logit: None,
        }
    }
}

impl Settings {
    /// Checks every setting, naming its flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, p) in [
            ("--react-percentile", self.react_percentile),
            ("--ash-percentile", self.ash_percentile),
            ("--dice-percentile", self.dice_percentile),
            ("--scale-percentile", self.scale_percentile),
        ] {
            if !(p.is_finite() && p > 0.0 && p < 100.0) {
                bail!("{flag} {p}: must be a percentile in (0, 100)");
            }
        }
        if self.knn_k < 1 {
            bail!("--knn-k {}: must be at least 1", self.knn_k);
        }
        if let Some(t) = self.react_threshold {
            if !(t.is_finite() && t > 0.0) {
                bail!("--react-threshold {t}: must be a positive number");
            }
        }
        if let Some(d) = self.vim_dim {
            if d < 1 {
                bail!("--vim-dim {d}: must be at least 1");
            }
        }
        if let Some(d) = self.residual_dim {
            if d < 1 {
                bail!("--residual-dim {d}: must be at least 1");
            }
        }
        if self.nnguide_k < 1 {
            bail!("--nnguide-k {}: must be at least 1", self.nnguide_k);
        }
        if !(self.gen_gamma.is_finite() && self.gen_gamma > 0.0) {
            bail!("--gen-gamma {}: must be a positive number", self.gen_gamma);
        }
        if self.gen_m < 1 {
            bail!("--gen-m {}: must be at least 1", self.gen_m);
        }
        if self.neco_dim < 1 {
            bail!("--neco-dim {}: must be at least 1", self.neco_dim);
        }
        Ok(())
    }

    /// Residual's principal dimension for features of width `d`, checked.
    pub fn residual_dim_for(&self, d: i64) -> Result<i64> {
        principal_dim(self.residual_dim, "--residual-dim", d)
    }

    /// NECO's dimension for features of width `d`, checked.
    pub fn neco_dim_for(&self, d: i64) -> Result<i64> {
        if self.neco_dim > d {
            bail!(
                "--neco-dim {}: must be at most the features' width {d}",
                self.neco_dim
            );
        }
        Ok(self.neco_dim)
    }

    /// Whether NECO multiplies by the max logit for a store of model `model`: as
    /// the original (every backbone but ResNets) for mos's models, as given
    /// (`--neco-max-logit`) otherwise.
    pub fn neco_max_logit_for(&self, model: &str) -> Result<bool> {
        if let Some(b) = self.neco_max_logit {
            return Ok(b);
        }
        match family_of(model) {
            Some(Family::Bit | Family::TorchvisionResNet) => Ok(false),
            Some(Family::TorchvisionViT) => Ok(true),
            _ => bail!(
                "NECO: the original multiplies by the max logit for every backbone but ResNets, and the stores' model {model} is not one mos knows the architecture of; give --neco-max-logit true or false"
            ),
        }
    }

    /// Whether method `p` needs training statistics with these settings (ReAct not
    /// when its threshold is given).
    pub fn needs_fit(&self, p: PostHoc) -> bool {
        p.needs_fit() && !(p == PostHoc::React && self.react_threshold.is_some())
    }

    /// ViM's principal dimension for features of width `d`, checked.
    pub fn vim_dim_for(&self, d: i64) -> Result<i64> {
        principal_dim(self.vim_dim, "--vim-dim", d)
    }
}

/// A principal dimension (`flag`, ViM's default for width `d` when not given),
/// checked: below `d`, so that a residual space remains.
fn principal_dim(given: Option<i64>, flag: &str, d: i64) -> Result<i64> {
    let dim = given.unwrap_or_else(|| ph::vim_default_dim(d));
    if dim < 1 || dim >= d {
        bail!("{flag} {dim}: must be below the features' width {d} (a residual space must remain)");
    }
    Ok(dim)
}

/// The store the statistics were fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitSource {
    /// The store's path as given to `--fit`.
    pub store: String,
    pub fingerprint: String,
    pub model: String,
    pub checkpoint_sha256: String,
    pub dataset: String,
    pub data_fingerprint: String,
    /// Images (rows) in the store.
    pub rows: usize,
    /// The rest of the model settings the statistics depend on (absent in fits
    /// written before they were recorded: such a fit is not reused).
    #[serde(default)]
    pub head_size: Option<i64>,
    #[serde(default)]
    pub crop: Option<usize>,
    #[serde(default)]
    pub precision: Option<String>,
}

impl FitSource {
    /// The first model setting in which the fit store differs from the store `id`
    /// about to be scored, as (what, the fit's value, the store's value).
    pub fn model_difference(&self, id: &Manifest) -> Option<(&'static str, String, String)> {
        let known = |v: Option<String>| v.unwrap_or_else(|| "not recorded".into());
        [
            ("model", self.model.clone(), id.model.clone()),
            (
                "checkpoint SHA-256",
                self.checkpoint_sha256.clone(),
                id.checkpoint_sha256.clone(),
            ),
            (
                "head size",
                known(self.head_size.map(|h| h.to_string())),
                id.head_size.to_string(),
            ),
            (
                "crop",
                known(self.crop.map(|c| c.to_string())),
                id.crop.to_string(),
            ),
            (
                "precision",
                known(self.precision.clone()),
                id.precision.clone(),
            ),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReactFit {
    pub percentile: f64,
    pub threshold: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VimFit {
    pub dim: i64,
    pub alpha: f64,
}

/// `fit.json`: what was fitted, on what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitInfo {
    pub format: String,
    pub mos_version: String,
    pub source: FitSource,
    /// ReAct's clipping threshold (also `react.threshold` in the tensors).
    pub react: Option<ReactFit>,
    /// Whether DICE's mean training feature `dice.mean` is in the tensors.
    pub dice_mean: bool,
    /// ViM's dimension and α (`vim.u`, `vim.ns`, `vim.alpha` in the tensors).
    pub vim: Option<VimFit>,
    /// Residual's dimension (`residual.u`, `residual.ns` in the tensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual: Option<DimFit>,
    /// NECO's dimension (`neco.mean`, `neco.std`, `neco.pca_mean`,
    /// `neco.components` in the tensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neco: Option<DimFit>,
}

/// A fitted subspace's dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DimFit {
    pub dim: i64,
}

/// The fitted statistics.
pub struct Fitted {
    pub info: FitInfo,
    pub react_threshold: Option<f64>,
    /// The mean training feature (float64): DICE's and fDBD's.
    pub dice_mean: Option<Tensor>,
    pub vim: Option<VimParams>,
    /// Residual's origin u and residual basis.
    pub residual: Option<(Tensor, Tensor)>,
    pub neco: Option<NecoParams>,
}

impl Fitted {
    fn empty(source: FitSource) -> Self {
        Fitted {
            info: FitInfo {
                format: FIT_FORMAT.into(),
                mos_version: env!("CARGO_PKG_VERSION").into(),
                source,
                react: None,
                dice_mean: false,
                vim: None,
                residual: None,
                neco: None,
            },
            react_threshold: None,
            dice_mean: None,
            vim: None,
            residual: None,
            neco: None,
        }
    }
}

/// Reads `fit.safetensors` of a run directory, if there is one.
pub fn read_fit(dir: &Path) -> Result<Option<Fitted>> {
    let path = dir.join(FIT_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|_| anyhow::anyhow!("{}: not a safetensors file", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let info: FitInfo = meta
        .get("fit")
        .and_then(|j| serde_json::from_str(j).ok())
        .filter(|i: &FitInfo| i.format == FIT_FORMAT)
        .with_context(|| {
            format!(
                "{}: not a mos fit file (no '{FIT_FORMAT}' metadata); delete it to fit again",
                path.display()
            )
        })?;
    let ckpt = checkpoint::load_bytes(&bytes)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))?;
    store::check_tensors_finite(&ckpt.model, &path)?;
    let get = |name: &str| -> Result<Tensor> {
        ckpt.model
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.to_kind(Kind::Double))
            .with_context(|| {
                format!(
                    "{}: no tensor '{name}'; delete it to fit again",
                    path.display()
                )
            })
    };
    let react_threshold = match &info.react {
        Some(_) => Some(get("react.threshold")?.double_value(&[0])),
        None => None,
    };
    let dice_mean = if info.dice_mean {
        Some(get("dice.mean")?)
    } else {
        None
    };
    let vim = match &info.vim {
        Some(v) => Some(VimParams {
            u: get("vim.u")?,
            ns: get("vim.ns")?,
            alpha: v.alpha,
        }),
        None => None,
    };
    let residual = match &info.residual {
        Some(_) => Some((get("residual.u")?, get("residual.ns")?)),
        None => None,
    };
    let neco = match &info.neco {
        Some(_) => Some(NecoParams {
            mean: get("neco.mean")?,
            std: get("neco.std")?,
            pca_mean: get("neco.pca_mean")?,
            components: get("neco.components")?,
        }),
        None => None,
    };
    Ok(Some(Fitted {
        info,
        react_threshold,
        dice_mean,
        vim,
        residual,
        neco,
    }))
}

/// Writes `fit.safetensors` and `fit.json` (atomically).
pub fn write_fit(dir: &Path, f: &Fitted) -> Result<()> {
    let mut tensors = Vec::new();
    if let Some(t) = f.react_threshold {
        tensors.push(("react.threshold".to_string(), Tensor::from_slice(&[t])));
    }
    if let Some(m) = &f.dice_mean {
        tensors.push(("dice.mean".into(), m.to_device(Device::Cpu)));
    }
    if let Some(v) = &f.vim {
        tensors.push(("vim.u".into(), v.u.to_device(Device::Cpu)));
        tensors.push(("vim.ns".into(), v.ns.to_device(Device::Cpu)));
        tensors.push(("vim.alpha".into(), Tensor::from_slice(&[v.alpha])));
    }
    if let Some((u, ns)) = &f.residual {
        tensors.push(("residual.u".into(), u.to_device(Device::Cpu)));
        tensors.push(("residual.ns".into(), ns.to_device(Device::Cpu)));
    }
    if let Some(n) = &f.neco {
        for (name, t) in [
            ("neco.mean", &n.mean),
            ("neco.std", &n.std),
            ("neco.pca_mean", &n.pca_mean),
            ("neco.components", &n.components),
        ] {
            tensors.push((name.into(), t.to_device(Device::Cpu)));
        }
    }
    let json = serde_json::to_string_pretty(&f.info)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), FIT_FORMAT.to_string());
    meta.insert("fit".to_string(), json.clone());
    let bytes = checkpoint::serialize(&tensors, meta)?;
    write_atomic(&dir.join(FIT_FILE), &bytes)?;
    write_atomic(&dir.join(FIT_JSON), (json + "\n").as_bytes())
}

/// What `mos score` asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub methods: Vec<PostHoc>,
    pub settings: Settings,
    /// `--fit`: a store of ID training images.
    pub fit: Option<PathBuf>,
    /// `--model-path`: the checkpoint the stores were extracted with (for its
    /// head); default: the one the ID store's manifest records.
    pub model_path: Option<PathBuf>,
    /// The run directory (where the fit is saved).
    pub run_dir: PathBuf,
    pub device: Device,
}

/// A method ready to score: its head and statistics on the device.
pub enum Scorer {
    MaxLogit,
    GradNorm,
    React {
        head: Head,
        threshold: f64,
    },
    Knn {
        bank: Tensor,
        k: i64,
    },
    Vim(VimParams),
    Ash {
        head: Head,
        variant: Ash,
        percentile: f64,
    },
    Dice {
        head: Head,
        mask: Tensor,
    },
    Scale {
        head: Head,
        percentile: f64,
    },
    NnGuide {
        bank: Tensor,
        k: i64,
        /// The head and clipping threshold, when NNGuide clips.
        clip: Option<(Head, f64)>,
    },
    Fdbd {
        mean: Tensor,
        den: Tensor,
    },
    Gen {
        gamma: f64,
        m: i64,
    },
    Residual {
        u: Tensor,
        ns: Tensor,
    },
    Neco {
        params: NecoParams,
        max_logit: bool,
    },
    Entropy,
    /// The energy of the stored RankFeat logits (given as `logits`).
    RankFeat,
}

/// What is built from the fit store's rows for each run (not saved): KNN's bank,
/// NNGuide's guide bank with its clipping threshold.
#[derive(Default)]
struct Banks {
    knn: Option<Tensor>,
    nnguide: Option<(Tensor, Option<f64>)>,
}

/// The prepared methods, and the settings to record in results.json.
pub struct Prepared {
    pub scorers: Vec<(PostHoc, Scorer)>,
    pub settings: serde_json::Value,
    pub device: Device,
}

/// Checks that a fit store comes from the model and settings of the ID store.
pub fn check_same_model(
    id: &Manifest,
    id_dir: &Path,
    fit: &Manifest,
    fit_dir: &Path,
) -> Result<()> {
    if let Some((what, x, y)) = id.model_difference(fit) {
        bail!(
            "--fit {}: extracted with another {what} than the ID store {} ({y} vs {x}); the training statistics must come from the same model and settings",
            fit_dir.join(MANIFEST).display(),
            id_dir.join(MANIFEST).display()
        );
    }
    if !fit.layers.iter().any(|l| l == "features") {
        bail!(
            "--fit {}: the store has no pre-logit features; extract it with --layers logits,features",
            fit_dir.join(MANIFEST).display()
        );
    }
    Ok(())
}

/// The head (W, b) of the model the ID store `id` (in `id_dir`) was extracted
/// with: from `--model-path`, else from the checkpoint the store records, which
/// must have the SHA-256 the store records; an imported store's head is the
/// `head.safetensors` `mos import` wrote into it. Returns the head and its file.
pub fn load_head(
    model_path: Option<&Path>,
    id: &Manifest,
    id_dir: &Path,
    methods: &str,
) -> Result<(Head, PathBuf)> {
    let imported = id.imported.is_some();
    let path = match model_path {
        Some(p) => p.to_path_buf(),
        None if imported => {
            let p = id_dir.join(store::HEAD_FILE);
            if !p.exists() {
                bail!(
                    "--score {methods} needs the model's head, which {} was imported without: import it again with --head-weight and --head-bias",
                    id_dir.display()
                );
            }
            p
        }
        None => {
            let p = PathBuf::from(&id.checkpoint);
            if !p.exists() {
                bail!(
                    "--score {methods} needs the model's head: give --model-path (the checkpoint the stores were extracted with; the ID store records {}, which is not there)",
                    id.checkpoint
                );
            }
            p
        }
    };
    let file = if imported {
        path
    } else {
        crate::model::weights::resolve_weight_path(&path).context("--model-path")?
    };
    let sha = store::sha256_file(&file)?;
    if sha != id.checkpoint_sha256 {
        if imported {
            bail!(
                "{}: its SHA-256 is {sha}, but the stores were imported with a head of SHA-256 {}: give the head the stores were imported with",
                file.display(),
                id.checkpoint_sha256
            );
        }
        bail!(
            "--model-path {}: its SHA-256 is {sha}, but the stores were extracted from a checkpoint with SHA-256 {} ({}): give the checkpoint the stores were extracted with",
            file.display(),
            id.checkpoint_sha256,
            id.checkpoint
        );
    }
    // The head's tensors: a TorchScript module's parameters under its prefix, or
    // the family's names in its state dict (BiT: a 1x1 conv; torchvision: fc; an
    // imported store's head file: weight, bias).
    let variant = id.variant().context("the ID store")?;
    let (w, b) = if variant.is_some_and(|v| v.family == crate::model::Family::TorchScript) {
        let prefix = id
            .head
            .as_deref()
            .unwrap_or(crate::model::script::DEFAULT_HEAD);
        crate::model::script::read_head(&file, prefix)?
    } else {
        let sd = crate::model::weights::read_state_dict(&file)?;
        let find = |name: &str| -> Result<Tensor> {
            sd.tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .with_context(|| format!("{}: no tensor '{name}' (the head)", file.display()))
        };
        let (w, b) = match variant {
            Some(v) => v.head_tensor_names(),
            None => ("weight", "bias"),
        };
        (find(w)?, find(b)?)
    };
    let head = Head::new(&w, &b).with_context(|| file.display().to_string())?;
    if head.classes() != id.head_size {
        bail!(
            "{}: a head of {} logits, the stores' has {}",
            file.display(),
            head.classes(),
            id.head_size
        );
    }
    Ok((head, file))
}

fn source_of(path: &Path, m: &Manifest, rows: usize) -> FitSource {
    // Absolute, so that a rerun from another working directory finds the store.
    let store = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    FitSource {
        store: store.display().to_string(),
        head_size: Some(m.head_size),
        crop: Some(m.crop),
        precision: Some(m.precision.clone()),
        fingerprint: m.fingerprint.clone(),
        model: m.model.clone(),
        checkpoint_sha256: m.checkpoint_sha256.clone(),
        dataset: m.dataset.clone(),
        data_fingerprint: m.data_fingerprint.clone(),
        rows,
    }
}

/// The fit saved in the run directory must come from the ID store's model and
/// settings (model, checkpoint, head size, crop, precision): statistics of other
/// features are never reused.
fn check_saved_fit(s: &Fitted, run_dir: &Path, id: &Manifest, id_dir: &Path) -> Result<()> {
    if let Some((what, fit, store)) = s.info.source.model_difference(id) {
        bail!(
            "{}: fitted on {} with {what} {fit}, but the ID store {} has {what} {store}; statistics of other features are not reused: give --fit with a store of this model and settings to fit again, or another --name",
            run_dir.join(FIT_FILE).display(),
            s.info.source.store,
            id_dir.display(),
        );
    }
    Ok(())
}

/// The fit store's `rows` must be enough for every method asked for: at least
/// one; KNN's k at most the bank; ViM's principal dimension (for features
/// `width` wide, when known) below the rows.
fn check_fit_rows(req: &Request, rows: usize, fit: &Path, width: Option<i64>) -> Result<()> {
    if rows == 0 {
        bail!("--fit {}: the store has no images", fit.display());
    }
    if req.methods.contains(&PostHoc::Knn) && req.settings.knn_k as usize > rows {
        bail!(
            "--knn-k {}: larger than the bank: the fit store {} has {rows} images",
            req.settings.knn_k,
            fit.display()
        );
    }
    if req.methods.contains(&PostHoc::NnGuide) && req.settings.nnguide_k as usize > rows {
        bail!(
            "--nnguide-k {}: larger than the guide bank: the fit store {} has {rows} images",
            req.settings.nnguide_k,
            fit.display()
        );
    }
    if let Some(d) = width {
        for (p, flag, dim) in [
            (PostHoc::Vim, "--vim-dim", req.settings.vim_dim_for(d)),
            (
                PostHoc::Residual,
                "--residual-dim",
                req.settings.residual_dim_for(d),
            ),
            (PostHoc::Neco, "--neco-dim", req.settings.neco_dim_for(d)),
        ] {
            if !req.methods.contains(&p) {
                continue;
            }
            let dim = dim?;
            if rows as i64 <= dim {
                bail!(
                    "{} of dimension {dim} ({flag}) needs more fit rows than {dim}, but the fit store {} has {rows} images (fewer leave its subspace undetermined): give a larger --fit store or a smaller {flag}",
                    p.name(),
                    fit.display()
                );
            }
        }
    }
    Ok(())
}

/// The error of methods (`need`, comma-separated) that need a fit and have none.
fn no_fit(need: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "--score {need} needs training statistics: give --fit STORE, a store of in-distribution training images extracted with the same model (mos extract --layers logits,features over a training list)"
    )
}

/// The checks of [`prepare`] that need no store's rows, for a command that is
/// about to extract the ID store described by `id` (its manifest, written into
/// `id_dir`): the settings, and that the methods needing training statistics have
/// them, from `--fit` (a store of the same model and settings, with features) or
/// from the run directory's fit of the same model. `mos benchmark` calls it before
/// any image is forwarded.
pub fn precheck(req: &Request, id: &Manifest, id_dir: &Path) -> Result<()> {
    req.settings.validate()?;
    let need_fit: Vec<&str> = req
        .methods
        .iter()
        .filter(|p| req.settings.needs_fit(**p))
        .map(|p| p.name())
        .collect();
    if need_fit.is_empty() {
        return Ok(());
    }
    match &req.fit {
        Some(p) => {
            let fm = store::read_manifest(p).context("--fit")?;
            check_same_model(id, id_dir, &fm, p)?;
            let rows: usize = store::open(p, false)
                .with_context(|| format!("--fit {}", p.display()))?
                .shards
                .iter()
                .map(|s| s.rows)
                .sum();
            let width = id.feature_dim().ok();
            check_fit_rows(req, rows, p, width)
        }
        None => match read_fit(&req.run_dir)? {
            Some(s) => check_saved_fit(&s, &req.run_dir, id, id_dir),
            None => Err(no_fit(&need_fit.join(","))),
        },
    }
}

/// Prepares the methods of `req` for the ID store `id` (whose features are
/// `dim` wide): reads the head if needed, reuses or fits the training statistics
/// (and saves them), checks every setting against them. Every error comes before
/// any scoring.
pub fn prepare(req: &Request, id: &StoreData, log: &RunLog) -> Result<Prepared> {
    req.settings.validate()?;
    let m = &id.manifest;
    let names = |f: &dyn Fn(PostHoc) -> bool| -> String {
        req.methods
            .iter()
            .filter(|p| f(**p))
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(",")
    };
    let dim = match &id.features {
        Some(f) => f.size()[1],
        None => {
            let need = names(&|p| p.needs_features());
            if !need.is_empty() {
                bail!(
                    "{}: no pre-logit features, which --score {need} needs; extract with --layers logits,features",
                    id.dir.join(MANIFEST).display()
                );
            }
            0
        }
    };
    let has = |p: PostHoc| req.methods.contains(&p);
    let r = Resolved {
        vim_dim: has(PostHoc::Vim)
            .then(|| req.settings.vim_dim_for(dim))
            .transpose()?,
        residual_dim: has(PostHoc::Residual)
            .then(|| req.settings.residual_dim_for(dim))
            .transpose()?,
        neco_dim: has(PostHoc::Neco)
            .then(|| req.settings.neco_dim_for(dim))
            .transpose()?,
        neco_max_logit: has(PostHoc::Neco)
            .then(|| req.settings.neco_max_logit_for(&m.model))
            .transpose()?,
        nnguide_clip: if has(PostHoc::NnGuide) {
            req.settings.nnguide_clip.quantile_for(&m.model)
        } else {
            None
        },
    };
    let vim_dim = r.vim_dim;
    let need_fit = names(&|p| req.settings.needs_fit(p));
    // The head: for the methods that apply it, for fitting ViM's origin, and for
    // NNGuide's logits of clipped features.
    let mut head_path = None;
    let mut head = None;
    let head_users = names(&|p| {
        p.needs_head() || p == PostHoc::Vim || (p == PostHoc::NnGuide && r.nnguide_clip.is_some())
    });
    if !head_users.is_empty() {
        let (h, p) = load_head(req.model_path.as_deref(), m, &id.dir, &head_users)?;
        if h.dim() != dim {
            bail!(
                "{}: the head takes {} features, the store has {dim}",
                p.display(),
                h.dim()
            );
        }
        head = Some(h);
        head_path = Some(p);
    }
    let mut fitted: Option<Fitted> = None;
    if !need_fit.is_empty() {
        let saved = read_fit(&req.run_dir)?;
        let given = match &req.fit {
            Some(p) => {
                let fm = store::read_manifest(p).context("--fit")?;
                check_same_model(m, &id.dir, &fm, p)?;
                Some((p.clone(), fm))
            }
            None => None,
        };
        let mut f = match (saved, &given) {
            (Some(s), Some((_, fm))) if s.info.source.fingerprint == fm.fingerprint => s,
            (Some(s), Some((p, fm))) => {
                log.line(format!(
                    "{} was fitted on {}; fitting again on {}",
                    req.run_dir.join(FIT_FILE).display(),
                    s.info.source.store,
                    p.display()
                ));
                Fitted::empty(source_of(p, fm, 0))
            }
            (Some(s), None) => {
                check_saved_fit(&s, &req.run_dir, m, &id.dir)?;
                s
            }
            (None, Some((p, fm))) => Fitted::empty(source_of(p, fm, 0)),
            (None, None) => return Err(no_fit(&need_fit)),
        };
        let react_ok =
            f.info.react.as_ref().map(|r| r.percentile) == Some(req.settings.react_percentile);
        let vim_ok = f.info.vim.as_ref().map(|v| v.dim) == vim_dim;
        let residual_ok = f.info.residual.as_ref().map(|v| v.dim) == r.residual_dim;
        let neco_ok = f.info.neco.as_ref().map(|v| v.dim) == r.neco_dim;
        let needs_data = req.methods.iter().any(|p| match p {
            PostHoc::React => !react_ok && req.settings.needs_fit(PostHoc::React),
            PostHoc::Dice | PostHoc::Fdbd => f.dice_mean.is_none(),
            PostHoc::Vim => !vim_ok,
            PostHoc::Residual => !residual_ok,
            PostHoc::Neco => !neco_ok,
            PostHoc::Knn | PostHoc::NnGuide => true,
            _ => false,
        });
        let mut banks = Banks::default();
        if needs_data {
            let path = given
                .as_ref()
                .map(|(p, _)| p.clone())
                .unwrap_or_else(|| PathBuf::from(&f.info.source.store));
            let index = store::open(&path, false)
                .with_context(|| format!("the fit store {} (give --fit)", path.display()))?;
            if index.manifest.fingerprint != f.info.source.fingerprint {
                bail!(
                    "{}: the fit store changed since {} was fitted on it (fingerprint {}, recorded {}); give --fit again",
                    path.join(MANIFEST).display(),
                    req.run_dir.join(FIT_FILE).display(),
                    index.manifest.fingerprint,
                    f.info.source.fingerprint
                );
            }
            check_same_model(m, &id.dir, &index.manifest, &path)?;
            let rows: usize = index.shards.iter().map(|s| s.rows).sum();
            check_fit_rows(req, rows, &path, Some(dim))?;
            f.info.source = source_of(&path, &index.manifest, rows);
            log.line(format!(
                "reading the fit store {} ({rows} images)",
                path.display()
            ));
            let data = store::load(&path).with_context(|| format!("--fit {}", path.display()))?;
            let feats = data.features.as_ref().with_context(|| {
                format!("{}: no pre-logit features", path.join(MANIFEST).display())
            })?;
            let feats = feats.to_device(req.device);
            for p in &req.methods {
                match p {
                    PostHoc::React if !react_ok && req.settings.needs_fit(PostHoc::React) => {
                        let t = ph::percentile(&feats, req.settings.react_percentile)?;
                        f.react_threshold = Some(t);
                        f.info.react = Some(ReactFit {
                            percentile: req.settings.react_percentile,
                            threshold: t,
                        });
                        log.line(format!(
                            "ReAct: the {}th percentile of the training activations is {t}",
                            req.settings.react_percentile
                        ));
                    }
                    PostHoc::Dice | PostHoc::Fdbd if f.dice_mean.is_none() => {
                        f.dice_mean = Some(ph::feature_mean(&feats)?.to_device(Device::Cpu));
                        f.info.dice_mean = true;
                    }
                    PostHoc::Residual if !residual_ok => {
                        let d = r.residual_dim.context("Residual dimension")?;
                        let h = head.as_ref().context("Residual needs the head")?;
                        let (u, ns) = lb::residual_fit(&feats, &h.to(Kind::Double, req.device), d)?;
                        log.line(format!("Residual: dimension {d}"));
                        f.info.residual = Some(DimFit { dim: d });
                        f.residual = Some((u.to_device(Device::Cpu), ns.to_device(Device::Cpu)));
                    }
                    PostHoc::Neco if !neco_ok => {
                        let d = r.neco_dim.context("NECO dimension")?;
                        let n = lb::neco_fit(&feats, d)?;
                        log.line(format!("NECO: dimension {d}"));
                        f.info.neco = Some(DimFit { dim: d });
                        f.neco = Some(NecoParams {
                            mean: n.mean.to_device(Device::Cpu),
                            std: n.std.to_device(Device::Cpu),
                            pca_mean: n.pca_mean.to_device(Device::Cpu),
                            components: n.components.to_device(Device::Cpu),
                        });
                    }
                    PostHoc::NnGuide => {
                        let clip = match r.nnguide_clip {
                            Some(q) => {
                                let t = ph::percentile(&feats, 100.0 * q)?;
                                log.line(format!(
                                    "NNGuide: clipping at the {q} quantile of the guide bank's features, {t}"
                                ));
                                Some(t)
                            }
                            None => None,
                        };
                        let h32 = head.as_ref().map(|h| h.to(Kind::Float, req.device));
                        let bank = lb::nnguide_bank(
                            &feats,
                            &data.logits.to_device(req.device),
                            h32.as_ref(),
                            clip,
                        )?;
                        banks.nnguide = Some((bank, clip));
                    }
                    PostHoc::Vim if !vim_ok => {
                        let d = vim_dim.context("ViM dimension")?;
                        let h = head.as_ref().context("ViM needs the head")?;
                        let params = ph::vim_fit(
                            &feats,
                            &data.logits.to_device(req.device),
                            &h.to(Kind::Double, req.device),
                            d,
                        )?;
                        log.line(format!("ViM: dimension {d}, alpha {}", params.alpha));
                        f.info.vim = Some(VimFit {
                            dim: d,
                            alpha: params.alpha,
                        });
                        f.vim = Some(VimParams {
                            u: params.u.to_device(Device::Cpu),
                            ns: params.ns.to_device(Device::Cpu),
                            alpha: params.alpha,
                        });
                    }
                    PostHoc::Knn => banks.knn = Some(ph::l2_normalise(&feats)),
                    _ => {}
                }
            }
            write_fit(&req.run_dir, &f)?;
            log.line(format!(
                "training statistics saved in {}",
                req.run_dir.join(FIT_FILE).display()
            ));
        } else {
            log.line(format!(
                "reusing the training statistics of {} (fitted on {})",
                req.run_dir.join(FIT_FILE).display(),
                f.info.source.store
            ));
        }
        let threshold = banks.nnguide.as_ref().and_then(|(_, t)| *t);
        let mut scorers = Vec::new();
        for p in &req.methods {
            scorers.push((*p, make_scorer(*p, req, &r, head.as_ref(), &f, &mut banks)?));
        }
        fitted = Some(f);
        return Ok(Prepared {
            scorers,
            settings: settings_json(req, &r, threshold, head_path.as_deref(), fitted.as_ref()),
            device: req.device,
        });
    }
    let mut none = Banks::default();
    let empty = Fitted::empty(source_of(Path::new(""), m, 0));
    let mut scorers = Vec::new();
    for p in &req.methods {
        scorers.push((
            *p,
            make_scorer(*p, req, &r, head.as_ref(), &empty, &mut none)?,
        ));
    }
    Ok(Prepared {
        scorers,
        settings: settings_json(req, &r, None, head_path.as_deref(), fitted.as_ref()),
        device: req.device,
    })
}

/// The settings as they apply to the stores at hand (defaults resolved by the
/// features' width and the stores' model).
struct Resolved {
    vim_dim: Option<i64>,
    residual_dim: Option<i64>,
    neco_dim: Option<i64>,
    neco_max_logit: Option<bool>,
    /// NNGuide's clipping quantile, if it clips.
    nnguide_clip: Option<f64>,
}

fn make_scorer(
    p: PostHoc,
    req: &Request,
    r: &Resolved,
    head: Option<&Head>,
    f: &Fitted,
    banks: &mut Banks,
) -> Result<Scorer> {
    let dev = req.device;
    let head32 = || -> Result<Head> {
        Ok(head
            .context("internal: the head was not read")?
            .to(Kind::Float, dev))
    };
    let s = &req.settings;
    Ok(match p {
        PostHoc::MaxLogit => Scorer::MaxLogit,
        PostHoc::GradNorm => Scorer::GradNorm,
        PostHoc::React => Scorer::React {
            head: head32()?,
            threshold: s
                .react_threshold
                .or(f.react_threshold)
                .context("internal: no ReAct threshold")?,
        },
        PostHoc::Knn => Scorer::Knn {
            bank: banks.knn.take().context("internal: no KNN bank")?,
            k: s.knn_k,
        },
        PostHoc::Vim => {
            let v = f.vim.as_ref().context("internal: no ViM fit")?;
            Scorer::Vim(VimParams {
                u: v.u.to_device(dev),
                ns: v.ns.to_device(dev),
                alpha: v.alpha,
            })
        }
        PostHoc::AshP | PostHoc::AshB | PostHoc::AshS => Scorer::Ash {
            head: head32()?,
            variant: match p {
                PostHoc::AshP => Ash::P,
                PostHoc::AshB => Ash::B,
                _ => Ash::S,
            },
            percentile: s.ash_percentile,
        },
        PostHoc::Dice => {
            let h = head32()?;
            let mean = f.dice_mean.as_ref().context("internal: no DICE mean")?;
            let mask = ph::dice_mask(&h, &mean.to_device(dev), s.dice_percentile)?;
            Scorer::Dice { head: h, mask }
        }
        PostHoc::Scale => Scorer::Scale {
            head: head32()?,
            percentile: s.scale_percentile,
        },
        PostHoc::NnGuide => {
            let (bank, threshold) = banks.nnguide.take().context("internal: no NNGuide bank")?;
            let clip = match threshold {
                Some(t) => Some((head32()?, t)),
                None => None,
            };
            Scorer::NnGuide {
                bank,
                k: s.nnguide_k,
                clip,
            }
        }
        PostHoc::Fdbd => {
            let h = head.context("internal: the head was not read")?;
            let mean = f.dice_mean.as_ref().context("internal: no fDBD mean")?;
            Scorer::Fdbd {
                mean: mean.to_device(dev),
                den: lb::fdbd_denominators(&h.to(Kind::Double, dev)),
            }
        }
        PostHoc::Gen => Scorer::Gen {
            gamma: s.gen_gamma,
            m: s.gen_m,
        },
        PostHoc::Residual => {
            let (u, ns) = f.residual.as_ref().context("internal: no Residual fit")?;
            Scorer::Residual {
                u: u.to_device(dev),
                ns: ns.to_device(dev),
            }
        }
        PostHoc::Neco => {
            let n = f.neco.as_ref().context("internal: no NECO fit")?;
            Scorer::Neco {
                params: NecoParams {
                    mean: n.mean.to_device(dev),
                    std: n.std.to_device(dev),
                    pca_mean: n.pca_mean.to_device(dev),
                    components: n.components.to_device(dev),
                },
                max_logit: r.neco_max_logit.context("internal: NECO's max logit")?,
            }
        }
        PostHoc::Entropy => Scorer::Entropy,
        PostHoc::RankFeat => Scorer::RankFeat,
    })
}

fn settings_json(
    req: &Request,
    r: &Resolved,
    nnguide_threshold: Option<f64>,
    head: Option<&Path>,
    fitted: Option<&Fitted>,
) -> serde_json::Value {
    let mut v = serde_json::json!({});
    let s = &req.settings;
    for p in &req.methods {
        match p {
            PostHoc::React => match s.react_threshold {
                Some(t) => v["react_threshold"] = t.into(),
                None => v["react_percentile"] = s.react_percentile.into(),
            },
            PostHoc::Knn => v["knn_k"] = s.knn_k.into(),
            PostHoc::Vim => v["vim_dim"] = r.vim_dim.into(),
            PostHoc::AshP | PostHoc::AshB | PostHoc::AshS => {
                v["ash_percentile"] = s.ash_percentile.into()
            }
            PostHoc::Dice => v["dice_percentile"] = s.dice_percentile.into(),
            PostHoc::Scale => v["scale_percentile"] = s.scale_percentile.into(),
            PostHoc::NnGuide => {
                v["nnguide_k"] = s.nnguide_k.into();
                v["nnguide_clip_quantile"] = r.nnguide_clip.into();
                v["nnguide_clip_threshold"] = nnguide_threshold.into();
            }
            PostHoc::Gen => {
                v["gen_gamma"] = s.gen_gamma.into();
                v["gen_m"] = s.gen_m.into();
            }
            PostHoc::Residual => v["residual_dim"] = r.residual_dim.into(),
            PostHoc::Neco => {
                v["neco_dim"] = r.neco_dim.into();
                v["neco_max_logit"] = r.neco_max_logit.into();
            }
            _ => {}
        }
    }
    if let Some(h) = head {
        v["head_checkpoint"] = h.display().to_string().into();
    }
    if let Some(f) = fitted {
        v["fit_store"] = f.info.source.store.clone().into();
        v["fit_fingerprint"] = f.info.source.fingerprint.clone().into();
        v["fit_rows"] = f.info.source.rows.into();
        if let Some(r) = &f.info.react {
            if req.methods.contains(&PostHoc::React) && s.react_threshold.is_none() {
                v["react_threshold"] = r.threshold.into();
            }
        }
        if let Some(vf) = &f.info.vim {
            if req.methods.contains(&PostHoc::Vim) {
                v["vim_alpha"] = vf.alpha.into();
            }
        }
    }
    v["device"] = format!("{:?}", req.device).into();
    v
}

impl Scorer {
    /// Scores a batch: logits [N, C] and features [N, D] on any device -> [N] there.
    pub fn score(&self, logits: &Tensor, features: Option<&Tensor>) -> Result<Tensor> {
        let feats = || features.context("internal: no features");
        Ok(match self {
            Scorer::MaxLogit => ph::max_logit(logits)?,
            Scorer::GradNorm => ph::gradnorm(logits, feats()?)?,
            Scorer::React { head, threshold } => ph::react(feats()?, head, *threshold)?,
            Scorer::Knn { bank, k } => {
                ph::knn(&ph::l2_normalise(feats()?), bank, *k, KnnBlocks::default())?
            }
            Scorer::Vim(p) => ph::vim(feats()?, logits, p)?,
            Scorer::Ash {
                head,
                variant,
                percentile,
            } => ph::ash(feats()?, head, *variant, *percentile)?,
            Scorer::Dice { head, mask } => ph::dice(feats()?, head, mask)?,
            Scorer::Scale { head, percentile } => lb::scale(feats()?, head, *percentile)?,
            Scorer::NnGuide { bank, k, clip } => lb::nnguide(
                feats()?,
                logits,
                clip.as_ref().map(|(h, _)| h),
                clip.as_ref().map(|(_, t)| *t),
                bank,
                *k,
            )?,
            Scorer::Fdbd { mean, den } => lb::fdbd(logits, feats()?, mean, den)?,
            Scorer::Gen { gamma, m } => lb::gen(logits, *gamma, *m)?,
            Scorer::Residual { u, ns } => lb::residual(feats()?, u, ns)?,
            Scorer::Neco { params, max_logit } => lb::neco(feats()?, logits, params, *max_logit)?,
            Scorer::Entropy => lb::entropy(logits)?,
            Scorer::RankFeat => {
                crate::ood::check_matrix(logits, "RankFeat logits")?;
                logits.logsumexp(1, false)
            }
        })
    }
}

impl Prepared {
    /// The scorer of `p`.
    pub fn scorer(&self, p: PostHoc) -> Result<&Scorer> {
        self.scorers
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, s)| s)
            .with_context(|| format!("internal: {} was not prepared", p.name()))
    }

    /// Scores every row of a store with `p`, in chunks of rows on the device.
    pub fn score_rows(
        &self,
        p: PostHoc,
        logits: &Tensor,
        features: Option<&Tensor>,
    ) -> Result<Vec<f64>> {
        let scorer = self.scorer(p)?;
        let n = logits.size()[0];
        let mut out = Vec::with_capacity(n as usize);
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let l = logits.narrow(0, start, len).to_device(self.device);
            let f = features.map(|f| f.narrow(0, start, len).to_device(self.device));
            let s = scorer
                .score(&l, f.as_ref())
                .with_context(|| format!("scoring {}", p.name()))?;
            out.extend(crate::pipeline::vocab::to_f64_vec(&s)?);
            start += len;
        }
        Ok(out)
    }
}
