//! The evaluation pipeline, one stage per module, in the order data flows; a
//! stage uses only the stages before it and [`vocab`], the names they share
//! (docs/architecture.md):
//!
//! 0. [`vocab`]: which outputs to keep ([`vocab::Layers`]), the method names
//!    `--score` takes, tensors as plain numbers;
//! 1. [`extract`]: images -> the network's outputs (logits, pre-logit features,
//!    the spatial means of the five feature layers), batched exactly as the test
//!    commands batch them;
//! 2. [`store`]: those outputs kept on disk (`mos extract`, `mos merge`): a
//!    directory of safetensors shards with a manifest (docs/formats.md#feature-stores);
//! 3. [`score`]: outputs -> OOD scores, per batch of the same rows; next to it what
//!    the scores are fitted with ([`score::posthoc_fit`], [`score::mahalanobis_params`])
//!    and the methods that perturb the images ([`score::image_pass`]);
//! 4. metrics: [`crate::metrics`] (AUROC, AUPR, FPR95 of two score lists);
//! 5. [`report`]: `results.json` rows ([`report::MethodResult`]), tables and score
//!    CSVs (plots in [`crate::plot`]).
//!
//! Two drivers run the stages; neither is imported by a stage:
//! - [`in_memory`]: `mos test-mos` and `mos test-baseline`, stages 1 and 3 on each
//!   batch in memory, then 4 and 5. `mos extract` runs 1 and 2, `mos score` 2 to 5,
//!   with the same functions on the same rows, so a score from a store equals the
//!   test command's bit for bit on the same device (docs/cluster.md);
//! - [`benchmark`]: a whole table (`mos benchmark`): every (model, set) pair
//!   through stages 1-2 once, then 3 to 5 for every method (docs/benchmark.md).
pub mod vocab;

pub mod extract;
pub mod store;

pub mod import;

pub mod score;

pub mod report;

pub mod benchmark;
pub mod in_memory;
