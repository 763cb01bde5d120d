//! `mos merge STORE`: checks that every shard of a feature store is there, that
//! they cover the data set exactly once and share one fingerprint, verifies each
//! tensor file's SHA-256, and marks the store complete (docs/cluster.md).
use anyhow::Result;

use crate::cli::MergeArgs;
use crate::pipeline::store;
use crate::runlog::RunLog;

pub fn run(args: &MergeArgs) -> Result<()> {
    let checked = store::open(&args.store, true)?;
    let m = &checked.manifest;
    let rows: usize = checked.shards.iter().map(|s| s.rows).sum();
    let skipped: usize = checked.shards.iter().map(|s| s.skipped.len()).sum();
    let bytes: u64 = checked.shards.iter().map(|s| s.bytes).sum();
    store::mark_complete(&checked)?;
    let log = RunLog::open(&args.store, store::LOG)?;
    log.line(format!(
        "mos merge: {} complete: {} shards, {rows} rows of {} images ({skipped} skipped), {} from {} ({}), layers {}, {bytes} bytes ({:.0} bytes per row)",
        args.store.display(),
        m.num_shards,
        m.images,
        m.dataset,
        m.model,
        m.checkpoint,
        m.layers.join(","),
        bytes as f64 / rows.max(1) as f64
    ));
    Ok(())
}
