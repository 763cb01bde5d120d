#!/usr/bin/env bash
# The paper's Table 1 (MOS, CVPR 2021) in one command, with the authors' fine-tuned
# BiT-S-R101x1 checkpoints, checked cell by cell against the published numbers
# (configs/benchmarks/mos_cvpr21_published.json). Exit status 0: every cell within
# its tolerance. Data and checkpoints: README.md, "Reproducing Table 1".
# Usage: scripts/reproduce_table1.sh [more mos benchmark flags, e.g. --batch 256 --device cuda]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MOS=${MOS:-target/release/mos}
[ -x "$MOS" ] || scripts/build.sh
for f in checkpoints/BiT-S-R101x1-group-finetune.pth.tar checkpoints/BiT-S-R101x1-flat-finetune.pth.tar; do
    if [ ! -e "$f" ]; then
        echo "missing: $f; the authors' checkpoints (from the original README):" >&2
        echo "  wget -P checkpoints http://pages.cs.wisc.edu/~huangrui/finetuned_model/$(basename "$f")" >&2
        exit 1
    fi
done
maha=checkpoints/tune_mahalanobis/tune_mahalanobis_BiT-S-R101x1/mahalanobis.safetensors
case " $* " in *" --score "*) ;; *)
    if [ ! -e "$maha" ]; then
        echo "missing: $maha. Mahalanobis' parameters are not published: tune them once with" >&2
        echo "  scripts/tune_mahalanobis.sh (the flat checkpoint as --model_path), or leave it out:" >&2
        echo "  scripts/reproduce_table1.sh --score MSP,ODIN,Energy,KL_Div,MOS,GradNorm,RankFeat" >&2
        exit 1
    fi ;;
esac
exec "$MOS" benchmark --config configs/benchmarks/mos_cvpr21.json "$@"
