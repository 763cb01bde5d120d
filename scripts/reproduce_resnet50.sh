#!/usr/bin/env bash
# ReAct's Table 1 (NeurIPS 2021), ResNet-50 rows -- MSP, ODIN, Energy, ReAct -- and
# ASH-S at 90 (the ASH authors' recorded run) in one command: torchvision's 2017 ResNet-50 weights, Resize 256 / CenterCrop 224, the four
# OOD sets of the MOS benchmark, checked cell by cell against the published numbers
# (configs/benchmarks/imagenet_resnet50_published.json). Exit status 0: every cell
# within its tolerance. Data: README.md, "Reproducing Table 1" (the same sets);
# weights: docs/benchmark.md (configs/benchmarks/imagenet_resnet50.json).
# Usage: scripts/reproduce_resnet50.sh [more mos benchmark flags, e.g. --batch 256 --device cuda]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MOS=${MOS:-target/release/mos}
[ -x "$MOS" ] || scripts/build.sh
f=checkpoints/resnet50-19c8e357.pth
if [ ! -e "$f" ]; then
    echo "missing: $f; torchvision's 2017 ResNet-50 weights (the file ReAct, DICE, ASH and KNN used):" >&2
    echo "  wget -P checkpoints https://download.pytorch.org/models/resnet50-19c8e357.pth" >&2
    exit 1
fi
exec "$MOS" benchmark --config configs/benchmarks/imagenet_resnet50.json "$@"
