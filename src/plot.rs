//! Plots people would rather look at than read: the ID-vs-OOD score histogram and
//! the ROC curve of a method (SVG, drawn with plotters). Each is drawn in memory and
//! written atomically (a temporary file beside it, renamed): a full disk or a kill
//! leaves the previous plot or none, never a truncated one.
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::model::checkpoint::write_atomic;

const BINS: usize = 50;

fn finite_range(a: &[f64], b: &[f64]) -> (f64, f64) {
    let (lo, hi) = a
        .iter()
        .chain(b)
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// Fraction of `values` in each of [`BINS`] equal bins over [lo, hi].
fn density(values: &[f64], lo: f64, hi: f64) -> Vec<f64> {
    let mut counts = vec![0.0; BINS];
    let width = (hi - lo) / BINS as f64;
    for &v in values.iter().filter(|v| v.is_finite()) {
        let b = (((v - lo) / width) as usize).min(BINS - 1);
        counts[b] += 1.0;
    }
    let n = values.len().max(1) as f64;
    counts.iter().map(|c| c / n).collect()
}

/// Overlaid histograms of ID and OOD scores (fraction of each set per bin).
pub fn histogram(path: &Path, title: &str, id: &[f64], ood: &[f64]) -> Result<()> {
    draw_histogram(path, title, id, ood).with_context(|| cannot_write(path))
}

fn cannot_write(path: &Path) -> String {
    format!("cannot write the plot {}", path.display())
}

/// Draws an SVG of `size` with `draw`, then writes it to `path` atomically.
fn svg_file(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    write_atomic(path, svg.as_bytes())
}

fn draw_histogram(path: &Path, title: &str, id: &[f64], ood: &[f64]) -> Result<()> {
    let (lo, hi) = finite_range(id, ood);
    let (hid, hood) = (density(id, lo, hi), density(ood, lo, hi));
    let top = hid.iter().chain(&hood).cloned().fold(0.0, f64::max) * 1.1 + 1e-9;
    svg_file(path, (720, 440), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(lo..hi, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("score (higher = more in-distribution)")
            .y_desc("fraction of images")
            .draw()?;
        let width = (hi - lo) / BINS as f64;
        for (values, color, name) in [
            (&hid, BLUE, "in-distribution"),
            (&hood, RED, "out-of-distribution"),
        ] {
            chart
                .draw_series(values.iter().enumerate().map(|(b, &h)| {
                    let x0 = lo + b as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, h)], color.mix(0.35).filled())
                }))?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.5).filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// ROC points (FPR, TPR) with ID positive, one per distinct score threshold.
pub fn roc_points(id: &[f64], ood: &[f64]) -> Vec<(f64, f64)> {
    let mut all: Vec<(f64, bool)> = id
        .iter()
        .map(|&s| (s, true))
        .chain(ood.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (np, nn) = (id.len().max(1) as f64, ood.len().max(1) as f64);
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut pts = vec![(0.0, 0.0)];
    for (i, &(s, is_id)) in all.iter().enumerate() {
        if is_id {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        if all.get(i + 1).is_none_or(|next| next.0 != s) {
            pts.push((fp / nn, tp / np));
        }
    }
    pts
}

/// The ROC curve (ID positive) with its AUROC in the title.
pub fn roc(path: &Path, title: &str, id: &[f64], ood: &[f64]) -> Result<()> {
    draw_roc(path, title, id, ood).with_context(|| cannot_write(path))
}

fn draw_roc(path: &Path, title: &str, id: &[f64], ood: &[f64]) -> Result<()> {
    let pts = roc_points(id, ood);
    svg_file(path, (520, 520), |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("false positive rate (OOD accepted)")
            .y_desc("true positive rate (ID accepted)")
            .draw()?;
        chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))?;
        chart.draw_series(LineSeries::new(pts, BLUE.stroke_width(2)))?;
        Ok(())
    })
}

