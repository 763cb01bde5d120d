//! Step 7 of `mos benchmark`, report: the rows merged into `results.json`, the
//! readable table on stdout, and `report.md` (the paper's layout, the published
//! numbers side by side, where the time went); the comparison of step 6
//! ([`super::published::compare`]) is made here, on the rows just written.
use std::time::Instant;

use anyhow::Result;

use super::passes::Stages;
use super::published::{compare, published_section, Comparison, Published};
use super::{BenchmarkOutcome, BenchmarkRequest};
use crate::pipeline::report::{merge_results, paper_table, table, MethodResult, ReportFormat};
use crate::runlog::RunLog;

/// Steps 6 and 7: compares `rows` with `published` and writes the results and
/// the report; `started` is when the extraction began.
pub(super) fn report(
    req: &BenchmarkRequest,
    rows: Vec<MethodResult>,
    published: Option<&Published>,
    stages: &Stages,
    started: Instant,
    log: &RunLog,
) -> Result<BenchmarkOutcome> {
    let results = req.run_dir.join("results.json");
    merge_results(&results, &rows)?;
    print!("{}", table(&rows));
    let comparison = published.map(|p| compare(p, &rows));
    let total = started.elapsed().as_secs_f64();
    let report = req.run_dir.join("report.md");
    let text = report_markdown(req, &rows, published, comparison.as_deref(), stages, total);
    crate::model::checkpoint::write_atomic(&report, text.as_bytes())?;
    for (what, secs) in stages {
        log.line(format!("time: {what}: {secs:.2} s"));
    }
    log.line(format!(
        "results in {} and {} ({total:.2} s in all)",
        results.display(),
        report.display()
    ));
    Ok(BenchmarkOutcome {
        rows,
        comparison,
        report,
        results,
    })
}

fn report_markdown(
    req: &BenchmarkRequest,
    rows: &[MethodResult],
    published: Option<&Published>,
    comparison: Option<&[Comparison]>,
    stages: &[(String, f64)],
    total: f64,
) -> String {
    let mut s = format!(
        "# Benchmark: {}\n\nIn-distribution {} ({} images); model {}, crop {}, batch {}, device {}.\n\n## AUROC / FPR95 (%), FPR95 at 95% ID recall\n\n",
        req.run_dir.display(),
        rows.first().map_or("", |r| r.in_dataset.as_str()),
        rows.first().map_or(0, |r| r.num_in),
        req.model.name,
        req.crop,
        req.batch,
        crate::runtime::device_name(req.device)
    );
    s.push_str(&paper_table(rows, ReportFormat::Markdown));
    if let (Some(p), Some(c)) = (published, comparison) {
        s.push_str(&published_section(p, c, rows));
    }
    s.push_str("\n## Where the time went\n\n| stage | seconds |\n|---|---|\n");
    for (what, secs) in stages {
        s.push_str(&format!("| {what} | {secs:.2} |\n"));
    }
    s.push_str(&format!("| total | {total:.2} |\n"));
    s
}
