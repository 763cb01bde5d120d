//! Data-parallel training on several processes with libtorch's c10d
//! (docs/distributed.md): rendezvous from the environment ([`env`]), a process group
//! with fault detection ([`group`]), and bucketed collectives over lists of tensors.
pub mod env;
pub mod group;

use tch::{Kind, Tensor};

pub use env::{rendezvous, Rendezvous};
pub use group::{Backend, DistError, ProcessGroup, Timeouts};

/// Default bucket size of the gradient all-reduce, in MiB (chosen from
/// `scripts/bench.sh dist`, docs/distributed.md#gradient-all-reduce).
pub const DEFAULT_BUCKET_MB: f64 = 4.0;

/// Groups tensors (in order) into buckets of at most `bucket_bytes` each (a tensor
/// larger than that is a bucket of its own); returns index ranges.
pub fn plan_buckets(sizes_bytes: &[usize], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &b) in sizes_bytes.iter().enumerate() {
        if i > start && bytes + b > bucket_bytes {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += b;
    }
    if start < sizes_bytes.len() {
        out.push(start..sizes_bytes.len());
    }
    out
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Applies `op` to each bucket of `tensors` as one flat tensor, then copies the
/// result back. A bucket of one contiguous tensor is passed as is.
fn bucketed(
    tensors: &[Tensor],
    bucket_bytes: usize,
    op: &mut dyn FnMut(&Tensor) -> Result<(), DistError>,
) -> Result<(), DistError> {
    let torch = |e: tch::TchError| DistError::Invalid(e.to_string());
    let sizes: Vec<usize> = tensors.iter().map(bytes_of).collect();
    for range in plan_buckets(&sizes, bucket_bytes) {
        let group = &tensors[range];
        if group.len() == 1 && group[0].is_contiguous() {
            op(&group[0])?;
            continue;
        }
        let kind = group[0].kind();
        if group.iter().any(|t| t.kind() != kind) {
            return Err(DistError::Invalid(
                "a bucket mixes tensor kinds; all must share one".into(),
            ));
        }
        let flats: Vec<Tensor> = group.iter().map(|t| t.reshape([-1])).collect();
        let flat = Tensor::f_cat(&flats, 0).map_err(torch)?;
        op(&flat)?;
        let mut offset = 0;
        for t in group {
            let n = t.numel() as i64;
            let part = flat.f_narrow(0, offset, n).map_err(torch)?;
            tch::no_grad(|| t.shallow_clone().f_copy_(&part.view(t.size().as_slice())))
                .map_err(torch)?;
            offset += n;
        }
    }
    Ok(())
}

/// Sums `tensors` over the ranks, one collective per bucket.
pub fn all_reduce_sum(
    pg: &ProcessGroup,
    tensors: &[Tensor],
    bucket_bytes: usize,
) -> Result<(), DistError> {
    bucketed(tensors, bucket_bytes, &mut |t| pg.all_reduce_sum(t))
}

/// Copies `tensors` of rank `root` to every rank, one collective per bucket.
pub fn broadcast(
    pg: &ProcessGroup,
    tensors: &[Tensor],
    root: usize,
    bucket_bytes: usize,
) -> Result<(), DistError> {
    bucketed(tensors, bucket_bytes, &mut |t| pg.broadcast(t, root))
}

/// Sums a few f64 values over the ranks (CPU f64 on Gloo, the device's on NCCL).
pub fn all_reduce_values(
    pg: &ProcessGroup,
    values: &[f64],
    device: tch::Device,
) -> Result<Vec<f64>, DistError> {
    let t = Tensor::from_slice(values)
        .to_kind(Kind::Double)
        .to_device(device);
    pg.all_reduce_sum(&t)?;
    Vec::<f64>::try_from(t.to_device(tch::Device::Cpu))
        .map_err(|e| DistError::Invalid(e.to_string()))
}

/// Joins the process group the environment describes (docs/distributed.md#rendezvous),
/// or returns `None` for an ordinary single process. torchrun-style variables make a
/// group even for one process (as torchrun does: `mos launch --nproc-per-node 1` runs
/// the c10d path); a one-task Slurm allocation stays a single process. On CUDA the
/// device becomes `cuda:LOCAL_RANK` (one process per GPU) with NCCL; on the CPU, Gloo.
pub fn join_from_env(
    device: &mut tch::Device,
    timeouts: Timeouts,
) -> anyhow::Result<Option<ProcessGroup>> {
    let Some(rv) = rendezvous()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .filter(|rv| rv.world_size > 1 || rv.source == "torchrun")
    else {
        return Ok(None);
    };
    let backend = if device.is_cuda() {
        *device = tch::Device::Cuda(rv.local_rank);
        Backend::Nccl(rv.local_rank)
    } else {
        Backend::Gloo
    };
    let pg = ProcessGroup::new(&rv, backend, timeouts).map_err(|e| {
        anyhow::anyhow!(
            "rank {} of {} ({} rendezvous at {}:{}): {e}",
            rv.rank,
            rv.world_size,
            rv.source,
            rv.master_addr,
            rv.master_port
        )
    })?;
    Ok(Some(pg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_order_and_limit() {
        assert_eq!(plan_buckets(&[], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(plan_buckets(&[4, 4, 4], 8), vec![0..2, 2..3]);
        // An oversized tensor is a bucket of its own.
        assert_eq!(plan_buckets(&[4, 20, 4], 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_buckets(&[4, 4, 4], 1 << 30), vec![0..3]);
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    /// A free TCP port (bound, then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn two_ranks_reduce_and_broadcast_in_buckets() {
        let port = free_port();
        let run = move |rank: usize| {
            let rv = Rendezvous {
                world_size: 2,
                rank,
                local_rank: rank,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                source: "test",
            };
            let pg = ProcessGroup::new(&rv, Backend::Gloo, Timeouts::with_heartbeat(30.0)).unwrap();
            let r = rank as f32;
            // Three tensors in two buckets (16 + 8 bytes, then 24 bytes).
            let ts = [
                Tensor::from_slice(&[1.0f32 + r, 2.0, 3.0, 4.0]),
                Tensor::from_slice(&[10.0f32 * r, 5.0]),
                Tensor::from_slice(&[r; 6]).view([2, 3]),
            ];
            all_reduce_sum(&pg, &ts, 24).unwrap();
            let got: Vec<Vec<f32>> = ts
                .iter()
                .map(|t| Vec::<f32>::try_from(t.reshape([-1])).unwrap())
                .collect();
            assert_eq!(got[0], [3.0, 4.0, 6.0, 8.0]);
            assert_eq!(got[1], [10.0, 10.0]);
            assert_eq!(got[2], [1.0; 6]);
            let b = [Tensor::from_slice(&[r + 7.0, r]), Tensor::from_slice(&[r])];
            broadcast(&pg, &b, 1, 1 << 20).unwrap();
            assert_eq!(Vec::<f32>::try_from(&b[0]).unwrap(), [8.0, 1.0]);
            assert_eq!(Vec::<f32>::try_from(&b[1]).unwrap(), [1.0]);
            let v = all_reduce_values(&pg, &[r as f64, 1.0], tch::Device::Cpu).unwrap();
            assert_eq!(v, [1.0, 2.0]);
            // Rank 1's bytes reach rank 0 (empty ones too); a rank that has none sends
            // nothing and rank 0 does not wait for it.
            let mine = format!("from {rank}\n");
            let g = pg
                .gather_to_root("a", &[true, true], mine.as_bytes())
                .unwrap();
            let g2 = pg.gather_to_root("b", &[true, true], &[]).unwrap();
            let g3 = pg.gather_to_root("c", &[true, false], b"unsent").unwrap();
            if rank == 0 {
                assert_eq!(g, [(1, b"from 1\n".to_vec())]);
                assert_eq!(g2, [(1, Vec::new())]);
                assert!(g3.is_empty());
            } else {
                assert!(g.is_empty() && g2.is_empty() && g3.is_empty());
            }
            pg.finish().unwrap();
        };
        let h = std::thread::spawn(move || run(1));
        run(0);
        h.join().unwrap();
    }
}
