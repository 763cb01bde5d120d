//! Our checkpoint format: a safetensors file with the model's tensors (paper
//! state-dict names, no `module.`), the SGD momentum buffers for resuming
//! (`optim.momentum_buffer.<name>`), and JSON metadata under the key `mos`
//! (model, head size, group config, step, the run's config). Written atomically.
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Prefix of the momentum buffers' tensor names.
pub const MOMENTUM_PREFIX: &str = "optim.momentum_buffer.";
/// Metadata key holding [`CheckpointMeta`] as JSON.
const META_KEY: &str = "mos";
/// Value of the `format` metadata key.
const FORMAT: &str = "mos-checkpoint-v1";

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// `--model` name (e.g. `BiT-S-R101x1`).
    pub model: String,
    /// Logits of the head.
    pub head_size: i64,
    /// Classes per group for a group-softmax head; `None` for a flat head.
    pub group_config: Option<Vec<i64>>,
    /// Optimizer steps taken.
    pub step: i64,
    /// The run's configuration, free-form.
    #[serde(default)]
    pub config: serde_json::Value,
}

/// A checkpoint in memory.
#[derive(Debug)]
pub struct Checkpoint {
    /// `None` for a foreign safetensors file without our metadata.
    pub meta: Option<CheckpointMeta>,
    pub model: Vec<(String, Tensor)>,
    /// Momentum buffers by parameter name.
    pub momentum: Vec<(String, Tensor)>,
}

struct CpuTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &CpuTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn kind_to_dtype(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        k => bail!("cannot store tensors of kind {}", kind_name(k)),
    })
}

/// A tensor's shape as `[2, 3]` (`[]` for a scalar), for messages.
pub fn shape(t: &Tensor) -> String {
    let dims: Vec<String> = t.size().iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// A tensor kind as PyTorch names its dtype (`float32`, `int64`, ...).
pub fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "float32".into(),
        Kind::Double => "float64".into(),
        Kind::Half => "float16".into(),
        Kind::BFloat16 => "bfloat16".into(),
        Kind::Int64 => "int64".into(),
        Kind::Int => "int32".into(),
        Kind::Int16 => "int16".into(),
        Kind::Int8 => "int8".into(),
        Kind::Uint8 => "uint8".into(),
        Kind::Bool => "bool".into(),
        // The remaining kinds (complex, quantized, float8) by their tch names.
        k => format!("{k:?}"),
    }
}

fn dtype_to_kind(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        d => bail!("unsupported safetensors dtype {}", dtype_name(d)),
    })
}

fn to_cpu_bytes(t: &Tensor) -> Result<CpuTensor> {
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let dtype = kind_to_dtype(t.kind())?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let nbytes = t.numel() * t.kind().elt_size_in_bytes();
    let mut bytes = vec![0u8; nbytes];
    t.f_copy_data_u8(&mut bytes, t.numel())?;
    Ok(CpuTensor {
        dtype,
        shape,
        bytes,
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory,
/// fsync, rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Serializes named tensors plus string metadata into safetensors bytes.
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        cpu.push((
            name.clone(),
            to_cpu_bytes(t).with_context(|| format!("tensor {name}"))?,
        ));
    }
    let views = cpu.iter().map(|(n, t)| (n.as_str(), t));
    Ok(safetensors::tensor::serialize(views, &Some(metadata))?)
}

/// Saves a checkpoint atomically.
pub fn save(path: &Path, ckpt: &Checkpoint) -> Result<()> {
    let mut all: Vec<(String, Tensor)> = ckpt
        .model
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    for (n, t) in &ckpt.momentum {
        all.push((format!("{MOMENTUM_PREFIX}{n}"), t.shallow_clone()));
    }
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    if let Some(meta) = &ckpt.meta {
        metadata.insert(META_KEY.to_string(), serde_json::to_string(meta)?);
    }
    let bytes = serialize(&all, metadata)?;
    write_atomic(path, &bytes)
}

/// Reads a safetensors file: ours (with metadata and momentum) or any other.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    load_bytes(&bytes)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))
}

