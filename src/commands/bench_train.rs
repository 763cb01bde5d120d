//! `mos bench-train`: images/s of fine-tuning's step (forward with frozen stages
//! under no_grad, cross-entropy, backward, SGD update) on random data already in
//! memory, for comparison with the same step in PyTorch (scripts/bench.sh). Under
//! `mos launch` (a rendezvous in the environment) every step also all-reduces the
//! gradients in buckets, and the all-reduce's share of the step is reported
//! (scripts/bench.sh dist, docs/distributed.md#benchmark).
use std::time::Instant;

use anyhow::Result;
use tch::{nn, Kind, Tensor};

use crate::cli::BenchTrainArgs;
use crate::dist::Timeouts;
use crate::model::{Freeze, ResNetV2};
use crate::train::sgd::Sgd;

pub fn run(args: &BenchTrainArgs) -> Result<()> {
    args.model
        .model
        .require_bit("mos bench-train")
        .map_err(anyhow::Error::msg)?;
    let mut device = args.device.device.resolve()?;
    let pg = crate::dist::join_from_env(&mut device, Timeouts::with_heartbeat(60.0))?;
    let bucket_bytes = ((args.bucket_mb * (1 << 20) as f64) as usize).max(1);
    let freeze = Freeze::from_num_block_open(args.num_block_open).map_err(anyhow::Error::msg)?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let mut model = ResNetV2::new(&vs.root(), args.model.model, args.head);
    let trainable = crate::model::bit::apply_freeze(&vs, freeze);
    model.fix_frozen_weights(freeze);
    let mut sgd = Sgd::new(trainable, 1)?;
    let x = Tensor::rand([args.batch, 3, args.size, args.size], (Kind::Float, device)) * 2.0 - 1.0;
    let y = Tensor::randint(args.head, [args.batch], (Kind::Int64, device));
    // Returns the seconds spent in the all-reduce.
    let step = |sgd: &mut Sgd| -> Result<f64> {
        let mut reduce_secs = 0.0;
        let loss = model.forward_train(&x, freeze).cross_entropy_for_logits(&y);
        sgd.backward(&loss)?;
        if let Some(pg) = &pg {
            let t = Instant::now();
            let grads = sgd.gradients_for_reduce();
            crate::dist::all_reduce_sum(pg, &grads, bucket_bytes)?;
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            reduce_secs += t.elapsed().as_secs_f64();
        }
        sgd.step(0.003)?;
        let _ = loss.double_value(&[]);
        Ok(reduce_secs)
    };
    step(&mut sgd)?;
    let mut reduce_secs = 0.0;
    let start = Instant::now();
    for _ in 0..args.steps {
        reduce_secs += step(&mut sgd)?;
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(pg) = pg {
        let grads = sgd.gradients_for_reduce();
        let bytes: usize = grads.iter().map(|g| g.numel() * 4).sum();
        let sizes: Vec<usize> = grads.iter().map(|g| g.numel() * 4).collect();
        let buckets = crate::dist::plan_buckets(&sizes, bucket_bytes).len();
        if pg.rank == 0 {
            println!(
                "train: {:.2} images/s over {} processes ({} steps of {} images per process at {}x{}, num_block_open {}, {secs:.2} s); all-reduce {:.3} s of {:.3} s per step ({:.1}%), {:.1} MB of gradients in {buckets} buckets of <= {} MiB",
                (pg.world_size * args.steps * args.batch as usize) as f64 / secs,
                pg.world_size,
                args.steps,
                args.batch,
                args.size,
                args.size,
                args.num_block_open,
                reduce_secs / args.steps as f64,
                secs / args.steps as f64,
                100.0 * reduce_secs / secs,
                bytes as f64 / 1e6,
                args.bucket_mb
            );
        }
        pg.finish()?;
        return Ok(());
    }
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
