#!/usr/bin/env bash
# CF-SGD counter width on the harder generated world (1M ratings, weaker signal: AUC ~0.77; 390 steps per
# epoch at 2 x 1024, 3,120 in all), data the defaults were not chosen on.
set -euo pipefail
[ -f runs/quality/genhard/dataset/manifest.json ] || {
  tailrec generate --format movielens --out runs/quality/genhard/raw --rows 1000000 --seed 11 --param logit_scale=0.35
  tailrec convert movielens --src runs/quality/genhard/raw --out runs/quality/genhard/dataset; }
tailrec compare --config configs/movielens_deepfm.yaml --data runs/quality/genhard/dataset --out reports/quality/counter_bytes_genhard \
  --seeds 1,2,3 --nproc 2 --title "CF-SGD counter width, generated world (logit_scale 0.35), 2 ranks x 1024, 8 epochs" \
  --variant "cfsgd_4B: --embedding.optimizer.counter_bytes=4" \
  --variant "cfsgd_2B: --embedding.optimizer.counter_bytes=2" \
  --variant "cfsgd_1B: --embedding.optimizer.counter_bytes=1" \
  --transfer.mode=baseline --transfer.eval_groups=runs/quality/genhard/raw/planted.json --train.epochs=8 "$@"
