#!/usr/bin/env bash
# Earlier study, kept for the record: transfer on top of CF-SGD with arithmetic ub rows and no row
# floor (the default before reports/quality/README.md's cfsgd study), lexico_weight 1 (Algorithm 1).
# Harmless transfer (neighbor anchor) on real MovieLens ml-latest-small.
set -euo pipefail
tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/quality/transfer_ml_latest_arith \
  --seeds 1,2,3 --nproc 2 --title "Harmless transfer on ml-latest-small, CF-SGD with arithmetic ub rows (the earlier default), Algorithm 1 weight, 2 ranks x 1024" \
  --variant "cfsgd_arith: --transfer.mode=baseline" \
  --variant "both: --transfer.mode=both" \
  --variant "lexico: --transfer.mode=lexico" \
  --variant "stock: --method=stock" \
  --embedding.optimizer.ub_rows=arithmetic --embedding.optimizer.ub_row_floor=false --transfer.lexico_weight=1 --transfer.features=[movie_id] --data.batch_size=1024 --train.epochs=8 "$@"
