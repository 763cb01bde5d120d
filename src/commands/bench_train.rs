//! `mos bench-train`: images/s of fine-tuning's step (forward with frozen stages
//! under no_grad, cross-entropy, backward, SGD update) on random data already in
//! memory, for comparison with the same step in PyTorch (scripts/bench.sh).
use std::time::Instant;

use anyhow::Result;
use tch::{nn, Kind, Tensor};

use crate::cli::BenchTrainArgs;
use crate::model::{Freeze, ResNetV2};
use crate::train::sgd::Sgd;

pub fn run(args: &BenchTrainArgs) -> Result<()> {
    let device = args.device.device.resolve()?;
    let freeze = Freeze::from_num_block_open(args.num_block_open).map_err(anyhow::Error::msg)?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let mut model = ResNetV2::new(&vs.root(), args.model.model, args.head);
    let trainable = crate::model::bit::apply_freeze(&vs, freeze);
    model.fix_frozen_weights(freeze);
    let mut sgd = Sgd::new(trainable, 1)?;
    let x = Tensor::rand([args.batch, 3, args.size, args.size], (Kind::Float, device)) * 2.0 - 1.0;
    let y = Tensor::randint(args.head, [args.batch], (Kind::Int64, device));
    let step = |sgd: &mut Sgd| -> Result<()> {
        let loss = model.forward_train(&x, freeze).cross_entropy_for_logits(&y);
        sgd.backward(&loss)?;
        sgd.step(0.003)?;
        let _ = loss.double_value(&[]);
        Ok(())
    };
    step(&mut sgd)?;
    let start = Instant::now();
    for _ in 0..args.steps {
        step(&mut sgd)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "train: {:.2} images/s ({} steps of {} images at {}x{}, num_block_open {}, {secs:.2} s)",
        (args.steps as i64 * args.batch) as f64 / secs,
        args.steps,
        args.batch,
        args.size,
        args.size,
        args.num_block_open
    );
    Ok(())
}
