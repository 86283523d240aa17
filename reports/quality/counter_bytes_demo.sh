#!/usr/bin/env bash
# CF-SGD counter width (embedding.optimizer.counter_bytes 4 / 2 / 1) on the demo world (200k ratings, planted
# twins and loners; make demo's data), with the product's transfer (both) on, and the stock optimizer.
set -euo pipefail
[ -f runs/demo/dataset/manifest.json ] || python -c "from pathlib import Path; from trainer.experiments.demo import prepare_dataset; prepare_dataset(Path('runs/demo'), 200000)"
tailrec compare --config configs/movielens_deepfm.yaml --data runs/demo/dataset --out reports/quality/counter_bytes_demo \
  --seeds 1,2,3 --nproc 2 --title "CF-SGD counter width on the demo world (cfsgd + both), 2 ranks x 1024, 4 epochs" \
  --variant "tailrec_4B: --embedding.optimizer.counter_bytes=4" \
  --variant "tailrec_2B: --embedding.optimizer.counter_bytes=2" \
  --variant "tailrec_1B: --embedding.optimizer.counter_bytes=1" \
  --variant "stock: --method=stock" \
  --transfer.features=[movie_id] --transfer.eval_groups=runs/demo/raw/planted.json --train.epochs=4 "$@"
