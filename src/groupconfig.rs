//! Group configurations (docs/method.md): the number of classes in each group, read
//! from the original's `.npy` (a 1-D int64 or int32 array such as
//! `taxonomy_level0.npy`) or from our JSON form
//! `{"classes_per_group": [4, 2, 3, 1], "group_names": ["tops", ...]}`
//! (`group_names` optional). Validation of the counts is `GroupSlices::new`'s.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::weights::npz::read_npy;
use crate::weights::raw::DType;

/// A group configuration as read from a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    pub classes_per_group: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_names: Option<Vec<String>>,
}

/// Reads a `.npy` or `.json` group configuration.
pub fn read_group_config(path: &Path) -> Result<GroupConfig> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let cfg = if is_json {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read group config {}", path.display()))?;
        let cfg = serde_json::from_str::<GroupConfig>(&text).with_context(|| {
            format!(
                "group config {}: expected {{\"classes_per_group\": [..]}}",
                path.display()
            )
        })?;
        // A groups file of mos make-groups also lists each group's classes: they
        // must agree with the counts (a hand edit may change one and not the other).
        let value: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(classes) = value.get("classes").and_then(|c| c.as_array()) {
            let sizes: Vec<i64> = classes
                .iter()
                .map(|g| g.as_array().map_or(-1, |a| a.len() as i64))
                .collect();
            if sizes != cfg.classes_per_group {
                bail!(
                    "group config {}: its class lists have {:?} classes but classes_per_group is {:?}",
                    path.display(),
                    sizes,
                    cfg.classes_per_group
                );
            }
        }
        cfg
    } else {
        let raw = read_npy(path)
            .with_context(|| format!("cannot read group config {}", path.display()))?;
        if raw.shape.len() != 1 || !matches!(raw.dtype, DType::I64 | DType::I32) {
            bail!(
                "group config {}: expected a 1-D int64 or int32 array, found {} {:?}",
                path.display(),
                raw.dtype,
                raw.shape
            );
        }
        let counts = raw.to_i64_vec().context("integer array")?;
        GroupConfig {
            classes_per_group: counts,
            group_names: None,
        }
    };
    if cfg.classes_per_group.is_empty() || cfg.classes_per_group.iter().any(|&n| n < 1) {
        bail!(
            "group config {}: every group needs at least one class, got {:?}",
            path.display(),
            cfg.classes_per_group
        );
    }
    if let Some(names) = &cfg.group_names {
        if names.len() != cfg.classes_per_group.len() {
            bail!(
                "group config {}: {} group names for {} groups",
                path.display(),
                names.len(),
                cfg.classes_per_group.len()
            );
        }
    }
    Ok(cfg)
}

/// Compares the split of `--group-config path` (`given`) with the one `source`
/// (a checkpoint or a store's manifest) records. A different split is an error
/// naming both: MOS scored with another split than the model was trained with
/// gives plausible but wrong numbers. When `source` records none (e.g. the
/// paper's `.pth.tar`): the line to log saying that the split could not be checked.
pub fn check_split(
    given: &[i64],
    path: &Path,
    recorded: Option<&[i64]>,
    source: &str,
) -> Result<Option<String>> {
    let show = |g: &[i64]| format!("{g:?}");
    match recorded {
        Some(r) if r == given => Ok(None),
        Some(r) => bail!(
            "--group-config {} splits the classes as {} ({} groups), but {source} was trained with the split {} ({} groups); MOS needs the split the model was trained with: give that group config",
            path.display(),
            show(given),
            given.len(),
            show(r),
            r.len()
        ),
        None => Ok(Some(format!(
            "the group split of --group-config {} ({}) could not be checked: {source} records none",
            path.display(),
            show(given)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_groups_files_in_configs() {
        for f in [
            "configs/fashion_mnist_groups.json",
            "configs/imagenet/taxonomy_level0.json",
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            read_group_config(&p).unwrap();
        }
    }

    #[test]
    fn reads_the_papers_taxonomy_npy() {
        // The original repository's file, committed in configs/imagenet/.
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/imagenet/taxonomy_level0.npy");
        let cfg = read_group_config(&p).unwrap();
        assert_eq!(cfg.classes_per_group, vec![398, 521, 9, 7, 52, 8, 3, 2]);
    }

    #[test]
    fn reads_json_and_rejects_bad_configs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.json");
        std::fs::write(
            &p,
            r#"{"classes_per_group": [4, 2], "group_names": ["a", "b"]}"#,
        )
        .unwrap();
        assert_eq!(read_group_config(&p).unwrap().classes_per_group, vec![4, 2]);
        std::fs::write(&p, r#"{"classes_per_group": [4, 0]}"#).unwrap();
        let e = read_group_config(&p).unwrap_err().to_string();
        assert!(
            e.contains("g.json") && e.contains("at least one class"),
            "{e}"
        );
        std::fs::write(
            &p,
            r#"{"classes_per_group": [2, 1], "classes": [["a"], ["b", "c"]]}"#,
        )
        .unwrap();
        let e = read_group_config(&p).unwrap_err().to_string();
        assert!(e.contains("g.json") && e.contains("[1, 2]"), "{e}");
        std::fs::write(&p, r#"{"classes": [4]}"#).unwrap();
        assert!(format!("{:#}", read_group_config(&p).unwrap_err()).contains("g.json"));
        let e = format!(
            "{:#}",
            read_group_config(&dir.path().join("none.npy")).unwrap_err()
        );
        assert!(e.contains("none.npy"), "{e}");
    }

    #[test]
    fn a_split_other_than_the_recorded_one_is_refused() {
        let p = Path::new("g.json");
        assert_eq!(
            check_split(&[4, 2, 3, 1], p, Some(&[4, 2, 3, 1]), "ckpt").unwrap(),
            None
        );
        let e = check_split(&[5, 1, 3, 1], p, Some(&[4, 2, 3, 1]), "ckpt")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[5, 1, 3, 1]") && e.contains("[4, 2, 3, 1]"),
            "{e}"
        );
        assert!(e.contains("g.json") && e.contains("ckpt"), "{e}");
        let line = check_split(&[4, 2, 3, 1], p, None, "bit.pth.tar").unwrap();
        assert!(line.unwrap().contains("bit.pth.tar records none"));
    }
}
