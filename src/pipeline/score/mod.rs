//! Stage 3 of the pipeline: the network's outputs -> OOD scores (docs/scores.md).
//!
//! [`Method`] is a scoring method with its settings. [`from_outputs`] scores one
//! batch of outputs with a method that needs only the outputs (MOS, MSP, Energy,
//! ODIN with epsilon 0, Mahalanobis with magnitude 0); KL matching needs the whole
//! in-distribution set first ([`kl_probs`], [`kl_scores`]). The test commands call
//! these on each batch of their forward pass (`pipeline::in_memory`); `mos score` calls
//! them on the same rows read back from a store ([`score_rows`], [`score_store`]).
//!
//! Next to them, what the scores are fitted with and the scores that need images:
//! - [`posthoc_fit`]: the later post-hoc methods ([`crate::ood::posthoc`]) with their
//!   settings, the head and the training statistics fitted on a store (`--fit`);
//! - [`mahalanobis_params`]: the tuned Mahalanobis parameter file;
//! - [`image_pass`]: ODIN with epsilon > 0 and Mahalanobis with noise, which perturb
//!   the images and so run on an extraction's batches.
use std::ops::Range;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::ood::{self, GroupSlices};
use crate::pipeline::store::StoreData;
use crate::pipeline::vocab::{canonical_name, to_f64_vec, Layers, PostHoc};

pub mod image_pass;
pub mod mahalanobis_params;
pub mod posthoc_fit;

pub use mahalanobis_params::MahalanobisParams;

/// A scoring method with its settings.
#[derive(Debug, Clone)]
pub enum Method {
    /// MOS: `-min_g p_g(others)` of a group-softmax head.
    Mos(GroupSlices),
    Msp,
    Odin {
        temperature: f64,
        epsilon: f64,
    },
    Energy {
        temperature: f64,
    },
    KlDiv,
    /// Tuned parameters of `tune-mahalanobis`.
    Mahalanobis(std::rc::Rc<MahalanobisParams>),
    /// A post-hoc method of later papers, scored from stored features by
    /// [`posthoc_fit::Prepared::score_rows`] (not by [`from_outputs`]).
    PostHoc(PostHoc),
}

impl Method {
    /// The name used in results (`MOS`, `MSP`, `ODIN`, `Energy`, `KL_Div`, `Mahalanobis`).
    pub fn name(&self) -> &'static str {
        match self {
            Method::Mos(_) => "MOS",
            Method::Msp => "MSP",
            Method::Odin { .. } => "ODIN",
            Method::Energy { .. } => "Energy",
            Method::KlDiv => "KL_Div",
            Method::Mahalanobis(_) => "Mahalanobis",
            Method::PostHoc(p) => p.name(),
        }
    }

    /// Whether the method scores the group-softmax model (MOS) rather than the
    /// flat one (every other method).
    pub fn needs_group_model(&self) -> bool {
        matches!(self, Method::Mos(_))
    }

    /// Whether the method is a function of the shared forward pass's logits.
    pub fn uses_shared_logits(&self) -> bool {
        match self {
            Method::Odin { epsilon, .. } => *epsilon == 0.0,
            Method::Mahalanobis(_) | Method::PostHoc(_) => false,
            _ => true,
        }
    }

    /// Why the method cannot be computed from stored outputs, if it cannot: it
    /// perturbs the input, so it needs the images and the model.
    pub fn needs_images(&self) -> Option<String> {
        match self {
            Method::Odin { epsilon, .. } if *epsilon != 0.0 => Some(format!(
                "ODIN with --epsilon-odin {epsilon} perturbs the input images, so it needs the images and the model: run mos test-baseline --score ODIN (a store gives ODIN only with --epsilon-odin 0)"
            )),
            Method::Mahalanobis(p) if p.magnitude != 0.0 => Some(format!(
                "these Mahalanobis parameters have noise magnitude {}, which perturbs the input images, so they need the images and the model: run mos test-baseline --score Mahalanobis (a store gives Mahalanobis only with magnitude 0, e.g. tune-mahalanobis --magnitudes 0)",
                p.magnitude
            )),
            _ => None,
        }
    }
}

/// The settings methods are built with from their names ([`methods_from_names`]).
#[derive(Debug, Clone)]
pub struct MethodSettings {
    pub temperature_odin: f64,
    pub epsilon_odin: f64,
    pub temperature_energy: f64,
    /// Classes per group (.npy or .json), for MOS.
    pub group_config: Option<std::path::PathBuf>,
    /// Tuned Mahalanobis parameters (tune-mahalanobis).
    pub mahalanobis_param_path: Option<std::path::PathBuf>,
    /// The architecture the Mahalanobis parameters must fit, when known.
    pub model: Option<crate::model::Variant>,
}

