//! `mos extract`: one shard of a feature store (docs/cluster.md): the images of
//! the shard through the network once, their outputs written to the store.
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::ExtractArgs;
use crate::data::loader::Item;
use crate::data::{read_flat_list, ImageFolder};
use crate::model::weights::{load_network, resolve_weight_path};
use crate::pipeline::extract::{extract_range, ExtractOptions};
use crate::pipeline::store::{self, Manifest};
use crate::pipeline::vocab::Layers;
use crate::runlog::RunLog;
use crate::runtime::{device_name, value_name};

/// The data set: items in dataset order, paths relative to the data directory,
/// the number of classes.
fn read_data(args: &ExtractArgs) -> Result<(Vec<Item>, Vec<String>, i64)> {
    let rel = |p: &std::path::Path| -> String {
        p.strip_prefix(&args.datadir)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let (items, classes): (Vec<Item>, i64) = match &args.list {
        Some(list) => {
            let entries = read_flat_list(list, &args.datadir).context("--list")?;
            let classes = 1 + entries.iter().map(|e| e.label as i64).max().unwrap_or(-1);
            let items = entries
                .into_iter()
                .map(|e| Item {
                    path: e.path,
                    target: vec![e.label as i64],
                })
                .collect();
            (items, classes)
        }
        None => {
            let folder = ImageFolder::new(&args.datadir)
                .with_context(|| format!("--datadir {}", args.datadir.display()))?;
            (folder.items(), folder.classes.len() as i64)
        }
    };
    let paths = items.iter().map(|i| rel(&i.path)).collect();
    Ok((items, paths, classes))
}

/// The command line without the shard flags, for the store's messages.
fn command_without_shard_flags() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args();
    out.push("mos".to_string());
    args.next();
    while let Some(a) = args.next() {
        if a == "--num-shards" || a == "--shard-index" {
            args.next();
        } else if !(a.starts_with("--num-shards=") || a.starts_with("--shard-index=")) {
            out.push(a);
        }
    }
    out
}

pub fn run(args: &ExtractArgs) -> Result<()> {
    let shard = store::resolve_shard(args.num_shards, args.shard_index, &|k| {
        std::env::var(k).ok()
    })?;
    let mut layers = Layers::parse(&args.layers)?;
    if let Some(n) = args.rankfeat_power_iterations {
        if !layers.rankfeat || n == 0 {
            anyhow::bail!(
                "--rankfeat-power-iterations {n}: give at least 1 iteration, with --layers ...,rankfeat"
            );
        }
        layers.rankfeat_power_iterations = n;
    }
    if layers.mahalanobis {
        args.model
            .model
            .require_feature_layers("--layers mahalanobis")
            .map_err(anyhow::Error::msg)?;
    }
    if args.batch == 0 || args.workers == 0 {
        anyhow::bail!(
            "--batch ({}) and --workers ({}) must be at least 1",
            args.batch,
            args.workers
        );
    }
    let device = args.device.device.resolve()?;
    let (items, rel_paths, num_classes) = read_data(args)?;
    let labelled: Vec<(String, i64)> = rel_paths
        .iter()
        .zip(&items)
        .map(|(p, i)| (p.clone(), i.target[0]))
        .collect();
    let data_fingerprint = store::data_fingerprint(&args.datadir, &labelled)?;
    let weights = resolve_weight_path(&args.model_path)?;
    let checkpoint_sha256 = store::sha256_file(&weights)?;
    let transform = args.transform.resolve(args.model.model)?;
    let script = args.transform.script_spec(args.model.model);
    let mut loaded = load_network(&weights, args.model.model, script.as_ref(), None, device)?;
    loaded
        .model
        .set_precision(args.precision)
        .map_err(anyhow::Error::msg)?;
    let dataset = args
        .datadir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| args.datadir.display().to_string());
    let mut manifest = Manifest {
        format: store::FORMAT.into(),
        mos_version: env!("CARGO_PKG_VERSION").into(),
        model: args.model.model.name.into(),
        checkpoint: args.model_path.display().to_string(),
        checkpoint_sha256,
        checkpoint_format: loaded.state.format.to_string(),
        head_size: loaded.model.head_size(),
        num_classes,
        crop: transform.size(),
        batch: args.batch,
        precision: value_name(&args.precision),
        skip_bad_images: args.skip_bad_images,
        layers: layers.names(),
        datadir: args.datadir.display().to_string(),
        list: args.list.as_ref().map(|l| l.display().to_string()),
        dataset,
        images: items.len(),
        data_fingerprint,
        num_shards: shard.count,
        fingerprint: String::new(),
        command: command_without_shard_flags(),
        complete: false,
        group_config: loaded.state.group_config().map(<[i64]>::to_vec),
        resize: transform.resize(),
        feature_dim: None,
        imported: None,
        mean: None,
        std: None,
        head: None,
        rankfeat_power_iterations: args.rankfeat_power_iterations,
    };
    if let Some(s) = &script {
        manifest.record_script(&transform, &s.head, loaded.model.feature_dim());
    }
    manifest.fingerprint = manifest.compute_fingerprint();
    // A new store whose extraction fails before its shard is written is taken away
    // again (new_store's drop), so that the retry the error suggests is not refused.
    let (manifest, new_store) = store::prepare_new(&args.output, &manifest, "another --output")?;
    let log = RunLog::open(&args.output, store::LOG)?;
    let (k, n) = (shard.index, shard.count);
    let stem = store::shard_stem(k, n);
    match store::complete_shard(&args.output, &manifest, k)? {
        store::ShardStatus::Complete(idx) => {
            log.line(format!(
                "shard {k} of {n} ({stem}, {} images) is already complete: skipped",
                idx.rows
            ));
            if let Some(s) = new_store {
                s.keep();
            }
            return Ok(());
        }
        store::ShardStatus::Damaged(why) => {
            log.line(format!(
                "shard {k} of {n} ({stem}) fails verification, extracting it again: {why}"
            ));
        }
        store::ShardStatus::Absent => {}
    }
    let range = store::shard_range(items.len(), n, k);
    log.line(format!(
        "mos extract: shard {k} of {n} ({}), images {}..{} of {} in {}, model {} from {} ({}), head {}, layers {}, crop {}, batch {}, on {}",
        shard.source,
        range.start,
        range.end,
        items.len(),
        args.datadir.display(),
        args.model.model.name,
        args.model_path.display(),
        manifest.checkpoint_format,
        manifest.head_size,
        manifest.layers.join(","),
        transform.size(),
        args.batch,
        device_name(device)
    ));
    let started = Instant::now();
    let bar = crate::progress::bar(range.len() as u64, "extract");
    let opts = ExtractOptions {
        batch: args.batch,
        workers: args.workers,
        transform,
        skip_bad: args.skip_bad_images,
        device,
        layers,
    };
    let extracted = extract_range(&loaded.model, &items, range.clone(), &opts, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    for (i, s) in &extracted.skipped {
        log.line(crate::pipeline::extract::skip_line(*i, s));
    }
    let secs = started.elapsed().as_secs_f64();
    let idx = store::write_shard(
        &args.output,
        &manifest,
        k,
        &extracted,
        &rel_paths,
        &device_name(device),
    )?;
    if let Some(s) = new_store {
        s.keep();
    }
    log.line(format!(
        "wrote {} ({} rows, {} skipped, {} bytes) in {secs:.1} s ({:.1} images/s)",
        args.output.join(&idx.file).display(),
        idx.rows,
        idx.skipped.len(),
        idx.bytes,
        range.len() as f64 / secs.max(1e-9)
    ));
    Ok(())
}
