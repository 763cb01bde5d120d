//! Reading weights into a [`ResNetV2`]: Google BiT `.npz`, the paper code's
//! `torch.save` checkpoints (`.pth.tar`) and our safetensors checkpoints. Format
//! quirks (BiT names, HWIO kernels, `module.` prefixes) live only here. Loading is
//! strict: a missing tensor, an unexpected one or a shape mismatch is an error that
//! names the tensor, the file and both shapes.
use std::fmt;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn, Kind, Tensor};

use super::bit::ResNetV2;
use super::checkpoint::{self, CheckpointMeta};
use super::network::Network;
use super::resnet::{is_bookkeeping, TorchvisionResNet};
use super::variant::{Family, Variant, VARIANTS};
use super::vit::{torchvision_key, TorchvisionViT};
use crate::weights::npz;
use crate::weights::pickle::{self, PyValue};
use crate::weights::raw::{DType, RawTensor};

/// Named tensors, in file order.
pub type Named = Vec<(String, Tensor)>;

/// The weight-file formats mos reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Ours (or any safetensors file with the paper's tensor names).
    Safetensors,
    /// Google BiT release `.npz`.
    BitNpz,
    /// The paper code's `torch.save` zip (`.pth.tar`).
    TorchZip,
    /// `torch.save`'s legacy format (torch < 1.6, e.g. torchvision's 2017 ResNet weights).
    TorchLegacy,
    /// A TorchScript module (`torch.jit.save`), read by libtorch for `--model torchscript`.
    TorchScript,
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Safetensors => "safetensors",
            Self::BitNpz => "BiT .npz",
            Self::TorchZip => "torch.save zip (.pth.tar)",
            Self::TorchLegacy => "torch.save legacy format (torch < 1.6)",
            Self::TorchScript => "TorchScript module (torch.jit.save)",
        })
    }
}

/// Tensors read from a weight file, renamed to our (paper state-dict) names.
#[derive(Debug)]
pub struct StateDict {
    pub format: WeightFormat,
    pub tensors: Vec<(String, Tensor)>,
    /// Our metadata, when the file is our checkpoint.
    pub meta: Option<CheckpointMeta>,
    /// SGD momentum buffers by parameter name (our checkpoints only).
    pub momentum: Vec<(String, Tensor)>,
    /// The step recorded in the file (ours or the paper's), if any.
    pub step: Option<i64>,
}

impl StateDict {
    /// The classes per group our checkpoint records (a group-softmax model); None
    /// for a flat model and for files that record none (the paper's `.pth.tar`).
    pub fn group_config(&self) -> Option<&[i64]> {
        self.meta.as_ref()?.group_config.as_deref()
    }

    /// The head size implied by `head.conv.bias`, if present as a vector.
    pub fn head_size(&self) -> Option<i64> {
        self.head_size_named("head.conv.bias")
    }

    /// The head size implied by the bias `name` (a vector), if present.
    pub fn head_size_named(&self, name: &str) -> Option<i64> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, t)| match t.size()[..] {
                [n] => Some(n),
                _ => None,
            })
    }
}

/// Tells the format from the file's first bytes (and, for zips, its member names).
pub fn detect_format(path: &Path) -> Result<WeightFormat> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = Vec::with_capacity(32);
    f.take(32)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let n = head.len();
    if n >= 4 && &head[..4] == b"PK\x03\x04" {
        let names = zip_member_names(path)?;
        // torch.jit.save's archive: data.pkl too, plus the module's code and constants.
        if names
            .iter()
            .any(|m| m.ends_with("constants.pkl") || m.contains("/code/"))
        {
            return Ok(WeightFormat::TorchScript);
        }
        if names.iter().any(|m| m.ends_with("data.pkl")) {
            return Ok(WeightFormat::TorchZip);
        }
        if names.iter().any(|m| m.ends_with(".npy")) {
            return Ok(WeightFormat::BitNpz);
        }
        bail!(
            "{}: a zip file that is neither an .npz (no .npy members) nor a torch.save checkpoint (no data.pkl)",
            path.display()
        );
    }
    if n >= 9 && head[8] == b'{' {
        return Ok(WeightFormat::Safetensors);
    }
    if pickle::is_legacy_torch(&head) {
        return Ok(WeightFormat::TorchLegacy);
    }
    if n >= 2 && head[0] == 0x80 {
        // Another raw pickle: the torch reader explains what it is not.
        return Ok(WeightFormat::TorchZip);
    }
    bail!(
        "{}: unknown weight format (expected a BiT .npz, a torch.save .pth.tar or a safetensors checkpoint)",
        path.display()
    )
}

