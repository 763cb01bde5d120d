#!/usr/bin/env bash
# The grouping ablation (docs/grouping.md): MOS fine-tuned and tested with each
# grouping strategy and several numbers of groups, one table
# (strategy, groups, ID top-1, AUROC, FPR95).
#
# On the demo's data (Fashion-MNIST in-distribution, MNIST out-of-distribution, a
# small ResNetV2 from scratch, as scripts/demo.sh): the hand-made taxonomy of
# configs/fashion_mnist_groups.json (its classes have no WordNet ids), k-means of
# the class-mean pre-logits of a flat-softmax model trained on the same data, and
# random groups. Every grouping's group lists are written by mos make-groups --from.
#
# Usage: scripts/ablation_groups.sh [RUN_DIR]       (default runs/ablation-<date>-<time>)
# Environment (defaults in brackets):
#   ABLATION_GROUPS    group counts of kmeans and random ["2 3 4 5"]
#   ABLATION_SCHEDULE  finetune --schedule of every model ["100,1200,1700,2000", the demo's]
#   ABLATION_PRECROP   finetune --precrop (random crops of 32 from it) [36, the demo's]
#   ABLATION_DATA      mos demo-data sizes ["" = the demo's 7000/1000/2000/2000]
#   ABLATION_SEED      seed of training, k-means and random groups [0]
#   MOS_DEVICE         --device [auto]
# A tiny check of the script: ABLATION_GROUPS=2 ABLATION_SCHEDULE=2,4,6,8
#   ABLATION_DATA="--train 200 --val 100 --test 100 --ood 100" scripts/ablation_groups.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
scripts/build.sh
mos=target/release/mos
run=${1:-runs/ablation-$(date +%Y%m%d-%H%M%S)}
counts=${ABLATION_GROUPS:-2 3 4 5}
schedule=${ABLATION_SCHEDULE:-100,1200,1700,2000}
precrop=${ABLATION_PRECROP:-36}
seed=${ABLATION_SEED:-0}
data=$run/data
mkdir -p "$run/groups"
echo "[ablation] run directory: $run"

# shellcheck disable=SC2086
"$mos" demo-data --out "$data" ${ABLATION_DATA:-}
lists=$data/lists
train_dir=$data/fashion/train
model=(--model ResNetV2-R14x0.5 --crop 32 --device "${MOS_DEVICE:-auto}")
last=${schedule##*,}
train=(--init none --dataset fashion-mnist --datadir "$train_dir" --batch 64 --schedule "$schedule"
       --eval-every "$last" --precrop "$precrop" --num-block-open -1 --base-lr 0.03 --seed "$seed"
       --workers "$(nproc)" --logdir "$run")

# Features for k-means: a flat-softmax model's pre-logits of the training images.
"$mos" finetune-flat --name flat "${model[@]}" "${train[@]}" \
    --train-list "$lists/train_flat.txt" --val-list "$lists/val_flat.txt"
"$mos" extract --datadir "$train_dir" --list "$lists/train_flat.txt" --model-path "$run/flat" \
    --output "$run/features" --layers logits,features --batch 128 --workers "$(nproc)" "${model[@]}"

# The groupings: name -> groups file.
names=(taxonomy)
cp configs/fashion_mnist_groups.json "$run/groups/taxonomy.json"
for k in $counts; do
    "$mos" make-groups --strategy kmeans --num-groups "$k" --seed "$seed" --datadir "$train_dir" \
        --features "$run/features" --device "${MOS_DEVICE:-auto}" --output "$run/groups/kmeans$k.json"
    "$mos" make-groups --strategy random --num-groups "$k" --seed "$seed" --datadir "$train_dir" \
        --output "$run/groups/random$k.json"
    names+=("kmeans$k" "random$k")
done

table=$run/ablation.md
{
    echo "| strategy | groups | ID top-1 % | AUROC % | FPR95 % |"
    echo "|---|---|---|---|---|"
} >"$table"
for name in "${names[@]}"; do
    groups=$run/groups/$name.json
    for split in train val; do
        "$mos" make-groups --from "$groups" --flat-list "$lists/${split}_flat.txt" \
            --output-list "$run/groups/${name}_${split}.txt"
    done
    "$mos" finetune-group --name "group_$name" "${model[@]}" "${train[@]}" --group-config "$groups" \
        --train-list "$run/groups/${name}_train.txt" --val-list "$run/groups/${name}_val.txt"
    "$mos" test-mos --in-datadir "$data/fashion/test" --out-datadir "$data/mnist" --logdir "$run" \
        --name "test_$name" --batch 128 --workers "$(nproc)" "${model[@]}" \
        --model-path "$run/group_$name" --group-config "$groups"
    python3 - "$groups" "$run/group_$name/metrics.jsonl" "$run/test_$name/results.json" "${name%%[0-9]*}" >>"$table" <<'EOF'
import json, sys
groups, metrics, results, strategy = sys.argv[1:]
k = len(json.load(open(groups))["classes_per_group"])
top1 = [json.loads(l) for l in open(metrics) if '"val_top1"' in l][-1]["val_top1"]
row = [r for r in json.load(open(results)) if r["method"] == "MOS"][-1]
print(f"| {strategy} | {k} | {100 * top1:.2f} | {100 * row['auroc']:.2f} | {100 * row['fpr95']:.2f} |")
EOF
done

echo
echo "Grouping ablation, Fashion-MNIST test vs MNIST (schedule $schedule, precrop $precrop, seed $seed):"
cat "$table"
echo
echo "[ablation] table in $table; took $(( $(date +%s) - start )) s"
