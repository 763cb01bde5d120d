//! Evaluation outputs: `results.json` (merged atomically with earlier rows of the
//! same run directory), the readable table, per-image score CSVs, and the paper's
//! table layout (`mos report`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::model::checkpoint::write_atomic;

/// The result of one method on one pair of sets (a row of `results.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MethodResult {
    pub method: String,
    pub in_dataset: String,
    pub out_dataset: String,
    pub num_in: usize,
    pub num_out: usize,
    pub auroc: f64,
    pub aupr_in: f64,
    pub aupr_out: f64,
    /// FPR at 95% ID recall (the paper's convention, ID positive).
    pub fpr95: f64,
    /// FPR at 95% OOD recall (OpenOOD v1.5's convention, OOD positive).
    pub fpr95_ood_positive: f64,
    pub seconds: f64,
    /// Images skipped as unreadable (`--skip-bad-images`), both sets.
    pub skipped: usize,
    pub model: String,
    pub model_path: String,
    pub settings: serde_json::Value,
}

/// Reads a `results.json` (an array of [`MethodResult`]).
pub fn read_results(path: &Path) -> Result<Vec<MethodResult>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a mos results.json", path.display()))
}

/// Adds `new` to the rows already in `path` (a row with the same method, ID set and
/// OOD set is replaced), writes the file atomically and returns all rows. A file
/// that exists but cannot be read is an error, never overwritten.
pub fn merge_results(path: &Path, new: &[MethodResult]) -> Result<Vec<MethodResult>> {
    let mut rows = if path.exists() {
        read_results(path)?
    } else {
        Vec::new()
    };
    for r in new {
        let same = |o: &MethodResult| {
            o.method == r.method && o.in_dataset == r.in_dataset && o.out_dataset == r.out_dataset
        };
        match rows.iter_mut().find(|o| same(o)) {
            Some(slot) => *slot = r.clone(),
            None => rows.push(r.clone()),
        }
    }
    write_atomic(
        path,
        (serde_json::to_string_pretty(&rows)? + "\n").as_bytes(),
    )?;
    Ok(rows)
}

/// The readable table of results (metrics in %).
pub fn table(rows: &[MethodResult]) -> String {
    let mut out = format!(
        "{:<12} {:<28} {:>7} {:>8} {:>8} {:>11} {:>12} {:>8} {:>7}\n",
        "method",
        "in -> out",
        "AUROC",
        "AUPR-In",
        "AUPR-Out",
        "FPR95(ID+)",
        "FPR95(OOD+)",
        "seconds",
        "skipped"
    );
    for r in rows {
        let sets = format!("{} -> {}", r.in_dataset, r.out_dataset);
        out.push_str(&format!(
            "{:<12} {:<28} {:>7.2} {:>8.2} {:>8.2} {:>11.2} {:>12.2} {:>8.1} {:>7}\n",
            r.method,
            sets,
            100.0 * r.auroc,
            100.0 * r.aupr_in,
            100.0 * r.aupr_out,
            100.0 * r.fpr95,
            100.0 * r.fpr95_ood_positive,
            r.seconds,
            r.skipped
        ));
    }
    out.push_str(
        "FPR95(ID+): the paper's FPR at 95% ID recall; FPR95(OOD+): OpenOOD v1.5's convention.\n",
    );
    out
}

/// Per-image scores of one set, for [`write_scores_csv`].
pub struct ScoreColumns<'a> {
    pub split: &'a str,
    pub paths: &'a [std::path::PathBuf],
    pub scores: &'a [Vec<f64>],
}

