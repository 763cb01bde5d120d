//! `mos forward`: run the backbone on a batch stored in a safetensors file and write
//! the logits (and the 5 spatial-mean features), for checking reproduction against
//! other pipelines and devices.
use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::cli::ForwardArgs;
use crate::model::bit::spatial_mean;
use crate::model::checkpoint::{self, shape};
use crate::model::weights::load_model;
use crate::runtime::{device_name, value_name};

pub fn run(args: &ForwardArgs) -> Result<()> {
    let device = args.device.device.resolve()?;
    if args.batch < 1 {
        bail!("--batch {}: must be at least 1", args.batch);
    }
    let mut loaded = load_model(&args.model_path, Some(args.model.model), None, device)?;
    let Some(model) = loaded.model.as_bit_mut() else {
        bail!(
            "--model {}: mos forward runs BiT models (its --precision and --channels-last options are BiT's); extract a torchvision model's outputs with mos extract",
            args.model.model.name
        );
    };
    model.precision = args.precision;
    model.channels_last = args.channels_last;
    let input = checkpoint::load(&args.input)?
        .model
        .into_iter()
        .find(|(n, _)| *n == args.input_key)
        .map(|(_, t)| t)
        .with_context(|| {
            format!(
                "{}: no tensor named '{}' (--input-key)",
                args.input.display(),
                args.input_key
            )
        })?;
    if input.dim() != 4 || input.size()[1] != 3 {
        bail!(
            "{}: '{}' has shape {}; expected [N, 3, H, W]",
            args.input.display(),
            args.input_key,
            shape(&input)
        );
    }
    if input.size()[0] == 0 {
        bail!(
            "{}: '{}' holds no images (shape {})",
            args.input.display(),
            args.input_key,
            shape(&input)
        );
    }
    let input = input.to_kind(Kind::Float);
    let n = input.size()[0];
    let (logits, feats) = crate::runtime::catch_torch(|| {
        run_passes(model, &input, args.batch, args.features, device)
    })
    .with_context(|| {
        format!(
            "--input {}: the model cannot run on '{}' of shape {}",
            args.input.display(),
            args.input_key,
            shape(&input)
        )
    })?;
    let mut out = vec![("logits".to_string(), Tensor::cat(&logits, 0))];
    if args.features {
        for (k, parts) in feats.iter().enumerate() {
            out.push((format!("features.{k}"), Tensor::cat(parts, 0)));
        }
    }
    let bytes = checkpoint::serialize(&out, Default::default())?;
    checkpoint::write_atomic(&args.output, &bytes)?;
    println!(
        "wrote {} (logits {}{}) on {}, precision {}",
        args.output.display(),
        shape(&out[0].1),
        if args.features { ", features.0..4" } else { "" },
        device_name(device),
        value_name(&args.precision)
    );
    if args.repeat > 0 {
        let start = std::time::Instant::now();
        for _ in 0..args.repeat {
            let _ = run_passes(model, &input, args.batch, false, device);
        }
        let secs = start.elapsed().as_secs_f64();
        let images = (n as usize * args.repeat) as f64;
        println!(
            "forward: {:.2} images/s ({} passes over {n} images, batch {}, {secs:.2} s)",
            images / secs,
            args.repeat,
            args.batch
        );
    }
    Ok(())
}

/// One pass over `input` in batches: logits and (optionally) the 5 spatial-mean
/// features, on the CPU. Copying the results back synchronises the device.
fn run_passes(
    model: &crate::model::ResNetV2,
    input: &Tensor,
    batch: i64,
    features: bool,
    device: tch::Device,
) -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    let n = input.size()[0];
    let mut logits = Vec::new();
    let mut feats: Vec<Vec<Tensor>> = (0..5).map(|_| Vec::new()).collect();
    tch::no_grad(|| {
        let mut start = 0;
        while start < n {
            let len = batch.min(n - start);
            let x = input.narrow(0, start, len).to_device(device);
            if features {
                let f = model.forward_features(&x);
                logits.push(model.head(&f[4]).to_device(tch::Device::Cpu));
                for (k, t) in f.iter().enumerate() {
                    feats[k].push(
                        spatial_mean(t)
                            .to_kind(Kind::Float)
                            .to_device(tch::Device::Cpu),
                    );
                }
            } else {
                logits.push(model.forward(&x).to_device(tch::Device::Cpu));
            }
            start += len;
        }
    });
    (logits, feats)
}
