#!/usr/bin/env bash
# CF-SGD vs the stock optimizer on real MovieLens ml-latest-small (README.md commands: tailrec convert first).
set -euo pipefail
tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/quality/cfsgd_ml_latest \
  --seeds 1,2,3 --nproc 2 --title "CF-SGD vs FBGEMM rowwise Adagrad, ml-latest-small, 2 ranks x 1024" \
  --variant "stock: --method=stock" \
  --variant "cfsgd_fixed_lr3: --transfer.mode=baseline --embedding.optimizer.ub_mode=fixed --embedding.optimizer.lr=3" \
  --variant "cfsgd_arith_lr0.03: --transfer.mode=baseline --embedding.optimizer.ub_rows=arithmetic --embedding.optimizer.ub_row_floor=false --embedding.optimizer.lr=0.03" \
  --variant "cfsgd_arith: --transfer.mode=baseline --embedding.optimizer.ub_rows=arithmetic --embedding.optimizer.ub_row_floor=false" \
  --variant "cfsgd: --transfer.mode=baseline" \
  --data.batch_size=1024 --train.epochs=8 "$@"
