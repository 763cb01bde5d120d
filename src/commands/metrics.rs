//! `mos metrics`: the metrics of a saved score file, as JSON on stdout.
use anyhow::{Context, Result};

use crate::cli::MetricsArgs;
use crate::metrics::ood_metrics;
use crate::pipeline::report::read_scores_csv;

pub fn run(args: &MetricsArgs) -> Result<()> {
    let (column, id, ood) = read_scores_csv(&args.scores, args.method.as_deref())?;
    let m = ood_metrics(&id, &ood)
        .with_context(|| format!("{}: column {column}", args.scores.display()))?;
    let out = serde_json::json!({
        "scores": args.scores,
        "method": column,
        "num_in": id.len(),
        "num_out": ood.len(),
        "auroc": m.auroc,
        "aupr_in": m.aupr_in,
        "aupr_out": m.aupr_out,
        "fpr95": m.fpr95,
        "fpr95_ood_positive": m.fpr95_ood_positive,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
