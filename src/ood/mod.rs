//! Out-of-distribution scores as pure, batched tensor functions (docs/scores.md).
//!
//! - [`group`]: the group softmax of MOS: [`GroupSlices`] (the original's
//!   `get_group_slices`), the MOS score (`test_mos.py`), the group loss and the
//!   group accuracy (`finetune.py::calc_group_softmax_acc`).
//! - [`scores`]: the baselines of `test_baselines.py` on a flat model: MSP, ODIN,
//!   Energy and KL matching. Mahalanobis lives with its tuning code.
//!
//! Every score is "higher = more in-distribution" and is computed for a whole batch
//! at once; nothing here loops over samples or depends on the rest of the crate.
use std::fmt;
use std::str::FromStr;

use tch::{Kind, Tensor};

pub mod group;
pub mod leaderboard;
pub mod mahalanobis;
pub mod posthoc;
pub mod scores;

pub use group::GroupSlices;
pub use scores::{energy, kl_score, kl_templates, msp, odin};

/// Why a score could not be computed: bad shapes, values or arguments. Messages
/// name the argument and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum OodError {
    /// A tensor has the wrong rank, size or kind.
    #[error("{0}")]
    Shape(String),
    /// An argument or a tensor value is out of its valid range.
    #[error("{0}")]
    Invalid(String),
    /// A class has no image, so KL matching has no template for it.
    #[error(
        "KL matching: class {class} has no in-distribution image, so it has no mean \
         softmax template (every one of the {num_classes} classes needs at least one)"
    )]
    EmptyClass { class: i64, num_classes: i64 },
    /// libtorch refused an operation.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result of this module's functions.
pub type Result<T> = std::result::Result<T, OodError>;

/// The baseline scores of `test_baselines.py --score` (docs/scores.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Score {
    /// Maximum softmax probability.
    Msp,
    /// ODIN: temperature scaling and input perturbation.
    Odin,
    /// Energy score, `T * logsumexp(logits / T)`.
    Energy,
    /// Mahalanobis distance to class means on five feature layers.
    Mahalanobis,
    /// KL matching against per-class mean softmax templates.
    KlDiv,
}

impl Score {
    /// Every score, in the order of the original's `--score` choices.
    pub const ALL: [Score; 5] = [
        Score::Msp,
        Score::Odin,
        Score::Energy,
        Score::Mahalanobis,
        Score::KlDiv,
    ];

    /// The original's spelling (`MSP`, `ODIN`, `Energy`, `Mahalanobis`, `KL_Div`).
    pub fn as_str(self) -> &'static str {
        match self {
            Score::Msp => "MSP",
            Score::Odin => "ODIN",
            Score::Energy => "Energy",
            Score::Mahalanobis => "Mahalanobis",
            Score::KlDiv => "KL_Div",
        }
    }

    /// Whether the score needs the gradient of a loss with respect to the input,
    /// given its perturbation size `epsilon` (ODIN's `--epsilon-odin`, or the tuned
    /// Mahalanobis noise magnitude). A zero perturbation leaves the input unchanged,
    /// so no graph has to be built.
    pub fn needs_grad(self, epsilon: f64) -> bool {
        matches!(self, Score::Odin | Score::Mahalanobis) && epsilon != 0.0
    }

    /// Whether the score is a function of the model's logits on the unperturbed
    /// input alone (MSP, Energy, KL matching).
    pub fn logits_only(self) -> bool {
        matches!(self, Score::Msp | Score::Energy | Score::KlDiv)
    }

    /// Whether the score needs the intermediate features (Mahalanobis).
    pub fn needs_features(self) -> bool {
        self == Score::Mahalanobis
    }

    /// Whether the in-distribution set must be run first to build per-class
    /// templates from its labels (KL matching).
    pub fn needs_id_templates(self) -> bool {
        self == Score::KlDiv
    }
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Score {
    type Err = String;

    /// Parses the original's spellings case-insensitively; KL matching is also
    /// accepted as `kl`, `kl-div` and `kldiv`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "msp" => Ok(Score::Msp),
            "odin" => Ok(Score::Odin),
            "energy" => Ok(Score::Energy),
            "mahalanobis" => Ok(Score::Mahalanobis),
            "kl_div" | "kl-div" | "kldiv" | "kl" => Ok(Score::KlDiv),
            _ => {
                let names: Vec<&str> = Score::ALL.iter().map(|s| s.as_str()).collect();
                Err(format!(
                    "unknown score '{s}'; expected one of {}",
                    names.join(", ")
                ))
            }
        }
    }
}

/// Checks that `t` is a floating-point matrix [N, C] with C >= 1 and returns (N, C).
pub(crate) fn check_matrix(t: &Tensor, what: &str) -> Result<(i64, i64)> {
    let size = t.size();
    if size.len() != 2 || size[1] < 1 {
        return Err(OodError::Shape(format!(
            "{what}: expected a matrix [N, C] with C >= 1, got shape {size:?}"
        )));
    }
    if !t.is_floating_point() {
        return Err(OodError::Shape(format!(
            "{what}: expected a floating-point tensor, got {:?}",
            t.kind()
        )));
    }
    Ok((size[0], size[1]))
}

