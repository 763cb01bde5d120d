//! `mos benchmark`: a whole table of methods x OOD sets in one run
//! (docs/benchmark.md). [`run`] takes seven steps, each a function:
//!
//! 1. plan ([`plan::plan`]): the sets (and their expected image counts), the methods
//!    and their parameter files, the published numbers;
//! 2. check ([`plan::check`]): each checkpoint fits its role (group or flat) and
//!    the group split it records; the stores planned, the post-hoc methods'
//!    training statistics checked. Everything that can go wrong early does so
//!    here, before any image is forwarded;
//! 3. extract ([`passes::extract`]): each (model, set) pair once into a feature
//!    store in the run directory ([`crate::pipeline::extract`],
//!    [`crate::pipeline::store`]; a rerun finds them complete and recomputes
//!    nothing), the methods that perturb the images (ODIN with epsilon > 0,
//!    Mahalanobis with magnitude > 0) riding on the flat model's extraction;
//! 4. image passes ([`passes::image_passes`]): those methods alone, where no store
//!    is extracted;
//! 5. score ([`scoring::score`]): the methods the stores serve
//!    ([`crate::pipeline::score`]), then every method's metrics as rows
//!    ([`scoring::rows`]);
//! 6. compare ([`published::compare`]): the rows against the published numbers,
//!    when given;
//! 7. report ([`summary::report`]): `results.json`, the table, `report.md` with
//!    the published numbers side by side and where the time went.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::model::Variant;
use crate::pipeline::report::MethodResult;
use crate::pipeline::score::image_pass::ImagePass;
use crate::pipeline::score::{posthoc_fit, Method, MethodSettings};
use crate::runlog::RunLog;

pub mod passes;
pub mod plan;
pub mod published;
pub mod scoring;
pub mod summary;

pub use plan::foreign_files;
pub use published::{
    compare, comparison_table, read_published, Comparison, Published, PublishedCell, UncheckedCell,
};

/// An image folder with, optionally, the number of images it must hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetSpec {
    pub path: PathBuf,
    pub images: Option<usize>,
    /// The set's name in the results; default: the folder's base name.
    pub name: Option<String>,
}

/// What one benchmark run asks for (the command line and config file of
/// `mos benchmark`, merged).
#[derive(Debug, Clone)]
pub struct BenchmarkRequest {
    pub in_set: SetSpec,
    pub out_sets: Vec<SetSpec>,
    pub model: Variant,
    pub group_model_path: Option<PathBuf>,
    pub flat_model_path: Option<PathBuf>,
    /// Method names as `--score` takes them ([`crate::pipeline::vocab::METHOD_NAMES`]).
    pub score: Vec<String>,
    /// Method settings (temperatures, epsilon, group config, Mahalanobis parameters).
    pub settings: MethodSettings,
    /// The post-hoc methods' hyper-parameters (docs/scores.md#post-hoc-methods-from-feature-stores).
    pub posthoc: posthoc_fit::Settings,
    /// `--fit`: a store of in-distribution training images extracted with the flat
    /// model, for ReAct, KNN, ViM, DICE, NNGuide, fDBD, Residual and NECO.
    pub fit: Option<PathBuf>,
    pub published: Option<PathBuf>,
    /// `<logdir>/<name>`.
    pub run_dir: PathBuf,
    pub batch: usize,
    pub workers: usize,
    pub crop: usize,
    /// torchvision's models: the shorter side before the center crop.
    pub resize: Option<usize>,
    /// A TorchScript module's `--mean`, `--std` and `--head`.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub head: Option<String>,
    pub skip_bad_images: bool,
    pub device: Device,
}

/// What a benchmark produced.
pub struct BenchmarkOutcome {
    pub rows: Vec<MethodResult>,
    pub comparison: Option<Vec<Comparison>>,
    pub report: PathBuf,
    pub results: PathBuf,
}

impl BenchmarkRequest {
    /// The transform flags as the other commands take them.
    pub fn input_spec(&self) -> crate::model::input::InputSpec {
        crate::model::input::InputSpec {
            crop: Some(self.crop),
            resize: self.resize,
            mean: self.mean.clone(),
            std: self.std.clone(),
            head: self.head.clone(),
        }
    }

    /// The models' evaluation transform (`--crop`, `--resize`; a TorchScript
    /// module's `--mean`, `--std`).
    pub fn transform(&self) -> Result<crate::data::ImageTransform> {
        self.input_spec().resolve(self.model)
    }
}

/// Runs the benchmark end to end: the seven steps of the module's documentation.
pub fn run(req: &BenchmarkRequest) -> Result<BenchmarkOutcome> {
    // 1-2. Everything that can be checked before any forward pass.
    let plan = plan::plan(req)?;
    let checked = plan::check(req, &plan)?;

    let log = RunLog::open(&req.run_dir, "benchmark.log")?;
    let started = Instant::now();
    log.line(format!(
        "mos benchmark: methods {}; in-distribution {} ({} images, {} classes); out-of-distribution {}; model {}, crop {}, batch {}, on {}",
        plan.names.join(","),
        plan.id.name,
        plan.id.folder.len(),
        plan.id_classes,
        plan.oods
            .iter()
            .map(|o| format!("{} ({} images)", o.name, o.folder.len()))
            .collect::<Vec<_>>()
            .join(", "),
        req.model.name,
        req.crop,
        req.batch,
        crate::runtime::device_name(req.device)
    ));
    for line in &checked.notes {
        log.line(line.clone());
    }
    let mut stages: passes::Stages = Vec::new();
    let mut scores = scoring::Scores::new(plan.methods.len());
    let sets = plan.sets();
    for (m, ms) in checked.models.iter().zip(&checked.stores) {
        // The methods that perturb the images ride on the extraction's pass over
        // each set (or take a pass of their own when nothing is extracted).
        let pass_ms: Vec<Method> = ms
            .pass_methods
            .iter()
            .map(|&i| plan.image_methods[i].clone())
            .collect();
        let pass = ImagePass { methods: &pass_ms };
        let mut pass_sc = Vec::new();
        if !ms.store_methods.is_empty() {
            // 3. Extract (with the image pass), then 5. score from the stores.
            let (stores, sc) = passes::extract(req, m, &sets, ms, &pass, &log, &mut stages)?;
            pass_sc = sc;
            scoring::score(&plan, m, ms, &stores, &log, &mut stages, &mut scores)?;
        } else if !pass_ms.is_empty() {
            // 4. Image passes alone.
            pass_sc = passes::image_passes(req, m, &sets, &pass, &log, &mut stages)?;
        }
        if !pass_ms.is_empty() {
            scores.take_passes(ms, &mut pass_sc)?;
        }
    }
    let rows = scoring::rows(req, &plan, &checked, &scores)?;
    // 6-7. Compare with the published numbers and report.
    summary::report(req, rows, plan.published.as_ref(), &stages, started, &log)
}
