//! OOD detection metrics: AUROC, AUPR-In, AUPR-Out and FPR at 95% recall.
//!
//! Conventions (docs/metrics.md): scores are "higher = more in-distribution",
//! the in-distribution (ID) set is the positive class, values are fractions in
//! `[0, 1]`.
//!
//! * [`auroc`] is scikit-learn's `roc_auc_score(labels, scores)`: thresholds at
//!   the distinct score values (runs of tied scores count as one threshold),
//!   `roc_curve` with its default `drop_intermediate=True` (collinear points
//!   removed), the curve starting at `(0, 0)`, and the trapezoidal area as
//!   `scipy.integrate.trapezoid` computes it.
//! * [`aupr_in`] is `average_precision_score(labels, scores)` with ID = 1, the
//!   step-function sum `-sum(diff(recall) * precision[:-1])` over the reversed
//!   precision-recall curve; [`aupr_out`] is the same with OOD as the positive
//!   class on negated scores (what the original's `get_measures` does).
//! * [`fpr95`] is the original MOS code's `fpr_and_fdr_at_recall(labels,
//!   scores, 0.95)` (`utils/test_utils.py` of deeplearning-wisc/large_scale_ood,
//!   itself from Hendrycks' outlier-exposure code), including its quirks: the
//!   curve is cut at the first threshold where every ID sample is accepted,
//!   walked backwards, and the *first* threshold whose recall is closest to
//!   0.95 (above or below) is taken.
//! * [`fpr95_ood_positive`] is OpenOOD v1.5's FPR@95 (OOD positive).
//!
//! Sums are taken in the order NumPy takes them (its pairwise summation for
//! `np.sum`), so results agree with scikit-learn 1.9.1 / NumPy 2.4 to the last
//! bit on the fixtures in `tests/fixtures/metrics/` (tested to 1e-12) and on
//! 400 further random score sets checked while writing this module.
//! Everything is `O(n log n)` (one sort) and `O(n)` memory.

use serde::Serialize;
use std::fmt;

/// The recall level of FPR95.
pub const RECALL_LEVEL: f64 = 0.95;

/// All metrics of one ID set against one OOD set (fractions in `[0, 1]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OodMetrics {
    /// Area under the ROC curve, ID positive ([`auroc`]).
    pub auroc: f64,
    /// Average precision with ID positive ([`aupr_in`]).
    pub aupr_in: f64,
    /// Average precision with OOD positive on negated scores ([`aupr_out`]).
    pub aupr_out: f64,
    /// FPR at 95% ID recall, the original MOS code's definition ([`fpr95`]):
    /// the fraction of OOD samples accepted as ID.
    pub fpr95: f64,
    /// FPR at 95% OOD recall, OpenOOD v1.5's definition
    /// ([`fpr95_ood_positive`]): the fraction of ID samples rejected as OOD.
    pub fpr95_ood_positive: f64,
}

/// Which of the two score sets an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreSet {
    /// The in-distribution (positive) scores.
    InDistribution,
    /// The out-of-distribution scores.
    OutOfDistribution,
}

impl fmt::Display for ScoreSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScoreSet::InDistribution => write!(f, "in-distribution"),
            ScoreSet::OutOfDistribution => write!(f, "out-of-distribution"),
        }
    }
}

/// Why a metric could not be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsError {
    /// One of the score sets is empty (the metrics need both classes).
    Empty(ScoreSet),
    /// A score set holds NaN or infinite values (scikit-learn rejects both).
    NonFinite {
        /// The offending set.
        set: ScoreSet,
        /// Number of NaN scores.
        nan: usize,
        /// Number of infinite scores.
        infinite: usize,
    },
    /// The recall / TPR level is not a finite number.
    InvalidLevel,
}

impl fmt::Display for MetricsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsError::Empty(set) => {
                write!(f, "no {set} scores: both ID and OOD scores are needed")
            }
            MetricsError::NonFinite { set, nan, infinite } => write!(
                f,
                "{set} scores contain {nan} NaN and {infinite} infinite value(s)"
            ),
            MetricsError::InvalidLevel => write!(f, "the recall level must be a finite number"),
        }
    }
}

