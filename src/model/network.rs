//! A backbone of any family, as the pipeline uses it (docs/architecture.md): five
//! stages whose outputs are the feature layers, the pre-logit features and the
//! head. Extraction, the image passes, the test commands and Mahalanobis tuning
//! take a [`Network`]; a family adds a variant here and its module beside this one.
use tch::{Kind, Tensor};

use super::bit::{spatial_mean, Precision, ResNetV2};
use super::resnet::TorchvisionResNet;
use super::script::ScriptNet;
use super::variant::Variant;
use super::vit::TorchvisionViT;

/// A network of one of the families of [`super::variant::Family`].
///
/// A ViT takes images of one size only: [`Network::check_input`] says whether a
/// batch fits, and the other methods expect one that does (the evaluation
/// transform of a ViT is refused at any other `--crop`, so the pipeline's batches
/// always fit; a batch that does not is a bug, and panics).
#[derive(Debug)]
pub enum Network {
    Bit(ResNetV2),
    TorchvisionResNet(TorchvisionResNet),
    TorchvisionViT(TorchvisionViT),
    /// A TorchScript module: (logits, features) only, no stages.
    TorchScript(ScriptNet),
}

/// What only a network with stages gives, asked of a TorchScript module: the
/// commands refuse that before any image is read
/// ([`super::Variant::require_feature_layers`], [`super::Variant::require_rankfeat_maps`]),
/// so this is a bug.
fn no_stages() -> ! {
    panic!("internal: the stages of a TorchScript module were asked for; the command should have refused Mahalanobis or RankFeat")
}

/// A ViT's result on a batch [`Network::check_input`] accepted.
fn fits<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("internal: a batch the network does not take: {e:#}"))
}

impl Network {
    /// The architecture (`--model`).
    pub fn variant(&self) -> Variant {
        match self {
            Network::Bit(m) => m.variant,
            Network::TorchvisionResNet(m) => m.variant,
            Network::TorchvisionViT(m) => m.variant,
            Network::TorchScript(m) => m.variant(),
        }
    }

    /// Logits per image.
    pub fn head_size(&self) -> i64 {
        match self {
            Network::Bit(m) => m.head_size,
            Network::TorchvisionResNet(m) => m.head_size,
            Network::TorchvisionViT(m) => m.head_size,
            Network::TorchScript(m) => m.head_size,
        }
    }

    /// Width of the pre-logit features (the head's input).
    pub fn feature_dim(&self) -> i64 {
        match self {
            Network::TorchScript(m) => m.head_in,
            other => other.variant().head_in(),
        }
    }

    /// Whether `x` [N, 3, H, W] is a batch the network takes (a ViT: its image size).
    pub fn check_input(&self, x: &Tensor) -> anyhow::Result<()> {
        match self {
            Network::TorchvisionViT(m) => m.check_input(x),
            _ => Ok(()),
        }
    }

    /// Inference precision (BiT's can be changed; the others run in float32).
    pub fn precision(&self) -> Precision {
        match self {
            Network::Bit(m) => m.precision,
            _ => Precision::Fp32,
        }
    }

    /// Sets the inference precision: any for BiT, float32 for the others.
    pub fn set_precision(&mut self, p: Precision) -> Result<(), String> {
        match self {
            Network::Bit(m) => {
                m.precision = p;
                Ok(())
            }
            _ if p == Precision::Fp32 => Ok(()),
            other => Err(format!(
                "--precision {}: {} runs in float32 only (tf32 and bf16 are offered for BiT)",
                crate::runtime::value_name(&p),
                other.variant().name
            )),
        }
    }

    /// The BiT model, for what only BiT offers (fine-tuning, `mos forward`'s
    /// precision and layout options).
    pub fn as_bit(&self) -> Option<&ResNetV2> {
        match self {
            Network::Bit(m) => Some(m),
            _ => None,
        }
    }

    /// [`Network::as_bit`], mutable.
    pub fn as_bit_mut(&mut self) -> Option<&mut ResNetV2> {
        match self {
            Network::Bit(m) => Some(m),
            _ => None,
        }
    }

