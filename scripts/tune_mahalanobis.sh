#!/usr/bin/env bash
# The original scripts/tune_mahalanobis.sh, ported (same paths and arguments).
# --model_path may also be the run directory (checkpoints/finetune/finetune_flat_softmax_MODEL).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=BiT-S-R101x1
MOS=${MOS:-target/release/mos}
[ -x "$MOS" ] || scripts/build.sh
CKPT=checkpoints/finetune/finetune_flat_softmax_${MODEL}
[ -e "$CKPT/bit.pth.tar" ] && CKPT=$CKPT/bit.pth.tar
# The original's path; without it, the same file as committed in configs/imagenet/.
VAL_LIST=data_lists/imagenet2012_val_list.txt
[ -e "$VAL_LIST" ] || VAL_LIST=configs/imagenet/imagenet2012_val_list.txt

"$MOS" tune-mahalanobis \
--name tune_mahalanobis_${MODEL} \
--model ${MODEL} \
--model_path "$CKPT" \
--logdir checkpoints/tune_mahalanobis \
--datadir dataset/id_data/ILSVRC-2012 \
--train_list data_lists/imagenet2012_train_list.txt \
--val_list "$VAL_LIST"