/// The methods named by `--score` (case-insensitive), with their settings read
/// and checked; Mahalanobis' parameters land on `device`. Every command that
/// scores by name (`mos score`, `mos benchmark`) builds its methods here.
pub fn methods_from_names(
    names: &[String],
    s: &MethodSettings,
    device: Device,
) -> Result<Vec<Method>> {
    for (flag, t) in [
        ("--temperature-odin", s.temperature_odin),
        ("--temperature-energy", s.temperature_energy),
    ] {
        if !(t > 0.0 && t.is_finite()) {
            bail!("{flag} {t}: must be a positive number");
        }
    }
    if s.epsilon_odin < 0.0 || !s.epsilon_odin.is_finite() {
        bail!(
            "--epsilon-odin {}: must be a non-negative number",
            s.epsilon_odin
        );
    }
    let mut out: Vec<Method> = Vec::new();
    for name in names {
        // Every name is checked (and spelled) as results name it.
        canonical_name(name).context("--score")?;
        let method = if let Some(p) = PostHoc::parse(name) {
            Method::PostHoc(p)
        } else if name.trim().eq_ignore_ascii_case("mos") {
            let Some(path) = &s.group_config else {
                bail!("--score MOS needs --group-config (the classes per group of the model)");
            };
            let cfg = crate::groupconfig::read_group_config(path).context("--group-config")?;
            Method::Mos(
                GroupSlices::new(&cfg.classes_per_group)
                    .with_context(|| format!("--group-config {}", path.display()))?,
            )
        } else {
            let score: ood::Score = name.trim().parse().map_err(anyhow::Error::msg)?;
            match score {
                ood::Score::Msp => Method::Msp,
                ood::Score::Odin => Method::Odin {
                    temperature: s.temperature_odin,
                    epsilon: s.epsilon_odin,
                },
                ood::Score::Energy => Method::Energy {
                    temperature: s.temperature_energy,
                },
                ood::Score::KlDiv => Method::KlDiv,
                ood::Score::Mahalanobis => {
                    let Some(path) = &s.mahalanobis_param_path else {
                        bail!("--score Mahalanobis needs --mahalanobis-param-path (the output of tune-mahalanobis)");
                    };
                    Method::Mahalanobis(std::rc::Rc::new(mahalanobis_params::read_params_for(
                        path, device, s.model,
                    )?))
                }
            }
        };
        if out.iter().any(|m| m.name() == method.name()) {
            bail!("--score lists {} twice", method.name());
        }
        out.push(method);
    }
    Ok(out)
}

/// The post-hoc methods among `methods`, in order.
pub fn posthoc_methods(methods: &[Method]) -> Vec<PostHoc> {
    methods
        .iter()
        .filter_map(|m| match m {
            Method::PostHoc(p) => Some(*p),
            _ => None,
        })
        .collect()
}

/// The outputs a store must keep for `methods` besides the logits.
pub fn store_layers(methods: &[Method]) -> Layers {
    let mut l = Layers::LOGITS;
    l.mahalanobis = methods.iter().any(|m| matches!(m, Method::Mahalanobis(_)));
    l.features = methods
        .iter()
        .any(|m| matches!(m, Method::PostHoc(p) if p.needs_features()));
    l.rankfeat = methods
        .iter()
        .any(|m| matches!(m, Method::PostHoc(PostHoc::RankFeat)));
    l
}

/// The scores of one batch from its outputs: `logits` [N, head] and, for
/// Mahalanobis, `layers` (the five spatial-mean feature layers [N, C_l]). [N],
/// float32 or float64. KL matching is scored by [`kl_scores`]; ODIN with epsilon > 0
/// and Mahalanobis with a magnitude > 0 need the images ([`Method::needs_images`]).
pub fn from_outputs(method: &Method, logits: &Tensor, layers: &[Tensor]) -> Result<Tensor> {
    if let Some(why) = method.needs_images() {
        bail!(why);
    }
    Ok(match method {
        Method::Mos(groups) => groups.mos_score(logits)?,
        Method::Msp => ood::msp(logits)?,
        Method::Energy { temperature } => ood::energy(logits, *temperature)?,
        // With epsilon 0 the input is unchanged: the logits are ODIN's.
        Method::Odin { temperature, .. } => ood::msp(&(logits / *temperature))?,
        Method::Mahalanobis(p) => {
            if layers.len() != p.layers.len() {
                bail!(
                    "Mahalanobis needs the {} feature layers (extract with --layers mahalanobis)",
                    p.layers.len()
                );
            }
            let m = crate::ood::mahalanobis::regressor_features(layers, &p.layers)?;
            // Rounded through float32 as the original feeds the regression.
            let m = m.to_kind(Kind::Float).to_kind(Kind::Double);
            crate::ood::mahalanobis::score_from_regression(&m, &p.lr_weight, p.lr_bias)?
        }
        Method::KlDiv => bail!("internal: KL matching is scored by kl_scores"),
        Method::PostHoc(p) => bail!(
            "internal: {} is scored from stored features by pipeline::score::posthoc_fit",
            p.name()
        ),
    })
}

