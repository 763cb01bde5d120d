//! Steps 3 and 4 of `mos benchmark`: [`extract`] runs each (model, set) pair once
//! into a feature store in the run directory (a rerun finds it complete and
//! recomputes nothing), with the methods that perturb the images (ODIN with
//! epsilon > 0, Mahalanobis with magnitude > 0) riding on the flat model's
//! extraction: one pass over each set whose first forward pass, with a graph, gives
//! both the stored outputs and their input gradients
//! ([`crate::pipeline::score::image_pass`]). [`image_passes`] runs those methods
//! alone where no store is extracted, and [`image_pass`] where a store is already
//! complete.
use std::time::Instant;

use anyhow::{Context, Result};

use super::plan::{ModelStores, RoleModel, StorePlan};
use super::BenchmarkRequest;
use crate::data::loader::Item;
use crate::data::EvalSet;
use crate::pipeline::extract::{extract_range_with, ExtractOptions, Extracted, RangePass};
use crate::pipeline::score::image_pass::ImagePass;
use crate::pipeline::score::{Method, RowScores};
use crate::pipeline::store::{self, StoreData};
use crate::pipeline::vocab::Layers;
use crate::runlog::RunLog;

/// Seconds per stage of the run, for the report ("where the time went").
pub(super) type Stages = Vec<(String, f64)>;

/// Step 3, extract: `m`'s stores of `sets` (ID first), each extracted or found
/// complete, with the image-pass methods of `pass` scored on the same batches.
/// Returns the stores' rows and the image-pass methods' scores per set (empty
/// without any).
pub(super) fn extract(
    req: &BenchmarkRequest,
    m: &RoleModel,
    sets: &[&EvalSet],
    plan: &ModelStores,
    pass: &ImagePass,
    log: &RunLog,
    stages: &mut Stages,
) -> Result<(Vec<StoreData>, Vec<SetScores>)> {
    let mut stores = Vec::new();
    let mut pass_sc = Vec::new();
    for (set, p) in sets.iter().zip(&plan.stores) {
        let (s, sc) = extract_store(req, m, set, p, pass, log, stages)?;
        stores.push(s);
        pass_sc.extend(sc);
    }
    Ok((stores, pass_sc))
}

/// Step 4, image passes: the image-pass methods of `pass` over `sets` with `m`,
/// when `m` has no store to extract.
pub(super) fn image_passes(
    req: &BenchmarkRequest,
    m: &RoleModel,
    sets: &[&EvalSet],
    pass: &ImagePass,
    log: &RunLog,
    stages: &mut Stages,
) -> Result<Vec<SetScores>> {
    sets.iter()
        .map(|set| image_pass(req, m, set, pass, log, stages))
        .collect()
}

/// Runs `pass` over the images of `set` with `m`, keeping the outputs `layers`
/// asks for: one decoding and one first forward pass per batch for both.
fn run_pass(
    req: &BenchmarkRequest,
    m: &RoleModel,
    set: &EvalSet,
    items: &[Item],
    layers: Layers,
    pass: &ImagePass,
) -> Result<(Extracted, RangePass)> {
    let label = pass_label(m, pass);
    let bar = crate::progress::bar(items.len() as u64, &format!("{label} {}", set.name));
    let opts = ExtractOptions {
        batch: req.batch,
        workers: req.workers,
        transform: req.transform()?,
        skip_bad: req.skip_bad_images,
        device: req.device,
        layers,
    };
    let out = crate::runtime::catch_torch(|| {
        extract_range_with(
            &m.loaded.model,
            items,
            0..items.len(),
            &opts,
            Some(pass),
            &|n| bar.inc(n),
        )
    })
    .with_context(|| {
        format!(
            "{label} of {} (--batch {}, --crop {})",
            set.name, req.batch, req.crop
        )
    })??;
    bar.finish_and_clear();
    Ok(out)
}

/// What a pass over a set does, for messages: "extracting with the flat model",
/// "+ ODIN+Mahalanobis".
fn pass_label(m: &RoleModel, pass: &ImagePass) -> String {
    if pass.methods.is_empty() {
        format!("{} model", m.role)
    } else {
        format!("{} model + {}", m.role, method_names(pass.methods))
    }
}

fn method_names(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::name)
        .collect::<Vec<_>>()
        .join("+")
}

/// The image-pass methods' scores of a set from `pass`'s results.
fn pass_scores(rp: RangePass, skipped: usize) -> SetScores {
    SetScores {
        scores: rp.scores,
        seconds: rp.seconds,
        skipped,
    }
}

/// Notes the stages of a pass over `set`: the shared work (decoding, the first
/// forward pass, and writing the store) as `shared`, the image-pass methods' own.
fn pass_stages(
    stages: &mut Stages,
    shared: String,
    pass: &ImagePass,
    set: &EvalSet,
    rp: &RangePass,
) {
    stages.push((shared, rp.shared_seconds));
    if !pass.methods.is_empty() {
        stages.push((
            format!(
                "image pass {}, {}: backward and perturbed forward passes",
                method_names(pass.methods),
                set.name
            ),
            rp.seconds.iter().sum(),
        ));
    }
}

