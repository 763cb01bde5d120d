//! Making groupings (`mos make-groups`, docs/grouping.md): the WordNet taxonomy,
//! k-means of class-mean features and random partitions; the groups file
//! (GROUPS.json); and the group-softmax list written from a flat list.
pub mod kmeans;
pub mod wordnet;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::transform::Rng;
use wordnet::{parse_wnid, WordNet};

/// A groups file: what `--group-config` reads (`classes_per_group`,
/// `group_names`) plus the assignment itself and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupsFile {
    pub classes_per_group: Vec<i64>,
    pub group_names: Vec<String>,
    /// The class names of every group, in their in-group order (flat-label order).
    pub classes: Vec<Vec<String>>,
    #[serde(default)]
    pub strategy: String,
    #[serde(default)]
    pub settings: serde_json::Value,
}

impl GroupsFile {
    /// Builds a groups file from groups of class indices into `names`: each
    /// group's classes sorted by flat label (index), empty groups dropped.
    pub fn new(
        names: &[String],
        groups: Vec<(String, Vec<usize>)>,
        strategy: &str,
        settings: serde_json::Value,
    ) -> GroupsFile {
        let mut out = GroupsFile {
            classes_per_group: Vec::new(),
            group_names: Vec::new(),
            classes: Vec::new(),
            strategy: strategy.to_string(),
            settings,
        };
        for (name, mut members) in groups {
            if members.is_empty() {
                continue;
            }
            members.sort_unstable();
            out.classes_per_group.push(members.len() as i64);
            out.group_names.push(name);
            out.classes
                .push(members.iter().map(|&i| names[i].clone()).collect());
        }
        out
    }

    /// Reads a groups file, which must hold the class names of its groups.
    pub fn read(path: &Path) -> Result<GroupsFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read groups file {}", path.display()))?;
        let g: GroupsFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "groups file {}: expected {{\"classes_per_group\": [..], \"group_names\": [..], \"classes\": [[..], ..]}} (written by mos make-groups)",
                path.display()
            )
        })?;
        if g.classes.len() != g.classes_per_group.len() || g.group_names.len() != g.classes.len() {
            bail!(
                "groups file {}: {} counts, {} group names and {} class lists",
                path.display(),
                g.classes_per_group.len(),
                g.group_names.len(),
                g.classes.len()
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (k, (names, &n)) in g.classes.iter().zip(&g.classes_per_group).enumerate() {
            if names.len() as i64 != n || n < 1 {
                bail!(
                    "groups file {}: group {k} ({}) lists {} classes but classes_per_group says {n}",
                    path.display(),
                    g.group_names[k],
                    names.len()
                );
            }
            for c in names {
                if let Some(j) = seen.insert(c, k) {
                    bail!(
                        "groups file {}: class '{c}' is in group {j} and in group {k}",
                        path.display()
                    );
                }
            }
        }
        Ok(g)
    }

    /// Writes the file as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        crate::model::checkpoint::write_atomic(path, text.as_bytes())
    }
}

/// The paper's anchors, in the paper's group order (`rest` takes what no
/// anchor catches): animal, artifact, geological formation, fungus, the rest,
/// natural object, person, flower.
pub const DEFAULT_ANCHORS: &[&str] = &[
    "n00015388", // animal.n.01
    "n00021939", // artifact.n.01
    "n09287968", // geological_formation.n.01
    "n12992868", // fungus.n.01
    "rest",
    "n00019128", // natural_object.n.01
    "n00007846", // person.n.01
    "n11669921", // flower.n.01
];

