//! The original's image transforms (docs/data.md#transforms), on decoded RGB images:
//!
//! - eval: `Resize((crop, crop))`, `ToTensor()`, `Normalize(0.5, 0.5)`;
//! - train: `Resize((precrop, precrop))`, `RandomCrop((crop, crop))`,
//!   `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(0.5, 0.5)`.
//!
//! Output tensors are `Vec<f32>` of length `3 * crop * crop` in CHW order, values
//! `(x / 255 - 0.5) / 0.5` in [-1, 1], computed in f32 as torchvision does (so
//! the same bits). The random draws come from [`Rng`], seeded by the caller:
//! reproducible from the seed, though not torch's random stream.
use super::resize::ResizePlan;
use super::{DataError, RgbImage};

/// Side of the square eval input and of the train crop in the original.
pub const CROP: usize = 480;
/// Side of the square the train transform resizes to before cropping.
pub const PRECROP: usize = 512;
/// Normalisation mean and standard deviation, the same for R, G and B.
pub const MEAN: f32 = 0.5;
pub const STD: f32 = 0.5;

/// `ToTensor` + `Normalize(MEAN, STD)` of each 8-bit level, in f32 like torch.
pub fn level_table() -> [f32; 256] {
    std::array::from_fn(|v| (v as f32 / 255.0 - MEAN) / STD)
}

/// `ToTensor` + `Normalize` of the `width x height` window of `img` at
/// (`left`, `top`), mirrored left-right when `flip`, written CHW into `out`
/// (length `3 * width * height`).
fn to_tensor(img: &RgbImage, window: (usize, usize, usize, usize), flip: bool, out: &mut [f32]) {
    let lut = level_table();
    to_tensor_with(img, window, flip, [&lut, &lut, &lut], out);
}

/// [`to_tensor`] with a level table per channel (a mean and standard deviation
/// per channel).
fn to_tensor_with(
    img: &RgbImage,
    (left, top, width, height): (usize, usize, usize, usize),
    flip: bool,
    luts: [&[f32; 256]; 3],
    out: &mut [f32],
) {
    let plane = width * height;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for y in 0..height {
        let start = 3 * ((top + y) * img.width + left);
        let row = &img.data[start..start + 3 * width];
        let dst = y * width..(y + 1) * width;
        let (r, g, b) = (&mut r[dst.clone()], &mut g[dst.clone()], &mut b[dst]);
        for (x, px) in row.chunks_exact(3).enumerate() {
            let x = if flip { width - 1 - x } else { x };
            r[x] = luts[0][px[0] as usize];
            g[x] = luts[1][px[1] as usize];
            b[x] = luts[2][px[2] as usize];
        }
    }
}

/// The eval transform: resize to exactly `size x size` (aspect ratio not kept),
/// then normalise to CHW f32 in [-1, 1].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalTransform {
    /// Output side in pixels (the original uses [`CROP`] = 480).
    pub size: usize,
}

impl Default for EvalTransform {
    fn default() -> Self {
        EvalTransform { size: CROP }
    }
}

impl EvalTransform {
    /// Length of the output tensor: `3 * size * size`.
    pub fn output_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Applies the transform, returning a new CHW tensor.
    pub fn apply(&self, img: &RgbImage) -> Result<Vec<f32>, DataError> {
        let mut out = vec![0.0; self.output_len()];
        self.apply_into(img, &mut out)?;
        Ok(out)
    }

    /// Applies the transform into `out` (length [`Self::output_len`]), e.g. one
    /// slot of a batch buffer.
    pub fn apply_into(&self, img: &RgbImage, out: &mut [f32]) -> Result<(), DataError> {
        check_len(out, self.output_len())?;
        let resized = ResizePlan::new(img.width, img.height, self.size, self.size)?.run(img)?;
        to_tensor(&resized, (0, 0, self.size, self.size), false, out);
        Ok(())
    }
}