impl std::error::Error for MetricsError {}

/// All five metrics (one sort of the scores).
pub fn ood_metrics(in_scores: &[f64], out_scores: &[f64]) -> Result<OodMetrics, MetricsError> {
    let runs = Runs::new(in_scores, out_scores)?;
    Ok(OodMetrics {
        auroc: runs.auroc(),
        aupr_in: runs.aupr_in(),
        aupr_out: runs.aupr_out(),
        fpr95: runs.fpr_at_recall(RECALL_LEVEL),
        fpr95_ood_positive: runs.fpr_at_tpr_ood_positive(RECALL_LEVEL),
    })
}

/// AUROC with ID positive: scikit-learn `roc_auc_score(labels, scores)`.
pub fn auroc(in_scores: &[f64], out_scores: &[f64]) -> Result<f64, MetricsError> {
    Ok(Runs::new(in_scores, out_scores)?.auroc())
}

/// AUPR-In: scikit-learn `average_precision_score(labels, scores)`, ID = 1.
pub fn aupr_in(in_scores: &[f64], out_scores: &[f64]) -> Result<f64, MetricsError> {
    Ok(Runs::new(in_scores, out_scores)?.aupr_in())
}

/// AUPR-Out: `average_precision_score(1 - labels, -scores)` (OOD positive).
pub fn aupr_out(in_scores: &[f64], out_scores: &[f64]) -> Result<f64, MetricsError> {
    Ok(Runs::new(in_scores, out_scores)?.aupr_out())
}

/// FPR95 in the original MOS code's convention (ID positive): the fraction of
/// OOD scores accepted at the threshold whose ID recall is closest to 0.95.
/// See [`fpr_at_recall`].
pub fn fpr95(in_scores: &[f64], out_scores: &[f64]) -> Result<f64, MetricsError> {
    fpr_at_recall(in_scores, out_scores, RECALL_LEVEL)
}

/// The original's `fpr_and_fdr_at_recall(labels, scores, recall_level)`
/// (docs/metrics.md#fpr95), first return value:
///
/// 1. thresholds at the distinct score values, in descending order;
/// 2. `tps`, `fps` = ID / OOD counts at or above each threshold,
///    `recall = tps / n_id`;
/// 3. keep the thresholds from the first one with `tps == n_id` back to the
///    highest, in that (reversed) order, then append `recall = 1, fps = 0`;
/// 4. `cutoff` = first position of the minimum of `|recall - recall_level|`;
///    the result is `fps[cutoff] / n_ood`.
pub fn fpr_at_recall(
    in_scores: &[f64],
    out_scores: &[f64],
    recall_level: f64,
) -> Result<f64, MetricsError> {
    if !recall_level.is_finite() {
        return Err(MetricsError::InvalidLevel);
    }
    Ok(Runs::new(in_scores, out_scores)?.fpr_at_recall(recall_level))
}

/// FPR95 in OpenOOD v1.5's convention (OOD positive): the fraction of ID
/// samples rejected as OOD at the first ROC point where at least 95% of the
/// OOD samples are rejected. See [`fpr_at_tpr_ood_positive`].
pub fn fpr95_ood_positive(in_scores: &[f64], out_scores: &[f64]) -> Result<f64, MetricsError> {
    fpr_at_tpr_ood_positive(in_scores, out_scores, RECALL_LEVEL)
}

/// OpenOOD v1.5 `openood/evaluators/metrics.py`, `auc_and_fpr_recall(conf,
/// label, tpr_th)` (github Jingkang50/OpenOOD, since commit 873e8c2 "fix ood
/// eval (ood as pos)"):
///
/// ```text
/// fpr_list, tpr_list, _ = sklearn.metrics.roc_curve(ood_indicator, -conf)
/// fpr = fpr_list[np.argmax(tpr_list >= tpr_th)]
/// ```
///
/// OOD is the positive class, scored by `-conf`; `roc_curve` keeps its
/// default `drop_intermediate=True`, which can move the answer when the first
/// point reaching the TPR level is a dropped collinear one (runs of ties).
/// (OpenOOD's AUPR values integrate the PR curve with `sklearn.metrics.auc`,
/// a trapezoid, not average precision; this module does not reproduce those.)
pub fn fpr_at_tpr_ood_positive(
    in_scores: &[f64],
    out_scores: &[f64],
    tpr_level: f64,
) -> Result<f64, MetricsError> {
    if !tpr_level.is_finite() {
        return Err(MetricsError::InvalidLevel);
    }
    Ok(Runs::new(in_scores, out_scores)?.fpr_at_tpr_ood_positive(tpr_level))
}