/// The softmax probabilities KL matching keeps of a batch (float32, CPU).
pub fn kl_probs(logits: &Tensor) -> Tensor {
    logits.softmax(1, Kind::Float).to_device(Device::Cpu)
}

/// KL-matching scores (docs/scores.md#kl-matching) of `sets` (probabilities [n, C]
/// of [`kl_probs`]) against the templates of the in-distribution probabilities
/// `id_probs` by their labels.
pub fn kl_scores(
    id_probs: &Tensor,
    id_labels: &[i64],
    num_classes: i64,
    sets: &[&Tensor],
) -> Result<Vec<Vec<f64>>> {
    let labels = Tensor::from_slice(id_labels);
    let templates = ood::kl_templates(id_probs, &labels, num_classes)?;
    let mut out = Vec::with_capacity(sets.len());
    for probs in sets {
        let mut scores = Vec::with_capacity(probs.size()[0] as usize);
        for chunk in probs.split(4096, 0) {
            scores.extend(to_f64_vec(&ood::kl_score(&chunk, &templates)?)?);
        }
        out.push(scores);
    }
    Ok(out)
}

/// Scores of stored rows: per method, per row; seconds per method; and, when KL
/// matching is among the methods, the rows' probabilities for [`kl_scores`].
pub struct RowScores {
    pub scores: Vec<Vec<f64>>,
    pub seconds: Vec<f64>,
    pub probs: Option<Tensor>,
}

/// Scores the rows of a store batch by batch (`batches`: the row ranges of the
/// test commands' batches), as the test commands score each forward pass.
pub fn score_rows(
    methods: &[Method],
    logits: &Tensor,
    layers: &[Tensor],
    batches: &[Range<usize>],
) -> Result<RowScores> {
    let n = logits.size()[0] as usize;
    let mut out = RowScores {
        scores: vec![Vec::with_capacity(n); methods.len()],
        seconds: vec![0.0; methods.len()],
        probs: None,
    };
    let mut probs = Vec::new();
    for r in batches {
        let (start, len) = (r.start as i64, r.len() as i64);
        let l = logits.narrow(0, start, len);
        let f: Vec<Tensor> = layers.iter().map(|t| t.narrow(0, start, len)).collect();
        for (m, method) in methods.iter().enumerate() {
            let t0 = Instant::now();
            if let Method::PostHoc(_) = method {
                // Scored from the features by posthoc_fit.
                continue;
            } else if let Method::KlDiv = method {
                probs.push(kl_probs(&l));
            } else {
                let s = from_outputs(method, &l, &f)
                    .with_context(|| format!("scoring {}", method.name()))?;
                out.scores[m].extend(to_f64_vec(&s)?);
            }
            out.seconds[m] += t0.elapsed().as_secs_f64();
        }
    }
    if methods.iter().any(|m| matches!(m, Method::KlDiv)) {
        out.probs = Some(if probs.is_empty() {
            Tensor::zeros([0, logits.size()[1]], (Kind::Float, Device::Cpu))
        } else {
            Tensor::cat(&probs, 0)
        });
    }
    Ok(out)
}

/// Scores every row of the store `s` with `methods`: [`score_rows`], then the
/// post-hoc methods with `posthoc` (prepared by [`posthoc_fit::prepare`]),
/// each timed. `mos score` and `mos benchmark` score their stores here.
pub fn score_store(
    s: &StoreData,
    methods: &[Method],
    posthoc: Option<&posthoc_fit::Prepared>,
) -> Result<RowScores> {
    let mut out = score_rows(methods, &s.logits, &s.layers, &s.batches())
        .with_context(|| format!("store {}", s.dir.display()))?;
    for (m, method) in methods.iter().enumerate() {
        if let Method::PostHoc(p) = method {
            let prepared = posthoc.context("internal: the post-hoc methods were not prepared")?;
            let t0 = Instant::now();
            // RankFeat scores its own logits, the stored fused ones.
            let logits = match p {
                PostHoc::RankFeat => s.rankfeat_layer()?,
                _ => &s.logits,
            };
            out.scores[m] = prepared
                .score_rows(*p, logits, s.features.as_ref())
                .with_context(|| format!("store {}", s.dir.display()))?;
            out.seconds[m] += t0.elapsed().as_secs_f64();
        }
    }
    Ok(out)
}