/// ImageNet's channel means and standard deviations, as torchvision's models use them.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// torchvision's ImageNet evaluation transform (docs/data.md#torchvision-evaluation):
/// `Resize(resize)` (the shorter side to `resize` pixels, the longer one
/// `int(resize * long / short)`, PIL bilinear with its antialiasing), then
/// `CenterCrop(crop)` (top and left rounded half to even, as Python's `round`), then
/// `ToTensor()` and `Normalize(mean, std)` in f32. torchvision's ResNets use
/// Resize(256), CenterCrop(224) and the ImageNet mean and standard deviation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CenterCropTransform {
    pub resize: usize,
    pub crop: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl CenterCropTransform {
    /// Resize(256), CenterCrop(224), ImageNet mean and standard deviation.
    pub const IMAGENET: CenterCropTransform = CenterCropTransform {
        resize: 256,
        crop: 224,
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };

    /// Length of the output tensor: `3 * crop * crop`.
    pub fn output_len(&self) -> usize {
        3 * self.crop * self.crop
    }

    /// The size `Resize(resize)` gives a `w x h` image: (width, height).
    pub fn resized_size(&self, w: usize, h: usize) -> (usize, usize) {
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        // Python's int(size * long / short): an exact product, one correctly rounded
        // division, truncated.
        let new_long = ((self.resize * long) as f64 / short as f64) as usize;
        if w <= h {
            (self.resize, new_long)
        } else {
            (new_long, self.resize)
        }
    }

    /// Applies the transform, returning a new CHW tensor.
    pub fn apply(&self, img: &RgbImage) -> Result<Vec<f32>, DataError> {
        let mut out = vec![0.0; self.output_len()];
        self.apply_into(img, &mut out)?;
        Ok(out)
    }

    /// Applies the transform into `out` (length [`Self::output_len`]).
    pub fn apply_into(&self, img: &RgbImage, out: &mut [f32]) -> Result<(), DataError> {
        check_len(out, self.output_len())?;
        if self.crop > self.resize {
            return Err(DataError::InvalidArgument(format!(
                "center crop {} is larger than the resized shorter side {}",
                self.crop, self.resize
            )));
        }
        let (w, h) = self.resized_size(img.width, img.height);
        let resized = ResizePlan::new(img.width, img.height, w, h)?.run(img)?;
        // torchvision: int(round((size - crop) / 2.0)), round half to even.
        let offset = |size: usize| ((size - self.crop) as f64 / 2.0).round_ties_even() as usize;
        let (left, top) = (offset(w), offset(h));
        let plane = self.crop * self.crop;
        for c in 0..3 {
            let lut: [f32; 256] =
                std::array::from_fn(|v| (v as f32 / 255.0 - self.mean[c]) / self.std[c]);
            let dst = &mut out[c * plane..(c + 1) * plane];
            for y in 0..self.crop {
                let row = 3 * ((top + y) * resized.width + left);
                for x in 0..self.crop {
                    dst[y * self.crop + x] = lut[resized.data[row + 3 * x + c] as usize];
                }
            }
        }
        Ok(())
    }
}

/// An evaluation transform: BiT's (resize to `crop x crop`, [-1, 1]) or
/// torchvision's (Resize, CenterCrop, mean and standard deviation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ImageTransform {
    Squash(EvalTransform),
    CenterCrop(CenterCropTransform),
}

impl ImageTransform {
    /// The side of the square output.
    pub fn size(&self) -> usize {
        match self {
            ImageTransform::Squash(t) => t.size,
            ImageTransform::CenterCrop(t) => t.crop,
        }
    }

    /// Length of the output tensor: `3 * size * size`.
    pub fn output_len(&self) -> usize {
        3 * self.size() * self.size()
    }

    /// The resized shorter side of a center-crop transform.
    pub fn resize(&self) -> Option<usize> {
        match self {
            ImageTransform::Squash(_) => None,
            ImageTransform::CenterCrop(t) => Some(t.resize),
        }
    }

