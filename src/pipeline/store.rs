//! Stage 2 of the pipeline: feature stores (docs/formats.md#feature-stores).
//!
//! A store is a directory: `manifest.json` (what was extracted, from which model
//! and data, with which settings) and, per shard k of n, the tensors
//! `shard-0000k-of-0000n.safetensors` and their index `shard-0000k-of-0000n.json`
//! (each row's image, the shard's range of the data set, the skipped images, the
//! tensor file's size and SHA-256). Shards are contiguous and unpadded: with N
//! images and n shards, N = q n + r, shard k covers `[k q + min(k, r), (k + 1) q +
//! min(k + 1, r))` ([`shard_range`]).
//!
//! Every file is written atomically (a temporary file in the store, renamed); a
//! shard's index is written after its tensors, so a shard is complete exactly when
//! its index exists and describes the tensor file beside it. An interrupted
//! extraction leaves at most a tensor file without an index (recomputed by a
//! rerun) or a dot-file temporary (ignored).
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::extract::Extracted;
use super::vocab::FEATURE_LAYERS;
use crate::model::checkpoint::{self, write_atomic};

/// `format` of `manifest.json`.
pub const FORMAT: &str = "mos-store-v1";
/// `format` of a shard's index and of its tensor file's metadata.
pub const SHARD_FORMAT: &str = "mos-store-shard-v1";
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The log of `mos extract` and `mos merge`, in the store.
pub const LOG: &str = "store.log";

/// The images `[start, end)` of shard `k` of `n` over `images` images.
pub fn shard_range(images: usize, n: usize, k: usize) -> Range<usize> {
    let (q, r) = (images / n, images % n);
    k * q + k.min(r)..(k + 1) * q + (k + 1).min(r)
}

/// `shard-0000k-of-0000n`.
pub fn shard_stem(k: usize, n: usize) -> String {
    format!("shard-{k:05}-of-{n:05}")
}

/// (k, n) of a file named `shard-K-of-N.safetensors` or `.json`.
fn parse_shard_name(name: &str) -> Option<(usize, usize)> {
    let stem = name
        .strip_suffix(".safetensors")
        .or_else(|| name.strip_suffix(".json"))?;
    let (k, n) = stem.strip_prefix("shard-")?.split_once("-of-")?;
    Some((k.parse().ok()?, n.parse().ok()?))
}

/// Which shard this process extracts, and where that came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
    pub source: String,
}

/// The shard from `--shard-index`/`--num-shards`, else from a Slurm array
/// (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`) or a
/// Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, with `--num-shards`); flags win
/// over the environment. Neither: the whole data set (shard 0 of 1). A Slurm
/// array with `--num-shards` alone must have that many tasks.
pub fn resolve_shard(
    num_shards: Option<usize>,
    shard_index: Option<usize>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ShardSpec> {
    let int = |var: &str| -> Result<Option<usize>> {
        match env(var) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .with_context(|| format!("{var}={v}: not a non-negative integer")),
        }
    };
    if num_shards == Some(0) {
        bail!("--num-shards must be at least 1");
    }
    // Flags win: with both, the environment is not read (a resubmitted array such as
    // --array=3,7 passes its task id as --shard-index).
    let flags = shard_index.is_some() && num_shards.is_some();
    let int = |var: &str| if flags { Ok(None) } else { int(var) };
    let slurm = match int("SLURM_ARRAY_TASK_ID")? {
        None => None,
        Some(id) => {
            if let Some(step) = int("SLURM_ARRAY_TASK_STEP")? {
                if step != 1 {
                    bail!("SLURM_ARRAY_TASK_STEP={step}: shards need a contiguous array (--array=0-N or 1-N, step 1)");
                }
            }
            let min = int("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let count = int("SLURM_ARRAY_TASK_COUNT")?
                .context("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")?;
            if count == 0 {
                bail!("SLURM_ARRAY_TASK_COUNT=0 (with SLURM_ARRAY_TASK_ID={id}): an array job has at least 1 task");
            }
            if let Some(max) = int("SLURM_ARRAY_TASK_MAX")? {
                if max.checked_sub(min).map(|span| span + 1) != Some(count) {
                    bail!(
                        "SLURM_ARRAY_TASK_MIN={min}, SLURM_ARRAY_TASK_MAX={max} and SLURM_ARRAY_TASK_COUNT={count}: not a contiguous array (--array=0-N or 1-N), so the task id is no shard index; rerun a missing shard K of N with --num-shards N --shard-index K"
                    );
                }
            }
            let index = id.checked_sub(min).with_context(|| {
                format!("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")
            })?;
            Some((index, count))
        }
    };
    let k8s = int("JOB_COMPLETION_INDEX")?;
    let (index, count, source) = match (shard_index, num_shards, slurm, k8s) {
        (Some(k), Some(n), ..) => (k, n, "--shard-index/--num-shards".to_string()),
        (Some(_), None, ..) => bail!("--shard-index needs --num-shards"),
        (None, Some(n), Some((k, count)), _) if n != count => bail!(
            "--num-shards {n} disagrees with the Slurm array: SLURM_ARRAY_TASK_COUNT={count} (task {k} of {count}); the array needs one task per shard (--array=0-{}), or give --shard-index K with --num-shards",
            n - 1
        ),
        (None, _, Some((k, count)), _) => (
            k,
            count,
            format!("SLURM_ARRAY_TASK_ID (task {k} of {count})"),
        ),
        (None, Some(n), None, Some(k)) => (k, n, format!("JOB_COMPLETION_INDEX={k}")),
        (None, None, None, Some(k)) => bail!(
            "JOB_COMPLETION_INDEX={k} is set: give the number of shards (the Job's completions) with --num-shards"
        ),
        (None, Some(1), None, None) | (None, None, None, None) => {
            (0, 1, "whole data set".to_string())
        }
        (None, Some(n), None, None) => bail!(
            "--num-shards {n} needs --shard-index K, or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX from an array job"
        ),
    };
    if index >= count {
        bail!("shard index {index} (from {source}) is not below the number of shards {count}");
    }
    Ok(ShardSpec {
        index,
        count,
        source,
    })
}

/// What a store holds and how it was made (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub mos_version: String,
    /// `--model`.
    pub model: String,
    /// `--model-path` as given.
    pub checkpoint: String,
    pub checkpoint_sha256: String,
    pub checkpoint_format: String,
    pub head_size: i64,
    /// Classes of the data (class folders, or 1 + the largest label of `--list`).
    pub num_classes: i64,
    pub crop: usize,
    pub batch: usize,
    pub precision: String,
    pub skip_bad_images: bool,
    pub layers: Vec<String>,
    /// `--datadir` and `--list` as given; `dataset` is the data directory's base name.
    pub datadir: String,
    pub list: Option<String>,
    pub dataset: String,
    pub images: usize,
    /// SHA-256 of the sorted `relative path, file size, label` lines.
    pub data_fingerprint: String,
    pub num_shards: usize,
    /// SHA-256 of [`Manifest::settings`]: every shard carries it.
    pub fingerprint: String,
    /// The `mos extract` command line without the shard flags (for messages).
    pub command: Vec<String>,
    /// Set by `mos merge` once every shard is there and checked.
    #[serde(default)]
    pub complete: bool,
    /// Classes per group the checkpoint records (a group-softmax model of ours);
    /// absent for a flat model and for checkpoints that record none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_config: Option<Vec<i64>>,
    /// The shorter side images are resized to before the center crop (torchvision's
    /// models); absent for BiT, which resizes to `crop x crop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
    /// RankFeat's power iterations (`--rankfeat-power-iterations`), when its layer
    /// was computed with them instead of an exact SVD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rankfeat_power_iterations: Option<u32>,
    /// Width of the pre-logit features when `model` is not one mos builds (an
    /// imported store); absent for mos's models, whose width the model gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_dim: Option<i64>,
    /// What `mos import` read (absent for extracted stores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<ImportRecord>,
    /// A TorchScript module's input normalization (`--mean`, `--std`) and head
    /// prefix (`--head`); absent for the other models, whose are fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
}

