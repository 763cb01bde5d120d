#!/usr/bin/env bash
# Benchmarks that print ratios against a baseline measured in the same run.
# Usage: scripts/bench.sh [forward|loader|scores|train|dist|store|groups|posthoc|benchmark|paper-scale|extract-tv|rankfeat]...
#                         [--images N] [--size S]
#                         [--rounds N] [--steps N] [--same-malloc] [--smoke]
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
#            same threads. --same-malloc gives the PyTorch process the glibc malloc
#            settings mos makes for itself (src/runtime.rs), to separate that gain.
#   dist:    the all-reduce's share of a fine-tuning step of BiT-S-R50x1 (all blocks
#            trainable, batch 8 per process at 224x224) on 2 CPU processes (mos launch,
#            c10d Gloo over loopback), for gradient buckets of 1, 4, 25 and 100 MiB
#            (docs/distributed.md#benchmark; the default --bucket-mb comes from it).
#   store:   feature stores (docs/cluster.md): mos extract of the ID and OOD sets vs
#            test-baseline --score MSP on the same images (ResNetV2-R26x0.5, random
#            weights); mos score of every logit method from synthetic stores of
#            50,000 ID + 10,000 OOD rows of 1,000 logits (MOS: 1,008); the bytes per
#            image of a store, and what float16 tensors would save and change
#            (scripts/store_ref.py).
#   groups:  mos make-groups --strategy taxonomy of 21,843 classes (ImageNet-21k's
#            size: every third noun synset of WordNet 3.0, /usr/share/wordnet from
#            scripts/system-deps.sh), parsing included, against the 5 s target;
#            the groups checked against scripts/groups_ref.py.
#   posthoc: mos score of each post-hoc method (docs/scores.md) from synthetic stores
#            of 2,048-d features and 1,000 classes: every method but KNN on 50,000 ID +
#            10,000 OOD rows (ReAct, ViM and DICE fitted once on a 20,000-row store,
#            then reused; NNGuide with a 12,811-row guide bank, beside the same
#            float32 products of queries and bank alone in PyTorch, its floor), KNN
#            with k = 1000 for 5,000 + 5,000 queries against a 100,000-row bank; the
#            scoring seconds of results.json, the command's wall time and peak
#            memory (max RSS). One round.
#   benchmark: mos benchmark vs the same table made the original way (one test-mos
#            and one test-baseline per method and OOD set), two OOD sets, random
#            ResNetV2-R26x0.5 group and flat models, with the store-served settings
#            (ODIN epsilon 0, Mahalanobis magnitude 0) and with image passes.
#   paper-scale: end-to-end extraction images/s of BiT-S-R101x1 at 480x480 on
#            the machine's device (MOS_DEVICE, default auto) over JPEGs with
#            ImageNet validation's sizes, the image passes of ODIN and Mahalanobis
#            as mos benchmark shares them with the flat model's extraction, and the
#            extrapolated time of the paper's whole Table 1.
#   extract-tv: end-to-end evaluation extraction images/s (JPEG decode, Resize(256),
#            CenterCrop(224), ImageNet normalisation, forward; float32, on the CPU
#            or MOS_DEVICE, there 1,024 and 512 images, batch 64) of
#            torchvision's resnet50 and vit_b_16: mos extract (logits,features) vs
#            torchvision's ImageFolder + DataLoader and model under inference_mode
#            (scripts/tv_extract_ref.py), the same random weights (torch.save state
#            dict), JPEGs with ImageNet validation's sizes, batch, workers and
#            threads; torchvision's forward alone on as many random inputs (the
#            ceiling of any extraction with those kernels); the outputs compared,
#            and the extrapolated time of a whole ResNet-50 table (85,640 images)
#            at mos's rate.
#   rankfeat: the cost of RankFeat's stored layer: mos extract with --layers
#            logits,rankfeat against --layers logits on the same JPEGs, random
#            BiT-S-R101x1 at 480 and torchvision ResNet-50 at 224, CPU (or
#            MOS_DEVICE), images/s of the extraction loop; interleaved rounds.
# Every section runs --rounds interleaved rounds (baseline then mos, so that a
# machine-wide slowdown hits both) and prints the median of each side and of the
# per-round ratios, with every round's ratio. --smoke runs every section on tiny
# inputs, one round (CI uses it to check that the script works; its numbers mean
# nothing).
# With no section, runs them all. The Python side runs in the pinned reference
# environment of scripts/lib.sh (mos_python_env: a venv with numpy, scipy,
# scikit-learn, Pillow, torchvision and the setup cache's torch), made on first use,
# or in MOS_PYTHON; MOS_BIN names a mos binary to measure instead of building one.
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
smoke=0
torch_env=()
while [ $# -gt 0 ]; do
    case "$1" in
        forward | loader | scores | train | dist | store | groups | posthoc | benchmark | paper-scale | extract-tv | rankfeat) what+=("$1") ;;
        --images) images=$2; shift ;;
        --size) size=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --steps) steps=$2; shift ;;
        --same-malloc) torch_env=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824) ;;
        --smoke) smoke=1 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ ${#what[@]} -gt 0 ] || what=(forward loader scores train dist store groups posthoc benchmark paper-scale extract-tv rankfeat)
# Sizes of the loader, scores and train sections (--smoke shrinks them all).
jpegs=256 loader_size=480 score_size=128 score_id=48 score_ood=64 train_size=224 train_batch=8
store_id=96 store_ood=64 store_size=480 syn_id=50000 syn_ood=10000
group_classes=21843
dist_buckets="1 4 25 100"
ph_id=50000 ph_ood=10000 ph_fit=20000 knn_q=5000 knn_bank=100000 knn_k=1000 nng_bank=12811
bench_id=32 bench_ood=32 bench_size=96 ps_images=32 ps_pass=4 ps_crop=480 ps_batch=16
tv_r50=64 tv_vit=32 tv_batch=16
rf_bit=8 rf_r50=64
# On a GPU (MOS_DEVICE=cuda...), enough images for a steady rate.
case "${MOS_DEVICE:-}" in cuda*) ps_images=2048 ps_pass=256 ps_batch=64 tv_r50=1024 tv_vit=512 tv_batch=64 ;; esac
if [ "$smoke" = 1 ]; then
    bench_id=6 bench_ood=4 bench_size=32 ps_images=4 ps_pass=1 ps_crop=64 ps_batch=2
    images=1 size=64 rounds=1 steps=1
    jpegs=16 loader_size=64 score_size=32 score_id=6 score_ood=4 train_size=64 train_batch=2
    store_id=6 store_ood=4 store_size=32 syn_id=1000 syn_ood=100
    group_classes=200
    dist_buckets="4"
    ph_id=200 ph_ood=100 ph_fit=1100 knn_q=50 knn_bank=400 knn_k=50 nng_bank=300
    tv_r50=4 tv_vit=4 tv_batch=2 # the same 224 crop: only the image count shrinks
    rf_bit=2 rf_r50=4
