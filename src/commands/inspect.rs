//! `mos inspect FILE`: tensor names, shapes, dtypes and metadata of a weight file,
//! as mos reads it (BiT keys renamed to ours, `module.` stripped).
use anyhow::Result;

use crate::cli::InspectArgs;
use crate::model::checkpoint::{kind_name, shape};
use crate::model::weights::{matching_variants, read_state_dict};

pub fn run(args: &InspectArgs) -> Result<()> {
    let sd = read_state_dict(&args.file)?;
    println!("file:    {}", args.file.display());
    println!("format:  {}", sd.format);
    if let Some(step) = sd.step {
        println!("step:    {step}");
    }
    if let Some(meta) = &sd.meta {
        println!("meta:    {}", serde_json::to_string(meta)?);
    }
    let fits: Vec<_> = matching_variants(&sd.tensors)
        .iter()
        .map(|v| v.name)
        .collect();
    if !fits.is_empty() {
        println!("fits:    {}", fits.join(", "));
    }
    if let Some(h) = sd.head_size() {
        println!("head:    {h}");
    }
    let width = sd
        .tensors
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("\n{:<width$}  {:<20} dtype", "name", "shape");
    let mut total: i64 = 0;
    for (name, t) in &sd.tensors {
        total += t.numel() as i64;
        println!("{name:<width$}  {:<20} {}", shape(t), kind_name(t.kind()));
    }
    for (name, t) in &sd.momentum {
        println!(
            "{:<width$}  {:<20} {}",
            format!("(momentum) {name}"),
            shape(t),
            kind_name(t.kind())
        );
    }
    println!("\n{} tensors, {total} values", sd.tensors.len());
    if !sd.momentum.is_empty() {
        println!("{} momentum buffers", sd.momentum.len());
    }
    Ok(())
}