/// Prefix of an imported store's `model`: `imported:<--model-name>`.
pub const IMPORTED_PREFIX: &str = "imported:";
/// The file of an imported store's head (`weight` [C, D], `bias` [C]), in the store.
pub const HEAD_FILE: &str = "head.safetensors";

/// One array `mos import` read: its role, where from and its content's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportedArray {
    /// logits, features, labels, head_weight or head_bias.
    pub array: String,
    /// The file as given, and the array's name in it (`.npz`, safetensors).
    pub file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SHA-256 of the file.
    pub sha256: String,
    /// The element type and shape as read (before any conversion to the store's).
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// What `mos import` made a store from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportRecord {
    pub arrays: Vec<ImportedArray>,
    /// `--paths` as given, when the rows have paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<String>,
}

impl Manifest {
    /// The first model setting (model, head size, checkpoint SHA-256, crop, precision)
    /// in which `other` differs from this store, as (what, this value, other value):
    /// stores scored together, or a fit store and its ID store, must agree on all.
    pub fn model_difference(&self, other: &Manifest) -> Option<(&'static str, String, String)> {
        [
            ("model", self.model.clone(), other.model.clone()),
            (
                "head size",
                self.head_size.to_string(),
                other.head_size.to_string(),
            ),
            (
                if self.imported.is_some() || other.imported.is_some() {
                    "head SHA-256 (an imported store's --head-weight and --head-bias: import the same head with every store of a model; empty: none)"
                } else {
                    "checkpoint SHA-256"
                },
                self.checkpoint_sha256.clone(),
                other.checkpoint_sha256.clone(),
            ),
            ("crop", self.crop.to_string(), other.crop.to_string()),
            (
                "resize",
                format!("{:?}", self.resize),
                format!("{:?}", other.resize),
            ),
            ("precision", self.precision.clone(), other.precision.clone()),
            (
                "normalization (--mean, --std)",
                format!("{:?} {:?}", self.mean, self.std),
                format!("{:?} {:?}", other.mean, other.std),
            ),
            (
                "group split",
                split_name(self.group_config.as_deref()),
                split_name(other.group_config.as_deref()),
            ),
        ]
        .into_iter()
        .find(|(_, x, y)| x != y)
    }

    /// Records what a TorchScript module's store depends on besides its file: the
    /// features' width, the normalization of `transform` (flags for a module) and
    /// the head's prefix.
    pub fn record_script(
        &mut self,
        transform: &crate::data::ImageTransform,
        head: &str,
        feature_dim: i64,
    ) {
        if let crate::data::ImageTransform::CenterCrop(c) = transform {
            self.mean = Some(c.mean.to_vec());
            self.std = Some(c.std.to_vec());
        }
        self.head = Some(head.to_string());
        self.feature_dim = Some(feature_dim);
    }

    /// The architecture mos builds for this store's model; `None` for an imported store.
    pub fn variant(&self) -> Result<Option<crate::model::Variant>> {
        if self.model.starts_with(IMPORTED_PREFIX) {
            return Ok(None);
        }
        self.model
            .parse()
            .map(Some)
            .map_err(|e: String| anyhow::anyhow!("the store's model '{}': {e}", self.model))
    }

    /// Width of the stored pre-logit features.
    pub fn feature_dim(&self) -> Result<i64> {
        if let Some(d) = self.feature_dim {
            return Ok(d);
        }
        match self.variant()? {
            Some(v) => Ok(v.head_in()),
            None => bail!("an imported store without its feature width (feature_dim)"),
        }
    }

