#!/usr/bin/env bash
# The original scripts/test_mos.sh, ported: MOS on ImageNet val vs one OOD set.
# Usage: scripts/test_mos.sh OOD_NAME   (iNaturalist, SUN, Places or Textures)
# Paths as the original's; --model_path may be a fine-tuning run directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DATA=${1:?usage: scripts/test_mos.sh OOD_NAME}
MODEL=BiT-S-R101x1
MOS=${MOS:-target/release/mos}
[ -x "$MOS" ] || scripts/build.sh
# The original's path; without it, the same file as committed in configs/imagenet/.
GROUP_CONFIG=group_config/taxonomy_level0.npy
[ -e "$GROUP_CONFIG" ] || GROUP_CONFIG=configs/imagenet/taxonomy_level0.npy

"$MOS" test-mos \
--name test_${MODEL}_mos_${OUT_DATA} \
--in_datadir dataset/id_data/ILSVRC-2012/val \
--out_datadir dataset/ood_data/${OUT_DATA} \
--model ${MODEL} \
--model_path checkpoints/finetune/finetune_group_softmax_${MODEL} \
--logdir checkpoints/test_log \
--group_config "$GROUP_CONFIG"
