//! The group softmax of MOS (docs/method.md): the logit layout of a group config
//! (the original's `get_group_slices`), the MOS score (`test_mos.py`), the
//! fine-tuning loss and the group accuracy (`finetune.py::calc_group_softmax_acc`).
//!
//! Group g owns the logit slice `[start_g, start_g + n_g + 1)`; slot 0 of each slice
//! is the group's "others" class, slot k (1..=n_g) its k-th class. Functions loop
//! over the G groups (G is small), never over samples.
use tch::{Kind, Reduction, Tensor};

use super::{check_matrix, is_integer, to_score_kind, OodError, Result};

/// The logit layout of a group config: `classes_per_group[g]` classes in group g,
/// each group preceded by its "others" slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSlices {
    classes_per_group: Vec<i64>,
    starts: Vec<i64>,
    total: i64,
}

impl GroupSlices {
    /// The layout of `classes_per_group` (e.g. `taxonomy_level0.npy` =
    /// [398, 521, 9, 7, 52, 8, 3, 2]). Errors if there is no group or a group has
    /// fewer than one class.
    pub fn new(classes_per_group: &[i64]) -> Result<Self> {
        if classes_per_group.is_empty() {
            return Err(OodError::Invalid(
                "group config: no groups (expected at least one class count)".into(),
            ));
        }
        let mut starts = Vec::with_capacity(classes_per_group.len());
        let mut total: i64 = 0;
        for (g, &n) in classes_per_group.iter().enumerate() {
            if n < 1 {
                return Err(OodError::Invalid(format!(
                    "group config: group {g} has {n} classes; every group needs at least one"
                )));
            }
            starts.push(total);
            total = n
                .checked_add(1)
                .and_then(|m| total.checked_add(m))
                .ok_or_else(|| {
                    OodError::Invalid("group config: the class counts overflow".into())
                })?;
        }
        Ok(Self {
            classes_per_group: classes_per_group.to_vec(),
            starts,
            total,
        })
    }

    /// Number of groups G.
    pub fn num_groups(&self) -> usize {
        self.classes_per_group.len()
    }

    /// Logits of the model: sum of the class counts plus G (1008 for ImageNet).
    pub fn total_logits(&self) -> i64 {
        self.total
    }

    /// Number of in-distribution classes: sum of the class counts.
    pub fn num_classes(&self) -> i64 {
        self.total - self.num_groups() as i64
    }

    /// The class count of every group.
    pub fn classes_per_group(&self) -> &[i64] {
        &self.classes_per_group
    }

    /// The logit range `[start, end)` of group `g` (others slot included).
    /// Panics if `g >= num_groups()`.
    pub fn range(&self, g: usize) -> (i64, i64) {
        let start = self.starts[g];
        (start, start + self.classes_per_group[g] + 1)
    }

    /// The logits of group `g`: [N, total] -> [N, n_g + 1] (a view).
    fn group_logits(&self, logits: &Tensor, g: usize) -> Tensor {
        logits.narrow(1, self.starts[g], self.classes_per_group[g] + 1)
    }

    /// Checks logits [N, total] and returns N.
    fn check_logits(&self, logits: &Tensor) -> Result<i64> {
        let (n, c) = check_matrix(logits, "group-softmax logits")?;
        if c != self.total {
            return Err(OodError::Shape(format!(
                "group-softmax logits: expected {} columns (sum of the class counts {} + {} \
                 groups), got {c}",
                self.total,
                self.num_classes(),
                self.num_groups()
            )));
        }
        Ok(n)
    }

    /// Checks targets [N, G] of an integer kind with `0 <= targets[:, g] <= n_g`,
    /// and returns them as int64 on `device`.
    fn check_targets(&self, targets: &Tensor, n: i64, device: tch::Device) -> Result<Tensor> {
        let size = targets.size();
        let g = self.num_groups() as i64;
        if size != [n, g] {
            return Err(OodError::Shape(format!(
                "group targets: expected shape [{n}, {g}] (one entry per sample and group), \
                 got {size:?}"
            )));
        }
        if !is_integer(targets) {
            return Err(OodError::Shape(format!(
                "group targets: expected an integer tensor, got {:?}",
                targets.kind()
            )));
        }
        let targets = targets.to_device(device).to_kind(Kind::Int64);
        let upper = Tensor::from_slice(&self.classes_per_group).to_device(device);
        let bad = targets.lt(0).logical_or(&targets.gt_tensor(&upper));
        if bad.any().int64_value(&[]) != 0 {
            let first = bad.nonzero().get(0);
            let (i, gr) = (first.int64_value(&[0]), first.int64_value(&[1]));
            return Err(OodError::Invalid(format!(
                "group targets: sample {i}, group {gr} has target {}, outside 0..={} \
                 (0 = others, k = k-th class of the group)",
                targets.int64_value(&[i, gr]),
                self.classes_per_group[gr as usize]
            )));
        }
        Ok(targets)
    }

