//! torchvision's Vision Transformers (`torchvision.models.vit_b_16`, `vit_b_32`,
//! `vit_l_16`, `vit_l_32`, `vit_h_14`), as torchvision 0.26 builds them
//! (docs/model.md#torchvision-vit): a patch-embedding convolution (`conv_proj`,
//! kernel = stride = the patch size), a learned class token prepended to the patch
//! tokens, a learned position embedding added (`encoder.pos_embedding`, one row per
//! token: the image size is fixed), pre-LayerNorm encoder blocks (`ln_1`,
//! multi-head self-attention, residual; `ln_2`, Linear, exact GELU, Linear,
//! residual), a final LayerNorm (`encoder.ln`) and a linear head on the class token
//! (`heads.head`). LayerNorm's eps is 1e-6. Variable names are torchvision's
//! state-dict keys, so its weight files load as they are.
//!
//! torchvision's builders set every dropout rate to 0, so training and evaluation
//! compute the same function; there is no batch statistic either, so every image's
//! output is independent of the others in its batch.
//!
//! The five feature layers (for Mahalanobis) are the mean over the patch tokens
//! (the class token left out) of the token sequence after the embedding and after
//! each quarter of the blocks (blocks 3, 6, 9, 12 of ViT-B), each [N, D]; the
//! pre-logit features are the class token after `encoder.ln` (the head's input).
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::inplace;

/// One torchvision ViT architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViTArch {
    /// torchvision's function name.
    pub name: &'static str,
    /// Side of a square patch in pixels (the kernel and stride of `conv_proj`).
    pub patch: i64,
    /// Encoder blocks.
    pub layers: usize,
    /// Attention heads per block.
    pub heads: i64,
    /// Width of the token embeddings, D.
    pub hidden: i64,
    /// Width of the MLP's hidden layer, M.
    pub mlp: i64,
}

/// Every torchvision ViT.
pub const VITS: &[ViTArch] = &[
    ViTArch {
        name: "vit_b_16",
        patch: 16,
        layers: 12,
        heads: 12,
        hidden: 768,
        mlp: 3072,
    },
    ViTArch {
        name: "vit_b_32",
        patch: 32,
        layers: 12,
        heads: 12,
        hidden: 768,
        mlp: 3072,
    },
    ViTArch {
        name: "vit_l_16",
        patch: 16,
        layers: 24,
        heads: 16,
        hidden: 1024,
        mlp: 4096,
    },
    ViTArch {
        name: "vit_l_32",
        patch: 32,
        layers: 24,
        heads: 16,
        hidden: 1024,
        mlp: 4096,
    },
    ViTArch {
        name: "vit_h_14",
        patch: 14,
        layers: 32,
        heads: 16,
        hidden: 1280,
        mlp: 5120,
    },
];

/// The image size of torchvision's builders without weights, and of the
/// IMAGENET1K_V1 weights of vit_b_16, vit_b_32, vit_l_16 and vit_l_32 (the SWAG
/// weights are for 384, 512 or 518: [`TorchvisionViT::with_image_size`]).
pub const DEFAULT_IMAGE_SIZE: i64 = 224;

impl ViTArch {
    /// Width of each of the five feature layers (D for all of them).
    pub fn feature_dims(&self) -> [i64; 5] {
        [self.hidden; 5]
    }

    /// Width of the head's input, D.
    pub fn head_in(&self) -> i64 {
        self.hidden
    }

    /// Tokens for square images of side `image_size`: (image_size / patch)^2
    /// patches and the class token.
    pub fn seq_len(&self, image_size: i64) -> i64 {
        (image_size / self.patch).pow(2) + 1
    }

    /// The blocks of stage `k` (1..=4): the `k`-th quarter of the encoder.
    pub fn stage_blocks(&self, k: usize) -> std::ops::Range<usize> {
        assert!((1..=4).contains(&k), "block stages are 1..=4, not {k}");
        (k - 1) * self.layers / 4..k * self.layers / 4
    }

    /// All names, comma-separated, for help texts and errors.
    pub fn all_names() -> String {
        VITS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
    }
}

impl FromStr for ViTArch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        VITS.iter()
            .find(|a| a.name.eq_ignore_ascii_case(s.trim()))
            .copied()
            .ok_or_else(|| {
                format!(
                    "unknown torchvision ViT '{s}'; expected one of {}",
                    ViTArch::all_names()
                )
            })
    }
}