    /// Stage `k` (0 = the stem, 1..=4 = the four stages), evaluation mode.
    pub fn stage(&self, k: usize, x: &Tensor) -> Tensor {
        match self {
            Network::Bit(m) => m.stage(k, x),
            Network::TorchvisionResNet(m) => m.stage(k, x),
            Network::TorchvisionViT(m) => fits(m.stage(k, x)),
            Network::TorchScript(_) => no_stages(),
        }
    }

    /// Runs the network up to and including stage `k` (0..=4).
    pub fn forward_to(&self, x: &Tensor, k: usize) -> Tensor {
        let mut out = self.stage(0, x);
        for s in 1..=k {
            out = self.stage(s, &out);
        }
        out
    }

    /// The outputs of the stem and stages 1..4 (5 tensors, full spatial size).
    pub fn forward_features(&self, x: &Tensor) -> Vec<Tensor> {
        let mut feats: Vec<Tensor> = Vec::with_capacity(5);
        feats.push(self.stage(0, x));
        for s in 1..=4 {
            let next = self.stage(s, &feats[s - 1]);
            feats.push(next);
        }
        feats
    }

    /// The feature layer of a stage's output, [N, C_k] float32 (the Mahalanobis
    /// detector's features): the spatial mean of a feature map, or a ViT's mean over
    /// its patch tokens.
    pub fn layer_feature(&self, out: &Tensor) -> Tensor {
        match self {
            Network::TorchvisionViT(_) => TorchvisionViT::patch_mean(out).to_kind(Kind::Float),
            _ => spatial_mean(out).to_kind(Kind::Float),
        }
    }

    /// The head's input from stage 4's output (float32; [N, D] or [N, D, 1, 1]).
    /// The stage outputs are feature maps [N, C, H, W], or a ViT's tokens [N, T, D].
    pub fn pre_logits(&self, last: &Tensor) -> Tensor {
        match self {
            Network::Bit(m) => m.pre_logits(last),
            Network::TorchvisionResNet(m) => m.pre_logits(last),
            Network::TorchvisionViT(m) => m.pre_logits(last),
            Network::TorchScript(_) => no_stages(),
        }
    }

    /// The head on [`Network::pre_logits`]: logits [N, head_size].
    pub fn head_of_pooled(&self, pooled: &Tensor) -> Tensor {
        match self {
            Network::Bit(m) => m.head_of_pooled(pooled),
            Network::TorchvisionResNet(m) => m.head_of_pooled(pooled),
            Network::TorchvisionViT(m) => m.head_of_pooled(pooled),
            Network::TorchScript(_) => no_stages(),
        }
    }