fi
# MOS_BIN: a mos built elsewhere (no build here); MOS_PYTHON: a Python that has torch,
# numpy, scipy, scikit-learn and Pillow (no reference venv made here). A GPU machine
# with no Rust toolchain and no network runs it so (scripts/gpu_check.sh).
if [ -n "${MOS_BIN:-}" ]; then
    mos=$MOS_BIN
    [ -x "$mos" ] || { echo "bench: MOS_BIN=$mos is not an executable" >&2; exit 2; }
else
    scripts/build.sh >/dev/null
    mos=target/release/mos
fi
py=${MOS_PYTHON:-$(mos_python_env)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
threads=$(nproc)
ref() { "$py" scripts/torch_ref.py "$@"; }

rate() { sed -n 's/.*: \([0-9.]*\) images\/s.*/\1/p'; }
has() { [[ " ${what[*]} " == *" $1 "* ]]; }
# The median of numbers (the mean of the middle two for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
now() { date +%s.%N; }
# A rate that is not a positive number means the command's output changed.
check_rate() {
    awk -v r="$2" 'BEGIN { exit !(r + 0 > 0) }' || { echo "bench: no rate from $1 (got '$2')" >&2; exit 1; }
}

if has forward; then
    echo "forward, CPU, $threads threads, $images images of ${size}x${size}, batch $images, 2 timed passes after 1 warm-up;"
    echo "each round: PyTorch, mos, mos channels-last; medians of $rounds rounds"
    printf '%-14s %12s %12s %8s %14s %8s   %s\n' model "PyTorch i/s" "mos i/s" ratio "mos NHWC i/s" ratio "ratios per round (NCHW)"
    for m in R50x1 R101x1; do
        ref make-model "$tmp" "$m" "$images" "$size"
        args=(forward --model "BiT-S-$m" --model-path "$tmp/$m.pth.tar" --input "$tmp/${m}_input.safetensors"
              --device cpu --batch "$images" --repeat 2)
        bases=() ours=() ours_cl=() ratios=() ratios_cl=()
        for _ in $(seq "$rounds"); do
            b=$(OMP_NUM_THREADS=$threads ref torch-forward "$tmp" "$m" cpu "$images" 2 | rate)
            o=$("$mos" "${args[@]}" --output "$tmp/$m.mos.safetensors" | rate)
            c=$("$mos" "${args[@]}" --channels-last --output "$tmp/$m.mos_cl.safetensors" | rate)
            check_rate "PyTorch forward" "$b"; check_rate "mos forward" "$o"; check_rate "mos forward --channels-last" "$c"
            bases+=("$b") ours+=("$o") ours_cl+=("$c") ratios+=("$(ratio "$o" "$b")") ratios_cl+=("$(ratio "$c" "$b")")
        done
        ref compare "$tmp/$m.mos.safetensors" "$tmp/${m}_torch.safetensors" --keys logits --tol 1e-4 >/dev/null \
            || { echo "BiT-S-$m: mos and PyTorch logits differ" >&2; exit 1; }
        # Channels-last runs other convolution kernels: same values up to rounding.
        ref compare "$tmp/$m.mos_cl.safetensors" "$tmp/${m}_torch.safetensors" --keys logits --tol 1e-3 >/dev/null \
            || { echo "BiT-S-$m: channels-last logits differ from PyTorch" >&2; exit 1; }
        awk -v m="BiT-S-$m" -v b="$(median "${bases[@]}")" -v o="$(median "${ours[@]}")" -v r="$(median "${ratios[@]}")" \
            -v c="$(median "${ours_cl[@]}")" -v rc="$(median "${ratios_cl[@]}")" -v all="${ratios[*]}" \
            'BEGIN { printf "%-14s %12.3f %12.3f %7.2fx %14.3f %7.2fx   %s\n", m, b, o, r, c, rc, all }'
    done
fi

if has loader; then
    ref make-jpegs "$tmp/jpegs" "$jpegs"
    echo
    echo "eval loader, $jpegs real-photo JPEGs to ${loader_size}x${loader_size}, batch 32, $threads workers;"
    echo "each round: torchvision then mos; medians of $rounds rounds"
    bases=() ours=() ratios=()
    for _ in $(seq "$rounds"); do
        b=$(ref torch-loader "$tmp/jpegs" "$threads" 32 "$loader_size" | rate)
        o=$("$mos" data-check --datadir "$tmp/jpegs" --workers "$threads" --batch 32 --crop "$loader_size" | sed -n 's/^loader: .* \([0-9.]*\) images\/s.*/\1/p')
        check_rate "torchvision loader" "$b"; check_rate "mos data-check" "$o"
        bases+=("$b") ours+=("$o") ratios+=("$(ratio "$o" "$b")")
    done
    awk -v b="$(median "${bases[@]}")" -v o="$(median "${ours[@]}")" -v r="$(median "${ratios[@]}")" -v all="${ratios[*]}" \
        'BEGIN { printf "torchvision %.1f images/s, mos %.1f images/s: %.2fx (per round: %s)\n", b, o, r, all }'
fi

if has scores; then
    ref make-jpegs "$tmp/id/a" "$score_id" 1
    ref make-jpegs "$tmp/id/b" "$score_id" 2
    ref make-jpegs "$tmp/ood" "$score_ood" 3
    ref make-model "$tmp" R26x0.5 1 8 2
    echo
    echo "test-baseline wall time per method, ResNetV2-R26x0.5 (random weights), $((2 * score_id)) ID + $score_ood OOD images at ${score_size}x${score_size}, CPU;"
    echo "each round runs every row once, MSP first; a row's ratio is its time over that round's MSP; medians of $rounds rounds"
    run_method() {
        local start end
        start=$(now)
        "$mos" test-baseline --in-datadir "$tmp/id" --out-datadir "$tmp/ood" --logdir "$tmp/runs" --name "$1" \
            --model ResNetV2-R26x0.5 --model-path "$tmp/R26x0.5.pth.tar" --crop "$score_size" --batch 32 \
            --workers "$threads" --device cpu --score "$@" >"$tmp/score.log" 2>&1 ||
            { cat "$tmp/score.log" >&2; echo "bench: test-baseline --score $* failed" >&2; exit 1; }
        end=$(now)
        awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }'
    }
    # Mahalanobis parameters: tuned on the ID images (lists written here).
    find "$tmp/id" -name '*.jpg' | sort | awk -F/ '{ print $(NF-2) "/" $(NF-1) "/" $NF " " ($(NF-2) == "a" ? 0 : 1) }' >"$tmp/id_list.txt"
    "$mos" tune-mahalanobis --datadir "$tmp/id" --train-list "$tmp/id_list.txt" --val-list "$tmp/id_list.txt" \
        --model ResNetV2-R26x0.5 --model-path "$tmp/R26x0.5.pth.tar" --logdir "$tmp/runs" --name maha \
        --crop "$score_size" --batch 32 --num-lr-samples "$(( score_id < 20 ? score_id : 20 ))" \
        --workers "$threads" --device cpu >"$tmp/maha.log" 2>&1 ||
        { cat "$tmp/maha.log" >&2; echo "bench: tune-mahalanobis failed" >&2; exit 1; }
    maha="Mahalanobis --mahalanobis-param-path $tmp/runs/maha"
    specs=("MSP" "Energy" "KL_Div" "ODIN --epsilon-odin 0" "ODIN --epsilon-odin 0.0014" "$maha" "MSP,Energy,KL_Div,ODIN")
    run_method MSP >/dev/null # warm-up (page cache, libtorch start-up)
    declare -A row_times=() row_ratios=()
    for _ in $(seq "$rounds"); do
        msp=""
        for i in "${!specs[@]}"; do
            read -r -a words <<<"${specs[$i]}"
            t=$(run_method "${words[@]}")
            [ -n "$msp" ] || msp=$t
            row_times[$i]+="$t " row_ratios[$i]+="$(ratio "$t" "$msp") "
        done
    done
    printf '%-26s %8s %8s   %s\n' method seconds "vs MSP" "ratio per round"
    for i in "${!specs[@]}"; do
        # shellcheck disable=SC2086
        awk -v m="${specs[$i]%% --mahalanobis*}" -v t="$(median ${row_times[$i]})" -v r="$(median ${row_ratios[$i]})" -v all="${row_ratios[$i]}" \
            'BEGIN { printf "%-26s %8.2f %7.2fx   %s\n", m, t, r, all }'
    done
