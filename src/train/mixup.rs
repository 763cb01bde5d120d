//! Mixup for fine-tuning (docs/finetuning.md#mixup; the original's `mixup_data`,
//! `mixup_criterion_flat` and `mixup_criterion_group` in `finetune.py`).
//!
//! Per update, lambda ~ Beta(alpha, alpha) and a random permutation `perm` of the
//! batch; the model sees `lambda * x + (1 - lambda) * x[perm]` and the loss is
//! `lambda * L(y) + (1 - lambda) * L(y[perm])`. The original draws lambda with
//! numpy's global RNG and the permutation with torch's; we cannot match those
//! streams and do not try: [`MixupSampler`] draws both from one seedable
//! xoshiro256** generator whose state serializes with serde, so a resumed run
//! continues the same stream. Beta is sampled exactly as X / (X + Y) with X, Y
//! ~ Gamma(alpha) (Marsaglia-Tsang, with the U^(1/alpha) boost for alpha < 1),
//! in log space so that small alphas neither underflow nor give 0/0.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use thiserror::Error;

/// An invalid mixup argument, or a torch error.
#[derive(Debug, Error)]
pub enum MixupError {
    /// An argument out of range or of the wrong shape.
    #[error("mixup: {0}")]
    Invalid(String),
    /// A libtorch error (e.g. a permutation index out of range).
    #[error("mixup: {0}")]
    Torch(#[from] tch::TchError),
}

/// xoshiro256** seeded through SplitMix64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn seeded(seed: u64) -> Self {
        let mut z = seed;
        let mut s = [0u64; 4];
        for word in &mut s {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *word = x ^ (x >> 31);
        }
        Self { s }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in the open interval (0, 1), 53 random bits.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller, one value per call).
    fn normal(&mut self) -> f64 {
        let r = (-2.0 * self.uniform().ln()).sqrt();
        r * (std::f64::consts::TAU * self.uniform()).cos()
    }

    /// Uniform integer in 0..n (n > 0), without modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// ln of a Gamma(shape, 1) draw, shape > 0.
    fn ln_gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            // G(a) = G(a + 1) * U^(1/a)
            return self.ln_gamma(shape + 1.0) + self.uniform().ln() / shape;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            if self.uniform().ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d.ln() + v.ln();
            }
        }
    }
}

/// Seedable source of the mixup coefficient lambda ~ Beta(alpha, alpha) and of
/// batch permutations. Serializable (alpha and generator state) for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixupSampler {
    alpha: f64,
    rng: Rng,
}

impl MixupSampler {
    /// A sampler of Beta(alpha, alpha); alpha must be finite and > 0.
    pub fn new(alpha: f64, seed: u64) -> Result<Self, MixupError> {
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(MixupError::Invalid(format!(
                "alpha must be a finite number > 0, got {alpha}"
            )));
        }
        Ok(Self {
            alpha,
            rng: Rng::seeded(seed),
        })
    }

    /// The Beta parameter alpha.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Draws lambda ~ Beta(alpha, alpha), in [0, 1].
    pub fn sample_lambda(&mut self) -> f64 {
        let ln_x = self.rng.ln_gamma(self.alpha);
        let ln_y = self.rng.ln_gamma(self.alpha);
        // X / (X + Y) = 1 / (1 + Y / X); exp overflow gives exactly 0.
        1.0 / (1.0 + (ln_y - ln_x).exp())
    }

    /// A uniformly random permutation of 0..n (Fisher-Yates) as an int64 tensor
    /// on `device`, for [`mix`] and [`permute_rows`].
    pub fn sample_permutation(&mut self, n: usize, device: Device) -> Tensor {
        let mut perm: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        Tensor::from_slice(&perm).to_device(device)
    }
}

fn check_lambda(lambda: f64) -> Result<(), MixupError> {
    if !(0.0..=1.0).contains(&lambda) {
        return Err(MixupError::Invalid(format!(
            "lambda must be in [0, 1], got {lambda}"
        )));
    }
    Ok(())
}

/// `t[perm]` along dimension 0 (e.g. the targets `y[perm]`); perm is a 1-D
/// int64 tensor with one entry per row of `t`.
pub fn permute_rows(t: &Tensor, perm: &Tensor) -> Result<Tensor, MixupError> {
    let rows = t.size().first().copied().ok_or_else(|| {
        MixupError::Invalid("expected a batch tensor with at least one dimension".into())
    })?;
    if perm.kind() != Kind::Int64 || perm.size() != [rows] {
        return Err(MixupError::Invalid(format!(
            "the permutation must be int64 of shape [{rows}], got {:?} {:?}",
            perm.kind(),
            perm.size()
        )));
    }
    Ok(t.f_index_select(0, &perm.to_device(t.device()))?)
}