impl fmt::Display for ViTArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// torchvision's LayerNorm for the ViTs: eps 1e-6, affine.
fn layer_norm(p: nn::Path, d: i64) -> nn::LayerNorm {
    let cfg = nn::LayerNormConfig {
        eps: 1e-6,
        ..Default::default()
    };
    nn::layer_norm(p, vec![d], cfg)
}

/// torch's `nn.MultiheadAttention` for self-attention without masks:
/// `in_proj_weight` [3D, D] stacks the query, key and value projections,
/// `in_proj_bias` [3D] their biases; head h uses columns h*D/H..(h+1)*D/H of
/// each; `out_proj` maps the concatenated heads back to D.
#[derive(Debug)]
struct SelfAttention {
    heads: i64,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
}

impl SelfAttention {
    fn new(p: nn::Path, d: i64, heads: i64) -> Self {
        // torch's initialisation: Xavier-uniform projections, zero biases.
        let bound = (6.0 / (d + 3 * d) as f64).sqrt();
        SelfAttention {
            heads,
            in_proj_weight: p.var(
                "in_proj_weight",
                &[3 * d, d],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            in_proj_bias: p.var("in_proj_bias", &[3 * d], nn::Init::Const(0.0)),
            out_proj: nn::linear(&p / "out_proj", d, d, Default::default()),
        }
    }

    /// softmax(Q K^T / sqrt(D/H)) V per head, the heads concatenated, then
    /// `out_proj`: [N, S, D] -> [N, S, D]. The scaled dot product is libtorch's
    /// `scaled_dot_product_attention`, which torch's `nn.MultiheadAttention` calls
    /// too when no attention weights are asked for (`need_weights=False`).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, s, d) = x.size3().expect("tokens [N, S, D]");
        let hd = d / self.heads;
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .reshape([n, s, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]); // [3, N, H, S, D/H]
        let out = Tensor::scaled_dot_product_attention(
            &qkv.get(0),
            &qkv.get(1),
            &qkv.get(2),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        ); // [N, H, S, D/H]
        self.out_proj
            .forward(&out.transpose(1, 2).reshape([n, s, d]))
    }
}

/// One encoder block (`encoder.layers.encoder_layer_{i}`), torchvision's names.
#[derive(Debug)]
struct EncoderBlock {
    ln_1: nn::LayerNorm,
    self_attention: SelfAttention,
    ln_2: nn::LayerNorm,
    mlp_0: nn::Linear,
    mlp_3: nn::Linear,
}

impl EncoderBlock {
    fn new(p: &nn::Path, arch: ViTArch) -> Self {
        let (d, m) = (arch.hidden, arch.mlp);
        let mlp = p / "mlp";
        EncoderBlock {
            ln_1: layer_norm(p / "ln_1", d),
            self_attention: SelfAttention::new(p / "self_attention", d, arch.heads),
            ln_2: layer_norm(p / "ln_2", d),
            // `mlp.1` is the GELU, `mlp.2` and `mlp.4` dropouts: no variables.
            mlp_0: nn::linear(&mlp / "0", d, m, Default::default()),
            mlp_3: nn::linear(&mlp / "3", m, d, Default::default()),
        }
    }

    /// x + attention(ln_1(x)), then that + mlp(ln_2(that)); GELU with erf. In
    /// inference the sums and the GELU are written in place ([`inplace`]).
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = inplace::add(self.self_attention.forward(&self.ln_1.forward(x)), x);
        let hidden = inplace::gelu(self.mlp_0.forward(&self.ln_2.forward(&x)));
        inplace::add(self.mlp_3.forward(&hidden), &x)
    }
}

/// The outputs of one forward pass: what `mos` scores with.
#[derive(Debug)]
pub struct ViTOutputs {
    /// [N, head_size].
    pub logits: Tensor,
    /// The head's input, the class token after `encoder.ln`: [N, D].
    pub pre_logits: Tensor,
    /// The five feature layers ([`TorchvisionViT::feature_layers`]), each [N, D].
    pub features: Vec<Tensor>,
}