fi

if has train; then
    echo
    echo "fine-tuning step, BiT-S-R50x1, batch $train_batch at ${train_size}x${train_size}, CPU, $threads threads;"
    echo "each round: PyTorch then mos, $steps timed steps after 1 warm-up; medians of $rounds rounds"
    [ ${#torch_env[@]} -eq 0 ] || echo "PyTorch runs with mos's malloc settings: ${torch_env[*]}"
    printf '%-16s %12s %12s %8s   %s\n' num_block_open "PyTorch i/s" "mos i/s" ratio "ratio per round"
    for nbo in 0 -1; do
        bases=() ours=() ratios=()
        for _ in $(seq "$rounds"); do
            b=$(env "${torch_env[@]}" OMP_NUM_THREADS="$threads" "$py" scripts/torch_ref.py torch-train R50x1 "$train_batch" "$train_size" "$nbo" "$steps" | rate)
            o=$("$mos" bench-train --model BiT-S-R50x1 --batch "$train_batch" --size "$train_size" --num-block-open "$nbo" --steps "$steps" --device cpu | rate)
            check_rate "PyTorch training step" "$b"; check_rate "mos bench-train" "$o"
            bases+=("$b") ours+=("$o") ratios+=("$(ratio "$o" "$b")")
        done
        awk -v n="$nbo" -v b="$(median "${bases[@]}")" -v o="$(median "${ours[@]}")" -v r="$(median "${ratios[@]}")" -v all="${ratios[*]}" \
            'BEGIN { printf "%-16s %12.2f %12.2f %7.2fx   %s\n", n, b, o, r, all }'
    done
fi

if has dist; then
    echo
    echo "all-reduce share of a fine-tuning step: BiT-S-R50x1, all blocks trainable, 2 CPU processes (Gloo, loopback),"
    echo "batch $train_batch per process at ${train_size}x${train_size}, $threads cores shared; $steps timed steps after 1 warm-up; medians of $rounds rounds"
    printf '%-11s %8s %14s %12s %8s   %s\n' "bucket MiB" buckets "all-reduce s" "step s" share "share per round"
    for mb in $dist_buckets; do
        reds=() steps_s=() shares=() nb=""
        for _ in $(seq "$rounds"); do
            out=$("$mos" launch --nproc-per-node 2 -- bench-train --model BiT-S-R50x1 --batch "$train_batch" \
                --size "$train_size" --num-block-open -1 --steps "$steps" --device cpu --bucket-mb "$mb" 2>"$tmp/dist.log") \
                || { cat "$tmp/dist.log" >&2; echo "bench: mos launch -- bench-train failed" >&2; exit 1; }
            red=$(sed -n 's/.*all-reduce \([0-9.]*\) s of \([0-9.]*\) s per step (\([0-9.]*\)%), .* in \([0-9]*\) buckets.*/\1 \2 \3 \4/p' <<<"$out")
            [ -n "$red" ] || { echo "bench: no all-reduce time in: $out" >&2; exit 1; }
            read -r r s sh nb <<<"$red"
            reds+=("$r") steps_s+=("$s") shares+=("$sh")
        done
        printf '%-11s %8s %14.3f %12.3f %7.1f%%   %s\n' "$mb" "$nb" "$(median "${reds[@]}")" "$(median "${steps_s[@]}")" \
            "$(median "${shares[@]}")" "${shares[*]}"
    done
fi

if has store; then
    sref() { "$py" scripts/store_ref.py "$@"; }
    ref make-jpegs "$tmp/sid/a" "$store_id" 1
    ref make-jpegs "$tmp/sid/b" "$store_id" 2
    ref make-jpegs "$tmp/sood/x" "$store_ood" 3
    ref make-model "$tmp" R26x0.5 1 8 2
    common=(--model ResNetV2-R26x0.5 --model-path "$tmp/R26x0.5.pth.tar" --crop "$store_size" --batch 32
            --workers "$threads" --device cpu)
    timed() {
        local start end
        start=$(now)
        "$@" >"$tmp/store_cmd.log" 2>&1 || { cat "$tmp/store_cmd.log" >&2; echo "bench: $* failed" >&2; exit 1; }
        end=$(now)
        awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }'
    }
    extract_both() {
        rm -rf "$tmp/stores"
        "$mos" extract --datadir "$tmp/sid" --output "$tmp/stores/sid" "${common[@]}" &&
            "$mos" extract --datadir "$tmp/sood" --output "$tmp/stores/sood" "${common[@]}"
    }
    echo
    echo "store: mos extract (logits,features) of $((2 * store_id)) ID + $store_ood OOD JPEGs vs test-baseline --score MSP on the same images,"
    echo "ResNetV2-R26x0.5 (random weights) at ${store_size}x${store_size} (the paper's crop), batch 32, CPU; each round: test-baseline (one process)"
    echo "then extract (two processes: ID, OOD); medians of $rounds rounds"
    start_cost=$(timed "$mos" extract --help)
    echo "one process start (loading libtorch; mos extract --help): $start_cost s, paid once more by extract than by test-baseline"
    timed extract_both >/dev/null # warm-up (page cache)
    bases=() ours=() ratios=()
    for _ in $(seq "$rounds"); do
        b=$(timed "$mos" test-baseline --in-datadir "$tmp/sid" --out-datadir "$tmp/sood" --logdir "$tmp/runs" --name store_base \
            --score MSP "${common[@]}")
        o=$(timed extract_both)
        bases+=("$b") ours+=("$o") ratios+=("$(ratio "$b" "$o")")
    done
    n_img=$((2 * store_id + store_ood))
    awk -v n="$n_img" -v b="$(median "${bases[@]}")" -v o="$(median "${ours[@]}")" -v r="$(median "${ratios[@]}")" -v all="${ratios[*]}" \
        'BEGIN { printf "test-baseline %.2f s (%.1f images/s), extract %.2f s (%.1f images/s): extraction at %.2fx test-baseline'"'"'s speed (per round: %s)\n", b, n / b, o, n / o, r, all }'
    "$mos" score --id "$tmp/stores/sid" --ood "$tmp/stores/sood" --score MSP --logdir "$tmp/runs" --name store_check \
        --save-scores "$tmp/store.csv" >/dev/null 2>&1
    "$mos" test-baseline --in-datadir "$tmp/sid" --out-datadir "$tmp/sood" --logdir "$tmp/runs" --name store_base \
        --score MSP "${common[@]}" --save-scores "$tmp/base.csv" >/dev/null 2>&1
    cmp -s "$tmp/store.csv" "$tmp/base.csv" || { echo "bench: mos score and test-baseline scores differ" >&2; exit 1; }
    bytes=$(cat "$tmp"/stores/sid/shard-*.safetensors | wc -c)
    echo "a store of R26x0.5 logits (2) and features (1024): $(awk -v b="$bytes" -v n="$((2 * store_id))" 'BEGIN { printf "%.0f", b / n }') bytes per image (tensors; the index adds the path)"

    echo
    echo "mos score from synthetic stores: $syn_id ID + $syn_ood OOD rows of 1,000 logits (MOS: 1,008, taxonomy_level0), $threads threads,"
    echo "wall time of the whole command (reading the stores included); medians of $rounds rounds"
    sref synthetic "$tmp/syn/val" "$syn_id" 1000 0
    sref synthetic "$tmp/syn/ood" "$syn_ood" 1000 1
    sref synthetic "$tmp/syn/gval" "$syn_id" 1000 0 8
    sref synthetic "$tmp/syn/good" "$syn_ood" 1000 1 8
    # taxonomy_level0 covers 1,000 classes in 8 groups: 1,008 logits.
    specs=("MSP" "Energy" "ODIN" "KL_Div" "MSP,Energy,ODIN,KL_Div" "MOS")
    declare -A syn_times=()
    for _ in $(seq "$rounds"); do
        for i in "${!specs[@]}"; do
            if [ "${specs[$i]}" = MOS ]; then
                args=(--id "$tmp/syn/gval" --ood "$tmp/syn/good" --group-config configs/imagenet/taxonomy_level0.npy)
            else
                args=(--id "$tmp/syn/val" --ood "$tmp/syn/ood")
            fi
            syn_times[$i]+="$(timed "$mos" score "${args[@]}" --score "${specs[$i]}" --logdir "$tmp/runs" --name syn) "
        done
    done
    printf '%-24s %8s   %s\n' method seconds "per round"
    for i in "${!specs[@]}"; do
        # shellcheck disable=SC2086
        awk -v m="${specs[$i]}" -v t="$(median ${syn_times[$i]})" -v all="${syn_times[$i]}" 'BEGIN { printf "%-24s %8.2f   %s\n", m, t, all }'
    done
    sizes=$(sref round16 "$tmp/syn/val" "$tmp/syn/val16")
    sref round16 "$tmp/syn/ood" "$tmp/syn/ood16" >/dev/null
    echo "float16 tensors, the same logits rounded: $sizes (per row of 1,000 logits)"
    for v in "" 16; do
        "$mos" score --id "$tmp/syn/val$v" --ood "$tmp/syn/ood$v" --score MSP,Energy,ODIN,KL_Div --logdir "$tmp/runs" \
            --name "f$v" --save-scores "$tmp/f$v.csv" >/dev/null 2>&1
    done
    sref compare "$tmp/f.csv" "$tmp/f16.csv"
    for v in "" 16; do
        echo "float${v:-32}: $("$py" -c 'import json,sys; print(", ".join("%s AUROC %.6f FPR95 %.6f" % (r["method"], r["auroc"], r["fpr95"]) for r in json.load(open(sys.argv[1]))))' "$tmp/runs/f$v/results.json")"
    done
fi

if has groups; then
    wn=/usr/share/wordnet
    awk -v n="$group_classes" '!/^  / { k++; if (k % 3 == 1 && c < n) { print "n" $1; c++ } }' "$wn/data.noun" >"$tmp/wnids.txt"
    echo
    echo "mos make-groups --strategy taxonomy of $(wc -l <"$tmp/wnids.txt") WordNet noun ids (every third noun synset), $wn,"
    echo "wall time of the whole command (reading data.noun and index.noun included); target <= 5 s; medians of $rounds rounds"
    times=()
    for _ in $(seq "$rounds"); do
        start=$(now)
        "$mos" make-groups --strategy taxonomy --classes "$tmp/wnids.txt" --wordnet-dir "$wn" \
            --output "$tmp/wn_groups.json" >"$tmp/groups.log" 2>&1 || { cat "$tmp/groups.log" >&2; echo "bench: make-groups failed" >&2; exit 1; }
        end=$(now)
        times+=("$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }')")
    done
    "$py" scripts/groups_ref.py "$wn" "$tmp/wnids.txt" "$tmp/wn_groups.json" | tr '\n' ' ' | sed 's/ $/\n/;s/^/groups (equal to scripts\/groups_ref.py): /'
    awk -v t="$(median "${times[@]}")" -v all="${times[*]}" \
        'BEGIN { printf "%.2f s (%s the 5 s target; per round: %s)\n", t, (t <= 5 ? "within" : "OVER"), all }'
fi

if has posthoc; then
    sref() { "$py" scripts/store_ref.py "$@"; }
    # Runs a command; prints "wall_seconds max_rss_MiB" (the child's peak resident memory).
    measured() {
        "$py" -c 'import resource, subprocess, sys, time
t = time.time()
with open(sys.argv[1], "w") as log:
    r = subprocess.run(sys.argv[2:], stdout=log, stderr=log)
if r.returncode:
    sys.stderr.write(open(sys.argv[1]).read()); sys.exit("bench: %s failed" % " ".join(sys.argv[2:]))
print("%.2f %.0f" % (time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))' "$tmp/ph_cmd.log" "$@"
    }
    # The scoring seconds of each method in a results.json (ID + OOD, reading excluded).
    seconds_of() { "$py" -c 'import json, sys
for r in json.load(open(sys.argv[1])):
    print("%-10s %8.2f" % (r["method"], r["seconds"]))' "$1"; }
    sref head "$tmp/ph/head.safetensors" 1000 2048 0
    sref features "$tmp/ph/val" "$ph_id" "$tmp/ph/head.safetensors" 1 0.3
    sref features "$tmp/ph/ood" "$ph_ood" "$tmp/ph/head.safetensors" 2 -0.2
    sref features "$tmp/ph/train" "$ph_fit" "$tmp/ph/head.safetensors" 3 0.3
    echo
    echo "posthoc: mos score from synthetic stores of BiT-S-R101x1-sized features (2,048) and 1,000 classes, $threads threads, CPU;"
    echo "$ph_id ID + $ph_ood OOD rows; ReAct, ViM, DICE fitted on a $ph_fit-row store (first run), then reused (fDBD, Residual, NECO fitted on their first row below)"
    common=(--id "$tmp/ph/val" --ood "$tmp/ph/ood" --model-path "$tmp/ph/head.safetensors" --device cpu --logdir "$tmp/runs")
    read -r w m < <(measured "$mos" score "${common[@]}" --score ReAct,ViM,DICE --fit "$tmp/ph/train" --name ph_fit)
    echo "fit (reading the fit store, ReAct percentile, ViM covariance + eigh, DICE mean) and scoring: wall ${w} s, peak ${m} MiB"
    printf '%-10s %8s %8s %10s\n' method "score s" "wall s" "peak MiB"
    for meth in MaxLogit GradNorm ReAct ViM ASH-P ASH-B ASH-S DICE SCALE fDBD GEN Residual NECO Entropy; do
        read -r w m < <(measured "$mos" score "${common[@]}" --score "$meth" --fit "$tmp/ph/train" --name ph_fit)
        s=$(seconds_of "$tmp/runs/ph_fit/results.json" | awk -v m="$meth" '$1 == m { print $2 }')
        printf '%-10s %8s %8s %10s\n' "$meth" "$s" "$w" "$m"
    done
    # NNGuide with the original's guide bank: 1 % of ImageNet's training set.
    sref features "$tmp/ph/guide" "$nng_bank" "$tmp/ph/head.safetensors" 7 0.3
    read -r w m < <(measured "$mos" score "${common[@]}" --score NNGuide --fit "$tmp/ph/guide" --name ph_nng)
    s=$(seconds_of "$tmp/runs/ph_nng/results.json" | awk '$1 == "NNGuide" { print $2 }')
    echo "NNGuide k=10, a $nng_bank-row guide bank: scoring ${s} s, wall ${w} s (reading the stores and building the bank included), peak ${m} MiB"
    # Its floor: the same float32 products of queries and bank alone, in PyTorch.
    "$py" - "$threads" "$((ph_id + ph_ood))" "$nng_bank" "$s" <<'PY'
import sys, time, torch
threads, n, m, mos_s = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
q = torch.rand(2048, 2048, generator=g)
bank = torch.rand(m, 2048, generator=g)
q @ bank.T
t = time.time()
for start in range(0, n, 2048):
    q[: min(2048, n - start)] @ bank.T
s = time.time() - t
print("  its float32 products alone (PyTorch, %d queries x %d bank rows x %d values): %.2f s, %.0f GFLOPS; mos / products %.2fx"
      % (n, m, 2048, s, 2.0 * n * m * 2048 / s / 1e9, mos_s / s))
PY
    rm -rf "$tmp/ph/guide"
    sref features "$tmp/ph/qid" "$knn_q" "$tmp/ph/head.safetensors" 4 0.3
    sref features "$tmp/ph/qood" "$knn_q" "$tmp/ph/head.safetensors" 5 -0.2
    rm -rf "$tmp/ph/train"
    sref features "$tmp/ph/bank" "$knn_bank" "$tmp/ph/head.safetensors" 6 0.3
    read -r w m < <(measured "$mos" score --id "$tmp/ph/qid" --ood "$tmp/ph/qood" --score KNN --knn-k "$knn_k" \
        --fit "$tmp/ph/bank" --device cpu --logdir "$tmp/runs" --name ph_knn)
    s=$(seconds_of "$tmp/runs/ph_knn/results.json" | awk '$1 == "KNN" { print $2 }')
    echo "KNN k=$knn_k: $((2 * knn_q)) queries vs a $knn_bank-row bank: scoring ${s} s, wall ${w} s (reading the stores included), peak ${m} MiB"
    awk -v s="$s" -v q="$((2 * knn_q))" -v b="$knn_bank" 'BEGIN {
        printf "  extrapolated to a 1.28M bank (cost linear in queries x bank): %.0f s for these queries on this CPU\n", s * 1281167 / b }'
fi

# Wall time of a command (its output to $tmp/timed.log, shown if it fails).
timed_run() {
    local start end
    start=$(now)
    "$@" >"$tmp/timed.log" 2>&1 || { cat "$tmp/timed.log" >&2; echo "bench: $* failed" >&2; exit 1; }
    end=$(now)
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }'
}

