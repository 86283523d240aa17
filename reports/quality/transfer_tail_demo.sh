#!/usr/bin/env bash
# Can the transfer regularise the tail? The same variants as transfer_tail_ml_latest.sh on the demo world.
set -euo pipefail
[ -f runs/demo/dataset/manifest.json ] || python -c "from pathlib import Path; from trainer.experiments.demo import prepare_dataset; prepare_dataset(Path('runs/demo'), 200000)"
tailrec compare --config configs/movielens_deepfm.yaml --data runs/demo/dataset --out reports/quality/transfer_tail_demo \
  --seeds 1,2,3 --nproc 2 --title "Transfer on the rarest half of the ids, demo world, CF-SGD defaults, 2 ranks x 1024, 4 epochs" \
  --variant "cfsgd: --transfer.mode=baseline" \
  --variant "plus_t_w3_tf0.5: --transfer.mode=plus_t --transfer.weight=3 --transfer.target_frac=0.5" \
  --variant "select_w3_tf0.5: --transfer.mode=select --transfer.weight=3 --transfer.target_frac=0.5" \
  --variant "both_w1_tf0.5: --transfer.mode=both --transfer.lexico_weight=1 --transfer.target_frac=0.5" \
  --variant "both_tf0.5: --transfer.mode=both --transfer.target_frac=0.5" \
  --variant "select_w3_tf0.5_eq0.8: --transfer.mode=select --transfer.weight=3 --transfer.target_frac=0.5 --transfer.eta_quantile=0.8" \
  --variant "both_w1_tf0.5_eq0.8: --transfer.mode=both --transfer.lexico_weight=1 --transfer.target_frac=0.5 --transfer.eta_quantile=0.8" \
  --transfer.features=[movie_id] --transfer.eval_groups=runs/demo/raw/planted.json --train.epochs=4 "$@"
