#!/usr/bin/env bash
# Train every category of an MVTec-layout dataset with the default configuration,
# then evaluate all of them: the accuracy table of the README comes from this.
#   bench/evaluate_mtd.sh [DATA_ROOT] [OUT_DIR] [extra `uflow-batch train` options...]
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
    start=$(date +%s)
    $UFLOW train --data "$DATA" --category "$category" --out "$OUT/$category" "$@"
    echo "$category: trained in $(( $(date +%s) - start )) s"
    models+=(--model "$OUT/$category")
done
$UFLOW evaluate --data "$DATA" "${models[@]}" --json-out "$OUT/evaluation.json"
