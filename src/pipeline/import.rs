//! Stage 2's other entrance: a feature store made from arrays computed anywhere
//! (`mos import`, docs/commands.md#import) instead of by [`super::extract`].
//!
//! The arrays (`.npy`, a member of an `.npz`, or a tensor of a safetensors file)
//! are checked — rows that agree, the shapes the store holds, finite values,
//! integer labels — and written as a one-shard store of the same format as an
//! extracted one, so `mos score` reads both alike. The manifest records every
//! array's file, name, SHA-256, element type and shape; the head (W, b), when
//! given, is written into the store as [`HEAD_FILE`].
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::extract::Extracted;
use super::store::{
    self, first_nonfinite_row, ImportRecord, ImportedArray, Manifest, HEAD_FILE, IMPORTED_PREFIX,
};
use crate::model::checkpoint::{serialize, write_atomic};
use crate::model::weights::raw_to_tensor;
use crate::weights::npz::{read_npy, read_npz};

/// Where one array is: a `.npy` file, or `FILE:NAME` for an array of an `.npz`
/// or safetensors file (the name defaults to the array's role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArraySource {
    pub file: PathBuf,
    pub key: Option<String>,
}

impl FromStr for ArraySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty path".into());
        }
        // FILE:NAME only when FILE is an .npz or safetensors path (a ':' may be in a path).
        if let Some((file, key)) = s.rsplit_once(':') {
            if [".npz", ".safetensors"].iter().any(|e| file.ends_with(e)) {
                if key.is_empty() {
                    return Err(format!("'{s}': no array name after ':'"));
                }
                return Ok(ArraySource {
                    file: file.into(),
                    key: Some(key.into()),
                });
            }
        }
        Ok(ArraySource {
            file: s.into(),
            key: None,
        })
    }
}

/// The arrays' roles, as `--arrays` files name them.
pub const ROLES: [&str; 5] = ["logits", "features", "labels", "head_weight", "head_bias"];

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// The roles of [`ROLES`] given one by one: where each array is.
    pub sources: Vec<(&'static str, ArraySource)>,
    /// `--arrays`: a file holding the other roles' arrays under their names (all
    /// optional but the logits).
    pub arrays: Option<PathBuf>,
    /// One path per row (a text file), or none.
    pub paths: Option<PathBuf>,
    /// No labels: every row is labelled 0 (an OOD set), as the manifest says.
    pub no_labels: bool,
    pub model_name: String,
    pub dataset: String,
    /// What the rows' paths are relative to (for score CSVs), or "".
    pub datadir: String,
    pub num_classes: Option<i64>,
    pub batch: usize,
    /// The command line (recorded in the manifest).
    pub command: Vec<String>,
}

/// The format of an array file, from its name.
fn file_kind(file: &Path) -> Result<&'static str> {
    let name = file.to_string_lossy();
    for ext in ["npy", "npz", "safetensors"] {
        if name.ends_with(&format!(".{ext}")) {
            return Ok(ext);
        }
    }
    bail!(
        "{}: not a .npy, .npz or .safetensors file (mos import reads those)",
        file.display()
    )
}

/// An array of a file: its name, the tensor, its element type as read.
type Named = (String, Tensor, String);

/// Reads every array of one file (a `.npy` file's one array has the name "").
fn read_file(file: &Path) -> Result<Vec<Named>> {
    let kind = file_kind(file)?;
    let described = |raw: &crate::weights::raw::RawTensor| -> Result<(Tensor, String)> {
        Ok((raw_to_tensor(raw)?, raw.dtype.name().to_string()))
    };
    Ok(match kind {
        "npy" => {
            let raw = read_npy(file)?;
            let (t, d) = described(&raw)?;
            vec![(String::new(), t, d)]
        }
        "npz" => read_npz(file)?
            .iter()
            .map(|(k, raw)| described(raw).map(|(t, d)| (k.clone(), t, d)))
            .collect::<Result<_>>()?,
        _ => {
            let ck = crate::model::checkpoint::load(file)?;
            ck.model
                .into_iter()
                .map(|(k, t)| {
                    let d = dtype_name(t.kind());
                    (k, t, d)
                })
                .collect()
        }
    })
}

