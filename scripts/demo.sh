#!/usr/bin/env bash
# The whole MOS pipeline on real data shipped in the repository (dataset/demo/):
# Fashion-MNIST is in-distribution; MNIST digits and inverted Fashion-MNIST test images
# are out-of-distribution.
#   setup + build -> demo-data -> finetune-group and finetune-flat (a small
#   ResNetV2 from scratch) -> tune-mahalanobis -> mos benchmark (MOS and the five
#   baselines, configs/benchmarks/demo.json) -> mos report (Markdown) and plots.
# Usage: scripts/demo.sh [--seed N] [RUN_DIR]   (default seed 0, runs/demo-<date>-<time>)
#   --seed N: the seed of both fine-tunings (initialisation, data order, crops, flips).
set -euo pipefail
seed=0
run=
while [ $# -gt 0 ]; do
    case "$1" in
        --seed) seed=${2:?--seed needs a number}; shift ;;
        -*) echo "demo.sh: unknown option $1 (usage: scripts/demo.sh [--seed N] [RUN_DIR])" >&2; exit 2 ;;
        *) run=$1 ;;
    esac
    shift
done
case "$seed" in '' | *[!0-9]*) echo "demo.sh: --seed needs a non-negative integer, got '$seed'" >&2; exit 2 ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
scripts/build.sh
mos=target/release/mos
run=${run:-runs/demo-$(date +%Y%m%d-%H%M%S)}
data=$run/data
mkdir -p "$run"
echo "[demo] run directory: $run (seed $seed)"

"$mos" demo-data --out "$data"
groups=configs/fashion_mnist_groups.json
model=(--model ResNetV2-R14x0.5 --crop 32 --device "${MOS_DEVICE:-auto}")
train=(--init none --dataset fashion-mnist --datadir "$data/fashion/train" --batch 64 --schedule 100,1200,1700,2000 --eval-every 500
       --precrop 36 --num-block-open -1 --base-lr 0.03 --seed "$seed" --workers "$(nproc)" --logdir "$run")

"$mos" finetune-group --name finetune_group "${model[@]}" "${train[@]}" --group-config "$groups" \
    --train-list "$data/lists/train_group.txt" --val-list "$data/lists/val_group.txt"
"$mos" finetune-flat --name finetune_flat "${model[@]}" "${train[@]}" \
    --train-list "$data/lists/train_flat.txt" --val-list "$data/lists/val_flat.txt"
"$mos" tune-mahalanobis --name tune_mahalanobis "${model[@]}" --logdir "$run" --batch 64 \
    --datadir "$data/fashion/train" --train-list "$data/lists/train_flat.txt" --val-list "$data/lists/val_flat.txt" \
    --model-path "$run/finetune_flat" --num-lr-samples 250 --workers "$(nproc)"

# The table through mos benchmark (configs/benchmarks/demo.json, its paths pointed at
# this run): each model and set goes through the network once into feature stores,
# ODIN / Mahalanobis image passes only where their settings need them.
"$mos" benchmark --config configs/benchmarks/demo.json --logdir "$run" --name benchmark \
    --in-datadir "$data/fashion/test" --out-datadir "$data/mnist" --out-datadir "$data/fashion_inverted" \
    --group-model-path "$run/finetune_group" --flat-model-path "$run/finetune_flat" \
    --mahalanobis-param-path "$run/tune_mahalanobis" --workers "$(nproc)" --device "${MOS_DEVICE:-auto}"
# Score histograms and ROC curves from the benchmark's stores (no image read again).
stores=$run/benchmark/stores
"$mos" score --id "$stores/group/test" --ood "$stores/group/mnist" --ood "$stores/group/fashion_inverted" \
    --score MOS --group-config "$groups" --logdir "$run" --name plots --plot >"$run/plots_mos.log" 2>&1 ||
    { cat "$run/plots_mos.log" >&2; exit 1; }
"$mos" score --id "$stores/flat/test" --ood "$stores/flat/mnist" --ood "$stores/flat/fashion_inverted" \
    --score MSP,ODIN,Energy,KL_Div --logdir "$run" --name plots --plot >"$run/plots_flat.log" 2>&1 ||
    { cat "$run/plots_flat.log" >&2; exit 1; }

echo
echo "In-distribution validation top-1 (1,000 held-out Fashion-MNIST images):"
for m in finetune_group finetune_flat; do
    tail -n 1 "$run/$m/metrics.jsonl" | sed -n 's/.*"val_top1":\([0-9.]*\).*/\1/p' |
        awk -v m="$m" '{ printf "  %-15s %.2f%%\n", m, 100 * $1 }'
done
echo
echo "OOD detection, Fashion-MNIST test (2,000) vs MNIST (2,000) and inverted Fashion-MNIST test (2,000); AUROC / FPR95 in %:"
"$mos" report "$run/benchmark" --format markdown | tee "$run/report.md"
echo
echo "[demo] results, logs and plots (SVG) are in $run; took $(( $(date +%s) - start )) s"
