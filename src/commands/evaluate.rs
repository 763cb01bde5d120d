//! The shared body of `mos test-mos` and `mos test-baseline`: open the sets, load
//! the model strictly, score, and write results.json, the table, scores and plots.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cli::{DeviceArgs, EvalDataArgs, EvalOutputArgs, RunArgs};
use crate::data::EvalSet;
use crate::groupconfig::check_split;
use crate::model::weights::{load_network, with_head_hint};
use crate::model::Variant;
use crate::pipeline::in_memory::{finish_kl, metrics_of, score_split, EvalOptions};
use crate::pipeline::report::{
    csv_path, merge_results, table, write_scores_csv, MethodResult, ScoreColumns,
};
use crate::pipeline::score::Method;
use crate::runlog::RunLog;

/// The head a checkpoint must have for this evaluation, and how to explain a mismatch.
pub enum HeadCheck {
    /// A group-softmax head: classes of the ID folder plus one "others" per group.
    Group { groups: usize, config: PathBuf },
    /// A flat head: one logit per ID class.
    Flat,
}

/// What one evaluation command asks for.
pub struct EvalJob<'a> {
    pub command: &'a str,
    pub data: &'a EvalDataArgs,
    pub run: &'a RunArgs,
    pub model: Variant,
    pub model_path: &'a Path,
    pub device: &'a DeviceArgs,
    pub output: &'a EvalOutputArgs,
    pub methods: Vec<Method>,
    pub head: HeadCheck,
    /// The command's own settings (an object); the data and device flags are added
    /// by [`run`].
    pub settings: serde_json::Value,
}

fn expected_head(job: &EvalJob, id_classes: usize) -> Result<i64> {
    Ok(match &job.head {
        HeadCheck::Flat => id_classes as i64,
        HeadCheck::Group { groups, config } => {
            let Some(Method::Mos(slices)) = job.methods.first() else {
                bail!("internal: a group head needs the MOS method");
            };
            if slices.num_classes() != id_classes as i64 {
                bail!(
                    "group config {} covers {} classes but --in-datadir {} has {id_classes} class folders",
                    config.display(),
                    slices.num_classes(),
                    job.data.in_datadir.display()
                );
            }
            id_classes as i64 + *groups as i64
        }
    })
}

fn head_hint(job: &EvalJob, id_classes: usize) -> String {
    match &job.head {
        HeadCheck::Flat => format!(
            "test-baseline needs a flat-softmax checkpoint with one logit per class of --in-datadir ({id_classes}); a group-softmax checkpoint belongs to test-mos"
        ),
        HeadCheck::Group { groups, config } => format!(
            "test-mos needs a group-softmax checkpoint with {id_classes} classes + {groups} groups (one 'others' logit each, group config {}); a flat-softmax checkpoint belongs to test-baseline",
            config.display()
        ),
    }
}

