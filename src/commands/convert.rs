//! `mos convert`: any supported weight file -> our safetensors checkpoint.
use anyhow::{Context, Result};
use tch::{nn, Device};

use crate::cli::ConvertArgs;
use crate::model::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::model::weights::{load_strict, read_state_dict, resolve_variant};
use crate::model::ResNetV2;

pub fn run(args: &ConvertArgs) -> Result<()> {
    let sd = read_state_dict(&args.input)?;
    let variant = resolve_variant(&sd, &args.input, args.model)?;
    variant
        .require_bit("mos convert")
        .map_err(anyhow::Error::msg)?;
    let head = sd.head_size().filter(|&h| h > 0).with_context(|| {
        format!(
            "{}: no head.conv.bias vector with at least one entry",
            args.input.display()
        )
    })?;
    // Strict load into the architecture validates every name and shape.
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = ResNetV2::new(&vs.root(), variant, head);
    load_strict(&vs, &sd.tensors, &args.input, variant.name, &|_| false)?;
    let mut model: Vec<_> = vs.variables().into_iter().collect();
    model.sort_by(|a, b| a.0.cmp(&b.0));
    let prior = sd.meta.as_ref();
    let meta = CheckpointMeta {
        model: variant.name.to_string(),
        head_size: head,
        group_config: prior.and_then(|m| m.group_config.clone()),
        step: sd.step.unwrap_or(0),
        config: serde_json::json!({
            "converted_from": args.input.display().to_string(),
            "source_format": sd.format.to_string(),
        }),
    };
    let n = model.len();
    checkpoint::save(
        &args.output,
        &Checkpoint {
            meta: Some(meta),
            model,
            momentum: sd.momentum,
        },
    )?;
    println!(
        "wrote {} ({n} tensors, model {}, head {head}, from {} {})",
        args.output.display(),
        variant.name,
        sd.format,
        args.input.display()
    );
    Ok(())
}
