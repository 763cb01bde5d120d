//! Step 6 of `mos benchmark`, compare: the published numbers a run is checked
//! against (`--published`, docs/benchmark.md), read and checked before anything is
//! computed ([`read_published`]), and the measured rows side by side with them
//! ([`compare`], [`comparison_table`]).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::pipeline::report::MethodResult;
use crate::pipeline::vocab::canonical_name;

/// A published number with its tolerance (both in %).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedCell {
    pub method: String,
    /// The OOD set's name (its folder's base name).
    pub set: String,
    pub auroc: f64,
    pub fpr95: f64,
    pub auroc_tolerance: f64,
    pub fpr95_tolerance: f64,
    /// Where this cell comes from, when not from the file's `source` (e.g. a
    /// later paper's row on the same benchmark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A file of published numbers (`--published`; docs/benchmark.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Published {
    /// Where the numbers come from (shown in the report).
    pub source: String,
    /// Why the tolerances are what they are (shown in the report).
    #[serde(default)]
    pub tolerance_note: String,
    /// The setup the numbers were measured with, checked against the run's
    /// (a run of another model or transform cannot reproduce them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<PublishedSetup>,
    pub cells: Vec<PublishedCell>,
    /// Numbers published for this setup that the run is not checked against
    /// (another paper's copy of a checked row, a method the config cannot run as
    /// published, a secondary source): shown next to the measured rows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchecked: Vec<UncheckedCell>,
}

/// A published number shown but not checked (`unchecked` in a published file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UncheckedCell {
    /// A label; when it names a method `--score` knows, that method's measured
    /// row is shown beside it.
    pub method: String,
    pub set: String,
    /// In %; absent where the source prints no such number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fpr95: Option<f64>,
    /// Where the numbers come from.
    pub source: String,
    /// Why the run is not checked against them.
    pub why: String,
}

/// The model and transform published numbers were measured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedSetup {
    /// `--model`.
    pub model: String,
    /// `--crop`.
    pub crop: usize,
    /// `--resize` (torchvision's models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
}

/// The first setting of `setup` the run's (`model`, `crop`, `resize`) differs in,
/// as an error naming the file and the flag.
pub fn check_setup(
    setup: &PublishedSetup,
    path: &Path,
    model: &str,
    crop: usize,
    resize: Option<usize>,
) -> Result<()> {
    let diffs = [
        (
            "--model",
            setup.model.to_ascii_lowercase(),
            model.to_ascii_lowercase(),
        ),
        ("--crop", setup.crop.to_string(), crop.to_string()),
        (
            "--resize",
            setup.resize.map_or("none".into(), |r| r.to_string()),
            resize.map_or("none".into(), |r| r.to_string()),
        ),
    ];
    for (flag, published, run) in diffs {
        if published != run {
            bail!(
                "--published {}: its numbers were measured with {flag} {published}, this run has {flag} {run}; run with the published setup, or leave --published out",
                path.display()
            );
        }
    }
    Ok(())
}

/// The setup of published numbers against the stores' manifest (`mos score
/// --published`): the model, crop and resize the stores were extracted with. An
/// imported store records only the model name it was given (`imported:NAME`, compared
/// as NAME), not its transform: the returned line says the crop and resize were not
/// checked.
pub fn check_store_setup(
    setup: &PublishedSetup,
    path: &Path,
    manifest: &crate::pipeline::store::Manifest,
) -> Result<Option<String>> {
    use crate::pipeline::store::IMPORTED_PREFIX;
    match manifest.model.strip_prefix(IMPORTED_PREFIX) {
        Some(name) => {
            if !name.eq_ignore_ascii_case(&setup.model) {
                bail!(
                    "--published {}: its numbers were measured with --model {}, the stores were imported as {} (mos import --model-name)",
                    path.display(),
                    setup.model,
                    name
                );
            }
            Ok(Some(format!(
                "--published {}: the stores are imported, which records no transform, so its crop {} and resize {} are taken on trust",
                path.display(),
                setup.crop,
                setup.resize.map_or("none".into(), |r| r.to_string())
            )))
        }
        None => {
            check_setup(setup, path, &manifest.model, manifest.crop, manifest.resize)?;
            Ok(None)
        }
    }
}

