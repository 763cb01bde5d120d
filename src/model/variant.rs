//! The ResNetV2 variants: the 12 BiT models of the paper code's `KNOWN_MODELS`
//! (docs/model.md#variants) and small ones for small images and tests.
use std::fmt;
use std::str::FromStr;

/// The network family of an architecture: what builds it, which weights it reads
/// and how its images are prepared (docs/model.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BiT's ResNetV2 ([`super::bit`]): images resized to `crop x crop`, in [-1, 1].
    Bit,
    /// torchvision's ResNets ([`super::resnet`]): Resize, CenterCrop, ImageNet
    /// mean and standard deviation.
    TorchvisionResNet,
    /// torchvision's Vision Transformers ([`super::vit`]), the same transform at
    /// their fixed image size.
    TorchvisionViT,
    /// A user's TorchScript module ([`super::script`]): the transform of `--resize`,
    /// `--crop`, `--mean` and `--std` (torchvision's ImageNet preset by default).
    TorchScript,
}

/// One architecture: units per stage and the base width (64 x width factor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    /// Number of residual units (blocks) in stage 1..4.
    pub units: [usize; 4],
    /// Root output channels, `64 * wf`. Stage outputs are 4, 8, 16, 32 times this
    /// (BiT and torchvision's bottleneck ResNets; 1, 2, 4, 8 times for ResNet-18/34).
    pub base: i64,
    pub family: Family,
}

const fn v(name: &'static str, units: [usize; 4], base: i64) -> Variant {
    Variant {
        name,
        units,
        base,
        family: Family::Bit,
    }
}

const fn tv(name: &'static str, units: [usize; 4]) -> Variant {
    Variant {
        name,
        units,
        base: 64,
        family: Family::TorchvisionResNet,
    }
}