if has benchmark; then
    b=$tmp/bench
    ref make-jpegs "$b/id/a" "$bench_id" 1
    ref make-jpegs "$b/id/b" "$bench_id" 2
    ref make-jpegs "$b/ood1/x" "$bench_ood" 3
    ref make-jpegs "$b/ood2/x" "$bench_ood" 4
    mkdir -p "$b/group" "$b/flat"
    ref make-model "$b/group" R26x0.5 1 8 4 # 2 classes + 2 groups
    ref make-model "$b/flat" R26x0.5 1 8 2
    echo '{"classes_per_group": [1, 1]}' >"$b/groups.json"
    bcommon=(--model ResNetV2-R26x0.5 --crop "$bench_size" --batch 32 --workers "$threads" --device cpu)
    find "$b/id" -name '*.jpg' | sort | awk -F/ '{ print $(NF-2) "/" $(NF-1) "/" $NF " " ($(NF-2) == "a" ? 0 : 1) }' >"$b/list.txt"
    for mag in 0 0.001; do
        "$mos" tune-mahalanobis --datadir "$b/id" --train-list "$b/list.txt" --val-list "$b/list.txt" \
            --model-path "$b/flat/R26x0.5.pth.tar" --logdir "$b/runs" --name "maha$mag" --magnitudes "$mag" \
            --num-lr-samples "$(( bench_id < 20 ? bench_id : 20 ))" "${bcommon[@]}" >"$b/maha.log" 2>&1 ||
            { cat "$b/maha.log" >&2; echo "bench: tune-mahalanobis failed" >&2; exit 1; }
    done
    # The original way: per OOD set, test-mos and one test-baseline per method.
    original() {
        rm -rf "$b/runs/orig"
        for o in ood1 ood2; do
            "$mos" test-mos --in-datadir "$b/id" --out-datadir "$b/$o" --logdir "$b/runs" --name orig \
                --model-path "$b/group/R26x0.5.pth.tar" --group-config "$b/groups.json" "${bcommon[@]}" || return 1
            for m in MSP ODIN Energy KL_Div Mahalanobis; do
                "$mos" test-baseline --in-datadir "$b/id" --out-datadir "$b/$o" --logdir "$b/runs" --name orig \
                    --model-path "$b/flat/R26x0.5.pth.tar" --score "$m" --epsilon-odin "$1" \
                    --mahalanobis-param-path "$b/runs/maha$2" "${bcommon[@]}" || return 1
            done
        done
    }
    bench_once() {
        rm -rf "$b/runs/bench"
        "$mos" benchmark --in-datadir "$b/id" --out-datadir "$b/ood1" --out-datadir "$b/ood2" --logdir "$b/runs" --name bench \
            --group-model-path "$b/group/R26x0.5.pth.tar" --group-config "$b/groups.json" \
            --flat-model-path "$b/flat/R26x0.5.pth.tar" --mahalanobis-param-path "$b/runs/maha$2" \
            --score MOS,MSP,ODIN,Energy,KL_Div,Mahalanobis --epsilon-odin "$1" "${bcommon[@]}"
    }
    echo
    echo "mos benchmark vs the original way (12 commands: test-mos + 5 test-baseline per OOD set), 6 methods x 2 OOD sets,"
    echo "$((2 * bench_id)) ID + 2 x $bench_ood OOD JPEGs at ${bench_size}x${bench_size}, ResNetV2-R26x0.5 (random weights), CPU;"
    echo "each round: original then benchmark (fresh run directory: everything extracted); medians of $rounds rounds"
    printf '%-56s %10s %10s %8s   %s\n' settings "original s" "bench s" ratio "ratio per round"
    for spec in "0 0" "0.0014 0.001"; do
        read -r eps mag <<<"$spec"
        [ "$smoke" = 1 ] || timed_run bench_once "$eps" "$mag" >/dev/null # warm-up (page cache)
        bases=() ours=() ratios=()
        for _ in $(seq "$rounds"); do
            t_b=$(timed_run original "$eps" "$mag")
            t_o=$(timed_run bench_once "$eps" "$mag")
            bases+=("$t_b") ours+=("$t_o") ratios+=("$(ratio "$t_b" "$t_o")")
        done
        # Same table both ways (the same scores through the same functions).
        "$py" - "$b/runs/orig/results.json" "$b/runs/bench/results.json" <<'PY' || { echo "bench: mos benchmark and the test commands disagree" >&2; exit 1; }
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
key = lambda r: (r["method"], r["out_dataset"])
a = {key(r): (r["auroc"], r["fpr95"]) for r in a}
b = {key(r): (r["auroc"], r["fpr95"]) for r in b}
sys.exit(0 if a == b and len(a) == 12 else 1)
PY
        label="ODIN eps $eps, Mahalanobis magnitude $mag"
        [ "$spec" = "0 0" ] && label="$label (all from stores)" || label="$label (image passes)"
        awk -v l="$label" -v b="$(median "${bases[@]}")" -v o="$(median "${ours[@]}")" -v r="$(median "${ratios[@]}")" -v all="${ratios[*]}" \
            'BEGIN { printf "%-56s %10.2f %10.2f %7.2fx   %s\n", l, b, o, r, all }'
        echo "  where mos benchmark's time went (last round, report.md):"
        sed -n '/^| stage/,$p' "$b/runs/bench/report.md" | sed 1,2d | sed 's/^/    /'
    done