/// Every `methods` x `sets` cell present in `p`, or an error naming the first missing.
pub fn check_coverage(p: &Published, path: &Path, methods: &[&str], sets: &[&str]) -> Result<()> {
    for m in methods {
        for set in sets {
            if !p.cells.iter().any(|c| c.method == *m && c.set == *set) {
                bail!(
                    "--published {}: no published number for {m} on {set} (both are run); add the cell, or leave the method or the set out",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Reads and checks a published-numbers file: canonical method names, finite
/// numbers in [0, 100], non-negative tolerances, no cell twice.
pub fn read_published(path: &Path) -> Result<Published> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--published: cannot read {}", path.display()))?;
    let mut p: Published = serde_json::from_str(&text).with_context(|| {
        format!(
            "--published {}: not a published-numbers file",
            path.display()
        )
    })?;
    for (i, c) in p.cells.iter_mut().enumerate() {
        let at = format!("{}: cells[{i}] ({} on {})", path.display(), c.method, c.set);
        let at = || at.clone();
        c.method = canonical_method(&c.method).with_context(at)?;
        for (what, v) in [("auroc", c.auroc), ("fpr95", c.fpr95)] {
            if !(0.0..=100.0).contains(&v) {
                bail!("{}: {what} {v} is not a percentage in [0, 100]", at());
            }
        }
        for (what, v) in [
            ("auroc_tolerance", c.auroc_tolerance),
            ("fpr95_tolerance", c.fpr95_tolerance),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                bail!("{}: {what} {v} must be a non-negative number", at());
            }
        }
    }
    for (i, c) in p.unchecked.iter_mut().enumerate() {
        let at = format!(
            "{}: unchecked[{i}] ({} on {})",
            path.display(),
            c.method,
            c.set
        );
        if c.method.trim().is_empty() || c.set.trim().is_empty() {
            bail!("{at}: method and set must be named");
        }
        if c.source.trim().is_empty() || c.why.trim().is_empty() {
            bail!("{at}: every unchecked number needs its source and why it is not checked");
        }
        if c.auroc.is_none() && c.fpr95.is_none() {
            bail!("{at}: neither auroc nor fpr95 is given");
        }
        for (what, v) in [("auroc", c.auroc), ("fpr95", c.fpr95)] {
            if let Some(v) = v {
                if !(0.0..=100.0).contains(&v) {
                    bail!("{at}: {what} {v} is not a percentage in [0, 100]");
                }
            }
        }
        if let Ok(name) = canonical_method(&c.method) {
            c.method = name;
        }
    }
    for (i, c) in p.unchecked.iter().enumerate() {
        if p.unchecked[..i]
            .iter()
            .any(|o| o.method == c.method && o.set == c.set && o.source == c.source)
        {
            bail!(
                "{}: two unchecked cells for {} on {} from one source",
                path.display(),
                c.method,
                c.set
            );
        }
    }
    for (i, c) in p.cells.iter().enumerate() {
        if p.cells[..i]
            .iter()
            .any(|o| o.method == c.method && o.set == c.set)
        {
            bail!(
                "{}: two cells for {} on {}",
                path.display(),
                c.method,
                c.set
            );
        }
    }
    Ok(p)
}

/// The results name of a method as `--score` spells it (e.g. `kl` -> `KL_Div`,
/// `gradnorm` -> `GradNorm`): every method `--score` knows.
fn canonical_method(name: &str) -> Result<String> {
    Ok(canonical_name(name)?.to_string())
}

/// One published cell against the measured one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub method: String,
    pub set: String,
    pub published_auroc: f64,
    pub measured_auroc: f64,
    pub published_fpr95: f64,
    pub measured_fpr95: f64,
    pub auroc_tolerance: f64,
    pub fpr95_tolerance: f64,
    pub within: bool,
}

/// Each measured row that has a published cell, against it.
pub fn compare(p: &Published, rows: &[MethodResult]) -> Vec<Comparison> {
    let mut out = Vec::new();
    for r in rows {
        let Some(c) = p
            .cells
            .iter()
            .find(|c| c.method == r.method && c.set == r.out_dataset)
        else {
            continue;
        };
        let (a, f) = (100.0 * r.auroc, 100.0 * r.fpr95);
        // Compared at the two decimals the paper prints.
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let within = (round(a) - c.auroc).abs() <= c.auroc_tolerance + 1e-9
            && (round(f) - c.fpr95).abs() <= c.fpr95_tolerance + 1e-9;
        out.push(Comparison {
            method: r.method.clone(),
            set: r.out_dataset.clone(),
            published_auroc: c.auroc,
            measured_auroc: a,
            published_fpr95: c.fpr95,
            measured_fpr95: f,
            auroc_tolerance: c.auroc_tolerance,
            fpr95_tolerance: c.fpr95_tolerance,
            within,
        });
    }
    out
}

/// The Markdown section of a report that sets `rows` against `p`: the sources, the
/// tolerances, the [`comparison_table`] with its count, and the unchecked numbers.
pub fn published_section(p: &Published, c: &[Comparison], rows: &[MethodResult]) -> String {
    let mut s = format!(
        "\n## Against the published numbers\n\nSource: {}\n\n",
        p.source
    );
    let mut others: Vec<(&str, &str)> = Vec::new();
    for cell in &p.cells {
        if let Some(src) = &cell.source {
            if !others.contains(&(cell.method.as_str(), src.as_str())) {
                others.push((&cell.method, src));
            }
        }
    }
    for (method, src) in others {
        s.push_str(&format!("Source of {method}'s cells: {src}\n\n"));
    }
    if !p.tolerance_note.is_empty() {
        s.push_str(&format!("Tolerances: {}\n\n", p.tolerance_note));
    }
    s.push_str(&comparison_table(c));
    let ok = c.iter().filter(|c| c.within).count();
    s.push_str(&format!(
        "\n{ok} of {} cells within their tolerance.\n",
        c.len()
    ));
    if !p.unchecked.is_empty() {
        s.push_str("\n## Published elsewhere, not checked\n\n");
        s.push_str(&unchecked_table(p, rows));
    }
    s
}

/// The unchecked published numbers as Markdown, each beside the measured row of
/// the method it names when the run has one (`-` otherwise), grouped by source.
pub fn unchecked_table(p: &Published, rows: &[MethodResult]) -> String {
    let mut out = String::new();
    let mut sources: Vec<(&str, &str)> = Vec::new();
    for c in &p.unchecked {
        if !sources.contains(&(c.source.as_str(), c.why.as_str())) {
            sources.push((&c.source, &c.why));
        }
    }
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (i, (source, why)) in sources.iter().enumerate() {
        out.push_str(&format!(
            "{}. Source: {source}\n   Not checked: {why}\n\n",
            i + 1
        ));
    }
    out.push_str(
        "| Method | OOD set | AUROC published | measured | FPR95 published | measured | source |\n|---|---|---|---|---|---|---|\n",
    );
    for c in &p.unchecked {
        let measured = rows
            .iter()
            .find(|r| r.method == c.method && r.out_dataset == c.set);
        let src = 1 + sources
            .iter()
            .position(|s| *s == (c.source.as_str(), c.why.as_str()))
            .unwrap_or(0);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {src} |\n",
            c.method,
            c.set,
            num(c.auroc),
            num(measured.map(|r| 100.0 * r.auroc)),
            num(c.fpr95),
            num(measured.map(|r| 100.0 * r.fpr95)),
        ));
    }
    out
}

