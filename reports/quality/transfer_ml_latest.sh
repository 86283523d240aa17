#!/usr/bin/env bash
# Harmless transfer on real ml-latest-small (README.md commands: tailrec convert first), on top of the
# CF-SGD default. both uses the default lexico_weight (0.3); both_w1 is Algorithm 1's weight; lexico is
# the same pull on all of T (no selective domain).
set -euo pipefail
tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/quality/transfer_ml_latest \
  --seeds 1,2,3 --nproc 2 --title "Harmless transfer on ml-latest-small, CF-SGD defaults, 2 ranks x 1024" \
  --variant "cfsgd: --transfer.mode=baseline" \
  --variant "both: --transfer.mode=both" \
  --variant "both_w1: --transfer.mode=both --transfer.lexico_weight=1" \
  --variant "lexico: --transfer.mode=lexico" \
  --variant "stock: --method=stock" \
  --transfer.features=[movie_id] --data.batch_size=1024 --train.epochs=8 "$@"