fi

if has paper-scale; then
    p=$tmp/paper
    dev=${MOS_DEVICE:-auto}
    ref make-val-jpegs "$p/val/images" "$ps_images" 0
    ref make-val-jpegs "$p/pass/images" "$ps_pass" 1
    ref make-val-jpegs "$p/pass2/images" "$ps_pass" 2
    ref make-model "$p" R101x1 1 8 # head 1000
    # mos benchmark wants one logit per class of its (one-class) ID set: the same
    # backbone with a 1-logit head for the image passes.
    mkdir -p "$p/one" && ref make-model "$p/one" R101x1 1 8 1
    ref make-maha "$p/maha.safetensors" R101x1 1000 0.001
    pcommon=(--model BiT-S-R101x1 --crop "$ps_crop" --workers "$threads" --device "$dev")
    echo
    echo "paper scale: BiT-S-R101x1 at ${ps_crop}x${ps_crop}, device $dev, $ps_images JPEGs with ImageNet val's sizes (most 500x375 / 375x500, quality 90),"
    echo "batch $ps_batch, $threads decoding workers; the real loader (decode + resize + normalize) and forward"
    jpeg_kb=$(du -sk "$p/val/images" | awk -v n="$ps_images" '{ printf "%.0f", $1 / n }')
    "$mos" extract --datadir "$p/pass" --output "$p/warm" --model-path "$p/R101x1.pth.tar" "${pcommon[@]}" --batch "$ps_batch" >/dev/null 2>&1 # warm-up
    rm -rf "$p/store"
    t=$(timed_run "$mos" extract --datadir "$p/val" --output "$p/store" --model-path "$p/R101x1.pth.tar" "${pcommon[@]}" --batch "$ps_batch")
    secs=$(sed -n 's/.* in \([0-9.]*\) s (.*images\/s).*/\1/p' "$p/store/store.log" | tail -n 1)
    ext=$(awk -v n="$ps_images" -v s="$secs" 'BEGIN { if (s > 0) printf "%.3f", n / s }')
    check_rate "mos extract" "$ext"
    echo "extraction: $ext images/s (store.log; the whole command with start-up: $t s, average JPEG $jpeg_kb KiB)"
    # The image passes of ODIN (epsilon > 0) and Mahalanobis (magnitude > 0) as
    # mos benchmark runs them: one pass per set over the flat model, whose decoding
    # and first forward pass double as the flat model's extraction. Two sets of
    # $ps_pass images (ID and OOD); seconds per image from report.md's stage table.
    rm -rf "$p/runs/pass"
    "$mos" benchmark --in-datadir "$p/pass" --out-datadir "$p/pass2" --logdir "$p/runs" --name pass \
        --flat-model-path "$p/one/R101x1.pth.tar" --mahalanobis-param-path "$p/maha.safetensors" \
        --score ODIN,Mahalanobis --epsilon-odin 0.0014 --batch "$ps_batch" "${pcommon[@]}" >"$p/pass.log" 2>&1 ||
        { cat "$p/pass.log" >&2; echo "bench: mos benchmark (image passes) failed" >&2; exit 1; }
    read -r first own < <(awk -F'|' '/^\| image pass .*: decoding and first forward pass/ { f += $3 }
        /^\| image pass .*: backward and perturbed forward passes/ { o += $3 } END { print f + 0, o + 0 }' "$p/runs/pass/report.md")
    check_rate "mos benchmark's image pass" "$own"
    awk -v e="$ext" -v f="$first" -v o="$own" -v n2="$((2 * ps_pass))" 'BEGIN {
        n = 85640; ex = n / e; fp = n * (f + o) / n2
        printf "flat model with the image passes (mos benchmark, ODIN epsilon 0.0014 + Mahalanobis magnitude 0.001, %d images):\n", n2
        printf "  %.3f s/image: %.3f decoding and the shared forward pass, %.3f the backward and perturbed forward passes of the two methods\n", (f + o) / n2, f / n2, o / n2
        printf "Table 1 extrapolated (85,640 images = 50,000 ID + 10,000 x 3 + 5,640):\n"
        printf "  from stores only (ODIN epsilon 0, Mahalanobis magnitude 0, the released defaults): group + flat extraction, %.1f min\n", 2 * ex / 60
        printf "  with both image passes: group extraction %.1f min + the flat model shared pass %.1f min = %.1f min\n", ex / 60, fp / 60, (ex + fp) / 60
        printf "  (paper: about 13 hours summed over its test runs)\n"
    }'
