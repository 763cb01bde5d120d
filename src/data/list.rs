//! The original's list files (docs/data.md#list-files), with image paths relative to a data
//! directory:
//!
//! - flat (`DatasetWithMeta`): `path label`;
//! - group (`DatasetWithMetaGroup`): `path group_index class_index_in_group`,
//!   whose target is a vector of G zeros but `target[group] = class + 1`
//!   (slot 0 of each group is its "others" class).
//!
//! Each line is parsed as the original does: `line.strip().split(' ')`, the
//! last one or two fields are the integers and everything before them, single
//! spaces included, is the path. A path joined to the data directory stays
//! absolute if it is absolute (`os.path.join`).
//!
//! The original crashes on a malformed line or silently mislabels (a negative
//! index wraps around); here every such line is an error naming `file:line`:
//! blank lines (a file's final newline is not a line), a missing field, an empty
//! path, an integer that is not plain decimal (optional `+`), a negative one,
//! a group index >= G or a class index >= that group's class count.
use std::path::{Path, PathBuf};

use super::DataError;

/// One line of a flat list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatEntry {
    /// The data directory joined with the listed path.
    pub path: PathBuf,
    /// The class index.
    pub label: usize,
}

/// One line of a group list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    /// The data directory joined with the listed path.
    pub path: PathBuf,
    /// The group index, in `0..G`.
    pub group: usize,
    /// The class index within the group, in `0..classes_per_group[group]`.
    pub class_in_group: usize,
}

impl GroupEntry {
    /// The training target: `num_groups` zeros but `class_in_group + 1` at
    /// `group` (as the original's `labels` array).
    pub fn target(&self, num_groups: usize) -> Vec<i64> {
        let mut t = vec![0; num_groups];
        if let Some(slot) = t.get_mut(self.group) {
            *slot = self.class_in_group as i64 + 1;
        }
        t
    }
}

/// Reads a flat list file (`path label` per line).
pub fn read_flat_list(list: &Path, datadir: &Path) -> Result<Vec<FlatEntry>, DataError> {
    parse_lines(list, 1, |fields, path| {
        Ok(FlatEntry {
            path: datadir.join(path),
            label: fields[0],
        })
    })
}

/// Labels of flat lists that leave gaps in `0..=max`.
#[derive(Debug, thiserror::Error)]
#[error(
    "{lists}: labels 0..{max} with {} missing: mos sizes the head as the original does, \
     one logit per distinct label ({distinct} here), so every class above a gap would \
     move to another logit; number the classes 0..{} without gaps",
    missing_text(missing, *total_missing),
    distinct - 1
)]
pub struct LabelGaps {
    /// The lists, as `--train-list a.txt / --val-list b.txt`.
    pub lists: String,
    /// The largest label.
    pub max: usize,
    /// Number of distinct labels.
    pub distinct: usize,
    /// The first missing labels (at most [`SHOWN_MISSING`]).
    pub missing: Vec<usize>,
    /// How many labels of `0..=max` are missing in all.
    pub total_missing: usize,
}

/// Missing labels listed in a [`LabelGaps`] message.
pub const SHOWN_MISSING: usize = 12;

fn missing_text(shown: &[usize], total: usize) -> String {
    let list: Vec<String> = shown.iter().map(usize::to_string).collect();
    if total > shown.len() {
        format!("{}, ... ({total} in all)", list.join(", "))
    } else {
        list.join(", ")
    }
}

/// The number of classes of flat lists, `max label + 1`, once every label in
/// `0..=max` occurs in at least one of them. `lists` holds, per list, the flag
/// that names it, its path and its labels. The original sizes the head by the
/// number of distinct labels, so labels with gaps are refused rather than given
/// dead logits (or classes shifted against a checkpoint of the original's).
pub fn flat_class_count(lists: &[(&str, &Path, &[usize])]) -> Result<usize, LabelGaps> {
    let labels: std::collections::BTreeSet<usize> = lists
        .iter()
        .flat_map(|(_, _, labels)| labels.iter().copied())
        .collect();
    let Some(&max) = labels.last() else {
        return Ok(0);
    };
    if labels.len() == max + 1 {
        return Ok(labels.len());
    }
    let mut missing = Vec::new();
    let mut next = 0;
    for &l in labels.iter().chain(std::iter::once(&(max + 1))) {
        missing.extend((next..l).take(SHOWN_MISSING - missing.len()));
        next = l + 1;
        if missing.len() == SHOWN_MISSING {
            break;
        }
    }
    Err(LabelGaps {
        lists: lists
            .iter()
            .map(|(flag, path, _)| format!("{flag} {}", path.display()))
            .collect::<Vec<_>>()
            .join(" / "),
        max,
        distinct: labels.len(),
        missing,
        total_missing: max + 1 - labels.len(),
    })
}

