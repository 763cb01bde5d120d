//! A backbone of any family, as the pipeline uses it (docs/architecture.md): five
//! stages whose outputs are the feature layers, the pre-logit features and the
//! head. Extraction, the image passes, the test commands and Mahalanobis tuning
//! take a [`Network`]; a family adds a variant here and its module beside this one.
use tch::{Kind, Tensor};

use super::bit::{spatial_mean, Precision, ResNetV2};
use super::resnet::TorchvisionResNet;
use super::variant::Variant;

/// A network of one of the families of [`super::variant::Family`].
#[derive(Debug)]
pub enum Network {
    Bit(ResNetV2),
    TorchvisionResNet(TorchvisionResNet),
}

impl Network {
    /// The architecture (`--model`).
    pub fn variant(&self) -> Variant {
        match self {
            Network::Bit(m) => m.variant,
            Network::TorchvisionResNet(m) => m.variant,
        }
    }

    /// Logits per image.
    pub fn head_size(&self) -> i64 {
        match self {
            Network::Bit(m) => m.head_size,
            Network::TorchvisionResNet(m) => m.head_size,
        }
    }

    /// Inference precision (BiT's can be changed; the others run in float32).
    pub fn precision(&self) -> Precision {
        match self {
            Network::Bit(m) => m.precision,
            Network::TorchvisionResNet(_) => Precision::Fp32,
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

    /// Feature layer `k` of stage `k`'s output: its spatial mean [N, C_k], float32
    /// (the Mahalanobis detector's features).
    pub fn layer_feature(&self, out: &Tensor) -> Tensor {
        spatial_mean(out).to_kind(Kind::Float)
    }

    /// The head's input from stage 4's output (float32; [N, D] or [N, D, 1, 1]).
    pub fn pre_logits(&self, last: &Tensor) -> Tensor {
        match self {
            Network::Bit(m) => m.pre_logits(last),
            Network::TorchvisionResNet(m) => m.pre_logits(last),
        }
    }

    /// The head on [`Network::pre_logits`]: logits [N, head_size].
    pub fn head_of_pooled(&self, pooled: &Tensor) -> Tensor {
        match self {
            Network::Bit(m) => m.head_of_pooled(pooled),
            Network::TorchvisionResNet(m) => m.head_of_pooled(pooled),
        }
    }

    /// Logits [N, head_size].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Network::Bit(m) => m.forward(x),
            Network::TorchvisionResNet(m) => m.forward(x),
        }
    }
}
