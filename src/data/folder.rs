//! torchvision's `ImageFolder` (`datasets.folder.make_dataset`), with the same
//! classes, labels and sample order:
//!
//! - classes: the sorted names of the root's subdirectories (symlinks to
//!   directories count), label = index in that order;
//! - per class, in label order: `sorted(os.walk(class_dir, followlinks=True))`,
//!   i.e. the directories ordered by their full path string, and in each one the
//!   sorted file names; a file is kept when its name ends with one of
//!   [`IMG_EXTENSIONS`], ignoring ASCII case.
//!
//! Python sorts `str` by code point, which for UTF-8 names is byte order: we sort
//! the raw bytes. Unlike `os.walk`, a symlink that loops back to one of its own
//! ancestors is not followed (Python would recurse until the path is too long),
//! and an unreadable subdirectory is an error rather than silently skipped.
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::DataError;

/// The extensions torchvision's `ImageFolder` accepts (compared lowercased).
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// An image folder: `root/<class>/**/<image>`.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    /// The root directory as given.
    pub root: PathBuf,
    /// Class names, sorted; a sample's label indexes this list.
    pub classes: Vec<String>,
    /// `(path, label)` in torchvision's order; paths start with `root`.
    pub samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Scans `root` as torchvision does. Errors: `root` missing or not a
    /// directory, no class directory, or a class without any image file (listing
    /// every such class, as torchvision does).
    pub fn new(root: &Path) -> Result<Self, DataError> {
        if !root.is_dir() {
            return Err(DataError::NotADirectory {
                path: root.to_path_buf(),
            });
        }
        let mut classes: Vec<OsString> = list_dir(root)?
            .into_iter()
            .filter(|(_, is_dir)| *is_dir)
            .map(|(name, _)| name)
            .collect();
        if classes.is_empty() {
            return Err(DataError::NoClasses {
                path: root.to_path_buf(),
            });
        }
        classes.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let before = samples.len();
            let mut dirs = Vec::new();
            walk(&root.join(class), Vec::new(), &mut Vec::new(), &mut dirs)?;
            dirs.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, dir, mut files) in dirs {
                files.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
                let kept = files.into_iter().filter(|f| has_image_extension(f));
                samples.extend(kept.map(|f| (dir.join(f), label)));
            }
            if samples.len() == before {
                empty.push(class.to_string_lossy().into_owned());
            }
        }
        if !empty.is_empty() {
            return Err(DataError::EmptyClasses {
                path: root.to_path_buf(),
                classes: empty,
            });
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            classes: classes
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect(),
            samples,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The samples as loader items (path, label as the one-element target).
    pub fn items(&self) -> Vec<super::loader::Item> {
        self.samples
            .iter()
            .map(|(p, l)| super::loader::Item {
                path: p.clone(),
                target: vec![*l as i64],
            })
            .collect()
    }

    /// Whether there is no sample (never true for a folder built by [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Whether `name` ends with one of [`IMG_EXTENSIONS`], ignoring ASCII case
/// (Python's `name.lower().endswith(...)`; no non-ASCII letter lowercases to
/// one of these ASCII extensions).
pub fn has_image_extension(name: &std::ffi::OsStr) -> bool {
    let bytes = name.as_encoded_bytes();
    IMG_EXTENSIONS.iter().any(|ext| {
        bytes.len() >= ext.len()
            && bytes[bytes.len() - ext.len()..].eq_ignore_ascii_case(ext.as_bytes())
    })
}

/// The entries of `dir` as `(name, is_dir)`, where `is_dir` follows symlinks
/// (a broken link is not a directory), as Python's `DirEntry.is_dir()`.
fn list_dir(dir: &Path) -> Result<Vec<(OsString, bool)>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let kind = entry
            .file_type()
            .map_err(|e| DataError::io(&entry.path(), e))?;
        let is_dir = kind.is_dir() || (kind.is_symlink() && entry.path().is_dir());
        out.push((entry.file_name(), is_dir));
    }
    Ok(out)
}

/// `os.walk(dir, followlinks=True)`: pushes `(path relative to the class
/// directory, with '/' separators, as bytes; directory; file names)` for `dir`
/// and every directory below it. `ancestors` holds the canonical paths of the
/// directories being walked, to stop at symlink loops.
#[allow(clippy::type_complexity)]
fn walk(
    dir: &Path,
    rel: Vec<u8>,
    ancestors: &mut Vec<PathBuf>,
    out: &mut Vec<(Vec<u8>, PathBuf, Vec<OsString>)>,
) -> Result<(), DataError> {
    let canonical = dir.canonicalize().map_err(|e| DataError::io(dir, e))?;
    if ancestors.contains(&canonical) {
        return Ok(());
    }
    ancestors.push(canonical);
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for (name, is_dir) in list_dir(dir)? {
        if is_dir {
            subdirs.push(name);
        } else {
            files.push(name);
        }
    }
    for name in subdirs {
        let mut sub_rel = rel.clone();
        if !sub_rel.is_empty() {
            sub_rel.push(b'/');
        }
        sub_rel.extend_from_slice(name.as_encoded_bytes());
        walk(&dir.join(&name), sub_rel, ancestors, out)?;
    }
    ancestors.pop();
    out.push((rel, dir.to_path_buf(), files));
    Ok(())
}

