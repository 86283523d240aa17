#!/usr/bin/env bash
# Can the transfer regularise the tail? Pulls restricted to the rarest half of the ids (target_frac 0.5),
# with and without the lexico barrier, on real ml-latest-small (README.md commands: tailrec convert first).
set -euo pipefail
tailrec compare --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/quality/transfer_tail_ml_latest \
  --seeds 1,2,3 --nproc 2 --title "Transfer on the rarest half of the ids, ml-latest-small, CF-SGD defaults, 2 ranks x 1024" \
  --variant "cfsgd: --transfer.mode=baseline" \
  --variant "plus_t_w3_tf0.5: --transfer.mode=plus_t --transfer.weight=3 --transfer.target_frac=0.5" \
  --variant "select_w3_tf0.5: --transfer.mode=select --transfer.weight=3 --transfer.target_frac=0.5" \
  --variant "both_w1_tf0.5: --transfer.mode=both --transfer.lexico_weight=1 --transfer.target_frac=0.5" \
  --variant "both_tf0.5: --transfer.mode=both --transfer.target_frac=0.5" \
  --variant "select_w3_tf0.5_eq0.8: --transfer.mode=select --transfer.weight=3 --transfer.target_frac=0.5 --transfer.eta_quantile=0.8" \
  --variant "both_w1_tf0.5_eq0.8: --transfer.mode=both --transfer.lexico_weight=1 --transfer.target_frac=0.5 --transfer.eta_quantile=0.8" \
  --transfer.features=[movie_id] --data.batch_size=1024 --train.epochs=8 "$@"
