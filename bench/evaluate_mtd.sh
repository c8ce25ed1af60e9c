#!/usr/bin/env bash
# Train every category of an MVTec-layout dataset with the default configuration,
# then evaluate all of them with the default (scan) test and, on the same models,
# the paper's block test: the accuracy tables of the README come from this.
#   bench/evaluate_mtd.sh [DATA_ROOT] [OUT_DIR] [extra `uflow-batch train` options...]
# Already trained models in OUT_DIR/<category> are reused (delete them to retrain).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mtd}
OUT=${2:-out/mtd}
shift $(( $# > 2 ? 2 : $# ))
UFLOW=.venv/bin/uflow-batch
mkdir -p "$OUT"
models=()
for category in $(ls "$DATA"); do
    [ -d "$DATA/$category/train/good" ] || continue
    if [ ! -f "$OUT/$category/manifest.json" ]; then
        start=$(date +%s)
        $UFLOW train --data "$DATA" --category "$category" --out "$OUT/$category" "$@"
        echo "$category: trained in $(( $(date +%s) - start )) s"
    fi
    models+=(--model "$OUT/$category")
done
echo "== scan test (the default)"
$UFLOW evaluate --data "$DATA" "${models[@]}" --json-out "$OUT/evaluation.json" --figure-out "$OUT/calibration-scan.png"
echo "== the paper's block test, same models"
$UFLOW evaluate --data "$DATA" "${models[@]}" --nfa-test block --json-out "$OUT/evaluation-block.json" \
    --figure-out "$OUT/calibration-block.png"
