//! The `mos` binary end to end: help, `mos env`, flag errors.
use assert_cmd::Command;
use predicates::prelude::*;

fn mos() -> Command {
    let mut cmd = Command::cargo_bin("mos").expect("mos binary is built");
    // The binary must not depend on the caller's environment.
    cmd.env_clear();
    cmd
}

#[test]
fn help_lists_commands() {
    mos()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("env"));
    mos()
        .args(["env", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--device <DEVICE>"))
        .stdout(predicate::str::contains("--json"));
}

#[test]
fn env_runs_without_environment_variables() {
    mos()
        .arg("env")
        .assert()
        .success()
        .stdout(predicate::str::contains("libtorch:             2.11.0"))
        .stdout(predicate::str::contains("library dir:"))
        .stdout(predicate::str::contains("CUDA available:"))
        .stdout(predicate::str::contains("CPU threads:"))
        .stdout(predicate::str::contains(
            "models (torchvision): resnet18, resnet34",
        ));
}

#[test]
fn env_json_is_complete() {
    let out = mos().args(["env", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "mos_version",
        "libtorch_version",
        "libtorch_lib_dir",
        "cuda_available",
        "cuda_device_count",
        "cuda_devices",
        "cudnn_version",
        "cpu_threads",
        "malloc",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["mos_version"], env!("CARGO_PKG_VERSION"));
    let lib = v["libtorch_lib_dir"].as_str().unwrap();
    assert!(std::path::Path::new(lib).join("libtorch_cpu.so").exists());
    assert_eq!(v["cuda_available"], tch::Cuda::is_available());
    assert_eq!(v["models"]["torchvision"][2], "resnet50");
    assert_eq!(v["models"]["torchscript"][0], "torchscript");
    assert_eq!(v["models"]["bit"][0], "BiT-S-R50x1");
    // mos turns libtorch's default (TF32 cuDNN convolutions) off at start.
    assert_eq!(v["cudnn_tf32"], false);
}

#[test]
fn env_reports_the_malloc_setting() {
    let malloc = |set: Option<(&str, &str)>| {
        let mut cmd = mos();
        for var in mos::runtime::MALLOC_ENV {
            cmd.env_remove(var);
        }
        if let Some((k, v)) = set {
            cmd.env(k, v);
        }
        let out = cmd.args(["env", "--json"]).output().unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["malloc"].as_str().unwrap().to_string()
    };
    assert!(malloc(None).starts_with("tuned"), "{}", malloc(None));
    // A user's own malloc setting wins, and mos says so.
    let own = malloc(Some(("MALLOC_TRIM_THRESHOLD_", "131072")));
    assert_eq!(own, "as set by the environment (MALLOC_TRIM_THRESHOLD_)");
    let own = malloc(Some((
        "GLIBC_TUNABLES",
        "glibc.malloc.mmap_threshold=131072",
    )));
    assert_eq!(own, "as set by the environment (GLIBC_TUNABLES)");
}

#[test]
fn bad_device_values_fail_with_the_flag_named() {
    mos()
        .args(["env", "--device", "gpu"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--device"))
        .stderr(predicate::str::contains(
            "expected auto, cpu, cuda or cuda:N",
        ));
    if !tch::Cuda::is_available() {
        mos()
            .args(["env", "--device", "cuda:0"])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(
                "--device cuda:0: CUDA is not available",
            ));
    }
}

#[test]
fn unknown_command_fails() {
    mos().arg("frobnicate").assert().code(2);
}

/// `scripts/reproduce_resnet50.sh` (run from a copy of the repository layout, with
/// a stand-in for mos that records its arguments): without the weights it stops
/// naming the file and where it comes from; with them it runs the ResNet-50 config
/// with the flags given.
#[test]
fn reproduce_resnet50_checks_its_weights_then_runs_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("scripts")).unwrap();
    let script = root.join("scripts/reproduce_resnet50.sh");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reproduce_resnet50.sh"),
        &script,
    )
    .unwrap();
    let fake = root.join("fake-mos");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .unwrap();
    let run = || {
        std::process::Command::new("bash")
            .arg(&script)
            .args(["--batch", "8"])
            .env("MOS", &fake)
            .output()
            .unwrap()
    };
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing: checkpoints/resnet50-19c8e357.pth")
            && err.contains("https://download.pytorch.org/models/resnet50-19c8e357.pth"),
        "{err}"
    );
    assert!(!root.join("args").exists());
    std::fs::create_dir_all(root.join("checkpoints")).unwrap();
    std::fs::write(root.join("checkpoints/resnet50-19c8e357.pth"), b"x").unwrap();
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("args")).unwrap().trim(),
        "benchmark --config configs/benchmarks/imagenet_resnet50.json --batch 8"
    );
}
