//! The evaluation pipeline, one stage per module, in the order data flows:
//!
//! 1. [`extract`]: images -> the network's outputs (logits, pre-logit features,
//!    the spatial means of the five feature layers), batched exactly as the test
//!    commands batch them;
//! 2. [`store`]: those outputs kept on disk (`mos extract`, `mos merge`): a
//!    directory of safetensors shards with a manifest (docs/formats.md#feature-stores);
//! 3. [`score`]: outputs -> OOD scores, per batch of the same rows ([`posthoc`]:
//!    the later post-hoc methods from stored features, the head and training
//!    statistics);
//! 4. metrics ([`crate::metrics`]) and the report ([`crate::report`], plots in
//!    [`crate::plot`]).
//!
//! [`mahalanobis`] reads the tuned Mahalanobis parameters ([`mahalanobis_params`]
//! checks the file) and scores a batch of images with the model, for noise
//! magnitudes that need the images.
//!
//! `mos test-mos` and `mos test-baseline` run 1 and 3 on each batch in memory
//! ([`crate::eval`]); `mos extract` runs 1 and 2, `mos score` 2 and 3. Both use the
//! same functions on the same rows, so a score from a store equals the test
//! command's bit for bit on the same device (docs/cluster.md).
//!
//! [`benchmark`] runs a whole table (`mos benchmark`): every (model, set) pair
//! through stages 1-2 once, then 3 and 4 for every method (docs/benchmark.md).
pub mod benchmark;
pub mod extract;
pub mod mahalanobis;
pub mod mahalanobis_params;
pub mod posthoc;
pub mod score;
pub mod store;
