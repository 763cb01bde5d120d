#!/usr/bin/env bash
# The project's test command (CI runs exactly this): set up libtorch, check
# formatting and lints, run every test in release mode, then run the tests that
# compare numbers with PyTorch/scikit-learn fixtures a second time under the
# lowest CPU capability libtorch, oneDNN and MKL offer (other kernels than the
# machine's best), so a tolerance that holds only on one CPU fails here first;
# then check that the benchmark script works (scripts/bench.sh --smoke).
# MOS_TEST_SKIP_BENCH=1 skips that last step (for quick local runs only).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
mos_system_deps
mos_libtorch_env
cd "$here/.."
mos_log "cargo fmt --check"
cargo fmt --all -- --check
mos_log "cargo clippy"
cargo clippy --release --locked --all-targets -- -D warnings
mos_log "cargo test"
cargo test --release --locked

# The fixture comparisons again, under reduced kernels. ATen's dispatch honours
# ATEN_CPU_CAPABILITY (default = no AVX2/AVX-512 kernels), oneDNN's convolutions
# ONEDNN_MAX_CPU_ISA, MKL's BLAS MKL_ENABLE_INSTRUCTIONS. "lowest capability" is
# below what any x86-64 CI machine of the last decade runs by default, so the
# kernels do change; mos_kernel_check below shows it from oneDNN's own report.
reduced=(ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2)
best=$(mos_kernel_check target/release/mos)
low=$(env "${reduced[@]}" bash -c ". '$here/lib.sh'; mos_kernel_check target/release/mos")
mos_log "kernels by default: $best"
mos_log "kernels under ${reduced[*]}: $low"
if [ "$best" = "$low" ]; then
    mos_log "error: the reduced settings pick the same kernels as the default here, so the second run would test nothing new"
    exit 1
fi
# The tests that compare numbers with fixtures: the library's unit tests (scores,
# metrics, logistic regression, SGD, mixup, Mahalanobis statistics, image pipeline),
# the backbone, torchvision's ResNets and ViTs (their fine-tuning steps included), a
# TorchScript export against the native module, the weight formats, ODIN and
# Mahalanobis on the fixture model, and test-baseline / test-mos end to end against
# the original's per-image scores.
mos_log "fixture comparisons again under ${reduced[*]}"
env "${reduced[@]}" cargo test --release --locked --lib --test model --test weights --test ood --test posthoc --test mahalanobis --test e2e_cli --test resnet --test vit --test torchscript --test leaderboard --test rankfeat

if [ "${MOS_TEST_SKIP_BENCH:-0}" != 1 ]; then
    mos_log "scripts/bench.sh --smoke (the benchmark's own setup and every section, tiny inputs)"
    bash scripts/bench.sh --smoke
fi