fn zip_member_names(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let z =
        zip::ZipArchive::new(f).with_context(|| format!("{}: damaged zip file", path.display()))?;
    Ok(z.file_names().map(str::to_string).collect())
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

/// A CPU tensor with the raw tensor's dtype, shape and values.
pub fn raw_to_tensor(raw: &RawTensor) -> Result<Tensor> {
    let shape: Vec<i64> = raw.shape.iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(
        &raw.data,
        &shape,
        kind_of(raw.dtype),
    )?)
}

/// Our name -> the Google BiT `.npz` key (docs/model.md#weight-files), `None` for names BiT lacks.
pub fn bit_npz_key(ours: &str) -> Option<String> {
    let p: Vec<&str> = ours.split('.').collect();
    let gn = |k: &str| match k {
        "weight" => Some("gamma"),
        "bias" => Some("beta"),
        _ => None,
    };
    match p.as_slice() {
        ["root", "conv", "weight"] => Some("resnet/root_block/standardized_conv2d/kernel".into()),
        ["before_head", "gn", k] => Some(format!("resnet/group_norm/{}", gn(k)?)),
        ["head", "conv", "weight"] => Some("resnet/head/conv2d/kernel".into()),
        ["head", "conv", "bias"] => Some("resnet/head/conv2d/bias".into()),
        ["body", block, unit, "downsample", "weight"] => Some(format!(
            "resnet/{block}/{unit}/a/proj/standardized_conv2d/kernel"
        )),
        ["body", block, unit, layer, kind] => {
            let sub = match layer.chars().last()? {
                '1' => "a",
                '2' => "b",
                '3' => "c",
                _ => return None,
            };
            if layer.starts_with("conv") && *kind == "weight" {
                Some(format!(
                    "resnet/{block}/{unit}/{sub}/standardized_conv2d/kernel"
                ))
            } else if layer.starts_with("gn") {
                Some(format!(
                    "resnet/{block}/{unit}/{sub}/group_norm/{}",
                    gn(kind)?
                ))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The Google BiT `.npz` key -> our name (inverse of [`bit_npz_key`]).
pub fn ours_from_bit_key(key: &str) -> Option<String> {
    let p: Vec<&str> = key.strip_prefix("resnet/")?.split('/').collect();
    let gn = |k: &str| match k {
        "gamma" => Some("weight"),
        "beta" => Some("bias"),
        _ => None,
    };
    let layer = |sub: &str| match sub {
        "a" => Some('1'),
        "b" => Some('2'),
        "c" => Some('3'),
        _ => None,
    };
    let unit_ok = |u: &str| u.starts_with("unit") && u.len() > 4;
    let block_ok = |b: &str| b.starts_with("block");
    match p.as_slice() {
        ["root_block", "standardized_conv2d", "kernel"] => Some("root.conv.weight".into()),
        ["group_norm", k] => Some(format!("before_head.gn.{}", gn(k)?)),
        ["head", "conv2d", "kernel"] => Some("head.conv.weight".into()),
        ["head", "conv2d", "bias"] => Some("head.conv.bias".into()),
        [b, u, "a", "proj", "standardized_conv2d", "kernel"] if block_ok(b) && unit_ok(u) => {
            Some(format!("body.{b}.{u}.downsample.weight"))
        }
        [b, u, sub, "standardized_conv2d", "kernel"] if block_ok(b) && unit_ok(u) => {
            Some(format!("body.{b}.{u}.conv{}.weight", layer(sub)?))
        }
        [b, u, sub, "group_norm", k] if block_ok(b) && unit_ok(u) => {
            Some(format!("body.{b}.{u}.gn{}.{}", layer(sub)?, gn(k)?))
        }
        _ => None,
    }
}

/// Reads a BiT `.npz`, renaming to our names and converting HWIO kernels to OIHW
/// (axes 3, 2, 0, 1). Unknown keys keep their BiT names, so that strict loading
/// reports them as unexpected.
fn read_bit_npz(path: &Path) -> Result<Named> {
    let mut out = Vec::new();
    for (key, raw) in npz::read_npz(path)? {
        let t = raw_to_tensor(&raw).with_context(|| format!("{}: array {key}", path.display()))?;
        match ours_from_bit_key(&key) {
            Some(name) => {
                let t = if t.dim() == 4 {
                    t.permute([3, 2, 0, 1]).contiguous()
                } else {
                    t
                };
                out.push((name, t));
            }
            None => out.push((key, t)),
        }
    }
    Ok(out)
}

fn dict_get<'a>(v: &'a PyValue, key: &str) -> Option<&'a PyValue> {
    match v {
        PyValue::Dict(items) => items
            .iter()
            .find(|(k, _)| matches!(k, PyValue::Str(s) if s == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// Reads the paper code's checkpoint: the `model` entry of the saved dict (or the
/// dict itself when it is a bare state dict), `module.` prefixes stripped.
fn read_torch(path: &Path) -> Result<(Named, Option<i64>)> {
    let root = pickle::read_torch_checkpoint(path)?;
    let step = match dict_get(&root, "step") {
        Some(PyValue::Int(s)) => Some(*s),
        _ => None,
    };
    let sd = dict_get(&root, "model")
        .or_else(|| dict_get(&root, "state_dict"))
        .unwrap_or(&root);
    let PyValue::Dict(items) = sd else {
        bail!(
            "{}: the checkpoint holds no state dict (expected a dict with a 'model' entry)",
            path.display()
        );
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let PyValue::Str(name) = k else {
            bail!("{}: a state-dict key is not a string", path.display());
        };
        let PyValue::Tensor(raw) = v else {
            bail!(
                "{}: state-dict entry '{name}' is not a tensor",
                path.display()
            );
        };
        let name = name.strip_prefix("module.").unwrap_or(name).to_string();
        let t = raw_to_tensor(raw).with_context(|| format!("{}: tensor {name}", path.display()))?;
        out.push((name, t));
    }
    Ok((out, step))
}

/// Reads any supported weight file, tensors renamed to our names.
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    let format = detect_format(path)?;
    let (tensors, meta, momentum, step) = match format {
        WeightFormat::BitNpz => (read_bit_npz(path)?, None, Vec::new(), None),
        WeightFormat::TorchZip | WeightFormat::TorchLegacy => {
            let (t, step) = read_torch(path)?;
            (t, None, Vec::new(), step)
        }
        WeightFormat::Safetensors => {
            let c = checkpoint::load(path)?;
            let step = c.meta.as_ref().map(|m| m.step);
            (c.model, c.meta, c.momentum, step)
        }
        WeightFormat::TorchScript => bail!(
            "{}: a TorchScript module (torch.jit.save), not a state dict: give --model torchscript (docs/model.md#torchscript-modules)",
            path.display()
        ),
    };
    Ok(StateDict {
        format,
        tensors,
        meta,
        momentum,
        step,
    })
}

/// Copies `tensors` into the variables of `vs`, strictly: every variable not
/// matched by `skip` must be present with the same shape, and nothing else may be.
/// Tensors named by `skip` are ignored in the file and left untouched in `vs`.
pub fn load_strict(
    vs: &nn::VarStore,
    tensors: &[(String, Tensor)],
    source: &Path,
    model: &str,
    skip: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let mut vars = vs.variables();
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, t) in tensors {
        if skip(name) {
            continue;
        }
        seen.insert(name.as_str());
        match vars.get_mut(name) {
            None => problems.push(format!(
                "unexpected tensor '{name}' {:?} (not in model {model})",
                t.size()
            )),
            Some(var) if var.size() != t.size() => problems.push(format!(
                "tensor '{name}' has shape {:?} but model {model} expects {:?}",
                t.size(),
                var.size()
            )),
            Some(var) => {
                tch::no_grad(|| var.f_copy_(&t.to_kind(var.kind())))
                    .with_context(|| format!("{}: copying {name}", source.display()))?;
            }
        }
    }
    let mut missing: Vec<_> = vars
        .iter()
        .filter(|(n, _)| !skip(n) && !seen.contains(n.as_str()))
        .map(|(n, v)| {
            format!(
                "missing tensor '{n}' (model {model} expects shape {:?})",
                v.size()
            )
        })
        .collect();
    missing.sort();
    problems.extend(missing);
    if problems.is_empty() {
        return Ok(());
    }
    let shown = problems.len().min(8);
    let more = if problems.len() > shown {
        format!("\n  ... and {} more", problems.len() - shown)
    } else {
        String::new()
    };
    bail!(
        "{}: weights do not fit model {model}:\n  {}{more}",
        source.display(),
        problems[..shown].join("\n  ")
    )
}

/// The variants whose architecture fits the tensors (by root width and units per
/// block); BiT-S and BiT-M twins both fit.
pub fn matching_variants(tensors: &[(String, Tensor)]) -> Vec<Variant> {
    let Some(base) = tensors
        .iter()
        .find(|(n, _)| n == "root.conv.weight")
        .and_then(|(_, t)| t.size().first().copied())
    else {
        return Vec::new();
    };
    let units: Vec<usize> = (1..=4)
        .map(|b| {
            let prefix = format!("body.block{b}.");
            tensors
                .iter()
                .filter(|(n, _)| n.starts_with(&prefix) && n.ends_with(".conv1.weight"))
                .count()
        })
        .collect();
    VARIANTS
        .iter()
        .filter(|v| v.base == base && v.units[..] == units[..])
        .copied()
        .collect()
}

/// Picks the variant for a weight file: `requested` if given; else the one the
/// tensors fit, disambiguated by our metadata or the file name.
pub fn resolve_variant(sd: &StateDict, path: &Path, requested: Option<Variant>) -> Result<Variant> {
    if let Some(v) = requested {
        return Ok(v);
    }
    if let Some(meta) = &sd.meta {
        if let Ok(v) = meta.model.parse::<Variant>() {
            return Ok(v);
        }
    }
    let fits = matching_variants(&sd.tensors);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match fits.as_slice() {
        [] => bail!(
            "{}: the tensors fit no known architecture; pass --model (known: {})",
            path.display(),
            Variant::all_names()
        ),
        [one] => Ok(*one),
        many => many
            .iter()
            .find(|v| stem.starts_with(&v.name.to_ascii_lowercase()))
            .copied()
            .ok_or_else(|| {
                let names: Vec<_> = many.iter().map(|v| v.name).collect();
                anyhow::anyhow!(
                    "{}: the tensors fit {}; pass --model to choose",
                    path.display(),
                    names.join(" and ")
                )
            }),
    }
}

/// [`load_model`]'s error when the checkpoint's head has another size than the
/// caller needs: the one failure a command can explain by the kind of model it
/// needs (see [`with_head_hint`]).
#[derive(Debug, thiserror::Error)]
#[error("{}: the checkpoint's head has {found} outputs but {wanted} are needed here", path.display())]
pub struct HeadMismatch {
    pub path: std::path::PathBuf,
    pub found: i64,
    pub wanted: i64,
}

/// Adds `hint` (which model the command needs) to an error of [`load_model`] when,
/// and only when, the cause is a head of the wrong size; any other error (a
/// missing or unreadable file, another architecture) is returned as it is, so the
/// message leads with its cause.
pub fn with_head_hint(e: anyhow::Error, hint: impl FnOnce() -> String) -> anyhow::Error {
    if e.downcast_ref::<HeadMismatch>().is_some() {
        anyhow::anyhow!("{e}; {}", hint())
    } else {
        e
    }
}

/// A model with its weights loaded from a file.
pub struct LoadedModel {
    pub vs: nn::VarStore,
    pub model: Network,
    pub state: StateDict,
}

/// Checkpoint file names looked for when a run directory is given as the model.
pub const RUN_DIR_CHECKPOINTS: [&str; 2] = ["checkpoint.safetensors", "bit.pth.tar"];

/// A weight file, or the checkpoint inside a run directory (ours,
/// `checkpoint.safetensors`, or the paper code's `bit.pth.tar`).
pub fn resolve_weight_path(path: &Path) -> Result<std::path::PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    RUN_DIR_CHECKPOINTS
        .iter()
        .map(|name| path.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{} is a directory without a checkpoint (looked for {})",
                path.display(),
                RUN_DIR_CHECKPOINTS.join(", ")
            )
        })
}

/// What loading a TorchScript module needs: the prefix of its head's parameters
/// (`--head`) and the side of the probe batch its contract is checked on (`--crop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptSpec {
    pub head: String,
    pub crop: usize,
}

