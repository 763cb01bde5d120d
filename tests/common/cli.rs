//! Helpers of the command-line tests: the `mos` binary, small PNG sets, the checks of
//! a command's success and of its failure, and the settings of the small model.
use std::path::{Path, PathBuf};

use assert_cmd::Command;

/// The `mos` binary of this build.
pub fn mos() -> Command {
    Command::cargo_bin("mos").unwrap()
}

/// Writes `n` small PNGs (`img_<i>.png`, sizes 20+i x 18..20) with distinct content
/// into `dir/class`.
pub fn pngs(dir: &Path, class: &str, n: usize, seed: u32) {
    let d = dir.join(class);
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(20 + i as u32, 18 + (i as u32 % 3), |x, y| {
            let v = (x * 7 + y * 13 + seed * 31 + i as u32 * 17) % 256;
            image::Rgb([v as u8, (255 - v) as u8, ((v * 3 + x) % 256) as u8])
        });
        img.save(d.join(format!("img_{i}.png"))).unwrap();
    }
}

/// Runs a command that must succeed; returns its (stdout, stderr).
pub fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?} failed:\n{err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

/// Runs a command that must succeed; returns its stderr (the log).
pub fn ok(cmd: &mut Command) -> String {
    run_ok(cmd).1
}

/// Runs a command that must fail as mos fails on bad input: exit code 1 and an
/// `Error:` message, with no panic or backtrace. Returns stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{cmd:?} should fail:\n{err}");
    assert!(
        err.lines().any(|l| l.starts_with("Error: ")),
        "no Error: line in {err}"
    );
    for noise in [
        "panicked at",
        "stack backtrace",
        "frame #",
        "Exception raised",
    ] {
        assert!(!err.contains(noise), "{noise:?} in {err}");
    }
    err
}

/// `mos extract` of `data` with `ckpt` into `store` with the small model at `crop`
/// (no shard variables from the environment).
pub fn extract_at(data: &Path, ckpt: &Path, store: &Path, crop: &str) -> Command {
    let mut cmd = mos();
    cmd.env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX");
    cmd.arg("extract")
        .arg("--datadir")
        .arg(data)
        .arg("--model-path")
        .arg(ckpt)
        .arg("--output")
        .arg(store)
        .args(SMALL.iter().map(|a| if *a == "32" { crop } else { a }));
    cmd
}

/// The small model of the command-line tests, on the CPU.
pub const SMALL: [&str; 10] = [
    "--model",
    "ResNetV2-R14x0.5",
    "--crop",
    "32",
    "--batch",
    "2",
    "--workers",
    "2",
    "--device",
    "cpu",
];

/// `mos tune-mahalanobis` of the 7 images of `pngs(id, "a_class", 4, _)` and
/// `pngs(id, "b_class", 3, _)` with model `flat` and the `magnitudes` searched, as
/// run `name` under `root/runs`; returns the run directory.
pub fn tune_mahalanobis(
    root: &Path,
    id: &Path,
    flat: &Path,
    name: &str,
    magnitudes: &str,
) -> PathBuf {
    // The regression's 5 folds need 5 images of each kind: the list twice.
    let mut list = String::new();
    for _ in 0..2 {
        for (c, n) in [("a_class", 4), ("b_class", 3)] {
            for i in 0..n {
                list.push_str(&format!("{c}/img_{i}.png {}\n", (c == "b_class") as u8));
            }
        }
    }
    let list_path = root.join("list.txt");
    std::fs::write(&list_path, list).unwrap();
    ok(mos()
        .arg("tune-mahalanobis")
        .arg("--datadir")
        .arg(id)
        .arg("--train-list")
        .arg(&list_path)
        .arg("--val-list")
        .arg(&list_path)
        .arg("--model-path")
        .arg(flat)
        .arg("--logdir")
        .arg(root.join("runs"))
        .args([
            "--name",
            name,
            "--num-lr-samples",
            "5",
            "--magnitudes",
            magnitudes,
        ])
        .args(SMALL));
    root.join("runs").join(name)
}
