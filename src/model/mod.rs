//! The BiT ResNetV2 backbone (SPEC §2) and its weight files.
pub mod bit;
pub mod variant;

pub use bit::{Freeze, ResNetV2};
pub use variant::{Variant, VARIANTS};
