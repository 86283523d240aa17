#!/usr/bin/env bash
# Every run behind the issue-15 reports (collapse diagnostics, multi-embedding, ranking loss, DARE), in
# the order they were run (2 shared CPU cores; 10-60 s per run). `tailrec compare` skips finished runs,
# so rerunning this script only rebuilds the READMEs. Datasets (prepare once, from the repository root;
# the real samples are read from ../shared/data, never copied):
#   tailrec convert movielens --src ../shared/data/ml-latest-small --out runs/ml_latest/dataset --skip-bad-rows
#   tailrec convert movielens --src ../shared/data/ml-latest-small --out runs/ml_hist/dataset --skip-bad-rows --history 20
#   tailrec generate --format criteo --out runs/criteo_gen/raw --rows 300000 --seed 1
#   tailrec convert criteo --src runs/criteo_gen/raw --out runs/criteo_gen/dataset
#   # sparse positives: every negative line, 10% of the positive ones (25.4% -> 3.3% positives)
#   awk -F'\t' 'BEGIN{srand(7)} $1=="0" || rand()<0.1' runs/criteo_gen/raw/train.txt > runs/criteo_gen/sparse_train.txt
#   tailrec convert criteo --src runs/criteo_gen/sparse_train.txt --out runs/criteo_sparse/dataset
#   tailrec convert criteo --src ../shared/data/criteo/kaggle_train_head1999.txt --out runs/criteo_real/dataset --min-count 2
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
C="nice -n 5 tailrec compare --seeds 0,1,2 --slim"
# 1. collapse diagnostics: what the optimizers and transfer modes do to the spectrum (DeepFM, ml-latest-small)
$C --config configs/ablation_ml_latest.yaml --data runs/ml_latest/dataset --out reports/collapse_ml_latest \
  --tables movie_id,user_id --notes reports/notes/collapse.md \
  --title "Embedding collapse by optimizer and transfer mode, ml-latest-small, DeepFM" \
  --variant "adagrad: --embedding.optimizer.name=exact_rowwise_adagrad --embedding.optimizer.lr=0.05" \
  --variant "sgd: --embedding.optimizer.name=exact_sgd --embedding.optimizer.lr=10" \
  --variant "cfsgd: --embedding.optimizer.name=cfsgd --embedding.optimizer.lr=3" \
  --variant "cfsgd_plus_t: --embedding.optimizer.name=cfsgd --embedding.optimizer.lr=3 --transfer.mode=plus_t --transfer.weight=0.01" \
  --variant "cfsgd_lexico: --embedding.optimizer.name=cfsgd --embedding.optimizer.lr=3 --transfer.mode=lexico" \
  --train.epochs=3
# 2. multi-embedding against one table of the same total size (dim 32), three models
for m in deepfm dlrm dlrm_dcn; do
$C --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/multi_embedding/ml_latest_$m \
  --tables movie_id,user_id --notes reports/notes/multi_embedding.md \
  --title "Multi-embedding vs a single embedding of the same size, ml-latest-small, $m" \
  --variant "single32: --model.num_embeddings=1" --variant "multi2x16: --model.num_embeddings=2" \
  --variant "multi4x8: --model.num_embeddings=4" \
  --model.name=$m --embedding.dim=32 --data.bucket_feature=movie_id --train.epochs=3 --train.log_every=1000
done
# 3. DIN with shared vs decoupled (DARE) attention embeddings on a 20-movie history
$C --config configs/ml_latest_deepfm.yaml --data runs/ml_hist/dataset --out reports/dare_ml_latest \
  --tables movie_id,movie_id__att --notes reports/notes/dare.md \
  --title "DIN with shared vs decoupled (DARE) attention embeddings, ml-latest-small, 20-movie history" \
  --variant "din_shared: --model.name=din --model.attention_embedding=shared" \
  --variant "din_decoupled: --model.name=din --model.attention_embedding=decoupled" \
  --variant "din_decoupled_att8: --model.name=din --model.attention_embedding=decoupled --model.attention_dim=8" \
  --variant "deepfm_bag: --model.name=deepfm" \
  --variant "deepfm_nohist: --model.name=deepfm --data.features=[user_id,movie_id,year,genres,ts_bucket]" \
  --data.bucket_feature=movie_id --train.epochs=3 --train.log_every=1000