/// Taxonomy grouping: each class joins the group of the first anchor on its
/// hypernym path (the class itself first, then its first-listed hypernym at each
/// step, docs/grouping.md), or the `rest` group when none is met. `classes`
/// are WordNet noun ids; `source` names where they came from, for errors.
pub fn taxonomy(
    wn: &WordNet,
    classes: &[String],
    source: &str,
    anchors: &[String],
) -> Result<Vec<(String, Vec<usize>)>> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut anchor_group: HashMap<u32, usize> = HashMap::new();
    let mut rest = None;
    for a in anchors {
        if a == "rest" {
            if rest.is_some() {
                bail!("--anchors: 'rest' given twice");
            }
            rest = Some(groups.len());
            groups.push(("rest".into(), Vec::new()));
            continue;
        }
        let o = wn.resolve(a).with_context(|| format!("--anchors: {a}"))?;
        if anchor_group.insert(o, groups.len()).is_some() {
            bail!("--anchors: {a} ({}) given twice", wordnet::wnid(o));
        }
        let name = wn.synset(o).map(|s| s.lemma.clone()).unwrap_or_default();
        groups.push((name, Vec::new()));
    }
    let rest = match rest {
        Some(r) => r,
        None => {
            groups.push(("rest".into(), Vec::new()));
            groups.len() - 1
        }
    };
    for (i, c) in classes.iter().enumerate() {
        let o = parse_wnid(c).with_context(|| {
            format!(
                "class '{c}' ({source}, class {i}) is not a WordNet noun id (n + 8 digits, e.g. n01440764), which the taxonomy strategy needs"
            )
        })?;
        if wn.synset(o).is_none() {
            bail!(
                "class '{c}' ({source}, class {i}): no such synset in {}",
                wn.dir.join("data.noun").display()
            );
        }
        let g = wn
            .path(o)?
            .iter()
            .find_map(|s| anchor_group.get(s).copied())
            .unwrap_or(rest);
        groups[g].1.push(i);
    }
    Ok(groups)
}

/// Random grouping: a seeded shuffle of the classes cut into `k` groups whose
/// sizes differ by at most one (the larger ones first).
pub fn random(n: usize, k: usize, seed: u64) -> Vec<(String, Vec<usize>)> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::derive(seed, 0);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut out = Vec::with_capacity(k);
    let mut start = 0;
    for g in 0..k {
        let size = n / k + usize::from(g < n % k);
        out.push((format!("group{g}"), order[start..start + size].to_vec()));
        start += size;
    }
    out
}

/// Groups from cluster labels, ordered by their smallest class index.
pub fn from_labels(labels: &[usize], k: usize) -> Vec<(String, Vec<usize>)> {
    let mut members = vec![Vec::new(); k];
    for (i, &l) in labels.iter().enumerate() {
        members[l].push(i);
    }
    members.retain(|m| !m.is_empty());
    members.sort_by_key(|m| m[0]);
    members
        .into_iter()
        .enumerate()
        .map(|(g, m)| (format!("group{g}"), m))
        .collect()
}

/// The group list made from a flat list, and the inverse map.
pub struct GroupList {
    /// The lines `path group class_in_group\n`.
    pub text: String,
    /// `flat_labels[g][c]`: the flat label of class `c` of group `g`.
    pub flat_labels: Vec<Vec<usize>>,
    /// `classes[g][c]`: the name of class `c` of group `g`.
    pub classes: Vec<Vec<String>>,
}