    /// The settings that decide the stored numbers (paths as given are not among
    /// them: the checkpoint and the data are identified by their content).
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("format", self.format.clone()),
            ("mos version", self.mos_version.clone()),
            ("model", self.model.clone()),
            ("checkpoint SHA-256", self.checkpoint_sha256.clone()),
            ("checkpoint format", self.checkpoint_format.clone()),
            ("head size", self.head_size.to_string()),
            ("classes", self.num_classes.to_string()),
            ("crop", self.crop.to_string()),
            ("batch", self.batch.to_string()),
            ("precision", self.precision.clone()),
            ("skip bad images", self.skip_bad_images.to_string()),
            ("layers", self.layers.join(",")),
            ("images", self.images.to_string()),
            ("data fingerprint", self.data_fingerprint.clone()),
            ("shards", self.num_shards.to_string()),
        ];
        // Only when recorded, so that the stores made before it keep their fingerprint.
        if let Some(g) = &self.group_config {
            v.push(("group config", split_name(Some(g))));
        }
        if let Some(r) = self.resize {
            v.push(("resize", r.to_string()));
        }
        if let Some(d) = self.feature_dim {
            v.push(("feature dim", d.to_string()));
        }
        if let Some(n) = self.rankfeat_power_iterations {
            v.push(("rankfeat power iterations", n.to_string()));
        }
        if let Some(m) = &self.mean {
            v.push(("mean", format!("{m:?}")));
        }
        if let Some(s) = &self.std {
            v.push(("std", format!("{s:?}")));
        }
        if let Some(h) = &self.head {
            v.push(("head", h.clone()));
        }
        if let Some(r) = &self.imported {
            let arrays: Vec<String> = r
                .arrays
                .iter()
                .map(|a| format!("{} {} {} {:?}", a.array, a.sha256, a.dtype, a.shape))
                .collect();
            v.push(("imported", arrays.join("; ")));
        }
        v
    }

    /// Checks that the recorded fingerprint is the SHA-256 of the recorded
    /// settings; else names the edited field, from the settings the shard
    /// indices in `dir` copied at extraction (when they have them).
    pub fn verify(&self, dir: &Path) -> Result<()> {
        let computed = self.compute_fingerprint();
        if computed == self.fingerprint {
            return Ok(());
        }
        let path = dir.join(MANIFEST);
        let ours: BTreeMap<String, String> = self
            .settings()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        // The settings as a shard index recorded them at extraction.
        let recorded = shard_index_files(dir).into_iter().find_map(|f| {
            let text = std::fs::read_to_string(&f).ok()?;
            let idx: ShardIndex = serde_json::from_str(&text).ok()?;
            (!idx.settings.is_empty()).then_some((f, idx.settings))
        });
        if let Some((f, theirs)) = recorded {
            let keys: std::collections::BTreeSet<&String> =
                ours.keys().chain(theirs.keys()).collect();
            let edited: Vec<String> = keys
                .into_iter()
                .filter(|k| ours.get(*k) != theirs.get(*k))
                .map(|k| {
                    format!(
                        "{} says {}, but the shards were extracted with {}",
                        json_field(k),
                        ours.get(k).map_or("nothing", String::as_str),
                        theirs.get(k).map_or("nothing", String::as_str)
                    )
                })
                .collect();
            if edited.is_empty() {
                bail!(
                    "{}: its fingerprint field was edited: it says {}, but its settings (and {}) give {computed}; restore it or extract the store again",
                    path.display(),
                    self.fingerprint,
                    f.display()
                );
            }
            bail!(
                "{}: edited after extraction, refusing to read the store: {}; restore the manifest or extract the store again",
                path.display(),
                edited.join("; ")
            );
        }
        bail!(
            "{}: edited after extraction, refusing to read the store: its settings ({}) no longer give its fingerprint {} (they give {computed}); restore the manifest or extract the store again",
            path.display(),
            ours.keys()
                .map(|k| json_field(k))
                .collect::<Vec<_>>()
                .join(", "),
            self.fingerprint
        )
    }

    /// SHA-256 of the settings.
    pub fn compute_fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for (k, v) in self.settings() {
            h.update(format!("{k}={v}\n"));
        }
        hex(&h.finalize())
    }

    /// The settings in which `other` (this run) differs from `self` (the store).
    pub fn differences(&self, other: &Manifest) -> Vec<String> {
        let ours: BTreeMap<&str, String> = self.settings().into_iter().collect();
        let theirs: BTreeMap<&str, String> = other.settings().into_iter().collect();
        // In the settings' order, then the settings only this run has (a group config).
        let mut keys: Vec<&str> = self.settings().into_iter().map(|(k, _)| k).collect();
        keys.extend(theirs.keys().filter(|k| !ours.contains_key(*k)));
        keys.into_iter()
            .filter(|k| ours.get(k) != theirs.get(k))
            .map(|k| {
                let value = |m: &BTreeMap<&str, String>| m.get(k).cloned().unwrap_or("none".into());
                format!(
                    "{k}: the store has {}, this run {}",
                    value(&ours),
                    value(&theirs)
                )
            })
            .collect()
    }

    /// The command that extracts shard `k`.
    pub fn shard_command(&self, k: usize) -> String {
        let mut words: Vec<String> = self.command.iter().map(|w| shell_quote(w)).collect();
        words.push(format!(
            "--num-shards {} --shard-index {k}",
            self.num_shards
        ));
        words.join(" ")
    }
}

/// A group split as messages and settings write it: `4,2,3,1`, or `none`.
pub fn split_name(g: Option<&[i64]>) -> String {
    match g {
        Some(g) => g.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
        None => "none".into(),
    }
}

/// The manifest field of a setting's name (for messages).
fn json_field(setting: &str) -> &str {
    match setting {
        "mos version" => "mos_version",
        "checkpoint SHA-256" => "checkpoint_sha256",
        "checkpoint format" => "checkpoint_format",
        "head size" => "head_size",
        "classes" => "num_classes",
        "skip bad images" => "skip_bad_images",
        "data fingerprint" => "data_fingerprint",
        "shards" => "num_shards",
        "group config" => "group_config",
        other => other,
    }
}

/// The shard index files (`shard-K-of-N.json`) in a store, sorted.
fn shard_index_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(".json") && parse_shard_name(n).is_some())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn shell_quote(w: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !w.is_empty() && w.chars().all(plain) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The data fingerprint: SHA-256 of the lines `relative path \t size \t label`
/// sorted by path (bytes), over every image of the data set.
pub fn data_fingerprint(datadir: &Path, images: &[(String, i64)]) -> Result<String> {
    let mut lines = Vec::with_capacity(images.len());
    for (rel, label) in images {
        let p = datadir.join(rel);
        let size = std::fs::metadata(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .len();
        lines.push(format!("{rel}\t{size}\t{label}\n"));
    }
    lines.sort();
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
    }
    Ok(hex(&h.finalize()))
}

/// Reads a store's manifest, checking its format.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        bail!(
            "{}: no {MANIFEST}: not a mos feature store (made by mos extract)",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a mos store manifest (bad JSON)", path.display()))?;
    let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != FORMAT {
        let by = value
            .get("mos_version")
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        bail!(
            "{}: a store of format '{format}' (written by mos {by}); this mos ({}) reads {FORMAT}",
            path.display(),
            env!("CARGO_PKG_VERSION")
        );
    }
    let m: Manifest = serde_json::from_value(value)
        .with_context(|| format!("{}: not a mos store manifest", path.display()))?;
    m.verify(dir)?;
    Ok(m)
}