/// A torchvision ViT. `forward` gives logits [N, head_size] for input
/// [N, 3, S, S] normalised with the ImageNet mean and standard deviation, S the
/// image size it was built for (224 unless built with
/// [`TorchvisionViT::with_image_size`]); other sizes are refused, as torchvision
/// refuses them (its position embedding has one row per token; resize the images,
/// or the embedding with torchvision's `interpolate_embeddings`, beforehand).
#[derive(Debug)]
pub struct TorchvisionViT {
    pub arch: ViTArch,
    /// The same architecture as `--model` names it.
    pub variant: super::variant::Variant,
    pub head_size: i64,
    pub image_size: i64,
    conv_proj: nn::Conv2D,
    class_token: Tensor,
    pos_embedding: Tensor,
    blocks: Vec<EncoderBlock>,
    ln: nn::LayerNorm,
    head: nn::Linear,
}

impl TorchvisionViT {
    /// Builds the variables under `p` with torchvision's names for 224 x 224
    /// images; `head_size` outputs of `heads.head`. The initial values are
    /// meant to be overwritten by loaded weights.
    pub fn new(p: &nn::Path, arch: ViTArch, head_size: i64) -> Self {
        Self::build(p, arch, head_size, DEFAULT_IMAGE_SIZE)
    }

    /// [`TorchvisionViT::new`] for square images of side `image_size`, which must
    /// be a positive multiple of the patch size (torchvision's condition): 384 for
    /// vit_b_16's SWAG weights, 512 for vit_l_16's, 518 for vit_h_14's.
    pub fn with_image_size(
        p: &nn::Path,
        arch: ViTArch,
        head_size: i64,
        image_size: i64,
    ) -> Result<Self> {
        if image_size <= 0 || image_size % arch.patch != 0 {
            bail!(
                "{arch}: the image size must be a positive multiple of the patch size {}, \
                 not {image_size}",
                arch.patch
            );
        }
        Ok(Self::build(p, arch, head_size, image_size))
    }

    fn build(p: &nn::Path, arch: ViTArch, head_size: i64, image_size: i64) -> Self {
        let d = arch.hidden;
        let conv_cfg = nn::ConvConfig {
            stride: arch.patch,
            ..Default::default()
        };
        let encoder = p / "encoder";
        let layers = &encoder / "layers";
        let blocks = (0..arch.layers)
            .map(|i| EncoderBlock::new(&(&layers / format!("encoder_layer_{i}")), arch))
            .collect();
        let variant = super::variant::TORCHVISION_VARIANTS
            .iter()
            .find(|v| v.name == arch.name)
            .copied()
            .expect("every torchvision ViT is a variant");
        TorchvisionViT {
            arch,
            variant,
            head_size,
            image_size,
            conv_proj: nn::conv2d(p / "conv_proj", 3, d, arch.patch, conv_cfg),
            class_token: p.var("class_token", &[1, 1, d], nn::Init::Const(0.0)),
            pos_embedding: encoder.var(
                "pos_embedding",
                &[1, arch.seq_len(image_size), d],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            blocks,
            ln: layer_norm(&encoder / "ln", d),
            head: nn::linear(p / "heads" / "head", d, head_size, Default::default()),
        }
    }

    /// Zeroes the head (`heads.head`), as fine-tuning starts it.
    pub fn zero_head(&mut self) {
        tch::no_grad(|| {
            let _ = self.head.ws.zero_();
            if let Some(b) = &mut self.head.bs {
                let _ = b.zero_();
            }
        });
    }

    /// The fine-tuning stage of a parameter (torchvision's name): 0 the embedding
    /// (`conv_proj`, `class_token`, `encoder.pos_embedding`), 1..=4 the quarter of
    /// the encoder its block is in, 4 the final `encoder.ln`, 5 the head.
    pub fn stage_of(&self, name: &str) -> usize {
        if name.starts_with("heads.") {
            return 5;
        }
        if name.starts_with("encoder.ln.") {
            return 4;
        }
        let block = name
            .strip_prefix("encoder.layers.encoder_layer_")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        match block {
            Some(i) => (1..=4)
                .find(|&k| self.arch.stage_blocks(k).contains(&i))
                .unwrap_or(4),
            None => 0,
        }
    }

    /// Training forward with the leading `frozen` stages run without a graph
    /// (dropout is 0 in torchvision's ViTs and LayerNorm keeps no statistics, so
    /// training and evaluation compute the same). Logits [N, head_size].
    pub fn forward_train(&self, x: &Tensor, frozen: usize) -> Result<Tensor> {
        let mut out = x.shallow_clone();
        for s in 0..5 {
            out = if s < frozen {
                tch::no_grad(|| self.stage(s, &out))?
            } else {
                self.stage(s, &out)?
            };
        }
        Ok(self.head_of_pooled(&self.pre_logits(&out)))
    }

    /// Tokens in the sequence: (image_size / patch)^2 + 1.
    pub fn seq_len(&self) -> i64 {
        self.arch.seq_len(self.image_size)
    }

    /// Refuses anything but images [N, 3, S, S] of the size built for.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let s = self.image_size;
        let size = x.size();
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s {
            bail!(
                "{}: expected images [N, 3, {s}, {s}], got {size:?}: its position \
                 embedding has {} rows, ({s} / {})^2 patches and the class token; \
                 resize or crop the images to {s} x {s}",
                self.arch,
                self.seq_len(),
                self.arch.patch
            );
        }
        Ok(())
    }