/// One run of equal scores: how many ID and OOD samples hold that score.
#[derive(Debug, Clone, Copy)]
struct Run {
    id: usize,
    ood: usize,
}

/// The scores of both sets grouped into runs of equal values, in descending
/// score order (the thresholds of `_binary_clf_curve`).
struct Runs {
    runs: Vec<Run>,
    n_id: usize,
    n_ood: usize,
}

/// Cumulative counts at each threshold, as `confusion_matrix_at_thresholds`
/// gives them (`tps`, `fps`, both exact integers in `f64`).
struct Curve {
    tps: Vec<f64>,
    fps: Vec<f64>,
}

fn check(set: ScoreSet, scores: &[f64]) -> Result<(), MetricsError> {
    if scores.is_empty() {
        return Err(MetricsError::Empty(set));
    }
    let nan = scores.iter().filter(|s| s.is_nan()).count();
    let infinite = scores.iter().filter(|s| s.is_infinite()).count();
    if nan > 0 || infinite > 0 {
        return Err(MetricsError::NonFinite { set, nan, infinite });
    }
    Ok(())
}

impl Runs {
    fn new(in_scores: &[f64], out_scores: &[f64]) -> Result<Self, MetricsError> {
        check(ScoreSet::InDistribution, in_scores)?;
        check(ScoreSet::OutOfDistribution, out_scores)?;
        let mut all: Vec<(f64, bool)> = in_scores
            .iter()
            .map(|&s| (s, true))
            .chain(out_scores.iter().map(|&s| (s, false)))
            .collect();
        // Descending; the order inside a run of ties does not matter for the
        // counts at its end. -0.0 and 0.0 end up adjacent and compare equal,
        // as `np.diff` sees them.
        all.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut runs: Vec<Run> = Vec::new();
        let mut prev: Option<f64> = None;
        for &(s, is_id) in &all {
            let same = prev == Some(s);
            if !same {
                runs.push(Run { id: 0, ood: 0 });
                prev = Some(s);
            }
            if let Some(r) = runs.last_mut() {
                if is_id {
                    r.id += 1;
                } else {
                    r.ood += 1;
                }
            }
        }
        Ok(Runs {
            runs,
            n_id: in_scores.len(),
            n_ood: out_scores.len(),
        })
    }

    /// The curve with ID positive (scores descending).
    fn id_positive(&self) -> Curve {
        cumulate(self.runs.iter().map(|r| (r.id, r.ood)))
    }

    /// The curve with OOD positive on negated scores: negated scores in
    /// descending order are the runs in ascending order.
    fn ood_positive(&self) -> Curve {
        cumulate(self.runs.iter().rev().map(|r| (r.ood, r.id)))
    }

    fn auroc(&self) -> f64 {
        let (fpr, tpr) = roc_curve(&self.id_positive());
        trapezoid(&tpr, &fpr)
    }

    fn aupr_in(&self) -> f64 {
        average_precision(&self.id_positive())
    }

    fn aupr_out(&self) -> f64 {
        average_precision(&self.ood_positive())
    }

    fn fpr_at_recall(&self, recall_level: f64) -> f64 {
        let curve = self.id_positive();
        let total = self.n_id as f64;
        // tps.searchsorted(tps[-1]): first threshold where every ID is accepted
        let last_ind = curve.tps.iter().position(|&t| t >= total).unwrap_or(0);
        let mut best_dist = f64::INFINITY;
        let mut best_fps = 0.0;
        let walked = (0..=last_ind)
            .rev()
            .map(|i| (curve.tps[i] / total, curve.fps[i]))
            .chain(std::iter::once((1.0, 0.0)));
        for (recall, fps) in walked {
            // np.argmin: first position of the minimum
            let dist = (recall - recall_level).abs();
            if dist < best_dist {
                best_dist = dist;
                best_fps = fps;
            }
        }
        best_fps / self.n_ood as f64
    }