/// Prints the side-by-side table of `c` and the verdict: an error when a cell is
/// outside its tolerance (the commands' exit status 1), naming `report`.
pub fn verdict(c: &[Comparison], report: &Path) -> Result<()> {
    print!("\n{}", comparison_table(c));
    let outside = c.iter().filter(|c| !c.within).count();
    if outside > 0 {
        bail!(
            "{outside} of {} published cells are outside their tolerance (see {})",
            c.len(),
            report.display()
        );
    }
    println!(
        "all {} published cells within their tolerance ({})",
        c.len(),
        report.display()
    );
    Ok(())
}

/// The side-by-side table of [`compare`] as Markdown.
pub fn comparison_table(c: &[Comparison]) -> String {
    let mut out = String::from(
        "| Method | OOD set | AUROC published | measured | difference | tolerance | FPR95 published | measured | difference | tolerance | within |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in c {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:+.2} | {:.2} | {:.2} | {:.2} | {:+.2} | {:.2} | {} |\n",
            c.method,
            c.set,
            c.published_auroc,
            c.measured_auroc,
            c.measured_auroc - c.published_auroc,
            c.auroc_tolerance,
            c.published_fpr95,
            c.measured_fpr95,
            c.measured_fpr95 - c.published_fpr95,
            c.fpr95_tolerance,
            if c.within { "yes" } else { "**no**" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, set: &str, auroc: f64, fpr95: f64) -> MethodResult {
        MethodResult {
            method: method.into(),
            in_dataset: "val".into(),
            out_dataset: set.into(),
            num_in: 1,
            num_out: 1,
            auroc,
            aupr_in: 0.0,
            aupr_out: 0.0,
            fpr95,
            fpr95_ood_positive: 0.0,
            seconds: 0.0,
            skipped: 0,
            model: "m".into(),
            model_path: "p".into(),
            settings: serde_json::Value::Null,
        }
    }

    #[test]
    fn comparison_uses_each_cells_tolerance() {
        let cell = |m: &str, a, f, ta, tf| PublishedCell {
            method: m.into(),
            set: "SUN".into(),
            auroc: a,
            fpr95: f,
            auroc_tolerance: ta,
            fpr95_tolerance: tf,
            source: None,
        };
        let p = Published {
            source: "s".into(),
            tolerance_note: String::new(),
            setup: None,
            cells: vec![
                cell("MSP", 80.0, 70.0, 1.0, 2.0),
                cell("MOS", 90.0, 40.0, 0.5, 0.5),
            ],
            unchecked: vec![],
        };
        // MSP: 80.9 within 1.0, 71.5 within 2.0; MOS: 90.6 outside 0.5.
        let rows = [
            row("MSP", "SUN", 0.809, 0.715),
            row("MOS", "SUN", 0.906, 0.40),
            row("Energy", "SUN", 0.5, 0.5),
        ];
        let c = compare(&p, &rows);
        assert_eq!(
            c.len(),
            2,
            "a method without a published cell is not compared"
        );
        assert!(c[0].within);
        assert!(!c[1].within);
        let t = comparison_table(&c);
        assert!(
            t.contains("| MOS | SUN | 90.00 | 90.60 | +0.60 | 0.50 |"),
            "{t}"
        );
    }

    #[test]
    fn published_file_errors_name_the_cell() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        let write = |t: &str| std::fs::write(&f, t).unwrap();
        write(
            r#"{"source": "x", "cells": [{"method": "KL", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        assert_eq!(read_published(&f).unwrap().cells[0].method, "KL_Div");
        // Every method --score knows, post-hoc ones included, with a cell's source.
        write(
            r#"{"source": "x", "cells": [{"method": "gradnorm", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1, "source": "y"},
                {"method": "ash_s", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        let p = read_published(&f).unwrap();
        assert_eq!(
            (p.cells[0].method.as_str(), p.cells[0].source.as_deref()),
            ("GradNorm", Some("y"))
        );
        assert_eq!(
            (p.cells[1].method.as_str(), p.cells[1].source.as_deref()),
            ("ASH-S", None)
        );
        write(
            r#"{"source": "x", "cells": [{"method": "Foo", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        let e = format!("{:#}", read_published(&f).unwrap_err());
        assert!(
            e.contains("cells[0] (Foo on SUN)") && e.contains("unknown score 'Foo'"),
            "{e}"
        );
        write(
            r#"{"source": "x", "cells": [{"method": "MSP", "set": "SUN", "auroc": 150, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}]}"#,
        );
        let e = format!("{:#}", read_published(&f).unwrap_err());
        assert!(e.contains("auroc 150 is not a percentage"), "{e}");
        write(r#"{"source": "x", "cels": []}"#);
        let e = format!("{:#}", read_published(&f).unwrap_err());
        assert!(e.contains("unknown field `cels`"), "{e}");
    }

    #[test]
    fn unchecked_numbers_are_read_checked_and_shown_beside_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        let write = |t: &str| std::fs::write(&f, t).unwrap();
        let with = |u: &str| {
            format!(
                r#"{{"source": "x", "cells": [{{"method": "MSP", "set": "SUN", "auroc": 50, "fpr95": 50, "auroc_tolerance": 1, "fpr95_tolerance": 1}}], "unchecked": [{u}]}}"#
            )
        };
        write(&with(
            r#"{"method": "odin", "set": "SUN", "auroc": 86.89, "fpr95": 53.97, "source": "a later paper", "why": "a copy"},
               {"method": "DICE+ReAct", "set": "SUN", "auroc": 93.94, "source": "b", "why": "not run"}"#,
        ));
        let p = read_published(&f).unwrap();
        // A method --score knows is named as results name it; another label stays.
        assert_eq!(p.unchecked[0].method, "ODIN");
        assert_eq!(p.unchecked[1].method, "DICE+ReAct");
        let t = unchecked_table(&p, &[row("ODIN", "SUN", 0.8512, 0.6011)]);
        assert!(
            t.contains("| ODIN | SUN | 86.89 | 85.12 | 53.97 | 60.11 | 1 |"),
            "{t}"
        );
        assert!(
            t.contains("| DICE+ReAct | SUN | 93.94 | - | - | - | 2 |"),
            "{t}"
        );
        assert!(t.contains("2. Source: b\n   Not checked: not run"), "{t}");
        // Unchecked numbers are not compared.
        assert!(compare(&p, &[row("ODIN", "SUN", 0.5, 0.5)]).is_empty());
        for (u, want) in [
            (
                r#"{"method": "ODIN", "set": "SUN", "auroc": 101, "source": "a", "why": "b"}"#,
                "unchecked[0] (ODIN on SUN): auroc 101 is not a percentage",
            ),
            (
                r#"{"method": "ODIN", "set": "SUN", "auroc": 80, "source": "", "why": "b"}"#,
                "needs its source and why it is not checked",
            ),
            (
                r#"{"method": "ODIN", "set": "SUN", "source": "a", "why": "b"}"#,
                "neither auroc nor fpr95 is given",
            ),
            (
                r#"{"method": "ODIN", "set": "SUN", "auroc": 80, "source": "a", "why": "b"},
                   {"method": "odin", "set": "SUN", "auroc": 81, "source": "a", "why": "c"}"#,
                "two unchecked cells for ODIN on SUN from one source",
            ),
        ] {
            write(&with(u));
            let e = format!("{:#}", read_published(&f).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_published_setup_is_checked_against_the_run() {
        let setup = PublishedSetup {
            model: "resnet50".into(),
            crop: 224,
            resize: Some(256),
        };
        let f = Path::new("p.json");
        check_setup(&setup, f, "resnet50", 224, Some(256)).unwrap();
        check_setup(&setup, f, "ResNet50", 224, Some(256)).unwrap();
        let e = check_setup(&setup, f, "resnet50", 256, Some(292))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("measured with --crop 224, this run has --crop 256"),
            "{e}"
        );
        let e = check_setup(&setup, f, "BiT-S-R101x1", 480, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--model resnet50, this run has --model bit-s-r101x1"),
            "{e}"
        );
        let bit = PublishedSetup {
            model: "BiT-S-R101x1".into(),
            crop: 480,
            resize: None,
        };
        let e = check_setup(&bit, f, "BiT-S-R101x1", 480, Some(512))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--resize none, this run has --resize 512"),
            "{e}"
        );
    }
}