    /// The "others" probability of every group: softmax of each group slice, slot 0.
    /// logits [N, total] -> [N, G], in the logits' kind (float32 or float64).
    pub fn others_probs(&self, logits: &Tensor) -> Result<Tensor> {
        self.check_logits(logits)?;
        let logits = to_score_kind(logits);
        let cols: Vec<Tensor> = (0..self.num_groups())
            .map(|g| self.group_logits(&logits, g).softmax(-1, None).select(1, 0))
            .collect();
        Ok(Tensor::stack(&cols, 1))
    }

    /// The MOS score `-min_g p_g(others)` (= max over groups of minus the others
    /// probability): logits [N, total] -> [N]. Higher = more in-distribution.
    pub fn mos_score(&self, logits: &Tensor) -> Result<Tensor> {
        let others = self.others_probs(logits)?;
        Ok(-others.amin(1, false))
    }

    /// Fine-tuning loss: the sum over groups of the batch-mean cross-entropy of the
    /// group slice against `targets[:, g]` (0 = others). logits [N, total] (float,
    /// graph kept), targets [N, G] integer -> scalar. Errors on an empty batch.
    pub fn group_loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let n = self.check_logits(logits)?;
        if n == 0 {
            return Err(OodError::Shape(
                "group loss: the batch is empty (the mean over no sample is undefined)".into(),
            ));
        }
        let targets = self.check_targets(targets, n, logits.device())?;
        let logits = to_score_kind(logits);
        let mut loss: Option<Tensor> = None;
        for g in 0..self.num_groups() {
            let ce = self
                .group_logits(&logits, g)
                .log_softmax(-1, None)
                .g_nll_loss::<Tensor>(&targets.select(1, g as i64), None, Reduction::Mean, -100);
            loss = Some(match loss {
                None => ce,
                Some(l) => l + ce,
            });
        }
        Ok(loss.expect("GroupSlices has at least one group"))
    }

    /// Per-sample top-1 correctness, as the original's group accuracy: per group,
    /// softmax, drop the others column, take the max probability and its class
    /// (+1); the predicted group has the largest of those maxima (the first on
    /// ties); correct iff that group and its class equal the target's (the index
    /// and the value of the maximum of the target row). logits [N, total],
    /// targets [N, G] integer -> [N] bool.
    pub fn group_accuracy(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let n = self.check_logits(logits)?;
        let targets = self.check_targets(targets, n, logits.device())?;
        let logits = to_score_kind(logits);
        let mut max_prob = Vec::with_capacity(self.num_groups());
        let mut max_class = Vec::with_capacity(self.num_groups());
        for (g, &n_g) in self.classes_per_group.iter().enumerate() {
            let probs = self
                .group_logits(&logits, g)
                .softmax(-1, None)
                .narrow(1, 1, n_g);
            let (p, c) = probs.max_dim(1, false);
            max_prob.push(p);
            max_class.push(c + 1);
        }
        let max_prob = Tensor::stack(&max_prob, 1);
        let max_class = Tensor::stack(&max_class, 1);
        let (_, pred_group) = max_prob.max_dim(1, false);
        let pred_class = max_class
            .gather(1, &pred_group.unsqueeze(1), false)
            .squeeze_dim(1);
        let (true_class, true_group) = targets.max_dim(1, false);
        Ok(pred_group
            .eq_tensor(&true_group)
            .logical_and(&pred_class.eq_tensor(&true_class)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ood::testutil::{check_each, fixture, get, to_vec, Rng, U32};

    const TAXONOMY: [i64; 8] = [398, 521, 9, 7, 52, 8, 3, 2];

    #[test]
    fn layout_of_the_imagenet_config() {
        let s = GroupSlices::new(&TAXONOMY).unwrap();
        assert_eq!(s.num_groups(), 8);
        assert_eq!(s.total_logits(), 1008);
        assert_eq!(s.num_classes(), 1000);
        assert_eq!(s.range(0), (0, 399));
        assert_eq!(s.range(1), (399, 921));
        assert_eq!(s.range(7), (1005, 1008));
        assert_eq!(s.classes_per_group(), &TAXONOMY);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for bad in [&[][..], &[3, 0, 2], &[4, -1], &[i64::MAX, 1]] {
            let err = GroupSlices::new(bad).unwrap_err().to_string();
            assert!(err.starts_with("group config:"), "{bad:?}: {err}");
        }
    }

    /// Per row and group of logits [N, total] (float32 values): the largest |z| of
    /// the group's slice, the relative rounding bound of its float32 softmax
    /// probabilities on both sides (z - max shifts exponents by <= 2 u32 |z|, in
    /// numerator and denominator; exp within 1 ulp, 2 u32, twice; the n + 1 term sum
    /// and the division n + 1 roundings), the group's best class probability in
    /// float64 and its log-sum-exp.
    struct GroupRow {
        rel: f64,
        best: f64,
        lse: f64,
        zmax: f64,
    }

    fn group_rows(s: &GroupSlices, logits: &Tensor) -> Vec<Vec<GroupRow>> {
        let z = to_vec(logits);
        let total = s.total_logits() as usize;
        z.chunks(total)
            .map(|row| {
                (0..s.num_groups())
                    .map(|g| {
                        let (a, b) = s.range(g);
                        let slice = &row[a as usize..b as usize];
                        let m = slice.iter().cloned().fold(f64::MIN, f64::max);
                        let zmax = slice.iter().fold(0.0f64, |x, v| x.max(v.abs()));
                        let sum: f64 = slice.iter().map(|v| (v - m).exp()).sum();
                        let best = slice[1..]
                            .iter()
                            .map(|v| (v - m).exp() / sum)
                            .fold(0.0, f64::max);
                        let rel = 2.0 * U32 * (4.0 * zmax + slice.len() as f64 + 5.0);
                        GroupRow {
                            rel,
                            best,
                            lse: m + sum.ln(),
                            zmax,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Checks every function against make_ood_fixtures.py for config `c`.
    fn check_case(c: &str) {
        let t = fixture("group.safetensors");
        let config = Vec::<i64>::try_from(get(&t, &format!("{c}_config"))).unwrap();
        let s = GroupSlices::new(&config).unwrap();
        let logits = get(&t, &format!("{c}_logits"));
        let targets = get(&t, &format!("{c}_targets"));
        let rows = group_rows(&s, &logits);
        // Softmax probabilities: relative to themselves (exp keeps relative
        // errors), by the row and group's bound; below float32's smallest normal
        // number absolutely, by its subnormal spacing 2^-149 on each side.
        let tiny = 2.0 * 2f64.powi(-149);
        let others = s.others_probs(&logits).unwrap();
        let want = to_vec(&get(&t, &format!("{c}_others")));
        let errs: Vec<f64> = to_vec(&others)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let g = s.num_groups();
        let tols: Vec<f64> = (0..errs.len())
            .map(|i| rows[i / g][i % g].rel * want[i].abs() + tiny)
            .collect();
        check_each(&format!("{c} others"), &errs, &tols);
        let mos = s.mos_score(&logits).unwrap();
        assert_eq!(mos.kind(), Kind::Float);
        let want = to_vec(&get(&t, &format!("{c}_mos")));
        let errs: Vec<f64> = to_vec(&mos)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let tols: Vec<f64> = (0..errs.len())
            .map(|i| {
                let rel = rows[i].iter().map(|r| r.rel).fold(0.0, f64::max);
                rel * want[i].abs() + tiny
            })
            .collect();
        check_each(&format!("{c} mos"), &errs, &tols);
        let loss = s.group_loss(&logits, &targets).unwrap();
        assert_eq!(loss.size(), Vec::<i64>::new());
        // Each cross-entropy lse - z_t rounds by u32 (2 |z| + lse + n + 3) on each
        // side, and the means and the sum over groups by u32 of their size.
        let n = rows.len() as f64;
        let want = get(&t, &format!("{c}_loss")).double_value(&[]);
        let tol: f64 = rows
            .iter()
            .flatten()
            .map(|r| r.rel * (r.zmax + r.lse.abs()) / n)
            .sum::<f64>()
            + 2.0 * (n + g as f64) * U32 * want.abs();
        check_each(
            &format!("{c} loss"),
            &[(loss.double_value(&[]) - want).abs()],
            &[tol],
        );
        let acc = s.group_accuracy(&logits, &targets).unwrap();
        assert_eq!(acc.kind(), Kind::Bool);
        let want = Vec::<i64>::try_from(get(&t, &format!("{c}_acc"))).unwrap();
        let got = Vec::<i64>::try_from(acc.to_kind(Kind::Int64)).unwrap();
        assert_eq!(got, want, "{c} accuracy");
        // The fixtures hold both outcomes.
        assert!(want.contains(&0) && want.contains(&1));
        // Rows 0-5 of "a" are exact ties by construction (the same float32 values);
        // every other row's predicted group is decided by more than the rounding.
        let first = if c == "a" { 6 } else { 0 };
        for (i, row) in rows.iter().enumerate().skip(first) {
            let top = row.iter().map(|r| r.best).fold(0.0, f64::max);
            let winner = row.iter().position(|r| r.best == top).unwrap();
            for (h, r) in row.iter().enumerate().filter(|(h, _)| *h != winner) {
                let bound = row[winner].rel * top + r.rel * r.best;
                assert!(
                    top - r.best > 10.0 * bound,
                    "{c} row {i}: groups {winner} and {h} are near a tie"
                );
            }
            // And its class: the top two class logits of the group are apart.
            let (a, b) = s.range(winner);
            let z = to_vec(&logits.get(i as i64).narrow(0, a + 1, b - a - 1));
            let mut sorted = z.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            let gap = sorted[0] - sorted.get(1).copied().unwrap_or(f64::MIN);
            assert!(
                gap > 10.0 * row[winner].rel,
                "{c} row {i}: classes near a tie"
            );
        }
    }

    #[test]
    fn small_config_matches_pytorch() {
        check_case("a");
    }

    #[test]
    fn imagenet_config_matches_pytorch() {
        check_case("b");
    }

    #[test]
    fn ties_and_underflow() {
        // Rows of fixture "a": 0 uniform (group 3, class 1 wins), 1-2 every group
        // certain (tie -> group 0), 3-4 class tie in group 0 (-> class 1).
        let t = fixture("group.safetensors");
        let s = GroupSlices::new(&[4, 2, 3, 1]).unwrap();
        let logits = get(&t, "a_logits");
        let acc = s
            .group_accuracy(&logits, &get(&t, "a_targets"))
            .unwrap()
            .narrow(0, 0, 5);
        let acc = Vec::<bool>::try_from(acc).unwrap();
        assert_eq!(acc, [true, true, false, false, true]);
        // Row 5: "others" is certain in group 1 and underflows to 0 elsewhere.
        let mos = s.mos_score(&logits).unwrap();
        assert_eq!(mos.double_value(&[5]), 0.0);
        assert_eq!(mos.double_value(&[1]), 0.0);
    }

    #[test]
    fn loss_keeps_the_graph() {
        let s = GroupSlices::new(&[2, 1]).unwrap();
        let logits = Rng::new(1)
            .normal_tensor(&[3, 5], Kind::Float)
            .set_requires_grad(true);
        let targets = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 1]).reshape([3, 2]);
        let loss = s.group_loss(&logits, &targets).unwrap();
        loss.backward();
        assert_eq!(logits.grad().size(), [3, 5]);
        // Each group's softmax gradient sums to zero over its slice.
        let g = logits.grad();
        let sums = Tensor::stack(
            &[g.narrow(1, 0, 3).sum(None), g.narrow(1, 3, 2).sum(None)],
            0,
        );
        // Exactly 0 in exact arithmetic: softmax - onehot over 3 or 2 entries, each
        // <= 1 rounded by a few u32, over N = 3.
        assert!(sums.abs().max().double_value(&[]) <= 8.0 * U32);
    }

    #[test]
    fn bad_shapes_and_targets_are_errors() {
        let s = GroupSlices::new(&[2, 1]).unwrap();
        let opts = (Kind::Float, tch::Device::Cpu);
        let logits = Tensor::zeros([3, 5], opts);
        let err = s
            .mos_score(&Tensor::zeros([3, 6], opts))
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 5 columns"), "{err}");
        let err = s
            .mos_score(&Tensor::zeros([5], opts))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[N, C]"), "{err}");
        let targets = Tensor::zeros([3, 3], (Kind::Int64, tch::Device::Cpu));
        let err = s.group_loss(&logits, &targets).unwrap_err().to_string();
        assert!(err.contains("expected shape [3, 2]"), "{err}");
        let targets = Tensor::from_slice(&[0i64, 1, 3, 0, 0, 0]).reshape([3, 2]);
        let err = s.group_accuracy(&logits, &targets).unwrap_err().to_string();
        assert!(
            err.contains("sample 1, group 0 has target 3, outside 0..=2"),
            "{err}"
        );
        let targets = Tensor::from_slice(&[0i64, 1, 0, 0, 0, -1]).reshape([3, 2]);
        let err = s.group_loss(&logits, &targets).unwrap_err().to_string();
        assert!(err.contains("sample 2, group 1 has target -1"), "{err}");
        let err = s
            .group_loss(&logits, &Tensor::zeros([3, 2], opts))
            .unwrap_err()
            .to_string();
        assert!(err.contains("integer"), "{err}");
        let empty = Tensor::zeros([0, 5], opts);
        let none = Tensor::zeros([0, 2], (Kind::Int64, tch::Device::Cpu));
        assert!(s.group_loss(&empty, &none).is_err());
        assert_eq!(s.mos_score(&empty).unwrap().size(), [0]);
        assert_eq!(s.group_accuracy(&empty, &none).unwrap().size(), [0]);
    }
}
