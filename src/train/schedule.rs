//! The BiT-HyperRule learning-rate schedule and mixup switch (docs/finetuning.md; the
//! original's `get_schedule`, `get_lr` and `get_mixup` in
//! `utils/finetune_utils.py`, copies of Google's `bit_hyperrule.py`).
//!
//! Steps count optimizer updates from 0. `lr(step)` is a linear warm-up from 0
//! up to the first support, `None` (stop training) from the last support on, and
//! in between the base rate divided by 10 once for every later support that
//! `step` has passed (strictly: at `step == s` the rate has not yet dropped).
//! The division is repeated, as the original's `base_lr /= 10`, so the rates are
//! bit-identical to Python's.
use thiserror::Error;

/// The original's default `--base-lr`.
pub const DEFAULT_BASE_LR: f64 = 0.003;
/// The mixup alpha of BiT-HyperRule for training sets of at least
/// [`MIXUP_MIN_TRAIN_SIZE`] images.
pub const MIXUP_ALPHA: f64 = 0.1;
/// Training sets smaller than this get no mixup and the short schedule.
pub const MIXUP_MIN_TRAIN_SIZE: usize = 20_000;

/// An invalid schedule or base learning rate; the message names the flag.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ScheduleError {
    /// The `--schedule` value is malformed (not integers, too short, not
    /// strictly increasing).
    #[error("--schedule: {0}")]
    Supports(String),
    /// The base learning rate is not a finite positive number.
    #[error("--base-lr: expected a finite number > 0, got {0}")]
    BaseLr(f64),
}

/// The step supports of BiT-HyperRule for a training set of `train_size`
/// images: < 20k: [100, 200, 300, 400, 500]; < 500k: [500, 3000, 6000, 9000,
/// 10000]; otherwise [500, 6000, 12000, 18000, 20000].
pub fn supports_for(train_size: usize) -> [u64; 5] {
    if train_size < MIXUP_MIN_TRAIN_SIZE {
        [100, 200, 300, 400, 500]
    } else if train_size < 500_000 {
        [500, 3000, 6000, 9000, 10_000]
    } else {
        [500, 6000, 12_000, 18_000, 20_000]
    }
}

/// The mixup alpha for a training set of `train_size` images: 0.1 from 20k
/// images on, otherwise `None` (no mixup; the original's 0.0).
pub fn mixup_alpha(train_size: usize) -> Option<f64> {
    (train_size >= MIXUP_MIN_TRAIN_SIZE).then_some(MIXUP_ALPHA)
}

