#!/usr/bin/env bash
# CUDA check, for a GPU machine whose python3 has torch 2.11.0 (+cu130) and no
# Rust toolchain: runs the carried target/release/mos against that torch's
# library directory, fails unless CUDA is available, and compares forward passes
# on CUDA against the CPU and against PyTorch, runs the pipeline and a 1-GPU NCCL
# process group, measures torchvision ResNet-50 and ViT-B/16 extraction against
# torchvision (MOS_GPU_CHECK_EXTRACT_TV=0 skips it) and Table 1's cost at paper scale
# (set MOS_GPU_CHECK_PAPER_SCALE=0 to skip that). Prints a report (keep it in
# docs/GPU.md). Usage: scripts/gpu_check.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
mos=${MOS_BIN:-target/release/mos}
py=scripts/torch_ref.py
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fail=0

echo "## mos GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "python torch: $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
echo
echo "### mos env"
"$mos" env
"$mos" env --json >"$out/env.json"
python3 -c "import json,sys; e=json.load(open('$out/env.json')); sys.exit(0 if e['cuda_available'] else 1)" \
    || { echo "FAIL: mos sees no CUDA device"; exit 1; }
"$mos" env --device cuda:0 >/dev/null

echo
echo "### ResNetV2-R14x0.5 fixture: CUDA vs CPU vs the PyTorch reference"
fx=tests/fixtures/model
common=(forward --model ResNetV2-R14x0.5 --model-path "$fx/r14_bit.npz" --input "$fx/r14_expected.safetensors" --input-key x --features)
"$mos" "${common[@]}" --device cpu --output "$out/r14_cpu.safetensors"
for p in fp32 tf32 bf16; do
    "$mos" "${common[@]}" --device cuda --precision "$p" --output "$out/r14_cuda_$p.safetensors"
done
python3 $py compare "$out/r14_cpu.safetensors" "$fx/r14_expected.safetensors" --keys logits --tol 1e-4 || fail=1
# Across devices: features within 1e-4; logits within 1e-3 of the largest logit
# (the fixture's head sums many terms of both signs, which magnifies differences).
feats=features.0,features.1,features.2,features.3,features.4
python3 $py compare "$out/r14_cuda_fp32.safetensors" "$out/r14_cpu.safetensors" --keys $feats --tol 1e-4 || fail=1
python3 $py compare "$out/r14_cuda_fp32.safetensors" "$out/r14_cpu.safetensors" --keys logits --tol 1e-3 || fail=1
python3 $py compare "$out/r14_cuda_tf32.safetensors" "$out/r14_cpu.safetensors" --tol 1e-1 || true
python3 $py compare "$out/r14_cuda_bf16.safetensors" "$out/r14_cpu.safetensors" --tol 1e-1 || true

echo
echo "### BiT-S-R50x1 (random weights), 64 images at 480x480, batch 32: mos vs PyTorch on CUDA"
python3 $py make-model "$out" R50x1 64 480
python3 $py torch-forward "$out" R50x1 cuda 32 3
r50=(forward --model BiT-S-R50x1 --model-path "$out/R50x1.pth.tar" --input "$out/R50x1_input.safetensors" --device cuda --batch 32 --repeat 3)
"$mos" "${r50[@]}" --features --output "$out/r50_mos.safetensors"
python3 $py compare "$out/r50_mos.safetensors" "$out/R50x1_torch.safetensors" --keys $feats --tol 1e-4 || fail=1
python3 $py compare "$out/r50_mos.safetensors" "$out/R50x1_torch.safetensors" --keys logits --tol 1e-3 || fail=1
"$mos" "${r50[@]}" --channels-last --output "$out/r50_mos_cl.safetensors"
python3 $py compare "$out/r50_mos_cl.safetensors" "$out/R50x1_torch.safetensors" --keys logits --tol 1e-3 || fail=1
"$mos" "${r50[@]}" --precision tf32 --output "$out/r50_mos_tf32.safetensors"
"$mos" "${r50[@]}" --precision bf16 --channels-last --output "$out/r50_mos_bf16.safetensors"
python3 $py compare "$out/r50_mos_bf16.safetensors" "$out/R50x1_torch.safetensors" --keys logits --tol 1 || true
echo
echo "### The pipeline on CUDA (demo data): fine-tuning, tune-mahalanobis, test-mos, test-baseline"
d="$out/demo"
"$mos" demo-data --out "$d/data" --train 3000 --val 500 --test 1000 --ood 1000 >/dev/null
groups=configs/fashion_mnist_groups.json
m=(--model ResNetV2-R14x0.5 --crop 32)
t=(--init none --datadir "$d/data/fashion/train" --batch 64 --schedule 20,150,250,300 --precrop 32
   --num-block-open -1 --base-lr 0.03 --logdir "$d" --workers 8 --device cuda)
s=$(date +%s.%N)
"$mos" finetune-group --name group "${m[@]}" "${t[@]}" --group-config "$groups" \
    --train-list "$d/data/lists/train_group.txt" --val-list "$d/data/lists/val_group.txt" 2>&1 | grep -E "val top-1|done" || fail=1