/// A tensor kind under the names the .npy reader gives (`f32`, `i64`, ...).
fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::Double => "f64".into(),
        Kind::Half => "f16".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Int64 => "i64".into(),
        Kind::Int => "i32".into(),
        Kind::Int16 => "i16".into(),
        Kind::Int8 => "i8".into(),
        Kind::Uint8 => "u8".into(),
        Kind::Bool => "bool".into(),
        k => format!("{k:?}"),
    }
}

/// One array read: the tensor as in its file and its record.
struct Read {
    tensor: Tensor,
    record: ImportedArray,
}

fn read_arrays(req: &ImportRequest) -> Result<HashMap<&'static str, Read>> {
    let mut files: HashMap<PathBuf, (Vec<Named>, String)> = HashMap::new();
    let mut out = HashMap::new();
    // Each role's source, and whether it may be absent (a role --arrays lacks).
    let mut wanted: Vec<(&'static str, ArraySource, bool)> = Vec::new();
    for role in ROLES {
        if let Some((_, src)) = req.sources.iter().find(|(r, _)| *r == role) {
            wanted.push((role, src.clone(), false));
            continue;
        }
        let Some(file) = &req.arrays else {
            continue;
        };
        if role == "labels" && req.no_labels {
            continue;
        }
        if file_kind(file)? == "npy" {
            bail!(
                "--arrays {}: a .npy file holds one array; give it as --logits, --features, ...",
                file.display()
            );
        }
        let src = ArraySource {
            file: file.clone(),
            key: Some(role.to_string()),
        };
        wanted.push((role, src, role != "logits"));
    }
    for (role, src, optional) in &wanted {
        if !files.contains_key(&src.file) {
            let arrays = read_file(&src.file)?;
            let sha = store::sha256_file(&src.file)?;
            files.insert(src.file.clone(), (arrays, sha));
        }
        let (arrays, sha) = &files[&src.file];
        let kind = file_kind(&src.file)?;
        let (key, found) = if kind == "npy" {
            if src.key.is_some() {
                bail!(
                    "--{}: {} is a .npy file, which holds one array: drop ':{}'",
                    role.replace('_', "-"),
                    src.file.display(),
                    src.key.as_deref().unwrap_or("")
                );
            }
            (None, arrays.first())
        } else {
            let key = src.key.clone().unwrap_or_else(|| role.to_string());
            let found = arrays.iter().find(|(k, _, _)| *k == key);
            if found.is_none() && *optional {
                continue;
            }
            if found.is_none() {
                let names: Vec<&str> = arrays.iter().map(|(k, _, _)| k.as_str()).collect();
                bail!(
                    "--{}: {} has no array '{key}' (it has: {}); name another with FILE:NAME",
                    role.replace('_', "-"),
                    src.file.display(),
                    names.join(", ")
                );
            }
            (Some(key), found)
        };
        let (_, t, dtype) = found.context("internal: an empty .npy read")?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        out.insert(
            *role,
            Read {
                tensor: t.shallow_clone(),
                record: ImportedArray {
                    array: role.to_string(),
                    file: src.file.display().to_string(),
                    key,
                    sha256: sha.clone(),
                    dtype: dtype.clone(),
                    shape,
                },
            },
        );
    }
    Ok(out)
}

/// Names an array in messages: `--logits a.npz:logits`.
fn name(r: &Read) -> String {
    let a = &r.record;
    match &a.key {
        Some(k) => format!("--{} {}:{k}", a.array.replace('_', "-"), a.file),
        None => format!("--{} {}", a.array.replace('_', "-"), a.file),
    }
}

/// A floating-point array of `dims` dimensions as float32 (float64 and 16-bit
/// values converted, and said so in `notes`), refused when not finite.
fn float_array(r: &Read, dims: usize, notes: &mut Vec<String>) -> Result<Tensor> {
    let t = &r.tensor;
    if t.dim() != dims {
        bail!(
            "{}: {} dimension(s) {:?}, expected {dims} ({})",
            name(r),
            t.dim(),
            t.size(),
            if dims == 2 {
                "rows x width"
            } else {
                "one value per row"
            }
        );
    }
    let kind = t.kind();
    if !matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        bail!(
            "{}: element type {}, expected floating point",
            name(r),
            r.record.dtype
        );
    }
    if let Some(row) = first_nonfinite_row(t) {
        bail!(
            "{}: row {row} holds a NaN or infinite value; nothing was imported",
            name(r)
        );
    }
    if kind != Kind::Float {
        notes.push(format!(
            "{}: {} values stored as float32, as mos stores every output",
            name(r),
            r.record.dtype
        ));
    }
    Ok(t.to_kind(Kind::Float).contiguous())
}

