//! BiT ResNetV2: pre-activation ResNet with GroupNorm and Weight Standardization
//! (Kolesnikov et al., "Big Transfer", ECCV 2020), as the paper code's
//! `resnetv2.py` builds it (docs/model.md). Tensor names equal the paper code's
//! state-dict names without `module.` (`body.block1.unit01.gn1.weight`).
use tch::nn::{self, Init, ModuleT};
use tch::{Kind, Tensor};

use super::variant::Variant;

/// GroupNorm groups and epsilon of every norm layer.
const GN_GROUPS: i64 = 32;
const GN_EPS: f64 = 1e-5;
/// Epsilon of weight standardization (added to the biased variance).
const WS_EPS: f64 = 1e-10;

/// Numeric precision of inference (`--precision`). Only CUDA is affected: on the
/// CPU, fp32 and tf32 are the same, and bf16 runs the convolutions in bfloat16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE float32 everywhere, TF32 disabled for convolutions (libtorch enables it
    /// for cuDNN convolutions by default). Reproduces the paper code's numbers.
    #[default]
    Fp32,
    /// float32 storage, TF32 tensor-core convolutions on GPUs that have them.
    Tf32,
    /// bfloat16 convolutions; GroupNorm, weight standardization and the head in float32.
    Bf16,
}

impl Precision {
    fn act_kind(self) -> Kind {
        match self {
            Self::Bf16 => Kind::BFloat16,
            _ => Kind::Float,
        }
    }
}

/// A bias-free conv whose weight is standardized per output channel before use:
/// `w' = (w - mean) / sqrt(var + 1e-10)` over (in, kh, kw), biased variance.
#[derive(Debug)]
pub struct StdConv2d {
    pub weight: Tensor,
    stride: i64,
    padding: i64,
    /// The standardized weight computed once, for a conv whose weight no longer
    /// changes (a frozen stage during fine-tuning); see [`ResNetV2::fix_frozen_weights`].
    fixed: Option<Tensor>,
}

impl StdConv2d {
    fn new(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Self {
        let fan_in = (cin * k * k) as f64;
        let init = Init::Uniform {
            lo: -1.0 / fan_in.sqrt(),
            up: 1.0 / fan_in.sqrt(),
        };
        let weight = p.var("weight", &[cout, cin, k, k], init);
        Self {
            weight,
            stride,
            padding,
            fixed: None,
        }
    }

    /// The standardized weight.
    pub fn standardized_weight(&self) -> Tensor {
        let (var, mean) = self.weight.var_mean_dim(&[1i64, 2, 3][..], false, true);
        (&self.weight - mean) / (var + WS_EPS).sqrt()
    }

    /// Convolution of `x` (float32, or bfloat16 under [`Precision::Bf16`]). A
    /// channels-last `x` gets a channels-last weight, so the output stays NHWC.
    pub fn forward(&self, x: &Tensor, precision: Precision) -> Tensor {
        let w = match &self.fixed {
            Some(w) => w.shallow_clone(),
            None => self.standardized_weight(),
        };
        let mut w = w.to_kind(precision.act_kind());
        if is_channels_last(x) {
            w = to_channels_last(&w);
        }
        // `_convolution` is what conv2d dispatches to, with TF32 made explicit.
        x.internal_convolution::<Tensor>(
            &w,
            None,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            false,
            [0, 0],
            1,
            false,
            false,
            true,
            precision == Precision::Tf32,
        )
    }
}

/// The same values with NHWC strides (PyTorch's `channels_last` memory format).
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Whether a 4-d tensor with more than one channel is laid out NHWC.
fn is_channels_last(t: &Tensor) -> bool {
    let size = t.size();
    size.len() == 4 && size[1] > 1 && t.stride()[1] == 1
}

/// GroupNorm then ReLU, computed in float32 and returned in the activation kind.
/// The ReLU is in place, as the paper code's `nn.ReLU(inplace=True)`: GroupNorm's
/// backward needs its input, not its output, so no copy is kept for autograd.
fn gn_relu(gn: &nn::GroupNorm, x: &Tensor, precision: Precision) -> Tensor {
    match precision {
        Precision::Bf16 => gn
            .forward_t(&x.to_kind(Kind::Float), false)
            .relu_()
            .to_kind(Kind::BFloat16),
        _ => gn.forward_t(x, false).relu_(),
    }
}

fn group_norm(p: nn::Path, channels: i64) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps: GN_EPS,
        ..Default::default()
    };
    nn::group_norm(p, GN_GROUPS, channels, cfg)
}

