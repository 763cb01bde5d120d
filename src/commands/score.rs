//! `mos score`: OOD scores, metrics, results.json, the table, score CSVs and
//! plots from feature stores alone (docs/cluster.md): no image, no model. The
//! in-distribution set is scored once for all out-of-distribution stores.
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cli::ScoreArgs;
use crate::groupconfig::check_split;
use crate::metrics::ood_metrics;
use crate::pipeline::benchmark::published;
use crate::pipeline::report::{
    csv_path, merge_results, paper_table, table, write_scores_csv, MethodResult, ReportFormat,
    ScoreColumns,
};
use crate::pipeline::score::posthoc_fit as posthoc;
use crate::pipeline::score::{
    kl_scores, methods_from_names, posthoc_methods, score_store, Method, MethodSettings,
};
use crate::pipeline::store::{self, StoreData, MANIFEST};
use crate::pipeline::vocab::PostHoc;
use crate::runlog::RunLog;

/// The methods of `--score`, with their settings: those a store can serve.
fn methods(args: &ScoreArgs) -> Result<Vec<Method>> {
    let settings = MethodSettings {
        temperature_odin: args.baseline.temperature_odin(),
        epsilon_odin: args.baseline.epsilon_odin(),
        temperature_energy: args.baseline.temperature_energy(),
        group_config: args.group_config.clone(),
        mahalanobis_param_path: args.baseline.mahalanobis_param_path.clone(),
        model: None,
    };
    let out = methods_from_names(&args.score, &settings, tch::Device::Cpu)?;
    for method in &out {
        if let Some(why) = method.needs_images() {
            bail!("--score {}: {why}", method.name());
        }
    }
    Ok(out)
}

/// The post-hoc request of the flags (validated before any store is read).
fn posthoc_request(args: &ScoreArgs, methods: &[Method]) -> Result<Option<posthoc::Request>> {
    let list = posthoc_methods(methods);
    if list.is_empty() {
        return Ok(None);
    }
    let a = &args.posthoc;
    let settings = a.settings()?;
    Ok(Some(posthoc::Request {
        methods: list,
        settings,
        fit: a.fit.clone(),
        model_path: args.model_path.clone(),
        run_dir: args.run.logdir.join(&args.run.name),
        device: args.device.resolve()?,
    }))
}

/// Why a store whose head size differs from its data's classes cannot be scored
/// by `method`, which needs one logit per class: what is wrong, and what to do.
fn class_mismatch(s: &StoreData, method: &str) -> String {
    let m = &s.manifest;
    let manifest = s.dir.join(MANIFEST);
    let data = match &m.list {
        Some(list) => format!("--datadir {} --list {list}", m.datadir),
        None => format!("--datadir {}", m.datadir),
    };
    let classes = |n: i64| format!("{n} class{}", if n == 1 { "" } else { "es" });
    if m.head_size > m.num_classes {
        format!(
            "{}: the model's head has {} logits, but the store's data ({data}) has only {}; {method} needs a flat-softmax model's store with one logit per class of its data. Either the data covers fewer classes than the model's head (extract the in-distribution set with every class the model was trained on), or this is a group-softmax model's store (score it with --score MOS and its --group-config)",
            manifest.display(),
            m.head_size,
            classes(m.num_classes)
        )
    } else {
        format!(
            "{}: the model's head has {} logits, but the store's data ({data}) has {}: more classes than the model predicts; {method} needs one logit per class of the data (extract with the model trained on these classes, or with the data it was trained on)",
            manifest.display(),
            m.head_size,
            classes(m.num_classes)
        )
    }
}

/// Checks that the in-distribution store fits the methods: its classes and head
/// size for the kind of model, and its layers ([`check_layers`]).
fn check_store(s: &StoreData, methods: &[Method], group_config: Option<&Path>) -> Result<()> {
    let m = &s.manifest;
    let manifest = s.dir.join(MANIFEST);
    for method in methods {
        match method {
            Method::Mos(slices) => {
                if slices.num_classes() != m.num_classes {
                    bail!(
                        "{}: the store's data has {} classes, but the group config {} covers {}",
                        manifest.display(),
                        m.num_classes,
                        group_config.map_or(String::new(), |p| p.display().to_string()),
                        slices.num_classes()
                    );
                }
                if slices.total_logits() != m.head_size {
                    bail!(
                        "{}: the model's head has {} logits, but MOS with this group config needs {} ({} classes + {} groups)",
                        manifest.display(),
                        m.head_size,
                        slices.total_logits(),
                        slices.num_classes(),
                        slices.num_groups()
                    );
                }
            }
            _ => {
                if m.head_size != m.num_classes {
                    bail!(class_mismatch(s, method.name()));
                }
            }
        }
    }
    check_layers(s, methods)
}

