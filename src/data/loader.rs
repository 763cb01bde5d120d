//! The batch loader: decoding and transforms on `workers` threads, a bounded
//! prefetch queue, batches in dataset order for evaluation and in a seeded
//! shuffled order for training. A bad image is an error naming its path and the
//! decoder's reason, unless skipping is asked for; skipped images are reported
//! with every batch, never substituted (the original replaces them silently).
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use rayon::prelude::*;

#[cfg(test)]
use super::transform::EvalTransform;
use super::transform::{ImageTransform, Rng, TrainTransform};
use super::{decode_file, DataError};

/// One sample: an image file and its target (`[label]` for flat labels, the
/// length-G group target vector for group lists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    pub target: Vec<i64>,
}

/// How images become tensors.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Evaluation: dataset order, an [`ImageTransform`].
    Eval(ImageTransform),
    /// Training: order shuffled by `seed` and `epoch`; random crop and flip drawn
    /// per sample from (`seed`, `epoch`, index), whatever the thread schedule.
    Train {
        transform: TrainTransform,
        seed: u64,
        epoch: u64,
    },
}

impl Mode {
    /// Side of the output images.
    pub fn size(&self) -> usize {
        match self {
            Mode::Eval(t) => t.size(),
            Mode::Train { transform, .. } => transform.crop,
        }
    }
}

/// Loader settings.
#[derive(Clone, Copy, Debug)]
pub struct LoaderOptions {
    /// Images per batch.
    pub batch: usize,
    /// Decode threads.
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Skip unreadable images (reported in [`Batch::skipped`]) instead of failing.
    pub skip_bad: bool,
}

/// An image that was skipped, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// One batch, on the CPU: `images` is `[len, 3, size, size]` row-major, in [-1, 1].
#[derive(Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub size: usize,
    /// Dataset indices of the images, in batch order.
    pub indices: Vec<usize>,
    /// Targets of the images, in batch order.
    pub targets: Vec<Vec<i64>>,
    /// Images of this batch's slice of the order that were skipped.
    pub skipped: Vec<Skipped>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The images as a `[len, 3, size, size]` tensor on `device` (a non-blocking
    /// copy from pinned memory on CUDA) and the targets as `[len]` (flat) or
    /// `[len, G]` (group) int64.
    pub fn to_tensors(&self, device: tch::Device) -> (tch::Tensor, tch::Tensor) {
        let n = self.len() as i64;
        let s = self.size as i64;
        let images = tch::Tensor::from_slice(&self.images).view([n, 3, s, s]);
        let width = self.targets.first().map_or(1, Vec::len) as i64;
        let flat: Vec<i64> = self.targets.iter().flatten().copied().collect();
        let mut targets = tch::Tensor::from_slice(&flat).view([n, width]);
        if width == 1 {
            targets = targets.view([n]);
        }
        if device.is_cuda() {
            let images =
                images
                    .pin_memory(device)
                    .to_device_(device, tch::Kind::Float, true, false);
            (images, targets.to_device(device))
        } else {
            (images, targets)
        }
    }
}