/// Writes the group-softmax list of a flat list (`path label` per line, parsed as
/// the list readers do: the last space-separated field is the label, the rest
/// the path). A line's class is `class_names[label]` if given, else the folder
/// its path names (the path's second-to-last component). Within a group, classes
/// are numbered by flat label.
pub fn group_list(
    groups: &GroupsFile,
    groups_path: &Path,
    flat: &Path,
    class_names: Option<&[String]>,
) -> Result<GroupList> {
    let text = std::fs::read_to_string(flat)
        .with_context(|| format!("cannot read flat list {}", flat.display()))?;
    let place: HashMap<&str, (usize, usize)> = groups
        .classes
        .iter()
        .enumerate()
        .flat_map(|(g, cs)| {
            cs.iter()
                .enumerate()
                .map(move |(j, c)| (c.as_str(), (g, j)))
        })
        .collect();
    let mut rows: Vec<(&str, usize)> = Vec::new();
    // label -> (class name, first line), and name -> (label, first line).
    let mut label_name: HashMap<usize, (String, usize)> = HashMap::new();
    let mut name_label: HashMap<String, (usize, usize)> = HashMap::new();
    let body = text.strip_suffix('\n').unwrap_or(&text);
    if body.trim().is_empty() {
        bail!("{}: an empty flat list", flat.display());
    }
    for (i, raw) in body.split('\n').enumerate() {
        let n = i + 1;
        let line = raw.trim();
        let (path, label) = line
            .rsplit_once(' ')
            .with_context(|| format!("{}:{n}: expected 'path label'", flat.display()))?;
        let digits = label.strip_prefix('+').unwrap_or(label);
        let label: usize = match digits.parse() {
            Ok(v) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => v,
            _ => bail!(
                "{}:{n}: label '{label}' is not a non-negative integer",
                flat.display()
            ),
        };
        if path.is_empty() {
            bail!("{}:{n}: empty path", flat.display());
        }
        let name = match class_names {
            Some(names) => names.get(label).cloned().with_context(|| {
                format!(
                    "{}:{n}: label {label}, but --classes names {} classes",
                    flat.display(),
                    names.len()
                )
            })?,
            None => {
                let mut parts = path.rsplit('/');
                parts.next();
                match parts.next() {
                    Some(d) if !d.is_empty() => d.to_string(),
                    _ => bail!(
                        "{}:{n}: '{path}' has no class folder; give --classes to name the labels",
                        flat.display()
                    ),
                }
            }
        };
        if let Some((other, m)) = label_name.get(&label) {
            if *other != name {
                bail!(
                    "{}:{n}: label {label} is class '{name}' here but '{other}' on line {m}",
                    flat.display()
                );
            }
        } else {
            if let Some((l, m)) = name_label.get(&name) {
                bail!(
                    "{}:{n}: class '{name}' has label {label} here but {l} on line {m}",
                    flat.display()
                );
            }
            if !place.contains_key(name.as_str()) {
                bail!(
                    "{}:{n}: class '{name}' (label {label}) is in no group of {}",
                    flat.display(),
                    groups_path.display()
                );
            }
            label_name.insert(label, (name.clone(), n));
            name_label.insert(name, (label, n));
        }
        rows.push((path, label));
    }
    // Every class of the groups needs its flat label to be numbered in its group.
    let named: HashMap<&str, usize> = class_names
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut flat_labels = Vec::with_capacity(groups.classes.len());
    let mut in_group = Vec::with_capacity(groups.classes.len());
    for (g, cs) in groups.classes.iter().enumerate() {
        let mut labels = Vec::with_capacity(cs.len());
        for c in cs {
            let l = match class_names {
                Some(_) => named.get(c.as_str()).copied(),
                None => name_label.get(c).map(|&(l, _)| l),
            };
            let l = l.with_context(|| {
                format!(
                    "class '{c}' of group {g} ({}) in {} {}, so its index in the group is unknown",
                    groups.group_names[g],
                    groups_path.display(),
                    match class_names {
                        Some(_) => "is not in --classes".to_string(),
                        None => format!(
                            "does not occur in {} (give --classes to number all classes)",
                            flat.display()
                        ),
                    }
                )
            })?;
            labels.push((l, c.clone()));
        }
        labels.sort_unstable();
        flat_labels.push(labels.iter().map(|(l, _)| *l).collect::<Vec<_>>());
        in_group.push(labels.into_iter().map(|(_, c)| c).collect());
    }
    let mut slot: HashMap<usize, (usize, usize)> = HashMap::new();
    for (g, ls) in flat_labels.iter().enumerate() {
        for (c, &l) in ls.iter().enumerate() {
            slot.insert(l, (g, c));
        }
    }
    let mut out = String::with_capacity(text.len() + rows.len() * 4);
    for (path, label) in rows {
        let (g, c) = slot[&label];
        out.push_str(&format!("{path} {g} {c}\n"));
    }
    Ok(GroupList {
        text: out,
        flat_labels,
        classes: in_group,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn taxonomy_agrees_with_the_paper_on_imagenet() {
        let wn = WordNet::open(&root().join("tests/fixtures/wordnet")).unwrap();
        let classes = lines(&root().join("configs/imagenet/imagenet1k_classes.txt"));
        let anchors: Vec<String> = DEFAULT_ANCHORS.iter().map(|s| s.to_string()).collect();
        let ours = GroupsFile::new(
            &classes,
            taxonomy(&wn, &classes, "test", &anchors).unwrap(),
            "taxonomy",
            serde_json::Value::Null,
        );
        let paper =
            GroupsFile::read(&root().join("configs/imagenet/taxonomy_level0.json")).unwrap();
        assert_eq!(ours.group_names, paper.group_names);
        let group_of = |g: &GroupsFile| -> HashMap<String, usize> {
            g.classes
                .iter()
                .enumerate()
                .flat_map(|(k, cs)| cs.iter().map(move |c| (c.clone(), k)))
                .collect()
        };
        let (a, b) = (group_of(&ours), group_of(&paper));
        let mut differ: Vec<&str> = classes
            .iter()
            .filter(|c| a[*c] != b[*c])
            .map(String::as_str)
            .collect();
        differ.sort_unstable();
        // The disagreements docs/grouping.md lists and explains.
        assert_eq!(
            differ,
            [
                "n02808304",
                "n02834397",
                "n03207743",
                "n03485794",
                "n03887697",
                "n07742313",
                "n09421951"
            ]
        );
        assert!(differ.len() * 100 <= classes.len());
    }

    #[test]
    fn taxonomy_rejects_bad_classes_and_anchors() {
        let wn = WordNet::open(&root().join("tests/fixtures/wordnet")).unwrap();
        let anchors: Vec<String> = DEFAULT_ANCHORS.iter().map(|s| s.to_string()).collect();
        let e = format!(
            "{:#}",
            taxonomy(
                &wn,
                &["n01440764".into(), "tabby".into()],
                "cls.txt",
                &anchors
            )
            .unwrap_err()
        );
        assert!(
            e.contains("'tabby'") && e.contains("cls.txt") && e.contains("not a WordNet"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            taxonomy(&wn, &["n00000042".into()], "cls.txt", &anchors).unwrap_err()
        );
        assert!(
            e.contains("n00000042") && e.contains("no such synset"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            taxonomy(
                &wn,
                &["n01440764".into()],
                "x",
                &["animal.n.01".into(), "n00015388".into()]
            )
            .unwrap_err()
        );
        assert!(e.contains("twice"), "{e}");
        // Own anchors by sense name; without 'rest' the rest goes last.
        let g = taxonomy(
            &wn,
            &["n01440764".into(), "n02084071".into(), "n03485794".into()],
            "x",
            &["dog.n.01".into(), "organism.n.01".into()],
        )
        .unwrap();
        assert_eq!(
            g,
            vec![
                ("dog".to_string(), vec![1]),
                ("organism".to_string(), vec![0]),
                ("rest".to_string(), vec![2])
            ]
        );
    }

    #[test]
    fn random_groups_are_seeded_and_balanced() {
        let a = random(10, 3, 5);
        assert_eq!(a, random(10, 3, 5));
        assert_ne!(a, random(10, 3, 6));
        let sizes: Vec<usize> = a.iter().map(|g| g.1.len()).collect();
        assert_eq!(sizes, vec![4, 3, 3]);
        let mut all: Vec<usize> = a.iter().flat_map(|g| g.1.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn paper_group_list_is_reproduced_byte_for_byte() {
        let gpath = root().join("configs/imagenet/taxonomy_level0.json");
        let groups = GroupsFile::read(&gpath).unwrap();
        let flat = root().join("configs/imagenet/imagenet2012_val_list.txt");
        let got = group_list(&groups, &gpath, &flat, None).unwrap();
        let want = std::fs::read_to_string(
            root().join("configs/imagenet/imagenet2012_group_softmax_val_list.txt"),
        )
        .unwrap();
        assert!(got.text == want, "the group list differs from the paper's");
        // The inverse map: group g, class c -> the flat label of that class.
        let classes = lines(&root().join("configs/imagenet/imagenet1k_classes.txt"));
        for (g, cs) in groups.classes.iter().enumerate() {
            for (c, name) in cs.iter().enumerate() {
                assert_eq!(classes[got.flat_labels[g][c]], *name);
            }
        }
        // The same with the labels named by --classes.
        let named = group_list(&groups, &gpath, &flat, Some(&classes)).unwrap();
        assert!(named.text == want);
    }

    #[test]
    fn group_list_errors_name_line_and_class() {
        let dir = tempfile::tempdir().unwrap();
        let gpath = dir.path().join("g.json");
        let groups = GroupsFile::new(
            &["a".into(), "b".into(), "c".into()],
            vec![("x".into(), vec![0, 2]), ("y".into(), vec![1])],
            "hand",
            serde_json::Value::Null,
        );
        groups.write(&gpath).unwrap();
        let groups = GroupsFile::read(&gpath).unwrap();
        let flat = dir.path().join("flat.txt");
        let run = |text: &str| {
            std::fs::write(&flat, text).unwrap();
            group_list(&groups, &gpath, &flat, None).map(|g| g.text)
        };
        assert_eq!(
            run("t/c/1.png 5\nt/a/2.png 1\nt/b/3.png 3\n").unwrap(),
            "t/c/1.png 0 1\nt/a/2.png 0 0\nt/b/3.png 1 0\n"
        );
        // Within a group, classes are numbered by flat label, whatever the file's order.
        let hand = dir.path().join("hand.json");
        std::fs::write(
            &hand,
            r#"{"classes_per_group": [2, 1], "group_names": ["x", "y"], "classes": [["c", "a"], ["b"]]}"#,
        )
        .unwrap();
        let hand_groups = GroupsFile::read(&hand).unwrap();
        std::fs::write(&flat, "t/c/1.png 5\nt/a/2.png 1\nt/b/3.png 3\n").unwrap();
        let got = group_list(&hand_groups, &hand, &flat, None).unwrap();
        assert_eq!(got.text, "t/c/1.png 0 1\nt/a/2.png 0 0\nt/b/3.png 1 0\n");
        assert_eq!(got.flat_labels, vec![vec![1, 5], vec![3]]);
        assert_eq!(got.classes[0], vec!["a", "c"]);
        let e = format!("{:#}", run("t/a/1.png 0\nt/d/2.png 1\n").unwrap_err());
        assert!(
            e.contains("flat.txt:2") && e.contains("'d'") && e.contains("no group"),
            "{e}"
        );
        let e = format!("{:#}", run("t/a/1.png 0\nt/b/2.png 0\n").unwrap_err());
        assert!(e.contains("flat.txt:2") && e.contains("label 0"), "{e}");
        let e = format!("{:#}", run("t/a/1.png 0\nt/b/2.png 1\n").unwrap_err());
        assert!(e.contains("'c'") && e.contains("does not occur"), "{e}");
        let e = format!("{:#}", run("t/a/1.png x\n").unwrap_err());
        assert!(e.contains("flat.txt:1") && e.contains("'x'"), "{e}");
        // A groups file whose counts do not match its classes.
        std::fs::write(
            &gpath,
            r#"{"classes_per_group": [1, 1], "group_names": ["x", "y"], "classes": [["a", "c"], ["b"]]}"#,
        )
        .unwrap();
        let e = format!("{:#}", GroupsFile::read(&gpath).unwrap_err());
        assert!(e.contains("g.json") && e.contains("group 0"), "{e}");
    }
}