/// Reads a group list file (`path group class` per line), checking each line
/// against the group configuration `classes_per_group` (length G, e.g.
/// `taxonomy_level0.npy`).
pub fn read_group_list(
    list: &Path,
    datadir: &Path,
    classes_per_group: &[i64],
) -> Result<Vec<GroupEntry>, DataError> {
    if classes_per_group.is_empty() || classes_per_group.iter().any(|&n| n < 1) {
        return Err(DataError::InvalidArgument(format!(
            "group configuration {classes_per_group:?}: need at least one group, each with at least one class"
        )));
    }
    let g = classes_per_group.len();
    parse_lines(list, 2, |fields, path| {
        let (group, class) = (fields[0], fields[1]);
        if group >= g {
            return Err(format!(
                "group index {group} out of range: there are {g} groups"
            ));
        }
        let n = classes_per_group[group];
        if class as i64 >= n {
            return Err(format!(
                "class index {class} out of range: group {group} has {n} classes"
            ));
        }
        Ok(GroupEntry {
            path: datadir.join(path),
            group,
            class_in_group: class,
        })
    })
}

/// Reads `list` and turns each line into an entry: `make` gets the `ints`
/// trailing integers and the path, and returns an entry or the reason it is bad.
fn parse_lines<T>(
    list: &Path,
    ints: usize,
    make: impl Fn(&[usize], &str) -> Result<T, String>,
) -> Result<Vec<T>, DataError> {
    let bytes = std::fs::read(list).map_err(|e| DataError::io(list, e))?;
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    if body.is_empty() {
        return Err(DataError::EmptyList {
            path: list.to_path_buf(),
        });
    }
    let mut entries = Vec::new();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let bad = |reason: String| DataError::ListLine {
            path: list.to_path_buf(),
            line: i + 1,
            reason,
        };
        let line = std::str::from_utf8(raw).map_err(|_| bad("line is not valid UTF-8".into()))?;
        let (path, fields) = split_line(line.trim(), ints).map_err(bad)?;
        entries.push(make(&fields, path).map_err(bad)?);
    }
    Ok(entries)
}

/// Splits `line` (already stripped) at its last `ints` single spaces into a
/// path and non-negative integers.
fn split_line(line: &str, ints: usize) -> Result<(&str, Vec<usize>), String> {
    let expected = if ints == 1 {
        "`<path> <label>`"
    } else {
        "`<path> <group> <class>`"
    };
    if line.is_empty() {
        return Err(format!("blank line, expected {expected}"));
    }
    let mut rest = line;
    let mut fields = vec![0; ints];
    for slot in fields.iter_mut().rev() {
        let (head, tok) = rest
            .rsplit_once(' ')
            .ok_or_else(|| format!("too few fields in {line:?}, expected {expected}"))?;
        *slot = parse_index(tok)?;
        rest = head;
    }
    if rest.is_empty() {
        return Err(format!("empty image path in {line:?}, expected {expected}"));
    }
    Ok((rest, fields))
}

