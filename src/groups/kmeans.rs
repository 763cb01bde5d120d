//! k-means for the `kmeans` grouping of `mos make-groups`: k-means++ seeding
//! (Arthur & Vassilvitskii 2007: the first centre uniform, each next one drawn
//! with probability proportional to the squared distance to the nearest centre
//! chosen) and Lloyd iterations until no assignment changes, restarted from
//! several seeds, keeping the lowest inertia. The points are class means (a
//! thousand or so), so plain f64 loops serve.
use anyhow::{bail, Result};

use crate::data::transform::Rng;

/// A clustering of `n` points into `k` clusters.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// The cluster of each point, in `0..k`.
    pub labels: Vec<usize>,
    /// `k` centres of `d` values, row-major.
    pub centers: Vec<f64>,
    /// Sum of squared distances of the points to their centres.
    pub inertia: f64,
    /// Lloyd iterations run.
    pub iterations: usize,
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The nearest centre of each point (the lowest index on a tie) and its distance.
fn assign(x: &[f64], d: usize, centers: &[f64]) -> Vec<(usize, f64)> {
    x.chunks(d)
        .map(|p| {
            let mut best = (0, f64::INFINITY);
            for (j, c) in centers.chunks(d).enumerate() {
                let e = dist2(p, c);
                if e < best.1 {
                    best = (j, e);
                }
            }
            best
        })
        .collect()
}