    fn check_tokens(&self, t: &Tensor) -> Result<()> {
        let size = t.size();
        if size.len() != 3 || size[1] != self.seq_len() || size[2] != self.arch.hidden {
            bail!(
                "{}: expected tokens [N, {}, {}], got {size:?}",
                self.arch,
                self.seq_len(),
                self.arch.hidden
            );
        }
        Ok(())
    }

    /// The embedding: `conv_proj` on the image, its patches as tokens in raster
    /// order after the class token, plus `encoder.pos_embedding` ([N, 3, S, S] ->
    /// [N, T, D]; `encoder.dropout` has rate 0).
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let n = x.size()[0];
        let patches = self
            .conv_proj
            .forward(x)
            .flatten(2, 3) // [N, D, T - 1]
            .permute([0, 2, 1]);
        let cls = self.class_token.expand([n, 1, self.arch.hidden], false);
        Ok(Tensor::cat(&[cls, patches], 1) + &self.pos_embedding)
    }

    /// Stage `k`: 0 = the embedding ([`TorchvisionViT::embed`], on images),
    /// 1..=4 = the `k`-th quarter of the encoder blocks (on the tokens of stage
    /// `k - 1`; blocks 0-2, 3-5, 6-8, 9-11 of ViT-B).
    pub fn stage(&self, k: usize, x: &Tensor) -> Result<Tensor> {
        if k == 0 {
            return self.embed(x);
        }
        if k > 4 {
            bail!("{}: stages are 0..=4, not {k}", self.arch);
        }
        self.check_tokens(x)?;
        Ok(self.blocks[self.arch.stage_blocks(k)]
            .iter()
            .fold(x.shallow_clone(), |t, b| b.forward(&t)))
    }

    /// Runs the network up to and including stage `k` (0..=4): tokens [N, T, D].
    pub fn forward_to(&self, x: &Tensor, k: usize) -> Result<Tensor> {
        let mut out = self.stage(0, x)?;
        for s in 1..=k {
            out = self.stage(s, &out)?;
        }
        Ok(out)
    }

    /// A feature layer from a stage's tokens: the mean over the patch tokens
    /// (the class token, token 0, left out), [N, T, D] -> [N, D].
    pub fn patch_mean(tokens: &Tensor) -> Tensor {
        let t = tokens.size()[1];
        tokens
            .narrow(1, 1, t - 1)
            .mean_dim(&[1i64][..], false, None::<Kind>)
    }

    /// The head's input from stage 4's tokens: `encoder.ln` on the class token,
    /// [N, D]. (torchvision normalises every token, then keeps the class token;
    /// LayerNorm is per token, so this is the same.)
    pub fn pre_logits(&self, tokens: &Tensor) -> Tensor {
        self.ln.forward(&tokens.select(1, 0))
    }

    /// The head (`heads.head`) on [`TorchvisionViT::pre_logits`]: logits
    /// [N, head_size].
    pub fn head_of_pooled(&self, pooled: &Tensor) -> Tensor {
        self.head.forward(pooled)
    }

    /// Logits [N, head_size].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.head_of_pooled(&self.pre_logits(&self.forward_to(x, 4)?)))
    }

    /// The five feature layers, each [N, D]: [`TorchvisionViT::patch_mean`] of the
    /// tokens after stages 0..=4.
    pub fn feature_layers(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        Ok(self.forward_features_and_logits(x)?.features)
    }

    /// One forward pass giving the logits, the pre-logit features and the five
    /// feature layers; the logits are [`TorchvisionViT::forward`]'s, bit for bit.
    pub fn forward_features_and_logits(&self, x: &Tensor) -> Result<ViTOutputs> {
        let mut tokens = self.stage(0, x)?;
        let mut features = vec![Self::patch_mean(&tokens)];
        for k in 1..=4 {
            tokens = self.stage(k, &tokens)?;
            features.push(Self::patch_mean(&tokens));
        }
        let pre_logits = self.pre_logits(&tokens);
        Ok(ViTOutputs {
            logits: self.head_of_pooled(&pre_logits),
            pre_logits,
            features,
        })
    }
}