/// Creates the store with `m` as its manifest, or checks that the existing one
/// has the same settings (else an error naming every difference; nothing is
/// written). Returns the store's manifest. Safe when several shards start at once.
pub fn prepare(dir: &Path, m: &Manifest) -> Result<Manifest> {
    prepare_for(dir, m, "another --output")
}

/// [`prepare`] for a command whose flag that chooses the store is not `--output`:
/// `elsewhere` says how to pick another store (e.g. "another --name or --logdir").
pub fn prepare_for(dir: &Path, m: &Manifest, elsewhere: &str) -> Result<Manifest> {
    let (m, new) = prepare_new(dir, m, elsewhere)?;
    if let Some(new) = new {
        new.keep();
    }
    Ok(m)
}

/// [`prepare_for`], also returning a [`NewStore`] when this call wrote the
/// manifest (the store is new): an extraction that then fails before writing its
/// shard drops it, which takes the manifest away again. ([`prepare`] and
/// [`prepare_for`] keep the store.)
pub fn prepare_new(
    dir: &Path,
    m: &Manifest,
    elsewhere: &str,
) -> Result<(Manifest, Option<NewStore>)> {
    let made_dir = !dir.exists();
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create store {}", dir.display()))?;
    let path = dir.join(MANIFEST);
    if !path.exists() {
        // Create-if-absent: a hard link fails when another shard won the race.
        let tmp = dir.join(format!(".{MANIFEST}.tmp-{}", std::process::id()));
        write_atomic(&tmp, (serde_json::to_string_pretty(m)? + "\n").as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                let new = NewStore {
                    dir: dir.to_path_buf(),
                    made_dir,
                    kept: false,
                };
                return Ok((m.clone(), Some(new)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }
    let existing = read_manifest(dir)?;
    let diffs = existing.differences(m);
    if !diffs.is_empty() {
        // A complete store extracted without --skip-bad-images skipped no image: it
        // holds what this run with the flag would extract, so it serves it as it is
        // (its manifest keeps saying skip_bad_images false). The retry that a failed
        // set's error suggests then reuses the sets that had no bad image.
        let mut allowing = existing.clone();
        allowing.skip_bad_images = true;
        if !existing.skip_bad_images
            && m.skip_bad_images
            && allowing.differences(m).is_empty()
            && open(dir, false).is_ok()
        {
            return Ok((existing, None));
        }
        bail!(
            "{}: the store was extracted with other settings; refusing to mix them (nothing was written):\n  {}\nUse {elsewhere}, or delete the store to start over",
            path.display(),
            diffs.join("\n  ")
        );
    }
    Ok((existing, None))
}

/// A store whose manifest this process wrote ([`prepare_new`]). Unless
/// [`NewStore::keep`] is called once the shard is written, dropping it (the
/// extraction failed: an error, or a libtorch error's panic) removes the manifest
/// again when the store holds no shard file yet, and the store directory when this
/// process made it and it is empty. Otherwise the retry that the error suggests
/// with other settings (e.g. `--skip-bad-images`) would be refused as a mix of
/// two extractions. A shard file in the store (another process's work) keeps the
/// manifest.
pub struct NewStore {
    dir: PathBuf,
    made_dir: bool,
    kept: bool,
}

impl NewStore {
    /// The extraction succeeded: the store stays.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for NewStore {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        // Shard files and their temporaries (`.shard-...tmp-PID`: one being written).
        let shards = entries.filter_map(|e| e.ok()).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            parse_shard_name(&name).is_some() || name.starts_with(".shard-")
        });
        if shards {
            return;
        }
        let manifest = self.dir.join(MANIFEST);
        if std::fs::remove_file(&manifest).is_err() {
            return;
        }
        // Only an empty directory goes (the store log of this run keeps it).
        if !(self.made_dir && std::fs::remove_dir(&self.dir).is_ok()) {
            if let Ok(log) = crate::runlog::RunLog::open(&self.dir, LOG) {
                log.line(format!(
                    "the extraction failed before any shard was written: removed the {} it wrote, so that a rerun may use other settings",
                    manifest.display()
                ));
            }
        }
    }
}

/// An image left out of a shard (`--skip-bad-images`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedImage {
    /// Dataset index.
    pub index: usize,
    /// Path relative to the data directory.
    pub path: String,
    pub reason: String,
}

/// A shard's index (`shard-K-of-N.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub fingerprint: String,
    pub shard: usize,
    pub num_shards: usize,
    /// The shard's images `[start, end)` of the data set.
    pub start: usize,
    pub end: usize,
    pub rows: usize,
    /// Per row: the image's path relative to the data directory, its dataset index.
    pub paths: Vec<String>,
    pub indices: Vec<usize>,
    pub skipped: Vec<SkippedImage>,
    /// The tensor file: name, size in bytes, SHA-256.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// Where it was computed and by which mos (informative).
    pub device: String,
    pub mos_version: String,
    /// The manifest's settings at extraction ([`Manifest::settings`]): what an
    /// edited manifest is compared with to name the edited field.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// Writes shard `k`'s tensors, then its index. `rel_paths[i]`: the path of