/// The order in which `n` samples are visited.
pub fn visit_order(n: usize, mode: &Mode) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if let Mode::Train { seed, epoch, .. } = mode {
        let mut rng = Rng::derive(*seed, u64::MAX - epoch);
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

fn load_one(
    item: &Item,
    index: usize,
    mode: &Mode,
    n: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let img = decode_file(&item.path).map_err(|e| match e {
        DataError::Decode { reason, .. } => reason,
        other => other.to_string(),
    })?;
    let res = match mode {
        Mode::Eval(t) => t.apply_into(&img, out),
        Mode::Train {
            transform,
            seed,
            epoch,
        } => {
            let mut rng = Rng::derive(
                *seed,
                epoch.wrapping_mul(n as u64).wrapping_add(index as u64),
            );
            transform.apply_into(&img, transform.sample(&mut rng), out)
        }
    };
    res.map_err(|e| e.to_string())
}

/// Builds one batch from `indices` using the current rayon pool.
pub fn load_batch(
    items: &[Item],
    indices: &[usize],
    mode: &Mode,
    skip_bad: bool,
) -> Result<Batch, DataError> {
    let size = mode.size();
    let len = 3 * size * size;
    let mut images = vec![0f32; len * indices.len()];
    let results: Vec<Result<(), String>> = images
        .par_chunks_mut(len)
        .zip(indices.par_iter())
        .map(|(slot, &i)| load_one(&items[i], i, mode, items.len(), slot))
        .collect();
    let mut kept = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    for (k, (res, &i)) in results.into_iter().zip(indices).enumerate() {
        match res {
            Ok(()) => kept.push((k, i)),
            Err(reason) if skip_bad => skipped.push(Skipped {
                path: items[i].path.clone(),
                reason,
            }),
            Err(reason) => {
                return Err(DataError::Decode {
                    path: items[i].path.clone(),
                    reason: format!("{reason} (pass --skip-bad-images to skip unreadable images)"),
                })
            }
        }
    }
    if !skipped.is_empty() {
        for (dst, &(src, _)) in kept.iter().enumerate() {
            if dst != src {
                images.copy_within(src * len..(src + 1) * len, dst * len);
            }
        }
        images.truncate(kept.len() * len);
    }
    Ok(Batch {
        images,
        size,
        indices: kept.iter().map(|&(_, i)| i).collect(),
        targets: kept.iter().map(|&(_, i)| items[i].target.clone()).collect(),
        skipped,
    })
}

/// The positions of a batch of `len` that process `rank` of `world` takes: contiguous
/// slices, sizes differing by at most one, in rank order.
pub fn shard_range(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    rank * len / world..(rank + 1) * len / world
}

/// An iterator of batches prepared on a background thread.
pub struct Loader {
    rx: Option<Receiver<Result<Batch, DataError>>>,
    handle: Option<JoinHandle<()>>,
    /// Number of batches this loader yields (at most).
    pub num_batches: usize,
}

impl Loader {
    /// Starts loading `items` (shared, not copied per batch).
    pub fn new(
        items: std::sync::Arc<Vec<Item>>,
        mode: Mode,
        opts: LoaderOptions,
    ) -> Result<Self, DataError> {
        Self::starting_at(items, mode, opts, 0)
    }

    /// Like [`Loader::new`], but skips the first `start_batch` batches of the order
    /// without reading them (resuming training in the middle of an epoch).
    pub fn starting_at(
        items: std::sync::Arc<Vec<Item>>,
        mode: Mode,
        opts: LoaderOptions,
        start_batch: usize,
    ) -> Result<Self, DataError> {
        Self::sharded(items, mode, opts, start_batch, 0, 1)
    }

    /// Like [`Loader::starting_at`], but each batch holds only slice `rank` of
    /// `world` of the batch [`Loader::starting_at`] would give (data-parallel
    /// training): positions [`shard_range`] of each chunk of the order. A slice may
    /// be empty (a batch smaller than `world`); it is yielded all the same.
    pub fn sharded(
        items: std::sync::Arc<Vec<Item>>,
        mode: Mode,
        opts: LoaderOptions,
        start_batch: usize,
        rank: usize,
        world: usize,
    ) -> Result<Self, DataError> {
        if world == 0 || rank >= world {
            return Err(DataError::InvalidArgument(format!(
                "rank {rank} of {world} processes"
            )));
        }
        if opts.batch == 0 || opts.workers == 0 {
            return Err(DataError::InvalidArgument(format!(
                "batch ({}) and workers ({}) must be at least 1",
                opts.batch, opts.workers
            )));
        }
        let order = visit_order(items.len(), &mode);
        let order: Vec<usize> = order
            .into_iter()
            .skip(start_batch.saturating_mul(opts.batch))
            .collect();
        let num_batches = order.len().div_ceil(opts.batch);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.workers)
            .thread_name(|i| format!("mos-decode-{i}"))
            .build()
            .map_err(|e| {
                DataError::InvalidArgument(format!(
                    "cannot start {} decode threads: {e}",
                    opts.workers
                ))
            })?;
        let (tx, rx) = sync_channel(opts.prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("mos-loader".into())
            .spawn(move || {
                for chunk in order.chunks(opts.batch) {
                    let chunk = &chunk[shard_range(chunk.len(), rank, world)];
                    let batch = pool.install(|| load_batch(&items, chunk, &mode, opts.skip_bad));
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| {
                DataError::InvalidArgument(format!("cannot start the loader thread: {e}"))
            })?;
        Ok(Loader {
            rx: Some(rx),
            handle: Some(handle),
            num_batches,
        })
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel stops the producer at its next send.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn write_pngs(dir: &std::path::Path, n: usize) -> Vec<Item> {
        (0..n)
            .map(|i| {
                let p = dir.join(format!("{i:03}.png"));
                let img = image::RgbImage::from_fn(16 + i as u32 % 5, 12, |x, y| {
                    image::Rgb([(x * 9 + i as u32) as u8, (y * 11) as u8, (i * 20) as u8])
                });
                img.save(&p).unwrap();
                Item {
                    path: p,
                    target: vec![i as i64],
                }
            })
            .collect()
    }

    fn opts(batch: usize, skip_bad: bool) -> LoaderOptions {
        LoaderOptions {
            batch,
            workers: 3,
            prefetch: 2,
            skip_bad,
        }
    }

    #[test]
    fn eval_batches_come_in_dataset_order() {
        let dir = tempfile::tempdir().unwrap();
        let items = Arc::new(write_pngs(dir.path(), 11));
        let mode = Mode::Eval(EvalTransform { size: 8 }.into());
        let batches: Vec<Batch> = Loader::new(items.clone(), mode, opts(4, false))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            batches.iter().map(Batch::len).collect::<Vec<_>>(),
            vec![4, 4, 3]
        );
        let order: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(order, (0..11).collect::<Vec<_>>());
        // Each slot holds its own image: compare with a direct transform.
        let one = EvalTransform { size: 8 }
            .apply(&decode_file(&items[6].path).unwrap())
            .unwrap();
        assert_eq!(&batches[1].images[2 * one.len()..3 * one.len()], &one[..]);
        assert_eq!(batches[2].targets, vec![vec![8], vec![9], vec![10]]);
    }

    #[test]
    fn bad_images_fail_or_are_skipped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut items = write_pngs(dir.path(), 5);
        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, b"\xff\xd8\xff truncated").unwrap();
        items.insert(
            2,
            Item {
                path: bad.clone(),
                target: vec![99],
            },
        );
        let items = Arc::new(items);
        let mode = Mode::Eval(EvalTransform { size: 8 }.into());
        let err = Loader::new(items.clone(), mode, opts(3, false))
            .unwrap()
            .find_map(Result::err)
            .expect("an error");
        let msg = err.to_string();
        assert!(
            msg.contains("bad.jpg") && msg.contains("--skip-bad-images"),
            "{msg}"
        );
        let batches: Vec<Batch> = Loader::new(items, mode, opts(3, true))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(batches[0].len(), 2);
        assert_eq!(batches[0].skipped.len(), 1);
        assert_eq!(batches[0].skipped[0].path, bad);
        assert_eq!(batches[0].indices, vec![0, 1]);
        assert_eq!(batches[0].images.len(), 2 * 3 * 8 * 8);
        let total: usize = batches.iter().map(Batch::len).sum();
        assert_eq!(total, 5);
    }

    #[test]
    fn training_order_and_crops_are_reproducible_from_the_seed() {
        let dir = tempfile::tempdir().unwrap();
        let items = Arc::new(write_pngs(dir.path(), 9));
        let mode = |seed, epoch| Mode::Train {
            transform: TrainTransform {
                precrop: 12,
                crop: 8,
                normalize: None,
            },
            seed,
            epoch,
        };
        let run = |m: Mode, workers| {
            let o = LoaderOptions {
                batch: 4,
                workers,
                prefetch: 1,
                skip_bad: true,
            };
            Loader::new(items.clone(), m, o)
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        };
        let a = run(mode(5, 0), 1);
        let b = run(mode(5, 0), 3);
        let order = |v: &Vec<Batch>| v.iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>();
        assert_eq!(order(&a), order(&b));
        let mut sorted = order(&a);
        sorted.sort();
        assert_eq!(sorted, (0..9).collect::<Vec<_>>());
        assert_ne!(order(&a), (0..9).collect::<Vec<_>>());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.images, y.images);
        }
        assert_ne!(order(&run(mode(5, 1), 2)), order(&a));
    }
}
