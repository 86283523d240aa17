#!/usr/bin/env bash
# Harmless transfer variants on the demo world (200k ratings, planted twins and loners; make demo's data),
# on top of the CF-SGD default. both / lexico use the default lexico_weight (0.3); _w1 is Algorithm 1's weight.
set -euo pipefail
[ -f runs/demo/dataset/manifest.json ] || python -c "from pathlib import Path; from trainer.experiments.demo import prepare_dataset; prepare_dataset(Path('runs/demo'), 200000)"
tailrec compare --config configs/movielens_deepfm.yaml --data runs/demo/dataset --out reports/quality/transfer_demo \
  --seeds 1,2,3 --nproc 2 --title "Harmless transfer on the demo world, CF-SGD defaults, 2 ranks x 1024, 4 epochs" \
  --variant "cfsgd: --transfer.mode=baseline" \
  --variant "matched_step: --transfer.mode=lexico --transfer.lexico_weight=0" \
  --variant "both: --transfer.mode=both" \
  --variant "lexico: --transfer.mode=lexico" \
  --variant "both_w0.1: --transfer.mode=both --transfer.lexico_weight=0.1" \
  --variant "both_w1: --transfer.mode=both --transfer.lexico_weight=1" \
  --variant "lexico_w1: --transfer.mode=lexico --transfer.lexico_weight=1" \
  --variant "stock: --method=stock" \
  --transfer.features=[movie_id] --transfer.eval_groups=runs/demo/raw/planted.json --train.epochs=4 "$@"
