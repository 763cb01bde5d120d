//! The networks `finetune-group` and `finetune-flat` train (docs/training.md): BiT's
//! ResNetV2 (the paper) and torchvision's ResNets, each with a new zero head, the
//! same freezing flag (`--num-block-open`) and the same training step.
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

/// A network being fine-tuned.
#[derive(Debug)]
pub enum TrainNet {
    Bit(ResNetV2),
    TorchvisionResNet(TorchvisionResNet),
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
            _ => bail!(
                "--model {}: fine-tuning runs BiT models and torchvision's ResNets (resnet18 ... resnet152)",
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
        }
    }

    /// Logits in evaluation mode (validation).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            TrainNet::Bit(m) => m.forward(x),
            TrainNet::TorchvisionResNet(m) => m.forward(x),
        }
    }
}
