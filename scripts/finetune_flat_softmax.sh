#!/usr/bin/env bash
# The original scripts/finetune_flat_softmax.sh, ported (same paths and arguments).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=BiT-S-R101x1
MOS=${MOS:-target/release/mos}
[ -x "$MOS" ] || scripts/build.sh
# The original's path; without it, the same file as committed in configs/imagenet/.
VAL_LIST=data_lists/imagenet2012_val_list.txt
[ -e "$VAL_LIST" ] || VAL_LIST=configs/imagenet/imagenet2012_val_list.txt

"$MOS" finetune-flat \
--name finetune_flat_softmax_${MODEL} \
--model ${MODEL} \
--logdir checkpoints/finetune \
--dataset imagenet2012 \
--eval_every 200 \
--datadir dataset/id_data/ILSVRC-2012 \
--train_list data_lists/imagenet2012_train_list.txt \
--val_list "$VAL_LIST" \
--num_block_open 0
