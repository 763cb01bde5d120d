//! `mos data-check`: images per class, unreadable files (exit 1 if any), loader
//! throughput, and optionally a dump of the first preprocessed images.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cli::DataCheckArgs;
use crate::data::loader::{load_batch, Item, Loader, LoaderOptions, Mode};
use crate::data::transform::{EvalTransform, TrainTransform};
use crate::data::{read_flat_list, read_group_list, ImageFolder};
use crate::groupconfig::read_group_config;
use crate::model::checkpoint::{serialize, write_atomic};

/// The items and a class name per label key, from a folder or a list.
fn items(args: &DataCheckArgs) -> Result<(Vec<Item>, BTreeMap<String, usize>)> {
    let mut counts = BTreeMap::new();
    let items: Vec<Item> = match (&args.list, &args.group_config) {
        (None, Some(_)) => bail!("--group-config needs --list"),
        (None, None) => {
            let f = ImageFolder::new(&args.datadir)
                .with_context(|| format!("--datadir {}", args.datadir.display()))?;
            for (_, label) in &f.samples {
                *counts
                    .entry(format!("{:>5} {}", label, f.classes[*label]))
                    .or_insert(0) += 1;
            }
            f.samples
                .iter()
                .map(|(p, l)| Item {
                    path: p.clone(),
                    target: vec![*l as i64],
                })
                .collect()
        }
        (Some(list), None) => read_flat_list(list, &args.datadir)?
            .into_iter()
            .map(|e| {
                *counts.entry(format!("label {:>5}", e.label)).or_insert(0) += 1;
                Item {
                    path: e.path,
                    target: vec![e.label as i64],
                }
            })
            .collect(),
        (Some(list), Some(cfg)) => {
            let cfg = read_group_config(cfg)?;
            let g = cfg.classes_per_group.len();
            read_group_list(list, &args.datadir, &cfg.classes_per_group)?
                .into_iter()
                .map(|e| {
                    *counts
                        .entry(format!(
                            "group {:>3} class {:>4}",
                            e.group, e.class_in_group
                        ))
                        .or_insert(0) += 1;
                    Item {
                        target: e.target(g),
                        path: e.path,
                    }
                })
                .collect()
        }
    };
    if items.is_empty() {
        bail!("no images in {}", args.datadir.display());
    }
    Ok((items, counts))
}

pub fn run(args: &DataCheckArgs) -> Result<()> {
    let (items, counts) = items(args)?;
    let mode = if args.train {
        Mode::Train {
            transform: TrainTransform {
                precrop: args.precrop,
                crop: args.crop,
                normalize: None,
            },
            seed: args.seed,
            epoch: 0,
        }
    } else {
        Mode::Eval(EvalTransform { size: args.crop }.into())
    };
    println!("{} images, {} classes", items.len(), counts.len());
    for (class, n) in &counts {
        println!("  {class}: {n}");
    }
    let items = Arc::new(items);
    if let Some(dump) = &args.dump {
        let n = args.limit.min(items.len());
        let indices: Vec<usize> = (0..n).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(args.workers.max(1))
            .build()?;
        let batch = pool.install(|| load_batch(&items, &indices, &mode, false))?;
        let (images, labels) = batch.to_tensors(tch::Device::Cpu);
        let bytes = serialize(
            &[
                ("images".to_string(), images),
                ("labels".to_string(), labels),
            ],
            Default::default(),
        )?;
        write_atomic(dump, &bytes)?;
        println!("dumped the first {n} images to {}", dump.display());
    }
    let start = Instant::now();
    let loader = Loader::new(
        items.clone(),
        mode,
        LoaderOptions {
            batch: args.batch,
            workers: args.workers,
            prefetch: 2,
            skip_bad: true,
        },
    )?;
    let bar = crate::progress::bar(items.len() as u64, "checking");
    let mut bad = Vec::new();
    let mut good = 0usize;
    for batch in loader {
        let batch = batch?;
        bar.inc((batch.len() + batch.skipped.len()) as u64);
        good += batch.len();
        bad.extend(batch.skipped);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "loader: {good} images in {secs:.2} s, {:.1} images/s ({} workers, {}x{})",
        good as f64 / secs.max(1e-9),
        args.workers,
        args.crop,
        args.crop
    );
    if bad.is_empty() {
        println!("all {} images are readable", items.len());
        return Ok(());
    }
    println!("{} unreadable images:", bad.len());
    for s in &bad {
        println!("  {}: {}", s.path.display(), s.reason);
    }
    bail!("{} of {} images are unreadable", bad.len(), items.len())
}
