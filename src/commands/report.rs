//! `mos report`: the paper's table layout from one or more results.json files.
use anyhow::Result;

use crate::cli::ReportArgs;
use crate::pipeline::report::{paper_table, read_results};

pub fn run(args: &ReportArgs) -> Result<()> {
    let mut rows = Vec::new();
    for p in &args.results {
        let file = if p.is_dir() {
            p.join("results.json")
        } else {
            p.clone()
        };
        rows.extend(read_results(&file)?);
    }
    print!("{}", paper_table(&rows, args.format));
    Ok(())
}
