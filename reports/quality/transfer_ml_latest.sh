#!/usr/bin/env bash
# Harmless transfer (neighbor anchor) on real MovieLens ml-latest-small.
set -euo pipefail
tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/quality/transfer_ml_latest \
  --seeds 1,2,3 --nproc 2 --title "Harmless transfer on ml-latest-small, CF-SGD defaults, 2 ranks x 1024" \
  --variant "cfsgd: --transfer.mode=baseline" \
  --variant "both: --transfer.mode=both" \
  --variant "lexico: --transfer.mode=lexico" \
  --variant "stock: --method=stock" \
  --transfer.features=[movie_id] --data.batch_size=1024 --train.epochs=8 "$@"