/// A non-negative decimal integer, as Python's `int()` reads it (surrounding
/// whitespace and a leading `+` allowed).
fn parse_index(tok: &str) -> Result<usize, String> {
    let t = tok.trim();
    let digits = t.strip_prefix('+').unwrap_or(t);
    if let Some(neg) = t.strip_prefix('-') {
        if !neg.is_empty() && neg.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("negative index {t}"));
        }
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("not an integer: {tok:?}"));
    }
    digits
        .parse()
        .map_err(|_| format!("integer out of range: {tok:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("list.txt");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn flat_list_with_spaces_in_paths() {
        let (_d, list) =
            write("val/a.JPEG 3\nmy dir/with  two spaces.jpg 12\r\n  /abs/x.png +0  \n");
        let got = read_flat_list(&list, Path::new("/data")).expect("parse");
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            FlatEntry {
                path: "/data/val/a.JPEG".into(),
                label: 3
            }
        );
        assert_eq!(got[1].path, Path::new("/data/my dir/with  two spaces.jpg"));
        assert_eq!(got[1].label, 12);
        assert_eq!(
            got[2],
            FlatEntry {
                path: "/abs/x.png".into(),
                label: 0
            }
        );
    }

    #[test]
    fn group_list_targets() {
        let (_d, list) = write("a b.jpg 0 2\nc.jpg 2 0\n");
        let got = read_group_list(&list, Path::new("d"), &[3, 1, 1]).expect("parse");
        assert_eq!(got[0].path, Path::new("d/a b.jpg"));
        assert_eq!((got[0].group, got[0].class_in_group), (0, 2));
        assert_eq!(got[0].target(3), [3, 0, 0]);
        assert_eq!(got[1].target(3), [0, 0, 1]);
    }

    #[test]
    fn class_count_refuses_label_gaps_naming_lists_and_labels() {
        let (a, b) = (Path::new("a.txt"), Path::new("b.txt"));
        let lists = |x: &'static [usize], y: &'static [usize]| {
            flat_class_count(&[("--train-list", a, x), ("--val-list", b, y)])
        };
        assert_eq!(lists(&[0, 2, 1], &[2]).unwrap(), 3);
        // A label only in the validation list fills the gap.
        assert_eq!(lists(&[0, 2], &[1]).unwrap(), 3);
        let msg = lists(&[0, 1, 2, 4, 5, 6, 8, 9], &[9, 0])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(
                "--train-list a.txt / --val-list b.txt: labels 0..9 with 3, 7 missing: "
            ),
            "{msg}"
        );
        assert!(
            msg.contains("one logit per distinct label (8 here)"),
            "{msg}"
        );
        assert!(msg.contains("0..7 without gaps"), "{msg}");
        // Missing labels at the start; a long run of them is cut short.
        let msg = lists(&[100], &[]).unwrap_err().to_string();
        assert!(
            msg.contains(
                "labels 0..100 with 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, ... (100 in all) missing"
            ),
            "{msg}"
        );
        // No error when there is nothing to count.
        assert_eq!(lists(&[], &[]).unwrap(), 0);
    }

    fn flat_error(text: &str) -> String {
        let (_d, list) = write(text);
        read_flat_list(&list, Path::new("."))
            .expect_err(text)
            .to_string()
    }

    fn group_error(text: &str) -> String {
        let (_d, list) = write(text);
        read_group_list(&list, Path::new("."), &[2, 3])
            .expect_err(text)
            .to_string()
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for (text, line, words) in [
            ("a.jpg 1\nb.jpg x\n", 2, "not an integer"),
            ("a.jpg 1\nb.jpg\n", 2, "too few fields"),
            ("a.jpg 1\n\nb.jpg 2\n", 2, "blank line"),
            ("a.jpg 1\nb.jpg 2\n\n", 3, "blank line"),
            ("a.jpg -1\n", 1, "negative"),
            ("a.jpg 1.5\n", 1, "not an integer"),
            (" 4\n", 1, "too few fields"),
            ("a.jpg 99999999999999999999999\n", 1, "out of range"),
        ] {
            let msg = flat_error(text);
            assert!(
                msg.contains(&format!("list.txt:{line}: ")),
                "{text:?}: {msg}"
            );
            assert!(msg.contains(words), "{text:?}: {msg}");
        }
        for (text, line, words) in [
            (
                "a.jpg 0 1\nb.jpg 2 0\n",
                2,
                "group index 2 out of range: there are 2 groups",
            ),
            (
                "a.jpg 1 3\n",
                1,
                "class index 3 out of range: group 1 has 3 classes",
            ),
            ("a.jpg 1\n", 1, "too few fields"),
        ] {
            let msg = group_error(text);
            assert!(
                msg.contains(&format!("list.txt:{line}: ")),
                "{text:?}: {msg}"
            );
            assert!(msg.contains(words), "{text:?}: {msg}");
        }
        assert!(flat_error("").contains("is empty"));
        assert!(flat_error("\n").contains("is empty"));
        let (_d, list) = write("a.jpg 0 0\n");
        assert!(read_group_list(&list, Path::new("."), &[]).is_err());
        assert!(read_flat_list(Path::new("/no/such/list.txt"), Path::new(".")).is_err());
    }

    /// The original repository's ImageNet validation lists, committed in
    /// configs/imagenet/ (see its README).
    #[test]
    fn real_imagenet_lists() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/imagenet"));
        let (flat, group, npy) = (
            dir.join("imagenet2012_val_list.txt"),
            dir.join("imagenet2012_group_softmax_val_list.txt"),
            dir.join("taxonomy_level0.npy"),
        );
        let classes_per_group = read_npy_i64(&npy);
        assert_eq!(classes_per_group, [398, 521, 9, 7, 52, 8, 3, 2]);
        let datadir = Path::new("/imagenet");
        let flat = read_flat_list(&flat, datadir).expect("flat list");
        assert_eq!(flat.len(), 50_000);
        assert_eq!(
            flat[0],
            FlatEntry {
                path: "/imagenet/val/n01751748/ILSVRC2012_val_00000001.JPEG".into(),
                label: 489
            }
        );
        assert_eq!(
            flat[49_999].path,
            Path::new("/imagenet/val/n02437616/ILSVRC2012_val_00050000.JPEG")
        );
        assert_eq!(flat[49_999].label, 185);
        assert_eq!(flat.iter().map(|e| e.label).max(), Some(999));
        let group = read_group_list(&group, datadir, &classes_per_group).expect("group list");
        assert_eq!(group.len(), 50_000);
        assert_eq!(group[0].target(8), [329, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(group[1].target(8), [0, 0, 3, 0, 0, 0, 0, 0]);
        assert!(group.iter().zip(&flat).all(|(g, f)| g.path == f.path));
        let mut per_group = vec![std::collections::BTreeSet::new(); 8];
        for g in &group {
            per_group[g.group].insert(g.class_in_group);
        }
        let counts: Vec<i64> = per_group.iter().map(|s| s.len() as i64).collect();
        assert_eq!(counts, classes_per_group);
    }

    /// A 1-D little-endian int64 `.npy` file.
    fn read_npy_i64(path: &Path) -> Vec<i64> {
        let bytes = std::fs::read(path).expect("npy");
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("header");
        assert!(
            header.contains("'<i8'") && header.contains("False"),
            "{header}"
        );
        bytes[10 + header_len..]
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect()
    }
}
