//! Fine-tuning on several processes (c10d, Gloo on the CPU) against one process with
//! the same global batch, fault handling (a killed rank), resuming with another number
//! of processes, and `mos launch -- extract` (docs/distributed.md).
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use assert_cmd::Command;
use mos::model::checkpoint;
use predicates::prelude::*;

struct Data {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// 60 training and 30 validation Fashion-MNIST images (the demo data of the repository).
fn data() -> Data {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    Command::cargo_bin("mos")
        .unwrap()
        .args(["demo-data", "--train", "60", "--val", "30", "--test", "40"])
        .args(["--ood", "10", "--src"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/dataset/demo"))
        .arg("--out")
        .arg(root.join("data"))
        .assert()
        .success();
    Data { _dir: dir, root }
}

/// The finetune-flat arguments of run `name`. Global batch 14 in 2 micro-batches of
/// 7: 2 and 3 ranks get unequal slices (3/4, 2/2/3), and the last micro-batch of an
/// epoch (60 = 8·7 + 4) others again; 6 steps cross an epoch boundary.
fn args(d: &Data, name: &str, extra: &[&str]) -> Vec<String> {
    let p = |s: &str| d.root.join(s).to_string_lossy().into_owned();
    let mut a: Vec<String> = [
        "finetune-flat",
        "--name",
        name,
        "--model",
        "ResNetV2-R14x0.5",
        "--init",
        "none",
        "--batch",
        "14",
        "--batch-split",
        "2",
        "--crop",
        "24",
        "--precrop",
        "28",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--base-lr",
        "0.01",
        "--seed",
        "3",
        "--num-block-open",
        "-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, v) in [
        ("--logdir", p("runs")),
        ("--datadir", p("data/fashion/train")),
        ("--train-list", p("data/lists/train_flat.txt")),
        ("--val-list", p("data/lists/val_flat.txt")),
    ] {
        a.push(flag.into());
        a.push(v);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `mos` without any rendezvous variable inherited from the environment.
fn mos() -> Command {
    let mut c = Command::cargo_bin("mos").unwrap();
    for v in [
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_NTASKS",
    ] {
        c.env_remove(v);
    }
    c
}

fn launch(n: usize, a: &[String]) -> Command {
    let mut c = mos();
    c.args(["launch", "--nproc-per-node", &n.to_string(), "--"])
        .args(a);
    c
}

fn weights(d: &Data, name: &str) -> checkpoint::Checkpoint {
    checkpoint::load(
        &d.root
            .join("runs")
            .join(name)
            .join("checkpoint.safetensors"),
    )
    .unwrap()
}

fn flat(c: &checkpoint::Checkpoint) -> Vec<f64> {
    let mut m: Vec<_> = c.model.iter().collect();
    m.sort_by(|a, b| a.0.cmp(&b.0));
    m.iter()
        .flat_map(|(_, t)| {
            Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).reshape([-1])).unwrap()
        })
        .collect()
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The weights of run `got` equal those of `want` up to float reduction order.
///
/// Tolerance: N processes compute the same per-sample losses (the forward of a
/// sample can differ in its last bits, libtorch's CPU kernels depend on the batch
/// shape) and the same gradient as a different sum: per-rank partial sums added by
/// the all-reduce instead of one backward over the micro-batch. In float32 each
/// gradient then differs by a relative ~sqrt(n)·6e-8 (n ≤ 1e4 terms: ≲ 1e-5), and six
/// SGD steps propagate it through the weights. Measured against the training's own
/// change of the weights (`start` = the weights before any update), 1e-3 leaves two
/// orders of magnitude for that propagation, while any real error (a missing or
/// doubled slice, a wrong loss share, an unsynchronised rank) changes the update by
/// its own order of magnitude.
fn assert_same_model(start: &[f64], want: &[f64], got: &[f64], what: &str) {
    let change = dist(start, want);
    assert!(change > 0.0, "{what}: the training changed nothing");
    let d = dist(want, got);
    assert!(
        d <= 1e-3 * change,
        "{what}: |w_N - w_1| = {d:e} vs the update |w_1 - w_0| = {change:e}"
    );
}

fn metrics(d: &Data, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(d.root.join("runs").join(name).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// metrics.jsonl of two runs agree: the same records, steps, learning rates and
/// counts; losses to 1e-4 relative (the weights differ by ≤ 1e-3 of their update, see
/// [`assert_same_model`], and six steps change the loss by well under 10%); top-1 to
/// one image (a near tie may flip).
fn assert_same_metrics(a: &[serde_json::Value], b: &[serde_json::Value], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: records");
    for (x, y) in a.iter().zip(b) {
        let keys: Vec<_> = x.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            y.as_object().unwrap().keys().collect::<Vec<_>>(),
            "{what}"
        );
        for k in keys {
            let (u, v) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            let ok = match k.as_str() {
                "loss" | "val_loss" => (u - v).abs() <= 1e-4 * u.abs(),
                "val_top1" => (u - v).abs() <= 1.0 / x["val_images"].as_f64().unwrap() + 1e-12,
                _ => u == v,
            };
            assert!(ok, "{what}: {k} {u} vs {v} in {x} / {y}");
        }
    }
}

/// Trains run `start` (one step, whose learning rate is 0 in the warm-up: its
/// checkpoint holds the initial weights) and run `one` (one process) with `sched`
/// (`--schedule S [--eval-every E]`), the references of [`assert_like_one_process`].
fn train_references(d: &Data, sched: &[&str]) {
    let first = [&sched[..2], &["--max-steps", "1"]].concat();
    mos().args(args(d, "start", &first)).assert().success();
    mos().args(args(d, "one", sched)).assert().success();
}

/// Run `name` ended with the model and the metrics of run `one` (see
/// [`train_references`]).
fn assert_like_one_process(d: &Data, name: &str, what: &str) {
    let (w0, w1, wn) = (
        flat(&weights(d, "start")),
        flat(&weights(d, "one")),
        flat(&weights(d, name)),
    );
    assert_same_model(&w0, &w1, &wn, what);
    assert_same_metrics(&metrics(d, "one"), &metrics(d, name), what);
}

#[test]
fn two_and_three_processes_train_the_one_process_model_and_extract_in_shards() {
    let d = data();
    let sched = ["--schedule", "2,4,6", "--eval-every", "3"];
    train_references(&d, &sched);
    for n in [2usize, 3] {
        let name = format!("n{n}");
        launch(n, &args(&d, &name, &sched))
            .assert()
            .success()
            .stderr(predicate::str::contains(format!("{n} processes (Gloo)")));
        assert_like_one_process(&d, &name, &name);
        assert_eq!(weights(&d, &name).meta.unwrap().step, 6);
        let config =
            std::fs::read_to_string(d.root.join("runs").join(&name).join("config.json")).unwrap();
        assert!(config.contains(&format!("\"world_size\": {n}")), "{config}");
    }
    // Extraction: 2 shards in 2 processes, merged; the store is complete.
    let store = d.root.join("store");
    launch(2, &[])
        .arg("extract")
        .arg("--datadir")
        .arg(d.root.join("data/fashion/test"))
        .arg("--model-path")
        .arg(d.root.join("runs/one"))
        .arg("--output")
        .arg(&store)
        .args([
            "--model",
            "ResNetV2-R14x0.5",
            "--crop",
            "24",
            "--batch",
            "4",
        ])
        .args(["--workers", "1", "--device", "cpu"])
        .assert()
        .success()
        .stderr(predicate::str::contains("complete: 2 shards"));
    let manifest = std::fs::read_to_string(store.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"complete\": true"), "{manifest}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rank(a: &[String], rank: usize, world: usize, port: u16) -> Child {
    std::process::Command::cargo_bin("mos")
        .unwrap()
        .args(a)
        .env("WORLD_SIZE", world.to_string())
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("SLURM_NTASKS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads the piped stderr of `child` on a thread until the child closes it.
fn stderr_reader(child: &mut Child) -> JoinHandle<String> {
    let mut pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut s).unwrap();
        s
    })
}

/// Ranks 0 and 1 of run `name`: a long schedule (never reached) with a checkpoint
/// every 2 steps, a rank silent for 10 s lost; both stderrs read while they run
/// (a full pipe would block them). Returns once the first checkpoint is written;
/// a rank that ends first fails the test (a rank that hangs is reported lost by
/// the other after the --dist-timeout, which then ends).
fn two_ranks_past_a_checkpoint(d: &Data, name: &str) -> ([Child; 2], [JoinHandle<String>; 2]) {
    let a = args(
        d,
        name,
        &[
            "--schedule",
            "2,4,100000",
            "--eval-every",
            "2",
            "--dist-timeout",
            "10",
        ],
    );
    let port = free_port();
    let mut ranks = [rank(&a, 0, 2, port), rank(&a, 1, 2, port)];
    let errs = [stderr_reader(&mut ranks[0]), stderr_reader(&mut ranks[1])];
    let ckpt = d
        .root
        .join("runs")
        .join(name)
        .join("checkpoint.safetensors");
    while !ckpt.exists() {
        for (r, child) in ranks.iter_mut().enumerate() {
            assert!(child.try_wait().unwrap().is_none(), "rank {r} ended early");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (ranks, errs)
}

#[test]
fn a_killed_rank_stops_the_others_and_the_run_resumes_with_another_world_size() {
    let d = data();
    let ([mut r0, mut r1], [err0, _]) = two_ranks_past_a_checkpoint(&d, "run");
    r1.kill().unwrap();
    r1.wait().unwrap();
    // Rank 0 ends by itself: it reports rank 1 lost once its heartbeat has been silent
    // for the --dist-timeout of 10 s.
    let status = r0.wait().unwrap();
    let err = err0.join().unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("Error: rank 1 stopped responding"), "{err}");
    assert_one_clean_error(&err);
    // The last checkpoint is intact; 3 processes resume it and end with the weights
    // one process gets for the same steps.
    let at = weights(&d, "run").meta.unwrap().step as u64;
    assert!(at >= 2 && at % 2 == 0, "checkpoint at step {at}");
    let stop = (at + 2).to_string();
    let resume = args(
        &d,
        "run",
        &[
            "--schedule",
            "2,4,100000",
            "--eval-every",
            "2",
            "--max-steps",
            &stop,
        ],
    );
    launch(3, &resume)
        .assert()
        .success()
        .stderr(predicate::str::contains("resuming from"));
    let start_args = ["--schedule", "2,4,100000", "--max-steps", "1"];
    mos()
        .args(args(&d, "start", &start_args))
        .assert()
        .success();
    let one = [
        "--schedule",
        "2,4,100000",
        "--eval-every",
        "2",
        "--max-steps",
        &stop,
    ];
    mos().args(args(&d, "one", &one)).assert().success();
    let (w0, w1, w3) = (
        flat(&weights(&d, "start")),
        flat(&weights(&d, "one")),
        flat(&weights(&d, "run")),
    );
    assert_eq!(weights(&d, "run").meta.unwrap().step as u64, at + 2);
    assert_same_model(&w0, &w1, &w3, "2 processes, killed, resumed by 3");
}

/// A surviving rank's stderr: exactly one `Error:` line, and no C++ stack trace.
fn assert_one_clean_error(err: &str) {
    let errors = err.lines().filter(|l| l.starts_with("Error: ")).count();
    assert_eq!(errors, 1, "{err}");
    for noise in ["frame #", "Exception raised from", "panicked at"] {
        assert!(!err.contains(noise), "{noise:?} in {err}");
    }
}

#[test]
fn a_killed_rank_0_leaves_the_other_one_error_line_without_a_cpp_stack_trace() {
    // Rank 0 serves the rendezvous store: when it dies, the other rank's store client
    // fails; libtorch logged that failure with a dozen C++ stack frames.
    let d = data();
    let ([mut r0, mut r1], [_, err1]) = two_ranks_past_a_checkpoint(&d, "r0");
    r0.kill().unwrap();
    r0.wait().unwrap();
    // The heartbeat makes rank 1 stop by itself (no time limit is asserted).
    assert!(!r1.wait().unwrap().success());
    let err = err1.join().unwrap();
    assert!(err.contains("rank 0 died or is unreachable"), "{err}");
    assert_one_clean_error(&err);
}

#[test]
fn launch_reports_the_failing_rank_and_bad_commands() {
    let d = data();
    // Both ranks fail after the rendezvous (a missing list); the first failure stops
    // the other.
    let mut a = args(&d, "bad", &["--schedule", "2,4,6"]);
    let i = a.iter().position(|s| s == "--train-list").unwrap();
    a[i + 1] = d.root.join("missing.txt").to_string_lossy().into_owned();
    launch(2, &a)
        .assert()
        .failure()
        .stderr(predicate::str::contains("missing.txt"))
        .stderr(predicate::str::contains(
            "failed with exit status 1; stopped the other ranks",
        ));
    mos()
        .args(["launch", "--nproc-per-node", "2", "--", "env"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("not \"env\""));
    mos()
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "finetune-flat",
            "--bogus",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("the command after --"));
    // A rank with an incomplete environment names the variable.
    mos()
        .args(args(&d, "env", &[]))
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env("MASTER_PORT", "1234")
        .assert()
        .failure()
        .stderr(predicate::str::contains("MASTER_ADDR is not set"));
}

#[test]
fn with_mixup_two_processes_train_the_one_process_model() {
    // Mixup is on from 20,000 training images: a list of 20,016 lines naming the 60
    // demo images over and over (only the few batches trained are read).
    let d = data();
    let lines: Vec<String> = std::fs::read_to_string(d.root.join("data/lists/train_flat.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let big: String = lines
        .iter()
        .cycle()
        .take(20_016)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(d.root.join("data/lists/train_flat.txt"), big).unwrap();
    let sched = ["--schedule", "2,4,5"];
    train_references(&d, &sched);
    launch(2, &args(&d, "two", &sched)).assert().success();
    let config = std::fs::read_to_string(d.root.join("runs/two/config.json")).unwrap();
    assert!(config.contains("\"mixup_alpha\": 0.1"), "{config}");
    assert_like_one_process(&d, "two", "mixup, 2 processes");
}

#[test]
fn ctrl_c_of_the_launcher_stops_all_ranks_at_one_step_with_a_checkpoint() {
    let d = data();
    let a = args(
        &d,
        "int",
        &[
            "--schedule",
            "2,4,100000",
            "--eval-every",
            "2",
            "--dist-timeout",
            "30",
        ],
    );
    let mut launcher = std::process::Command::cargo_bin("mos")
        .unwrap()
        .args(["launch", "--nproc-per-node", "2", "--"])
        .args(&a)
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_NTASKS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = stderr_reader(&mut launcher);
    let metrics = d.root.join("runs/int/metrics.jsonl");
    // Wait (however long it takes) for the first validation record (step 2), then
    // interrupt the launcher only; a launcher that ends first fails the test.
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.contains("val_loss")) {
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the launcher ended early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGINT) };
    // The launcher ends by itself: the ranks stop at a common step, or a rank that
    // hangs is reported lost by the others after the --dist-timeout and the launcher
    // stops the rest.
    let status = launcher.wait().unwrap();
    let err = err.join().unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("fine-tuning interrupted: every rank stopped"),
        "{err}"
    );
    // Rank 0 saved the step where all ranks stopped: the last step of metrics.jsonl.
    let last_step = metrics_steps(&d, "int");
    assert_eq!(
        weights(&d, "int").meta.unwrap().step as u64,
        last_step,
        "{err}"
    );
}

fn metrics_steps(d: &Data, name: &str) -> u64 {
    metrics(d, name)
        .iter()
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap()
}

/// The images named as skipped in a run's train.log: (kind, path), sorted.
fn skipped_in_log(d: &Data, name: &str) -> Vec<(String, String)> {
    let log = std::fs::read_to_string(d.root.join("runs").join(name).join("train.log")).unwrap();
    let mut named: Vec<(String, String)> = log
        .lines()
        .filter_map(|l| {
            let rest = l.split("skipped unreadable ").nth(1)?;
            let (kind, rest) = rest.split_once(" image ")?;
            let (path, _) = rest.split_once(": ")?;
            Some((kind.to_string(), path.to_string()))
        })
        .collect();
    named.sort();
    named
}

#[test]
fn unreadable_images_are_skipped_as_one_process_skips_them_and_every_rank_s_are_logged() {
    let d = data();
    // Four of the 60 training images and the first and last of the 30 validation
    // images are not images: the six steps read every training image at least once,
    // and each rank validates a contiguous half of the validation list.
    for (list, picks) in [
        ("train_flat.txt", &[5, 20, 35, 50][..]),
        ("val_flat.txt", &[0, 29]),
    ] {
        let lines = std::fs::read_to_string(d.root.join("data/lists").join(list)).unwrap();
        let lines: Vec<&str> = lines.lines().collect();
        for &i in picks {
            let rel = lines[i].split_whitespace().next().unwrap();
            std::fs::write(d.root.join("data/fashion/train").join(rel), b"not an image").unwrap();
        }
    }
    let sched = ["--schedule", "2,4,6", "--eval-every", "3"];
    train_references(&d, &sched);
    launch(2, &args(&d, "two", &sched)).assert().success();
    assert_like_one_process(&d, "two", "unreadable images, 2 processes");
    let m2 = metrics(&d, "two");
    let train_skipped: u64 = m2.iter().filter_map(|r| r["train_skipped"].as_u64()).sum();
    assert!(train_skipped >= 4, "{m2:?}");
    assert!(
        m2.iter().any(|r| r["val_skipped"].as_u64() == Some(2)),
        "{m2:?}"
    );
    // train.log of the 2-process run names what both ranks skipped: every event the
    // one-process run names, and rank 1 met some of them.
    let (one, two) = (skipped_in_log(&d, "one"), skipped_in_log(&d, "two"));
    assert_eq!(one.len() as u64, train_skipped + 2, "{one:?}");
    assert_eq!(one, two);
    let log = std::fs::read_to_string(d.root.join("runs/two/train.log")).unwrap();
    for kind in ["training", "validation"] {
        assert!(
            log.contains(&format!("rank 1: skipped unreadable {kind} image")),
            "{log}"
        );
    }
    let done = format!(
        "({train_skipped} unreadable training images skipped, 2 unreadable validation images)"
    );
    assert!(log.contains(&done), "{log}");
}
