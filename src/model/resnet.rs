//! torchvision's ResNets (`torchvision.models.resnet18` ... `resnet152`), the V1
//! architecture as torchvision builds it (docs/model.md#torchvision-resnets):
//! BatchNorm after every convolution, the stride of a bottleneck on its 3x3
//! convolution, a 7x7/2 stem with a 3x3/2 max-pool, global average pooling and a
//! linear head. Variable names are torchvision's state-dict keys (`conv1.weight`,
//! `layer1.0.bn1.running_mean`, `fc.bias`, ...), so its weight files load as they are
//! (`num_batches_tracked` is a counter used only in training mode; it is not a
//! variable here).
//!
//! The five feature layers (for Mahalanobis) are the stem's output and layer1..4's,
//! as for BiT; the pre-logit features are the pooled output of layer4 (the head's
//! input, 512 or 2048 channels).
use std::fmt;
use std::str::FromStr;

use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

use super::inplace;

/// The residual block of an architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1, 3x3 (with the stride), 1x1 (ResNet-50/101/152), expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels over the block's width.
    pub fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// One torchvision ResNet architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetArch {
    /// The name `--model` takes (torchvision's function name).
    pub name: &'static str,
    pub block: BlockKind,
    /// Blocks in layer1..layer4.
    pub layers: [usize; 4],
}

/// Every torchvision ResNet `--model` accepts.
pub const RESNETS: &[ResNetArch] = &[
    ResNetArch {
        name: "resnet18",
        block: BlockKind::Basic,
        layers: [2, 2, 2, 2],
    },
    ResNetArch {
        name: "resnet34",
        block: BlockKind::Basic,
        layers: [3, 4, 6, 3],
    },
    ResNetArch {
        name: "resnet50",
        block: BlockKind::Bottleneck,
        layers: [3, 4, 6, 3],
    },
    ResNetArch {
        name: "resnet101",
        block: BlockKind::Bottleneck,
        layers: [3, 4, 23, 3],
    },
    ResNetArch {
        name: "resnet152",
        block: BlockKind::Bottleneck,
        layers: [3, 8, 36, 3],
    },
];

impl ResNetArch {
    /// Channels of the five feature layers: the stem, layer1..layer4.
    pub fn feature_channels(&self) -> [i64; 5] {
        let e = self.block.expansion();
        [64, 64 * e, 128 * e, 256 * e, 512 * e]
    }

    /// Channels entering the head (512 or 2048).
    pub fn head_in(&self) -> i64 {
        512 * self.block.expansion()
    }

    /// All names, comma-separated, for help texts and errors.
    pub fn all_names() -> String {
        RESNETS
            .iter()
            .map(|a| a.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl FromStr for ResNetArch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        RESNETS
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(s.trim()))
            .copied()
            .ok_or_else(|| {
                format!(
                    "unknown torchvision ResNet '{s}'; expected one of {}",
                    ResNetArch::all_names()
                )
            })
    }
}

impl fmt::Display for ResNetArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// torchvision's BatchNorm2d settings (eps 1e-5, momentum 0.1, affine).
fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, Default::default())
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

/// One residual block (BasicBlock or Bottleneck), torchvision's names.
#[derive(Debug)]
pub struct ResBlock {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl ResBlock {
    fn new(p: &nn::Path, kind: BlockKind, cin: i64, width: i64, stride: i64) -> Self {
        let cout = width * kind.expansion();
        let convs = match kind {
            BlockKind::Basic => vec![
                (
                    conv(p / "conv1", cin, width, 3, stride, 1),
                    bn(p / "bn1", width),
                ),
                (
                    conv(p / "conv2", width, width, 3, 1, 1),
                    bn(p / "bn2", width),
                ),
            ],
            BlockKind::Bottleneck => vec![
                (conv(p / "conv1", cin, width, 1, 1, 0), bn(p / "bn1", width)),
                (
                    conv(p / "conv2", width, width, 3, stride, 1),
                    bn(p / "bn2", width),
                ),
                (conv(p / "conv3", width, cout, 1, 1, 0), bn(p / "bn3", cout)),
            ],
        };
        let downsample = (stride != 1 || cin != cout).then(|| {
            let d = p / "downsample";
            (conv(&d / "0", cin, cout, 1, stride, 0), bn(&d / "1", cout))
        });
        ResBlock { convs, downsample }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.convs.len() - 1;
        let mut out = x.shallow_clone();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            out = b.forward_t(&c.forward(&out), train);
            if i != last {
                out = inplace::relu(out);
            }
        }
        let identity = match &self.downsample {
            Some((c, b)) => b.forward_t(&c.forward(x), train),
            None => x.shallow_clone(),
        };
        inplace::relu(inplace::add(out, &identity))
    }
}

/// A torchvision ResNet. `forward` gives logits [N, head_size] for input
/// [N, 3, H, W] normalised with the ImageNet mean and standard deviation.
#[derive(Debug)]
pub struct TorchvisionResNet {
    pub arch: ResNetArch,
    /// The same architecture as `--model` names it.
    pub variant: super::variant::Variant,
    pub head_size: i64,
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    layers: [Vec<ResBlock>; 4],
    fc: nn::Linear,
}

