#!/usr/bin/env bash
# Earlier study, kept for the record: transfer on top of CF-SGD with arithmetic ub rows and no row
# floor (the default before reports/quality/README.md's cfsgd study), lexico_weight 1 (Algorithm 1).
# Harmless transfer variants on the demo world (200k ratings, planted twins and loners; make demo's data).
set -euo pipefail
[ -f runs/demo/dataset/manifest.json ] || python -c "from pathlib import Path; from trainer.experiments.demo import prepare_dataset; prepare_dataset(Path('runs/demo'), 200000)"
tailrec compare --config configs/movielens_deepfm.yaml --data runs/demo/dataset --out reports/quality/transfer_demo_arith \
  --seeds 1,2,3 --nproc 2 --title "Harmless transfer on the demo world, CF-SGD with arithmetic ub rows (the earlier default), Algorithm 1 weight, 2 ranks x 1024, 4 epochs" \
  --variant "cfsgd_arith: --transfer.mode=baseline" \
  --variant "matched_step: --transfer.mode=lexico --transfer.lexico_weight=0 --transfer.loss=mmd" \
  --variant "both: --transfer.mode=both" \
  --variant "lexico: --transfer.mode=lexico" \
  --variant "both_mmd: --transfer.mode=both --transfer.loss=mmd" \
  --variant "stock: --method=stock" \
  --embedding.optimizer.ub_rows=arithmetic --embedding.optimizer.ub_row_floor=false --transfer.lexico_weight=1 --transfer.features=[movie_id] --transfer.eval_groups=runs/demo/raw/planted.json --train.epochs=4 "$@"