# 4. BCE + ranking loss: sparse-positive Criteo layout, MovieLens (dense positives), the real Criteo sample
$C --config configs/criteo_deepfm.yaml --data runs/criteo_sparse/dataset --out reports/ranking_loss/criteo_sparse \
  --notes reports/notes/ranking_loss.md \
  --title "BCE + ranking loss, generated Criteo layout with sparse positives (3.3%), DeepFM" \
  --variant "bce: --loss.ranking=none" --variant "pairwise1: --loss.ranking=pairwise --loss.weight=1" \
  --variant "listwise1: --loss.ranking=listwise --loss.weight=1" --variant "listwise01: --loss.ranking=listwise --loss.weight=0.1" \
  --train.epochs=2 --data.batch_size=2048 --model.mlp=[256,128] --train.log_every=1000
$C --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/ranking_loss/ml_latest \
  --notes reports/notes/ranking_loss.md \
  --title "BCE + ranking loss, ml-latest-small (78% positives), DeepFM" \
  --variant "bce: --loss.ranking=none" --variant "pairwise1: --loss.ranking=pairwise --loss.weight=1" \
  --variant "listwise1: --loss.ranking=listwise --loss.weight=1" --variant "listwise01: --loss.ranking=listwise --loss.weight=0.1" \
  --data.bucket_feature=movie_id --train.epochs=3 --train.log_every=1000
$C --config configs/criteo_deepfm.yaml --data runs/criteo_real/dataset --out reports/ranking_loss/criteo_real_sample \
  --notes reports/notes/ranking_loss.md \
  --title "BCE + ranking loss, the real Criteo sample (1,999 rows), DeepFM" \
  --variant "bce: --loss.ranking=none" --variant "pairwise1: --loss.ranking=pairwise --loss.weight=1" \
  --variant "listwise1: --loss.ranking=listwise --loss.weight=1" \
  --train.epochs=5 --data.batch_size=128 --data.bucket_feature=C1 --model.mlp=[64,32] --train.log_every=1000
# 5. multi-embedding at a larger size (DLRM-DCN, dim 128) and on the generated Criteo layout
$C --config configs/ml_latest_deepfm.yaml --data runs/ml_latest/dataset --out reports/multi_embedding/ml_latest_dlrm_dcn_128 \
  --tables movie_id,user_id --notes reports/notes/multi_embedding.md \
  --title "Multi-embedding at dim 128, ml-latest-small, DLRM-DCN" \
  --variant "single128: --model.num_embeddings=1" --variant "multi4x32: --model.num_embeddings=4" \
  --model.name=dlrm_dcn --embedding.dim=128 --data.bucket_feature=movie_id --train.epochs=3 --train.log_every=1000
$C --config configs/criteo_dlrm_dcn.yaml --data runs/criteo_gen/dataset --out reports/multi_embedding/criteo_gen_dlrm_dcn \
  --tables C1,C3 --notes reports/notes/multi_embedding.md \
  --title "Multi-embedding, generated Criteo layout, DLRM-DCN, dim 32" \
  --variant "single32: --model.num_embeddings=1" --variant "multi4x8: --model.num_embeddings=4" \
  --embedding.dim=32 --train.epochs=1 --data.batch_size=2048 --train.log_every=1000 --model.mlp=[256,128]
# (configs/criteo_dlrm.yaml's mlp [256, 128, 1] ends in a hidden layer of width 1 before the output, a
#  ReLU that died in 3 of our 6 first runs (AUC 0.5000): the runs above override it)
# 6. DARE with our CF-SGD kernel on both DIN tables (the runs in 3 used FBGEMM rowwise Adagrad)
$C --config configs/ml_latest_deepfm.yaml --data runs/ml_hist/dataset --out reports/dare_ml_latest_cfsgd \
  --tables movie_id,movie_id__att --notes reports/notes/dare_cfsgd.md \
  --title "DIN shared vs decoupled attention embeddings with CF-SGD, ml-latest-small, 20-movie history" \
  --variant "din_shared: --model.name=din --model.attention_embedding=shared" \
  --variant "din_decoupled: --model.name=din --model.attention_embedding=decoupled" \
  --embedding.optimizer.name=cfsgd --embedding.optimizer.lr=3 \
  --data.bucket_feature=movie_id --train.epochs=3 --train.log_every=1000
