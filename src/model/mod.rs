//! The backbones (docs/model.md): BiT ResNetV2 ([`bit`]), torchvision's ResNets
//! ([`resnet`]) and Vision Transformers ([`vit`]), and their weight files.
pub mod bit;
pub mod checkpoint;
mod inplace;
pub mod input;
pub mod network;
pub mod resnet;
pub mod script;
pub mod trainable;
pub mod variant;
pub mod vit;
pub mod weights;

pub use bit::{Freeze, Precision, ResNetV2};
pub use network::Network;
pub use variant::{Family, Variant, TORCHVISION_VARIANTS, VARIANTS};