fi

if has extract-tv; then
    x=$tmp/tv
    tv_dev=${MOS_DEVICE:-cpu}
    tref() { "$py" scripts/tv_extract_ref.py "$@"; }
    # Store log's "in S s (R images/s)": the more precise of R and N / S (both
    # printed to 0.1).
    store_rate() {
        sed -n 's/.* in \([0-9.]*\) s (\([0-9.]*\) images\/s).*/\1 \2/p' "$1/store.log" | tail -n 1 |
            awk -v n="$2" '{ if ($2 * $2 > n || $1 <= 0) printf "%.3f", $2; else printf "%.3f", n / $1 }'
    }
    ref make-val-jpegs "$x/r50/images" "$tv_r50" 0
    ref make-val-jpegs "$x/vit/images" "$tv_vit" 0 # the first $tv_vit of the same images
    echo
    echo "extract-tv: torchvision's models, random weights (the same state dict both sides), device $tv_dev, float32, JPEGs with ImageNet"
    echo "val's sizes (photo content); Resize(256), CenterCrop(224), ImageNet normalisation; batch $tv_batch, $threads decoding"
    echo "workers, $threads torch threads; images/s of the extraction loop (decoding, transform, forward; model loading and"
    echo "process start-up excluded, shown as whole-process seconds); each round: torchvision then mos; medians of $rounds rounds"
    echo "forward alone: torchvision's model on the same number of random inputs made beforehand (no decoding), the"
    echo "ceiling of any extraction with these kernels; mos / fwd: mos's end-to-end rate over it"
    printf '%-10s %7s %16s %10s %8s %10s %10s %18s   %s\n' model images "torchvision i/s" "mos i/s" ratio "fwd i/s" "mos / fwd" \
        "whole s (tv / mos)" "ratio per round"
    declare -A tv_rate=()
    checks=()
    for spec in "resnet50 $tv_r50 r50" "vit_b_16 $tv_vit vit"; do
        read -r m n d <<<"$spec"
        tref make-model "$m" "$x/$m.pth" 0
        bases=() ours=() ratios=() walls_b=() walls_o=() fwds=()
        for _ in $(seq "$rounds"); do
            rm -rf "$x/$m.store"
            w_b=$(timed_run env OMP_NUM_THREADS="$threads" "$py" scripts/tv_extract_ref.py extract "$m" "$x/$m.pth" "$x/$d" \
                "$tv_batch" "$threads" "$threads" "$x/$m.torch.safetensors" "$tv_dev")
            b=$(rate <"$tmp/timed.log")
            w_o=$(timed_run "$mos" extract --model "$m" --model-path "$x/$m.pth" --datadir "$x/$d" --output "$x/$m.store" \
                --layers logits,features --batch "$tv_batch" --workers "$threads" --device "$tv_dev")
            o=$(store_rate "$x/$m.store" "$n")
            check_rate "torchvision extract ($m)" "$b"; check_rate "mos extract ($m)" "$o"
            timed_run env OMP_NUM_THREADS="$threads" "$py" scripts/tv_extract_ref.py forward "$m" "$x/$m.pth" "$n" \
                "$tv_batch" "$threads" "$tv_dev" >/dev/null
            f=$(rate <"$tmp/timed.log")
            check_rate "torchvision forward ($m)" "$f"
            fwds+=("$f")
            bases+=("$b") ours+=("$o") ratios+=("$(ratio "$o" "$b")") walls_b+=("$w_b") walls_o+=("$w_o")
        done
        c=$(tref compare "$x/$m.store" "$x/$m.torch.safetensors") ||
            { echo "$c" >&2; echo "bench: mos extract --model $m and torchvision disagree" >&2; exit 1; }
        checks+=("$m (last round): $c")
        tv_rate[$m]=$(median "${ours[@]}")
        awk -v m="$m" -v n="$n" -v b="$(median "${bases[@]}")" -v o="${tv_rate[$m]}" -v r="$(median "${ratios[@]}")" \
            -v f="$(median "${fwds[@]}")" -v wb="$(median "${walls_b[@]}")" -v wo="$(median "${walls_o[@]}")" -v all="${ratios[*]}" \
            'BEGIN { printf "%-10s %7d %16.2f %10.2f %7.2fx %10.2f %9.2fx %18s   %s\n", m, n, b, o, r, f, o / f, sprintf("%.1f / %.1f", wb, wo), all }'
    done
    printf '%s\n' "${checks[@]}"
    awk -v o="${tv_rate[resnet50]}" -v dev="$tv_dev" 'BEGIN {
        printf "a whole ResNet-50 table (85,640 images = 50,000 ImageNet val + 10,000 x 3 + 5,640 Textures; one extraction per image\n"
        printf "serves every store method) at mos'"'"'s %.2f images/s on this machine (%s): %.2f hours\n", o, dev, 85640 / o / 3600 }'