/// Writes `split,path,score` (or one score column per method, named after it),
/// atomically.
pub fn write_scores_csv(path: &Path, methods: &[&str], sets: &[ScoreColumns]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["split".to_string(), "path".to_string()];
    if methods.len() == 1 {
        header.push("score".into());
    } else {
        header.extend(methods.iter().map(|m| m.to_string()));
    }
    w.write_record(&header)?;
    for set in sets {
        for (i, p) in set.paths.iter().enumerate() {
            let mut rec = vec![set.split.to_string(), p.display().to_string()];
            rec.extend(set.scores.iter().map(|s| format!("{:?}", s[i])));
            w.write_record(&rec)?;
        }
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    write_atomic(path, &bytes)
}

/// Reads a score CSV written by [`write_scores_csv`]: for the column `method`
/// (`score` when the file has one score column; required when it has several)
/// returns (ID scores, OOD scores).
pub fn read_scores_csv(path: &Path, method: Option<&str>) -> Result<(String, Vec<f64>, Vec<f64>)> {
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let header: Vec<String> = r.headers()?.iter().map(str::to_string).collect();
    if header.len() < 3 || header[0] != "split" || header[1] != "path" {
        bail!(
            "{}: expected a header starting with split,path",
            path.display()
        );
    }
    let col = match method {
        Some(m) => header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(m) || (header.len() == 3 && h == "score"))
            .with_context(|| {
                format!(
                    "{}: no column '{m}' (columns: {})",
                    path.display(),
                    header[2..].join(", ")
                )
            })?,
        None if header.len() == 3 => 2,
        None => bail!(
            "{}: several score columns ({}); choose one with --method",
            path.display(),
            header[2..].join(", ")
        ),
    };
    let (mut id, mut ood) = (Vec::new(), Vec::new());
    for (i, rec) in r.records().enumerate() {
        let line = i + 2;
        let rec = rec.with_context(|| format!("{}:{line}", path.display()))?;
        let value: f64 = rec
            .get(col)
            .with_context(|| format!("{}:{line}: missing column {}", path.display(), col + 1))?
            .trim()
            .parse()
            .with_context(|| format!("{}:{line}: not a number", path.display()))?;
        match rec.get(0) {
            Some("in") => id.push(value),
            Some("out") => ood.push(value),
            other => bail!(
                "{}:{line}: split must be 'in' or 'out', got {:?}",
                path.display(),
                other.unwrap_or("")
            ),
        }
    }
    Ok((header[col].clone(), id, ood))
}

/// Output format of `mos report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Markdown,
    Csv,
    Latex,
}

/// The paper's Table 1 layout: one row per method, AUROC / FPR95 (%) per OOD set
/// and their averages. Rows keep the order methods first appear in.
pub fn paper_table(rows: &[MethodResult], format: ReportFormat) -> String {
    let mut methods: Vec<&str> = Vec::new();
    let mut sets: Vec<&str> = Vec::new();
    let mut cell: BTreeMap<(&str, &str), (f64, f64)> = BTreeMap::new();
    for r in rows {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
        if !sets.contains(&r.out_dataset.as_str()) {
            sets.push(&r.out_dataset);
        }
        cell.insert(
            (&r.method, &r.out_dataset),
            (100.0 * r.auroc, 100.0 * r.fpr95),
        );
    }
    let mut header = vec!["Method".to_string()];
    header.extend(sets.iter().map(|s| format!("{s} AUROC / FPR95")));
    header.push("Average AUROC / FPR95".into());
    let mut body = Vec::new();
    for m in &methods {
        let mut line = vec![m.to_string()];
        let (mut sa, mut sf, mut n) = (0.0, 0.0, 0);
        for s in &sets {
            match cell.get(&(*m, *s)) {
                Some((a, f)) => {
                    line.push(format!("{a:.2} / {f:.2}"));
                    sa += a;
                    sf += f;
                    n += 1;
                }
                None => line.push("-".into()),
            }
        }
        line.push(if n == sets.len() {
            format!("{:.2} / {:.2}", sa / n as f64, sf / n as f64)
        } else {
            "-".into()
        });
        body.push(line);
    }
    match format {
        ReportFormat::Markdown => {
            let mut out = format!(
                "| {} |\n|{}|\n",
                header.join(" | "),
                vec!["---"; header.len()].join("|")
            );
            for l in body {
                out.push_str(&format!("| {} |\n", l.join(" | ")));
            }
            out
        }
        ReportFormat::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let _ = w.write_record(&header);
            for l in &body {
                let _ = w.write_record(l);
            }
            String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
        }
        ReportFormat::Latex => {
            let esc = |s: &str| {
                s.replace('_', "\\_")
                    .replace('%', "\\%")
                    .replace('&', "\\&")
            };
            let mut out = format!(
                "\\begin{{tabular}}{{l{}}}\n\\toprule\n",
                "c".repeat(header.len() - 1)
            );
            out.push_str(
                &header
                    .iter()
                    .map(|h| esc(h))
                    .collect::<Vec<_>>()
                    .join(" & "),
            );
            out.push_str(" \\\\\n\\midrule\n");
            for l in body {
                out.push_str(&l.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" & "));
                out.push_str(" \\\\\n");
            }
            out.push_str("\\bottomrule\n\\end{tabular}\n");
            out
        }
    }
}

/// The score CSV of one OOD set: `--save-scores` itself with one OOD set,
/// else `<stem>_<OOD set>.csv` beside it.
pub fn csv_path(csv: &Path, num_ood: usize, ood_name: &str) -> PathBuf {
    if num_ood == 1 {
        return csv.to_path_buf();
    }
    let stem = csv
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = csv
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    csv.with_file_name(format!("{stem}_{ood_name}{ext}"))
}