/// dataset image i relative to the data directory.
pub fn write_shard(
    dir: &Path,
    m: &Manifest,
    k: usize,
    ex: &Extracted,
    rel_paths: &[String],
    device: &str,
) -> Result<ShardIndex> {
    let range = shard_range(m.images, m.num_shards, k);
    let mut tensors = vec![("logits".to_string(), ex.logits.shallow_clone())];
    if let Some(f) = &ex.features {
        tensors.push(("features".into(), f.shallow_clone()));
    }
    for (l, t) in ex.layers.iter().enumerate() {
        tensors.push((format!("layer{l}"), t.shallow_clone()));
    }
    if let Some(r) = &ex.rankfeat {
        tensors.push(("rankfeat".into(), r.shallow_clone()));
    }
    tensors.push(("labels".into(), Tensor::from_slice(&ex.labels)));
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), SHARD_FORMAT.to_string());
    meta.insert("fingerprint".to_string(), m.fingerprint.clone());
    meta.insert("shard".to_string(), k.to_string());
    meta.insert("num_shards".to_string(), m.num_shards.to_string());
    let bytes = checkpoint::serialize(&tensors, meta)?;
    let stem = shard_stem(k, m.num_shards);
    let file = format!("{stem}.safetensors");
    write_atomic(&dir.join(&file), &bytes)?;
    let index = ShardIndex {
        format: SHARD_FORMAT.into(),
        fingerprint: m.fingerprint.clone(),
        shard: k,
        num_shards: m.num_shards,
        start: range.start,
        end: range.end,
        rows: ex.indices.len(),
        paths: ex.indices.iter().map(|&i| rel_paths[i].clone()).collect(),
        indices: ex.indices.clone(),
        skipped: ex
            .skipped
            .iter()
            .map(|(i, s)| SkippedImage {
                index: *i,
                path: rel_paths[*i].clone(),
                reason: s.reason.clone(),
            })
            .collect(),
        file,
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(&bytes)),
        device: device.to_string(),
        mos_version: env!("CARGO_PKG_VERSION").to_string(),
        settings: m
            .settings()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    write_atomic(
        &dir.join(format!("{stem}.json")),
        (serde_json::to_string(&index)? + "\n").as_bytes(),
    )?;
    Ok(index)
}

/// Reads and checks shard `k`'s index against the manifest: format, fingerprint,
/// range, rows and skipped images covering the range exactly once.
fn read_index(dir: &Path, m: &Manifest, k: usize) -> Result<ShardIndex> {
    let path = dir.join(format!("{}.json", shard_stem(k, m.num_shards)));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let idx: ShardIndex = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a mos store shard index", path.display()))?;
    let p = path.display();
    if idx.format != SHARD_FORMAT {
        bail!("{p}: format '{}', expected {SHARD_FORMAT}", idx.format);
    }
    if idx.fingerprint != m.fingerprint {
        bail!(
            "{p}: this shard was extracted with other settings than {} (another model, checkpoint, data or mos version): its fingerprint is {}, the manifest's {}",
            dir.join(MANIFEST).display(),
            idx.fingerprint,
            m.fingerprint
        );
    }
    let range = shard_range(m.images, m.num_shards, k);
    if (idx.shard, idx.num_shards, idx.start, idx.end) != (k, m.num_shards, range.start, range.end)
    {
        bail!(
            "{p}: describes shard {} of {} over images {}..{}, expected shard {k} of {} over {}..{}",
            idx.shard,
            idx.num_shards,
            idx.start,
            idx.end,
            m.num_shards,
            range.start,
            range.end
        );
    }
    if idx.paths.len() != idx.rows || idx.indices.len() != idx.rows {
        bail!(
            "{p}: {} rows but {} paths and {} indices",
            idx.rows,
            idx.paths.len(),
            idx.indices.len()
        );
    }
    let mut seen: Vec<usize> = idx
        .indices
        .iter()
        .copied()
        .chain(idx.skipped.iter().map(|s| s.index))
        .collect();
    seen.sort_unstable();
    if seen != range.clone().collect::<Vec<_>>() || !idx.indices.windows(2).all(|w| w[0] < w[1]) {
        bail!(
            "{p}: its rows and skipped images do not cover the images {}..{} exactly once, in order",
            range.start,
            range.end
        );
    }
    Ok(idx)
}

/// What a rerun finds of shard `k` ([`complete_shard`]).
#[derive(Debug)]
pub enum ShardStatus {
    /// Its index fits the manifest and its tensor file has the recorded size and SHA-256.
    Complete(Box<ShardIndex>),
    /// No index yet (never extracted, or interrupted before its index was written).
    Absent,
    /// An index is there, but its tensor file is missing, truncated or changed
    /// (the reason): the shard must be computed again, never used.
    Damaged(String),
}

/// Whether shard `k` is complete: its index is there, fits the manifest and
/// describes the tensor file beside it (same size and SHA-256). An error when an
/// index belongs to another extraction.
pub fn complete_shard(dir: &Path, m: &Manifest, k: usize) -> Result<ShardStatus> {
    let json = dir.join(format!("{}.json", shard_stem(k, m.num_shards)));
    if !json.exists() {
        return Ok(ShardStatus::Absent);
    }
    let idx = read_index(dir, m, k)?;
    Ok(match check_tensor_file(dir, m, k, &idx) {
        Ok(()) => ShardStatus::Complete(Box::new(idx)),
        Err(e) => ShardStatus::Damaged(format!("{e:#}")),
    })
}

/// Checks shard `k`'s tensor file against its index: present, of the recorded
/// size and SHA-256. The error names the file and the command that recomputes it.
fn check_tensor_file(dir: &Path, m: &Manifest, k: usize, idx: &ShardIndex) -> Result<()> {
    let file = check_size(dir, m, k, idx)?;
    let sha = sha256_file(&file)?;
    check_sha(&file, &sha, m, k, idx)
}

/// Checks that shard `k`'s tensor file is there with the recorded size; its path.
fn check_size(dir: &Path, m: &Manifest, k: usize, idx: &ShardIndex) -> Result<PathBuf> {
    let file = dir.join(&idx.file);
    let n = m.num_shards;
    let size = std::fs::metadata(&file)
        .with_context(|| {
            format!(
                "{}: missing, but its index {} is there (rerun the extraction of shard {k}: {})",
                file.display(),
                shard_stem(k, n) + ".json",
                m.shard_command(k)
            )
        })?
        .len();
    if size != idx.bytes {
        bail!(
            "{}: {size} bytes, but its index records {} (truncated or replaced); delete {} and rerun: {}",
            file.display(),
            idx.bytes,
            shard_stem(k, n) + ".json",
            m.shard_command(k)
        );
    }
    Ok(file)
}