/// Labels: integers, one per row, not negative.
fn label_array(r: &Read) -> Result<Vec<i64>> {
    let t = &r.tensor;
    if t.dim() != 1 {
        bail!(
            "{}: {} dimension(s) {:?}, expected one label per row",
            name(r),
            t.dim(),
            t.size()
        );
    }
    if !matches!(
        t.kind(),
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
    ) {
        bail!(
            "{}: element type {}, expected integers (class indices)",
            name(r),
            r.record.dtype
        );
    }
    let v = Vec::<i64>::try_from(t.to_kind(Kind::Int64))?;
    if let Some(i) = v.iter().position(|&l| l < 0) {
        bail!("{}: row {i} has the negative label {}", name(r), v[i]);
    }
    Ok(v)
}

/// Rows of `--paths`: one per line, none empty.
fn read_paths(file: &Path, rows: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--paths: cannot read {}", file.display()))?;
    let paths: Vec<String> = text.lines().map(str::to_string).collect();
    if let Some(i) = paths.iter().position(|p| p.trim().is_empty()) {
        bail!("--paths {}: line {} is empty", file.display(), i + 1);
    }
    if paths.len() != rows {
        bail!(
            "--paths {}: {} lines, but the arrays have {rows} rows",
            file.display(),
            paths.len()
        );
    }
    Ok(paths)
}

/// Every checked input of a store, ready to write.
pub struct Checked {
    pub manifest: Manifest,
    pub extracted: Extracted,
    pub paths: Vec<String>,
    /// The head's tensors (`weight`, `bias`), when imported.
    pub head: Option<(Tensor, Tensor)>,
    /// What was converted (for the log).
    pub notes: Vec<String>,
}

