#!/usr/bin/env bash
# Benchmarks that print ratios against a baseline measured in the same run.
# Usage: scripts/bench.sh [forward|loader|scores|train]... [--images N] [--size S]
#                         [--rounds N] [--steps N] [--same-malloc]
#   forward: BiT-S-R50x1 and BiT-S-R101x1 forward images/s, mos vs the PyTorch
#            reference (tests/fixtures/make_model_fixtures.py) on the same threads
#            and the same random weights and inputs (CPU).
#   loader:  images/s of the eval loader (decode + resize to 480 + normalize) on
#            real-photo JPEGs, mos data-check vs torchvision's DataLoader, same workers.
#   scores:  wall time of test-baseline per method relative to MSP on the same data
#            (ResNetV2-R26x0.5 with random weights at 128x128).
#   train:   fine-tuning step images/s (forward, backward, SGD) of BiT-S-R50x1 at
#            224x224, num_block_open 0 and -1, mos bench-train vs the same step in
#            PyTorch (the paper code's model, in-place ReLU), random data in memory,
#            same threads; --rounds interleaved rounds of --steps timed steps each,
#            medians printed with every round's ratio. --same-malloc gives the
#            PyTorch process the glibc malloc settings mos makes for itself
#            (src/runtime.rs), to separate that gain from the rest.
# With no section, runs all four. Needs the PyTorch of the setup cache (or a
# python3 with torch 2.11); loader and scores install torchvision 0.26, Pillow and
# scikit-learn (for its sample photos) once into the cache.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
cd "$here/.."
what=()
images=4
size=480
rounds=3
steps=4
torch_env=()
while [ $# -gt 0 ]; do
    case "$1" in
        forward | loader | scores | train) what+=("$1") ;;
        --images) images=$2; shift ;;
        --size) size=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --steps) steps=$2; shift ;;
        --same-malloc) torch_env=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824) ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ ${#what[@]} -gt 0 ] || what=(forward loader scores train)
scripts/build.sh >/dev/null
mos=target/release/mos
if [ -z "${LIBTORCH:-}" ]; then
    export PYTHONPATH="$(mos_torch_home)/site${PYTHONPATH:+:$PYTHONPATH}"
fi
bench_site="$(dirname "$(mos_torch_home)")/bench-site"
if ! PYTHONPATH="$bench_site:$PYTHONPATH" python3 -c 'import torchvision, PIL, sklearn' 2>/dev/null; then
    mos_log "installing torchvision 0.26, Pillow and scikit-learn for the benchmarks into $bench_site"
    python3 -m pip install --disable-pip-version-check -q --target "$bench_site" --no-deps \
        torchvision==0.26.0 pillow scikit-learn scipy joblib threadpoolctl narwhals
fi
export PYTHONPATH="$bench_site:$PYTHONPATH"
python3 -c 'import torch' 2>/dev/null || { echo "bench needs python3 with torch 2.11 (the setup cache has one)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
threads=$(nproc)

rate() { sed -n 's/.*forward[^:]*: \([0-9.]*\) images\/s.*/\1/p'; }
train_rate() { sed -n 's/.*: \([0-9.]*\) images\/s.*/\1/p'; }

has() { [[ " ${what[*]} " == *" $1 "* ]]; }
# The median of numbers (the mean of the middle two for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
now() { date +%s.%N; }

if has forward; then
    echo "forward, CPU, $threads threads, $images images of ${size}x${size}, batch $images, 2 timed passes after 1 warm-up"
    printf '%-14s %12s %12s %8s %14s %8s\n' model "PyTorch i/s" "mos i/s" ratio "mos NHWC i/s" ratio
    for m in R50x1 R101x1; do
        python3 scripts/torch_ref.py make-model "$tmp" "$m" "$images" "$size"
        base=$(OMP_NUM_THREADS=$threads python3 scripts/torch_ref.py torch-forward "$tmp" "$m" cpu "$images" 2 | rate)
        args=(forward --model "BiT-S-$m" --model-path "$tmp/$m.pth.tar" --input "$tmp/${m}_input.safetensors"
              --device cpu --batch "$images" --repeat 2)
        ours=$("$mos" "${args[@]}" --output "$tmp/$m.mos.safetensors" | rate)
        ours_cl=$("$mos" "${args[@]}" --channels-last --output "$tmp/$m.mos_cl.safetensors" | rate)
        python3 scripts/torch_ref.py compare "$tmp/$m.mos.safetensors" "$tmp/${m}_torch.safetensors" --keys logits --tol 1e-4 >/dev/null \
            || { echo "BiT-S-$m: mos and PyTorch logits differ" >&2; exit 1; }
        # Channels-last runs other convolution kernels: same values up to rounding.
        python3 scripts/torch_ref.py compare "$tmp/$m.mos_cl.safetensors" "$tmp/${m}_torch.safetensors" --keys logits --tol 1e-3 >/dev/null \
            || { echo "BiT-S-$m: channels-last logits differ from PyTorch" >&2; exit 1; }
        awk -v m="BiT-S-$m" -v b="$base" -v o="$ours" -v c="$ours_cl" \
            'BEGIN { printf "%-14s %12.3f %12.3f %7.2fx %14.3f %7.2fx\n", m, b, o, o / b, c, c / b }'
    done
fi

if has loader; then
    python3 scripts/torch_ref.py make-jpegs "$tmp/jpegs" 256
    echo
    echo "eval loader, 256 real-photo JPEGs to 480x480, batch 32, $threads workers"
    base=$(python3 scripts/torch_ref.py torch-loader "$tmp/jpegs" "$threads" 32 480 | sed -n 's/.*: \([0-9.]*\) images\/s.*/\1/p')
    ours=$("$mos" data-check --datadir "$tmp/jpegs" --workers "$threads" --batch 32 | sed -n 's/^loader: .* \([0-9.]*\) images\/s.*/\1/p')
    awk -v b="$base" -v o="$ours" 'BEGIN { printf "torchvision %.1f images/s, mos %.1f images/s: %.2fx\n", b, o, o / b }'
fi

if has scores; then
    python3 scripts/torch_ref.py make-jpegs "$tmp/id/a" 48 1
    python3 scripts/torch_ref.py make-jpegs "$tmp/id/b" 48 2
    python3 scripts/torch_ref.py make-jpegs "$tmp/ood" 64 3
    python3 scripts/torch_ref.py make-model "$tmp" R26x0.5 1 8 2
    echo
    echo "test-baseline wall time per method, ResNetV2-R26x0.5 (random weights), 96 ID + 64 OOD images at 128x128, CPU"
    run_method() {
        local start end
        start=$(now)
        "$mos" test-baseline --in-datadir "$tmp/id" --out-datadir "$tmp/ood" --logdir "$tmp/runs" --name "$1" \
            --model ResNetV2-R26x0.5 --model-path "$tmp/R26x0.5.pth.tar" --crop 128 --batch 32 \
            --workers "$threads" --device cpu --score "$@" >/dev/null 2>&1
        end=$(now)
        awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }'
    }
    # Mahalanobis parameters: tuned on the ID images (lists written here).
    find "$tmp/id" -name '*.jpg' | sort | awk -F/ '{ print $(NF-2) "/" $(NF-1) "/" $NF " " ($(NF-2) == "a" ? 0 : 1) }' >"$tmp/id_list.txt"
    "$mos" tune-mahalanobis --datadir "$tmp/id" --train-list "$tmp/id_list.txt" --val-list "$tmp/id_list.txt" \
        --model ResNetV2-R26x0.5 --model-path "$tmp/R26x0.5.pth.tar" --logdir "$tmp/runs" --name maha \
        --crop 128 --batch 32 --num-lr-samples 20 --workers "$threads" --device cpu >/dev/null 2>&1
    run_method MSP >/dev/null # warm-up (page cache, libtorch start-up)
    msp=$(run_method MSP)
    printf '%-26s %8s %8s\n' method seconds "vs MSP"
    maha="Mahalanobis --mahalanobis-param-path $tmp/runs/maha"
    for spec in "MSP" "Energy" "KL_Div" "ODIN --epsilon-odin 0" "ODIN --epsilon-odin 0.0014" "$maha" "MSP,Energy,KL_Div,ODIN"; do
        read -r -a words <<<"$spec"
        # shellcheck disable=SC2068
        t=$(run_method ${words[@]})
        awk -v m="${spec%% --mahalanobis*}" -v t="$t" -v b="$msp" 'BEGIN { printf "%-26s %8.2f %7.2fx\n", m, t, t / b }'
    done
fi

if has train; then
    echo
    echo "fine-tuning step, BiT-S-R50x1, batch 8 at 224x224, CPU, $threads threads;"
    echo "each round: PyTorch then mos, $steps timed steps after 1 warm-up; medians of $rounds rounds"
    [ ${#torch_env[@]} -eq 0 ] || echo "PyTorch runs with mos's malloc settings: ${torch_env[*]}"
    printf '%-16s %12s %12s %8s   %s\n' num_block_open "PyTorch i/s" "mos i/s" ratio "ratio per round"
    for nbo in 0 -1; do
        bases=() ours=() ratios=()
        for _ in $(seq "$rounds"); do
            b=$(env "${torch_env[@]}" OMP_NUM_THREADS="$threads" python3 scripts/torch_ref.py torch-train R50x1 8 224 "$nbo" "$steps" | train_rate)
            o=$("$mos" bench-train --model BiT-S-R50x1 --batch 8 --size 224 --num-block-open "$nbo" --steps "$steps" --device cpu | train_rate)
            bases+=("$b") ours+=("$o") ratios+=("$(awk -v b="$b" -v o="$o" 'BEGIN { printf "%.2f", o / b }')")
        done
        awk -v n="$nbo" -v b="$(median "${bases[@]}")" -v o="$(median "${ours[@]}")" -v r="$(median "${ratios[@]}")" -v all="${ratios[*]}" \
            'BEGIN { printf "%-16s %12.2f %12.2f %7.2fx   %s\n", n, b, o, r, all }'
    done
fi
