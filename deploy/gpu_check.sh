#!/usr/bin/env bash
# The prepared GPU check of our fused optimizer (issue 12): one script, a few minutes on one GPU.
#
#   make setup EXTRAS=gpu,dev        # once: CUDA torch 2.13.0 + fbgemm-gpu 1.8.0 + triton (pyproject extras)
#   bash deploy/gpu_check.sh         # = make gpu-check; on a machine with >= 1 CUDA GPU
#   bash deploy/gpu_check.sh --cpu   # the same steps on CPU, tiny shapes (checks the script itself; CI runs it)
#
# Steps: 1. the Triton update kernel against the float64 reference on CUDA and the no-sync test
# (pytest -m gpu: tests/optim); 2. ms/step of our cfsgd, cfsgd + lexico and FBGEMM's exact_sgd,
# exact_rowwise_adagrad and counter_sgd side by side, same TBE shapes as the CPU bench (1 rank);
# 3. the same DMP model on 2 ranks when there are >= 2 devices; 4. the real trainer end to end on the
# device (generated MovieLens data): cfsgd, cfsgd + harmless transfer `both`, and the stock optimizer,
# ms/step and examples/s side by side (what the transfer costs on a GPU). Everything is also written to
# ${OUT:-runs/gpu_check}/gpu_check.log for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
MODE=cuda
[[ ${1:-} == --cpu ]] && MODE=cpu
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
step() { echo; echo "=== $1  [t=${SECONDS}s]"; }

if [[ $MODE == cuda ]]; then
  BENCH=(--device cuda --rounds 5 --steps 20 --warmup 5)   # default shapes: 26 tables x 100k x 16, batch 4096
  TESTS=(-m gpu tests/optim)
  TRAIN=(--device cuda --batch 1024 --steps 61 --warmup 10 --rounds 3)   # the demo's data and batch size
  ROWS=200000
else
  BENCH=(--device cpu --tables 5 --rows 300 --batch 64 --rounds 2 --steps 2 --warmup 1)
  # no CUDA: the gpu tests skip, so run a small slice of the same Triton checks in the interpreter
  export TRITON_INTERPRET=1
  TESTS=(tests/optim/test_triton.py -k "float64_reference and (cfsgd-sum-True or adagrad_lexico_clip-mean)")
  TRAIN=(--device cpu --batch 256 --steps 4 --warmup 1 --rounds 1)
  ROWS=20000
fi

step "environment ($MODE)"
$PY - "$MODE" <<'PYEOF'
import sys
import torch
import triton
import fbgemm_gpu  # noqa: F401
mode = sys.argv[1]
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if mode == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible: run with --cpu for the CPU dry run")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
PYEOF
NDEV=$($PY -c "import torch; print(torch.cuda.device_count() if '$MODE' == 'cuda' else 2)")

step "1/4 Triton kernel vs the float64 reference, no host sync in a step"
timeout 360 $PY -m pytest "${TESTS[@]}" -q -p no:cacheprovider -rs

step "2/4 kernel bench, 1 rank: ours vs FBGEMM, same shapes as the CPU bench"
timeout 300 $PY -m trainer.experiments.bench_kernel "${BENCH[@]}"

step "3/4 the same DMP model on 2 ranks"
if (( NDEV >= 2 )); then
  timeout 300 $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer.experiments.bench_kernel "${BENCH[@]}"
else
  echo "one device: the 2-rank run is skipped"
fi

step "4/4 the trainer end to end on the device: cfsgd, cfsgd + transfer both, stock (1 rank)"
DATA="$OUT/movielens-$ROWS"
if [[ ! -f $DATA/dataset/manifest.json ]]; then
  $PY -m trainer generate --format movielens --out "$DATA/raw" --rows "$ROWS" --seed 0 >/dev/null
  $PY -m trainer convert movielens --src "$DATA/raw" --out "$DATA/dataset" >/dev/null
fi
timeout 300 $PY -m trainer.experiments.bench_train "${TRAIN[@]}" --config configs/movielens_deepfm.yaml \
  --data "$DATA/dataset" --ranks 1 --variant "cfsgd: --transfer.mode=baseline" \
  --variant "both: --transfer.mode=both" --variant "stock: --method=stock"

step "done in ${SECONDS}s; log: $OUT/gpu_check.log"