/// The image-pass methods alone over `set` (no store to extract, or it is
/// complete): the same pass as [`extract_store`]'s, its outputs not kept.
fn image_pass(
    req: &BenchmarkRequest,
    m: &RoleModel,
    set: &EvalSet,
    pass: &ImagePass,
    log: &RunLog,
    stages: &mut Stages,
) -> Result<SetScores> {
    let items = set.folder.items();
    let (ex, rp) = run_pass(req, m, set, &items, Layers::LOGITS, pass)?;
    log.line(format!(
        "{}: image pass over {} ({} images) in {:.2} s ({:.2} s the methods' own)",
        method_names(pass.methods),
        set.name,
        items.len(),
        rp.shared_seconds + rp.seconds.iter().sum::<f64>(),
        rp.seconds.iter().sum::<f64>()
    ));
    pass_stages(
        stages,
        format!(
            "image pass {}, {}: decoding and first forward pass",
            method_names(pass.methods),
            set.name
        ),
        pass,
        set,
        &rp,
    );
    Ok(pass_scores(rp, ex.skipped.len()))
}

/// Extracts the planned store (one shard) with the image-pass methods of `pass`
/// on the same batches, or finds it complete (then `pass` runs alone,
/// [`image_pass`]). Returns the store's rows and the image-pass methods' scores
/// (None without any).
fn extract_store(
    req: &BenchmarkRequest,
    m: &RoleModel,
    set: &EvalSet,
    plan: &StorePlan,
    pass: &ImagePass,
    log: &RunLog,
    stages: &mut Stages,
) -> Result<(StoreData, Option<SetScores>)> {
    let (items, dir) = (&plan.items, plan.dir.as_path());
    let layers = Layers::parse(&plan.manifest.layers)?;
    // Taken away again if the extraction fails (see store::NewStore).
    let (manifest, new_store) =
        store::prepare_new(dir, &plan.manifest, "another --name or --logdir")?;
    let mut pass_sc = None;
    let status = store::complete_shard(dir, &manifest, 0)?;
    if let store::ShardStatus::Damaged(why) = &status {
        log.line(format!(
            "{} model, {}: store {} fails verification, extracting it again: {why}",
            m.role,
            set.name,
            dir.display()
        ));
    }
    if matches!(status, store::ShardStatus::Complete(_)) {
        log.line(format!(
            "{} model, {}: store {} is complete, reused",
            m.role,
            set.name,
            dir.display()
        ));
        stages.push((format!("extract {} model, {}", m.role, set.name), 0.0));
        if !pass.methods.is_empty() {
            pass_sc = Some(image_pass(req, m, set, pass, log, stages)?);
        }
    } else {
        let (ex, mut rp) = run_pass(req, m, set, items, layers, pass)?;
        for (i, s) in &ex.skipped {
            log.line(crate::pipeline::extract::skip_line(*i, s));
        }
        let device = crate::runtime::device_name(req.device);
        let t0 = Instant::now();
        store::write_shard(dir, &manifest, 0, &ex, &plan.rel, &device)?;
        rp.shared_seconds += t0.elapsed().as_secs_f64();
        let own: f64 = rp.seconds.iter().sum();
        let secs = rp.shared_seconds + own;
        let with = if pass.methods.is_empty() {
            String::new()
        } else {
            format!(
                ", with the image pass of {} ({own:.2} s of it their backward and perturbed forward passes)",
                method_names(pass.methods)
            )
        };
        log.line(format!(
            "{} model, {}: extracted {} images into {} in {secs:.2} s ({:.1} images/s){with}",
            m.role,
            set.name,
            items.len(),
            dir.display(),
            items.len() as f64 / secs.max(1e-9)
        ));
        let shared = if pass.methods.is_empty() {
            format!("extract {} model, {}", m.role, set.name)
        } else {
            format!(
                "extract {} model, {} (decoding and forward pass shared with the image pass)",
                m.role, set.name
            )
        };
        pass_stages(stages, shared, pass, set, &rp);
        if !pass.methods.is_empty() {
            pass_sc = Some(pass_scores(rp, ex.skipped.len()));
        }
    }
    if let Some(s) = new_store {
        s.keep();
    }
    let index = store::open(dir, false)?;
    if !index.manifest.complete {
        store::mark_complete(&index)?;
    }
    Ok((store::load(dir)?, pass_sc))
}

/// Scores of one set: per method, per image; seconds per method; images skipped.
pub(super) struct SetScores {
    pub scores: Vec<Vec<f64>>,
    pub seconds: Vec<f64>,
    pub skipped: usize,
}

impl SetScores {
    pub fn of_store(r: RowScores, s: &StoreData) -> Self {
        SetScores {
            scores: r.scores,
            seconds: r.seconds,
            skipped: s.skipped.len(),
        }
    }
}