/// One evaluation set: an ImageFolder and its name (the folder's base name, or
/// the name a benchmark config gives it).
pub struct EvalSet {
    pub name: String,
    pub folder: ImageFolder,
}

impl EvalSet {
    /// Opens `dir`; errors name `flag` and the directory.
    pub fn open(dir: &Path, flag: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let folder = ImageFolder::new(dir).with_context(|| format!("{flag} {}", dir.display()))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(EvalSet { name, folder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn touch(root: &Path, rel: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, b"x").expect("write");
    }

    fn rel(folder: &ImageFolder) -> Vec<(String, usize)> {
        let base = folder.root.clone();
        folder
            .samples
            .iter()
            .map(|(p, l)| {
                (
                    p.strip_prefix(&base)
                        .expect("under root")
                        .display()
                        .to_string(),
                    *l,
                )
            })
            .collect()
    }

    #[test]
    fn classes_and_files_in_torchvision_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        // Byte order: 'B' < '_' < 'a'; "a b" < "a-b" < "a/x" (' ' < '-' < '/').
        for f in [
            "b/a/x/1.jpg",
            "b/a-b/2.JPG",
            "b/a b/3.png",
            "b/a/4.jpeg",
            "b/Z.webp",
            "b/top.Tiff",
            "b/notes.txt",
            "b/image.jpg.bak",
            "B/only.pgm",
            "_c/x.ppm",
            "_c/y.bmp",
            "_c/z.tif",
            "_c/é.png",
            "_c/e.png",
        ] {
            touch(root, f);
        }
        fs::write(root.join("stray_file.jpg"), b"x").expect("write");
        let folder = ImageFolder::new(root).expect("folder");
        assert_eq!(folder.classes, ["B", "_c", "b"]);
        let want: Vec<(String, usize)> = [
            ("B/only.pgm", 0),
            ("_c/e.png", 1),
            ("_c/x.ppm", 1),
            ("_c/y.bmp", 1),
            ("_c/z.tif", 1),
            ("_c/é.png", 1),
            ("b/Z.webp", 2),
            ("b/top.Tiff", 2),
            ("b/a/4.jpeg", 2),
            ("b/a b/3.png", 2),
            ("b/a-b/2.JPG", 2),
            ("b/a/x/1.jpg", 2),
        ]
        .iter()
        .map(|(p, l)| (p.to_string(), *l))
        .collect();
        assert_eq!(rel(&folder), want);
        assert_eq!(folder.len(), 12);
    }

    #[cfg(unix)]
    #[test]
    fn follows_symlinks_but_not_loops() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        touch(&root, "cls/real/1.jpg");
        touch(tmp.path(), "elsewhere/2.jpg");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), root.join("cls/link"))
            .expect("ln");
        std::os::unix::fs::symlink(root.join("cls"), root.join("cls/real/loop")).expect("ln");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), root.join("linked_class"))
            .expect("ln");
        let folder = ImageFolder::new(&root).expect("folder");
        assert_eq!(folder.classes, ["cls", "linked_class"]);
        let got = rel(&folder);
        assert_eq!(
            got,
            [
                ("cls/link/2.jpg".to_string(), 0),
                ("cls/real/1.jpg".to_string(), 0),
                ("linked_class/2.jpg".to_string(), 1)
            ]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("nope");
        let msg = ImageFolder::new(&missing).expect_err("missing").to_string();
        assert!(
            msg.contains("nope") && msg.contains("does not exist"),
            "{msg}"
        );

        fs::write(tmp.path().join("a.jpg"), b"x").expect("write");
        let msg = ImageFolder::new(tmp.path())
            .expect_err("no classes")
            .to_string();
        assert!(msg.contains("couldn't find any class folder"), "{msg}");

        touch(tmp.path(), "full/1.jpg");
        touch(tmp.path(), "zempty/readme.txt");
        fs::create_dir(tmp.path().join("empty")).expect("mkdir");
        let msg = ImageFolder::new(tmp.path())
            .expect_err("empty classes")
            .to_string();
        assert!(msg.contains("classes empty, zempty"), "{msg}");
        assert!(msg.contains(".jpg, .jpeg, .png"), "{msg}");
    }

    #[test]
    fn extensions_ignore_ascii_case_only() {
        for name in ["a.jpg", "b.JPEG", ".png", "c.TiF", "d.WebP", "e.x.ppm"] {
            assert!(has_image_extension(name.as_ref()), "{name}");
        }
        for name in ["a.jpgx", "b.gif", "jpg", "c.jp g", "d.png.txt"] {
            assert!(!has_image_extension(name.as_ref()), "{name}");
        }
    }
}