/// Checks that a store (in- or out-of-distribution) holds the layers the methods
/// read: Mahalanobis' feature layers, RankFeat's fused logits.
fn check_layers(s: &StoreData, methods: &[Method]) -> Result<()> {
    if methods.iter().any(|m| matches!(m, Method::Mahalanobis(_))) && s.layers.is_empty() {
        bail!(
            "{}: no Mahalanobis feature layers; extract with --layers mahalanobis",
            s.dir.join(MANIFEST).display()
        );
    }
    if methods
        .iter()
        .any(|m| matches!(m, Method::PostHoc(PostHoc::RankFeat)))
    {
        s.rankfeat_layer()?;
    }
    Ok(())
}

pub fn run(args: &ScoreArgs) -> Result<()> {
    let methods = methods(args)?;
    let request = posthoc_request(args, &methods)?;
    let dir = args.run.logdir.join(&args.run.name);
    let log = RunLog::open(&dir, "score.log")?;
    let started = Instant::now();
    let names: Vec<&str> = methods.iter().map(Method::name).collect();
    let id = store::load(&args.id).with_context(|| format!("--id {}", args.id.display()))?;
    check_store(&id, &methods, args.group_config.as_deref())?;
    for method in &methods {
        if let (Method::Mos(slices), Some(path)) = (method, &args.group_config) {
            let source = format!("the store {} (its checkpoint)", args.id.display());
            if let Some(line) = check_split(
                slices.classes_per_group(),
                path,
                id.manifest.group_config.as_deref(),
                &source,
            )? {
                log.line(line);
            }
        }
    }
    let mut oods = Vec::new();
    for path in &args.ood {
        let s = store::load(path).with_context(|| format!("--ood {}", path.display()))?;
        check_layers(&s, methods.as_slice())?;
        if let Some(r) = &request {
            if s.features.is_none() && r.methods.iter().any(|p| p.needs_features()) {
                bail!(
                    "{}: no pre-logit features, which the post-hoc methods need; extract with --layers logits,features",
                    path.join(MANIFEST).display()
                );
            }
        }
        if let Some((what, x, y)) = id.manifest.model_difference(&s.manifest) {
            bail!(
                "{} and {}: extracted with another {what} ({x} vs {y}); ID and OOD stores must come from the same model and settings",
                args.id.join(MANIFEST).display(),
                path.join(MANIFEST).display()
            );
        }
        oods.push(s);
    }
    let published = match &args.published {
        Some(path) => {
            let p = published::read_published(path)?;
            if let Some(setup) = &p.setup {
                if let Some(line) = published::check_store_setup(setup, path, &id.manifest)? {
                    eprintln!("{line}");
                    log.line(line);
                }
            }
            let sets: Vec<&str> = oods.iter().map(|s| s.manifest.dataset.as_str()).collect();
            published::check_coverage(&p, path, &names, &sets)?;
            Some(p)
        }
        None => None,
    };
    let prepared = match &request {
        Some(r) => Some(posthoc::prepare(r, &id, &log)?),
        None => None,
    };
    let mut settings = serde_json::json!({
        "id_store": args.id,
        "score": names,
        "temperature_odin": args.baseline.temperature_odin(),
        "epsilon_odin": args.baseline.epsilon_odin(),
        "temperature_energy": args.baseline.temperature_energy(),
        "group_config": args.group_config,
        "mahalanobis_param_path": args.baseline.mahalanobis_param_path,
        "batch": id.manifest.batch,
        "crop": id.manifest.crop,
        "precision": id.manifest.precision,
        "skip_bad_images": id.manifest.skip_bad_images,
        "checkpoint_sha256": id.manifest.checkpoint_sha256,
    });
    if let Some(p) = &prepared {
        settings["posthoc"] = p.settings.clone();
    }
    log.line(format!("mos score {}", serde_json::to_string(&settings)?));
    log.line(format!(
        "in-distribution {} ({}): {} images, {} classes; out-of-distribution: {}",
        id.manifest.dataset,
        args.id.display(),
        id.paths.len(),
        id.manifest.num_classes,
        oods.iter()
            .map(|s| format!("{} ({} images)", s.manifest.dataset, s.paths.len()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut id_scores = score_store(&id, &methods, prepared.as_ref())?;
    let mut ood_scores = oods
        .iter()
        .map(|s| score_store(s, &methods, prepared.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    if let Some(m) = methods.iter().position(|m| matches!(m, Method::KlDiv)) {
        let t0 = Instant::now();
        let id_probs = id_scores.probs.take().context("KL probabilities")?;
        let mut sets = vec![&id_probs];
        sets.extend(ood_scores.iter().filter_map(|s| s.probs.as_ref()));
        let mut kl = kl_scores(&id_probs, &id.labels, id.manifest.num_classes, &sets)
            .with_context(|| format!("KL matching with the templates of {}", args.id.display()))?
            .into_iter();
        id_scores.scores[m] = kl.next().context("KL scores")?;
        for s in &mut ood_scores {
            s.scores[m] = kl.next().context("KL scores")?;
        }
        let secs = t0.elapsed().as_secs_f64();
        id_scores.seconds[m] += secs;
    }
    let mut rows = Vec::new();
    for (s, sc) in oods.iter().zip(&ood_scores) {
        let skipped = id.skipped.len() + s.skipped.len();
        for (m, method) in methods.iter().enumerate() {
            let metrics = ood_metrics(&id_scores.scores[m], &sc.scores[m])
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| {
                    format!("metrics of {} on {}", method.name(), s.manifest.dataset)
                })?;
            let mut settings = settings.clone();
            settings["ood_store"] = serde_json::json!(s.dir);
            rows.push(MethodResult {
                method: method.name().to_string(),
                in_dataset: id.manifest.dataset.clone(),
                out_dataset: s.manifest.dataset.clone(),
                num_in: id.paths.len(),
                num_out: s.paths.len(),
                auroc: metrics.auroc,
                aupr_in: metrics.aupr_in,
                aupr_out: metrics.aupr_out,
                fpr95: metrics.fpr95,
                fpr95_ood_positive: metrics.fpr95_ood_positive,
                seconds: id_scores.seconds[m] + sc.seconds[m],
                skipped,
                model: id.manifest.model.clone(),
                model_path: id.manifest.checkpoint.clone(),
                settings,
            });
        }
    }
    let results = dir.join("results.json");
    merge_results(&results, &rows)?;
    print!("{}", table(&rows));
    for r in &rows {
        log.line(format!(
            "{} {} -> {}: AUROC {:.4} AUPR-In {:.4} AUPR-Out {:.4} FPR95 {:.4} FPR95(OOD+) {:.4} ({:.3} s)",
            r.method, r.in_dataset, r.out_dataset, r.auroc, r.aupr_in, r.aupr_out, r.fpr95, r.fpr95_ood_positive, r.seconds
        ));
    }
    let id_paths = id.full_paths();
    for (o, (s, sc)) in oods.iter().zip(&ood_scores).enumerate() {
        if let Some(csv) = &args.output.save_scores {
            let csv = csv_path(csv, oods.len(), &s.manifest.dataset);
            let ood_paths = s.full_paths();
            let sets = [
                ScoreColumns {
                    split: "in",
                    paths: &id_paths,
                    scores: &id_scores.scores,
                },
                ScoreColumns {
                    split: "out",
                    paths: &ood_paths,
                    scores: &sc.scores,
                },
            ];
            write_scores_csv(&csv, &names, &sets)?;
            log.line(format!("scores written to {}", csv.display()));
        }
        if args.output.plot {
            for (m, name) in names.iter().enumerate() {
                let (a, b) = (&id_scores.scores[m], &sc.scores[m]);
                let (idn, oodn) = (&id.manifest.dataset, &s.manifest.dataset);
                let stem = format!("{name}_{idn}_vs_{oodn}");
                crate::plot::histogram(
                    &dir.join(format!("{stem}_hist.svg")),
                    &format!("{name}: {idn} vs {oodn}"),
                    a,
                    b,
                )?;
                let row = &rows[o * methods.len() + m];
                crate::plot::roc(
                    &dir.join(format!("{stem}_roc.svg")),
                    &format!("{name} ROC, AUROC {:.2}%", 100.0 * row.auroc),
                    a,
                    b,
                )?;
            }
        }
    }
    if args.output.plot {
        log.line(format!("plots written to {}", dir.display()));
    }
    log.line(format!(
        "results in {} ({:.2} s in all)",
        results.display(),
        started.elapsed().as_secs_f64()
    ));
    if let (Some(p), Some(path)) = (&published, &args.published) {
        let c = published::compare(p, &rows);
        let report = dir.join("report.md");
        let text = format!(
            "# Scores: {}\n\nIn-distribution store {}; model {}.\n\n## AUROC / FPR95 (%), FPR95 at 95% ID recall\n\n{}{}",
            dir.display(),
            args.id.display(),
            id.manifest.model,
            paper_table(&rows, ReportFormat::Markdown),
            published::published_section(p, &c, &rows)
        );
        crate::model::checkpoint::write_atomic(&report, text.as_bytes())?;
        let within = c.iter().filter(|c| c.within).count();
        log.line(format!(
            "--published {}: {within} of {} cells within their tolerance ({})",
            path.display(),
            c.len(),
            report.display()
        ));
        published::verdict(&c, &report)?;
    }
    Ok(())
}
