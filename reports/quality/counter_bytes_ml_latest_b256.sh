#!/usr/bin/env bash
# The same counter-width comparison at 1 rank x 256 on ml-latest-small: 2,000 steps, so the frequent rows'
# counters climb 8x higher than at 2 x 1024 (a 1-byte counter's level ~ 8 log2(1 + 0.09 count)).
set -euo pipefail
tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/quality/counter_bytes_ml_latest_b256 \
  --seeds 1,2,3 --nproc 1 --title "CF-SGD counter width on ml-latest-small, 1 rank x 256, 8 epochs" \
  --variant "cfsgd_4B: --embedding.optimizer.counter_bytes=4" \
  --variant "cfsgd_2B: --embedding.optimizer.counter_bytes=2" \
  --variant "cfsgd_1B: --embedding.optimizer.counter_bytes=1" \
  --variant "stock: --method=stock" \
  --transfer.mode=baseline --data.batch_size=256 --train.epochs=8 "$@"