/// [`load_model`] for any `--model`: a TorchScript module (`variant` torchscript,
/// with its `script` spec) is loaded by libtorch and checked against the contract
/// ([`super::script`]); the others as [`load_model`] loads them.
pub fn load_network(
    path: &Path,
    variant: Variant,
    script: Option<&ScriptSpec>,
    expected_head: Option<i64>,
    device: tch::Device,
) -> Result<LoadedModel> {
    if variant.family != Family::TorchScript {
        return load_model(path, Some(variant), expected_head, device);
    }
    let spec = script.context("internal: a TorchScript module without its --head and --crop")?;
    let file = resolve_weight_path(path)?;
    let net = super::script::ScriptNet::load(&file, &spec.head, spec.crop, device)?;
    if let Some(want) = expected_head {
        if want != net.head_size {
            return Err(HeadMismatch {
                path: file.clone(),
                found: net.head_size,
                wanted: want,
            }
            .into());
        }
    }
    Ok(LoadedModel {
        vs: nn::VarStore::new(device),
        model: Network::TorchScript(net),
        state: StateDict {
            format: WeightFormat::TorchScript,
            tensors: Vec::new(),
            meta: None,
            momentum: Vec::new(),
            step: None,
        },
    })
}

/// Builds `variant` on `device` and loads `path` (a file or a run directory) into
/// it strictly; the head size comes from the file's `head.conv.bias`, and must
/// equal `expected_head` if given.
pub fn load_model(
    path: &Path,
    variant: Option<Variant>,
    expected_head: Option<i64>,
    device: tch::Device,
) -> Result<LoadedModel> {
    if variant.is_some_and(|v| v.family == Family::TorchScript) {
        bail!(
            "--model torchscript: this command does not run TorchScript modules (mos extract, test-mos, test-baseline and benchmark do)"
        );
    }
    let file = resolve_weight_path(path)?;
    let path = file.as_path();
    let state = read_state_dict(path)?;
    let variant = resolve_variant(&state, path, variant)?;
    let bias = variant.head_tensor_names().1;
    let head = state
        .head_size_named(bias)
        .filter(|&h| h > 0)
        .with_context(|| {
            format!(
                "{}: no {bias} vector with at least one entry, so no head size (--model {} reads {} weights)",
                path.display(),
                variant.name,
                if variant.is_torchvision() {
                    "torchvision"
                } else {
                    "BiT"
                }
            )
        })?;
    if let Some(want) = expected_head {
        if want != head {
            return Err(HeadMismatch {
                path: path.to_path_buf(),
                found: head,
                wanted: want,
            }
            .into());
        }
    }
    let vs = nn::VarStore::new(device);
    let model = match (variant.torchvision_resnet(), variant.torchvision_vit()) {
        (Some(arch), _) => {
            Network::TorchvisionResNet(TorchvisionResNet::new(&vs.root(), arch, head))
        }
        (_, Some(arch)) => Network::TorchvisionViT(TorchvisionViT::new(&vs.root(), arch, head)),
        _ => Network::Bit(ResNetV2::new(&vs.root(), variant, head)),
    };
    load_family(&vs, &state.tensors, path, variant, &|_| false)?;
    Ok(LoadedModel { vs, model, state })
}

/// [`load_strict`] of a state dict of `variant`'s family: a ViT's keys renamed as
/// torchvision renames those of files its older versions wrote, torchvision's
/// BatchNorm counters (training bookkeeping, no variables) ignored, and the
/// tensors `skip` names left out (a head being replaced).
pub fn load_family(
    vs: &nn::VarStore,
    tensors: &[(String, Tensor)],
    path: &Path,
    variant: Variant,
    skip: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let renamed: Vec<(String, Tensor)>;
    let tensors = if variant.family == Family::TorchvisionViT {
        renamed = tensors
            .iter()
            .map(|(n, t)| (torchvision_key(n).into_owned(), t.shallow_clone()))
            .collect();
        &renamed
    } else {
        tensors
    };
    let torchvision = variant.is_torchvision();
    load_strict(vs, tensors, path, variant.name, &|n| {
        (torchvision && is_bookkeeping(n)) || skip(n)
    })
}