/// The pre-activation bottleneck unit (`PreActBottleneck` of the paper code).
#[derive(Debug)]
pub struct PreActBottleneck {
    pub gn1: nn::GroupNorm,
    pub conv1: StdConv2d,
    pub gn2: nn::GroupNorm,
    pub conv2: StdConv2d,
    pub gn3: nn::GroupNorm,
    pub conv3: StdConv2d,
    /// 1x1 projection, present iff stride != 1 or cin != cout.
    pub downsample: Option<StdConv2d>,
}

impl PreActBottleneck {
    fn new(p: nn::Path, cin: i64, cout: i64, cmid: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || cin != cout)
            .then(|| StdConv2d::new(&p / "downsample", cin, cout, 1, stride, 0));
        Self {
            gn1: group_norm(&p / "gn1", cin),
            conv1: StdConv2d::new(&p / "conv1", cin, cmid, 1, 1, 0),
            gn2: group_norm(&p / "gn2", cmid),
            conv2: StdConv2d::new(&p / "conv2", cmid, cmid, 3, stride, 1),
            gn3: group_norm(&p / "gn3", cmid),
            conv3: StdConv2d::new(&p / "conv3", cmid, cout, 1, 1, 0),
            downsample,
        }
    }

    pub fn forward(&self, x: &Tensor, p: Precision) -> Tensor {
        let out = gn_relu(&self.gn1, x, p);
        let residual = match &self.downsample {
            Some(d) => d.forward(&out, p),
            None => x.shallow_clone(),
        };
        let out = self.conv1.forward(&out, p);
        let out = self.conv2.forward(&gn_relu(&self.gn2, &out, p), p);
        // In place: a convolution's backward needs its input, not its output.
        let mut out = self.conv3.forward(&gn_relu(&self.gn3, &out, p), p);
        let _ = out.g_add_(&residual);
        out
    }

    fn convs_mut(&mut self) -> impl Iterator<Item = &mut StdConv2d> {
        let main = [&mut self.conv1, &mut self.conv2, &mut self.conv3];
        main.into_iter().chain(self.downsample.as_mut())
    }
}

/// One stage (`block1`..`block4`): a sequence of units `unit01`, `unit02`, ...
#[derive(Debug)]
pub struct Block {
    pub units: Vec<PreActBottleneck>,
}

impl Block {
    fn new(p: nn::Path, n: usize, cin: i64, cout: i64, cmid: i64, stride: i64) -> Self {
        let units = (1..=n)
            .map(|i| {
                let (c_in, s) = if i == 1 { (cin, stride) } else { (cout, 1) };
                PreActBottleneck::new(&p / format!("unit{i:02}"), c_in, cout, cmid, s)
            })
            .collect();
        Self { units }
    }

    pub fn forward(&self, x: &Tensor, p: Precision) -> Tensor {
        let mut out = self.units[0].forward(x, p);
        for unit in &self.units[1..] {
            out = unit.forward(&out, p);
        }
        out
    }
}

/// Which parts train during fine-tuning (`--num-block-open`, docs/model.md#freezing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// `-1`: everything trains.
    None,
    /// `0`: only the head trains.
    AllButHead,
    /// `k` in 1..=4: the last `k` blocks (and before_head, head) train, except the
    /// first unit's gn1 of the first open block.
    OpenBlocks(u8),
}

impl Freeze {
    /// From the original's `num_block_open` integer (-1..=4).
    pub fn from_num_block_open(n: i64) -> Result<Self, String> {
        match n {
            -1 => Ok(Self::None),
            0 => Ok(Self::AllButHead),
            1..=4 => Ok(Self::OpenBlocks(n as u8)),
            _ => Err(format!(
                "--num-block-open {n}: expected one of -1, 0, 1, 2, 3, 4"
            )),
        }
    }

    /// Number of leading feature stages (root = 0, block1..4 = 1..4) run without a
    /// graph. `OpenBlocks(k)` freezes root and blocks 1..=4-k.
    pub fn frozen_stages(self) -> usize {
        match self {
            Self::None => 0,
            Self::AllButHead => 5,
            Self::OpenBlocks(k) => 5 - k as usize,
        }
    }