/// Reads and checks every array of `req`; nothing is written.
pub fn check(req: &ImportRequest) -> Result<Checked> {
    if req.model_name.trim().is_empty() || req.model_name.contains(char::is_whitespace) {
        bail!(
            "--model-name '{}': a name without spaces, the same for every store of one model",
            req.model_name
        );
    }
    let arrays = read_arrays(req)?;
    let mut notes = Vec::new();
    let logits = arrays
        .get("logits")
        .context("no logits: give --logits or an --arrays file with an array 'logits'")?;
    let logits_t = float_array(logits, 2, &mut notes)?;
    let rows = logits_t.size()[0] as usize;
    let classes = logits_t.size()[1];
    if rows == 0 || classes < 2 {
        bail!(
            "{}: {rows} rows of {classes} logits; a store needs rows and at least 2 logits",
            name(logits)
        );
    }
    let same_rows = |r: &Read, n: usize| -> Result<()> {
        if n != rows {
            bail!(
                "{} has {n} rows, but {} has {rows}: the arrays' rows must be the same images in the same order",
                name(r),
                name(logits)
            );
        }
        Ok(())
    };
    let features = match arrays.get("features") {
        Some(r) => {
            let f = float_array(r, 2, &mut notes)?;
            same_rows(r, f.size()[0] as usize)?;
            Some(f)
        }
        None => None,
    };
    let labels = match (arrays.get("labels"), req.no_labels) {
        (Some(r), false) => {
            let l = label_array(r)?;
            same_rows(r, l.len())?;
            l
        }
        (Some(_), true) => bail!("--no-labels with labels given: choose one"),
        (None, true) => {
            notes.push("--no-labels: every row is labelled 0".into());
            vec![0; rows]
        }
        (None, false) => bail!(
            "no labels: give --labels (or an array 'labels' in --arrays), or --no-labels for a set without classes (an OOD set)"
        ),
    };
    let max_label = labels.iter().copied().max().unwrap_or(0);
    let num_classes = match req.num_classes {
        Some(c) if c <= max_label => bail!("--num-classes {c}: the labels go up to {max_label}"),
        Some(c) => c,
        None => max_label + 1,
    };
    let head = match (arrays.get("head_weight"), arrays.get("head_bias")) {
        (None, None) => None,
        (Some(w), Some(b)) => {
            let Some(f) = &features else {
                bail!("a head without features: the methods that use the head apply it to the features (give --features)");
            };
            let dim = f.size()[1];
            let wt = float_array(w, 2, &mut notes)?;
            let bt = float_array(b, 1, &mut notes)?;
            if wt.size() != [classes, dim] {
                bail!(
                    "{}: shape {:?}, expected [{classes}, {dim}] (logits x features)",
                    name(w),
                    wt.size()
                );
            }
            if bt.size() != [classes] {
                bail!("{}: shape {:?}, expected [{classes}]", name(b), bt.size());
            }
            Some((wt, bt))
        }
        _ => bail!("the head needs both --head-weight and --head-bias"),
    };
    let paths = match &req.paths {
        Some(p) => read_paths(p, rows)?,
        None => (0..rows).map(|i| format!("row-{i}")).collect(),
    };
    let head_sha = match &head {
        Some((w, b)) => hex_sha(&head_bytes(w, b)?),
        None => String::new(),
    };
    let mut data = Sha256::new();
    for (p, l) in paths.iter().zip(&labels) {
        data.update(format!("{p}\t{l}\n"));
    }
    let mut layers = vec!["logits".to_string()];
    if features.is_some() {
        layers.push("features".into());
    }
    let mut record: Vec<ImportedArray> = Vec::new();
    for role in ROLES {
        if let Some(r) = arrays.get(role) {
            record.push(r.record.clone());
        }
    }
    let mut manifest = Manifest {
        format: store::FORMAT.into(),
        mos_version: env!("CARGO_PKG_VERSION").into(),
        model: format!("{IMPORTED_PREFIX}{}", req.model_name),
        checkpoint: if head.is_some() {
            HEAD_FILE.into()
        } else {
            String::new()
        },
        checkpoint_sha256: head_sha,
        checkpoint_format: "imported".into(),
        head_size: classes,
        num_classes,
        crop: 0,
        batch: req.batch,
        precision: "imported".into(),
        skip_bad_images: false,
        layers,
        datadir: req.datadir.clone(),
        list: None,
        dataset: req.dataset.clone(),
        images: rows,
        data_fingerprint: store::hex(&data.finalize()),
        num_shards: 1,
        fingerprint: String::new(),
        command: req.command.clone(),
        complete: false,
        group_config: None,
        resize: None,
        feature_dim: features.as_ref().map(|f| f.size()[1]),
        imported: Some(ImportRecord {
            arrays: record,
            paths: req.paths.as_ref().map(|p| p.display().to_string()),
        }),
        mean: None,
        std: None,
        head: None,
        rankfeat_power_iterations: None,
    };
    manifest.fingerprint = manifest.compute_fingerprint();
    Ok(Checked {
        manifest,
        extracted: Extracted {
            indices: (0..rows).collect(),
            labels,
            logits: logits_t,
            features,
            layers: Vec::new(),
            rankfeat: None,
            skipped: Vec::new(),
        },
        paths,
        head,
        notes,
    })
}

/// The head file's bytes (deterministic: the same W and b give the same file).
fn head_bytes(w: &Tensor, b: &Tensor) -> Result<Vec<u8>> {
    let tensors = vec![
        ("weight".to_string(), w.shallow_clone()),
        ("bias".to_string(), b.shallow_clone()),
    ];
    serialize(&tensors, HashMap::new())
}

fn hex_sha(bytes: &[u8]) -> String {
    store::hex(&Sha256::digest(bytes))
}

/// What [`write`] did.
pub enum Written {
    /// A new store, or one that lacked its shard.
    Store(Box<store::ShardIndex>),
    /// The store already holds exactly this import.
    AlreadyThere,
}

/// Writes the checked import as the store `dir` (its head first, then the shard,
/// then the manifest marked complete). A store that exists must hold the same
/// import (else an error naming the differences; nothing is written).
pub fn write(dir: &Path, c: &Checked) -> Result<Written> {
    let (m, new) = store::prepare_new(dir, &c.manifest, "another --output")?;
    if let store::ShardStatus::Complete(_) = store::complete_shard(dir, &m, 0)? {
        if let Some(n) = new {
            n.keep();
        }
        return Ok(Written::AlreadyThere);
    }
    if let Some((w, b)) = &c.head {
        write_atomic(&dir.join(HEAD_FILE), &head_bytes(w, b)?)?;
    }
    let idx = store::write_shard(dir, &m, 0, &c.extracted, &c.paths, "imported")?;
    if let Some(n) = new {
        n.keep();
    }
    let opened = store::open(dir, true)?;
    store::mark_complete(&opened)?;
    Ok(Written::Store(Box::new(idx)))
}
