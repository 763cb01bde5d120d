//! The BiT ResNetV2 backbone (docs/model.md) and its weight files.
pub mod bit;
pub mod checkpoint;
pub mod variant;
pub mod weights;

pub use bit::{Freeze, Precision, ResNetV2};
pub use variant::{Variant, VARIANTS};