/// Whether `t` holds integers (not bool, not floating point).
pub(crate) fn is_integer(t: &Tensor) -> bool {
    matches!(
        t.kind(),
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64
    )
}

/// `t` as float32 unless it is already float32 or float64 (bfloat16 and half
/// logits are scored in float32).
pub(crate) fn to_score_kind(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Float | Kind::Double => t.shallow_clone(),
        _ => t.to_kind(Kind::Float),
    }
}

/// Fixture reading and comparison for the unit tests of this module.
#[cfg(test)]
pub(crate) mod testutil {
    use tch::{Kind, Tensor};

    /// All tensors of `tests/fixtures/ood/<file>`.
    pub fn fixture(file: &str) -> Vec<(String, Tensor)> {
        let path = format!("{}/tests/fixtures/ood/{file}", env!("CARGO_MANIFEST_DIR"));
        Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The tensor named `name` in `tensors`.
    pub fn get(tensors: &[(String, Tensor)], name: &str) -> Tensor {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in the fixture"))
            .1
            .shallow_clone()
    }

    /// float32's unit roundoff 2^-24: the relative error of one rounding.
    pub const U32: f64 = 5.960_464_477_539_063e-8;
    /// float64's unit roundoff 2^-53.
    pub const U64: f64 = 1.110_223_024_625_156_5e-16;

    /// A deterministic generator (SplitMix64) owned by one test: libtorch's
    /// `randn` draws from one global generator that tests in parallel threads share.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed)
        }

        /// Uniform in [0, 1).
        pub fn uniform(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Standard normal (Box-Muller).
        pub fn normal(&mut self) -> f64 {
            let u = 1.0 - self.uniform();
            let v = self.uniform();
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }

        /// Standard normal values of `kind` (Float or Double) on the CPU.
        pub fn normal_tensor(&mut self, shape: &[i64], kind: Kind) -> Tensor {
            let n: i64 = shape.iter().product();
            let v: Vec<f64> = (0..n).map(|_| self.normal()).collect();
            Tensor::from_slice(&v).reshape(shape).to_kind(kind)
        }
    }

    /// `t` as a vector of f64 (row-major).
    pub fn to_vec(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("a float tensor")
    }

    /// Checks `errors[i] <= tols[i]` for all i and prints the entry closest to its
    /// tolerance; returns its error / tolerance.
    pub fn check_each(what: &str, errors: &[f64], tols: &[f64]) -> f64 {
        assert_eq!(errors.len(), tols.len(), "{what}: lengths differ");
        let mut worst = (0.0f64, 0usize);
        for (i, (e, t)) in errors.iter().zip(tols).enumerate() {
            assert!(*t > 0.0 && t.is_finite(), "{what}[{i}]: tolerance {t}");
            assert!(e <= t, "{what}[{i}]: error {e:e} > tolerance {t:e}");
            if e / t >= worst.0 {
                worst = (e / t, i);
            }
        }
        let i = worst.1;
        eprintln!(
            "{what}: worst entry {i}: error {:.3e}, tolerance {:.3e} (margin {:.1}x)",
            errors[i],
            tols[i],
            1.0 / worst.0
        );
        worst.0
    }

    /// Asserts `|got - want| <= rtol |want| + atol` element-wise (infinities must
    /// match exactly, NaN never does) and returns the largest relative difference.
    pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> f64 {
        assert_eq!(got.size(), want.size(), "{what}: shapes differ");
        let g = Vec::<f64>::try_from(got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let w = Vec::<f64>::try_from(want.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let mut worst = 0.0f64;
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            if b.is_finite() {
                let d = (a - b).abs();
                assert!(d <= rtol * b.abs() + atol, "{what}[{i}]: got {a}, want {b}");
                if d > 0.0 {
                    worst = worst.max(d / b.abs().max(atol));
                }
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}[{i}]: got {a}, want {b}");
            }
        }
        eprintln!("{what}: max relative difference {worst:.3e}");
        worst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_names_round_trip() {
        for s in Score::ALL {
            assert_eq!(s.to_string().parse::<Score>(), Ok(s));
            assert_eq!(s.to_string().to_uppercase().parse::<Score>(), Ok(s));
        }
        for name in ["kl", "KL-Div", "kl_div", "KLDIV"] {
            assert_eq!(name.parse::<Score>(), Ok(Score::KlDiv));
        }
        assert_eq!(Score::KlDiv.to_string(), "KL_Div");
        let err = "mahalanobis2".parse::<Score>().unwrap_err();
        assert!(
            err.contains("MSP, ODIN, Energy, Mahalanobis, KL_Div"),
            "{err}"
        );
    }

    #[test]
    fn score_properties() {
        assert!(!Score::Odin.needs_grad(0.0));
        assert!(Score::Odin.needs_grad(0.0014));
        assert!(Score::Mahalanobis.needs_grad(0.005));
        assert!(!Score::Msp.needs_grad(0.1));
        assert!(Score::Energy.logits_only() && !Score::Odin.logits_only());
        assert!(Score::Mahalanobis.needs_features());
        assert!(Score::KlDiv.needs_id_templates() && !Score::Msp.needs_id_templates());
    }
}