    fn fpr_at_tpr_ood_positive(&self, tpr_level: f64) -> f64 {
        let (fpr, tpr) = roc_curve(&self.ood_positive());
        // np.argmax(tpr >= level): first True, or 0 if none
        let i = tpr.iter().position(|&t| t >= tpr_level).unwrap_or(0);
        fpr[i]
    }
}

fn cumulate(counts: impl Iterator<Item = (usize, usize)>) -> Curve {
    let mut tps = Vec::new();
    let mut fps = Vec::new();
    let (mut tp, mut fp) = (0usize, 0usize);
    for (pos, neg) in counts {
        tp += pos;
        fp += neg;
        tps.push(tp as f64);
        fps.push(fp as f64);
    }
    Curve { tps, fps }
}

/// scikit-learn `roc_curve(drop_intermediate=True)`: `(fpr, tpr)`.
fn roc_curve(curve: &Curve) -> (Vec<f64>, Vec<f64>) {
    let n = curve.tps.len();
    let mut keep: Vec<usize> = Vec::with_capacity(n);
    if n > 2 {
        // keep the ends and every point where the second difference of fps
        // or tps is nonzero (a corner)
        keep.push(0);
        for i in 1..n - 1 {
            let d2 = |v: &[f64]| (v[i + 1] - v[i]) - (v[i] - v[i - 1]);
            if d2(&curve.fps) != 0.0 || d2(&curve.tps) != 0.0 {
                keep.push(i);
            }
        }
        keep.push(n - 1);
    } else {
        keep.extend(0..n);
    }
    let fps_total = curve.fps[n - 1];
    let tps_total = curve.tps[n - 1];
    let mut fpr = Vec::with_capacity(keep.len() + 1);
    let mut tpr = Vec::with_capacity(keep.len() + 1);
    fpr.push(0.0 / fps_total);
    tpr.push(0.0 / tps_total);
    for &i in &keep {
        fpr.push(curve.fps[i] / fps_total);
        tpr.push(curve.tps[i] / tps_total);
    }
    (fpr, tpr)
}

