#!/usr/bin/env bash
# The original scripts/test_baselines.sh, ported: one baseline score on ImageNet
# val vs one OOD set.
# Usage: scripts/test_baselines.sh METHOD OOD_NAME
#   METHOD: MSP, ODIN, Energy, Mahalanobis or KL_Div (or several, comma-separated)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
METHOD=${1:?usage: scripts/test_baselines.sh METHOD OOD_NAME}
OUT_DATA=${2:?usage: scripts/test_baselines.sh METHOD OOD_NAME}
MODEL=BiT-S-R101x1
MOS=${MOS:-target/release/mos}
[ -x "$MOS" ] || scripts/build.sh

"$MOS" test-baseline \
--name test_${MODEL}_${METHOD}_${OUT_DATA} \
--in_datadir dataset/id_data/ILSVRC-2012/val \
--out_datadir dataset/ood_data/${OUT_DATA} \
--model ${MODEL} \
--model_path checkpoints/finetune/finetune_flat_softmax_${MODEL} \
--batch 32 \
--logdir checkpoints/test_log \
--score ${METHOD} \
--mahalanobis_param_path checkpoints/tune_mahalanobis/tune_mahalanobis_${MODEL}