    /// Whether the parameter `name` of a torchvision ResNet (its state-dict names:
    /// the stem `conv1`/`bn1`, `layer1`..`layer4`, the head `fc`) trains: the head
    /// always, the last `k` layers with `OpenBlocks(k)`, everything with `None`.
    pub fn trainable_torchvision(self, name: &str) -> bool {
        if name.starts_with("fc.") {
            return true;
        }
        let stage = name
            .strip_prefix("layer")
            .and_then(|r| r.chars().next())
            .and_then(|c| c.to_digit(10))
            .map_or(0, |d| d as usize);
        stage >= self.frozen_stages()
    }

    /// Whether the parameter named `name` (state-dict name) trains.
    pub fn trainable(self, name: &str) -> bool {
        match self {
            Self::None => true,
            Self::AllButHead => name.starts_with("head."),
            Self::OpenBlocks(k) => {
                let first_open = 5 - k as usize;
                if name.starts_with("head.") || name.starts_with("before_head.") {
                    return true;
                }
                let Some(block) = name
                    .strip_prefix("body.block")
                    .and_then(|r| r.chars().next())
                    .and_then(|c| c.to_digit(10))
                else {
                    return false; // root
                };
                let block = block as usize;
                if block < first_open {
                    return false;
                }
                !(block == first_open && name.contains(".unit01.gn1."))
            }
        }
    }
}

/// Applies `freeze` to the variables of `vs`: frozen ones stop requiring grad.
/// Returns the trainable ones, sorted by name (the optimizer's parameters).
pub fn apply_freeze(vs: &nn::VarStore, freeze: Freeze) -> Vec<(String, Tensor)> {
    apply_freeze_with(vs, &|n| freeze.trainable(n))
}

/// [`apply_freeze`] with the rule `trains(name)` of a family. Variables that are
/// no parameters (BatchNorm's running statistics: created without a gradient)
/// never train.
pub fn apply_freeze_with(
    vs: &nn::VarStore,
    trains: &dyn Fn(&str) -> bool,
) -> Vec<(String, Tensor)> {
    let mut trainable = Vec::new();
    for (name, var) in vs.variables() {
        if var.requires_grad() && trains(&name) {
            trainable.push((name, var));
        } else {
            let _ = var.set_requires_grad(false);
        }
    }
    trainable.sort_by(|a, b| a.0.cmp(&b.0));
    trainable
}

/// The whole network. `forward` gives logits [N, head_size].
#[derive(Debug)]
pub struct ResNetV2 {
    pub variant: Variant,
    pub head_size: i64,
    pub root: StdConv2d,
    pub blocks: [Block; 4],
    pub before_head_gn: nn::GroupNorm,
    pub head_weight: Tensor,
    pub head_bias: Tensor,
    /// Inference precision (fp32 unless changed).
    pub precision: Precision,
    /// Run activations channels-last (NHWC); same numbers, different speed.
    pub channels_last: bool,
}

impl ResNetV2 {
    /// Builds the model's variables under `p` (names as the paper code's state dict).
    /// The head is zero-initialised ("zero_head"); the rest gets a fan-in uniform
    /// init, meant to be overwritten by loaded weights unless training from scratch.
    pub fn new(p: &nn::Path, variant: Variant, head_size: i64) -> Self {
        let b = variant.base;
        let body = p / "body";
        let u = variant.units;
        let blocks = [
            Block::new(&body / "block1", u[0], b, 4 * b, b, 1),
            Block::new(&body / "block2", u[1], 4 * b, 8 * b, 2 * b, 2),
            Block::new(&body / "block3", u[2], 8 * b, 16 * b, 4 * b, 2),
            Block::new(&body / "block4", u[3], 16 * b, 32 * b, 8 * b, 2),
        ];
        let head = p / "head" / "conv";
        Self {
            variant,
            head_size,
            root: StdConv2d::new(p / "root" / "conv", 3, b, 7, 2, 3),
            blocks,
            before_head_gn: group_norm(p / "before_head" / "gn", variant.head_in()),
            head_weight: head.zeros("weight", &[head_size, variant.head_in(), 1, 1]),
            head_bias: head.zeros("bias", &[head_size]),
            precision: Precision::Fp32,
            channels_last: false,
        }
    }

    /// Runs stage `k` (0 = root: conv, zero-pad 1, max-pool 3x3/2; 1..=4 = block k).
    /// Input and output are float32 (bfloat16 between stages under bf16).
    pub fn stage(&self, k: usize, x: &Tensor) -> Tensor {
        let p = self.precision;
        match k {
            0 => {
                let x = x.to_kind(p.act_kind());
                let x = if self.channels_last {
                    to_channels_last(&x)
                } else {
                    x
                };
                self.root
                    .forward(&x, p)
                    .constant_pad_nd([1i64, 1, 1, 1])
                    .max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
            }
            _ => self.blocks[k - 1].forward(x, p),
        }
    }