impl TorchvisionResNet {
    /// Builds the variables under `p` with torchvision's names; `head_size` outputs
    /// of `fc`. The initial values are tch's defaults, meant to be overwritten by
    /// loaded weights.
    pub fn new(p: &nn::Path, arch: ResNetArch, head_size: i64) -> Self {
        let kind = arch.block;
        let mut cin = 64;
        let layers = std::array::from_fn(|l| {
            let width = 64 << l;
            let stride = if l == 0 { 1 } else { 2 };
            let lp = p / format!("layer{}", l + 1);
            (0..arch.layers[l])
                .map(|i| {
                    let s = if i == 0 { stride } else { 1 };
                    let b = ResBlock::new(&(&lp / i), kind, cin, width, s);
                    cin = width * kind.expansion();
                    b
                })
                .collect()
        });
        let variant = super::variant::TORCHVISION_VARIANTS
            .iter()
            .find(|v| v.name == arch.name)
            .copied()
            .expect("every torchvision ResNet is a variant");
        TorchvisionResNet {
            arch,
            variant,
            head_size,
            conv1: conv(p / "conv1", 3, 64, 7, 2, 3),
            bn1: bn(p / "bn1", 64),
            layers,
            fc: nn::linear(p / "fc", arch.head_in(), head_size, Default::default()),
        }
    }

    /// Stage `k` in evaluation mode (BatchNorm with its running statistics):
    /// 0 = the stem (conv1, bn1, ReLU, max-pool 3x3/2 with padding 1), 1..=4 = layerk.
    pub fn stage(&self, k: usize, x: &Tensor) -> Tensor {
        self.stage_t(k, x, false)
    }

    /// [`TorchvisionResNet::stage`], in training mode when `train` (BatchNorm with
    /// the batch's statistics, updating the running ones).
    pub fn stage_t(&self, k: usize, x: &Tensor, train: bool) -> Tensor {
        match k {
            0 => inplace::relu(self.bn1.forward_t(&self.conv1.forward(x), train)).max_pool2d(
                [3, 3],
                [2, 2],
                [1, 1],
                [1, 1],
                false,
            ),
            _ => self.layers[k - 1]
                .iter()
                .fold(x.shallow_clone(), |out, b| b.forward_t(&out, train)),
        }
    }

    /// Zeroes the head (`fc`), as fine-tuning starts it (the paper code's zero_head).
    pub fn zero_head(&mut self) {
        tch::no_grad(|| {
            let _ = self.fc.ws.zero_();
            if let Some(b) = &mut self.fc.bs {
                let _ = b.zero_();
            }
        });
    }

    /// Training forward with the leading `frozen` stages (0 = stem, 1..=4 = layers)
    /// frozen: they run without a graph and in evaluation mode, so their BatchNorm
    /// layers use and keep their running statistics; the later stages run in
    /// training mode (the batch's statistics, the running ones updated with
    /// momentum 0.1), as torchvision's `model.train()` does. Logits [N, head_size].
    pub fn forward_train(&self, x: &Tensor, frozen: usize) -> Tensor {
        let mut out = x.shallow_clone();
        for s in 0..5 {
            out = if s < frozen {
                tch::no_grad(|| self.stage_t(s, &out, false))
            } else {
                self.stage_t(s, &out, true)
            };
        }
        self.head_of_pooled(&self.pre_logits(&out))
    }

    /// Runs the network up to and including stage `k` (0..=4).
    pub fn forward_to(&self, x: &Tensor, k: usize) -> Tensor {
        let mut out = self.stage(0, x);
        for s in 1..=k {
            out = self.stage(s, &out);
        }
        out
    }

    /// The head's input from layer4's output: global average pooling, [N, 512 e].
    pub fn pre_logits(&self, layer4: &Tensor) -> Tensor {
        layer4.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }

    /// The head (`fc`) on [`TorchvisionResNet::pre_logits`]: logits [N, head_size].
    pub fn head_of_pooled(&self, pooled: &Tensor) -> Tensor {
        self.fc.forward(&pooled.flatten(1, -1))
    }

    /// Logits [N, head_size], evaluation mode.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.head_of_pooled(&self.pre_logits(&self.forward_to(x, 4)))
    }
}

/// Whether a state-dict key is one torchvision writes that is no variable here:
/// BatchNorm's `num_batches_tracked` counters.
pub fn is_bookkeeping(key: &str) -> bool {
    key.ends_with(".num_batches_tracked")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    /// torchvision's parameter counts (sum of numel over `parameters()`), as its
    /// model documentation lists them.
    #[test]
    fn parameter_counts_are_torchvisions() {
        for (name, want) in [
            ("resnet18", 11_689_512),
            ("resnet34", 21_797_672),
            ("resnet50", 25_557_032),
            ("resnet101", 44_549_160),
            ("resnet152", 60_192_808),
        ] {
            let vs = VarStore::new(Device::Cpu);
            let arch: ResNetArch = name.parse().unwrap();
            let _m = TorchvisionResNet::new(&vs.root(), arch, 1000);
            let n: i64 = vs
                .variables()
                .iter()
                .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
                .map(|(_, v)| v.numel() as i64)
                .sum();
            assert_eq!(n, want, "{name}");
        }
        assert!("resnet19".parse::<ResNetArch>().is_err());
        assert_eq!("ResNet50".parse::<ResNetArch>().unwrap().head_in(), 2048);
    }
}
