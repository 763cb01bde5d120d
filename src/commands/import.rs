//! `mos import`: a feature store from arrays computed anywhere
//! ([`crate::pipeline::import`]).
use anyhow::Result;

use crate::cli::ImportArgs;
use crate::pipeline::import::{self, ArraySource, ImportRequest, Written, ROLES};
use crate::pipeline::store;
use crate::runlog::RunLog;

pub fn run(args: &ImportArgs) -> Result<()> {
    let given = [
        &args.logits,
        &args.features,
        &args.labels,
        &args.head_weight,
        &args.head_bias,
    ];
    let sources: Vec<(&'static str, ArraySource)> = ROLES
        .iter()
        .zip(given)
        .filter_map(|(role, flag)| flag.clone().map(|src| (*role, src)))
        .collect();
    let dataset = args.dataset.clone().unwrap_or_else(|| {
        args.output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| args.output.display().to_string())
    });
    let req = ImportRequest {
        sources,
        arrays: args.arrays.clone(),
        paths: args.paths.clone(),
        no_labels: args.no_labels,
        model_name: args.model_name.clone(),
        dataset,
        datadir: args
            .datadir
            .as_ref()
            .map_or(String::new(), |d| d.display().to_string()),
        num_classes: args.num_classes,
        batch: args.batch,
        command: std::env::args().collect(),
    };
    let checked = import::check(&req)?;
    let written = import::write(&args.output, &checked)?;
    let log = RunLog::open(&args.output, store::LOG)?;
    let m = &checked.manifest;
    for a in &m
        .imported
        .as_ref()
        .map_or(&[][..], |r| &r.arrays[..])
        .to_vec()
    {
        log.line(format!(
            "imported {} from {}{} ({} {:?}, SHA-256 {})",
            a.array,
            a.file,
            a.key.as_ref().map_or(String::new(), |k| format!(":{k}")),
            a.dtype,
            a.shape,
            a.sha256
        ));
    }
    for n in &checked.notes {
        log.line(n.clone());
    }
    match written {
        Written::Store(idx) => log.line(format!(
            "mos import: wrote {} ({} rows of {} logits{}, {} classes, model {}){}",
            args.output.display(),
            idx.rows,
            m.head_size,
            m.feature_dim
                .map_or(String::new(), |d| format!(" and {d} features")),
            m.num_classes,
            m.model,
            if checked.head.is_some() {
                format!(", head in {}", store::HEAD_FILE)
            } else {
                String::new()
            }
        )),
        Written::AlreadyThere => log.line(format!(
            "mos import: {} already holds this import: nothing written",
            args.output.display()
        )),
    }
    Ok(())
}
