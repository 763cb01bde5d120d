//! The ResNetV2 variants: the 12 BiT models of the paper code's `KNOWN_MODELS`
//! (docs/model.md#variants) and small ones for small images and tests.
use std::fmt;
use std::str::FromStr;

/// One architecture: units per stage and the base width (64 x width factor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    /// Number of PreActBottleneck units in block1..block4.
    pub units: [usize; 4],
    /// Root output channels, `64 * wf`. Stage outputs are 4, 8, 16, 32 times this.
    pub base: i64,
}

const fn v(name: &'static str, units: [usize; 4], base: i64) -> Variant {
    Variant { name, units, base }
}

const R50: [usize; 4] = [3, 4, 6, 3];
const R101: [usize; 4] = [3, 4, 23, 3];
const R152: [usize; 4] = [3, 8, 36, 3];

/// Every variant `--model` accepts. The BiT names are those of Google's BiT release
/// (S = ImageNet-1k, M = ImageNet-21k pretraining; same architecture). The
/// `ResNetV2-*x0.5` models (width factor 0.5, the smallest GroupNorm(32) allows) are
/// for small images, tests and the demo; no pretrained weights exist for them.
pub const VARIANTS: &[Variant] = &[
    v("BiT-S-R50x1", R50, 64),
    v("BiT-M-R50x1", R50, 64),
    v("BiT-S-R50x3", R50, 192),
    v("BiT-M-R50x3", R50, 192),
    v("BiT-S-R101x1", R101, 64),
    v("BiT-M-R101x1", R101, 64),
    v("BiT-S-R101x3", R101, 192),
    v("BiT-M-R101x3", R101, 192),
    v("BiT-S-R152x2", R152, 128),
    v("BiT-M-R152x2", R152, 128),
    v("BiT-S-R152x4", R152, 256),
    v("BiT-M-R152x4", R152, 256),
    v("ResNetV2-R14x0.5", [1, 1, 1, 1], 32),
    v("ResNetV2-R26x0.5", [2, 2, 2, 2], 32),
    v("ResNetV2-R50x0.5", R50, 32),
];

impl Variant {
    /// Channels of the 5 feature layers: root, block1..block4.
    pub fn feature_channels(&self) -> [i64; 5] {
        let b = self.base;
        [b, 4 * b, 8 * b, 16 * b, 32 * b]
    }

    /// Channels entering the head (`2048 * wf`).
    pub fn head_in(&self) -> i64 {
        32 * self.base
    }

    /// All names, comma-separated, for help texts and errors.
    pub fn all_names() -> String {
        VARIANTS
            .iter()
            .map(|v| v.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VARIANTS
            .iter()
            .find(|v| v.name.eq_ignore_ascii_case(s))
            .copied()
            .ok_or_else(|| format!("unknown model '{s}'; known: {}", Variant::all_names()))
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_case_insensitively() {
        let v: Variant = "bit-s-r101x1".parse().unwrap();
        assert_eq!(v.units, [3, 4, 23, 3]);
        assert_eq!(v.head_in(), 2048);
        assert_eq!("BiT-M-R152x4".parse::<Variant>().unwrap().head_in(), 8192);
        let e = "R18".parse::<Variant>().unwrap_err();
        assert!(e.contains("BiT-S-R50x1"), "{e}");
        assert_eq!(VARIANTS.len(), 15);
    }

    #[test]
    fn group_norm_widths_divide_by_32() {
        for v in VARIANTS {
            for c in v.feature_channels() {
                assert_eq!(c % 32, 0, "{}", v.name);
            }
            assert_eq!(v.base % 32, 0, "{} cmid of block1", v.name);
        }
    }
}