/// The error of a tensor file whose SHA-256 `sha` is not the one its index records.
fn check_sha(file: &Path, sha: &str, m: &Manifest, k: usize, idx: &ShardIndex) -> Result<()> {
    if sha != idx.sha256 {
        bail!(
            "{}: its SHA-256 is {sha}, but its index records {} (the file was changed after extraction); delete {} and rerun: {}",
            file.display(),
            idx.sha256,
            shard_stem(k, m.num_shards) + ".json",
            m.shard_command(k)
        );
    }
    Ok(())
}

/// A store whose shards are all there and consistent.
pub struct StoreIndex {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub shards: Vec<ShardIndex>,
}

/// Checks a whole store: the manifest, no shard of another extraction, every
/// shard present with an index that fits and a tensor file of the recorded size
/// (and, with `verify_hash`, content). Missing shards are named with the command
/// that computes them.
pub fn open(dir: &Path, verify_hash: bool) -> Result<StoreIndex> {
    let m = read_manifest(dir)?;
    let n = m.num_shards;
    let mut present = vec![false; n];
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read store {}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        let Some((k, nn)) = parse_shard_name(name) else {
            continue;
        };
        if nn != n {
            bail!(
                "{}: a shard of a {nn}-shard extraction, but {} says {n} shards: the store mixes two extractions (move the file away)",
                dir.join(name).display(),
                dir.join(MANIFEST).display()
            );
        }
        if k >= n {
            bail!(
                "{}: shard {k} of {n} is not a shard of this extraction ({} says {n} shards, numbered from 0, so below {n}): move the file away",
                dir.join(name).display(),
                dir.join(MANIFEST).display()
            );
        }
        if name.ends_with(".json") {
            present[k] = true;
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&k| !present[k]).collect();
    if !missing.is_empty() {
        bail!(missing_message(dir, &m, &missing));
    }
    let mut shards = Vec::with_capacity(n);
    for k in 0..n {
        let idx = read_index(dir, &m, k)?;
        if verify_hash {
            check_tensor_file(dir, &m, k, &idx)?;
        } else {
            check_size(dir, &m, k, &idx)?;
        }
        shards.push(idx);
    }
    Ok(StoreIndex {
        dir: dir.to_path_buf(),
        manifest: m,
        shards,
    })
}

fn missing_message(dir: &Path, m: &Manifest, missing: &[usize]) -> String {
    let list: Vec<String> = missing.iter().map(usize::to_string).collect();
    let mut msg = format!(
        "{}: {} of {} shards missing or incomplete (shard {}); compute them with:",
        dir.display(),
        missing.len(),
        m.num_shards,
        list.join(", ")
    );
    for &k in missing.iter().take(5) {
        msg.push_str(&format!("\n  {}", m.shard_command(k)));
    }
    if missing.len() > 5 {
        msg.push_str(&format!("\n  ... ({} more)", missing.len() - 5));
    }
    msg.push_str(&format!(
        "\nor, as a Slurm array whose task ids are the shard indices: MOS_SHARDS={} sbatch --array={} scripts/slurm/extract.sbatch (it passes --num-shards $MOS_SHARDS --shard-index $SLURM_ARRAY_TASK_ID)",
        m.num_shards,
        list.join(",")
    ));
    msg
}

/// Marks a checked store complete (rewrites its manifest with `complete: true`).
pub fn mark_complete(store: &StoreIndex) -> Result<()> {
    let mut m = store.manifest.clone();
    m.complete = true;
    write_atomic(
        &store.dir.join(MANIFEST),
        (serde_json::to_string_pretty(&m)? + "\n").as_bytes(),
    )
}

/// The rows of a whole store, in dataset order, on the CPU.
pub struct StoreData {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Per row: path relative to the data directory, dataset index, label.
    pub paths: Vec<String>,
    pub indices: Vec<usize>,
    pub labels: Vec<i64>,
    pub logits: Tensor,
    pub features: Option<Tensor>,
    /// `layer0`..`layer4` when the store has the Mahalanobis layers.
    pub layers: Vec<Tensor>,
    /// RankFeat's fused logits [N, head] when the store has them.
    pub rankfeat: Option<Tensor>,
    pub skipped: Vec<SkippedImage>,
}

impl StoreData {
    /// RankFeat's fused logits, or an error naming the store and how to extract them.
    pub fn rankfeat_layer(&self) -> Result<&Tensor> {
        self.rankfeat.as_ref().with_context(|| {
            format!(
                "{}: no rankfeat layer, which --score RankFeat needs; extract with --layers logits,rankfeat",
                self.dir.join(MANIFEST).display()
            )
        })
    }

    /// Row ranges of the test commands' batches: rows whose images fell in the
    /// same batch `[j B, (j + 1) B)` of the data set.
    pub fn batches(&self) -> Vec<Range<usize>> {
        let b = self.manifest.batch.max(1);
        let mut out: Vec<Range<usize>> = Vec::new();
        for (row, &i) in self.indices.iter().enumerate() {
            match out.last_mut() {
                Some(r) if self.indices[r.start] / b == i / b => r.end = row + 1,
                _ => out.push(row..row + 1),
            }
        }
        out
    }

    /// Each row's path as the test commands write it: `--datadir` joined with it.
    pub fn full_paths(&self) -> Vec<PathBuf> {
        let root = Path::new(&self.manifest.datadir);
        self.paths.iter().map(|p| root.join(p)).collect()
    }
}