/// k-means++ initial centres (`k` rows of `x`, `d` columns).
pub fn plus_plus(x: &[f64], d: usize, k: usize, rng: &mut Rng) -> Vec<f64> {
    let n = x.len() / d;
    let mut centers = Vec::with_capacity(k * d);
    let first = rng.below(n as u64) as usize;
    centers.extend_from_slice(&x[first * d..(first + 1) * d]);
    let mut nearest: Vec<f64> = x.chunks(d).map(|p| dist2(p, &centers[..d])).collect();
    for _ in 1..k {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let r = rng.next_f64() * total;
            let mut acc = 0.0;
            let mut pick = n - 1;
            for (i, &w) in nearest.iter().enumerate() {
                acc += w;
                if r < acc {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            // All points coincide with a centre: any point will do.
            rng.below(n as u64) as usize
        };
        let c = &x[pick * d..(pick + 1) * d];
        centers.extend_from_slice(c);
        for (w, p) in nearest.iter_mut().zip(x.chunks(d)) {
            *w = w.min(dist2(p, c));
        }
    }
    centers
}

/// Lloyd iterations from `init` until no assignment changes (at most
/// `max_iter`). A cluster left empty takes the point farthest from its centre.
pub fn lloyd(x: &[f64], d: usize, init: &[f64], max_iter: usize) -> Clustering {
    let n = x.len() / d;
    let k = init.len() / d;
    let mut centers = init.to_vec();
    let mut labels: Vec<usize> = Vec::new();
    let mut iterations = 0;
    loop {
        let mut a = assign(x, d, &centers);
        let mut new: Vec<usize> = a.iter().map(|&(j, _)| j).collect();
        // Refill empty clusters from the points farthest from their centres.
        loop {
            let mut sizes = vec![0usize; k];
            for &j in &new {
                sizes[j] += 1;
            }
            let Some(empty) = sizes.iter().position(|&s| s == 0) else {
                break;
            };
            let far = (0..n)
                .filter(|&i| sizes[new[i]] > 1)
                .max_by(|&i, &j| a[i].1.total_cmp(&a[j].1).then(j.cmp(&i)))
                .expect("k <= n points");
            new[far] = empty;
            a[far].1 = 0.0;
        }
        // Centres: the means of their points.
        let mut sums = vec![0.0; k * d];
        let mut sizes = vec![0usize; k];
        for (p, &j) in x.chunks(d).zip(&new) {
            sizes[j] += 1;
            for (s, v) in sums[j * d..(j + 1) * d].iter_mut().zip(p) {
                *s += v;
            }
        }
        for (j, &s) in sizes.iter().enumerate() {
            for v in &mut sums[j * d..(j + 1) * d] {
                *v /= s as f64;
            }
        }
        centers = sums;
        iterations += 1;
        let done = new == labels || iterations >= max_iter;
        labels = new;
        if done {
            break;
        }
    }
    let inertia = x
        .chunks(d)
        .zip(&labels)
        .map(|(p, &j)| dist2(p, &centers[j * d..(j + 1) * d]))
        .sum();
    Clustering {
        labels,
        centers,
        inertia,
        iterations,
    }
}

/// The first non-finite value of the points `x` (`d` columns): (point, feature, value).
pub fn first_non_finite(x: &[f64], d: usize) -> Option<(usize, usize, f64)> {
    let i = x.iter().position(|v| !v.is_finite())?;
    Some((i / d.max(1), i % d.max(1), x[i]))
}

/// The best of `restarts` k-means++ runs (lowest inertia, the earliest on a
/// tie); restart r draws from `Rng::derive(seed, r)`. Points with a NaN or an
/// infinite value are refused (distances to them order nothing), and so is an
/// inertia that overflows.
pub fn kmeans(x: &[f64], d: usize, k: usize, restarts: usize, seed: u64) -> Result<Clustering> {
    if d == 0 || x.len() % d != 0 {
        bail!("k-means: {} values are not points of {d} features", x.len());
    }
    let n = x.len() / d;
    if k == 0 || k > n {
        bail!("k-means: {k} clusters of {n} points (it needs 1..={n})");
    }
    if let Some((i, j, v)) = first_non_finite(x, d) {
        bail!("k-means: point {i} has {v} in feature {j}; it needs finite values");
    }
    let mut best: Option<Clustering> = None;
    for r in 0..restarts.max(1) {
        let mut rng = Rng::derive(seed, r as u64);
        let init = plus_plus(x, d, k, &mut rng);
        let c = lloyd(x, d, &init, 300);
        if !c.inertia.is_finite() {
            bail!(
                "k-means: the inertia is {} (the points' squared distances overflow f64)",
                c.inertia
            );
        }
        if best
            .as_ref()
            .is_none_or(|b| c.inertia.total_cmp(&b.inertia).is_lt())
        {
            best = Some(c);
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("k-means: no restart ran"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases() -> Vec<serde_json::Value> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/groups/kmeans.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v["cases"].as_array().unwrap().clone()
    }

    fn matrix(v: &serde_json::Value) -> (Vec<f64>, usize) {
        let rows = v.as_array().unwrap();
        let d = rows[0].as_array().unwrap().len();
        let flat = rows
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        (flat, d)
    }

    #[test]
    fn lloyd_matches_scikit_learn_from_the_same_start() {
        for case in cases() {
            let (x, d) = matrix(&case["x"]);
            let (init, _) = matrix(&case["init"]);
            let (centers, _) = matrix(&case["centers"]);
            let got = lloyd(&x, d, &init, 300);
            let labels: Vec<usize> = case["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.labels, labels);
            // Means of at most 60 float64 values of order 10 and sums of squares of
            // them: a few ulps of 1e3 apart at most, scikit-learn summing in
            // another order and via |x|^2 - 2xc + |c|^2.
            for (a, b) in got.centers.iter().zip(&centers) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
            }
            let want = case["inertia"].as_f64().unwrap();
            assert!(
                (got.inertia - want).abs() <= 1e-9 * want,
                "{} vs {want}",
                got.inertia
            );
        }
    }

    #[test]
    fn restarts_are_seeded_and_find_separated_clusters() {
        // Three tight, far-apart blobs of 5 points in 2-D: any sane start finds them.
        let mut rng = Rng::new(7);
        let mut x = Vec::new();
        for blob in 0..3 {
            for _ in 0..5 {
                x.push(100.0 * blob as f64 + rng.next_f64());
                x.push(-50.0 * blob as f64 + rng.next_f64());
            }
        }
        let a = kmeans(&x, 2, 3, 5, 0).unwrap();
        assert_eq!(a, kmeans(&x, 2, 3, 5, 0).unwrap());
        for blob in 0..3 {
            let l = &a.labels[blob * 5..blob * 5 + 5];
            assert!(l.iter().all(|&j| j == l[0]), "{:?}", a.labels);
        }
        let mut distinct = a.labels.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
        // k-means++ picks k distinct points when there are that many.
        let init = plus_plus(&x, 2, 3, &mut Rng::new(1));
        assert!(init.chunks(2).all(|c| x.chunks(2).any(|p| p == c)));
        assert_ne!(&init[0..2], &init[2..4]);
    }

    #[test]
    fn non_finite_points_are_refused_by_name() {
        // One NaN among separated points: before, the NaN distances made every
        // restart's inertia NaN and a wrong grouping was kept.
        let mut x = vec![0.0, 0.1, 0.2, 10.0, 10.1, 10.2];
        x[4] = f64::NAN;
        let e = kmeans(&x, 1, 2, 3, 0).unwrap_err().to_string();
        assert!(e.contains("point 4 has NaN in feature 0"), "{e}");
        let mut y = vec![0.0, 1.0, 2.0, 3.0];
        y[3] = f64::INFINITY;
        let e = kmeans(&y, 2, 2, 3, 0).unwrap_err().to_string();
        assert!(e.contains("point 1 has inf in feature 1"), "{e}");
        assert_eq!(first_non_finite(&y, 2), Some((1, 1, f64::INFINITY)));
        assert_eq!(first_non_finite(&[1.0, 2.0], 2), None);
        // Finite points whose squared distances overflow.
        let e = kmeans(&[0.0, 1e200, -1e200], 1, 1, 1, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overflow"), "{e}");
        assert!(kmeans(&[0.0, 1.0], 1, 3, 1, 0).is_err());
    }

    #[test]
    fn empty_clusters_are_refilled() {
        // Two starting centres far from every point: the second gets no point.
        let x = vec![0.0, 1.0, 2.0, 10.0];
        let got = lloyd(&x, 1, &[1.0, 1000.0], 300);
        let mut sizes = [0; 2];
        for &l in &got.labels {
            sizes[l] += 1;
        }
        assert!(sizes.iter().all(|&s| s > 0), "{:?}", got.labels);
        assert_eq!(got.labels, vec![0, 0, 0, 1]);
    }
}