/// The safetensors crate's error in words (its `Display` is its `Debug`).
fn describe(e: SafeTensorError) -> anyhow::Error {
    let text = match e {
        SafeTensorError::InvalidHeader => "the header is not valid UTF-8".to_string(),
        SafeTensorError::InvalidHeaderStart => "the header does not start with '{'".into(),
        SafeTensorError::InvalidHeaderDeserialization => "the header is not valid JSON".into(),
        SafeTensorError::HeaderTooLarge => "the header is larger than 100 MB".into(),
        SafeTensorError::HeaderTooSmall => "the file is shorter than the 8-byte header size".into(),
        SafeTensorError::InvalidHeaderLength => "the header size is larger than the file".into(),
        SafeTensorError::TensorNotFound(n) => format!("no tensor '{n}'"),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's dtype, shape and data offsets disagree".into()
        }
        SafeTensorError::InvalidOffset(n) => format!("tensor '{n}' has invalid data offsets"),
        SafeTensorError::IoError(e) => e.to_string(),
        SafeTensorError::JsonError(e) => format!("bad header JSON: {e}"),
        SafeTensorError::InvalidTensorView(d, shape, len) => format!(
            "{} bytes of data cannot hold a {} tensor of shape [{}]",
            len,
            dtype_name(d),
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensors do not cover the data part of the file exactly (truncated or padded)"
                .into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape or size overflows".into(),
    };
    anyhow::anyhow!(text)
}

/// The dtype's name as safetensors headers write it (F32, I64, ...).
fn dtype_name(d: Dtype) -> String {
    // Dtype's Debug is the header spelling (its serde name).
    format!("{d:?}")
}

/// [`load`] on bytes already in memory.
pub fn load_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(describe)?;
    let meta = match header.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
        Some(json) => Some(serde_json::from_str(json).context("bad mos metadata")?),
        None => None,
    };
    let st = SafeTensors::deserialize(bytes).map_err(describe)?;
    let mut model = Vec::new();
    let mut momentum = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(describe)?;
        let kind = dtype_to_kind(view.dtype()).with_context(|| format!("tensor {name}"))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        match name.strip_prefix(MOMENTUM_PREFIX) {
            Some(param) => momentum.push((param.to_string(), t)),
            None => model.push((name, t)),
        }
    }
    Ok(Checkpoint {
        meta,
        model,
        momentum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_tensors_metadata_and_momentum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ckpt.safetensors");
        let meta = CheckpointMeta {
            model: "ResNetV2-R14x0.5".into(),
            head_size: 14,
            group_config: Some(vec![4, 2, 3, 1]),
            step: 42,
            config: serde_json::json!({"base_lr": 0.003}),
        };
        let w = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).reshape([2, 3]);
        let ckpt = Checkpoint {
            meta: Some(meta.clone()),
            model: vec![("head.conv.bias".into(), w.shallow_clone())],
            momentum: vec![("head.conv.bias".into(), &w * 2.0)],
        };
        save(&path, &ckpt).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.meta, Some(meta));
        assert_eq!(back.model.len(), 1);
        assert_eq!(back.model[0].0, "head.conv.bias");
        assert!(back.model[0].1.equal(&w));
        assert!(back.momentum[0].1.equal(&(&w * 2.0)));
        // No temporary file is left behind.
        let left: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("bad.safetensors"), "{e}");
        // In words, not the safetensors crate's Debug (`InvalidHeaderLength`).
        assert!(
            e.ends_with("the header size is larger than the file"),
            "{e}"
        );
        // Data that does not fill its tensor's shape.
        let header = br#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 8]);
        fs::write(&path, &bytes).unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("bad.safetensors"), "{e}");
        assert!(!e.contains("TensorInvalidInfo"), "{e}");
    }
}
