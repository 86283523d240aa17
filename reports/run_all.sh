#!/usr/bin/env bash
# All ablation runs behind reports/*/README.md, in priority order (CPU: 2 shared cores, ~15 s/run).
# Datasets (prepare once, from the repository root):
#   python -c "from trainer.demo import prepare_dataset; from pathlib import Path; prepare_dataset(Path('runs/demo'), 200000)"
#   python -m trainer convert movielens --src path/to/ml-latest-small --out runs/ml_latest/dataset
#   python -m trainer convert criteo --src path/to/criteo/kaggle_train_head1999.txt --out runs/criteo_small/dataset --min-count 2
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
A="python -m trainer ablate --jobs 2 --seeds 0,1,2"
# A. planted structure on the generated default data (DeepFM, CF-SGD), fixed-weight grid for +T / select
$A --config configs/ablation_generated.yaml --data runs/demo/dataset --models deepfm --optimizers cfsgd:3 \
   --modes baseline,plus_t,select,lexico,both --lambdas 0.01,1,10 --out reports/planted_generated \
   --title "Planted twins/loners, generated ML-1M-format data, DeepFM + CF-SGD" --notes reports/notes/planted.md
# B. real ml-latest-small ratings, CF-SGD, DeepFM and AutoInt
$A --config configs/ablation_ml_latest.yaml --data runs/ml_latest/dataset --models deepfm,autoint --optimizers cfsgd:3 \
   --modes baseline,plus_t,select,lexico,both --out reports/ablation_ml_latest \
   --title "Harmless-transfer ablation, ml-latest-small, CF-SGD" --notes reports/notes/ml_latest.md
# C. shared Criteo rows (1,576 train rows), CF-SGD, DeepFM and AutoInt
$A --config configs/ablation_criteo_small.yaml --data runs/criteo_small/dataset --models deepfm,autoint --optimizers cfsgd:1,cfsgd:0.1 \
   --modes baseline,plus_t,select,lexico,both --out reports/ablation_criteo_small \
   --title "Harmless-transfer ablation, shared Criteo rows, CF-SGD" --notes reports/notes/criteo.md
# D. issue-4 optimizer quality comparison on ml-latest-small (baseline mode), two lrs for the FBGEMM rules
$A --config configs/ablation_ml_latest.yaml --data runs/ml_latest/dataset --models deepfm --modes baseline \
   --optimizers cfsgd:3,counter_sgd:3,exact_sgd:10,exact_rowwise_adagrad:0.05,dense_adam:0.001 \
   --out reports/optimizers_ml_latest --title "Embedding optimizers, ml-latest-small, DeepFM, baseline mode" \
   --notes reports/notes/optimizers.md
# E. lexico with the h-clip (docs/ALGORITHMS.md §3 edge case 3) (||h_i|| <= 1 * ||g_i||) on the planted data
$A --config configs/ablation_generated.yaml --data runs/demo/dataset --models deepfm --optimizers cfsgd:3 \
   --modes baseline,lexico,both --out reports/planted_generated_hclip --embedding.optimizer.lexico_h_clip=1.0 \
   --title "Planted data: lexico with h clipped to ||g|| (lexico_h_clip=1)" --notes reports/notes/hclip.md
# F. ml-latest-small, our rowwise Adagrad step size (DeepFM only)
$A --config configs/ablation_ml_latest.yaml --data runs/ml_latest/dataset --models deepfm --optimizers rowwise_adagrad:0.1 \
   --modes baseline,plus_t,select,lexico,both --out reports/ablation_ml_latest_rowwise \
   --title "Harmless-transfer ablation, ml-latest-small, rowwise Adagrad (ours)" --notes reports/notes/ml_latest.md
# G. generated data, AutoInt (1 epoch: AutoInt costs ~170 ms/step here)
$A --config configs/ablation_generated.yaml --data runs/demo/dataset --models autoint --optimizers cfsgd:3 \
   --modes baseline,plus_t,select,lexico,both --out reports/ablation_generated_autoint --train.epochs=1 \
   --title "Harmless-transfer ablation, generated data, AutoInt + CF-SGD (1 epoch)" --notes reports/notes/planted_autoint.md
