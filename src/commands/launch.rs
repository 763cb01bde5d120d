//! `mos launch --nproc-per-node N -- COMMAND ...`: starts N local ranks of a
//! fine-tuning run (the torchrun environment: WORLD_SIZE, RANK, LOCAL_RANK,
//! MASTER_ADDR, MASTER_PORT) or N shards of an extraction (then merges them), and
//! stops them all when one fails (docs/distributed.md, its first section).
use std::process::{Child, Command as Process, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::cli::{Cli, Command, LaunchArgs, MergeArgs};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

/// Stops the processes still running: SIGTERM, then SIGKILL after 10 s.
fn stop_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // SAFETY: signalling a child process of ours by its id.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if children
            .iter_mut()
            .all(|(_, c)| !matches!(c.try_wait(), Ok(None)))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits for all ranks; the first failure stops the others. On Ctrl-C the ranks
/// (which got the signal too) are left to save and stop by themselves.
fn supervise(mut children: Vec<(usize, Child)>, what: &str) -> Result<()> {
    let mut interrupted_at: Option<Instant> = None;
    let mut forwarded = false;
    loop {
        if !forwarded && INTERRUPTED.load(Ordering::SeqCst) {
            // A terminal's Ctrl-C reaches the ranks too; a SIGINT sent to the
            // launcher alone is passed on (the ranks only set a flag, so twice is once).
            forwarded = true;
            for (_, c) in children.iter_mut() {
                if matches!(c.try_wait(), Ok(None)) {
                    // SAFETY: signalling a child process of ours by its id.
                    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
                }
            }
        }
        let mut running = 0;
        for i in 0..children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(s)) if s.success() => {}
                Ok(Some(s)) => {
                    let (rank, pid) = (*rank, child.id());
                    if INTERRUPTED.load(Ordering::SeqCst) {
                        // Let the others finish saving (bounded), then report.
                        let t0 = interrupted_at.get_or_insert_with(Instant::now);
                        if children
                            .iter_mut()
                            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
                            && t0.elapsed() < Duration::from_secs(120)
                        {
                            running += 1;
                            continue;
                        }
                    }
                    children.retain(|(r, _)| *r != rank);
                    let all_ended = children
                        .iter_mut()
                        .all(|(_, c)| !matches!(c.try_wait(), Ok(None)));
                    stop_all(&mut children);
                    if INTERRUPTED.load(Ordering::SeqCst) && all_ended {
                        bail!("{what} interrupted: every rank stopped (a fine-tuning run saves its checkpoint on rank 0; rerun the same command to resume)");
                    }
                    bail!(
                        "{what} rank {rank} (pid {pid}) failed with {}; stopped the other ranks",
                        describe(s)
                    );
                }
                Err(e) => bail!("cannot wait for rank {rank}: {e}"),
            }
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The CPU threads of each of `n` local ranks: OMP_NUM_THREADS if set, else the
/// cores shared out (at least 1), so that the ranks do not oversubscribe the CPU.
fn omp_threads(n: usize) -> String {
    match std::env::var("OMP_NUM_THREADS") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => {
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            (cores / n).max(1).to_string()
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port for the rendezvous store")?
        .local_addr()?
        .port())
}

pub fn run(args: &LaunchArgs) -> Result<()> {
    let n = args.nproc_per_node;
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    if args.nnodes == 0 || args.node_rank >= args.nnodes {
        bail!(
            "--node-rank {} must be below --nnodes {}",
            args.node_rank,
            args.nnodes
        );
    }
    // Check the command line before starting anything.
    let full: Vec<String> = std::iter::once("mos".to_string())
        .chain(args.command.iter().cloned())
        .collect();
    let cli = Cli::try_parse_from(&full).map_err(|e| {
        anyhow::anyhow!(
            "the command after --: {}",
            e.render().to_string().trim_end()
        )
    })?;
    let exe = std::env::current_exe().context("cannot find the mos executable")?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    match &cli.command {
        Command::FinetuneGroup(_) | Command::FinetuneFlat(_) | Command::BenchTrain(_) => {
            let world = n * args.nnodes;
            let addr = match (&args.master_addr, args.nnodes) {
                (Some(a), _) => a.clone(),
                (None, 1) => "127.0.0.1".to_string(),
                (None, _) => bail!(
                    "--nnodes {} needs --master-addr (node 0's host)",
                    args.nnodes
                ),
            };
            let port = match (args.master_port, args.nnodes) {
                (Some(p), _) => p,
                (None, 1) => free_port()?,
                (None, _) => 29500,
            };
            eprintln!(
                "mos launch: {n} ranks on this node ({world} in all), rendezvous {addr}:{port}"
            );
            let threads = omp_threads(n);
            let mut children = Vec::new();
            for local in 0..n {
                let rank = args.node_rank * n + local;
                let child = Process::new(&exe)
                    .args(&args.command)
                    .env("OMP_NUM_THREADS", &threads)
                    .env("WORLD_SIZE", world.to_string())
                    .env("RANK", rank.to_string())
                    .env("LOCAL_RANK", local.to_string())
                    .env("LOCAL_WORLD_SIZE", n.to_string())
                    .env("MASTER_ADDR", &addr)
                    .env("MASTER_PORT", port.to_string())
                    .spawn();
                match child {
                    Ok(c) => children.push((rank, c)),
                    Err(e) => {
                        stop_all(&mut children);
                        bail!("cannot start rank {rank}: {e}");
                    }
                }
            }
            supervise(children, "fine-tuning")
        }
        Command::Extract(e) => {
            if args.nnodes != 1 {
                bail!("extract: run one mos launch per node with its own --num-shards/--shard-index, or an array job (docs/cluster.md)");
            }
            if e.num_shards.is_some() || e.shard_index.is_some() {
                bail!("extract under mos launch: leave --num-shards and --shard-index to the launcher (it runs shard k of N on rank k)");
            }
            // One GPU per shard: each rank sees only its own device.
            let gpus = tch::Cuda::device_count() as usize;
            let visible: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
                Ok(v) if !v.trim().is_empty() => v.split(',').map(str::to_string).collect(),
                _ => (0..gpus).map(|g| g.to_string()).collect(),
            };
            eprintln!("mos launch: extracting {n} shards in {n} processes");
            let mut children = Vec::new();
            for k in 0..n {
                let mut p = Process::new(&exe);
                p.env("OMP_NUM_THREADS", omp_threads(n))
                    .args(&args.command)
                    .args([
                        "--num-shards",
                        &n.to_string(),
                        "--shard-index",
                        &k.to_string(),
                    ]);
                if !visible.is_empty() {
                    p.env("CUDA_VISIBLE_DEVICES", &visible[k % visible.len()]);
                }
                match p.spawn() {
                    Ok(c) => children.push((k, c)),
                    Err(err) => {
                        stop_all(&mut children);
                        bail!("cannot start shard {k}: {err}");
                    }
                }
            }
            supervise(children, "extract")?;
            crate::commands::merge::run(&MergeArgs {
                store: e.output.clone(),
            })
        }
        _ => bail!(
            "mos launch runs finetune-group, finetune-flat, extract or bench-train, not {:?}",
            args.command.first().map(String::as_str).unwrap_or("")
        ),
    }
}
