#!/usr/bin/env bash
# The original scripts/finetune_group_softmax.sh, ported (same paths and arguments).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=BiT-S-R101x1
MOS=${MOS:-target/release/mos}
[ -x "$MOS" ] || scripts/build.sh
# The original's paths; without them, the same files as committed in configs/imagenet/.
GROUP_CONFIG=group_config/taxonomy_level0.npy
[ -e "$GROUP_CONFIG" ] || GROUP_CONFIG=configs/imagenet/taxonomy_level0.npy
VAL_LIST=data_lists/imagenet2012_group_softmax_val_list.txt
[ -e "$VAL_LIST" ] || VAL_LIST=configs/imagenet/imagenet2012_group_softmax_val_list.txt

"$MOS" finetune-group \
--name finetune_group_softmax_${MODEL} \
--model ${MODEL} \
--logdir checkpoints/finetune \
--dataset imagenet2012 \
--eval_every 200 \
--datadir dataset/id_data/ILSVRC-2012 \
--train_list data_lists/imagenet2012_group_softmax_train_list.txt \
--val_list "$VAL_LIST" \
--num_block_open 0 \
--group_config "$GROUP_CONFIG"
