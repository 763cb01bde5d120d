//! The pipeline's shared vocabulary, below every stage: which outputs a store
//! keeps ([`Layers`]), the method names `--score` takes ([`METHOD_NAMES`],
//! [`PostHoc`], [`canonical_name`]) and tensors as plain numbers ([`to_f64_vec`]).
//! Every stage may use it; it uses none of them.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// The feature layers of the Mahalanobis detector: root and block1..block4.
pub const FEATURE_LAYERS: usize = 5;

/// Which outputs to keep (`--layers logits,features,mahalanobis`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Layers {
    /// `logits` [N, head].
    pub logits: bool,
    /// `features` [N, 2048 wf]: the pre-logits (the head's input).
    pub features: bool,
    /// `layer0`..`layer4` [N, C_l]: spatial means of root and block1..4.
    pub mahalanobis: bool,
    /// `rankfeat` [N, head]: RankFeat's fused logits (blocks 3 and 4 without their
    /// rank-1 parts).
    pub rankfeat: bool,
    /// RankFeat's rank-1 parts by this many power iterations; 0: exact SVD.
    pub rankfeat_power_iterations: u32,
}

impl Layers {
    /// Logits only (the test commands).
    pub const LOGITS: Layers = Layers {
        logits: true,
        features: false,
        mahalanobis: false,
        rankfeat: false,
        rankfeat_power_iterations: 0,
    };

    /// From `--layers` names (case-insensitive); logits are always kept.
    pub fn parse(names: &[String]) -> Result<Self> {
        let mut l = Layers::LOGITS;
        for n in names {
            match n.trim().to_ascii_lowercase().as_str() {
                "logits" => l.logits = true,
                "features" => l.features = true,
                "mahalanobis" => l.mahalanobis = true,
                "rankfeat" => l.rankfeat = true,
                other => bail!(
                    "--layers: unknown layer '{other}'; expected logits, features, mahalanobis or rankfeat"
                ),
            }
        }
        Ok(l)
    }

    /// The names, in a fixed order (as the manifest records them).
    pub fn names(&self) -> Vec<String> {
        let mut v = vec!["logits".to_string()];
        if self.features {
            v.push("features".into());
        }
        if self.mahalanobis {
            v.push("mahalanobis".into());
        }
        if self.rankfeat {
            v.push("rankfeat".into());
        }
        v
    }
}

/// The method names `--score` accepts (also KL matching's other spellings).
pub const METHOD_NAMES: [&str; 6] = ["MOS", "MSP", "ODIN", "Energy", "KL_Div", "Mahalanobis"];

/// A post-hoc method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PostHoc {
    MaxLogit,
    GradNorm,
    React,
    Knn,
    Vim,
    AshP,
    AshB,
    AshS,
    Dice,
    Scale,
    NnGuide,
    Fdbd,
    Gen,
    Residual,
    Neco,
    Entropy,
    RankFeat,
}

impl PostHoc {
    pub const ALL: [PostHoc; 17] = [
        PostHoc::MaxLogit,
        PostHoc::GradNorm,
        PostHoc::React,
        PostHoc::Knn,
        PostHoc::Vim,
        PostHoc::AshP,
        PostHoc::AshB,
        PostHoc::AshS,
        PostHoc::Dice,
        PostHoc::Scale,
        PostHoc::NnGuide,
        PostHoc::Fdbd,
        PostHoc::Gen,
        PostHoc::Residual,
        PostHoc::Neco,
        PostHoc::Entropy,
        PostHoc::RankFeat,
    ];

    /// The name in results (`MaxLogit`, `GradNorm`, `ReAct`, `KNN`, `ViM`, `ASH-P`,
    /// `ASH-B`, `ASH-S`, `DICE`, `SCALE`, `NNGuide`, `fDBD`, `GEN`, `Residual`, `NECO`,
    /// `Entropy`, `RankFeat`).
    pub fn name(self) -> &'static str {
        match self {
            PostHoc::MaxLogit => "MaxLogit",
            PostHoc::GradNorm => "GradNorm",
            PostHoc::React => "ReAct",
            PostHoc::Knn => "KNN",
            PostHoc::Vim => "ViM",
            PostHoc::AshP => "ASH-P",
            PostHoc::AshB => "ASH-B",
            PostHoc::AshS => "ASH-S",
            PostHoc::Dice => "DICE",
            PostHoc::Scale => "SCALE",
            PostHoc::NnGuide => "NNGuide",
            PostHoc::Fdbd => "fDBD",
            PostHoc::Gen => "GEN",
            PostHoc::Residual => "Residual",
            PostHoc::Neco => "NECO",
            PostHoc::Entropy => "Entropy",
            PostHoc::RankFeat => "RankFeat",
        }
    }

    /// The method named `s` (case-insensitive; `_` for `-`), if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        PostHoc::ALL
            .into_iter()
            .find(|m| m.name().to_ascii_lowercase() == s)
    }

    /// Whether it needs training statistics (`--fit`).
    pub fn needs_fit(self) -> bool {
        matches!(
            self,
            PostHoc::React
                | PostHoc::Knn
                | PostHoc::Vim
                | PostHoc::Dice
                | PostHoc::NnGuide
                | PostHoc::Fdbd
                | PostHoc::Residual
                | PostHoc::Neco
        )
    }

    /// Whether it needs the head's weights (ViM and Residual to fit their origin;
    /// NNGuide when it clips).
    pub fn needs_head(self) -> bool {
        matches!(
            self,
            PostHoc::React
                | PostHoc::AshP
                | PostHoc::AshB
                | PostHoc::AshS
                | PostHoc::Dice
                | PostHoc::Scale
                | PostHoc::Fdbd
                | PostHoc::Residual
        )
    }

    /// Whether it needs the stored pre-logit features.
    pub fn needs_features(self) -> bool {
        !matches!(
            self,
            PostHoc::MaxLogit | PostHoc::Gen | PostHoc::Entropy | PostHoc::RankFeat
        )
    }
}

/// The name results give the method `--score` calls `name` (case-insensitive;
/// `KL` and `kl-div` are `KL_Div`, `ash_s` is `ASH-S`): one of [`METHOD_NAMES`] or
/// of the post-hoc methods ([`PostHoc::ALL`]).
pub fn canonical_name(name: &str) -> Result<&'static str> {
    if let Some(p) = PostHoc::parse(name) {
        return Ok(p.name());
    }
    if name.trim().eq_ignore_ascii_case("mos") {
        return Ok("MOS");
    }
    let score: crate::ood::Score = name.trim().parse().map_err(|e: String| {
        let posthoc: Vec<&str> = PostHoc::ALL.iter().map(|p| p.name()).collect();
        anyhow::anyhow!("{e}, or MOS, {}", posthoc.join(", "))
    })?;
    Ok(score.as_str())
}

/// A tensor's values as f64, on the CPU.
pub fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_parse() {
        let l = Layers::parse(&["Features".into(), "mahalanobis".into()]).unwrap();
        assert!(l.logits && l.features && l.mahalanobis && !l.rankfeat);
        assert_eq!(l.names(), ["logits", "features", "mahalanobis"]);
        let l = Layers::parse(&["rankfeat".into()]).unwrap();
        assert_eq!(l.names(), ["logits", "rankfeat"]);
        assert_eq!(Layers::parse(&[]).unwrap(), Layers::LOGITS);
        let e = Layers::parse(&["pixels".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown layer 'pixels'"), "{e}");
    }
}