/// Parses a `--schedule s0,s1,...` override: comma-separated non-negative step
/// counts (spaces around them allowed), at least 2, strictly increasing.
/// Usable as a clap `value_parser`.
pub fn parse_supports(text: &str) -> Result<Vec<u64>, ScheduleError> {
    let supports = text
        .split(',')
        .map(|part| {
            let part = part.trim();
            part.parse::<u64>().map_err(|_| {
                ScheduleError::Supports(format!(
                    "expected comma-separated step counts like 500,3000,6000, \
                     but {part:?} is not a non-negative integer"
                ))
            })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    check_supports(&supports)?;
    Ok(supports)
}

fn check_supports(supports: &[u64]) -> Result<(), ScheduleError> {
    if supports.len() < 2 {
        return Err(ScheduleError::Supports(format!(
            "expected at least 2 steps (the end of the warm-up and the end of training), \
             got {}",
            supports.len()
        )));
    }
    if let Some(w) = supports.windows(2).find(|w| w[0] >= w[1]) {
        return Err(ScheduleError::Supports(format!(
            "the steps must be strictly increasing, but {} follows {}",
            w[1], w[0]
        )));
    }
    Ok(())
}

/// A learning-rate schedule: step supports and the base rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    supports: Vec<u64>,
    base_lr: f64,
}

impl Schedule {
    /// A schedule with the given supports (at least 2, strictly increasing; a
    /// first support of 0 means no warm-up) and base rate (finite, > 0).
    pub fn new(supports: Vec<u64>, base_lr: f64) -> Result<Self, ScheduleError> {
        check_supports(&supports)?;
        if !(base_lr.is_finite() && base_lr > 0.0) {
            return Err(ScheduleError::BaseLr(base_lr));
        }
        Ok(Self { supports, base_lr })
    }

    /// The BiT-HyperRule schedule for a training set of `train_size` images.
    pub fn for_train_size(train_size: usize, base_lr: f64) -> Result<Self, ScheduleError> {
        Self::new(supports_for(train_size).to_vec(), base_lr)
    }

    /// The step supports.
    pub fn supports(&self) -> &[u64] {
        &self.supports
    }

    /// The base learning rate.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// The number of updates of a full run: the last support (steps 0..last).
    pub fn total_steps(&self) -> u64 {
        self.supports[self.supports.len() - 1]
    }

    /// The learning rate of update `step`, or `None` once `step >= last support`
    /// (training stops). Warm-up: `base * step / s0` while `step < s0`; then
    /// `base` divided by 10 once per support after the first that is `< step`.
    pub fn lr(&self, step: u64) -> Option<f64> {
        let first = self.supports[0];
        if step < first {
            return Some(self.base_lr * step as f64 / first as f64);
        }
        if step >= self.total_steps() {
            return None;
        }
        let mut lr = self.base_lr;
        for _ in self.supports[1..].iter().filter(|&&s| s < step) {
            lr /= 10.0;
        }
        Some(lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supports_and_mixup_by_size() {
        let short = [100, 200, 300, 400, 500];
        let mid = [500, 3000, 6000, 9000, 10_000];
        let long = [500, 6000, 12_000, 18_000, 20_000];
        for (n, want, mix) in [
            (0, short, None),
            (1, short, None),
            (19_999, short, None),
            (20_000, mid, Some(0.1)),
            (499_999, mid, Some(0.1)),
            (500_000, long, Some(0.1)),
            (1_281_167, long, Some(0.1)),
        ] {
            assert_eq!(supports_for(n), want, "size {n}");
            assert_eq!(mixup_alpha(n), mix, "size {n}");
        }
    }

    #[test]
    fn every_step_boundary() {
        let b = 0.003;
        let s = Schedule::for_train_size(1_281_167, b).unwrap();
        assert_eq!(s.total_steps(), 20_000);
        let cases = [
            (0, Some(0.0)),
            (1, Some(b / 500.0)),
            (250, Some(b * 250.0 / 500.0)),
            (499, Some(b * 499.0 / 500.0)),
            (500, Some(b)),
            (501, Some(b)),
            (5999, Some(b)),
            (6000, Some(b)),
            (6001, Some(b / 10.0)),
            (12_000, Some(b / 10.0)),
            (12_001, Some(b / 10.0 / 10.0)),
            (18_000, Some(b / 10.0 / 10.0)),
            (18_001, Some(b / 10.0 / 10.0 / 10.0)),
            (19_999, Some(b / 10.0 / 10.0 / 10.0)),
            (20_000, None),
            (20_001, None),
            (u64::MAX, None),
        ];
        for (step, want) in cases {
            assert_eq!(s.lr(step), want, "step {step}");
        }
    }

    #[test]
    fn matches_python_bit_for_bit() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/train/schedule.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let mut checked = 0;
        for case in &cases {
            let supports: Vec<u64> = serde_json::from_value(case["supports"].clone()).unwrap();
            let base = case["base_lr"].as_f64().unwrap();
            let s = Schedule::new(supports, base).unwrap();
            for row in case["table"].as_array().unwrap() {
                let step = row["step"].as_u64().unwrap();
                let want = row["lr_bits"].as_u64().map(f64::from_bits);
                assert_eq!(s.lr(step), want, "{} step {step}", case["name"]);
                checked += 1;
            }
        }
        assert!(checked > 100, "only {checked} rows");
    }

    #[test]
    fn parses_overrides() {
        assert_eq!(parse_supports("3,7,9").unwrap(), vec![3, 7, 9]);
        assert_eq!(parse_supports(" 0, 10 ").unwrap(), vec![0, 10]);
        let s = Schedule::new(parse_supports("0,10").unwrap(), 0.5).unwrap();
        assert_eq!(s.lr(0), Some(0.5)); // no warm-up
        assert_eq!(s.lr(10), None);
    }

    #[test]
    fn rejects_bad_overrides() {
        for bad in [
            "", "500", "500,", "a,b", "-1,5", "5,5", "10,5", "1.5,3", "1,,3",
        ] {
            let err = parse_supports(bad).unwrap_err().to_string();
            assert!(err.starts_with("--schedule: "), "{bad:?}: {err}");
        }
        assert!(parse_supports("10,5")
            .unwrap_err()
            .to_string()
            .contains("5 follows 10"));
        assert!(Schedule::new(vec![5], 0.1).is_err());
        for lr in [0.0, -0.1, f64::NAN, f64::INFINITY] {
            let err = Schedule::new(vec![1, 2], lr).unwrap_err().to_string();
            assert!(err.starts_with("--base-lr: "), "{err}");
        }
    }
}