/// Runs the job end to end.
pub fn run(mut job: EvalJob) -> Result<()> {
    // Checked before anything is read.
    let transform = job.data.transform.resolve(job.model)?;
    let script = job.data.transform.script_spec(job.model);
    if let Some(map) = job.settings.as_object_mut() {
        let d = job.data;
        map.insert("in_datadir".into(), serde_json::json!(d.in_datadir));
        map.insert("out_datadir".into(), serde_json::json!(d.out_datadir));
        map.insert("batch".into(), d.batch.into());
        map.insert("crop".into(), transform.size().into());
        if let Some(r) = transform.resize() {
            map.insert("resize".into(), r.into());
        }
        if let (Some(spec), crate::data::ImageTransform::CenterCrop(c)) = (&script, &transform) {
            map.insert("mean".into(), serde_json::json!(c.mean));
            map.insert("std".into(), serde_json::json!(c.std));
            map.insert("head".into(), serde_json::json!(spec.head));
        }
        map.insert("skip_bad_images".into(), d.skip_bad_images.into());
        map.insert("device".into(), job.device.device.to_string().into());
    }
    let dir = job.run.logdir.join(&job.run.name);
    let log = RunLog::open(&dir, "test.log")?;
    let started = Instant::now();
    log.line(format!(
        "mos {} {}",
        job.command,
        serde_json::to_string(&job.settings)?
    ));
    let device = job.device.device.resolve()?;
    let id = EvalSet::open(&job.data.in_datadir, "--in-datadir")?;
    let oods = job
        .data
        .out_datadir
        .iter()
        .map(|d| EvalSet::open(d, "--out-datadir"))
        .collect::<Result<Vec<_>>>()?;
    for (i, a) in oods.iter().enumerate() {
        if let Some(b) = oods[..i].iter().find(|b| b.name == a.name) {
            bail!(
                "--out-datadir {} and {}: two OOD sets named {} (the folder's base name names the set in the results)",
                b.folder.root.display(),
                a.folder.root.display(),
                a.name
            );
        }
    }
    let id_classes = id.folder.classes.len();
    log.line(format!(
        "in-distribution {}: {} images, {id_classes} classes; out-of-distribution: {}",
        id.name,
        id.folder.len(),
        oods.iter()
            .map(|o| format!("{} ({} images)", o.name, o.folder.len()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let head = expected_head(&job, id_classes)?;
    let loaded = load_network(
        job.model_path,
        job.model,
        script.as_ref(),
        Some(head),
        device,
    )
    .map_err(|e| with_head_hint(e, || head_hint(&job, id_classes)))?;
    log.line(format!(
        "model {} from {} ({}), head {head}, on {}",
        job.model.name,
        job.model_path.display(),
        loaded.state.format,
        crate::runtime::device_name(device)
    ));
    if let HeadCheck::Group { config, .. } = &job.head {
        for method in &job.methods {
            if let Method::Mos(slices) = method {
                let recorded = loaded.state.group_config();
                let source = format!("the checkpoint {}", job.model_path.display());
                if let Some(line) =
                    check_split(slices.classes_per_group(), config, recorded, &source)?
                {
                    log.line(line);
                }
            }
        }
    }
    let opts = EvalOptions {
        batch: job.data.batch,
        workers: job.data.workers,
        transform,
        skip_bad: job.data.skip_bad_images,
        device,
    };
    // A libtorch error while scoring (e.g. out of memory) names the set and the
    // flags that size the batches; main adds the hint.
    let score = |set: &EvalSet, label: &str| {
        crate::runtime::catch_torch(|| score_split(&loaded.model, set, &job.methods, &opts, label))
            .with_context(|| {
                format!(
                    "scoring {} (--batch {}, --crop {})",
                    set.name,
                    opts.batch,
                    opts.transform.size()
                )
            })?
    };
    // The in-distribution set is scored once for every OOD set.
    let mut id_scores = score(&id, "in-dist")?;
    let mut ood_scores = oods
        .iter()
        .map(|o| score(o, &format!("ood {}", o.name)))
        .collect::<Result<Vec<_>>>()?;
    finish_kl(
        &job.methods,
        &mut id_scores,
        &mut ood_scores,
        id_classes as i64,
    )?;
    for s in id_scores
        .skipped
        .iter()
        .chain(ood_scores.iter().flat_map(|o| &o.skipped))
    {
        log.line(format!(
            "skipped unreadable image {}: {}",
            s.path.display(),
            s.reason
        ));
    }
    let mut rows = Vec::new();
    for ((ood, ood_sc), ood_dir) in oods.iter().zip(&ood_scores).zip(&job.data.out_datadir) {
        let skipped = id_scores.skipped.len() + ood_sc.skipped.len();
        // Each row names its own OOD set.
        let mut settings = job.settings.clone();
        settings["out_datadir"] = serde_json::json!(ood_dir);
        for (m, method) in job.methods.iter().enumerate() {
            let metrics = metrics_of(&id_scores, ood_sc, m)
                .with_context(|| format!("metrics of {} on {}", method.name(), ood.name))?;
            rows.push(MethodResult {
                method: method.name().to_string(),
                in_dataset: id.name.clone(),
                out_dataset: ood.name.clone(),
                num_in: id_scores.paths.len(),
                num_out: ood_sc.paths.len(),
                auroc: metrics.auroc,
                aupr_in: metrics.aupr_in,
                aupr_out: metrics.aupr_out,
                fpr95: metrics.fpr95,
                fpr95_ood_positive: metrics.fpr95_ood_positive,
                seconds: id_scores.seconds[m] + ood_sc.seconds[m],
                skipped,
                model: job.model.name.to_string(),
                model_path: job.model_path.display().to_string(),
                settings: settings.clone(),
            });
        }
    }
    let results = dir.join("results.json");
    merge_results(&results, &rows)?;
    print!("{}", table(&rows));
    for r in &rows {
        log.line(format!(
            "{} {} -> {}: AUROC {:.4} AUPR-In {:.4} AUPR-Out {:.4} FPR95 {:.4} FPR95(OOD+) {:.4} ({:.1} s)",
            r.method, r.in_dataset, r.out_dataset, r.auroc, r.aupr_in, r.aupr_out, r.fpr95, r.fpr95_ood_positive, r.seconds
        ));
    }
    let names: Vec<&str> = job.methods.iter().map(Method::name).collect();
    for (o, (ood, ood_sc)) in oods.iter().zip(&ood_scores).enumerate() {
        if let Some(csv) = &job.output.save_scores {
            let csv = csv_path(csv, oods.len(), &ood.name);
            let sets = [
                ScoreColumns {
                    split: "in",
                    paths: &id_scores.paths,
                    scores: &id_scores.scores,
                },
                ScoreColumns {
                    split: "out",
                    paths: &ood_sc.paths,
                    scores: &ood_sc.scores,
                },
            ];
            write_scores_csv(&csv, &names, &sets)?;
            log.line(format!("scores written to {}", csv.display()));
        }
        if job.output.plot {
            for (m, name) in names.iter().enumerate() {
                let stem = format!("{name}_{}_vs_{}", id.name, ood.name);
                let (a, b) = (&id_scores.scores[m], &ood_sc.scores[m]);
                crate::plot::histogram(
                    &dir.join(format!("{stem}_hist.svg")),
                    &format!("{name}: {} vs {}", id.name, ood.name),
                    a,
                    b,
                )?;
                let row = &rows[o * names.len() + m];
                crate::plot::roc(
                    &dir.join(format!("{stem}_roc.svg")),
                    &format!("{name} ROC, AUROC {:.2}%", 100.0 * row.auroc),
                    a,
                    b,
                )?;
            }
        }
    }
    if job.output.plot {
        log.line(format!("plots written to {}", dir.display()));
    }
    log.line(format!(
        "results in {} ({:.1} s in all)",
        results.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
