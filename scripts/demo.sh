#!/usr/bin/env bash
# The main job end to end on this machine, with no arguments:
#   a local S3 server -> a dataset in a bucket -> train-all (Ray) -> the nightly
#   scoring job (Ray Data -> Parquet in S3) -> analysts' queries and the HTML report.
# By default the dataset is generated (procedural parts with synthetic defects);
#   scripts/demo.sh --data ../shared/data/mtd
# runs the same job on a real MVTec-layout dataset instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
UFLOW=.venv/bin/uflow-batch
DATA=""
EPOCHS=60
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA="$2"; shift 2 ;;
        --epochs) EPOCHS="$2"; shift 2 ;;
        *) echo "usage: scripts/demo.sh [--data MVTEC_ROOT] [--epochs N]" >&2; exit 2 ;;
    esac
done

DEMO=.demo
rm -rf "$DEMO"
mkdir -p "$DEMO/s3"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "Starting a local S3 server (SeaweedFS) on 127.0.0.1"
$PY -m uflow_batch.devtools.s3server --dir "$DEMO/s3" --env-file "$DEMO/s3/s3.env" >/dev/null 2>"$DEMO/s3/server.err" &
S3_PID=$!
trap 'kill "$S3_PID" 2>/dev/null; wait "$S3_PID" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    [ -f "$DEMO/s3/s3.env" ] && break
    kill -0 "$S3_PID" 2>/dev/null || { cat "$DEMO/s3/server.err" >&2; echo "S3 server failed to start" >&2; exit 1; }
    sleep 0.1
done
. "$DEMO/s3/s3.env"
echo "endpoint $AWS_ENDPOINT_URL, bucket uflow"

BUCKET=s3://uflow/demo
RUN_DATE=$(date -u +%F)

if [ -z "$DATA" ]; then
    step "Generating the demo dataset (3 categories, seeded) and tonight's archive into $BUCKET"
    show $PY -m uflow_batch.devtools.synthetic --out "$BUCKET/data" --archive "$BUCKET/archive/$RUN_DATE" --archive-size 30 \
        --truth-out "$BUCKET/archive-truth-$RUN_DATE.json"
else
    step "Staging $DATA and its test images as tonight's archive into $BUCKET"
    show $PY -m uflow_batch.devtools.upload_dataset --data "$DATA" --dataset-url "$BUCKET/data" --archive-url "$BUCKET/archive/$RUN_DATE"
fi

step "Training every category in parallel (Ray tasks)"
show $UFLOW train-all --data "$BUCKET/data" --models "$BUCKET/models" --epochs "$EPOCHS"

step "How good are the models? Their test split, with exact defect masks"
show $UFLOW evaluate --data "$BUCKET/data" --models "$BUCKET/models"

step "Running the nightly scoring job (Ray Data, Parquet to S3)"
show $UFLOW run-job jobs/demo-nightly.yaml --run-date "$RUN_DATE"

step "Running it again: nothing left to score"
show $UFLOW run-job jobs/demo-nightly.yaml --run-date "$RUN_DATE"

step "The run log: one record per run, beside the data (<output>/_runs/)"
show $UFLOW runs --scores "$BUCKET/scores" --run-date "$RUN_DATE"

step "What an analyst asks the next morning (DuckDB straight on s3://)"
show $UFLOW query defect_rate_per_night --scores "$BUCKET/scores"
show $UFLOW query top_anomalous --scores "$BUCKET/scores" --limit 8
show $UFLOW query error_counts --scores "$BUCKET/scores"

if [ -z "$DATA" ]; then
    step "The verdict against what tonight's generated archive truly holds"
    show $PY -m uflow_batch.devtools.verdict_check --truth "$BUCKET/archive-truth-$RUN_DATE.json" --scores "$BUCKET/scores"
fi

step "The defect report"
show $UFLOW report --scores "$BUCKET/scores" --out "$DEMO/report.html"
echo
echo "Done. Open $DEMO/report.html in a browser."
