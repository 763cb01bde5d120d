//! Step 5 of `mos benchmark`, score: the methods a model's stores serve, scored
//! from the stores ([`crate::pipeline::score::score_store`]; the post-hoc methods
//! with [`crate::pipeline::score::posthoc_fit`], KL matching once every set is
//! scored), and the image-pass methods' scores taken from steps 3 and 4; then the
//! metrics of every method on every OOD set as `results.json` rows ([`rows`]).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::passes::{SetScores, Stages};
use super::plan::{Checked, ModelStores, Plan, RoleModel};
use super::BenchmarkRequest;
use crate::metrics::ood_metrics;
use crate::pipeline::report::MethodResult;
use crate::pipeline::score::posthoc_fit as posthoc;
use crate::pipeline::score::{kl_scores, score_store, Method};
use crate::pipeline::store::StoreData;
use crate::runlog::RunLog;

/// Scores of one method: the ID set and each OOD set, with seconds and counts.
pub(super) struct MethodScores {
    id: Vec<f64>,
    id_seconds: f64,
    oods: Vec<Vec<f64>>,
    ood_seconds: Vec<f64>,
    skipped_id: usize,
    skipped_ood: Vec<usize>,
    image_pass: bool,
}

impl MethodScores {
    /// Method `k`'s scores, taken out of the sets' scores.
    fn take(k: usize, id: &mut SetScores, oods: &mut [SetScores], image_pass: bool) -> Self {
        MethodScores {
            id: std::mem::take(&mut id.scores[k]),
            id_seconds: id.seconds[k],
            oods: oods
                .iter_mut()
                .map(|s| std::mem::take(&mut s.scores[k]))
                .collect(),
            ood_seconds: oods.iter().map(|s| s.seconds[k]).collect(),
            skipped_id: id.skipped,
            skipped_ood: oods.iter().map(|s| s.skipped).collect(),
            image_pass,
        }
    }
}

/// Every method's scores as the steps produce them.
pub(super) struct Scores {
    /// Per method of the run.
    pub methods: Vec<Option<MethodScores>>,
    /// Per method: the stores it was scored from (None: an image pass).
    pub store_dirs: Vec<Option<PathBuf>>,
    /// The post-hoc methods' settings as results record them.
    pub posthoc_settings: Option<serde_json::Value>,
}

impl Scores {
    pub fn new(n: usize) -> Self {
        Scores {
            methods: (0..n).map(|_| None).collect(),
            store_dirs: vec![None; n],
            posthoc_settings: None,
        }
    }

    /// The image-pass methods' scores of `plan` from its passes' `pass_sc` (ID first).
    pub fn take_passes(&mut self, plan: &ModelStores, pass_sc: &mut [SetScores]) -> Result<()> {
        let (id_sc, ood_sc) = pass_sc
            .split_first_mut()
            .context("internal: no image pass")?;
        for (k, &i) in plan.pass_methods.iter().enumerate() {
            self.methods[i] = Some(MethodScores::take(k, id_sc, ood_sc, true));
        }
        Ok(())
    }
}

