#!/usr/bin/env bash
# CF-SGD vs the stock optimizer on a harder generated world (1M ratings, weaker signal: AUC ~0.77).
set -euo pipefail
[ -f runs/quality/genhard/dataset/manifest.json ] || {
  tailrec generate --format movielens --out runs/quality/genhard/raw --rows 1000000 --seed 11 --param logit_scale=0.35
  tailrec convert movielens --src runs/quality/genhard/raw --out runs/quality/genhard/dataset; }
tailrec compare --config configs/movielens_deepfm.yaml --data runs/quality/genhard/dataset --out reports/quality/cfsgd_genhard \
  --seeds 1,2,3 --nproc 2 --title "CF-SGD vs FBGEMM rowwise Adagrad, generated world (logit_scale 0.35), 2 ranks x 1024" \
  --variant "stock: --method=stock" \
  --variant "cfsgd_fixed_lr3: --transfer.mode=baseline --embedding.optimizer.ub_mode=fixed --embedding.optimizer.lr=3" \
  --variant "cfsgd_arith_lr0.03: --transfer.mode=baseline --embedding.optimizer.ub_rows=arithmetic --embedding.optimizer.ub_row_floor=false --embedding.optimizer.lr=0.03" \
  --variant "cfsgd_arith: --transfer.mode=baseline --embedding.optimizer.ub_rows=arithmetic --embedding.optimizer.ub_row_floor=false" \
  --variant "cfsgd: --transfer.mode=baseline" \
  --transfer.eval_groups=runs/quality/genhard/raw/planted.json --train.epochs=8 "$@"