    /// Runs the network up to and including stage `k` (0..=4) and returns that output
    /// [N, C_k, H_k, W_k]. Input: [N, 3, H, W], normalized to [-1, 1].
    pub fn forward_to(&self, x: &Tensor, k: usize) -> Tensor {
        let mut out = self.stage(0, x);
        for s in 1..=k {
            out = self.stage(s, &out);
        }
        out
    }

    /// The outputs of root and block1..block4 (5 tensors, full spatial size).
    pub fn forward_features(&self, x: &Tensor) -> Vec<Tensor> {
        let mut feats: Vec<Tensor> = Vec::with_capacity(5);
        feats.push(self.stage(0, x));
        for s in 1..=4 {
            let next = self.stage(s, &feats[s - 1]);
            feats.push(next);
        }
        feats
    }

    /// before_head + head on block4's output: logits [N, head_size].
    pub fn head(&self, block4: &Tensor) -> Tensor {
        self.head_of_pooled(&self.pre_logits(block4))
    }

    /// before_head on block4's output: the final GroupNorm and ReLU, pooled, the
    /// head's input [N, 2048 wf, 1, 1] (float32).
    pub fn pre_logits(&self, block4: &Tensor) -> Tensor {
        self.before_head_gn
            .forward_t(&block4.to_kind(Kind::Float), false)
            .relu_()
            .adaptive_avg_pool2d([1, 1])
    }

    /// The head (a 1x1 convolution) on [`ResNetV2::pre_logits`]: logits [N, head_size].
    pub fn head_of_pooled(&self, pooled: &Tensor) -> Tensor {
        pooled
            .conv2d(
                &self.head_weight,
                Some(&self.head_bias),
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            )
            .flatten(1, -1)
    }

    /// Logits [N, head_size] for input [N, 3, H, W] in [-1, 1].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.head(&self.forward_to(x, 4))
    }

    /// Standardizes the conv weights of the `freeze`'s frozen stages once, for
    /// [`ResNetV2::forward_train`]: they no longer change, and the original
    /// recomputes them at every step (0.11-0.12 s for BiT-S-R50x1 on 2 CPU
    /// threads, measured in PyTorch). The same operations on the same values, so the same
    /// numbers. Call it after the weights are loaded; [`ResNetV2::unfix_weights`]
    /// drops the copies (needed before those weights are changed).
    pub fn fix_frozen_weights(&mut self, freeze: Freeze) {
        self.unfix_weights();
        let frozen = freeze.frozen_stages();
        for (_, conv) in self.stage_convs_mut().filter(|(s, _)| *s < frozen) {
            conv.fixed = Some(tch::no_grad(|| conv.standardized_weight()));
        }
    }

    /// Drops the standardized weights of [`ResNetV2::fix_frozen_weights`].
    pub fn unfix_weights(&mut self) {
        for (_, conv) in self.stage_convs_mut() {
            conv.fixed = None;
        }
    }

    /// Every conv with its stage (0 = root, 1..=4 = blocks).
    fn stage_convs_mut(&mut self) -> impl Iterator<Item = (usize, &mut StdConv2d)> {
        let root = std::iter::once((0, &mut self.root));
        let blocks = self.blocks.iter_mut().enumerate().flat_map(|(i, b)| {
            let units = b.units.iter_mut();
            units.flat_map(move |u| u.convs_mut().map(move |c| (i + 1, c)))
        });
        root.chain(blocks)
    }

    /// Forward for training with `freeze`: the frozen leading stages run under
    /// `no_grad` (no graph is built for them).
    pub fn forward_train(&self, x: &Tensor, freeze: Freeze) -> Tensor {
        let frozen = freeze.frozen_stages();
        let mut out = x.shallow_clone();
        for s in 0..5 {
            out = if s < frozen {
                tch::no_grad(|| self.stage(s, &out))
            } else {
                self.stage(s, &out)
            };
        }
        self.head(&out)
    }
}

/// Spatial mean of a feature map: [N, C, H, W] -> [N, C].
pub fn spatial_mean(feature: &Tensor) -> Tensor {
    feature.mean_dim(&[2i64, 3][..], false, None::<Kind>)
}
