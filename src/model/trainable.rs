//! The networks `finetune-group` and `finetune-flat` train (docs/finetuning.md):
//! BiT's ResNetV2 (the paper), torchvision's ResNets and ViTs, each with a new zero
//! head, the same freezing flag (`--num-block-open`) and the same training step.
//!
//! BatchNorm (torchvision's ResNets): the trainable stages run in training mode —
//! the batch's statistics, the running ones updated with momentum 0.1 — as
//! torchvision trains its models (`model.train()`); the frozen stages run in
//! evaluation mode without a graph, so they keep and use their pretrained running
//! statistics (a frozen stage whose statistics drifted with the new data would no
//! longer compute what it was trained to). Head-only fine-tuning (`--num-block-open
//! 0`) thus trains a linear head on fixed features.
use anyhow::{bail, Result};
use tch::{nn, Tensor};

use super::bit::{apply_freeze_with, Freeze, ResNetV2};
use super::resnet::TorchvisionResNet;
use super::variant::{Family, Variant};
use super::vit::TorchvisionViT;

/// A network being fine-tuned.
#[derive(Debug)]
pub enum TrainNet {
    Bit(ResNetV2),
    TorchvisionResNet(TorchvisionResNet),
    TorchvisionViT(TorchvisionViT),
}

/// Whether `finetune-group`/`finetune-flat` train `variant` (not a TorchScript module).
pub fn can_finetune(variant: Variant) -> bool {
    variant.family != Family::TorchScript
}

impl TrainNet {
    /// Builds `variant` under `p` with a zero `head_size`-way head; the other
    /// weights are to be loaded (or trained from their initial values).
    pub fn new(p: &nn::Path, variant: Variant, head_size: i64) -> Result<TrainNet> {
        Ok(match variant.family {
            Family::Bit => TrainNet::Bit(ResNetV2::new(p, variant, head_size)),
            Family::TorchvisionResNet => {
                let arch = variant
                    .torchvision_resnet()
                    .expect("a torchvision ResNet variant has its architecture");
                let mut m = TorchvisionResNet::new(p, arch, head_size);
                m.zero_head();
                TrainNet::TorchvisionResNet(m)
            }
            Family::TorchvisionViT => {
                let arch = variant
                    .torchvision_vit()
                    .expect("a torchvision ViT variant has its architecture");
                let mut m = TorchvisionViT::new(p, arch, head_size);
                m.zero_head();
                TrainNet::TorchvisionViT(m)
            }
            Family::TorchScript => bail!(
                "--model {}: fine-tuning builds the network itself; a TorchScript module is evaluated only",
                variant.name
            ),
        })
    }

    /// The head's parameter names in the family's state dicts (the prefix that
    /// pretrained weights do not provide: the head is replaced).
    pub fn head_prefix(&self) -> &'static str {
        match self {
            TrainNet::Bit(_) => "head.",
            TrainNet::TorchvisionResNet(_) => "fc.",
            TrainNet::TorchvisionViT(_) => "heads.",
        }
    }

    /// Applies `freeze` to the variables of `vs`; returns the trainable parameters
    /// sorted by name.
    pub fn apply_freeze(&self, vs: &nn::VarStore, freeze: Freeze) -> Vec<(String, Tensor)> {
        match self {
            TrainNet::Bit(_) => apply_freeze_with(vs, &|n| freeze.trainable(n)),
            TrainNet::TorchvisionResNet(_) => {
                apply_freeze_with(vs, &|n| freeze.trainable_torchvision(n))
            }
            TrainNet::TorchvisionViT(m) => {
                apply_freeze_with(vs, &|n| m.stage_of(n) >= freeze.frozen_stages())
            }
        }
    }

    /// Caches what the frozen stages compute from fixed weights (BiT's
    /// standardized convolutions); nothing for the others.
    pub fn fix_frozen_weights(&mut self, freeze: Freeze) {
        if let TrainNet::Bit(m) = self {
            m.fix_frozen_weights(freeze);
        }
    }

    /// Logits in training mode with `freeze` (frozen stages without a graph).
    pub fn forward_train(&self, x: &Tensor, freeze: Freeze) -> Tensor {
        match self {
            TrainNet::Bit(m) => m.forward_train(x, freeze),
            TrainNet::TorchvisionResNet(m) => m.forward_train(x, freeze.frozen_stages()),
            TrainNet::TorchvisionViT(m) => fits(m.forward_train(x, freeze.frozen_stages())),
        }
    }

    /// Logits in evaluation mode (validation).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            TrainNet::Bit(m) => m.forward(x),
            TrainNet::TorchvisionResNet(m) => m.forward(x),
            TrainNet::TorchvisionViT(m) => fits(m.forward(x)),
        }
    }
}

/// A ViT's result on a batch of the size it takes: fine-tuning refuses another
/// `--crop` before anything is read, so a failure is a bug.
fn fits(r: Result<Tensor>) -> Tensor {
    r.unwrap_or_else(|e| panic!("internal: a batch the ViT does not take: {e:#}"))
}