/// A state-dict key of a torchvision ViT weight file as a variable name here:
/// files written before torchvision replaced its MLPBlock (pytorch/vision#6053)
/// name the MLP's linear layers `mlp.linear_1` and `mlp.linear_2`, which
/// torchvision renames to `mlp.0` and `mlp.3` when it loads them
/// (`MLPBlock._load_from_state_dict`); other keys are unchanged.
pub fn torchvision_key(key: &str) -> Cow<'_, str> {
    if key.contains(".mlp.linear_1.") {
        Cow::Owned(key.replacen(".mlp.linear_1.", ".mlp.0.", 1))
    } else if key.contains(".mlp.linear_2.") {
        Cow::Owned(key.replacen(".mlp.linear_2.", ".mlp.3.", 1))
    } else {
        Cow::Borrowed(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn parameters(arch: &str, image_size: i64) -> i64 {
        let vs = VarStore::new(Device::Cpu);
        let arch: ViTArch = arch.parse().unwrap();
        let _m = TorchvisionViT::with_image_size(&vs.root(), arch, 1000, image_size).unwrap();
        vs.variables().values().map(|v| v.numel() as i64).sum()
    }

    /// torchvision's parameter counts (sum of numel over `parameters()`), as its
    /// weight documentation lists them (`num_params`), at the weights' image sizes.
    /// The larger models are checked by tests/vit.rs against keys.json.
    #[test]
    fn parameter_counts_are_torchvisions() {
        assert_eq!(parameters("vit_b_16", 224), 86_567_656);
        assert_eq!(parameters("vit_b_16", 384), 86_859_496);
        assert_eq!(parameters("vit_b_32", 224), 88_224_232);
        assert!("vit_b_14".parse::<ViTArch>().is_err());
        assert_eq!("ViT_L_16".parse::<ViTArch>().unwrap().head_in(), 1024);
        for a in VITS {
            assert_eq!(a.layers % 4, 0, "{a}: stages are quarters");
            assert_eq!(a.hidden % a.heads, 0, "{a}");
        }
    }

    #[test]
    fn image_sizes_must_be_multiples_of_the_patch() {
        let vs = VarStore::new(Device::Cpu);
        let arch: ViTArch = "vit_b_32".parse().unwrap();
        let e = TorchvisionViT::with_image_size(&vs.root(), arch, 10, 200).unwrap_err();
        assert!(
            e.to_string().contains("multiple of the patch size 32"),
            "{e}"
        );
    }

    /// Mahalanobis perturbs the input along the gradient of its score: the whole
    /// pass, attention included, is differentiable in the image.
    #[test]
    fn the_input_gets_a_gradient() {
        let vs = VarStore::new(Device::Cpu);
        let arch: ViTArch = "vit_b_32".parse().unwrap();
        let m = TorchvisionViT::with_image_size(&vs.root(), arch, 10, 64).unwrap();
        let x = Tensor::ones([2, 3, 64, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let out = m.forward_features_and_logits(&x).unwrap();
        (out.logits.sum(Kind::Float) + out.features[1].sum(Kind::Float)).backward();
        let g = x.grad();
        assert_eq!(g.size(), [2, 3, 64, 64]);
        assert!(g.isfinite().all().int64_value(&[]) == 1);
        assert!(g.abs().max().double_value(&[]) > 0.0);
    }

    #[test]
    fn legacy_mlp_keys_are_renamed() {
        let k = "encoder.layers.encoder_layer_3.mlp.linear_1.weight";
        assert_eq!(
            torchvision_key(k),
            "encoder.layers.encoder_layer_3.mlp.0.weight"
        );
        let k = "encoder.layers.encoder_layer_3.mlp.linear_2.bias";
        assert_eq!(
            torchvision_key(k),
            "encoder.layers.encoder_layer_3.mlp.3.bias"
        );
        assert!(matches!(
            torchvision_key("heads.head.bias"),
            Cow::Borrowed(_)
        ));
    }
}