    /// Applies the transform into `out` (length [`Self::output_len`]).
    pub fn apply_into(&self, img: &RgbImage, out: &mut [f32]) -> Result<(), DataError> {
        match self {
            ImageTransform::Squash(t) => t.apply_into(img, out),
            ImageTransform::CenterCrop(t) => t.apply_into(img, out),
        }
    }
}

impl From<EvalTransform> for ImageTransform {
    fn from(t: EvalTransform) -> Self {
        ImageTransform::Squash(t)
    }
}

/// One draw of the train transform's randomness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    /// Top and left of the crop in the `precrop x precrop` image.
    pub top: usize,
    pub left: usize,
    /// Whether the crop is mirrored left-right.
    pub flip: bool,
}

/// The train transform: resize to `precrop x precrop`, take a uniformly random
/// `crop x crop` window, mirror it with probability 1/2, normalise (to [-1, 1] as
/// BiT, or with a mean and standard deviation per channel).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainTransform {
    /// Side of the resized square ([`PRECROP`] = 512 in the original).
    pub precrop: usize,
    /// Side of the crop ([`CROP`] = 480 in the original); at most `precrop`.
    pub crop: usize,
    /// `None`: BiT's [-1, 1]; else (mean, std) per channel of pixels in [0, 1]
    /// (torchvision's models: [`IMAGENET_MEAN`], [`IMAGENET_STD`]).
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Default for TrainTransform {
    fn default() -> Self {
        TrainTransform {
            precrop: PRECROP,
            crop: CROP,
            normalize: None,
        }
    }
}

impl TrainTransform {
    /// Length of the output tensor: `3 * crop * crop`.
    pub fn output_len(&self) -> usize {
        3 * self.crop * self.crop
    }

    /// Draws the crop position (each of `0..=precrop - crop`, uniform, top first)
    /// and then the flip (`next_f64() < 0.5`), in torchvision's order.
    pub fn sample(&self, rng: &mut Rng) -> CropFlip {
        let span = (self.precrop.saturating_sub(self.crop) + 1) as u64;
        let top = rng.below(span) as usize;
        let left = rng.below(span) as usize;
        let flip = rng.next_f64() < 0.5;
        CropFlip { top, left, flip }
    }

    /// Draws the randomness from `rng` and applies the transform.
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> Result<Vec<f32>, DataError> {
        let mut out = vec![0.0; self.output_len()];
        self.apply_into(img, self.sample(rng), &mut out)?;
        Ok(out)
    }

    /// Applies the transform with a given draw into `out` (length
    /// [`Self::output_len`]).
    pub fn apply_into(
        &self,
        img: &RgbImage,
        draw: CropFlip,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        check_len(out, self.output_len())?;
        let last = self.precrop.checked_sub(self.crop);
        if self.crop == 0 || last.is_none_or(|l| draw.top > l || draw.left > l) {
            return Err(DataError::InvalidArgument(format!(
                "crop {} at ({}, {}) does not fit in {}x{}",
                self.crop, draw.top, draw.left, self.precrop, self.precrop
            )));
        }
        let resized =
            ResizePlan::new(img.width, img.height, self.precrop, self.precrop)?.run(img)?;
        let window = (draw.left, draw.top, self.crop, self.crop);
        match self.normalize {
            None => to_tensor(&resized, window, draw.flip, out),
            Some((mean, std)) => {
                let luts: [[f32; 256]; 3] = std::array::from_fn(|c| {
                    std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c])
                });
                to_tensor_with(
                    &resized,
                    window,
                    draw.flip,
                    [&luts[0], &luts[1], &luts[2]],
                    out,
                )
            }
        }
        Ok(())
    }
}

fn check_len(out: &[f32], want: usize) -> Result<(), DataError> {
    if out.len() != want {
        return Err(DataError::InvalidArgument(format!(
            "output buffer holds {} floats, the transform writes {want}",
            out.len()
        )));
    }
    Ok(())
}