/// A torchvision ViT (no units or base width: [`super::vit::ViTArch`] has its shape).
const fn vit(name: &'static str) -> Variant {
    Variant {
        name,
        units: [0; 4],
        base: 0,
        family: Family::TorchvisionViT,
    }
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

/// `--model torchscript`: a TorchScript module ([`super::script`]); its widths are
/// the module's (no units or base width).
pub const TORCHSCRIPT: Variant = Variant {
    name: "torchscript",
    units: [0; 4],
    base: 0,
    family: Family::TorchScript,
};

/// torchvision's ResNets and ViTs `--model` accepts (weights: torchvision's state-dict
/// files).
pub const TORCHVISION_VARIANTS: &[Variant] = &[
    tv("resnet18", [2, 2, 2, 2]),
    tv("resnet34", [3, 4, 6, 3]),
    tv("resnet50", R50),
    tv("resnet101", R101),
    tv("resnet152", R152),
    vit("vit_b_16"),
    vit("vit_b_32"),
    vit("vit_l_16"),
    vit("vit_l_32"),
    vit("vit_h_14"),
];

impl Variant {
    /// Channels of the 5 feature layers: root, block1..block4.
    pub fn feature_channels(&self) -> [i64; 5] {
        if let Some(a) = self.torchvision_resnet() {
            return a.feature_channels();
        }
        if let Some(a) = self.torchvision_vit() {
            return a.feature_dims();
        }
        let b = self.base;
        [b, 4 * b, 8 * b, 16 * b, 32 * b]
    }

    /// Channels entering the head (`2048 * wf`; 512 for ResNet-18/34).
    pub fn head_in(&self) -> i64 {
        if let Some(a) = self.torchvision_resnet() {
            return a.head_in();
        }
        if let Some(a) = self.torchvision_vit() {
            return a.head_in();
        }
        32 * self.base
    }

    /// The torchvision architecture, for that family.
    pub fn torchvision_resnet(&self) -> Option<super::resnet::ResNetArch> {
        match self.family {
            Family::TorchvisionResNet => self.name.parse().ok(),
            _ => None,
        }
    }

    /// The torchvision ViT, for that family.
    pub fn torchvision_vit(&self) -> Option<super::vit::ViTArch> {
        match self.family {
            Family::TorchvisionViT => self.name.parse().ok(),
            _ => None,
        }
    }

    /// Whether the weights are torchvision's (state-dict names, bookkeeping keys).
    pub fn is_torchvision(&self) -> bool {
        matches!(
            self.family,
            Family::TorchvisionResNet | Family::TorchvisionViT
        )
    }

    /// Whether mos can take the feature layers of the stem and the four stages
    /// (Mahalanobis): every family but a TorchScript module, which gives only
    /// (logits, features).
    pub fn has_feature_layers(&self) -> bool {
        self.family != Family::TorchScript
    }

    /// Refuses Mahalanobis (`what`) for a model without feature layers.
    pub fn require_feature_layers(&self, what: &str) -> Result<(), String> {
        if self.has_feature_layers() {
            return Ok(());
        }
        Err(format!(
            "{what} needs the feature layers of the stem and the four stages, which --model {} does not give (its forward returns logits and features only); leave Mahalanobis out",
            self.name
        ))
    }

    /// Refuses RankFeat (`what`) for a model without the convolutional stage maps it
    /// takes (BiT and torchvision's ResNets have them).
    pub fn require_rankfeat_maps(&self, what: &str) -> Result<(), String> {
        if matches!(self.family, Family::Bit | Family::TorchvisionResNet) {
            return Ok(());
        }
        Err(format!(
            "{what}: RankFeat removes the rank-1 part of the feature maps of stages 3 and 4 of a convolutional network; mos runs it on BiT and torchvision's ResNets, not on {}",
            self.name
        ))
    }

    /// The names of the head's weight and bias in the family's state dicts.
    pub fn head_tensor_names(&self) -> (&'static str, &'static str) {
        match self.family {
            Family::Bit => ("head.conv.weight", "head.conv.bias"),
            Family::TorchvisionResNet => ("fc.weight", "fc.bias"),
            Family::TorchvisionViT => ("heads.head.weight", "heads.head.bias"),
            // The default --head; a module's own prefix is in its store's manifest.
            Family::TorchScript => ("fc.weight", "fc.bias"),
        }
    }

    /// The side of the square images the model sees by default (`--crop`): 480 for
    /// BiT (the original's), 224 for torchvision's ImageNet models (a ViT's fixed
    /// image size).
    pub fn default_crop(&self) -> usize {
        match self.family {
            Family::Bit => 480,
            Family::TorchvisionResNet | Family::TorchScript => 224,
            Family::TorchvisionViT => super::vit::DEFAULT_IMAGE_SIZE as usize,
        }
    }

    /// The evaluation transform of this architecture at `crop`: BiT's resize to
    /// `crop x crop`, or torchvision's Resize(`resize`), CenterCrop(`crop`) and the
    /// ImageNet mean and standard deviation (`resize` by default `crop * 256 / 224`,
    /// 256 for 224). Errors name the flag.
    pub fn eval_transform(
        &self,
        crop: usize,
        resize: Option<usize>,
    ) -> Result<crate::data::ImageTransform, String> {
        use crate::data::{CenterCropTransform, EvalTransform};
        if crop == 0 {
            return Err("--crop must be at least 1".into());
        }
        match self.family {
            Family::Bit => match resize {
                Some(r) => Err(format!(
                    "--resize {r}: {} resizes every image to --crop x --crop; --resize applies to torchvision's models",
                    self.name
                )),
                None => Ok(EvalTransform { size: crop }.into()),
            },
            Family::TorchvisionResNet | Family::TorchvisionViT | Family::TorchScript => {
                let size = self.default_crop();
                if self.family == Family::TorchvisionViT && crop != size {
                    return Err(format!(
                        "--crop {crop}: {} takes {size} x {size} images (its position embedding has a row per {}-pixel patch); give --crop {size} or leave it out",
                        self.name,
                        self.torchvision_vit().map_or(0, |a| a.patch)
                    ));
                }
                let resize = resize.unwrap_or(crop * 256 / 224);
                if resize < crop {
                    return Err(format!(
                        "--resize {resize} is smaller than --crop {crop}: the center crop would not fit"
                    ));
                }
                Ok(crate::data::ImageTransform::CenterCrop(CenterCropTransform {
                    resize,
                    crop,
                    ..CenterCropTransform::IMAGENET
                }))
            }
        }
    }

    /// Refuses a family other than BiT for `what` (a command that only BiT models
    /// run: forward, convert, bench-train).
    pub fn require_bit(&self, what: &str) -> Result<(), String> {
        match self.family {
            Family::Bit => Ok(()),
            _ => Err(format!(
                "--model {}: {what} runs BiT models only; torchvision's models and TorchScript modules are supported by mos extract, score, test-mos, test-baseline, tune-mahalanobis (not TorchScript) and benchmark, torchvision's models also by finetune-group and finetune-flat",
                self.name
            )),
        }
    }

    /// All names, comma-separated, for help texts and errors.
    pub fn all_names() -> String {
        VARIANTS
            .iter()
            .chain(TORCHVISION_VARIANTS)
            .chain([&TORCHSCRIPT])
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
            .chain(TORCHVISION_VARIANTS)
            .chain([&TORCHSCRIPT])
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