"$mos" finetune-flat --name flat "${m[@]}" "${t[@]}" \
    --train-list "$d/data/lists/train_flat.txt" --val-list "$d/data/lists/val_flat.txt" 2>&1 | grep -E "val top-1|done" || fail=1
echo "two fine-tuning runs of 300 steps, batch 64, on CUDA: $(awk -v s="$s" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
"$mos" tune-mahalanobis --name maha "${m[@]}" --logdir "$d" --batch 64 --device cuda --num-lr-samples 100 \
    --datadir "$d/data/fashion/train" --train-list "$d/data/lists/train_flat.txt" --val-list "$d/data/lists/val_flat.txt" \
    --model-path "$d/flat" 2>&1 | grep -E "magnitude" || fail=1
for dev in cuda cpu; do
    ev=(--in-datadir "$d/data/fashion/test" --out-datadir "$d/data/mnist" --logdir "$d" --batch 128 --workers 8 "${m[@]}" --device "$dev")
    "$mos" test-mos "${ev[@]}" --name "mos_$dev" --model-path "$d/group" --group-config "$groups" \
        --save-scores "$d/mos_$dev.csv" 2>/dev/null | grep -E "^MOS" || fail=1
    "$mos" test-baseline "${ev[@]}" --name "base_$dev" --model-path "$d/flat" --epsilon-odin 0.0014 \
        --score MSP,ODIN,Energy,KL_Div,Mahalanobis --mahalanobis-param-path "$d/maha" \
        --save-scores "$d/base_$dev.csv" 2>/dev/null | grep -vE "^(method|FPR95)" || fail=1
done
echo "per-image scores, CUDA vs CPU (same checkpoints):"
python3 $py compare-scores "$d/mos_cuda.csv" "$d/mos_cpu.csv" 1e-3 || fail=1
# ODIN steps by the sign of a gradient: a near-zero component may flip between
# devices, hence the looser bound. Mahalanobis is reported only: pinvh keeps
# covariance eigenvalues just above its cutoff, so the precision has eigenvalues
# up to ~1e14 and magnifies 1e-6 feature differences (docs/GPU.md).
python3 $py compare-scores "$d/base_cuda.csv" "$d/base_cpu.csv" 1e-2 Mahalanobis || fail=1
echo
echo "### NCCL process group, world size 1 (docs/distributed.md): mos launch -- finetune-flat on CUDA vs one plain process"
# build.rs compiles the NCCL shim only with complete CUDA headers (docs/distributed.md):
# scripts/lib.sh installs them from PyPI for the torch wheel; with your own LIBTORCH set
# MOS_CUDA_INCLUDE or have a CUDA toolkit in /usr/local/cuda.
if ! nm "$mos" 2>/dev/null | grep -q ProcessGroupNCCL; then
    echo "FAIL: this mos was built without NCCL (no complete CUDA headers at build time; see docs/distributed.md#building-c10d-headers-gloo-and-nccl)"
    fail=1
fi
n=(--name nccl1 "${m[@]}" "${t[@]}" --schedule 2,4,6 --eval-every 3
   --train-list "$d/data/lists/train_flat.txt" --val-list "$d/data/lists/val_flat.txt")
"$mos" launch --nproc-per-node 1 -- finetune-flat "${n[@]}" 2>&1 | grep -E "processes \(Nccl|done|Error" || fail=1
grep -q '"world_size": 1' "$d/nccl1/config.json" || { echo "FAIL: no process group in the launched run"; fail=1; }
n[1]=plain1
"$mos" finetune-flat "${n[@]}" 2>&1 | grep -E "done" || fail=1
# One rank: NCCL's all-reduce is a copy, so only cuDNN's nondeterminism separates them.
python3 $py compare "$d/nccl1/checkpoint.safetensors" "$d/plain1/checkpoint.safetensors" --tol 1e-3 | tail -1 || fail=1
# scripts/bench.sh SECTION on CUDA, one round, with the carried binary and this
# machine's python3 (torch, torchvision, scikit-learn, Pillow; no build, no reference
# venv), unless the variable named VAR is 0.
cuda_bench() {
    local section=$1 var=$2
    if [ "${!var:-1}" = 1 ]; then
        MOS_BIN="$mos" MOS_PYTHON=python3 MOS_DEVICE=cuda scripts/bench.sh "$section" --rounds 1 || fail=1
    else
        echo "skipped ($var=0)"
    fi
}
echo
echo "### torchvision's ResNet-50 and ViT-B/16 end to end on CUDA: scripts/bench.sh extract-tv"
# 1,024 and 512 JPEGs with ImageNet validation's sizes, batch 64, mos vs torchvision's
# DataLoader + model on the same device, and a whole ResNet-50 table's time at mos's rate.
cuda_bench extract-tv MOS_GPU_CHECK_EXTRACT_TV
echo
echo "### Table 1 at paper scale (docs/benchmark.md): scripts/bench.sh paper-scale on CUDA"
# 2,048 JPEGs with ImageNet validation's sizes through BiT-S-R101x1 at 480x480, then the
# image passes of ODIN and Mahalanobis on 2 x 256.
cuda_bench paper-scale MOS_GPU_CHECK_PAPER_SCALE
echo
echo "gpu_check: $SECONDS s in all"
if [ "$fail" = 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; exit 1; fi