/// A small, fast, seedable random generator (SplitMix64). Streams derived with
/// [`Rng::derive`] let parallel loaders give each sample its own reproducible
/// randomness whatever the thread schedule.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// An independent generator for stream `stream` of `seed` (e.g. a sample
    /// index mixed with the epoch).
    pub fn derive(seed: u64, stream: u64) -> Self {
        let mut base = Rng::new(seed ^ 0x6a09_e667_f3bc_c909);
        let mixed = base.next_u64() ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Rng::new(Rng::new(mixed).next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` without modulo bias (`n` >= 1; 0 for `n` = 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Lemire's multiply-shift with rejection.
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::decode::decode_file;
    use crate::data::fixtures;
    use crate::data::resize::resize_bilinear;

    #[test]
    fn level_table_matches_torchvision_bit_for_bit() {
        let want = fixtures::reference_f32("levels.f32");
        let got = level_table();
        assert_eq!(want.len(), 256);
        for (v, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "level {v}: {a} vs {b}");
        }
        assert_eq!((got[0], got[255]), (-1.0, 1.0));
    }

    #[test]
    fn eval_tensors_match_torchvision() {
        let (good, _) = fixtures::manifest();
        let mut checked = 0;
        for g in &good {
            let img = decode_file(&fixtures::dir().join(&g.file)).expect("fixture decodes");
            for &(h, w, _) in g.sizes.iter().filter(|s| s.2) {
                let want = fixtures::reference_f32(&format!("{}.{h}x{w}.f32", g.file));
                let got = if h == w {
                    EvalTransform { size: h }.apply(&img).expect("eval")
                } else {
                    let resized = resize_bilinear(&img, w, h).expect("resize");
                    let mut out = vec![0.0; 3 * h * w];
                    to_tensor(&resized, (0, 0, w, h), false, &mut out);
                    out
                };
                assert_eq!(got.len(), want.len(), "{}", g.file);
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert_eq!(diff, 0.0, "{} at {h}x{w}: max |diff| {diff}", g.file);
                checked += 1;
            }
        }
        assert!(checked >= 4, "only {checked} tensor references");
    }

    #[test]
    fn center_crop_tensors_match_torchvision() {
        // ref/tv/manifest.txt: Resize(41) + CenterCrop(32) of every good fixture (odd
        // margins: Python's round half to even), and rgb420.jpg at 256 / 224.
        let text = std::fs::read_to_string(fixtures::dir().join("ref/tv/manifest.txt"))
            .expect("ref/tv/manifest.txt");
        let mut checked = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(' ').collect();
            let (file, resize, crop) = (f[0], f[1].parse().unwrap(), f[2].parse().unwrap());
            let t = CenterCropTransform {
                resize,
                crop,
                ..CenterCropTransform::IMAGENET
            };
            let img = decode_file(&fixtures::dir().join(file)).expect("fixture decodes");
            let got = t.apply(&img).expect("transform");
            let want = fixtures::reference_f32(&format!("tv/{file}.{resize}-{crop}.f32"));
            assert_eq!(got.len(), want.len(), "{file}");
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert_eq!(diff, 0.0, "{file} at {resize}/{crop}: max |diff| {diff}");
            checked += 1;
        }
        assert!(checked >= 40, "only {checked} references");
    }

    #[test]
    fn center_crop_sizes_follow_torchvision() {
        let t = CenterCropTransform::IMAGENET;
        // int(256 * 500 / 375) = 341; the shorter side may be either.
        assert_eq!(t.resized_size(500, 375), (341, 256));
        assert_eq!(t.resized_size(375, 500), (256, 341));
        assert_eq!(t.resized_size(300, 300), (256, 256));
        let small = CenterCropTransform {
            resize: 16,
            crop: 32,
            ..t
        };
        let e = small.apply(&ramp(20, 20)).unwrap_err().to_string();
        assert!(e.contains("center crop 32 is larger"), "{e}");
    }

    fn ramp(w: usize, h: usize) -> RgbImage {
        let data = (0..3 * w * h).map(|i| (i * 7 % 251) as u8).collect();
        RgbImage::new(w, h, data).expect("image")
    }

    #[test]
    fn train_transform_crops_flips_and_is_reproducible() {
        let t = TrainTransform {
            precrop: 12,
            crop: 8,
            normalize: None,
        };
        let img = ramp(30, 17);
        let a = t.apply(&img, &mut Rng::new(7)).expect("train");
        let b = t.apply(&img, &mut Rng::new(7)).expect("train");
        assert_eq!(a, b);
        assert_eq!(a.len(), 3 * 8 * 8);
        // Against a crop of the resized image, done by hand.
        let resized = resize_bilinear(&img, 12, 12).expect("resize");
        let lut = level_table();
        for flip in [false, true] {
            let draw = CropFlip {
                top: 3,
                left: 1,
                flip,
            };
            let mut out = vec![0.0; t.output_len()];
            t.apply_into(&img, draw, &mut out).expect("train");
            for (c, y, x) in [(0, 0, 0), (1, 7, 2), (2, 4, 7)] {
                let sx = if flip { 1 + 7 - x } else { 1 + x };
                let want = lut[resized.data[3 * ((3 + y) * 12 + sx) + c] as usize];
                assert_eq!(out[c * 64 + y * 8 + x], want, "flip {flip} c{c} y{y} x{x}");
            }
        }
        let bad = CropFlip {
            top: 5,
            left: 0,
            flip: false,
        };
        assert!(t
            .apply_into(&img, bad, &mut vec![0.0; t.output_len()])
            .is_err());
        assert!(TrainTransform {
            precrop: 4,
            crop: 8,
            normalize: None,
        }
        .apply(&img, &mut Rng::new(1))
        .is_err());
    }

    #[test]
    fn a_train_crop_with_a_mean_and_std_normalises_each_channel() {
        let img = ramp(30, 17);
        let bit = TrainTransform {
            precrop: 12,
            crop: 8,
            normalize: None,
        };
        let (mean, std) = (IMAGENET_MEAN, IMAGENET_STD);
        let tv = TrainTransform {
            normalize: Some((mean, std)),
            ..bit
        };
        let draw = CropFlip {
            top: 3,
            left: 2,
            flip: true,
        };
        let (mut a, mut b) = (vec![0.0; bit.output_len()], vec![0.0; tv.output_len()]);
        bit.apply_into(&img, draw, &mut a).unwrap();
        tv.apply_into(&img, draw, &mut b).unwrap();
        let plane = 64;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            // The same pixel: level v gives (v/255 - 0.5)/0.5 and (v/255 - m)/s.
            let c = i / plane;
            let v = x * 0.5 + 0.5;
            assert!((y - (v - mean[c]) / std[c]).abs() < 1e-5, "{i}: {x} {y}");
        }
    }

    #[test]
    fn draws_cover_every_crop_and_both_flips() {
        let t = TrainTransform {
            precrop: 10,
            crop: 7,
            normalize: None,
        };
        let mut rng = Rng::derive(3, 11);
        let (mut seen, mut flips) = ([[false; 4]; 4], 0);
        for _ in 0..2000 {
            let d = t.sample(&mut rng);
            seen[d.top][d.left] = true;
            flips += d.flip as usize;
        }
        assert!(seen.iter().flatten().all(|&s| s));
        assert!((850..1150).contains(&flips), "{flips} flips in 2000");
        assert_ne!(Rng::derive(3, 11).next_u64(), Rng::derive(3, 12).next_u64());
        assert_eq!(Rng::new(5).below(1), 0);
    }

    #[test]
    fn eval_checks_buffer_length() {
        let img = ramp(5, 4);
        let t = EvalTransform { size: 3 };
        assert!(t.apply_into(&img, &mut [0.0; 26]).is_err());
        assert_eq!(t.apply(&img).expect("eval").len(), 27);
        assert_eq!(EvalTransform::default().size, 480);
    }
}