fi

if has rankfeat; then
    r=$tmp/rf
    dev=${MOS_DEVICE:-cpu}
    # Store log's "in S s (R images/s)": N / S, or R when S is too coarse.
    rf_rate() {
        sed -n 's/.* in \([0-9.]*\) s (\([0-9.]*\) images\/s).*/\1 \2/p' "$1/store.log" | tail -n 1 |
            awk -v n="$2" '{ if ($2 * $2 > n || $1 <= 0) printf "%.3f", $2; else printf "%.3f", n / $1 }'
    }
    ref make-val-jpegs "$r/bit/images" "$rf_bit" 0
    ref make-val-jpegs "$r/r50/images" "$rf_r50" 0
    ref make-model "$r" R101x1 1 8
    "$py" scripts/tv_extract_ref.py make-model resnet50 "$r/resnet50.pth" 0
    rf_crop=480
    [ "$smoke" = 1 ] && rf_crop=64
    echo
    echo "rankfeat: mos extract --layers logits,rankfeat vs --layers logits, random weights, device $dev, JPEGs with ImageNet val's"
    echo "sizes, batch 4, $threads workers; images/s of the extraction loop; medians of $rounds interleaved rounds"
    printf '%-22s %7s %14s %16s %10s   %s\n' model images "logits i/s" "+rankfeat i/s" "cost" "per round"
    for spec in "BiT-S-R101x1 $rf_crop $r/R101x1.pth.tar $r/bit $rf_bit" "resnet50 224 $r/resnet50.pth $r/r50 $rf_r50"; do
        read -r m c w d n <<<"$spec"
        plain=() withrf=() costs=()
        for _ in $(seq "$rounds"); do
            for layers in logits logits,rankfeat; do
                rm -rf "$r/store"
                timed_run "$mos" extract --model "$m" --model-path "$w" --crop "$c" --datadir "$d" --output "$r/store" \
                    --layers "$layers" --batch 4 --workers "$threads" --device "$dev" >/dev/null
                rate=$(rf_rate "$r/store" "$n")
                if [ "$layers" = logits ]; then plain+=("$rate"); else withrf+=("$rate"); fi
            done
            costs+=("$(awk -v a="${plain[-1]}" -v b="${withrf[-1]}" 'BEGIN { printf "%.2f", a / b }')")
        done
        printf '%-22s %7s %14s %16s %9sx   %s\n' "$m at $c" "$n" "$(median "${plain[@]}")" "$(median "${withrf[@]}")" \
            "$(median "${costs[@]}")" "${costs[*]}"
    done
fi
