#!/usr/bin/env bash
# Train every model kind on every category of an MVTec-layout dataset (default settings), then
# evaluate them all in one table: the comparison of the README's "Model kinds" section.
#   [EPOCHS=N] bench/compare_kinds.sh [DATA_ROOT] [OUT_DIR] [KIND...]
# EPOCHS caps training (default: the library's, with early stopping).
# Models already in OUT_DIR/<kind>/<category> are reused (delete them to retrain).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mtd}
OUT=${2:-out/kinds}
shift $(( $# > 2 ? 2 : $# ))
KINDS=("${@:-uflow fastflow cflow csflow differnet}")
read -r -a KINDS <<< "${KINDS[*]}"
UFLOW=.venv/bin/uflow-batch
models=()
for kind in "${KINDS[@]}"; do
    for category in $(ls "$DATA"); do
        [ -d "$DATA/$category/train/good" ] || continue
        if [ ! -f "$OUT/$kind/$category/manifest.json" ]; then
            $UFLOW train --data "$DATA" --category "$category" --out "$OUT/$kind/$category" --kind "$kind" \
                ${EPOCHS:+--epochs "$EPOCHS"}
        fi
        models+=(--model "$OUT/$kind/$category")
    done
done
$UFLOW evaluate --data "$DATA" "${models[@]}" --json-out "$OUT/evaluation.json" --figure-out "$OUT/calibration.png"
