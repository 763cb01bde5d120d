//! mos: out-of-distribution detection at ImageNet scale.
//!
//! A faithful and fast Rust reimplementation of the code of *MOS: Towards Scaling
//! Out-of-distribution Detection for Large Semantic Space* (Huang & Li, CVPR 2021):
//! the BiT ResNetV2 backbone, group-softmax fine-tuning, the MOS score and the
//! baselines it is compared with (MSP, ODIN, Energy, Mahalanobis, KL matching).
pub mod cli;
pub mod commands;
pub mod data;
pub mod demo;
pub mod device;
pub mod dist;
pub mod groupconfig;
pub mod groups;
pub mod logistic;
pub mod metrics;
pub mod model;
pub mod ood;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod runlog;
pub mod runtime;
pub mod train;
pub mod weights;
