//! Image data: decoding, resizing and transforms that reproduce PIL/torchvision
//! bit for bit, plus the two ways the original names its images (docs/data.md).
//!
//! - [`decode`]: a file to 8-bit RGB, as PIL's `Image.open(p).convert("RGB")`.
//! - [`resize`]: Pillow's antialiased bilinear resize (torchvision's `Resize`).
//! - [`transform`]: the eval and train transforms, to normalised CHW `f32`.
//! - [`folder`]: torchvision's `ImageFolder` (evaluation sets).
//! - [`list`]: the original's list files (`path label` and group lists).
//!
//! Nothing here depends on tch: tensors are plain `Vec<f32>` in CHW order.
use std::path::{Path, PathBuf};

pub mod decode;
pub mod folder;
pub mod list;
pub mod loader;
pub mod resize;
pub mod transform;

pub use decode::{decode_bytes, decode_file, RgbImage};
pub use folder::{EvalSet, ImageFolder, IMG_EXTENSIONS};
pub use list::{read_flat_list, read_group_list, FlatEntry, GroupEntry};
pub use resize::{resize_bilinear, ResizePlan};
pub use transform::{CenterCropTransform, EvalTransform, ImageTransform, Rng, TrainTransform};

/// Everything that can go wrong while reading image data. Each message names the
/// file (and the line, for list files) and, for images, the decoder's reason.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An image file is empty, truncated, corrupt or in a format we cannot read.
    #[error("cannot decode image {}: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    /// A line of a list file is malformed (`line` counts from 1).
    #[error("{}:{line}: {reason}", path.display())]
    ListLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A list file has no entries at all.
    #[error("list file {} is empty", path.display())]
    EmptyList { path: PathBuf },
    /// The root of an image folder is missing or not a directory.
    #[error("image folder {} does not exist or is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// An image folder has no class subdirectory.
    #[error("couldn't find any class folder in {}", path.display())]
    NoClasses { path: PathBuf },
    /// Some class subdirectories of an image folder hold no image file.
    #[error(
        "found no valid file for the classes {} in {}; supported extensions are: {}",
        classes.join(", "),
        path.display(),
        IMG_EXTENSIONS.join(", ")
    )]
    EmptyClasses { path: PathBuf, classes: Vec<String> },
    /// A size, crop or group configuration that cannot be used.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reading `tests/fixtures/images` (written by `make_image_fixtures.py`).
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::PathBuf;

    /// A good fixture: file name, size, and the reference sizes `(h, w, tensor)`.
    pub struct Good {
        pub file: String,
        pub width: usize,
        pub height: usize,
        pub sizes: Vec<(usize, usize, bool)>,
    }

    pub fn dir() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/images"
        ))
    }

    /// The good files and the broken ones (`(file, word its error must contain)`).
    pub fn manifest() -> (Vec<Good>, Vec<(String, String)>) {
        let text = std::fs::read_to_string(dir().join("manifest.txt")).expect("manifest.txt");
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(' ').collect();
            if f[0] == "bad" {
                bad.push((f[1].to_string(), f[2].to_string()));
                continue;
            }
            let sizes = f[3..]
                .iter()
                .map(|s| {
                    let (h, w) = s.trim_end_matches('+').split_once('x').expect("HxW");
                    (
                        h.parse().expect("h"),
                        w.parse().expect("w"),
                        s.ends_with('+'),
                    )
                })
                .collect();
            good.push(Good {
                file: f[0].to_string(),
                width: f[1].parse().expect("width"),
                height: f[2].parse().expect("height"),
                sizes,
            });
        }
        assert!(good.len() >= 30, "manifest lists {} good files", good.len());
        (good, bad)
    }

    pub fn reference(name: &str) -> Vec<u8> {
        let path = dir().join("ref").join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn reference_f32(name: &str) -> Vec<f32> {
        let bytes = reference(name);
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Largest absolute difference between two equally long byte buffers.
    pub fn max_diff(a: &[u8], b: &[u8]) -> u8 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0)
    }
}