/// The mixed batch `lambda * x + (1 - lambda) * x[perm]`, in x's kind (as the
/// original: Python float times a float32 tensor).
pub fn mix(x: &Tensor, lambda: f64, perm: &Tensor) -> Result<Tensor, MixupError> {
    check_lambda(lambda)?;
    let shuffled = permute_rows(x, perm)?;
    mix_with(x, &shuffled, lambda)
}

/// `lambda * x + (1 - lambda) * partners`: [`mix`] with the partner rows given
/// (data-parallel training loads each rank's partners itself).
pub fn mix_with(x: &Tensor, partners: &Tensor, lambda: f64) -> Result<Tensor, MixupError> {
    check_lambda(lambda)?;
    Ok(x.f_mul_scalar(lambda)?
        .f_add(&partners.f_mul_scalar(1.0 - lambda)?)?)
}

/// The mixed loss `lambda * L(y) + (1 - lambda) * L(y_perm)` for a loss
/// `loss_fn(targets)` of the (mixed-input) logits, e.g. a batch-mean
/// cross-entropy, or the group loss of docs/method.md#loss for group softmax.
pub fn mixed_loss(
    loss_fn: &dyn Fn(&Tensor) -> Tensor,
    y: &Tensor,
    y_perm: &Tensor,
    lambda: f64,
) -> Tensor {
    loss_fn(y) * lambda + loss_fn(y_perm) * (1.0 - lambda)
}

