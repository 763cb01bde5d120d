//! The pure parts of fine-tuning (docs/finetuning.md, the original's `finetune.py` with the
//! BiT-HyperRule of `utils/finetune_utils.py`): the learning-rate schedule, mixup
//! and SGD with momentum over accumulated micro-batches.
//!
//! - [`schedule`]: the step supports by training-set size, the warm-up /
//!   staircase learning rate (`get_lr`), the mixup switch (`get_mixup`) and the
//!   `--schedule` override.
//! - [`mixup`]: a seedable Beta(alpha, alpha) sampler and permutation, the mixed
//!   input and the mixed loss (`mixup_data`, `mixup_criterion_*`).
//! - [`sgd`]: `torch.optim.SGD(momentum=0.9)` on the trainable parameters with
//!   correct gradient accumulation over `--batch-split` micro-batches, and its
//!   momentum buffers by parameter name for checkpoints.
pub mod mixup;
pub mod schedule;
pub mod sgd;