/// Step 5, score: the store methods of `m` from its `stores` (ID first).
pub(super) fn score(
    plan: &Plan,
    m: &RoleModel,
    ms_plan: &ModelStores,
    stores: &[StoreData],
    log: &RunLog,
    stages: &mut Stages,
    out: &mut Scores,
) -> Result<()> {
    let ms = &ms_plan.store_ms;
    let id_classes = plan.id_classes;
    let (id_store, ood_stores) = (&stores[0], &stores[1..]);
    let t0 = Instant::now();
    let prepared = match (&plan.posthoc_req, m.role == "flat") {
        (Some(r), true) => Some(posthoc::prepare(r, id_store, log)?),
        _ => None,
    };
    let rows = |s: &StoreData| score_store(s, ms, prepared.as_ref());
    let mut id_sc = rows(id_store)?;
    let mut ood_sc = ood_stores.iter().map(rows).collect::<Result<Vec<_>>>()?;
    if let Some(k) = ms.iter().position(|m| matches!(m, Method::KlDiv)) {
        let t = Instant::now();
        let id_probs = id_sc.probs.take().context("KL probabilities")?;
        let mut sets = vec![&id_probs];
        sets.extend(ood_sc.iter().filter_map(|s| s.probs.as_ref()));
        let mut kl = kl_scores(&id_probs, &id_store.labels, id_classes as i64, &sets)?.into_iter();
        id_sc.scores[k] = kl.next().context("KL scores")?;
        for s in &mut ood_sc {
            s.scores[k] = kl.next().context("KL scores")?;
        }
        id_sc.seconds[k] += t.elapsed().as_secs_f64();
    }
    stages.push((
        format!("score {} from the {} model's stores", ms.len(), m.role),
        t0.elapsed().as_secs_f64(),
    ));
    if let Some(p) = prepared {
        out.posthoc_settings = Some(p.settings);
    }
    let mut id_sc = SetScores::of_store(id_sc, id_store);
    let mut ood_sc: Vec<SetScores> = ood_sc
        .into_iter()
        .zip(ood_stores)
        .map(|(r, s)| SetScores::of_store(r, s))
        .collect();
    for (k, &i) in ms_plan.store_methods.iter().enumerate() {
        out.store_dirs[i] = Some(ms_plan.base.clone());
        out.methods[i] = Some(MethodScores::take(k, &mut id_sc, &mut ood_sc, false));
    }
    Ok(())
}

/// The metrics of every method on every OOD set, as `results.json` rows (by set,
/// then by method, in `--score`'s order).
pub(super) fn rows(
    req: &BenchmarkRequest,
    plan: &Plan,
    checked: &Checked,
    scores: &Scores,
) -> Result<Vec<MethodResult>> {
    let mut rows = Vec::new();
    for (o, ood) in plan.oods.iter().enumerate() {
        for (i, method) in plan.methods.iter().enumerate() {
            let sc = scores.methods[i]
                .as_ref()
                .context("internal: a method was not scored")?;
            let metrics = ood_metrics(&sc.id, &sc.oods[o])
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("metrics of {} on {}", method.name(), ood.name))?;
            let model = checked
                .models
                .iter()
                .find(|m| m.methods.contains(&i))
                .context("internal: no model")?;
            let row_settings = serde_json::json!({
                "benchmark": true,
                "score": plan.names,
                "temperature_odin": plan.settings.temperature_odin,
                "epsilon_odin": plan.settings.epsilon_odin,
                "temperature_energy": plan.settings.temperature_energy,
                "group_config": plan.settings.group_config,
                "mahalanobis_param_path": plan.settings.mahalanobis_param_path,
                "in_datadir": plan.id.folder.root,
                "out_datadir": ood.folder.root,
                "batch": req.batch,
                "crop": req.crop,
                "skip_bad_images": req.skip_bad_images,
                "device": crate::runtime::device_name(req.device),
                "checkpoint_sha256": model.sha256,
                "from": if sc.image_pass { "images".to_string() } else {
                    format!("stores {}", scores.store_dirs[i].as_deref().unwrap_or(Path::new("")).display())
                },
            });
            let mut row_settings = row_settings;
            if let (Method::PostHoc(_), Some(p)) = (method, &scores.posthoc_settings) {
                row_settings["posthoc"] = p.clone();
            }
            rows.push(MethodResult {
                method: method.name().to_string(),
                in_dataset: plan.id.name.clone(),
                out_dataset: ood.name.clone(),
                num_in: sc.id.len(),
                num_out: sc.oods[o].len(),
                auroc: metrics.auroc,
                aupr_in: metrics.aupr_in,
                aupr_out: metrics.aupr_out,
                fpr95: metrics.fpr95,
                fpr95_ood_positive: metrics.fpr95_ood_positive,
                seconds: sc.id_seconds + sc.ood_seconds[o],
                skipped: sc.skipped_id + sc.skipped_ood[o],
                model: req.model.name.to_string(),
                model_path: model.path.display().to_string(),
                settings: row_settings,
            });
        }
    }
    Ok(rows)
}