/// `scipy.integrate.trapezoid(y, x)` for 1-D arrays:
/// `sum(diff(x) * (y[1:] + y[:-1]) / 2.0)`.
fn trapezoid(y: &[f64], x: &[f64]) -> f64 {
    let terms: Vec<f64> = (1..x.len())
        .map(|i| (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2.0)
        .collect();
    numpy_sum(&terms)
}

/// scikit-learn `average_precision_score` for one positive class:
/// `max(0, -sum(diff(recall) * precision[:-1]))` with the reversed
/// precision-recall curve of `precision_recall_curve` (`precision` ends with
/// 1, `recall` with 0).
fn average_precision(curve: &Curve) -> f64 {
    let n = curve.tps.len();
    let total = curve.tps[n - 1];
    let precision = |i: usize| {
        let ps = curve.tps[i] + curve.fps[i];
        if ps != 0.0 {
            curve.tps[i] / ps
        } else {
            0.0
        }
    };
    let recall = |i: usize| curve.tps[i] / total;
    // reversed: position k holds threshold n - 1 - k; position n is the
    // appended (recall 0, precision 1)
    let rev_recall = |k: usize| if k == n { 0.0 } else { recall(n - 1 - k) };
    let terms: Vec<f64> = (0..n)
        .map(|k| (rev_recall(k + 1) - rev_recall(k)) * precision(n - 1 - k))
        .collect();
    let ap = -numpy_sum(&terms);
    if ap > 0.0 {
        ap
    } else {
        0.0
    }
}

/// `np.sum` of a contiguous float64 array: NumPy's pairwise summation
/// (blocks of at most 128 values summed with eight interleaved accumulators,
/// larger arrays split in halves rounded down to a multiple of 8).
fn numpy_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= BLOCK {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, acc) in r.iter_mut().enumerate() {
                *acc += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[i..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/metrics/scores.json"
    );

    fn parse_scores(v: &serde_json::Value, dtype: &str) -> Vec<f64> {
        v.as_array()
            .expect("array of strings")
            .iter()
            .map(|s| {
                let s = s.as_str().expect("float as string");
                if dtype == "f32" {
                    f64::from(s.parse::<f32>().expect("f32"))
                } else {
                    s.parse::<f64>().expect("f64")
                }
            })
            .collect()
    }

    fn num(v: &serde_json::Value) -> f64 {
        v.as_str().expect("float as string").parse().expect("f64")
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// float64's unit roundoff 2^-53.
    const U64: f64 = f64::EPSILON / 2.0;

    /// Bound on the difference of two float64 evaluations of a metric of n scores:
    /// a sum of <= n + 1 terms in [0, 1] (trapezoids or precisions) and a division,
    /// each side rounding every partial sum by u64 relative.
    fn metric_tol(n: usize) -> f64 {
        2.0 * (n as f64 + 2.0) * U64
    }

    #[test]
    fn matches_sklearn_and_original_fixtures() {
        let text =
            std::fs::read_to_string(FIXTURE).expect("run tests/fixtures/make_metrics_fixtures.py");
        let json: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        let cases = json["cases"].as_array().expect("cases");
        assert!(cases.len() >= 15);
        let mut max_diff = 0.0f64;
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let dtype = case["dtype"].as_str().expect("dtype");
            let ins = parse_scores(&case["in_scores"], dtype);
            let outs = parse_scores(&case["out_scores"], dtype);
            let m = ood_metrics(&ins, &outs).expect("metrics");
            let pairs = [
                ("auroc", m.auroc),
                ("aupr_in", m.aupr_in),
                ("aupr_out", m.aupr_out),
                ("fpr95", m.fpr95),
                ("fpr95_ood_positive", m.fpr95_ood_positive),
            ];
            let tol = metric_tol(ins.len() + outs.len());
            for (key, got) in pairs {
                let want = num(&case[key]);
                max_diff = max_diff.max((got - want).abs() / tol);
                assert!(
                    close(got, want, tol),
                    "{name} {key}: got {got:?}, sklearn/original {want:?}, tolerance {tol:e}"
                );
            }
            // FPRs are ratios of counts: exact
            assert_eq!(m.fpr95, num(&case["fpr95"]), "{name}");
            assert_eq!(
                m.fpr95_ood_positive,
                num(&case["fpr95_ood_positive"]),
                "{name}"
            );
            // the single-metric functions agree with ood_metrics
            assert_eq!(auroc(&ins, &outs), Ok(m.auroc));
            assert_eq!(aupr_in(&ins, &outs), Ok(m.aupr_in));
            assert_eq!(aupr_out(&ins, &outs), Ok(m.aupr_out));
            assert_eq!(fpr95(&ins, &outs), Ok(m.fpr95));
            assert_eq!(fpr95_ood_positive(&ins, &outs), Ok(m.fpr95_ood_positive));
        }
        eprintln!(
            "metrics vs the Python reference: largest |difference| / tolerance {max_diff:.3e} \
             (margin {:.1}x)",
            1.0 / max_diff
        );
    }

    #[test]
    fn hand_checked_small_case() {
        // descending: 0.9 ID, 0.8 ID, 0.7 OOD, 0.4 ID, 0.3 OOD
        let ins = [0.9, 0.8, 0.4];
        let outs = [0.7, 0.3];
        let m = ood_metrics(&ins, &outs).expect("metrics");
        // 5 of 6 (ID, OOD) pairs ordered correctly
        // Tolerances here: a few float64 roundings of values <= 1.
        assert!(close(m.auroc, 5.0 / 6.0, metric_tol(5)));
        // precision at each ID hit: 1, 1, 3/4
        assert!(close(m.aupr_in, (1.0 + 1.0 + 0.75) / 3.0, metric_tol(5)));
        // ascending: 0.3 OOD, 0.4 ID, 0.7 OOD -> precision 1, 2/3
        assert!(close(m.aupr_out, (1.0 + 2.0 / 3.0) / 2.0, metric_tol(5)));
        // walked back from 0.4 (recall 1, one OOD above): recall 1 is closest
        assert_eq!(m.fpr95, 0.5);
        // OOD positive on -score: (fps, tps) = (0,1) (1,1) (1,2) (2,2) (3,2);
        // TPR 1 first reached at 1 ID rejected of 3
        assert_eq!(m.fpr95_ood_positive, 1.0 / 3.0);
    }

    #[test]
    fn perfect_and_inverted_separation() {
        let m = ood_metrics(&[3.0, 4.0, 5.0], &[0.0, 1.0]).expect("metrics");
        assert_eq!(
            (
                m.auroc,
                m.aupr_in,
                m.aupr_out,
                m.fpr95,
                m.fpr95_ood_positive
            ),
            (1.0, 1.0, 1.0, 0.0, 0.0)
        );
        let m = ood_metrics(&[0.0, 1.0], &[3.0, 4.0, 5.0]).expect("metrics");
        assert_eq!(m.auroc, 0.0);
        assert_eq!(m.fpr95, 1.0);
        assert_eq!(m.fpr95_ood_positive, 1.0);
        // precision at the two ID hits: 1/4, 2/5
        assert!(close(m.aupr_in, (0.25 + 0.4) / 2.0, metric_tol(5)));
    }

    #[test]
    fn all_scores_equal() {
        let m = ood_metrics(&[0.5; 30], &[0.5; 70]).expect("metrics");
        assert_eq!(m.auroc, 0.5);
        assert_eq!(m.aupr_in, 0.3);
        assert_eq!(m.aupr_out, 0.7);
        assert_eq!(m.fpr95, 1.0);
        assert_eq!(m.fpr95_ood_positive, 1.0);
    }

    #[test]
    fn single_samples() {
        let m = ood_metrics(&[0.2], &[0.1]).expect("metrics");
        assert_eq!(
            (
                m.auroc,
                m.aupr_in,
                m.aupr_out,
                m.fpr95,
                m.fpr95_ood_positive
            ),
            (1.0, 1.0, 1.0, 0.0, 0.0)
        );
        // one ID sample in the middle of four OOD samples
        let m = ood_metrics(&[0.5], &[0.9, 0.6, 0.4, 0.1]).expect("metrics");
        assert!(close(m.auroc, 0.5, metric_tol(5)));
        assert!(close(m.aupr_in, 1.0 / 3.0, metric_tol(5)));
        assert_eq!(m.fpr95, 0.5);
    }

    #[test]
    fn original_fpr_walks_back_from_full_recall() {
        // 20 ID at 20..1, an OOD at 1.5: thresholds 2 and 1.5 both have recall
        // exactly 0.95; walking back from full recall, 1.5 (with its OOD) is
        // met first
        let ins: Vec<f64> = (1..=20).map(f64::from).collect();
        let m = ood_metrics(&ins, &[1.5, -1.0]).expect("metrics");
        assert_eq!(m.fpr95, 0.5);
        // 10 ID at 10..1, an OOD tied with the lowest ID: recall 0.9 (distance
        // 0.05 - 7e-17) beats recall 1.0 (0.05 + 4e-17), so the cutoff lies
        // below 95% recall and excludes the tied OOD
        let ins: Vec<f64> = (1..=10).map(f64::from).collect();
        let m = ood_metrics(&ins, &[1.0, -1.0]).expect("metrics");
        assert_eq!(m.fpr95, 0.0);
        // OpenOOD takes the first point with OOD TPR >= 0.95 instead: with 10
        // OOD that is TPR 1.0, which rejects the tied ID sample too
        let outs: Vec<f64> = (1..=10).map(|v| -f64::from(v)).collect();
        let m = ood_metrics(&[-10.0, 5.0], &outs).expect("metrics");
        assert_eq!(m.fpr95_ood_positive, 0.5);
    }

    #[test]
    fn drop_intermediate_matters_for_openood_fpr() {
        // one ID and one OOD at every value: collinear ROC, intermediate
        // points dropped, so the first kept point with TPR >= 0.95 is the end
        let v: Vec<f64> = (0..40).map(f64::from).collect();
        let m = ood_metrics(&v, &v).expect("metrics");
        assert_eq!(m.fpr95_ood_positive, 1.0);
        assert!(close(m.auroc, 0.5, metric_tol(80)));
    }

    #[test]
    fn signed_zeros_are_one_threshold() {
        let m = ood_metrics(&[0.0, 1.0], &[-0.0]).expect("metrics");
        assert!(close(m.auroc, 0.75, metric_tol(3)));
    }

    #[test]
    fn errors() {
        assert_eq!(
            ood_metrics(&[], &[1.0]),
            Err(MetricsError::Empty(ScoreSet::InDistribution))
        );
        assert_eq!(
            ood_metrics(&[1.0], &[]),
            Err(MetricsError::Empty(ScoreSet::OutOfDistribution))
        );
        let e = ood_metrics(&[1.0, f64::NAN, f64::NAN, f64::INFINITY], &[0.0]).unwrap_err();
        assert_eq!(
            e,
            MetricsError::NonFinite {
                set: ScoreSet::InDistribution,
                nan: 2,
                infinite: 1
            }
        );
        assert_eq!(
            e.to_string(),
            "in-distribution scores contain 2 NaN and 1 infinite value(s)"
        );
        let e = auroc(&[1.0], &[f64::NEG_INFINITY, f64::NAN]).unwrap_err();
        assert_eq!(
            e,
            MetricsError::NonFinite {
                set: ScoreSet::OutOfDistribution,
                nan: 1,
                infinite: 1
            }
        );
        assert_eq!(
            fpr_at_recall(&[1.0], &[0.0], f64::NAN),
            Err(MetricsError::InvalidLevel)
        );
    }

    /// Deterministic pseudo-random numbers (SplitMix64).
    fn splitmix(state: &mut u64) -> f64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Mann-Whitney statistic with ties counted 1/2, from sorted OOD scores.
    fn mann_whitney(ins: &[f64], outs: &[f64]) -> f64 {
        let mut sorted = outs.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mut u = 0.0;
        for &s in ins {
            let below = sorted.partition_point(|&o| o < s);
            let not_above = sorted.partition_point(|&o| o <= s);
            u += below as f64 + 0.5 * (not_above - below) as f64;
        }
        u / (ins.len() as f64 * outs.len() as f64)
    }

    #[test]
    fn large_tied_input_matches_mann_whitney() {
        let mut st = 42u64;
        // 50,000 ID and 10,000 OOD scores quantised to 1/500: heavy ties
        let ins: Vec<f64> = (0..50_000)
            .map(|_| (splitmix(&mut st) * 500.0).floor() / 500.0 + 0.1)
            .collect();
        let outs: Vec<f64> = (0..10_000)
            .map(|_| (splitmix(&mut st) * 500.0).floor() / 500.0)
            .collect();
        let m = ood_metrics(&ins, &outs).expect("metrics");
        // The Mann-Whitney count is exact (halves of integers < 2^53), then one
        // division; the ROC area sums <= 1001 trapezoids (one per distinct score).
        let want = mann_whitney(&ins, &outs);
        let tol = metric_tol(1001);
        assert!(close(m.auroc, want, tol), "{} vs {want}", m.auroc);
        eprintln!(
            "AUROC vs Mann-Whitney: error {:.3e}, tolerance {tol:.3e}",
            (m.auroc - want).abs()
        );
        assert!(m.fpr95 > 0.0 && m.fpr95 < 1.0);
        assert!(m.aupr_in > 0.0 && m.aupr_in <= 1.0);
    }

    #[test]
    fn numpy_pairwise_sum_shape() {
        // a sum that depends on the order of additions
        let mut a = vec![1.0; 300];
        a[0] = 1e16;
        a[150] = -1e16;
        // np.sum gives 280.0 (blocks of 144 and 156), a left-to-right sum 149.0
        assert_eq!(numpy_sum(&a), 280.0);
        assert_eq!(numpy_sum(&[1.0, 2.0, 3.0]), 6.0);
        assert_eq!(numpy_sum(&[]), 0.0);
    }

    #[test]
    fn serializes() {
        let m = ood_metrics(&[1.0], &[0.0]).expect("metrics");
        let s = serde_json::to_string(&m).expect("json");
        assert!(s.contains("\"fpr95_ood_positive\":0.0"));
    }
}