fn series(history: &[serde_json::Value], key: &str) -> Vec<(f64, f64)> {
    history
        .iter()
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

fn span(points: &[(f64, f64)]) -> (f64, f64) {
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| {
            (l.min(p.1), h.max(p.1))
        });
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi + 0.05 * (hi - lo))
    }
}

/// Training curves from `metrics.jsonl` records: loss (train and validation),
/// learning rate and validation top-1, one panel each.
pub fn training_curves(path: &Path, history: &[serde_json::Value]) -> Result<()> {
    draw_training_curves(path, history).with_context(|| cannot_write(path))
}

fn draw_training_curves(path: &Path, history: &[serde_json::Value]) -> Result<()> {
    let panels = [
        (
            "loss",
            vec![
                ("train loss", series(history, "loss"), BLUE),
                ("val loss", series(history, "val_loss"), RED),
            ],
        ),
        ("learning rate", vec![("lr", series(history, "lr"), GREEN)]),
        (
            "val top-1",
            vec![("val top-1", series(history, "val_top1"), MAGENTA)],
        ),
    ];
    let last_step = history
        .iter()
        .filter_map(|v| v.get("step")?.as_f64())
        .fold(1.0, f64::max);
    svg_file(path, (900, 780), |root| {
        root.fill(&WHITE)?;
        for (area, (title, lines)) in root.split_evenly((3, 1)).iter().zip(panels) {
            let all: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.1.clone()).collect();
            let (lo, hi) = span(&all);
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..last_step, lo..hi)?;
            chart.configure_mesh().x_desc("step").draw()?;
            for (name, points, color) in lines {
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_points_walk_thresholds_with_ties() {
        let pts = roc_points(&[3.0, 2.0, 2.0], &[2.0, 1.0]);
        assert_eq!(
            pts,
            vec![(0.0, 0.0), (0.0, 1.0 / 3.0), (0.5, 1.0), (1.0, 1.0)]
        );
    }

    #[test]
    fn an_unwritable_path_is_named_in_words() {
        let dir = tempfile::tempdir().unwrap();
        // A folder that cannot be made: "missing" is a file.
        std::fs::write(dir.path().join("missing"), "").unwrap();
        let path = dir.path().join("missing/h.svg");
        let e = format!("{:#}", histogram(&path, "MSP", &[1.0], &[0.0]).unwrap_err());
        assert!(e.starts_with("cannot write the plot "), "{e}");
        assert!(e.contains("missing/h.svg"), "{e}");
        // Display, not Debug: no `Os { code: .. }` or `kind: NotFound`.
        assert!(!e.contains("kind:") && !e.contains("Os {"), "{e}");
    }

    #[test]
    fn writes_svg_files() {
        let dir = tempfile::tempdir().unwrap();
        let id: Vec<f64> = (0..100).map(|i| i as f64 / 50.0).collect();
        let ood: Vec<f64> = (0..80).map(|i| i as f64 / 80.0 - 0.5).collect();
        let h = dir.path().join("h.svg");
        let r = dir.path().join("r.svg");
        let t = dir.path().join("t.svg");
        // Earlier plots, each with a second name (a hard link): an atomic write
        // replaces the name, so the link keeps the old bytes; a write in place would
        // change them (and a full disk would leave a truncated plot).
        for p in [&h, &r, &t] {
            std::fs::write(p, "old").unwrap();
            std::fs::hard_link(p, p.with_extension("old")).unwrap();
        }
        histogram(&h, "MSP", &id, &ood).unwrap();
        roc(&r, "MSP ROC", &id, &ood).unwrap();
        let history: Vec<serde_json::Value> = (0..5)
            .map(|i| serde_json::json!({"step": i, "loss": 1.0 / (1.0 + i as f64), "lr": 0.1}))
            .collect();
        training_curves(&t, &history).unwrap();
        for p in [h, r, t] {
            assert_eq!(
                std::fs::read_to_string(p.with_extension("old")).unwrap(),
                "old"
            );
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.starts_with("<svg") && text.contains("</svg>"),
                "{}",
                p.display()
            );
        }
        // No temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["h.old", "h.svg", "r.old", "r.svg", "t.old", "t.svg"]
        );
    }
}