/// Reads every shard of a checked store ([`open`]) and concatenates the rows.
pub fn load(dir: &Path) -> Result<StoreData> {
    let store = open(dir, false)?;
    let m = &store.manifest;
    let variant = m
        .variant()
        .with_context(|| dir.join(MANIFEST).display().to_string())?;
    let feature_dim = if m.layers.iter().any(|l| l == "features") {
        m.feature_dim()
            .with_context(|| dir.join(MANIFEST).display().to_string())?
    } else {
        0
    };
    let features = m.layers.iter().any(|l| l == "features");
    let mahalanobis = m.layers.iter().any(|l| l == "mahalanobis");
    let rankfeat = m.layers.iter().any(|l| l == "rankfeat");
    let mut parts: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
    let (mut paths, mut indices, mut labels, mut skipped) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (k, idx) in store.shards.iter().enumerate() {
        let file = dir.join(&idx.file);
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        // Verified on every read: the bytes scored are the bytes extracted.
        check_sha(&file, &hex(&Sha256::digest(&bytes)), m, k, idx)?;
        let ckpt = checkpoint::load_bytes(&bytes)
            .with_context(|| format!("{}: not a readable safetensors file", file.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|_| anyhow::anyhow!("{}: unreadable header", file.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(SHARD_FORMAT) {
            bail!(
                "{}: not a mos store shard (its metadata has no format {SHARD_FORMAT})",
                file.display()
            );
        }
        if meta.get("fingerprint") != Some(&m.fingerprint) {
            bail!(
                "{}: extracted with other settings than {} (another model, checkpoint or data): fingerprint {}, expected {}",
                file.display(),
                dir.join(MANIFEST).display(),
                meta.get("fingerprint").map_or("none", String::as_str),
                m.fingerprint
            );
        }
        let rows = idx.rows as i64;
        let get = |name: &str, kind: Kind, width: Option<i64>| -> Result<Tensor> {
            let t = ckpt
                .model
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .with_context(|| format!("{}: no tensor '{name}'", file.display()))?;
            let want: Vec<i64> = match width {
                Some(w) => vec![rows, w],
                None => vec![rows],
            };
            if t.size() != want || t.kind() != kind {
                bail!(
                    "{}: '{name}' is {:?} {:?}, expected {kind:?} {want:?}",
                    file.display(),
                    t.kind(),
                    t.size()
                );
            }
            if kind == Kind::Float {
                check_finite(&t, dir, &file, name, idx)?;
            }
            Ok(t)
        };
        parts.entry("logits".into()).or_default().push(get(
            "logits",
            Kind::Float,
            Some(m.head_size),
        )?);
        labels.extend(Vec::<i64>::try_from(get("labels", Kind::Int64, None)?)?);
        if features {
            parts.entry("features".into()).or_default().push(get(
                "features",
                Kind::Float,
                Some(feature_dim),
            )?);
        }
        if mahalanobis {
            let ch = variant
                .with_context(|| {
                    format!(
                        "{}: Mahalanobis layers in a store of a model mos does not build",
                        dir.join(MANIFEST).display()
                    )
                })?
                .feature_channels();
            for (l, c) in ch.iter().enumerate().take(FEATURE_LAYERS) {
                let name = format!("layer{l}");
                let t = get(&name, Kind::Float, Some(*c))?;
                parts.entry(name).or_default().push(t);
            }
        }
        if rankfeat {
            parts.entry("rankfeat".into()).or_default().push(get(
                "rankfeat",
                Kind::Float,
                Some(m.head_size),
            )?);
        }
        paths.extend(idx.paths.iter().cloned());
        indices.extend(idx.indices.iter().copied());
        skipped.extend(idx.skipped.iter().cloned());
    }
    let mut cat = |name: &str| parts.remove(name).map(|v| Tensor::cat(&v, 0));
    let logits = cat("logits").context("store without shards")?;
    let features = cat("features");
    let rankfeat = cat("rankfeat");
    let layers = (0..FEATURE_LAYERS)
        .filter_map(|l| cat(&format!("layer{l}")))
        .collect();
    Ok(StoreData {
        dir: dir.to_path_buf(),
        manifest: store.manifest,
        paths,
        indices,
        labels,
        logits,
        features,
        layers,
        rankfeat,
        skipped,
    })
}

/// Refuses a stored tensor with a NaN or infinite value, naming the store, the
/// shard's file, the tensor, the first such row and its image.
fn check_finite(t: &Tensor, dir: &Path, file: &Path, name: &str, idx: &ShardIndex) -> Result<()> {
    let Some(row) = first_nonfinite_row(t) else {
        return Ok(());
    };
    let bad = t.isfinite().logical_not();
    let count = i64::try_from(bad.sum(Kind::Int64)).unwrap_or(-1);
    let rows = if t.dim() > 1 {
        i64::try_from(bad.flatten(1, -1).any_dim(1, false).sum(Kind::Int64)).unwrap_or(-1)
    } else {
        count
    };
    bail!(
        "store {}: {} holds {count} non-finite value(s) (NaN or infinite) in '{name}', in {rows} row(s); the first is row {row} of the shard, image {} (dataset index {}); nothing is scored from it: extract the store again (mos extract refuses such images, or leaves them out with --skip-bad-images)",
        dir.display(),
        file.display(),
        idx.paths.get(row).map_or("?", String::as_str),
        idx.indices.get(row).map_or("?".to_string(), usize::to_string)
    )
}

/// Refuses a file of fitted values (`fit.safetensors`, Mahalanobis parameters)
/// with a NaN or infinite value in a floating-point tensor, naming the file and
/// the tensor.
pub fn check_tensors_finite(tensors: &[(String, Tensor)], file: &Path) -> Result<()> {
    for (name, t) in tensors {
        let float = matches!(
            t.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        );
        if float && first_nonfinite_row(&t.reshape([-1])).is_some() {
            bail!(
                "{}: tensor '{name}' holds a NaN or infinite value; nothing is scored with it (fit or tune it again)",
                file.display()
            );
        }
    }
    Ok(())
}

/// The first row (dimension 0) of `t` with a NaN or infinite value, if any.
pub fn first_nonfinite_row(t: &Tensor) -> Option<usize> {
    if t.numel() == 0 {
        return None;
    }
    let ok = t.isfinite();
    let rows = if t.dim() > 1 {
        ok.flatten(1, -1).all_dim(1, false)
    } else {
        ok
    };
    if bool::try_from(rows.all()).unwrap_or(false) {
        return None;
    }
    let first = rows.logical_not().nonzero().flatten(0, -1);
    i64::try_from(first.get(0)).ok().map(|r| r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_data_once_without_padding() {
        for images in [0usize, 1, 5, 7, 16, 50_000] {
            for n in 1..=17 {
                let mut next = 0;
                for k in 0..n {
                    let r = shard_range(images, n, k);
                    assert_eq!(r.start, next, "{images} images, shard {k} of {n}");
                    let len = r.len();
                    assert!(len == images / n || len == images / n + 1);
                    next = r.end;
                }
                assert_eq!(next, images);
            }
        }
        // The example: N = q n + r, the first r shards one longer.
        assert_eq!(shard_range(10, 4, 0), 0..3);
        assert_eq!(shard_range(10, 4, 1), 3..6);
        assert_eq!(shard_range(10, 4, 2), 6..8);
        assert_eq!(shard_range(10, 4, 3), 8..10);
    }

    #[test]
    fn the_first_non_finite_row_is_found() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([3, 2]);
        assert_eq!(first_nonfinite_row(&t), None);
        for (at, v) in [(3, f32::NAN), (5, f32::INFINITY), (2, f32::NEG_INFINITY)] {
            let mut x = vec![1.0f32; 6];
            x[at] = v;
            let t = Tensor::from_slice(&x).reshape([3, 2]);
            assert_eq!(first_nonfinite_row(&t), Some(at / 2), "{v} at {at}");
            let e = check_tensors_finite(&[("m".into(), t)], Path::new("fit.safetensors"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("fit.safetensors") && e.contains("'m'"), "{e}");
        }
        let empty = Tensor::zeros([0, 4], (Kind::Float, tch::Device::Cpu));
        assert_eq!(first_nonfinite_row(&empty), None);
        // Integer tensors are not checked.
        let labels = Tensor::from_slice(&[1i64, 2]);
        assert!(check_tensors_finite(&[("l".into(), labels)], Path::new("x")).is_ok());
    }

    #[test]
    fn shard_names_round_trip() {
        assert_eq!(shard_stem(3, 16), "shard-00003-of-00016");
        assert_eq!(
            parse_shard_name("shard-00003-of-00016.safetensors"),
            Some((3, 16))
        );
        assert_eq!(parse_shard_name("shard-00003-of-00016.json"), Some((3, 16)));
        assert_eq!(parse_shard_name(".shard-00003-of-00016.json.tmp-1"), None);
        assert_eq!(parse_shard_name("manifest.json"), None);
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn shard_from_flags_slurm_and_kubernetes() {
        let none = env(&[]);
        let s = resolve_shard(None, None, &none).unwrap();
        assert_eq!((s.index, s.count), (0, 1));
        let s = resolve_shard(Some(4), Some(3), &none).unwrap();
        assert_eq!((s.index, s.count), (3, 4));
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ]);
        let s = resolve_shard(None, None, &slurm).unwrap();
        assert_eq!((s.index, s.count), (4, 8));
        // Flags win over the environment.
        let s = resolve_shard(Some(2), Some(1), &slurm).unwrap();
        assert_eq!((s.index, s.count), (1, 2));
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        let s = resolve_shard(Some(3), None, &k8s).unwrap();
        assert_eq!((s.index, s.count), (2, 3));
        let e = resolve_shard(None, None, &k8s).unwrap_err().to_string();
        assert!(e.contains("--num-shards"), "{e}");
        let e = resolve_shard(Some(2), Some(2), &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not below the number of shards 2"), "{e}");
        let e = resolve_shard(None, Some(0), &none).unwrap_err().to_string();
        assert!(e.contains("--shard-index needs --num-shards"), "{e}");
        let e = resolve_shard(Some(3), None, &none).unwrap_err().to_string();
        assert!(e.contains("needs --shard-index"), "{e}");
        let bad = env(&[("SLURM_ARRAY_TASK_ID", "x")]);
        let e = resolve_shard(None, None, &bad).unwrap_err().to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_ID=x"), "{e}");
        let step = env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert!(resolve_shard(None, None, &step).is_err());
    }

    #[test]
    fn slurm_counts_are_checked_and_named() {
        // A count of 0 names the variable, not a flag nobody gave.
        let zero = env(&[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "0"),
        ]);
        let e = resolve_shard(None, None, &zero).unwrap_err().to_string();
        assert!(
            e.contains("SLURM_ARRAY_TASK_COUNT=0") && !e.contains("--num-shards"),
            "{e}"
        );
        // --num-shards 0 names the flag, whatever the environment.
        let none = env(&[]);
        for vars in [&none as &dyn Fn(&str) -> Option<String>, &zero] {
            let e = resolve_shard(Some(0), None, vars).unwrap_err().to_string();
            assert!(e.contains("--num-shards must be at least 1"), "{e}");
        }
        let e = resolve_shard(Some(0), Some(0), &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--num-shards must be at least 1"), "{e}");
        // Task 1 of a 2-task array with --num-shards 4: refused, both named (it
        // would write shard 1 of 4 and leave shards 2 and 3 to nobody).
        let two = env(&[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_ARRAY_TASK_MAX", "1"),
        ]);
        let e = resolve_shard(Some(4), None, &two).unwrap_err().to_string();
        assert!(
            e.contains("--num-shards 4") && e.contains("SLURM_ARRAY_TASK_COUNT=2"),
            "{e}"
        );
        // The same count agrees; --shard-index with --num-shards still wins.
        let s = resolve_shard(Some(2), None, &two).unwrap();
        assert_eq!((s.index, s.count), (1, 2));
        let s = resolve_shard(Some(4), Some(3), &two).unwrap();
        assert_eq!((s.index, s.count), (3, 4));
        // A resubmitted sparse array (--array=3,7): its task ids are no shard index.
        let sparse = env(&[
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_MAX", "7"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ]);
        let e = resolve_shard(None, None, &sparse).unwrap_err().to_string();
        assert!(e.contains("not a contiguous array"), "{e}");
        // Resubmitted with its task ids as shard indices (extract.sbatch with
        // MOS_SHARDS): the flags win and the sparse array is not read.
        let s = resolve_shard(Some(16), Some(7), &sparse).unwrap();
        assert_eq!((s.index, s.count), (7, 16));
        let ones = env(&[
            ("SLURM_ARRAY_TASK_ID", "16"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "16"),
            ("SLURM_ARRAY_TASK_COUNT", "16"),
        ]);
        let s = resolve_shard(None, None, &ones).unwrap();
        assert_eq!((s.index, s.count), (15, 16));
    }
}
