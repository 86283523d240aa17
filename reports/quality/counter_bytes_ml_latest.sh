#!/usr/bin/env bash
# CF-SGD with compact counters (embedding.optimizer.counter_bytes 2 or 1: an approximate counter's level
# instead of a float32 count) against the float32 counter and the stock optimizer, real ml-latest-small.
set -euo pipefail
tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/quality/counter_bytes_ml_latest \
  --seeds 1,2,3 --nproc 2 --title "CF-SGD counter width on ml-latest-small, 2 ranks x 1024, 8 epochs" \
  --variant "cfsgd_4B: --embedding.optimizer.counter_bytes=4" \
  --variant "cfsgd_2B: --embedding.optimizer.counter_bytes=2" \
  --variant "cfsgd_1B: --embedding.optimizer.counter_bytes=1" \
  --variant "stock: --method=stock" \
  --transfer.mode=baseline --data.batch_size=1024 --train.epochs=8 "$@"