    /// Logits [N, head_size].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Network::Bit(m) => m.forward(x),
            Network::TorchvisionResNet(m) => m.forward(x),
            Network::TorchvisionViT(m) => fits(m.forward(x)),
            Network::TorchScript(m) => m.outputs(x).0,
        }
    }

    /// One forward pass of `x` (a graph when gradients are on): the logits, the
    /// pre-logit features [N, D] and, with `layers`, the feature layers of the stem
    /// and the four stages ([`Network::layer_feature`] of each). The logits are the
    /// same values as [`Network::forward`]'s.
    pub fn outputs(&self, x: &Tensor, layers: bool) -> (Tensor, Tensor, Vec<Tensor>) {
        let (logits, features, means, _) = self.outputs_maps(x, layers, false);
        (logits, features, means)
    }

    /// [`Network::outputs`], and with `keep_maps` the outputs of stages 3 and 4
    /// (RankFeat's inputs, [`Network::rankfeat`]; not of a TorchScript module, which
    /// has no stages).
    pub fn outputs_maps(
        &self,
        x: &Tensor,
        layers: bool,
        keep_maps: bool,
    ) -> (Tensor, Tensor, Vec<Tensor>, Option<(Tensor, Tensor)>) {
        if let Network::TorchScript(m) = self {
            if layers || keep_maps {
                no_stages();
            }
            let (logits, features) = m.outputs(x);
            return (logits, features, Vec::new(), None);
        }
        let mut means = Vec::new();
        let mut out = self.stage(0, x);
        let mut block3 = None;
        for s in 1..=4 {
            if layers {
                means.push(self.layer_feature(&out));
            }
            if s == 4 && keep_maps {
                block3 = Some(out.shallow_clone());
            }
            out = self.stage(s, &out);
        }
        if layers {
            means.push(self.layer_feature(&out));
        }
        let pooled = self.pre_logits(&out);
        let logits = self.head_of_pooled(&pooled);
        let maps = block3.map(|b3| (b3, out));
        (logits, pooled.flatten(1, -1), means, maps)
    }

    /// RankFeat's fused logits [N, head_size] from the outputs of stages 3 and 4
    /// (as the original's `iterate_data_rankfeat`): the head on stage 4's map
    /// without its rank-1 part (for BiT the final GroupNorm and ReLU come after,
    /// since the stage-4 output is taken before them), and the head on stage 4
    /// run on stage 3's map without its rank-1 part; the mean of the two.
    /// `power_iterations` > 0: the rank-1 parts by [`remove_rank1_power`].
    pub fn rankfeat(&self, block3: &Tensor, block4: &Tensor, power_iterations: u32) -> Tensor {
        let remove = |map: &Tensor| match power_iterations {
            0 => remove_rank1(map),
            n => remove_rank1_power(map, n),
        };
        let head = |map: &Tensor| self.head_of_pooled(&self.pre_logits(map));
        let logits1 = head(&remove(block4));
        let logits2 = head(&self.stage(4, &remove(block3)));
        (logits1 + logits2) / 2.0
    }
}

/// `X − s₁ u₁ v₁ᵀ` of each image's feature map as a C × HW matrix (exact SVD, as
/// RankFeat's code's `torch.linalg.svd`), float32. [N, C, H, W] -> the same.
pub fn remove_rank1(map: &Tensor) -> Tensor {
    let size = map.size();
    let (n, c) = (size[0], size[1]);
    let x = map.to_kind(Kind::Float).reshape([n, c, -1]);
    // torch.svd(some=True) is torch.linalg.svd(full_matrices=False) with V for Vᴴ
    // (tch's linalg_svd cannot leave the CUDA-only `driver` unset).
    let (u, s, v) = x.svd(true, true);
    let top =
        s.narrow(1, 0, 1).unsqueeze(2) * u.narrow(2, 0, 1).bmm(&v.narrow(2, 0, 1).transpose(1, 2));
    (x - top).reshape(size.as_slice())
}

/// [`remove_rank1`] with the first singular pair from `iterations` power iterations,
/// as RankFeat's `power_iteration` (its faster option): `v = n(u X)ᵀ`, `u = n(X v)ᵀ`
/// with `n(a) = a / (‖a‖ + 1e-10)`, then `σ = u X v` and `X − σ uᵀ vᵀ`. The original
/// starts u from a random normal vector; mos from the all-ones vector, so that a
/// store is reproducible (both converge to the same pair, at a rate set by s₂/s₁).
pub fn remove_rank1_power(map: &Tensor, iterations: u32) -> Tensor {
    let size = map.size();
    let (n, c) = (size[0], size[1]);
    let x = map.to_kind(Kind::Float).reshape([n, c, -1]);
    let normalise = |a: Tensor| {
        let norm = a.norm_scalaropt_dim(2, [2i64].as_slice(), true);
        a / (norm + 1e-10)
    };
    let mut u = Tensor::ones([n, 1, c], (Kind::Float, x.device()));
    let mut v = Tensor::zeros([n, x.size()[2], 1], (Kind::Float, x.device()));
    for _ in 0..iterations {
        v = normalise(u.bmm(&x)).transpose(1, 2);
        u = normalise(x.bmm(&v).transpose(1, 2));
    }
    let sigma = u.bmm(&x).bmm(&v);
    let top = sigma * u.transpose(1, 2).bmm(&v.transpose(1, 2));
    (x - top).reshape(size.as_slice())
}