/// [`mixed_loss`] for a fallible loss (e.g. `GroupSlices::group_loss`).
pub fn try_mixed_loss<E>(
    loss_fn: &dyn Fn(&Tensor) -> Result<Tensor, E>,
    y: &Tensor,
    y_perm: &Tensor,
    lambda: f64,
) -> Result<Tensor, E> {
    Ok(loss_fn(y)? * lambda + loss_fn(y_perm)? * (1.0 - lambda))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sample mean and variance of `n` draws.
    fn moments(s: &mut MixupSampler, n: usize) -> (f64, f64) {
        let draws: Vec<f64> = (0..n).map(|_| s.sample_lambda()).collect();
        assert!(draws.iter().all(|l| (0.0..=1.0).contains(l)));
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (mean, var)
    }

    #[test]
    fn beta_moments() {
        // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)), excess kurtosis
        // -6 / (2a + 3). Tolerances: 5 standard errors of the sample mean
        // (sqrt(var / n)) and of the sample variance (sqrt((mu4 - var^2) / n)).
        let n = 100_000;
        for (seed, a) in [(1, 0.1), (2, 0.5), (3, 1.0), (4, 3.0)] {
            let mut s = MixupSampler::new(a, seed).unwrap();
            let (mean, var) = moments(&mut s, n);
            let want_var = 1.0 / (4.0 * (2.0 * a + 1.0));
            let mu4 = want_var * want_var * (3.0 - 6.0 / (2.0 * a + 3.0));
            let tol_mean = 5.0 * (want_var / n as f64).sqrt();
            let tol_var = 5.0 * ((mu4 - want_var * want_var) / n as f64).sqrt();
            assert!(
                (mean - 0.5).abs() < tol_mean,
                "a {a}: mean {mean} ± {tol_mean}"
            );
            assert!(
                (var - want_var).abs() < tol_var,
                "a {a}: var {var} vs {want_var}"
            );
        }
    }

    #[test]
    fn beta_distribution_kolmogorov_smirnov() {
        // Beta(1, 1) is uniform (CDF x), Beta(2, 2) has CDF 3x^2 - 2x^3.
        // Critical value of D at level 0.001: 1.95 / sqrt(n).
        let n = 20_000;
        type Cdf = fn(f64) -> f64;
        let cdfs: [(f64, Cdf); 2] = [(1.0, |x| x), (2.0, |x| x * x * (3.0 - 2.0 * x))];
        for (a, cdf) in cdfs {
            let mut s = MixupSampler::new(a, 42).unwrap();
            let mut draws: Vec<f64> = (0..n).map(|_| s.sample_lambda()).collect();
            draws.sort_by(f64::total_cmp);
            let d = draws
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let f = cdf(x);
                    (f - i as f64 / n as f64).max((i + 1) as f64 / n as f64 - f)
                })
                .fold(0.0, f64::max);
            assert!(d < 1.95 / (n as f64).sqrt(), "a {a}: D = {d}");
        }
    }

    #[test]
    fn small_alpha_is_finite_and_seeded() {
        let mut s = MixupSampler::new(1e-3, 9).unwrap();
        let draws: Vec<f64> = (0..1000).map(|_| s.sample_lambda()).collect();
        assert!(draws.iter().all(|l| (0.0..=1.0).contains(l)));
        let draw = |seed| {
            let mut s = MixupSampler::new(0.1, seed).unwrap();
            (0..50).map(|_| s.sample_lambda()).collect::<Vec<f64>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
        let mut a = MixupSampler::new(0.1, 5).unwrap();
        a.sample_lambda();
        // The state survives a serde round trip.
        let json = serde_json::to_string(&a).unwrap();
        let mut resumed: MixupSampler = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed.sample_lambda(), a.sample_lambda());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(MixupSampler::new(bad, 0).is_err());
        }
    }

    #[test]
    fn permutations_are_permutations() {
        let mut s = MixupSampler::new(0.1, 3).unwrap();
        let mut first_counts = [0usize; 5];
        for _ in 0..5000 {
            let p = Vec::<i64>::try_from(s.sample_permutation(5, Device::Cpu)).unwrap();
            let mut sorted = p.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
            first_counts[p[0] as usize] += 1;
        }
        // Each value leads ~1000 times (sd ~28).
        assert!(
            first_counts.iter().all(|&c| (850..1150).contains(&c)),
            "{first_counts:?}"
        );
        assert_eq!(s.sample_permutation(0, Device::Cpu).size(), [0]);
    }

    #[test]
    fn mix_by_hand() {
        let x = Tensor::from_slice(&[1.0f32, 2., 3., 4., 5., 6.]).view([3, 2]);
        let perm = Tensor::from_slice(&[2i64, 0, 1]);
        let got = Vec::<f32>::try_from(mix(&x, 0.25, &perm).unwrap().flatten(0, -1)).unwrap();
        assert_eq!(got, vec![4.0, 5.0, 1.5, 2.5, 3.5, 4.5]);
        let y = Tensor::from_slice(&[10i64, 20, 30]);
        let yp = permute_rows(&y, &perm).unwrap();
        assert_eq!(Vec::<i64>::try_from(&yp).unwrap(), vec![30, 10, 20]);
        // L(t) = sum(t): 0.25 * 60 + 0.75 * 60.
        let sum = |t: &Tensor| t.to_kind(Kind::Double).sum(Kind::Double);
        assert_eq!(mixed_loss(&sum, &y, &yp, 0.25).double_value(&[]), 60.0);
        let first =
            |t: &Tensor| -> Result<Tensor, MixupError> { Ok(t.get(0).to_kind(Kind::Double)) };
        let l = try_mixed_loss(&first, &y, &yp, 0.25)
            .unwrap()
            .double_value(&[]);
        assert_eq!(l, 0.25 * 10.0 + 0.75 * 30.0);
    }

    #[test]
    fn mix_rejects_bad_arguments() {
        let x = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        let perm = Tensor::from_slice(&[2i64, 0, 1]);
        for lambda in [-0.1, 1.1, f64::NAN] {
            assert!(mix(&x, lambda, &perm).is_err());
        }
        assert!(mix(&x, 0.5, &Tensor::from_slice(&[1i64, 0])).is_err());
        assert!(mix(&x, 0.5, &Tensor::from_slice(&[1i32, 0, 2])).is_err());
        assert!(mix(&x, 0.5, &Tensor::from_slice(&[1i64, 0, 3])).is_err());
        assert!(mix(&Tensor::from(1.0f32), 0.5, &perm).is_err());
    }

    #[test]
    fn matches_pytorch() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/train/mixup.safetensors"
        );
        let t = Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
        let (x, perm, lam) = (get("x"), get("perm"), get("lam").double_value(&[]));
        let mixed = mix(&x, lam, &perm).unwrap();
        // Two float32 products and a sum per entry, each correctly rounded IEEE
        // operation the same on every CPU: bit for bit PyTorch's.
        assert!(mixed.equal(&get("mixed")), "mixed input differs");
        let logits = get("logits");
        let ce = |y: &Tensor| logits.cross_entropy_for_logits(y);
        let y = get("y");
        let loss = mixed_loss(&ce, &y, &permute_rows(&y, &perm).unwrap(), lam);
        let (got, want) = (loss.double_value(&[]), get("loss").double_value(&[]));
        // float32 cross-entropies lse - z_y round by u32 (2 max|z| + C + 2 + lse)
        // per image (log-softmax over C = 5), their means and the mix by u32 of
        // their size per operation (N = 6 images, 3 operations), on both sides.
        let u32_ = f64::from(f32::EPSILON) / 2.0;
        let zmax = logits.abs().max().double_value(&[]);
        let tol = 2.0 * u32_ * (3.0 * zmax + 5.0 + 2.0 + (6.0 + 3.0) * want.abs());
        let err = (got - want).abs();
        eprintln!("mixed loss: error {err:.3e}, tolerance {tol:.3e}");
        assert!(err <= tol, "mixed loss {got} vs {want}");
    }
}
